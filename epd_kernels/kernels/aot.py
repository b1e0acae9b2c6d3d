"""Ahead-of-time compilation of the Triton kernels for a GPU that is not present.

`aot_compile("epd_step_fwd", 80, torch.float32, K=4)` returns the PTX that Triton would
generate for sm_80, so tests and benchmarks can inspect it (vector loads, spills) on a
machine without a GPU. With `aligned=True` every pointer and the row length N are
declared divisible by 16 (what Triton's JIT infers by itself for 16-byte aligned tensors
and N % 16 == 0), which lets it emit 128-bit global loads and stores.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Import the kernels by name: the package re-exports the launchers `branch_states` and
# `epd_step_*`, and the attribute `epd_kernels.kernels.branch_states` is the launcher.
from .branch_states import _branch_states_bwd_kernel, _branch_states_kernel
from .epd_step import _epd_step_bwd_kernel, _epd_step_fwd_kernel
from ._common import FP_FUSION, SUB, aot_config_1d, aot_config_2d, opmath_dtype

__all__ = ["aot_compile", "compile_kernel", "ptxas_stats", "AOT_KERNELS"]

_TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}

# kernel name -> (jit function, [(arg name, kind)], family). kind: "data" (pointer to T),
# "acc" (pointer to opmath), "int" (i32 size, "N" gets the divisibility hint).
_Spec = Tuple[object, List[Tuple[str, str]], str]
AOT_KERNELS: Dict[str, _Spec] = {
    "epd_step_fwd": (
        _epd_step_fwd_kernel,
        [("x_ptr", "data"), ("g_ptr", "data"), ("w_ptr", "acc"), ("h_ptr", "acc"),
         ("o_ptr", "acc"), ("y_ptr", "data"), ("B", "int"), ("N", "int")],
        "1d",
    ),
    "epd_step_bwd": (
        _epd_step_bwd_kernel,
        [("go_ptr", "data"), ("g_ptr", "data"), ("w_ptr", "acc"), ("h_ptr", "acc"),
         ("o_ptr", "acc"), ("gg_ptr", "data"), ("part_ptr", "acc"), ("B", "int"),
         ("N", "int"), ("NSUB", "int")],
        "2d",
    ),
    "branch_states": (
        _branch_states_kernel,
        [("x_ptr", "data"), ("d_ptr", "data"), ("c_ptr", "acc"), ("out_ptr", "data"),
         ("B", "int"), ("N", "int")],
        "1d",
    ),
    "branch_states_bwd": (
        _branch_states_bwd_kernel,
        [("go_ptr", "data"), ("d_ptr", "data"), ("c_ptr", "acc"), ("gx_ptr", "data"),
         ("gd_ptr", "data"), ("part_ptr", "acc"), ("B", "int"), ("N", "int"),
         ("NSUB", "int")],
        "2d",
    ),
}


def _as_jit_function(fn):
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        # Under TRITON_INTERPRET=1 every @triton.jit function, triton.language's own helpers
        # (tl.cdiv, ...) included, is an interpreter object that cannot be lowered to PTX.
        raise RuntimeError(
            "aot_compile needs compiled-mode Triton: epd_kernels.kernels was imported with "
            "TRITON_INTERPRET=1. Run ahead-of-time compilation in a separate process whose "
            "environment does not set TRITON_INTERPRET.")
    return fn


def compile_kernel(kernel_name: str, arch: int, dtype: torch.dtype, K: int,
                   aligned: bool = True, block: int = None, num_warps: int = None):
    """Compile one kernel for `sm_<arch>`; returns Triton's CompiledKernel (.asm has
    "ttir", "ttgir", "llir", "ptx", "cubin"; .metadata has n_regs etc. when known)."""
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

    signature = {}
    attrs = {}
    for name, kind in args:
        signature[name] = {"data": data_ty, "acc": acc_ty, "int": "i32"}[kind]
        if aligned and (kind in ("data", "acc") or name == "N"):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]

    if family == "1d":
        cfg = dict(aot_config_1d)
        constexprs = {"K": int(K), "BLOCK": int(block or cfg["BLOCK"])}
    else:
        cfg = dict(aot_config_2d)
        if block is not None and block % SUB:
            raise ValueError(f"block must be a multiple of SUB = {SUB}")
        constexprs = {"K": int(K), "SUB": SUB, "S": int(block // SUB if block else cfg["S"])}
    for name in constexprs:
        signature[name] = "constexpr"

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", int(arch), 32)
    options = {"num_warps": int(num_warps or cfg["num_warps"]), "enable_fp_fusion": FP_FUSION}
    return triton.compile(src, target=target, options=options)


def aot_compile(kernel_name: str, arch: int, dtype: torch.dtype, K: int,
                aligned: bool = True) -> str:
    """PTX of `kernel_name` ('epd_step_fwd', 'epd_step_bwd', 'branch_states',
    'branch_states_bwd') for sm_<arch>, data dtype `dtype`, K branches."""
    return compile_kernel(kernel_name, arch, dtype, K, aligned).asm["ptx"]


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Run Triton's bundled `ptxas -v` on `ptx` for sm_<arch>; returns registers,
    spill_stores, spill_loads (bytes) and stack_frame (bytes) of the (single) kernel."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(int(arch)).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(int(arch))}", src,
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
