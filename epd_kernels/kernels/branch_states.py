"""Branch-state construction: forward and backward kernels and their launchers.

Forward (docs/design.md, "EPD step": x_k = x_n + (tau_k - t) * d_n):
    out[k, b, n] = x[b, n] + c[b, k] * d[b, n]            -> [K, B, N]
c is [K] (row stride 0) or [B, K]. `branch_states_out` writes into a contiguous buffer of
K*B*N elements (k-major: sample k*B + b of the batch is branch k of sample b). Backward,
one pass over grad_out:
    grad_x[b, n] = sum_k grad_out[k, b, n]
    grad_d[b, n] = sum_k c[b, k] * grad_out[k, b, n]
    grad_c[b, k] = sum_n grad_out[k, b, n] * d[b, n]      (opmath, [B, K])
Loads / stores in the data dtype, arithmetic in opmath (the dtype of c).
"""
import torch
import triton
import triton.language as tl

from ._common import (autotuned_1d, autotuned_2d, check_canonical, launch_1d, launch_reduce,
                      row_tile_1d, row_tile_2d)

__all__ = ["branch_states", "branch_states_out", "branch_states_backward"]


@triton.jit
def _branch_states_kernel(
    x_ptr,      # [B, N]          T
    d_ptr,      # [B, N]          T
    c_ptr,      # [K] or [B, K]   opmath
    out_ptr,    # [K, B, N]       T
    B,
    N,
    c_stride,   # 0 for [K] offsets, K for [B, K]
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, base, lanes, mask = row_tile_1d(N, BLOCK)
    acc_ty: tl.constexpr = c_ptr.dtype.element_ty
    c_row = c_ptr + b * c_stride
    plane = B * N
    x = tl.load(x_ptr + base + lanes, mask=mask, other=0.0).to(acc_ty)
    d = tl.load(d_ptr + base + lanes, mask=mask, other=0.0).to(acc_ty)
    for k in tl.static_range(K):
        c = tl.load(c_row + k)
        tl.store(out_ptr + (k * plane + base) + lanes,
                 (x + c * d).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch_states_bwd_kernel(
    go_ptr,     # [K, B, N]       T      grad_out
    d_ptr,      # [B, N]          T
    c_ptr,      # [K] or [B, K]   opmath
    gx_ptr,     # [B, N]          T      grad_x (out)
    gd_ptr,     # [B, N]          T      grad_d (out)
    B,
    N,
    c_stride,
    part_ptr,   # [B, NSUB, K]    opmath partial grad_c (out)
    NSUB,
    K: tl.constexpr,
    SUB: tl.constexpr,
    S: tl.constexpr,
):
    b, base, lanes, mask, slot, slot_mask = row_tile_2d(N, NSUB, S, SUB)
    acc_ty: tl.constexpr = c_ptr.dtype.element_ty
    c_row = c_ptr + b * c_stride
    plane = B * N
    d = tl.load(d_ptr + base + lanes, mask=mask, other=0.0).to(acc_ty)
    part_base = part_ptr + (b * NSUB + slot) * K
    # Branch 0 initialises the accumulators, branches 1..K-1 add to them.
    acc_x = tl.load(go_ptr + base + lanes, mask=mask, other=0.0).to(acc_ty)
    acc_d = tl.load(c_row) * acc_x
    tl.store(part_base, tl.sum(acc_x * d, axis=1), mask=slot_mask)
    for k in tl.static_range(1, K):
        c = tl.load(c_row + k)
        g = tl.load(go_ptr + (k * plane + base) + lanes, mask=mask, other=0.0).to(acc_ty)
        acc_x += g
        acc_d += c * g
        tl.store(part_base + k, tl.sum(g * d, axis=1), mask=slot_mask)
    tl.store(gx_ptr + base + lanes, acc_x.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gd_ptr + base + lanes, acc_d.to(gd_ptr.dtype.element_ty), mask=mask)


_branch_states_tuned = autotuned_1d(_branch_states_kernel, ["N", "K"])
_branch_states_bwd_tuned = autotuned_2d(_branch_states_bwd_kernel, ["N", "K"])


def branch_states_out(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                      out: torch.Tensor) -> None:
    """`branch_states` written into `out`: contiguous, x's dtype, K*B*N elements in any
    shape (e.g. a static [K*B, C, H, W] batch)."""
    B, N, K, c_stride = check_canonical({"x": x, "d": d}, {}, "c", c)
    if out.numel() != K * x.numel() or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of K*B*N = "
                         f"{K * x.numel()} elements, got {out.dtype} {list(out.shape)}")
    launch_1d(_branch_states_tuned, B, N, x, x, d, c, out, B, N, c_stride, K=K)


def branch_states(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """out[k, b] = x[b] + c[..., k] * d[b]  ->  [K, B, N] in x's dtype."""
    out = x.new_empty((c.shape[-1],) + tuple(x.shape))
    branch_states_out(x, d, c, out)
    return out


def branch_states_backward(grad_out: torch.Tensor, d: torch.Tensor, c: torch.Tensor):
    """Returns (grad_x [B, N], grad_d [B, N] in the data dtype, grad_c [B, K] in opmath)."""
    B, N, K, c_stride = check_canonical({"d": d}, {"grad_out": grad_out}, "c", c)
    grad_x, grad_d = torch.empty_like(d), torch.empty_like(d)
    grad_c = launch_reduce(_branch_states_bwd_tuned, B, N, d, grad_out, d, c, grad_x,
                           grad_d, B, N, c_stride, K=K)
    return grad_x, grad_d, grad_c
