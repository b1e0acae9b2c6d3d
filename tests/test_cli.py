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


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process `main` calls pick their thread count (``--threads auto``); the tests
    after them keep the session's."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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
    # compared with the baselines on held-out noise by default (`epd_params` keeps it)
    assert p.meta["comparison"]["baselines"]

    out = work / "gmm-deuler5.safetensors"
    epd("distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 5, "--batch-size", 16,
        "--out", out)
    q = DODEParams.load(out)
    assert q.nfe == 5 and q.solver == "d-euler" and q.meta["shape"] == [64]


def test_distill_schedule_auto_fast_and_dode_grid(work):
    """--schedule auto runs the grid search (per-row labels: validation draws labelled
    too), --fast applies FAST_SETTINGS beneath explicit options, and a D-ODE fit takes a
    grid kind."""
    from epd_kernels import DODEParams, EPDParams, get_sigmas
    from epd_kernels.distill.schedule_search import DEFAULT_CANDIDATES, FAST_SETTINGS

    out = work / "gmm-epd3-auto.safetensors"
    epd("distill", "--model", "gmm", "--solver", "epd", "--nfe", 3, "--schedule", "auto",
        "--fast", "--iterations", 4, "--out", out)
    p = EPDParams.load(out)
    search = p.meta["schedule_search"]
    assert search["chosen"] in DEFAULT_CANDIDATES
    assert search["search_iterations"] == FAST_SETTINGS["search_iterations"]
    assert p.meta["iterations"] == 4                          # explicit option wins
    assert p.meta["batch_size"] == FAST_SETTINGS["batch_size"]
    assert p.meta["M"] == FAST_SETTINGS["M"]
    assert p.meta["pool"] == FAST_SETTINGS["pool"]   # per-row labels: one per pool entry
    assert search["final"]["learn_grid"] is True     # auto learns the grid by default
    assert search["final"]["kept"] in ("search", "learned", "fixed", "learned_start")

    out = work / "gmm-epd3-fixed-learned.safetensors"    # --learn-grid on a fixed grid
    epd("distill", "--model", "gmm", "--solver", "epd", "--nfe", 3, "--iterations", 4,
        "--learn-grid", "on", "--pool", 64, "--out", out)
    p = EPDParams.load(out)
    assert p.meta["learn_grid"] and p.meta["match"] == "final"
    assert p.schedule["kind"] == "learned"

    out = work / "gmm-dipndm5-tu.safetensors"
    epd("distill", "--model", "gmm", "--solver", "d-ipndm", "--nfe", 5, "--batch-size", 16,
        "--schedule", "time-uniform", "--out", out)
    q = DODEParams.load(out)
    torch.testing.assert_close(q.sigmas, get_sigmas("time-uniform", 5))


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
                                         "--no-progress", "--out", str(out2), "--force"]
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


