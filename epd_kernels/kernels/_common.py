"""Shared pieces of the Triton kernels: mode detection, autotune configs, checks.

Only imported when triton itself imports (see `__init__.py`).
"""
from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "INTERPRET",
    "MAX_K",
    "SUB",
    "configs_1d",
    "configs_2d",
    "aot_config_1d",
    "aot_config_2d",
    "FP_FUSION",
    "opmath_dtype",
    "check_data",
    "check_opmath",
    "check_k",
]


def _interpret_mode() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        try:
            return bool(knobs.runtime.interpret)
        except AttributeError:  # pragma: no cover - older triton
            pass
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: True when the kernels were decorated while TRITON_INTERPRET=1, i.e. they run on CPU
#: tensors through the Triton interpreter. Fixed when this package is first imported.
INTERPRET: bool = _interpret_mode()

#: Largest number of branches the kernels are tested for (K is a compile-time constant,
#: larger values work but compile one more specialisation each).
MAX_K = 16

# --------------------------------------------------------------------------------------
# Tiling.
#
# Elementwise kernels (epd_step_fwd, branch_states) use a 1D tile of BLOCK elements per
# program. The kernels that also reduce over N (epd_step_bwd, branch_states_bwd) use a 2D
# tile [S, SUB]: every program writes S partial sums per branch, one per SUB-element
# slice, so the partial buffer is [B, cdiv(N, SUB), K] whatever S the autotuner picks and
# the launcher can size it before the launch. SUB is a module constant, not tuned.
#
# Under the interpreter a single small config keeps runs fast and still exercises
# several programs per row (and several slices per program) on modest N.
# --------------------------------------------------------------------------------------
if INTERPRET:
    SUB = 64
    _CFG_1D = [(128, 4)]          # (BLOCK, num_warps)
    _CFG_2D = [(2, 4)]            # (S, num_warps), BLOCK = S * SUB
else:
    SUB = 1024
    # At most 16 elements per thread per tile, so that fp64 and K = 16 do not spill.
    _CFG_1D = [(1024, 4), (2048, 4), (2048, 8), (4096, 8)]
    _CFG_2D = [(1, 4), (2, 4), (2, 8), (4, 8)]


def configs_1d():
    return [triton.Config({"BLOCK": blk}, num_warps=w) for blk, w in _CFG_1D]


def configs_2d():
    return [triton.Config({"S": s}, num_warps=w) for s, w in _CFG_2D]


#: Let the compiler contract a*b+c into FMA (one rounding instead of two). Passed
#: explicitly so results do not change with Triton's default (which flips in 3.10).
FP_FUSION = True

#: Config used for ahead-of-time compilation (first GPU config of each family).
aot_config_1d = {"BLOCK": 2048, "num_warps": 4}
aot_config_2d = {"S": 2, "num_warps": 4}


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_DATA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_data(name: str, t: torch.Tensor, shape, dtype=None, device=None) -> None:
    """Shape / dtype / contiguity check of a data tensor (cheap, Python side only)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in _DATA_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected one of {_DATA_DTYPES}")
    elif t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_opmath(name: str, t: torch.Tensor, shape, data_dtype: torch.dtype, device) -> None:
    """Scalar-parameter tensors ([B] or [B, K]) must be in the opmath dtype of the data."""
    check_data(name, t, shape, opmath_dtype(data_dtype), device)


def check_k(K: int) -> None:
    if K < 1:
        raise ValueError(f"K (number of branches) must be >= 1, got {K}")
