"""Branch-state construction: forward and backward kernels and their launchers.

Forward (DESIGN.md section 1, x_k = x_n + (tau_k - t) * d_n):
    out[k, b, n] = x[b, n] + c[b, k] * d[b, n]            -> [K, B, N]

`branch_states_out` writes straight into a caller-owned contiguous buffer with K*B*N
elements, e.g. the static [K*B, C, H, W] input of a captured CUDA graph (k-major, so
sample k*B + b of the batch is branch k of sample b).

Backward, one pass over grad_out:
    grad_x[b, n] = sum_k grad_out[k, b, n]
    grad_d[b, n] = sum_k c[b, k] * grad_out[k, b, n]
    grad_c[b, k] = sum_n grad_out[k, b, n] * d[b, n]      (opmath)

Loads / stores in the data dtype, arithmetic in opmath (the dtype of c).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FP_FUSION,
    SUB,
    check_data,
    check_opmath,
    check_per_row,
    configs_1d,
    configs_2d,
    opmath_dtype,
    row_tile_1d,
    row_tile_2d,
)

__all__ = ["branch_states", "branch_states_out", "branch_states_bwd"]


@triton.jit
def _branch_states_kernel(
    x_ptr,      # [B, N]     T
    d_ptr,      # [B, N]     T
    c_ptr,      # [B, K]     opmath
    out_ptr,    # [K, B, N]  T
    B,
    N,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b64, offs, mask = row_tile_1d(N, BLOCK)

    c0 = tl.load(c_ptr + b64 * K)
    acc_ty = c0.dtype
    x = tl.load(x_ptr + b64 * N + offs, mask=mask, other=0.0).to(acc_ty)
    d = tl.load(d_ptr + b64 * N + offs, mask=mask, other=0.0).to(acc_ty)
    for k in tl.static_range(K):
        c = tl.load(c_ptr + b64 * K + k)
        tl.store(out_ptr + (k * B + b64) * N + offs,
                 (x + c * d).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch_states_bwd_kernel(
    go_ptr,     # [K, B, N]  T      grad_out
    d_ptr,      # [B, N]     T
    c_ptr,      # [B, K]     opmath
    gx_ptr,     # [B, N]     T      grad_x (out)
    gd_ptr,     # [B, N]     T      grad_d (out)
    part_ptr,   # [B, NSUB, K] opmath partial grad_c (out)
    B,
    N,
    NSUB,
    K: tl.constexpr,
    SUB: tl.constexpr,
    S: tl.constexpr,
):
    b64, offs, mask, slot, slot_mask = row_tile_2d(N, NSUB, S, SUB)

    c0 = tl.load(c_ptr + b64 * K)
    acc_ty = c0.dtype
    d = tl.load(d_ptr + b64 * N + offs, mask=mask, other=0.0).to(acc_ty)
    part_base = part_ptr + (b64 * NSUB + slot) * K
    # Branch 0 initialises the accumulators, branches 1..K-1 add to them.
    acc_x = tl.load(go_ptr + b64 * N + offs, mask=mask, other=0.0).to(acc_ty)
    acc_d = c0 * acc_x
    tl.store(part_base, tl.sum(acc_x * d, axis=1), mask=slot_mask)
    for k in tl.static_range(1, K):
        c = tl.load(c_ptr + b64 * K + k)
        g = tl.load(go_ptr + (k * B + b64) * N + offs, mask=mask, other=0.0).to(acc_ty)
        acc_x += g
        acc_d += c * g
        tl.store(part_base + k, tl.sum(g * d, axis=1), mask=slot_mask)
    tl.store(gx_ptr + b64 * N + offs, acc_x.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gd_ptr + b64 * N + offs, acc_d.to(gd_ptr.dtype.element_ty), mask=mask)


_branch_states_tuned = triton.autotune(configs=configs_1d(), key=["N", "K"])(_branch_states_kernel)
_branch_states_bwd_tuned = triton.autotune(configs=configs_2d(), key=["N", "K"])(
    _branch_states_bwd_kernel)


def _check_fwd(x, d, c):
    check_data("x", x, x.shape)
    if x.dim() != 2:
        raise ValueError(f"x must be [B, N], got shape {tuple(x.shape)}")
    B, N = x.shape
    K = check_per_row("c", c, B)
    check_data("d", d, (B, N), x.dtype, x.device)
    check_opmath("c", c, (B, K), x.dtype, x.device)
    return B, N, K


def _launch_fwd(x, d, c, out, B, N, K):
    if B == 0 or N == 0:
        return
    grid = lambda meta: (B * triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
    _branch_states_tuned[grid](x, d, c, out, B, N, K=K, enable_fp_fusion=FP_FUSION)


def branch_states(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """out[k, b] = x[b] + c[b, k] * d[b]  ->  [K, B, N] in x's dtype."""
    B, N, K = _check_fwd(x, d, c)
    out = torch.empty((K, B, N), dtype=x.dtype, device=x.device)
    _launch_fwd(x, d, c, out, B, N, K)
    return out


def branch_states_out(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                      out: torch.Tensor) -> None:
    """Same as `branch_states`, written into `out` (contiguous, K*B*N elements, x's dtype).

    `out` may have any shape with that many elements, e.g. a static [K*B, C, H, W] batch.
    """
    B, N, K = _check_fwd(x, d, c)
    if not isinstance(out, torch.Tensor):
        raise TypeError("out must be a torch.Tensor")
    if out.numel() != K * B * N:
        raise ValueError(f"out must have K*B*N = {K * B * N} elements, got {out.numel()} "
                         f"(shape {tuple(out.shape)})")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have dtype {x.dtype}, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device}, expected {x.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _launch_fwd(x, d, c, out, B, N, K)


def branch_states_bwd(grad_out: torch.Tensor, d: torch.Tensor, c: torch.Tensor):
    """Returns (grad_x [B, N], grad_d [B, N] in the data dtype, grad_c [B, K] in opmath)."""
    check_data("d", d, d.shape)
    if d.dim() != 2:
        raise ValueError(f"d must be [B, N], got shape {tuple(d.shape)}")
    B, N = d.shape
    K = check_per_row("c", c, B)
    check_data("grad_out", grad_out, (K, B, N), d.dtype, d.device)
    check_opmath("c", c, (B, K), d.dtype, d.device)
    acc = opmath_dtype(d.dtype)
    grad_x = torch.empty_like(d)
    grad_d = torch.empty_like(d)
    if B == 0 or N == 0:
        return grad_x, grad_d, torch.zeros((B, K), dtype=acc, device=d.device)
    nsub = triton.cdiv(N, SUB)
    partial = torch.empty((B, nsub, K), dtype=acc, device=d.device)
    grid = lambda meta: (B * triton.cdiv(N, meta["S"] * SUB),)  # noqa: E731
    _branch_states_bwd_tuned[grid](grad_out, d, c, grad_x, grad_d, partial,
                                   B, N, nsub, K=K, SUB=SUB,
                                   enable_fp_fusion=FP_FUSION)
    grad_c = partial.sum(dim=1)  # [B, K]; a fresh tensor, never a view of the scratch
    return grad_x, grad_d, grad_c
