"""Shared pieces of the Triton kernels: mode detection, autotune configs, tile maps.

Only imported when triton itself imports (see `__init__.py`).
"""
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "SUB",
    "CONFIGS_1D",
    "CONFIGS_2D",
    "configs_1d",
    "configs_2d",
    "FP_FUSION",
    "opmath_dtype",
    "row_tile_1d",
    "row_tile_2d",
    "device_guard",
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

# --------------------------------------------------------------------------------------
# Tiling.
#
# Elementwise kernels (epd_step, branch_states) use a 1D tile of BLOCK elements per
# program. The kernels that also reduce over N (the backwards) use a 2D tile [S, SUB]:
# every program writes S partial sums per branch, one per SUB-element slice, so the
# partial buffer is [B, cdiv(N, SUB), K] whatever S the autotuner picks and the launcher
# can size it before the launch. SUB is a module constant, not tuned.
#
# Under the interpreter a single small config keeps runs fast and still exercises
# several programs per row (and several slices per program) on modest N.
# --------------------------------------------------------------------------------------
#: (BLOCK, num_warps) of the elementwise kernels, on a GPU: 16 elements per thread per
#: tile, so that fp64 and K = 16 do not spill; smaller tiles use fewer warps. (8 elements
#: per thread made ptxas spill a few bytes for branch_states, bf16, K = 4 on sm_80.)
#: Checked for every dtype and K by aot.compile_all.
CONFIGS_1D = [(512, 1), (1024, 2), (2048, 4), (4096, 8)]
#: (S, num_warps) of the reducing kernels, BLOCK = S * SUB, on a GPU. Which tiles let
#: ptxas keep everything in registers is a matter of its heuristics, not of a simple
#: count: (1, 4), (1, 8), (2, 4) and (4, 16) each spill a few bytes for some dtype and
#: K in {3, 4, 8} on sm_80 or sm_90; these do not. Checked by aot.compile_all.
CONFIGS_2D = [(2, 8), (1, 16), (2, 16)]
SUB_GPU = 1024

if INTERPRET:
    SUB = 64
    _CFG_1D = [(128, 4)]
    _CFG_2D = [(2, 4)]
else:
    SUB = SUB_GPU
    _CFG_1D = CONFIGS_1D
    _CFG_2D = CONFIGS_2D


def configs_1d():
    return [triton.Config({"BLOCK": blk}, num_warps=w) for blk, w in _CFG_1D]


def configs_2d():
    return [triton.Config({"S": s}, num_warps=w) for s, w in _CFG_2D]


#: Let the compiler contract a*b+c into FMA (one rounding instead of two). Passed
#: explicitly so results do not change with Triton's default.
FP_FUSION = True


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_guard(t: torch.Tensor):
    """Launch under the tensor's device (Triton launches on the current CUDA device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Program -> tile maps shared by the kernels (inlined by the compiler).
#
# The grid is B * cdiv(N, BLOCK) programs; program pid covers block `blk` of row `b`, so
# a tile never straddles two rows and per-row scalars are loaded once. Everything that
# grows with the tensor (program id, row, start of the tile: `base`) is int64, so rows
# of more than 2^31 elements and K*B*N beyond 2^31 are addressed correctly; only the
# lane offsets inside a tile (< BLOCK) are int32.


@triton.jit
def row_tile_1d(N, BLOCK: tl.constexpr):
    """(b, base, lanes [BLOCK], mask) of this program's 1D tile; element i of the tile
    is element base + lanes[i] of the flattened [B, N] tensor."""
    pid = tl.program_id(0).to(tl.int64)
    nblk = tl.cdiv(N, BLOCK)
    b = pid // nblk
    start = (pid - b * nblk) * BLOCK
    lanes = tl.arange(0, BLOCK)
    return b, b * N + start, lanes, lanes < N - start


@triton.jit
def row_tile_2d(N, NSUB, S: tl.constexpr, SUB: tl.constexpr):
    """(b, base, lanes [S, SUB], mask, slot [S], slot_mask) of this program's 2D tile.

    The tile is S consecutive slices of SUB elements; slice `slot` of the row owns
    partial-sum slot `slot` of the [B, NSUB, K] scratch, so the scratch layout does not
    depend on the tuned S.
    """
    BLOCK: tl.constexpr = S * SUB
    pid = tl.program_id(0).to(tl.int64)
    nblk = tl.cdiv(N, BLOCK)
    b = pid // nblk
    blk = pid - b * nblk
    start = blk * BLOCK
    rows = tl.arange(0, S)
    lanes = rows[:, None] * SUB + tl.arange(0, SUB)[None, :]
    slot = blk * S + rows
    return b, b * N + start, lanes, lanes < N - start, slot, slot < NSUB
