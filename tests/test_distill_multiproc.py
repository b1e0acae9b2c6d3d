"""Multi-process distillation: 2 torchrun processes (gloo, CPU) with batch b each train
exactly like 1 process with batch 2b (same noise rows, averaged gradients), with fresh
noise and with a pool, without and with per-sample class labels."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from distill_helpers.problems import SMALL, ddp_cases
from epd_kernels import EPDParams, distill

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available()
                                     and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path):
    b = 4
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "distill_helpers" / "ddp_worker.py"), str(tmp_path), str(b), str(ckpt_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (model, pool, cond) in ddp_cases(2 * b).items():
            two = EPDParams.load(tmp_path / f"{name}.safetensors")
            one = distill(model, shape=model.shape, batch_size=2 * b, pool=pool, **SMALL,
                          **cond)
            assert two.meta["world_size"] == 2 and two.meta["batch_per_rank"] == b
            assert one.meta["batch_size"] == two.meta["batch_size"] == 2 * b
            for field in ("r", "weights", "delta", "o"):
                torch.testing.assert_close(getattr(two, field), getattr(one, field),
                                           rtol=1e-10, atol=1e-12, msg=f"{name}: {field}")
            # the average of the rank-mean losses is the global mean loss
            loss = float((tmp_path / f"{name}.loss").read_text())
            assert loss == pytest.approx(one.meta["final_loss"], rel=1e-10)
    finally:
        torch.set_num_threads(before)
    # only rank 0 wrote the checkpoint, and it is complete (no temporaries left)
    assert sorted(os.listdir(ckpt_dir)) == ["pool.ckpt"]
