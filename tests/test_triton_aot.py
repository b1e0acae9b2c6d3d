"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 (no GPU needed).

All compilations run in ONE subprocess without TRITON_INTERPRET (under the interpreter
@triton.jit returns objects that cannot be lowered to PTX), with a private Triton cache so
that the kernels really are compiled. The subprocess reports, per kernel build, the global
load/store instructions found in the PTX, whether the PTX declares local memory, and what
Triton's bundled `ptxas -v` says about registers and spills.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16")
KS = (2, 4)
KERNELS = ("epd_step_fwd", "epd_step_bwd", "branch_states", "branch_states_bwd")

_SCRIPT = r"""
import json, re, sys
from concurrent.futures import ThreadPoolExecutor
import torch
import epd_kernels.kernels as kk
from epd_kernels.kernels.aot import compile_kernel, ptxas_stats

assert kk.HAS_TRITON, kk.TRITON_IMPORT_ERROR
assert not kk.INTERPRET, "TRITON_INTERPRET leaked into the AOT subprocess"
archs, dtypes, ks, kernels = json.loads(sys.argv[1])
jobs = [(n, a, d, k, True) for n in kernels for a in archs for d in dtypes for k in ks]
# Control: the same forward kernel without alignment hints must not get vector loads.
jobs += [("epd_step_fwd", a, "float32", 4, False) for a in archs]

def build(job):
    name, arch, dtype, K, aligned = job
    key = f"{name}|{arch}|{dtype}|{K}|{int(aligned)}"
    try:
        ptx = compile_kernel(name, arch, getattr(torch, dtype), K, aligned).asm["ptx"]
    except Exception as e:  # reported, asserted on in the parent
        return key, {"error": f"{type(e).__name__}: {e}"}
    return key, {"ptx": ptx}

def inspect(item):
    key, res = item
    if "error" in res:
        return key, res
    ptx = res.pop("ptx")
    arch = int(key.split("|")[1])
    stats = ptxas_stats(ptx, arch)
    res.update(
        target=(re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, None])[1],
        entries=re.findall(r"\.entry\s+(\w+)", ptx),
        loads=sorted(set(re.findall(r"\bld\.global[\w.:]*", ptx))),
        stores=sorted(set(re.findall(r"\bst\.global[\w.:]*", ptx))),
        local_decl=bool(re.search(r"\.local\b", ptx)),
        local_ops=sorted(set(re.findall(r"\b(?:ld|st)\.local[\w.]*", ptx))),
        registers=stats["registers"],
        spill_stores=stats["spill_stores"],
        spill_loads=stats["spill_loads"],
        stack_frame=stats["stack_frame"],
        excerpt=[l.strip() for l in ptx.splitlines() if "ld.global" in l][:6],
    )
    return key, res

# Triton compilation is mostly in-process C++; ptxas -v runs as a child process, so
# overlap the two with a small pool.
built = [build(j) for j in jobs]
with ThreadPoolExecutor(2) as pool:
    results = dict(pool.map(inspect, built))
print("AOT_RESULTS=" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arg = json.dumps([ARCHS, DTYPES, KS, KERNELS])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, arg], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT_RESULTS=")]
    assert proc.returncode == 0 and lines, (
        f"AOT subprocess failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(lines[-1][len("AOT_RESULTS="):])


def _key(name, arch, dtype, K, aligned=True):
    return f"{name}|{arch}|{dtype}|{K}|{int(aligned)}"


ALL = [(n, a, d, k) for n in KERNELS for a in ARCHS for d in DTYPES for k in KS]


def _ids(case):
    n, a, d, k = case
    return f"{n}-sm{a}-{d}-K{k}"


def _get(aot, *case, aligned=True):
    res = aot[_key(*case, aligned=aligned)]
    assert "error" not in res, res["error"]
    return res


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_kernel_builds_for_target(aot, case):
    name, arch, _, _ = case
    res = _get(aot, *case)
    assert res["target"] in (f"sm_{arch}", f"sm_{arch}a"), res["target"]
    assert res["entries"] == [f"_{name}_kernel"]
    assert res["registers"] > 0


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_aligned_kernels_use_128bit_global_accesses(aot, case):
    res = _get(aot, *case)
    vec_loads = [op for op in res["loads"] if ".v4.b32" in op or ".v4.f32" in op]
    vec_stores = [op for op in res["stores"] if ".v4.b32" in op or ".v4.f32" in op]
    assert vec_loads, f"no 128-bit global loads in {res['loads']}"
    assert vec_stores, f"no 128-bit global stores in {res['stores']}"


@pytest.mark.parametrize("arch", ARCHS)
def test_unaligned_forward_has_no_vector_loads(aot, arch):
    """Control for the check above: without divisibility hints Triton must fall back to
    scalar accesses, so the vector loads really come from the alignment information."""
    res = _get(aot, "epd_step_fwd", arch, "float32", 4, aligned=False)
    assert not [op for op in res["loads"] if ".v4." in op], res["loads"]
    assert res["loads"], "no global loads at all?"


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_no_local_memory_or_spills(aot, case):
    res = _get(aot, *case)
    assert not res["local_decl"], "PTX declares .local memory"
    assert not res["local_ops"], f"PTX uses local memory: {res['local_ops']}"
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (
        f"ptxas reports spills: {res['spill_stores']} B stores, {res['spill_loads']} B loads")
    assert res["stack_frame"] == 0


def test_forward_ptx_excerpt_sm80(aot):
    """The forward kernel at sm_80, fp32, K = 4 loads its inputs 4 x 32 bits at a time."""
    res = _get(aot, "epd_step_fwd", 80, "float32", 4)
    assert any("ld.global.v4.b32" in line for line in res["excerpt"]), res["excerpt"]
