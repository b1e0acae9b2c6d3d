"""Ahead-of-time compilation of the Triton kernels for a GPU that is not present.

`compile_all("sm_80")` compiles every autotune config of every kernel for every data
dtype and the usual K, and returns one record per compile: what `triton.compile` gives
for `GPUTarget("cuda", 80, 32)`, checked for register spills (from ptxas's report of the
compile) and for 128-bit global loads in the PTX. `compile_kernel` compiles one.

With `aligned=True` every pointer and the row length N are declared divisible by 16
(what Triton's JIT infers by itself for 16-byte aligned tensors and N % 16 == 0), which
lets it emit 128-bit global loads and stores.

Must run in a process where the kernels were not imported under TRITON_INTERPRET=1 (the
interpreter's kernels cannot be lowered to PTX).
"""
import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from typing import Dict, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import CONFIGS_1D, CONFIGS_2D, FP_FUSION, SUB_GPU, opmath_dtype
from .branch_states import _branch_states_bwd_kernel, _branch_states_kernel
from .epd_step import _epd_step_bwd_kernel, _epd_step_fwd_kernel

__all__ = ["compile_all", "compile_kernel", "aot_compile", "ptxas_stats", "AOT_KERNELS",
           "AOT_DTYPES", "AOT_KS", "ARCHS"]

ARCHS = {"sm_80": 80, "sm_90": 90}
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AOT_KS = (1, 2, 3, 4, 8, 16)

_TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}

# kernel name -> (jit function, [(arg name, kind)], family). kind: "data" (pointer to
# T), "acc" (pointer to opmath), "int" (i32; "N" gets the divisibility hint), "f64".
_Spec = Tuple[object, List[Tuple[str, str]], str]
AOT_KERNELS: Dict[str, _Spec] = {
    "epd_step_fwd": (
        _epd_step_fwd_kernel,
        [("x_ptr", "data"), ("g_ptr", "data"), ("w_ptr", "acc"), ("s_ptr", "acc"),
         ("y_ptr", "data"), ("alpha", "f64"), ("B", "int"), ("N", "int"),
         ("w_stride", "int"), ("s_stride", "int")],
        "1d",
    ),
    "epd_step_bwd": (
        _epd_step_bwd_kernel,
        [("go_ptr", "data"), ("g_ptr", "data"), ("w_ptr", "acc"), ("s_ptr", "acc"),
         ("gg_ptr", "data"), ("part_ptr", "acc"), ("alpha", "f64"), ("B", "int"),
         ("N", "int"), ("NSUB", "int"), ("w_stride", "int"), ("s_stride", "int")],
        "2d",
    ),
    "branch_states": (
        _branch_states_kernel,
        [("x_ptr", "data"), ("d_ptr", "data"), ("c_ptr", "acc"), ("out_ptr", "data"),
         ("B", "int"), ("N", "int"), ("c_stride", "int")],
        "1d",
    ),
    "branch_states_bwd": (
        _branch_states_bwd_kernel,
        [("go_ptr", "data"), ("d_ptr", "data"), ("c_ptr", "acc"), ("gx_ptr", "data"),
         ("gd_ptr", "data"), ("part_ptr", "acc"), ("B", "int"), ("N", "int"),
         ("NSUB", "int"), ("c_stride", "int")],
        "2d",
    ),
}

_VECTOR_LOAD = re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.(?:b32|f32|u32|s32)|v2\.(?:b64|f64))\b")


def _as_jit_function(fn):
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        # Under TRITON_INTERPRET=1 every @triton.jit function is an interpreter object
        # that cannot be lowered to PTX.
        raise RuntimeError(
            "ahead-of-time compilation needs compiled-mode Triton: epd_kernels.kernels was "
            "imported with TRITON_INTERPRET=1. Run it in a separate process whose "
            "environment does not set TRITON_INTERPRET.")
    return fn


def _arch_number(arch) -> int:
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        return ARCHS[arch]
    return int(arch)


def _config_for(family, config):
    """constexprs and num_warps of one autotune config (a (tile, num_warps) pair)."""
    tile, warps = config
    if family == "1d":
        return {"BLOCK": int(tile)}, int(warps)
    return {"S": int(tile), "SUB": SUB_GPU}, int(warps)


