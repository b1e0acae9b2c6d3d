"""The ``epd`` command line, run as a subprocess (``python -m epd_kernels ...``).

Tiny settings on the analytic models (gmm, gaussian: 64 dims, drawn as 8x8 images) so
the whole file takes well under a minute on an idle 2-core machine; most of the time is
the interpreter start and ``import torch`` of each subprocess.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import epd_kernels

# The subprocesses run the same epd_kernels as this process (the installed package under
# `make test`, the source tree in a development setup), from a neutral working directory
# (``python -m`` puts the working directory first on sys.path).
PKG_ROOT = Path(epd_kernels.__file__).resolve().parents[1]
NEUTRAL_CWD = tempfile.mkdtemp(prefix="epd-cli-cwd-")
atexit.register(shutil.rmtree, NEUTRAL_CWD, ignore_errors=True)


def cli_env():
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PKG_ROOT) + (os.pathsep + old if old else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def epd(*args, cwd=None, check=True, timeout=300):
    """Runs ``python -m epd_kernels *args``; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "epd_kernels", *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd or NEUTRAL_CWD, env=cli_env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                             f"stderr:\n{p.stderr}")
    return p


def assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("epd"), lines[0]
    low = lines[0].lower()
    for n in needles:
        assert n.lower() in low, (n, lines[0])


def is_png(path) -> bool:
    data = Path(path).read_bytes()
    return len(data) > 100 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"


# --------------------------------------------------------------------------------------
# shared artefacts (one distillation and one reference for several tests)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def epd_params(work):
    out = work / "gmm-epd3.safetensors"
    p = epd("distill", "--model", "gmm", "--solver", "epd", "--nfe", 3, "--iterations", 3,
            "--teacher-points", 2, "--batch-size", 4, "--no-progress", "--out", out)
    assert "wrote" in p.stdout
    return out


# --------------------------------------------------------------------------------------
# list, help


def test_list_and_help(capsys):
    p = epd("list")
    assert "heun" in p.stdout and "1,3,5,7,9" in p.stdout
    assert "digits-unet (default)" in p.stdout and "needs --params" in p.stdout
    from epd_kernels.cli import main

    assert main([]) == 2 and "usage" in capsys.readouterr().out.lower()


# --------------------------------------------------------------------------------------
# distill


def test_distill_writes_loadable_params(epd_params, work):
    from epd_kernels import DODEParams, EPDParams

    p = EPDParams.load(epd_params)
    assert p.nfe == 3 and p.solver == "epd" and p.num_points == 2
    assert p.meta["model"] == "gmm" and p.meta["shape"] == [64]
    assert p.meta["iterations"] == 3

    out = work / "gmm-deuler5.safetensors"
    epd("distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 5, "--batch-size", 16,
        "--out", out)
    q = DODEParams.load(out)
    assert q.nfe == 5 and q.solver == "d-euler" and q.meta["shape"] == [64]


