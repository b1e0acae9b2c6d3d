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


def test_missing_section_is_skipped(tmp_path, run_mod, monkeypatch):
    monkeypatch.setattr(run_mod, "SECTIONS", run_mod.SECTIONS + ("zz_missing",))
    assert run_mod.main(["--sections", "zz_missing", "--out", str(tmp_path)]) == 0
    machine = json.loads((tmp_path / "machine.json").read_text())
    entry = machine["sections"]["zz_missing"]
    assert entry["status"] == "skipped" and "not found" in entry["reason"]
    assert run_mod.main(["--sections", "no_such_thing", "--out", str(tmp_path)]) == 2
