"""Smoke tests of the benchmark driver (benchmarks/run.py) and the `kernels` section.

The section runs in a subprocess on a tiny problem (--sizes 4096 --repeats 2), so these
tests check plumbing (JSON keys, finite positive numbers, machine info, the markdown
block), not performance.
"""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

HAND_BEFORE = "# My benchmarks\n\nHand-written intro | with a pipe.\n"
HAND_AFTER = "\nHand-written outro, kept as is.\n"
START, END = "<!-- bench:kernels:start -->", "<!-- bench:kernels:end -->"


@pytest.fixture
def run_mod():
    """benchmarks/run.py as a module (sys.path restored afterwards)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("_bench_run_under_test", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path[:] = saved


def _run_cli(*args, timeout=240):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the Triton tests; not wanted here
    proc = subprocess.run([sys.executable, str(RUN), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _pos(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_kernels_json(data, impls):
    for key in ("section", "device", "backend", "backends_available", "threads", "bandwidth",
                "results", "tables", "notes", "eager_forms", "targets", "files"):
        assert key in data, key
    assert data["section"] == "kernels" and data["device"] == "cpu"
    assert data["backend"] in ("cpp", "reference", "triton")
    for k in ("copy_gbps", "clone_gbps", "read_gbps"):
        assert _pos(data["bandwidth"]["start"][k]), k
    assert _pos(data["bandwidth"]["copy_gbps"])
    assert data["eager_forms"]["float32"]["fwd"] in data["eager_form_text"]
    assert len(data["results"]) == 1
    row = data["results"][0]
    assert (row["dtype"], row["K"], row["N"]) == ("float32", 2, 4096)
    assert row["fwd_floor_bytes"] == 4 * 4096 * 4 and row["bwd_floor_bytes"] == 5 * 4096 * 4
    for d in ("fwd", "bwd"):
        for impl in list(impls) + ["copy"]:
            st = row[d][impl]
            for k in ("median_s", "min_s", "q25_s", "q75_s"):
                assert _pos(st[k]), (d, impl, k, st[k])
            assert st["repeats"] == 2 and st["inner"] >= 1
        m = row[f"{d}_metrics"]
        assert _pos(m["copy_gbps"])
        for impl in impls:
            assert _pos(m[f"{impl}_ms"]) and _pos(m[f"{impl}_gbps"]) and _pos(m[f"{impl}_frac_copy"])
        for other in impls:
            if other != "fused":
                assert _pos(m[f"speedup_vs_{other}"])
        assert row[f"target_{d}"] is None  # N = 4096 is outside the target scope
    for key, err in row["check"].items():
        assert math.isfinite(err) and err < 1e-4, (key, err)
    assert [t["title"][:7] for t in data["tables"]] == ["Forward", "Backwar"]
    for t in data["tables"]:
        assert len(t["rows"]) == 1 and len(t["rows"][0]) == len(t["columns"])


def test_kernels_section_smoke(tmp_path):
    out = tmp_path / "results"
    md = tmp_path / "BENCH.md"
    md.write_text(f"{HAND_BEFORE}\n{START}\nSTALE NUMBERS 123\n{END}\n{HAND_AFTER}")
    proc = _run_cli("--sections", "kernels", "--sizes", "4096", "--ks", "2",
                    "--dtypes", "float32", "--repeats", "2", "--impls", "fused,eager",
                    "--out", str(out), "--markdown", str(md))
    assert "backend" in proc.stdout and "Forward" in proc.stdout

    _check_kernels_json(json.loads((out / "kernels.json").read_text()), ("fused", "eager"))

    machine = json.loads((out / "machine.json").read_text())
    for key in ("cpu_model", "logical_cpus", "torch", "torch_threads", "backend", "date_utc",
                "git_commit", "command", "sections"):
        assert key in machine, key
    assert "--sizes 4096" in machine["command"] and machine["command"].startswith("python ")
    assert machine["sections"]["kernels"]["status"] == "ok"
    assert _pos(machine["torch_threads"])

    text = md.read_text()
    assert text.startswith(HAND_BEFORE) and text.endswith(HAND_AFTER)
    assert "STALE NUMBERS" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    block = text[text.index(START):text.index(END)]
    assert "fused ms" in block and "--sizes 4096" in block and "**Machine:**" in block
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "kernels.png").stat().st_size > 0
        assert "kernels.png" in block


@pytest.mark.slow
def test_kernels_section_with_compile(tmp_path):
    out = tmp_path / "results"
    _run_cli("--sections", "kernels", "--sizes", "4096", "--ks", "2", "--dtypes", "float32",
             "--repeats", "2", "--out", str(out), timeout=600)
    data = json.loads((out / "kernels.json").read_text())
    _check_kernels_json(data, ("fused", "eager", "compile"))
    assert _pos(data["results"][0]["compile_s"]["fwd"])


def test_markdown_blocks(tmp_path, run_mod):
    md = tmp_path / "sub" / "B.md"
    assert run_mod.update_markdown(md, "kernels", "first") == "created"
    assert run_mod.update_markdown(md, "solvers", "s1") == "appended"
    text = md.read_text()
    assert "# Benchmarks" in text and "## kernels" in text and "## solvers" in text
    md.write_text(text.replace("# Benchmarks", "# Benchmarks\n\nMy own words."))
    assert run_mod.update_markdown(md, "kernels", "second") == "replaced"
    text = md.read_text()
    assert "My own words." in text and "first" not in text and "s1" in text
    assert text.count("<!-- bench:kernels:start -->") == 1
    k0, k1 = text.index("<!-- bench:kernels:start -->"), text.index("<!-- bench:kernels:end -->")
    assert "second" in text[k0:k1]
    broken = text.replace("<!-- bench:solvers:end -->", "")
    md.write_text(broken)
    with pytest.raises(ValueError, match="malformed"):
        run_mod.update_markdown(md, "solvers", "s2")
    assert md.read_text() == broken


def test_tables_render(run_mod):
    res = {"rows": [{"solver": "euler", "fid": 1.5}, {"solver": "epd", "fid": 0.25, "x": None}],
           "notes": ["a note"]}
    (t,) = run_mod.section_tables(res)
    assert t["columns"] == ["solver", "fid", "x"] and t["rows"][1] == ["epd", "0.25", "-"]
    txt = run_mod.render_text("s", res)
    assert "euler" in txt and "a note" in txt
    md = run_mod.markdown_table(t)
    assert md.splitlines()[1] == "|---|---:|---|"


def test_missing_section_fails(tmp_path, run_mod, monkeypatch, capsys):
    monkeypatch.setattr(run_mod, "SECTIONS", run_mod.SECTIONS + ("zz_missing",))
    assert run_mod.main(["--sections", "zz_missing", "--out", str(tmp_path)]) == 1
    machine = json.loads((tmp_path / "machine.json").read_text())
    entry = machine["sections"]["zz_missing"]
    assert entry["status"] == "failed" and "not found" in entry["reason"]
    assert "section(s) failed: zz_missing" in capsys.readouterr().err
    assert run_mod.main(["--sections", "no_such_thing", "--out", str(tmp_path)]) == 2


def _fake_sections(monkeypatch, run_mod, behaviours):
    """Registers fake sections NAME -> run(quick, out_dir) (no module files): run.py loads
    them as it loads real ones, from sys.modules."""
    import types

    names = tuple(behaviours)
    monkeypatch.setattr(run_mod, "SECTIONS", run_mod.SECTIONS + names)
    real_path = run_mod.module_path
    monkeypatch.setattr(run_mod, "module_path",
                        lambda n: RUN if n in names else real_path(n))  # a file that exists
    for name, fn in behaviours.items():
        mod = types.ModuleType(f"benchmarks.bench_{name}")
        mod.run = fn
        monkeypatch.setitem(sys.modules, f"benchmarks.bench_{name}", mod)


def _ok(quick, out_dir):
    return {"rows": [{"case": "fine", "value": 1.0}]}


def _raises(quick, out_dir):
    raise RuntimeError("section broke")


def _needs_triton(quick, out_dir):
    raise ModuleNotFoundError("No module named 'triton'", name="triton")


def _needs_our_module(quick, out_dir):
    raise ModuleNotFoundError("No module named 'epd_kernels.gone'", name="epd_kernels.gone")


def _says_skip(quick, out_dir):
    return {"skipped": "needs a GPU (no CUDA device here)"}


@pytest.mark.parametrize("behaviours, code, failed", [
    ({"zz_ok": _ok, "zz_boom": _raises}, 1, ["zz_boom"]),
    ({"zz_boom": _raises, "zz_ok": _ok}, 1, ["zz_boom"]),           # order does not matter
    ({"zz_ours": _needs_our_module}, 1, ["zz_ours"]),   # the package's own module: a failure
    ({"zz_ok": _ok, "zz_triton": _needs_triton, "zz_gpu": _says_skip}, 0, []),
])
def test_run_exit_status_names_failed_sections(tmp_path, run_mod, monkeypatch, capsys,
                                               behaviours, code, failed):
    _fake_sections(monkeypatch, run_mod, behaviours)
    assert run_mod.main(["--sections", ",".join(behaviours), "--out", str(tmp_path)]) == code
    err = capsys.readouterr().err
    sections = json.loads((tmp_path / "machine.json").read_text())["sections"]
    assert [n for n, e in sections.items() if e["status"] == "failed"] == failed
    if failed:
        assert f"section(s) failed: {', '.join(failed)}" in err
    else:
        assert "failed" not in err
    for name, entry in sections.items():
        want = {"zz_ok": "ok", "zz_triton": "skipped", "zz_gpu": "skipped"}.get(name, "failed")
        assert entry["status"] == want, (name, entry)
    if "zz_triton" in sections:
        assert "optional package 'triton'" in sections["zz_triton"]["reason"]
        assert sections["zz_gpu"]["reason"] == "needs a GPU (no CUDA device here)"
    if "zz_boom" in sections:
        assert "RuntimeError: section broke" in sections["zz_boom"]["reason"]


def test_run_import_failure_is_a_failure(tmp_path, run_mod, monkeypatch, capsys):
    """A section module that fails to import fails the run (no more "skipped"), unless the
    missing module is an optional dependency."""
    import types

    errors = {"zz_broken": SyntaxError("invalid syntax (bench_zz_broken.py, line 3)"),
              "zz_plot": ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")}
    monkeypatch.setattr(run_mod, "SECTIONS", run_mod.SECTIONS + tuple(errors))
    real_path = run_mod.module_path
    monkeypatch.setattr(run_mod, "module_path",
                        lambda n: RUN if n in errors else real_path(n))

    def import_module(name):
        raise errors[name.rsplit("bench_", 1)[1]]

    monkeypatch.setattr(run_mod, "importlib", types.SimpleNamespace(import_module=import_module))
    assert run_mod.main(["--sections", "zz_broken,zz_plot", "--out", str(tmp_path)]) == 1
    sections = json.loads((tmp_path / "machine.json").read_text())["sections"]
    assert sections["zz_broken"]["status"] == "failed"
    assert "SyntaxError" in sections["zz_broken"]["reason"]
    assert sections["zz_plot"] == {"status": "skipped", "reason": (
        "needs the optional package 'matplotlib', which is not installed (pip install "
        "matplotlib)")}
    assert "section(s) failed: zz_broken" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# solvers and branches sections (the `epd demo` model)


def _finite_pos(v):
    return _pos(v) and v < 1e6


def test_solvers_section_smoke(tmp_path, run_mod):
    """A tiny solvers run on every model, with supplied distilled params; checks the table
    layout (the `epd demo` model first), the measured NFE accounting and finite RMSEs."""
    import torch

    from epd_kernels.params import DODEParams
    from epd_kernels.params import EPDParams
    from epd_kernels.solvers import get_sigmas

    mod, _, why = run_mod.load_section("solvers")
    assert mod is not None, why
    nfes = (3, 5)
    # EPD with untrained params (2 steps with AFS = NFE 3, K = 2 -> 5 evaluations) and
    # D-ODE with all lambdas 0, which is exactly Euler: an oracle for its RMSE.
    epd = EPDParams.init(get_sigmas("polynomial", 2), num_points=2)
    dode = DODEParams.zeros(get_sigmas("polynomial", 3), base="euler")
    demo = mod.DEFAULT_MODEL
    params = {(demo, "epd", 3): epd, (demo, "d-euler", 3): dode}
    threads = torch.get_num_threads()
    out = tmp_path / "results"
    res = mod.run(True, out, samples=4, nfes=nfes, params=params)
    assert torch.get_num_threads() == threads  # restored

    models = [demo, "digits-exact", "gaussian-64", "gmm-64x8"]
    tables = res["tables"]
    assert [t["title"] for t in tables[:4]] == [
        f"RMSE vs reference at sigma_min, {m}" + r + "; global RMS over all elements"
        for m, r in zip(models, [" (the epd demo model)", " (exact denoiser of the digits)",
                                 "", ""])]
    head = run_mod.section_tables(res)[0]  # what --readme writes: the demo model's rows
    assert demo in head["title"] and head["columns"] == ["solver", "NFE 3", "NFE 5"]
    baselines = mod.SOLVERS + list(mod.VARIANTS)
    for t, m in zip(tables[:4], models):
        names = [r["solver"] for r in t["rows"]]
        assert names == baselines + (["epd", "d-euler"] if m == demo else []), (m, names)
        for r in t["rows"]:
            for n in nfes:
                cell = r[f"NFE {n}"]
                if r["solver"] in ("epd", "d-euler") and n == 5:
                    assert cell is None  # no params supplied for NFE 5
                else:
                    assert _finite_pos(float(cell)), (m, r)

    rows = res["results"]
    assert len(rows) == 4 * len(baselines) * len(nfes) + 2
    for r in rows:
        assert _finite_pos(r["rmse"]) and r["finite"] and _pos(r["wall_time_s"]), r
        st = r["wall_stats_s"]   # the interleaved timer's spread around the median
        assert st["repeats"] == 3 and 0 < st["min_s"] <= st["q25_s"] <= r["wall_time_s"] \
            <= st["q75_s"], r
        assert r["latency_nfe"] == r["nfe"], r
        want = 5 if r["solver"] == "epd" else r["nfe"]
        assert r["total_evals"] == want == r["expected_total_evals"], r
    by = {(r["model"], r["solver"], r["nfe"]): r for r in rows}
    assert by[(demo, "d-euler", 3)]["rmse"] == pytest.approx(by[(demo, "euler", 3)]["rmse"],
                                                             rel=1e-5)

    # the cost tables of the two digits models: NFE columns equal the requested budgets
    for t, m in zip(tables[4:], models[:2]):
        assert t["title"].startswith(f"{m}: latency NFE")
        assert t["columns"] == ["solver", "NFE", "latency NFE", "total evals", "RMSE",
                                "wall ms"]
        assert sorted({r["NFE"] for r in t["rows"]}) == list(nfes)
        for r in t["rows"]:
            assert r["latency NFE"] == r["NFE"]
            assert _finite_pos(float(r["RMSE"])) and _pos(float(r["wall ms"]))
    assert len(tables) == 6

    for m in models[:2]:  # converged references, far below every solver's error
        info = res["reference"][m]
        best = min(r["rmse"] for r in rows if r["model"] == m)
        assert 0 <= info["error_estimate"] < 0.01 * best, (m, info)
    assert not [n for n in res["notes"] if "WARNING" in n or "MISMATCH" in n
                or "NON-FINITE" in n], res["notes"]
    data = json.loads((out / "solvers.json").read_text())
    assert len(data["results"]) == len(rows) and data["config"]["models"] == models
    body = run_mod.markdown_body("solvers", res, {"command": "python benchmarks/run.py"}, out,
                                 tmp_path / "BENCH.md")
    assert body.index(f"**RMSE vs reference at sigma_min, {demo}") \
        < body.index("**RMSE vs reference at sigma_min, gaussian-64; global RMS")
    assert "| solver | NFE 3 | NFE 5 |" in body
    if res.get("plot"):
        assert (out / "solvers.png").stat().st_size > 0 and "solvers.png" in body


def test_branches_section_smoke(tmp_path):
    """The branches section through the driver: U-Net, two batch sizes, K = 1, 2."""
    out = tmp_path / "results"
    md, readme = tmp_path / "BENCH.md", tmp_path / "README.md"
    readme.write_text("# Project\n\n<!-- bench:readme-branches:start -->\nold\n"
                      "<!-- bench:readme-branches:end -->\n\nmore text\n")
    proc = _run_cli("--sections", "branches", "--quick", "--ks", "1,2", "--repeats", "2",
                    "--out", str(out), "--markdown", str(md), "--readme", str(readme))
    assert "digits-unet" in proc.stdout

    data = json.loads((out / "branches.json").read_text())
    assert data["config"]["model"] == "digits-unet" and data["config"]["repeats"] == 2
    recs = data["records"]
    assert [(r["B"], r["K"]) for r in recs] == [(8, 1), (8, 2), (64, 1), (64, 2)]
    for r in recs:
        for k in ("main_ms", "batched_ms", "sequential_ms"):
            assert _finite_pos(r[k]), (k, r)
        assert r["batched_over_main"] == pytest.approx(r["batched_ms"] / r["main_ms"])
        assert r["sequential_over_batched"] == pytest.approx(r["sequential_ms"] / r["batched_ms"])
        assert r["graph_ms"] is None  # no GPU here
        for name, st in r["stats_ms"].items():
            assert st["min"] <= st["median"] and _finite_pos(st["min"]), (name, st)
    mains = {r["B"]: r["main_ms"] for r in recs}
    assert all(r["main_ms"] == mains[r["B"]] for r in recs)  # one main timing per B
    (table,) = data["tables"]
    assert table["columns"][:5] == ["B", "K", "main ms", "batched ms", "sequential ms"]
    assert [row[:2] for row in table["rows"]] == [[8, 1], [8, 2], [64, 1], [64, 2]]

    block = md.read_text()
    assert "<!-- bench:branches:start -->" in block and "| B | K | main ms |" in block
    text = readme.read_text()
    assert text.startswith("# Project") and text.endswith("more text\n") and "old" not in text
    assert "digits-unet" in text and "| 64 | 2 |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "branches.png").stat().st_size > 0 and "branches.png" in block
        # the plot is copied beside the markdown file and linked there (not into --out)
        assert "](docs/bench/branches.png)" in block
        assert (tmp_path / "docs" / "bench" / "branches.png").read_bytes() == \
            (out / "branches.png").read_bytes()


def test_solvers_section_distilled_rows(tmp_path, run_mod):
    """The distilled-solver table on the `epd demo` model with tiny fitting settings: every
    DISTILLED solver gets a row, its params are saved, and a second run that loads them
    with params_dir reproduces the same RMSEs."""
    mod, _, why = run_mod.load_section("solvers")
    assert mod is not None, why
    demo = mod.DEFAULT_MODEL
    # (compare=False: the held-out comparison is tested in test_distill_settings)
    tiny_epd = dict(iterations=2, M=1, batch_size=4, compare=False)
    tiny_dode = dict(batch_size=8, teacher_factor=2)
    # EPD and AMED distil by gradient (iterations), D-ODE in closed form (teacher_factor).
    settings = {s: (tiny_dode if s.startswith("d-") else tiny_epd) for s in mod.DISTILLED}
    out = tmp_path / "fit"
    res = mod.run(True, out, samples=4, nfes=(3,), models=[demo], distill=True,
                  distill_settings=settings)
    rows = {r["solver"]: r for r in res["results"]}
    assert set(mod.DISTILLED) <= set(rows), sorted(rows)
    for s in mod.DISTILLED:
        r = rows[s]
        assert r["latency_nfe"] == 3 and _finite_pos(r["rmse"]), r
        assert r["total_evals"] == (5 if s.startswith("epd") else 3), r
        assert (out / "distilled_params" / f"{demo}-{s}-nfe3.safetensors").exists()
    assert [r["solver"] for r in res["tables"][0]["rows"]][-len(mod.DISTILLED):] \
        == list(mod.DISTILLED)
    assert not [n for n in res["notes"] if "failed" in n or "MISMATCH" in n], res["notes"]

    again = mod.run(True, tmp_path / "load", samples=4, nfes=(3,), models=[demo],
                    params_dir=str(out / "distilled_params"))
    loaded = {r["solver"]: r["rmse"] for r in again["results"]}
    for s in mod.DISTILLED:
        assert loaded[s] == pytest.approx(rows[s]["rmse"], rel=1e-6), s
    with pytest.raises(ValueError, match="distill_settings"):
        mod.run(True, tmp_path / "bad", samples=2, nfes=(3,), models=[demo],
                distill_settings={"no-such-solver": {}})


def test_heap_probe_children_get_their_allocator_settings(monkeypatch):
    """The allocation probe times each glibc setting in its own child process: the child
    sees exactly its environment (none of the MALLOC_ variables by default), times the fused
    forward with the asked-for backend, and its figures are consistent."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    hp = importlib.import_module("benchmarks.heap_probe")
    assert hp.note(None, 2 ** 20).startswith("allocation probe: not run")
    if not hp.is_glibc():
        pytest.skip("the probe sets glibc malloc variables; this C library is not glibc")
    monkeypatch.chdir(ROOT)   # the source tree first on a child's path, as under run.py
    res = hp.probe(2 ** 16, (2, 3), repeats=2, threads=1, backend="reference")
    assert list(res) == list(hp.SETTINGS)
    assert res["glibc default"]["env"] == {k: None for k in hp.HEAP_ENV}
    assert res["freed blocks kept"]["env"] == hp.HEAP_ENV
    import epd_kernels

    for r in res.values():   # the parent's package, wherever the child's working directory
        assert r["epd_kernels"] == str(pathlib.Path(epd_kernels.__file__).resolve())
        assert r["backend"] == "reference" and r["threads"] == 1
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("copy_gbps", "clone_gbps"))
        for kind, floor in (("fused", lambda K: K + 2), ("backward", lambda K: 2 * K + 1)):
            assert list(r[kind]) == ["2", "3"], kind
            for K, f in r[kind].items():
                assert f["median_s"] > 0
                assert f["gbps"] == pytest.approx(floor(int(K)) * 2 ** 16 * 4
                                                  / f["median_s"] / 1e9)
                assert f["pct_copy"] == pytest.approx(100 * f["gbps"] / r["copy_gbps"])
    line = hp.note(res, 2 ** 16)
    assert "glibc default: clone" in line and "freed blocks kept: clone" in line


