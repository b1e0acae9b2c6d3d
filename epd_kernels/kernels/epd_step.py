"""Fused EPD step: forward and backward kernels and their launchers.

Forward (docs/design.md, "EPD step"), with f[b] = alpha * scale[b] (scale absent: 1):
    y[b, n] = x[b, n] + f[b] * sum_k weights[b, k] * grads[k, b, n]
Backward, one pass over grads and grad_out:
    grad_grads[k, b, n] = f[b] * weights[b, k] * grad_out[b, n]
    dots[b, k]          = sum_n grad_out[b, n] * grads[k, b, n]

weights is [K] (row stride 0) or [B, K]; scale 0-d (stride 0), [B], or absent; alpha an
fp64 argument (a Python float is fp32 in Triton). Tensor coefficients are read inside the
kernel, so a captured graph sees in-place updates; a float alpha is baked in. Data is loaded
and stored in its dtype T, arithmetic is in opmath (the dtype of weights and scale).
"""
import torch
import triton
import triton.language as tl

from ._common import (autotuned_1d, autotuned_2d, check_canonical, launch_1d, launch_reduce,
                      row_tile_1d, row_tile_2d)

__all__ = ["epd_step", "epd_step_out", "epd_step_backward"]


@triton.jit
def _row_factor(alpha, s_ptr, b, s_stride, acc_ty: tl.constexpr, HAS_SCALE: tl.constexpr):
    f = tl.full([], alpha, acc_ty)  # alpha: an fp64 scalar, or a Python float (interpreter)
    if HAS_SCALE:
        f = f * tl.load(s_ptr + b * s_stride)
    return f


@triton.jit
def _epd_step_fwd_kernel(
    x_ptr,      # [B, N]          T
    g_ptr,      # [K, B, N]       T
    w_ptr,      # [K] or [B, K]   opmath
    s_ptr,      # [] or [B]       opmath (unused without HAS_SCALE)
    y_ptr,      # [B, N]          T
    alpha: tl.float64,
    B,
    N,
    w_stride,   # 0 for [K] weights, K for [B, K]
    s_stride,   # 0 for a 0-d scale, 1 for [B]
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, base, lanes, mask = row_tile_1d(N, BLOCK)
    acc_ty: tl.constexpr = w_ptr.dtype.element_ty
    f = _row_factor(alpha, s_ptr, b, s_stride, acc_ty, HAS_SCALE)
    w_row = w_ptr + b * w_stride
    plane = B * N  # elements between branches (int64: b is)
    # Branch 0 initialises the accumulator (no fma with a zero addend), then K - 1 fmas.
    g = tl.load(g_ptr + base + lanes, mask=mask, other=0.0)
    acc = tl.load(w_row) * g.to(acc_ty)
    for k in tl.static_range(1, K):
        g = tl.load(g_ptr + (k * plane + base) + lanes, mask=mask, other=0.0)
        acc += tl.load(w_row + k) * g.to(acc_ty)
    x = tl.load(x_ptr + base + lanes, mask=mask, other=0.0)
    y = x.to(acc_ty) + f * acc
    tl.store(y_ptr + base + lanes, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epd_step_bwd_kernel(
    go_ptr,     # [B, N]          T      grad_out
    g_ptr,      # [K, B, N]       T      grads
    w_ptr,      # [K] or [B, K]   opmath
    s_ptr,      # [] or [B]       opmath
    gg_ptr,     # [K, B, N]       T      grad_grads (out)
    alpha: tl.float64,
    B,
    N,
    w_stride,
    s_stride,
    part_ptr,   # [B, NSUB, K]    opmath partial dots (out), NSUB = cdiv(N, SUB)
    NSUB,
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SUB: tl.constexpr,
    S: tl.constexpr,
):
    b, base, lanes, mask, slot, slot_mask = row_tile_2d(N, NSUB, S, SUB)
    acc_ty: tl.constexpr = w_ptr.dtype.element_ty
    f = _row_factor(alpha, s_ptr, b, s_stride, acc_ty, HAS_SCALE)
    w_row = w_ptr + b * w_stride
    plane = B * N
    gy = tl.load(go_ptr + base + lanes, mask=mask, other=0.0).to(acc_ty)
    part_base = part_ptr + (b * NSUB + slot) * K                        # [S]
    for k in tl.static_range(K):
        coef = f * tl.load(w_row + k)
        at = k * plane + base
        g = tl.load(g_ptr + at + lanes, mask=mask, other=0.0).to(acc_ty)
        tl.store(gg_ptr + at + lanes, (coef * gy).to(gg_ptr.dtype.element_ty), mask=mask)
        tl.store(part_base + k, tl.sum(gy * g, axis=1), mask=slot_mask)


_epd_step_fwd_tuned = autotuned_1d(_epd_step_fwd_kernel, ["N", "K", "HAS_SCALE"])
_epd_step_bwd_tuned = autotuned_2d(_epd_step_bwd_kernel, ["N", "K", "HAS_SCALE"])


def _coef_args(weights, scale, K):
    """(scale pointer tensor, s_stride) and the constexprs of a launch."""
    constexprs = dict(K=K, HAS_SCALE=scale is not None)
    if scale is None:
        return weights, 0, constexprs  # any valid pointer: never read
    return scale, (1 if scale.dim() == 1 else 0), constexprs


def epd_step_out(x, grads, weights, scale, alpha, out) -> None:
    """`epd_step` written into `out` ([B, N], contiguous; may be x itself, must not
    overlap grads, weights or scale: the op layer checks that)."""
    B, N, K, w_stride = check_canonical({"x": x, "out": out}, {"grads": grads}, "weights",
                                        weights, scale)
    s, s_stride, constexprs = _coef_args(weights, scale, K)
    launch_1d(_epd_step_fwd_tuned, B, N, x, x, grads, weights, s, out, float(alpha), B, N,
              w_stride, s_stride, **constexprs)


def epd_step(x: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
             scale, alpha: float) -> torch.Tensor:
    """y = x + alpha * scale * sum_k weights[..., k] * grads[k]  ([B, N], x's dtype)."""
    y = torch.empty_like(x)
    epd_step_out(x, grads, weights, scale, alpha, y)
    return y


def epd_step_backward(grad_out: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
                      scale, alpha: float):
    """Returns (grad_grads [K, B, N] in the data dtype, dots [B, K] in opmath)."""
    B, N, K, w_stride = check_canonical({"grad_out": grad_out}, {"grads": grads}, "weights",
                                        weights, scale)
    s, s_stride, constexprs = _coef_args(weights, scale, K)
    grad_grads = torch.empty_like(grads)
    dots = launch_reduce(_epd_step_bwd_tuned, B, N, grad_out, grad_out, grads, weights, s,
                         grad_grads, float(alpha), B, N, w_stride, s_stride, **constexprs)
    return grad_grads, dots
