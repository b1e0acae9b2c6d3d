"""``epd sample`` and ``epd distill`` under torchrun (2 CPU processes, gloo).

* sample: the per-seed files of 2 processes equal those of 1 process (each seed has its
  own generator), for a folder and for an .npz assembled by rank 0;
* distill: 2 processes with batch b per process train exactly like 1 process with batch
  2 b (same global rows of noise, gradients averaged), so the params agree.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_cli import NEUTRAL_CWD, cli_env, epd

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "epd_kernels", *map(str, args)]
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, env=env, cwd=NEUTRAL_CWD, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                             f"stderr:\n{p.stderr}")
    return p


def test_torchrun_sample_equals_one_process(tmp_path):
    common = ["--model", "gmm", "--solver", "ipndm", "--nfe", 4, "--seeds", "0-6",
              "--batch-size", 2, "--no-progress"]
    one = tmp_path / "one"
    epd("sample", *common, "--out", one)
    # 2 processes, .npz output: each rank writes its seeds' shards (the per-seed folder
    # layout, in two.npz.parts/), rank 0 assembles after a barrier
    npz = tmp_path / "two.npz"
    p = torchrun("sample", *common, "--out", npz)
    assert "on 2 processes" in p.stdout
    # the processes sample at once: their times add up, and the sum says so
    assert "sampling time summed over 2 processes" in p.stdout, p.stdout
    with np.load(npz) as f:
        assert f["seeds"].tolist() == list(range(7))
        np.testing.assert_array_equal(f["samples"], np.stack(
            [np.load(one / f"seed-{s:06d}.npy") for s in range(7)]))
    assert not (tmp_path / "two.npz.parts").exists()


def distill_one_and_two_processes(tmp_path, solver, *extra):
    """`epd distill` of `solver` with 1 process and batch 4, and under torchrun with 2
    processes and batch 2 (gmm: per-row class labels); returns the two output files."""
    common = ["distill", "--model", "gmm", "--solver", solver, "--nfe", 3, "--iterations", 3,
              "--teacher-points", 2, "--no-progress", *extra]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    epd(*common, "--batch-size", 4, "--out", one)
    p = torchrun(*common, "--batch-size", 2, "--out", two)
    assert "2 processes" in p.stdout
    return one, two


def test_torchrun_distill_equals_one_process_with_double_batch(tmp_path):
    from epd_kernels import EPDParams

    a, b = map(EPDParams.load, distill_one_and_two_processes(tmp_path, "epd"))
    assert a.meta["batch_size"] == b.meta["batch_size"] == 4
    assert b.meta["world_size"] == 2
    for name in ("r", "weights", "delta", "o", "sigmas"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)
    # the params moved away from their initial values (the comparison is not vacuous)
    init = EPDParams.init(a.sigmas, 2, afs=True)
    assert not torch.allclose(a.r, init.r.to(a.r.dtype))
