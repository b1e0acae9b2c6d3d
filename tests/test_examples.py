"""The recipe in python/ runs end to end as shipped (tiny settings): it distils with
per-entry class labels on a pool, saves, reloads and samples."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore")
def test_distill_and_sample_own_model_recipe(tmp_path):
    from epd_kernels import EPDParams

    out = tmp_path / "my_epd.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "python" / "distill_and_sample_own_model.py"), "--nfe", "3",
         "--iterations", "3", "--batch-size", "4", "--pool", "8", "--num-samples", "6",
         "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    p = EPDParams.load(out)
    assert p.nfe == 3 and p.meta["pool"] == 8 and p.meta["iterations"] == 3
    assert p.meta["model"] == "distill_and_sample_own_model:make_denoiser"
    assert "RMSE to the reference at NFE 3: epd" in proc.stdout
    assert (tmp_path / "my_epd.safetensors.samples.pt").exists()