def test_eval_matches_direct_computation(work, capsys):
    from epd_kernels.cli import main
    from epd_kernels.metrics import frechet_distance, global_rmse
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
    capsys.readouterr()
    assert main(["eval", "--samples", str(s), "--model", "gmm", "--reference", str(r),
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    res = json.loads(js.read_text())
    g = torch.Generator().manual_seed(0)
    data = load_model("gmm").sample_data(10_000, generator=g).numpy()
    # the global RMSE: one root of the mean over all 40 x 64 elements
    expect = float(np.sqrt(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2)))
    assert res["rmse"] == pytest.approx(expect, rel=1e-9)
    assert res["rmse"] == global_rmse(x, ref) and res["rmse_kind"] == "global"
    assert res["rmse_matched"] == 40
    assert res["frechet_distance"] == pytest.approx(frechet_distance(x, data), rel=1e-9)
    assert res["frechet_n"] == 40
    assert f"global RMSE to reference: {res['rmse']:.6g}" in out
    assert f"FD (n=40), pixel space, to model:gmm (10000 items): " \
           f"{res['frechet_distance']:.6g}" in out


# --------------------------------------------------------------------------------------
# demo


@pytest.fixture(scope="module")
def demo_quick(work):
    """One `epd demo --quick` run on gmm, shared by the demo tests: (process, folder)."""
    out = work / "demo"
    return epd("demo", "--quick", "--model", "gmm", "--no-progress", "--out", out), out


@pytest.mark.slow
def test_demo_quick(demo_quick):
    from epd_kernels import AMEDParams, DODEParams, EPDParams

    p, out = demo_quick
    assert "| solver" in p.stdout and "global RMSE to ref" in p.stdout
    assert "FD (pixels, n=12)" in p.stdout
    for name in ("epd", "amed", "d-euler", "d-ipndm", "ipndm", "heun"):
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
    assert {("epd", 3), ("epd", 5), ("amed", 3), ("amed", 5), ("d-euler", 3), ("d-ipndm", 5),
            ("euler", 3)} <= solvers
    files = sorted((out / "params").glob("*.safetensors"))
    assert {f.name for f in files} >= {"epd-nfe3.safetensors", "d-euler-nfe5.safetensors"}
    readers = {"d-": DODEParams, "amed": AMEDParams, "epd": EPDParams}
    for f in files:
        reader = next(r for prefix, r in readers.items() if f.name.startswith(prefix))
        reader.load(f)


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
        (["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 3, "--schedule", "auto",
          "--out", work / "x.safetensors"], ["--schedule auto", "EPD and AMED"]),
        (["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 3, "--fast",
          "--out", work / "x.safetensors"], ["--fast", "closed form"]),
        (["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 3, "--no-compare",
          "--out", work / "x.safetensors"], ["--no-compare", "closed form"]),
        (["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", 3, "--learn-grid",
          "on", "--out", work / "x.safetensors"], ["--learn-grid", "closed form"]),
        (["distill", "--model", "gmm", "--solver", "amed", "--nfe", 3, "--learn-grid",
          "on", "--out", work / "x.safetensors"], ["--learn-grid", "EPD solvers only"]),
        (["distill", "--model", "gmm", "--solver", "epd", "--nfe", 3, "--schedule", "karras",
          "--out", work / "x.safetensors"], ["--schedule must be", "'karras'"]),
        (["eval", "--samples", work / "missing.npz", "--model", "gmm"], ["not found"]),
        (["eval", "--samples", work / "missing.npz"], ["--model", "--reference"]),
        (["demo", "--quick", "--model", "nope", "--out", work / "demo_err"], ["unknown model"]),
    ]
    return subproc, inproc


def assert_main_fails(capsys, args, needles):
    """`epd ARGS` run in-process must fail as a user error whose message holds `needles`."""
    from epd_kernels.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    cap = capsys.readouterr()
    try:
        assert_user_error(subprocess.CompletedProcess(args, code, cap.out, cap.err), *needles)
    except AssertionError as e:
        raise AssertionError(f"{' '.join(map(str, args))}: {e}") from None