def compile_kernel(kernel_name: str, arch, dtype: torch.dtype, K: int, aligned: bool = True,
                   config=None, has_scale: bool = False):
    """Compile one kernel for `arch` ("sm_80", "sm_90" or 80/90); returns Triton's
    CompiledKernel (.asm has "ptx" and "cubin"). `config` is one entry of CONFIGS_1D /
    CONFIGS_2D (the first by default)."""
    if kernel_name not in AOT_KERNELS:
        raise ValueError(f"unknown kernel {kernel_name!r}; choose from {sorted(AOT_KERNELS)}")
    if dtype not in _TRITON_TYPE:
        raise TypeError(f"unsupported dtype {dtype}; choose from {list(_TRITON_TYPE)}")
    if int(K) < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    fn, args, family = AOT_KERNELS[kernel_name]
    fn = _as_jit_function(fn)
    data_ty = "*" + _TRITON_TYPE[dtype]
    acc_ty = "*" + _TRITON_TYPE[opmath_dtype(dtype)]
    signature, attrs = {}, {}
    for name, kind in args:
        signature[name] = {"data": data_ty, "acc": acc_ty, "int": "i32", "f64": "fp64"}[kind]
        if aligned and (kind in ("data", "acc") or name == "N"):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    if config is None:
        config = (CONFIGS_1D if family == "1d" else CONFIGS_2D)[0]
    constexprs, num_warps = _config_for(family, config)
    constexprs["K"] = int(K)
    if "HAS_SCALE" in fn.arg_names:
        constexprs["HAS_SCALE"] = bool(has_scale)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", _arch_number(arch), 32)
    options = {"num_warps": num_warps, "enable_fp_fusion": FP_FUSION}
    return triton.compile(src, target=target, options=options)


def aot_compile(kernel_name: str, arch, dtype: torch.dtype, K: int,
                aligned: bool = True) -> str:
    """PTX of `kernel_name` for `arch`, data dtype `dtype`, K branches (first config)."""
    return compile_kernel(kernel_name, arch, dtype, K, aligned).asm["ptx"]


def _spills_from_log(log: str):
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    if not stores or not loads:
        return None
    return sum(map(int, stores)) + sum(map(int, loads))


def _compile_with_log(*args, **kwargs):
    """(CompiledKernel, ptxas -v log of the compile, or "" when Triton's cache served it)."""
    knobs = triton.knobs.nvidia
    before = knobs.dump_ptxas_log
    buf = io.StringIO()
    try:
        knobs.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            compiled = compile_kernel(*args, **kwargs)
    finally:
        knobs.dump_ptxas_log = before
    return compiled, buf.getvalue()


def compile_all(arch, kernels=None, dtypes=AOT_DTYPES, ks=AOT_KS, progress=None) -> list:
    """Compile every autotune config of every kernel for `arch` ("sm_80" or "sm_90").

    Returns one dict per compile: kernel, arch, dtype (name), K, config ({"BLOCK"} or
    {"S", "SUB"} and num_warps), spills (bytes of spill stores + loads that ptxas
    reports), registers, vector_loads (128-bit global loads in the PTX), seconds.
    `progress(i, n, record)` is called after each compile (the whole run takes minutes).
    """
    number = _arch_number(arch)
    names = list(kernels or AOT_KERNELS)
    jobs = []
    for name in names:
        family = AOT_KERNELS[name][2]
        for config in (CONFIGS_1D if family == "1d" else CONFIGS_2D):
            for dtype in dtypes:
                for K in ks:
                    jobs.append((name, family, config, dtype, K))
    records = []
    # A private cache: a cache hit would skip ptxas and give no spill report.
    with tempfile.TemporaryDirectory(prefix="epd_aot_") as cache:
        before = triton.knobs.cache.dir
        triton.knobs.cache.dir = cache
        try:
            for i, (name, family, config, dtype, K) in enumerate(jobs):
                t0 = time.perf_counter()
                compiled, log = _compile_with_log(name, number, dtype, K, config=config)
                ptx = compiled.asm["ptx"]
                spills = _spills_from_log(log)
                if spills is None:  # no log captured: ask ptxas directly
                    stats = ptxas_stats(ptx, number)
                    spills = stats["spill_stores"] + stats["spill_loads"]
                regs = re.search(r"Used (\d+) registers", log)
                constexprs, warps = _config_for(family, config)
                record = {
                    "kernel": name,
                    "arch": f"sm_{number}",
                    "dtype": str(dtype).replace("torch.", ""),
                    "K": K,
                    "config": dict(constexprs, num_warps=warps),
                    "spills": int(spills),
                    "registers": int(regs.group(1)) if regs else None,
                    "vector_loads": bool(_VECTOR_LOAD.search(ptx)),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                records.append(record)
                if progress is not None:
                    progress(i + 1, len(jobs), record)
        finally:
            triton.knobs.cache.dir = before
    return records


def ptxas_stats(ptx: str, arch) -> dict:
    """Run Triton's bundled `ptxas -v` on `ptx`; returns registers, spill_stores,
    spill_loads (bytes) and stack_frame (bytes) of the (single) kernel."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    number = _arch_number(arch)
    ptxas = get_ptxas(number).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(number)}", src,
             "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout

    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"cannot parse ptxas output:\n{log}")
        return int(m.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
        "log": log,
    }
