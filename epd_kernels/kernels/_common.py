"""Shared pieces of the Triton kernels: mode detection, autotune configs, checks.

Only imported when triton itself imports (see `__init__.py`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
    "check_per_row",
    "row_tile_1d",
    "row_tile_2d",
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


def check_per_row(name: str, t, B: int) -> int:
    """`t` must be a [B, K] tensor (one row of per-branch scalars per sample); returns K."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != B:
        raise ValueError(f"{name} must be a [B, K] tensor with B = {B}")
    K = t.shape[1]
    check_k(K)
    return K


# --------------------------------------------------------------------------------------
# Program -> tile maps shared by the kernels (inlined by the compiler).
#
# The grid is B * cdiv(N, BLOCK) programs; program pid covers block `blk` of row `b`, so
# a tile never straddles two rows and per-row scalars are loaded once. Row offsets are
# int64 (K*B*N may exceed 2^31); offsets within a row stay int32 (< N + BLOCK).


@triton.jit
def row_tile_1d(N, BLOCK: tl.constexpr):
    """(b64, offs [BLOCK], mask) of this program's 1D tile."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK)
    b = pid // nblk
    blk = pid - b * nblk
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    return b.to(tl.int64), offs, offs < N


@triton.jit
def row_tile_2d(N, NSUB, S: tl.constexpr, SUB: tl.constexpr):
    """(b64, offs [S, SUB], mask, slot [S], slot_mask) of this program's 2D tile.

    The tile is S consecutive slices of SUB elements; slice `slot` of the row owns
    partial-sum slot `slot` of the [B, NSUB, K] scratch, so the scratch layout does not
    depend on the tuned S.
    """
    BLOCK: tl.constexpr = S * SUB
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK)
    b = pid // nblk
    blk = pid - b * nblk
    rows = tl.arange(0, S)
    offs = blk * BLOCK + rows[:, None] * SUB + tl.arange(0, SUB)[None, :]
    slot = blk * S + rows
    return b.to(tl.int64), offs, offs < N, slot, slot < NSUB
