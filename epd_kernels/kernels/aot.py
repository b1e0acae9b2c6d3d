"""Ahead-of-time compilation of the Triton kernels for a GPU that is not present.

`compile_all("sm_80")` compiles every autotune config of every kernel for every data dtype
and the usual K for `GPUTarget("cuda", 80, 32)`, checking register spills (ptxas) and
128-bit global loads (PTX; `aligned=True` declares pointers and N divisible by 16, as
Triton's JIT infers for aligned tensors). Not under TRITON_INTERPRET=1.
"""
import contextlib
import io
import os
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import CONFIGS_1D, CONFIGS_2D, FP_FUSION, SUB_GPU, opmath_dtype
from .branch_states import _branch_states_bwd_kernel, _branch_states_kernel
from .epd_step import _epd_step_bwd_kernel, _epd_step_fwd_kernel

__all__ = ["compile_all", "compile_kernel", "ARCHS"]

ARCHS = {"sm_80": 80, "sm_90": 90}
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AOT_KS = (1, 2, 3, 4, 8, 16)
# kernel name -> (jit function, tile family: "1d" elementwise, "2d" reducing)
AOT_KERNELS = {
    "epd_step_fwd": (_epd_step_fwd_kernel, "1d"),
    "epd_step_bwd": (_epd_step_bwd_kernel, "2d"),
    "branch_states": (_branch_states_kernel, "1d"),
    "branch_states_bwd": (_branch_states_bwd_kernel, "2d"),
}
# Pointers to opmath coefficients and scratch; every other `*_ptr` points to data.
_ACC_POINTERS = ("w_ptr", "s_ptr", "c_ptr", "part_ptr")
_TRITON_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
                torch.bfloat16: "bf16"}
_VECTOR_LOAD = re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.(?:b32|f32|u32|s32)|v2\.(?:b64|f64))\b")


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


def _configs(name):
    return CONFIGS_1D if AOT_KERNELS[name][1] == "1d" else CONFIGS_2D


def _signature(fn, dtype, aligned):
    """Triton types of `fn`'s run-time arguments, and the divisibility hints."""
    types = {"data": "*" + _TRITON_TYPE[dtype], "acc": "*" + _TRITON_TYPE[opmath_dtype(dtype)]}
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types["acc" if name in _ACC_POINTERS else "data"]
        else:
            signature[name] = "fp64" if name == "alpha" else "i32"
        if aligned and (name.endswith("_ptr") or name == "N"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_kernel(kernel_name: str, arch, dtype: torch.dtype, K: int, aligned: bool = True,
                   config=None, has_scale: bool = False):
    """Triton's CompiledKernel (.asm: "ptx", "cubin") of one kernel for `arch` ("sm_80",
    "sm_90" or 80/90); `config`: an entry of CONFIGS_1D / CONFIGS_2D (default the first)."""
    if kernel_name not in AOT_KERNELS:
        raise ValueError(f"unknown kernel {kernel_name!r}; choose from {sorted(AOT_KERNELS)}")
    if dtype not in _TRITON_TYPE:
        raise TypeError(f"unsupported dtype {dtype}; choose from {list(_TRITON_TYPE)}")
    if int(K) < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    fn, family = AOT_KERNELS[kernel_name]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        # Under TRITON_INTERPRET=1 every @triton.jit function is an interpreter object.
        raise RuntimeError(
            "ahead-of-time compilation needs compiled-mode Triton: epd_kernels.kernels was "
            "imported with TRITON_INTERPRET=1. Run it in a separate process whose "
            "environment does not set TRITON_INTERPRET.")
    signature, attrs = _signature(fn, dtype, aligned)
    constexprs, num_warps = _config_for(family, config or _configs(kernel_name)[0])
    constexprs["K"] = int(K)
    if "HAS_SCALE" in fn.arg_names:
        constexprs["HAS_SCALE"] = bool(has_scale)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", _arch_number(arch), 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})


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


def _spills(log: str):
    """Bytes of spill stores + loads in a ptxas -v log (None when it has no report)."""
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    return sum(map(int, stores + loads)) if stores and loads else None


def _ptxas_log(ptx: str, number: int) -> str:
    """Runs Triton's bundled `ptxas -v` on `ptx`; its report."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [get_ptxas(number).path, "-v", f"--gpu-name={sm_arch_from_capability(number)}",
             src, "-o", os.path.join(tmp, "kernel.o")], capture_output=True, text=True,
            check=True)
    return res.stderr + res.stdout


def compile_all(arch, kernels=None, dtypes=AOT_DTYPES, ks=AOT_KS, progress=None) -> list:
    """Compile every autotune config of every kernel for `arch` ("sm_80" or "sm_90"); one
    dict per compile: kernel, arch, dtype, K, config, spills (bytes ptxas reports),
    registers, vector_loads (128-bit), seconds. `progress(i, n, record)` after each compile."""
    number = _arch_number(arch)
    jobs = [(name, config, dtype, K) for name in (kernels or AOT_KERNELS)
            for config in _configs(name) for dtype in dtypes for K in ks]
    records = []
    # A private cache: a cache hit would skip ptxas and give no spill report.
    with tempfile.TemporaryDirectory(prefix="epd_aot_") as cache:
        before = triton.knobs.cache.dir
        triton.knobs.cache.dir = cache
        try:
            for i, (name, config, dtype, K) in enumerate(jobs):
                t0 = time.perf_counter()
                compiled, log = _compile_with_log(name, number, dtype, K, config=config)
                ptx = compiled.asm["ptx"]
                if _spills(log) is None:  # no log captured: ask ptxas directly
                    log = _ptxas_log(ptx, number)
                if _spills(log) is None:
                    raise RuntimeError(f"cannot parse ptxas output:\n{log}")
                regs = re.search(r"Used (\d+) registers", log)
                constexprs, warps = _config_for(AOT_KERNELS[name][1], config)
                records.append({
                    "kernel": name,
                    "arch": f"sm_{number}",
                    "dtype": str(dtype).replace("torch.", ""),
                    "K": K,
                    "config": dict(constexprs, num_warps=warps),
                    "spills": _spills(log),
                    "registers": int(regs.group(1)) if regs else None,
                    "vector_loads": bool(_VECTOR_LOAD.search(ptx)),
                    "seconds": round(time.perf_counter() - t0, 3),
                })
                if progress is not None:
                    progress(i + 1, len(jobs), records[-1])
        finally:
            triton.knobs.cache.dir = before
    return records
