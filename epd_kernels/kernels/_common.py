"""Shared pieces of the Triton kernels: mode, autotune configs, the launchers' checks and
grids, and the program -> tile maps. Only imported when triton imports (`__init__.py`)."""
import contextlib
import os

import torch
import triton
import triton.language as tl

from ..reference import opmath_dtype


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

# Tiling: elementwise kernels use a 1D tile of BLOCK elements per program; the reducing
# ones (the backwards) a 2D tile [S, SUB] writing one partial sum per SUB-element slice,
# so the [B, cdiv(N, SUB), K] partial buffer does not depend on the tuned S.
#: (BLOCK, num_warps) of the elementwise kernels on a GPU: 16 elements per thread, so that
#: fp64 and K = 16 do not spill (8 per thread made ptxas spill a few bytes for
#: branch_states, bf16, K = 4 on sm_80). Checked for every dtype and K by aot.compile_all.
CONFIGS_1D = [(512, 1), (1024, 2), (2048, 4), (4096, 8)]
#: (S, num_warps) of the reducing kernels, BLOCK = S * SUB, on a GPU: (1, 4), (1, 8), (2, 4)
#: and (4, 16) each spill a few bytes for some dtype and K in {3, 4, 8} on sm_80 or sm_90
#: (ptxas heuristics, not a simple count); these do not. Checked by aot.compile_all.
CONFIGS_2D = [(2, 8), (1, 16), (2, 16)]
SUB_GPU = 1024
# Under the interpreter one small config keeps runs fast and still exercises several
# programs per row (and several slices per program) on modest N.
SUB = 64 if INTERPRET else SUB_GPU
_CFG_1D = [(128, 4)] if INTERPRET else CONFIGS_1D
_CFG_2D = [(2, 4)] if INTERPRET else CONFIGS_2D

#: Let the compiler contract a*b+c into FMA (one rounding instead of two). Passed
#: explicitly so results do not change with Triton's default.
FP_FUSION = True


def autotuned_1d(kernel, key):
    return triton.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in _CFG_1D],
                           key=key)(kernel)


def autotuned_2d(kernel, key):
    return triton.autotune([triton.Config({"S": s}, num_warps=w) for s, w in _CFG_2D],
                           key=key)(kernel)


def check_canonical(rows, stacked, coef_name, c, scale=None):
    """The launchers' contract, as ops.cpp checks it (bad inputs must fail, not read out of
    bounds): `rows` / `stacked` map names to [B, N] / [K, B, N] contiguous data of one dtype,
    `c` (named `coef_name`) [K] or [B, K] opmath, `scale` None, [] or [B].
    Returns (B, N, K, row stride of the coefficients)."""
    data = {**rows, **stacked}
    lead = next(iter(rows.values()))
    K = c.shape[-1] if c.dim() in (1, 2) else -1
    B, N = lead.shape if lead.dim() == 2 else (-1, -1)  # -1: no shape matches
    if (any(t.shape != (B, N) for t in rows.values())
            or any(t.shape != (K, B, N) for t in stacked.values())
            or c.shape not in ((K,), (B, K))):
        want = ([f"{n} [B, N]" for n in rows] + [f"{n} [K, B, N]" for n in stacked]
                + [f"{coef_name} [K] or [B, K]"])
        got = ", ".join(f"{n} {list(t.shape)}" for n, t in {**data, coef_name: c}.items())
        raise ValueError(f"shapes must be {', '.join(want)}; got {got}")
    if len({t.dtype for t in data.values()}) != 1 or not all(
            t.is_contiguous() for t in data.values()):
        raise ValueError(f"{', '.join(data)} must be contiguous with one dtype")
    acc = opmath_dtype(lead.dtype)
    if c.dtype != acc or not c.is_contiguous() or K < 1:
        raise TypeError(f"{coef_name} must be a contiguous {acc} tensor with K >= 1, got "
                        f"{c.dtype} {list(c.shape)}")
    if scale is not None and (scale.dtype != acc or scale.shape not in ((), (B,))):
        raise TypeError(f"scale must be a 0-d or [B] {acc} tensor, got {scale.dtype} "
                        f"{list(scale.shape)}")
    return B, N, K, (K if c.dim() == 2 else 0)


def device_guard(t: torch.Tensor):
    """Launch under the tensor's device (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_1d(kernel, B, N, device_of, *args, **constexprs):
    """Launches an elementwise kernel on B * cdiv(N, BLOCK) programs (none when empty)."""
    if B == 0 or N == 0:
        return
    with device_guard(device_of):
        kernel[lambda meta: (B * triton.cdiv(N, meta["BLOCK"]),)](
            *args, enable_fp_fusion=FP_FUSION, **constexprs)


def launch_reduce(kernel, B, N, device_of, *args, **constexprs):
    """Launches a reducing kernel whose last two run-time arguments are its partial-sum
    scratch [B, cdiv(N, SUB), K] and cdiv(N, SUB); returns the [B, K] row sums (opmath)."""
    K = constexprs["K"]
    acc = opmath_dtype(device_of.dtype)
    if B == 0 or N == 0:
        return torch.zeros((B, K), dtype=acc, device=device_of.device)
    nsub = triton.cdiv(N, SUB)
    # Every slot is written exactly once whatever S is tuned to: no zero-fill needed.
    partial = torch.empty((B, nsub, K), dtype=acc, device=device_of.device)
    with device_guard(device_of):
        kernel[lambda meta: (B * triton.cdiv(N, meta["S"] * SUB),)](
            *args, partial, nsub, SUB=SUB, enable_fp_fusion=FP_FUSION, **constexprs)
    return partial.sum(dim=1)  # a fresh tensor, never a view of the scratch


# Program -> tile maps (inlined): B * cdiv(N, BLOCK) programs, a tile never straddles two
# rows, so per-row scalars are loaded once. Program id, row and tile start (`base`) are
# int64, so K*B*N beyond 2^31 is addressed correctly; only in-tile lane offsets are int32.


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
    """(b, base, lanes [S, SUB], mask, slot [S], slot_mask) of this program's 2D tile: S
    consecutive slices of SUB elements; slice `slot` of the row owns partial-sum slot
    `slot` of the [B, NSUB, K] scratch, so its layout does not depend on the tuned S."""
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
