"""Fused EPD step: forward and backward kernels and their launchers.

Forward (DESIGN.md section 1):
    y[b, n] = x[b, n] + (1 + o[b]) * h[b] * sum_k weights[b, k] * grads[k, b, n]

Backward, one pass over grads and grad_out:
    grad_grads[k, b, n] = (1 + o[b]) * h[b] * weights[b, k] * grad_out[b, n]
    dots[b, k]          = sum_n grad_out[b, n] * grads[k, b, n]

Data (x, grads, y, grad_out, grad_grads) is loaded and stored in its own dtype T; all
arithmetic is done in the opmath dtype (float64 for float64 data, float32 otherwise),
which is the dtype of weights / h / o. Those scalars are read from device memory inside
the kernel, never passed as Python numbers, so a captured CUDA graph replays correctly
after their values are updated in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FP_FUSION,
    SUB,
    check_data,
    check_k,
    check_opmath,
    configs_1d,
    configs_2d,
    opmath_dtype,
    row_tile_1d,
    row_tile_2d,
)

__all__ = ["epd_step_fwd", "epd_step_bwd"]


@triton.jit
def _epd_step_fwd_kernel(
    x_ptr,      # [B, N]     T
    g_ptr,      # [K, B, N]  T
    w_ptr,      # [B, K]     opmath
    h_ptr,      # [B]        opmath
    o_ptr,      # [B]        opmath
    y_ptr,      # [B, N]     T
    B,
    N,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b64, offs, mask = row_tile_1d(N, BLOCK)

    h = tl.load(h_ptr + b64)
    o = tl.load(o_ptr + b64)
    acc_ty = h.dtype
    scale = (1.0 + o) * h

    # Branch 0 initialises the accumulator (no fma with a zero addend), then K - 1 fmas.
    g = tl.load(g_ptr + b64 * N + offs, mask=mask, other=0.0)
    acc = tl.load(w_ptr + b64 * K) * g.to(acc_ty)
    for k in tl.static_range(1, K):
        w = tl.load(w_ptr + b64 * K + k)
        g = tl.load(g_ptr + (k * B + b64) * N + offs, mask=mask, other=0.0)
        acc += w * g.to(acc_ty)
    x = tl.load(x_ptr + b64 * N + offs, mask=mask, other=0.0)
    y = x.to(acc_ty) + scale * acc
    tl.store(y_ptr + b64 * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epd_step_bwd_kernel(
    go_ptr,     # [B, N]     T      grad_out
    g_ptr,      # [K, B, N]  T      grads
    w_ptr,      # [B, K]     opmath
    h_ptr,      # [B]        opmath
    o_ptr,      # [B]        opmath
    gg_ptr,     # [K, B, N]  T      grad_grads (out)
    part_ptr,   # [B, NSUB, K] opmath partial dots (out), NSUB = cdiv(N, SUB)
    B,
    N,
    NSUB,
    K: tl.constexpr,
    SUB: tl.constexpr,
    S: tl.constexpr,
):
    # One program covers S consecutive slices of SUB elements of one row b.
    b64, offs, mask, slot, slot_mask = row_tile_2d(N, NSUB, S, SUB)

    h = tl.load(h_ptr + b64)
    o = tl.load(o_ptr + b64)
    acc_ty = h.dtype
    scale = (1.0 + o) * h

    gy = tl.load(go_ptr + b64 * N + offs, mask=mask, other=0.0).to(acc_ty)
    part_base = part_ptr + (b64 * NSUB + slot) * K                        # [S]
    for k in tl.static_range(K):
        coef = scale * tl.load(w_ptr + b64 * K + k)
        row = (k * B + b64) * N
        g = tl.load(g_ptr + row + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(gg_ptr + row + offs, (coef * gy).to(gg_ptr.dtype.element_ty), mask=mask)
        tl.store(part_base + k, tl.sum(gy * g, axis=1), mask=slot_mask)


_epd_step_fwd_tuned = triton.autotune(configs=configs_1d(), key=["N", "K"])(_epd_step_fwd_kernel)
_epd_step_bwd_tuned = triton.autotune(configs=configs_2d(), key=["N", "K"])(_epd_step_bwd_kernel)


def _check_step_inputs(lead: torch.Tensor, grads, weights, h, o, lead_name: str):
    check_data(lead_name, lead, lead.shape)
    if lead.dim() != 2:
        raise ValueError(f"{lead_name} must be [B, N], got shape {tuple(lead.shape)}")
    B, N = lead.shape
    if not isinstance(grads, torch.Tensor) or grads.dim() != 3:
        raise ValueError("grads must be a [K, B, N] tensor")
    K = grads.shape[0]
    check_k(K)
    dev, dt = lead.device, lead.dtype
    check_data("grads", grads, (K, B, N), dt, dev)
    check_opmath("weights", weights, (B, K), dt, dev)
    check_opmath("h", h, (B,), dt, dev)
    check_opmath("o", o, (B,), dt, dev)
    return B, N, K


def epd_step_fwd(x: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
                 h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """y = x + (1 + o) * h * sum_k weights[:, k] * grads[k]  ([B, N], x's dtype)."""
    B, N, K = _check_step_inputs(x, grads, weights, h, o, "x")
    y = torch.empty_like(x)
    if B == 0 or N == 0:
        return y
    grid = lambda meta: (B * triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
    _epd_step_fwd_tuned[grid](x, grads, weights, h, o, y, B, N, K=K, enable_fp_fusion=FP_FUSION)
    return y


def epd_step_bwd(grad_out: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
                 h: torch.Tensor, o: torch.Tensor):
    """Returns (grad_grads [K, B, N] in the data dtype, dots [B, K] in opmath)."""
    B, N, K = _check_step_inputs(grad_out, grads, weights, h, o, "grad_out")
    acc = opmath_dtype(grad_out.dtype)
    grad_grads = torch.empty_like(grads)
    if B == 0 or N == 0:
        grad_grads.zero_()
        return grad_grads, torch.zeros((B, K), dtype=acc, device=grad_out.device)
    nsub = triton.cdiv(N, SUB)
    # Every slot is written exactly once whatever S is tuned to: no zero-fill needed.
    partial = torch.empty((B, nsub, K), dtype=acc, device=grad_out.device)
    grid = lambda meta: (B * triton.cdiv(N, meta["S"] * SUB),)  # noqa: E731
    _epd_step_bwd_tuned[grid](grad_out, grads, weights, h, o, grad_grads, partial,
                              B, N, nsub, K=K, SUB=SUB,
                              enable_fp_fusion=FP_FUSION)
    dots = partial.sum(dim=1)  # [B, K]; a fresh tensor, never a view of the scratch
    return grad_grads, dots
