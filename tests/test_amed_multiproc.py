"""Multi-process AMED distillation: 2 torchrun processes (gloo, CPU) with batch b each train
exactly like 1 process with batch 2b (the same gradient averaging as EPD)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from distill_helpers.problems import SMALL, gaussian
from epd_kernels import AMEDParams, distill

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available()
                                     and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORKER = """
import os, sys
import torch
import torch.distributed as dist
from distill_helpers.problems import SMALL, gaussian
from epd_kernels.distill import distill

torch.set_num_threads(1)
out_dir, batch = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
model = gaussian()
kw = dict(SMALL, num_points=None)
for form in ("predictor", "table"):
    p = distill(model, shape=model.shape, batch_size=batch, pool=64, method="amed",
                amed_form=form, **kw)
    assert p.meta["world_size"] == 2
    if dist.get_rank() == 0:
        p.save(os.path.join(out_dir, form + ".safetensors"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path):
    b = 4
    worker = tmp_path / "amed_worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(tmp_path), str(b)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = gaussian()
        for form in ("predictor", "table"):
            two = AMEDParams.load(tmp_path / f"{form}.safetensors")
            one = distill(model, shape=model.shape, batch_size=2 * b, pool=64, method="amed",
                          amed_form=form, **dict(SMALL, num_points=None))
            assert two.meta["batch_size"] == one.meta["batch_size"] == 2 * b
            a, c = two._tensors_for_file(), one._tensors_for_file()
            assert a.keys() == c.keys()
            for k in a:
                torch.testing.assert_close(a[k], c[k], rtol=1e-9, atol=1e-11, msg=f"{form}: {k}")
            assert two.meta["final_loss"] == pytest.approx(one.meta["final_loss"], rel=1e-9)
    finally:
        torch.set_num_threads(before)