# --------------------------------------------------------------------------------------
# the one timer (benchmarks/timing.py)


class _FakeTimer:
    """Records the order of the timed calls; each candidate "takes" the times it lists."""

    def __init__(self, times):
        self.times = {k: list(v) for k, v in times.items()}
        self.order = []

    def sync(self):
        pass

    def measure(self, fn, inner):
        name = fn()
        self.order.append(name)
        return self.times[name].pop(0)


def test_timer_rotates_the_order_and_reports_median_and_spread():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.timing import bench_interleaved

    timer = _FakeTimer({"a": [5, 1, 9, 3], "b": [2, 2, 2, 8], "c": [7, 6, 5, 4]})
    fns = {n: (lambda n=n: n) for n in "abc"}
    st = bench_interleaved(timer, fns, repeats=4, warmup=0)
    assert timer.order == list("abc" "bca" "cab" "abc")   # round r starts at candidate r % 3
    assert st["a"] == dict(median_s=4.0, min_s=1, q25_s=2.5, q75_s=6.0, repeats=4, inner=1)
    assert st["b"]["median_s"] == 2.0 and st["b"]["q75_s"] == 3.5
    assert st["c"]["median_s"] == 5.5 and st["c"]["min_s"] == 4
    with pytest.raises(ValueError, match="repeats"):
        bench_interleaved(timer, fns, repeats=0)
    with pytest.raises(ValueError, match="fns"):
        bench_interleaved(timer, {}, repeats=1)


def test_timer_times_real_calls():
    """On the clock: a call that sleeps 2 ms measures at least 2 ms; inner makes a sample
    last about min_sample_s."""
    import time

    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.timing import Timer, bench_interleaved

    st = bench_interleaved(Timer(torch.device("cpu")),
                           {"sleep": lambda: time.sleep(0.002), "noop": lambda: None},
                           repeats=3, warmup=1, min_sample_s=0.004)
    assert st["sleep"]["min_s"] >= 0.002 and st["sleep"]["inner"] in (1, 2)
    assert st["noop"]["median_s"] < 0.002 and st["noop"]["inner"] > 2
