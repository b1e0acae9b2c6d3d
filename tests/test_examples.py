"""The recipes in python/ run end to end as shipped (tiny settings): distilling with
per-entry class labels on a pool, saving, reloading and sampling; guided latent
text-to-image through a tiny diffusers pipeline; a flow-matching model; the k-diffusion-style
sampler functions."""
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


def _run_recipe(tmp_path, name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "python" / name), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.filterwarnings("ignore")
def test_guided_latent_text_to_image_recipe(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    out = _run_recipe(tmp_path, "guided_latent_text_to_image.py", "--tiny", "--iterations", "2",
                      "--batch-size", "2", "--pool", "4", "--ref-nfe", "9", "--solvers",
                      "ipndm,heun", "--out", "grid.png")
    assert "distilled EPD for NFE 5" in out
    # epd: latency 5, total evaluations (K + 1) * 3 - 1 = 8; the baselines at NFE 5
    assert "| epd | 5 | 5 | 8 | 3 |" in out and "| ipndm | 5 | 5 | 5 | 5 |" in out
    assert "| heun | 5 | 5 | 5 | 3 |" in out
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore")
def test_flow_matching_recipe(tmp_path):
    out = _run_recipe(tmp_path, "flow_matching_model.py", "--iterations", "5", "--pool", "64",
                      "--batch-size", "16", "--num-samples", "32", "--solvers", "euler,ipndm")
    assert "RMSE to the exact flow map" in out
    assert "| epd | 5 | 5 | 8 | 3 |" in out and "| euler | 5 | 5 | 5 | 5 |" in out
    assert "epd / best baseline RMSE at NFE 5:" in out


@pytest.mark.filterwarnings("ignore")
def test_k_diffusion_style_recipe(tmp_path):
    out = _run_recipe(tmp_path, "k_diffusion_style.py", "--iterations", "3",
                      "--num-samples", "16")
    # 4 steps on the positive grid + the step to 0: euler 5 calls, heun 2*4 + 1, EPD 2*4 - 1 + 1
    assert "| euler | 5 |" in out and "| heun | 9 |" in out and "| epd | 8 |" in out
    assert "callback keys: ['denoised', 'i', 'sigma', 'sigma_hat', 'x']" in out
