"""Ahead-of-time compilation of every Triton kernel config for sm_80 and sm_90 (no GPU).

`epd_kernels.kernels.aot.compile_all(arch)` runs in ONE subprocess without
TRITON_INTERPRET (under the interpreter @triton.jit returns objects that cannot be
lowered to PTX) and compiles every autotune config of every kernel for fp16, bf16, fp32,
fp64 and K in {1, 2, 3, 4, 8, 16}; ptxas reports spills for each compile. Takes a few
minutes on a busy machine (about 770 compiles), hence `slow`; CI runs it.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="needs the optional package triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90")

_SCRIPT = r"""
import json, re, sys, time
import torch
import epd_kernels.kernels as kk
from epd_kernels.kernels import aot

assert kk.HAS_TRITON, kk.TRITON_IMPORT_ERROR
assert not kk.INTERPRET, "TRITON_INTERPRET leaked into the AOT subprocess"
t0 = time.time()
out = {"records": {}, "control": {}, "ttir": None}
for arch in json.loads(sys.argv[1]):
    def progress(i, n, rec, arch=arch):
        if i % 64 == 0 or i == n:
            print(f"{arch}: {i}/{n} compiled, {time.time() - t0:.0f} s", file=sys.stderr,
                  flush=True)
    out["records"][arch] = aot.compile_all(arch, progress=progress)
    # Control: the forward without alignment hints must not get vector loads.
    ptx = aot.compile_kernel("epd_step_fwd", arch, torch.float32, 4, aligned=False).asm["ptx"]
    out["control"][arch] = {
        "loads": sorted(set(re.findall(r"\bld\.global[\w.:]*", ptx))),
        "target": (re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, None])[1],
    }
out["ttir"] = aot.compile_kernel("epd_step_fwd", "sm_80", torch.float16, 3).asm["ttir"]
print("AOT_RESULTS=" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(ARCHS)],
                          stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=ROOT,
                          timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT_RESULTS=")]
    assert proc.returncode == 0 and lines, f"AOT subprocess failed (rc={proc.returncode})"
    return json.loads(lines[-1][len("AOT_RESULTS="):])


pytestmark = pytest.mark.slow


def test_every_config_dtype_and_k_is_compiled(aot):
    from epd_kernels.kernels._common import CONFIGS_1D, CONFIGS_2D

    for arch in ARCHS:
        recs = aot["records"][arch]
        seen = {(r["kernel"], r["dtype"], r["K"], json.dumps(r["config"], sort_keys=True))
                for r in recs}
        assert len(seen) == len(recs)
        for kernel, n_cfg in [("epd_step_fwd", len(CONFIGS_1D)), ("branch_states", len(CONFIGS_1D)),
                              ("epd_step_bwd", len(CONFIGS_2D)),
                              ("branch_states_bwd", len(CONFIGS_2D))]:
            mine = [r for r in recs if r["kernel"] == kernel]
            assert len(mine) == n_cfg * 4 * 6, (kernel, len(mine))
            assert {r["dtype"] for r in mine} == {"float16", "bfloat16", "float32", "float64"}
            assert {r["K"] for r in mine} == {1, 2, 3, 4, 8, 16}
        for r in recs:
            assert r["arch"] == arch and isinstance(r["spills"], int)
            assert r["registers"] is None or r["registers"] > 0


def test_no_spills_anywhere(aot):
    spilled = [r for arch in ARCHS for r in aot["records"][arch] if r["spills"] != 0]
    assert not spilled, [(r["kernel"], r["arch"], r["dtype"], r["K"], r["config"], r["spills"])
                         for r in spilled]


def test_fp32_forward_uses_128bit_loads(aot):
    for arch in ARCHS:
        fwd = [r for r in aot["records"][arch]
               if r["kernel"] == "epd_step_fwd" and r["dtype"] == "float32"]
        assert fwd and all(r["vector_loads"] for r in fwd), [r for r in fwd if not r["vector_loads"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_unaligned_forward_has_no_vector_loads(aot, arch):
    """Control for the check above: without divisibility hints Triton falls back to
    scalar accesses, so the vector loads really come from the alignment information."""
    ctl = aot["control"][arch]
    assert ctl["target"] in (arch, arch + "a")
    assert ctl["loads"] and not [op for op in ctl["loads"] if ".v4." in op or ".v2." in op]


def test_tile_offsets_are_64_bit(aot):
    """The program id is widened to int64 before any offset is formed, so rows of more
    than 2^31 elements are addressed correctly."""
    ttir = aot["ttir"]
    assert "tt.get_program_id" in ttir
    assert "arith.extsi" in ttir and "to i64" in ttir