@pytest.mark.slow
def test_distill_checkpoint_resume(work, capsys):
    from epd_kernels import EPDParams

    ck = work / "ck.pt"
    out1, out2 = work / "ck1.safetensors", work / "ck2.safetensors"
    args = ["distill", "--model", "gaussian", "--solver", "epd", "--nfe", 3, "--iterations", 2,
            "--teacher-points", 2, "--batch-size", 2, "--checkpoint", ck, "--no-progress"]
    epd(*args, "--out", out1)
    assert ck.exists()
    # the finished checkpoint: the same call returns the same params at once (in-process:
    # the same code path without a second interpreter start-up)
    from epd_kernels.cli import main

    assert main([str(a) for a in args] + ["--out", str(out2)]) == 0
    a, b = EPDParams.load(out1), EPDParams.load(out2)
    for name in ("r", "weights", "delta", "o"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    # other settings with the same checkpoint: a clear error
    bad = [str(a) for a in args[:-5]] + ["--batch-size", "3", "--checkpoint", str(ck),
                                         "--no-progress", "--out", str(out2)]
    capsys.readouterr()
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert_user_error(subprocess.CompletedProcess(bad, 2, "", err), "checkpoint", "batch")


# --------------------------------------------------------------------------------------
# sample


def _load_dir(folder, seeds):
    return np.stack([np.load(Path(folder) / f"seed-{s:06d}.npy") for s in seeds])


def test_sample_dir_resume_and_batch_independence(work):
    out = work / "s_heun"
    p = epd("sample", "--model", "gmm", "--solver", "heun", "--nfe", 3, "--seeds", "0-5",
            "--batch-size", 3, "--no-progress", "--out", out)
    assert "latency NFE 3" in p.stdout and "total evaluations" in p.stdout
    assert "wall time" in p.stdout
    npys = sorted(out.glob("seed-*.npy"))
    pngs = sorted(out.glob("seed-*.png"))
    assert [f.name for f in npys] == [f"seed-{s:06d}.npy" for s in range(6)]
    assert len(pngs) == 6 and all(is_png(f) for f in pngs)
    assert json.loads((out / "run.json").read_text())["solver"] == "heun"
    before = _load_dir(out, range(6))
    mtimes = {f.name: f.stat().st_mtime_ns for f in npys}

    # resume: delete one seed; only that seed is recomputed
    (out / "seed-000003.npy").unlink()
    (out / "seed-000003.png").unlink()
    p = epd("sample", "--model", "gmm", "--solver", "heun", "--nfe", 3, "--seeds", "0-5",
            "--batch-size", 3, "--no-progress", "--out", out)
    assert "5 already finished, 1 to compute" in p.stdout, p.stdout
    assert "computed 1 seed(s)" in p.stdout
    for f in out.glob("seed-*.npy"):
        if f.name != "seed-000003.npy":
            assert f.stat().st_mtime_ns == mtimes[f.name], f.name
    assert (out / "seed-000003.png").exists()
    np.testing.assert_array_equal(_load_dir(out, range(6)), before)

    # batch size 1 gives the same samples, bit for bit (for convolutional models the
    # results agree to float32 round-off only: kernels may differ with the batch size)
    out1 = work / "s_heun_b1"
    epd("sample", "--model", "gmm", "--solver", "heun", "--nfe", 3, "--seeds", "0-5",
        "--batch-size", 1, "--no-progress", "--out", out1)
    b1 = _load_dir(out1, range(6))
    np.testing.assert_array_equal(b1, before)
    # ... and they are the library's samples for these seeds (labels = seed % 8)
    from epd_kernels import make_noise, sample
    from epd_kernels.models import load_model

    m = load_model("gmm")
    x = sample(m, make_noise(range(6), m.shape), solver="heun", nfe=3,
               class_labels=torch.arange(6) % 8)
    np.testing.assert_allclose(before, x.numpy(), rtol=0, atol=1e-6)

    # resuming into the folder with other settings is refused (in-process: same code path)
    from epd_kernels.cli import main

    assert main(["sample", "--model", "gmm", "--solver", "euler", "--nfe", "3", "--seeds",
                 "0-5", "--out", str(out)]) == 2


def test_sample_npz_with_params_and_resume(work, epd_params):
    out = work / "epd.npz"
    p = epd("sample", "--model", "gmm", "--solver", "epd", "--params", epd_params,
            "--seeds", "0-3", "--batch-size", 3, "--no-progress", "--out", out)
    assert "latency NFE 3" in p.stdout and "total evaluations 5" in p.stdout, p.stdout
    assert not (work / "epd.npz.parts").exists()
    with np.load(out) as f:
        assert f["samples"].shape == (4, 64)
        assert f["seeds"].tolist() == [0, 1, 2, 3]
        assert f["class_labels"].tolist() == [0, 1, 2, 3]
        run = json.loads(str(f["run"]))
        first = f["samples"].copy()
    assert run["solver"] == "epd" and run["nfe"] == 3
    # more seeds: the 4 already in the .npz are reused, 2 are computed
    p = epd("sample", "--model", "gmm", "--solver", "epd", "--params", epd_params,
            "--seeds", "0-5", "--no-progress", "--out", out)
    assert "4 already finished, 2 to compute" in p.stdout, p.stdout
    with np.load(out) as f:
        assert f["seeds"].tolist() == list(range(6))
        np.testing.assert_array_equal(f["samples"][:4], first)


# --------------------------------------------------------------------------------------
# eval


def test_eval_matches_direct_computation(work):
    from epd_kernels.metrics import frechet_distance, rmse
    from epd_kernels.models import load_model

    from epd_kernels import make_noise, sample

    # inputs in the layouts `epd sample` writes (made here, to save two interpreter starts):
    # a folder of per-seed .npy files (seeds 0-39) and an .npz reference (seeds 39..0 and
    # two extra seeds, to check the matching by seed)
    m = load_model("gmm")
    noise = make_noise(range(42), m.shape)
    lab = torch.arange(42) % 8
    x = sample(m, noise[:40], solver="euler", nfe=4, class_labels=lab[:40]).numpy()
    ref = sample(m, noise, solver="heun", nfe=41, class_labels=lab).numpy()
    s = work / "ev_euler"
    s.mkdir()
    for i in range(40):
        np.save(s / f"seed-{i:06d}.npy", x[i])
    r = work / "ev_ref.npz"
    order = list(range(41, -1, -1))
    np.savez(r, samples=ref[order], seeds=np.array(order))
    ref = ref[:40]
    js = work / "ev.json"
    p = epd("eval", "--samples", s, "--model", "gmm", "--reference", r, "--json", js)
    res = json.loads(js.read_text())
    g = torch.Generator().manual_seed(0)
    data = load_model("gmm").sample_data(10_000, generator=g).numpy()
    assert res["rmse"] == pytest.approx(rmse(x, ref), rel=1e-9)
    assert res["rmse_matched"] == 40
    assert res["frechet_distance"] == pytest.approx(frechet_distance(x, data), rel=1e-9)
    assert f"{res['rmse']:.6g}" in p.stdout and f"{res['frechet_distance']:.6g}" in p.stdout


# --------------------------------------------------------------------------------------
# demo


@pytest.mark.slow
def test_demo_quick(work):
    from epd_kernels import DODEParams, EPDParams

    out = work / "demo"
    p = epd("demo", "--quick", "--model", "gmm", "--no-progress", "--out", out)
    assert "| solver" in p.stdout and "RMSE to ref" in p.stdout and "FD (pixels)" in p.stdout
    for name in ("epd", "d-euler", "d-ipndm", "ipndm", "heun"):
        assert f"| {name} " in p.stdout, name
    assert is_png(out / "samples_grid.png") and is_png(out / "rmse_vs_nfe.png")
    res = json.loads((out / "results.json").read_text())
    for key in ("model", "num_samples", "reference", "results", "skipped", "params", "files",
                "timings"):
        assert key in res, key
    row = res["results"][0]
    for key in ("solver", "nfe", "latency_nfe", "total_evals", "rmse", "fd", "wall_time_s"):
        assert key in row, key
    solvers = {(r["solver"], r["nfe"]) for r in res["results"]}
    assert {("epd", 3), ("epd", 5), ("d-euler", 3), ("d-ipndm", 5), ("euler", 3)} <= solvers
    files = sorted((out / "params").glob("*.safetensors"))
    assert {f.name for f in files} >= {"epd-nfe3.safetensors", "d-euler-nfe5.safetensors"}
    for f in files:
        (DODEParams if f.name.startswith("d-") else EPDParams).load(f)


# --------------------------------------------------------------------------------------
# errors: exit code 2, one line, the problem named


def _error_cases(work, epd_params):
    base = ["sample", "--seeds", "0-1", "--no-progress", "--out", work / "err"]
    blocker = work / "a_file"
    blocker.write_text("x")
    subproc = [  # run as real processes (exit code, no traceback)
        (["sample", "--model", "nope", "--solver", "heun", "--nfe", 3, *base[1:]],
         ["unknown model", "nope"]),
        ([*base, "--model", "gmm", "--solver", "heun", "--nfe", 4],
         ["cannot meet", "nfe=4", "1, 3, 5, 7, 9"]),
        (["sample", "--model", "gmm", "--solver", "euler", "--nfe", 3, "--seeds", "9-2",
          "--out", work / "err"], ["seed range", "9-2"]),
        ([*base[:-2], "--out", blocker / "sub", "--model", "gmm", "--solver", "euler",
          "--nfe", 3], ["cannot write", "a_file"]),
    ]
    inproc = [  # the same code path, called in this process (no interpreter start-up)
        ([*base, "--model", "digits-exact", "--solver", "epd", "--params", epd_params],
         ["shape [64]", "[1, 8, 8]"]),
        (["sample", "--model", "gmm", "--solver", "euler", "--nfe", "three", "--seeds", "0",
          "--out", work / "err"], ["--nfe", "three"]),
        (["sample", "--model", "os.path:nothing_here", "--solver", "heun", "--nfe", 3,
          *base[1:]], ["model spec", "nothing_here"]),
        ([*base, "--model", "gmm", "--solver", "rk99", "--nfe", 3], ["unknown solver", "rk99"]),
        (["sample", "--model", "gmm", "--solver", "euler", "--nfe", 3, "--seeds", "1,x",
          "--out", work / "err"], ["bad seed", "x"]),
        (["sample", "--model", "gmm", "--solver", "euler", "--nfe", 3, "--seeds", "1,1",
          "--out", work / "err"], ["seed 1", "more than once"]),
        ([*base, "--model", "gmm", "--solver", "epd", "--nfe", 3], ["needs --params"]),
        ([*base, "--model", "gmm", "--solver", "epd", "--params", epd_params, "--nfe", 5],
         ["nfe=3", "--nfe 5"]),
        ([*base, "--model", "gmm", "--solver", "epd-ipndm", "--params", epd_params],
         ["params for solver 'epd'", "epd-ipndm"]),
        ([*base, "--model", "gmm", "--solver", "d-euler", "--params", epd_params],
         ["epd params", "d-euler"]),
        ([*base, "--model", "gmm", "--solver", "euler", "--nfe", 3, "--params", epd_params],
         ["takes no params"]),
        ([*base, "--model", "gmm", "--solver", "epd", "--params", work / "none.safetensors"],
         ["not found"]),
        ([*base, "--model", "gmm", "--solver", "euler", "--nfe", 3, "--class-label", 8],
         ["out of range", "8 classes"]),
        ([*base, "--model", "gaussian", "--solver", "euler", "--nfe", 3, "--class-label", 1],
         ["not class-conditional"]),
        (["distill", "--model", "gmm", "--solver", "heun", "--nfe", 3, "--out",
          work / "x.safetensors"], ["cannot distill", "heun"]),
        (["distill", "--model", "gmm", "--solver", "epd", "--nfe", 4, "--out",
          work / "x.safetensors"], ["cannot meet", "nfe=4"]),
        (["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 3, "--iterations", 5,
          "--out", work / "x.safetensors"], ["--iterations", "closed form"]),
        (["distill", "--model", "gmm", "--solver", "epd", "--nfe", 3, "--out",
          blocker / "p.safetensors"], ["cannot write", "a_file"]),
        (["eval", "--samples", work / "missing.npz", "--model", "gmm"], ["not found"]),
        (["eval", "--samples", work / "missing.npz"], ["--model", "--reference"]),
        (["demo", "--quick", "--model", "nope", "--out", work / "demo_err"], ["unknown model"]),
    ]
    return subproc, inproc


def test_errors(work, epd_params, capsys):
    from epd_kernels.cli import main

    subproc, inproc = _error_cases(work, epd_params)
    procs = []
    for args, needles in subproc:  # concurrently: each is mostly interpreter start-up
        cmd = [sys.executable, "-m", "epd_kernels", *map(str, args)]
        procs.append((cmd, needles, subprocess.Popen(
            cmd, env=cli_env(), cwd=NEUTRAL_CWD, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    for args, needles in inproc:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code
        cap = capsys.readouterr()
        p = subprocess.CompletedProcess(args, code, cap.out, cap.err)
        try:
            assert_user_error(p, *needles)
        except AssertionError as e:
            raise AssertionError(f"{' '.join(map(str, args))}: {e}") from None
    for cmd, needles, proc in procs:
        out, err = proc.communicate(timeout=300)
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        try:
            assert_user_error(p, *needles)
        except AssertionError as e:
            raise AssertionError(f"{' '.join(cmd[2:])}: {e}") from None