def test_errors(work, epd_params, capsys):

    subproc, inproc = _error_cases(work, epd_params)
    procs = []
    for args, needles in subproc:  # concurrently: each is mostly interpreter start-up
        cmd = [sys.executable, "-m", "epd_kernels", *map(str, args)]
        procs.append((cmd, needles, subprocess.Popen(
            cmd, env=cli_env(), cwd=NEUTRAL_CWD, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    for args, needles in inproc:
        assert_main_fails(capsys, args, needles)
    for cmd, needles, proc in procs:
        out, err = proc.communicate(timeout=300)
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        try:
            assert_user_error(p, *needles)
        except AssertionError as e:
            raise AssertionError(f"{' '.join(cmd[2:])}: {e}") from None


# --------------------------------------------------------------------------------------
# AMED-Solver / AMED-Plugin through the command line


def _run_concurrently(cmds, timeout=300):
    """Runs ``python -m epd_kernels`` argument lists at once (each is mostly interpreter
    start-up); returns their CompletedProcesses in order."""
    procs = [(args, subprocess.Popen([sys.executable, "-m", "epd_kernels", *map(str, args)],
                                     env=cli_env(), cwd=NEUTRAL_CWD, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for args in cmds]
    out = []
    for args, proc in procs:
        o, e = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(args, proc.returncode, o, e))
    return out


AMED_TINY = ["--iterations", 3, "--teacher-points", 2, "--batch-size", 4, "--pool", 16,
             "--no-progress"]


@pytest.fixture(scope="module")
def amed_files(work):
    """AMED-Solver and AMED-Plugin, predictor and table form, distilled on gmm by the CLI."""
    runs = {  # name -> (solver, nfe, extra options)
        "amed-pred": ("amed", 3, []),
        "amed-table": ("amed", 5, ["--amed-form", "table"]),
        "plugin-pred": ("amed-ipndm", 5, ["--amed-form", "predictor", "--features",
                                          "denoised"]),
        "plugin-table": ("amed-ipndm", 3, ["--amed-form", "table"]),
    }
    files = {name: work / f"gmm-{name}.safetensors" for name in runs}
    procs = _run_concurrently([["distill", "--model", "gmm", "--solver", solver, "--nfe", nfe,
                                *AMED_TINY, *extra, "--out", files[name]]
                               for name, (solver, nfe, extra) in runs.items()])
    for p in procs:
        assert p.returncode == 0, (p.args, p.stdout, p.stderr)
        assert "wrote" in p.stdout, p.stdout
    return {name: (files[name],) + runs[name][:2] for name in runs}


def test_list_shows_amed_with_nfe_rule(capsys):
    from epd_kernels.cli import main

    assert main(["list"]) == 0
    lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()
             if l.strip() and l.startswith("  ")}
    for name in ("amed", "amed-ipndm"):
        assert "NFE = 2*steps - 1 (analytic first step)" in lines[name], lines[name]
        assert "1,3,5,7,9" in lines[name] and "needs --params" in lines[name]


def test_distill_amed_both_forms_then_sample(amed_files, work):
    """Every file loads as the AMEDParams asked for (solver, form, NFE, trained away from
    the neutral start, settings in meta), and `epd sample` with it gives the library's
    `sample` with the same params and noise (labels = seed % 8)."""
    from epd_kernels import AMEDParams, make_noise, sample
    from epd_kernels.models import load_model

    m = load_model("gmm")
    noise = make_noise(range(3), m.shape)
    labels = torch.arange(3) % 8
    cmds, expect = [], {}
    for name, (path, solver, nfe) in amed_files.items():
        p = AMEDParams.load(path)
        form = "table" if name.endswith("table") else "predictor"
        assert (p.solver, p.form, p.nfe, p.plugin) == (solver, form, nfe,
                                                        solver == "amed-ipndm")
        assert p.meta["model"] == "gmm" and p.meta["shape"] == [64]
        assert p.meta["method"] == "amed" and p.meta["amed_form"] == form
        assert p.meta["iterations"] == 3 and p.meta["M"] == 2 and p.meta["batch_size"] == 4
        assert p.meta["pool"] == 16  # labels (8 classes) one per pool entry
        assert p.meta["features"] == (None if form == "table" else "denoised")
        if form == "table":  # three Adam steps moved r away from 1/2
            assert (p.r - 0.5).abs().max() > 1e-3, p.r
        else:  # ... and the predictor's heads away from zero
            assert p.predictor.head_r.bias.abs().max() > 1e-3
        out = work / f"s-{name}.npz"
        cmds.append(["sample", "--model", "gmm", "--solver", solver, "--params", path,
                     "--seeds", "0-2", "--no-progress", "--out", out])
        expect[out] = (sample(m, noise, solver=solver, nfe=nfe, params=p,
                              class_labels=labels), nfe)
    for p, (out, (x, nfe)) in zip(_run_concurrently(cmds), expect.items()):
        assert p.returncode == 0, (p.args, p.stdout, p.stderr)
        # AMED has no parallel branches: total evaluations = latency NFE = nfe
        assert f"latency NFE {nfe}, total evaluations {nfe} per sample" in p.stdout, p.stdout
        with np.load(out) as f:
            assert f["seeds"].tolist() == [0, 1, 2]
            assert json.loads(str(f["run"]))["nfe"] == nfe
            np.testing.assert_allclose(f["samples"], x.numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_amed_module_features_on_the_unet(work):
    """--features module:net.mid2 (the embedded U-Net's bottleneck): the file records it,
    `epd sample` with the same model hooks it (equal to the library's samples), and a
    model without that submodule is refused with the feature source named."""
    from epd_kernels import AMEDParams, make_noise, sample
    from epd_kernels.cli import main
    from epd_kernels.models import load_model

    path = work / "unet-amed.safetensors"
    epd("distill", "--model", "digits-unet", "--solver", "amed", "--nfe", 3,
        "--features", "module:net.mid2", "--iterations", 2, "--teacher-points", 1,
        "--batch-size", 2, "--no-progress", "--no-compare", "--out", path)
    p = AMEDParams.load(path)
    assert p.features == "module:net.mid2" and p.meta["features"] == "module:net.mid2"
    assert "comparison" not in p.meta    # --no-compare
    assert p.feature_dim == 4  # 64 channels at 2x2, channel-averaged

    out = work / "unet-amed-samples"
    assert main(["sample", "--model", "digits-unet", "--solver", "amed", "--params", str(path),
                 "--seeds", "0-1", "--no-progress", "--out", str(out)]) == 0
    m = load_model("digits-unet")
    x = sample(m, make_noise(range(2), m.shape), solver="amed", nfe=3, params=p,
               class_labels=torch.arange(2))
    np.testing.assert_allclose(_load_dir(out, range(2)), x.numpy(), rtol=0, atol=1e-5)
    # the hook is needed: predicting from "denoised" features instead would not fit
    with pytest.raises(ValueError, match="F = 64"):
        sample(m, make_noise(range(2), m.shape), solver="amed", nfe=3,
               params=p.with_features("denoised"), class_labels=torch.arange(2))


def test_amed_params_errors(work, epd_params, amed_files, capsys):
    """Params of the wrong kind name both kinds; AMED-only and EPD-only options are refused
    for the other solvers; bad feature specs and forms are named (exit 2, one line)."""
    from epd_kernels.cli import main

    amed3, amed_t5 = amed_files["amed-pred"][0], amed_files["amed-table"][0]
    plugin5 = amed_files["plugin-pred"][0]
    dode = work / "gmm-deuler3-for-amed.safetensors"
    main(["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", "3", "--batch-size", "8",
          "--out", str(dode)])
    base = ["sample", "--model", "gmm", "--seeds", "0-1", "--no-progress", "--out",
            work / "err-amed"]
    dist = ["distill", "--model", "gmm", "--nfe", 3, "--out", work / "x-amed.safetensors"]
    cases = [
        ([*base, "--solver", "epd", "--params", amed3],
         ["amed params", "'amed'", "not epd params", "'epd'"]),
        ([*base, "--solver", "epd-ipndm", "--params", plugin5],
         ["amed params", "'amed-ipndm'", "epd params", "'epd-ipndm'"]),
        ([*base, "--solver", "d-euler", "--params", amed_t5],
         ["amed params", "'amed'", "d-ode params", "'d-euler'"]),
        ([*base, "--solver", "amed", "--params", epd_params],
         ["epd params", "'epd'", "not amed params", "'amed'"]),
        ([*base, "--solver", "amed-ipndm", "--params", dode],
         ["d-ode params", "'d-euler'", "amed params", "'amed-ipndm'"]),
        ([*base, "--solver", "amed-ipndm", "--params", amed3],
         ["params for solver 'amed'", "not 'amed-ipndm'"]),
        ([*base, "--solver", "amed", "--params", plugin5],
         ["params for solver 'amed-ipndm'", "not 'amed'"]),
        ([*base, "--solver", "amed", "--params", amed3, "--nfe", 5], ["nfe=3", "--nfe 5"]),
        ([*base, "--solver", "amed"], ["needs --params", "--solver amed"]),
        (["sample", "--model", "digits-exact", "--solver", "amed", "--params", amed3,
          "--seeds", "0", "--out", work / "err-amed"], ["shape [64]", "[1, 8, 8]"]),
        ([*dist, "--solver", "amed", "--num-points", 2],
         ["--num-points", "epd solvers", "amed"]),
        ([*dist, "--solver", "amed-ipndm", "--num-points", 1], ["--num-points"]),
        ([*dist, "--solver", "epd", "--amed-form", "table"],
         ["--amed-form", "amed solvers", "epd"]),
        ([*dist, "--solver", "epd-ipndm", "--features", "denoised"],
         ["--features", "amed solvers", "epd-ipndm"]),
        ([*dist, "--solver", "d-euler", "--features", "denoised"],
         ["--features", "amed solvers", "d-euler"]),
        ([*dist, "--solver", "amed", "--amed-form", "table", "--features", "denoised"],
         ["--features", "table"]),
        ([*dist, "--solver", "amed", "--features", "pixels"],
         ["--features", "pixels", "module:net.mid2"]),
        ([*dist, "--solver", "amed", "--amed-form", "lookup"], ["--amed-form", "lookup"]),
        ([*dist, "--solver", "amed", "--features", "module:net.mid2", "--iterations", 1],
         ["module:net.mid2", "no submodule"]),
        ([*dist, "--solver", "amed", "--nfe", 4], ["cannot meet", "nfe=4", "'amed'"]),
    ]
    for args, needles in cases:
        assert_main_fails(capsys, args, needles)


def test_amed_checkpoint_resume_after_interrupt(work, monkeypatch, capsys):
    """An AMED run interrupted (Ctrl-C) in its third iteration leaves a checkpoint; the
    same command resumes from it and ends with the params of an uninterrupted run; the
    finished checkpoint returns them at once; other AMED settings are refused."""
    import importlib

    from epd_kernels import AMEDParams
    from epd_kernels.cli import main

    # (`epd_kernels.distill` the attribute is the function; the module is in sys.modules)
    loop = importlib.import_module("epd_kernels.distill.loop")
    ck = work / "amed-ck.pt"
    once, resumed, again = (work / f"amed-ck-{n}.safetensors" for n in ("once", "res", "again"))
    args = ["distill", "--model", "gmm", "--solver", "amed", "--nfe", "3", "--iterations", "4",
            "--teacher-points", "2", "--batch-size", "3", "--no-progress"]
    assert main(args + ["--out", str(once)]) == 0  # the uninterrupted run, no checkpoint

    real, calls = loop.mse_loss, []

    def mse_loss(a, b):  # the same loss (and name, part of the settings), then Ctrl-C
        calls.append(1)
        if len(calls) > 2 * 2:  # S = 2 steps: two loss terms per iteration
            raise KeyboardInterrupt
        return real(a, b)

    mse_loss.__qualname__ = "mse_loss"
    monkeypatch.setattr(loop, "mse_loss", mse_loss)
    assert main(args + ["--checkpoint", str(ck), "--out", str(resumed)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert ck.exists() and not resumed.exists()
    assert torch.load(ck, weights_only=True)["iteration"] == 2
    monkeypatch.setattr(loop, "mse_loss", real)

    assert main(args + ["--checkpoint", str(ck), "--out", str(resumed)]) == 0
    assert main(args + ["--checkpoint", str(ck), "--out", str(again)]) == 0
    a, b, c = (AMEDParams.load(f) for f in (once, resumed, again))
    sa, sb, sc = (p.predictor.state_dict() for p in (a, b, c))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-9, msg=k)
        assert torch.equal(sc[k], sb[k]), k
    assert a.predictor.head_r.bias.abs().max() > 1e-3  # trained: the check is not vacuous
    assert b.meta["iterations"] == 4 and b.meta["features"] == "denoised"

    capsys.readouterr()
    for other, needles in ((["--amed-form", "table"], ["checkpoint", "amed_form", "features"]),
                           (["--seed", "1"], ["checkpoint", "seed"])):
        assert main(args + other + ["--checkpoint", str(ck), "--out", str(again),
                                    "--force"]) == 2
        err = capsys.readouterr().err
        assert_user_error(subprocess.CompletedProcess(args, 2, "", err), *needles)


@pytest.mark.slow
def test_demo_quick_amed(demo_quick):
    """The demo distils AMED-Solver at NFE 3 and 5 and AMED-Plugin (optional, always run by
    --quick): rows in the printed table and in results.json (with AMED's NFE accounting:
    total evaluations = latency NFE), predictor params reading "denoised" (gmm has no U-Net
    bottleneck), and the time of the AMED stage in results.json."""
    from epd_kernels import AMEDParams

    p, out = demo_quick
    assert "[5/7] AMED" in p.stdout
    res = json.loads((out / "results.json").read_text())
    rows = {(r["solver"], r["nfe"]): r for r in res["results"]}
    for solver in ("amed", "amed-ipndm"):
        assert f"| {solver} " in p.stdout, solver
        for nfe in (3, 5):
            r = rows[(solver, nfe)]
            assert r["distilled"] and r["latency_nfe"] == r["total_evals"] == nfe, r
            assert np.isfinite(r["rmse"]) and r["rmse"] > 0
            q = AMEDParams.load(out / "params" / f"{solver}-nfe{nfe}.safetensors")
            assert (q.solver, q.nfe, q.form, q.features) == (solver, nfe, "predictor",
                                                             "denoised")
            assert q.meta["model"] == "gmm" and q.meta["command"] == "epd demo"
    assert 0 < res["timings"]["amed"] < res["timings"]["total"]
    assert res["config"]["amed_features"] == "denoised"
    assert not [s for s in res["skipped"] if s["solver"].startswith("amed")]


@pytest.mark.slow
def test_torchrun_amed_distill_equals_one_process_with_double_batch(tmp_path):
    """AMED under torchrun takes EPD's path: 2 processes with batch 2 train like 1 process
    with batch 4 (every rank starts from the same seeded predictor)."""
    from epd_kernels import AMEDParams
    from test_cli_multiproc import distill_one_and_two_processes

    # Fresh noise (labels per batch row, sliced per rank). Not the default pool here: the
    # float32 states round differently for batch 4 and 2 x 2 (losses agree to 1e-7), and
    # Adam turns that into steps of order lr for weights whose gradient is ~0, beyond the
    # tolerance below; the pool path is compared in float64 by test_distill_multiproc.
    a, b = map(AMEDParams.load, distill_one_and_two_processes(tmp_path, "amed",
                                                               "--pool", "none"))
    assert a.meta["batch_size"] == b.meta["batch_size"] == 4 and b.meta["world_size"] == 2
    sa, sb = a.predictor.state_dict(), b.predictor.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    assert a.predictor.head_r.bias.abs().max() > 1e-3  # trained: the check is not vacuous


# --------------------------------------------------------------------------------------
# threads


def test_pick_threads_keeps_the_faster_count():
    """'auto' times the probe with 1 thread and with all, interleaved, and keeps the
    faster; an integer is used as is without timing."""
    import time

    from epd_kernels.workflow.threads import pick_threads

    torch.set_num_threads(2)
    seen = []

    def probe(slow_with):   # a probe whose speed depends only on the thread count
        def run():
            seen.append(torch.get_num_threads())
            time.sleep(0.03 if torch.get_num_threads() == slow_with else 0.0)
        return run

    assert pick_threads("auto", probe(slow_with=2)) == 1 and torch.get_num_threads() == 1
    assert seen == [1, 2, 1, 2, 1, 2]   # one untimed call each, then 2 interleaved rounds
    torch.set_num_threads(2)
    assert pick_threads("auto", probe(slow_with=1)) == 2 and torch.get_num_threads() == 2
    seen.clear()
    assert pick_threads(1, probe(slow_with=2)) == 1 and seen == []
    assert pick_threads("auto", probe(slow_with=1), device="cuda") == 1   # no timing off-CPU
    assert seen == []


def test_passive_wait_is_set_before_torch_unless_chosen(monkeypatch):
    import sys as _sys

    from epd_kernels.workflow.threads import prefer_passive_wait

    env = {}
    assert prefer_passive_wait(env) is False and env == {}   # torch is loaded: too late
    monkeypatch.delitem(_sys.modules, "torch")               # as before `import torch`
    assert prefer_passive_wait(env) is True and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "active"}                       # the user's choice stays
    assert prefer_passive_wait(env) is False and env == {"OMP_WAIT_POLICY": "active"}


def test_package_sets_passive_wait_before_it_imports_torch():
    """`import epd_kernels` (as the ``epd`` command does first) sets the wait policy before
    torch's import begins: an import hook prints the variable at that moment."""
    env = cli_env()
    env.pop("OMP_WAIT_POLICY", None)
    code = ("import os, sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            print('at torch import:', os.environ.get('OMP_WAIT_POLICY'))\n"
            "sys.meta_path.insert(0, Hook())\n"
            "import epd_kernels\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=NEUTRAL_CWD,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["at torch import: PASSIVE"], p.stdout


# --------------------------------------------------------------------------------------
# files and outputs: refusals, --force, no empty folders, progress, honest labels


def test_resume_refuses_unreadable_run_json_and_npz_without_run(work, capsys):
    base = ["sample", "--model", "gmm", "--solver", "euler", "--nfe", "3", "--seeds", "0-3",
            "--no-progress", "--out"]
    from epd_kernels.cli import main

    folder = work / "resume-bad-json"
    assert main(base + [str(folder)]) == 0
    (folder / "run.json").write_text("{not json")
    assert_main_fails(capsys, base + [folder],
                      ["cannot resume", "run.json cannot be read", "settings", "unknown"])
    foreign = work / "foreign.npz"
    np.savez(foreign, samples=np.zeros((2, 64), np.float32), seeds=np.arange(2))
    assert_main_fails(capsys, base + [foreign],
                      ["cannot resume from", "foreign.npz", "no run settings"])
    assert not (work / "foreign.npz.parts").exists()   # the folder it made is gone again
    with np.load(foreign) as f:                       # and the file is untouched
        assert f["samples"].shape == (2, 64)


def test_distill_out_needs_force(work, capsys):
    from epd_kernels import DODEParams
    from epd_kernels.cli import main

    out = work / "force-dode.safetensors"
    args = ["distill", "--model", "gmm", "--solver", "d-euler", "--nfe", "3", "--batch-size",
            "8", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    assert_main_fails(capsys, args[:-2] + ["--seed", "1", "--out", out],
                      ["--out", "force-dode.safetensors", "exists", "--force"])
    assert out.read_bytes() == before
    assert main(args[:-2] + ["--seed", "1", "--out", str(out), "--force"]) == 0
    assert DODEParams.load(out).nfe == 3 and out.read_bytes() != before


def test_demo_refuses_earlier_results_and_failures_leave_no_folders(work, capsys):
    from epd_kernels.cli import main

    earlier = work / "demo-earlier"
    earlier.mkdir()
    (earlier / "table.md").write_text("| an earlier table |\n")
    assert_main_fails(capsys, ["demo", "--quick", "--model", "gmm", "--out", earlier],
                      ["--out", "demo-earlier", "earlier demo", "table.md", "--force"])
    assert (earlier / "table.md").read_text() == "| an earlier table |\n"
    assert sorted(p.name for p in earlier.iterdir()) == ["table.md"]   # no params/ made
    # a failure after the folders were made (unknown model): both go again
    new = work / "demo-new" / "nested"
    assert_main_fails(capsys, ["demo", "--quick", "--model", "nope", "--out", new],
                      ["unknown model"])
    assert not (work / "demo-new").exists()
    # ... but a folder that existed stays, and so does a folder holding results
    assert_main_fails(capsys, ["demo", "--quick", "--model", "nope", "--force", "--out",
                               earlier], ["unknown model"])
    assert (earlier / "table.md").exists() and not (earlier / "params").exists()


def test_params_folder_is_named_as_a_folder(work, epd_params, capsys):
    folder = work / "params-folder"
    folder.mkdir()
    shutil.copy(epd_params, folder / "mine.safetensors")
    assert_main_fails(capsys, ["sample", "--model", "gmm", "--solver", "epd", "--params",
                               folder, "--seeds", "0", "--out", work / "pf"],
                      ["--params", "params-folder is a folder", "params file",
                       "mine.safetensors"])
    assert not (work / "pf").exists()


def test_long_sampling_shows_step_progress(work, capsys, monkeypatch):
    """The bar counts denoiser steps across batches, so one long batch shows progress
    (here without the bar's 2 s delay)."""
    from epd_kernels.cli import main
    from epd_kernels.workflow import sample_job

    monkeypatch.setattr(sample_job._StepProgress, "DELAY_S", 0.0)
    capsys.readouterr()
    assert main(["sample", "--model", "gmm", "--solver", "euler", "--nfe", "40", "--seeds",
                 "0-4", "--batch-size", "3", "--out", str(work / "progress.npz")]) == 0
    err = capsys.readouterr().err
    assert "sample euler nfe=40" in err and "80/80" in err, err   # 2 batches x 40 steps
    assert "step" in err


def test_sampling_time_of_several_processes_is_labelled_as_a_sum(capsys):
    from epd_kernels.workflow.sample_job import _report

    one = {"computed": 4, "latency_nfe": 3, "total_evals": 3, "steps": 2, "sampling_s": 1.5,
           "wall_s": 2.0}
    _report("heun", 3, [one, dict(one, sampling_s=1.25)], "x.npz")
    out = capsys.readouterr().out
    assert "sampling time summed over 2 processes 2.75 s, wall time 2.00 s" in out, out
    _report("heun", 3, [one], "x.npz")
    assert "; sampling time 1.50 s, wall time 2.00 s" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# eval: one-line errors for what a new user meets


def test_eval_rough_edges(work, capsys):
    from epd_kernels.cli import main

    nan = work / "all-nan.npy"
    np.save(nan, np.full((7, 64), np.nan, np.float32))
    assert_main_fails(capsys, ["eval", "--samples", nan, "--model", "gmm"],
                      ["all-nan.npy", "7 of 7 samples have non-finite values"])
    some = work / "some-inf.npz"
    x = np.zeros((5, 64), np.float32)
    x[2, 3] = np.inf
    np.savez(some, samples=x, seeds=np.arange(5))
    assert_main_fails(capsys, ["eval", "--samples", some, "--data", nan],
                      ["some-inf.npz", "1 of 5 samples"])
    for name, data in (("corrupt.npz", b"PK\x03\x04" + b"\x00" * 40),
                       ("corrupt.npy", b"\x93NUMPY\x01\x00" + b"garbage" * 5),
                       ("text.npy", b"just some text\n")):
        f = work / name
        f.write_bytes(data)
        assert_main_fails(capsys, ["eval", "--samples", f, "--model", "gmm"],
                          ["cannot read", name])
        assert "pickle" not in capsys.readouterr().err
    # image-shaped digits samples against the 64-dim Gaussian: both shapes named
    img = work / "digit-shaped.npz"
    np.savez(img, samples=np.zeros((4, 1, 8, 8), np.float32), seeds=np.arange(4),
             run=np.asarray("{}"))
    assert_main_fails(capsys, ["eval", "--samples", img, "--model", "gaussian"],
                      ["[1, 8, 8]", "'gaussian'", "[64]"])


def test_only_the_package_temporaries_are_cleaned(work):
    """A sample folder keeps other programs' ``.tmp-*`` files; the package's own
    temporaries (of seed files and run.json) left by a killed writer go."""
    from epd_kernels.cli import main

    folder = work / "tmp-clean"
    folder.mkdir()
    theirs = [folder / ".tmp-notes.txt", folder / ".tmp-seed-000001.npy.bak",
              folder / ".tmp-other.abc12345"]
    ours = [folder / ".tmp-seed-000001.npy.ab_12x9z", folder / ".tmp-run.json.q1w2e3r4",
            folder / ".tmp-seed-000002.png.zz99yy88"]
    for f in theirs + ours:
        f.write_bytes(b"x")
    assert main(["sample", "--model", "gmm", "--solver", "euler", "--nfe", "3", "--seeds",
                 "0-1", "--no-progress", "--out", str(folder)]) == 0
    assert all(f.exists() for f in theirs) and not any(f.exists() for f in ours)
