"""Fused EPD step: forward and backward kernels and their launchers.

Forward (docs/design.md, "EPD step"), with f[b] = alpha * scale[b] (scale absent: 1):
    y[b, n] = x[b, n] + f[b] * sum_k weights[b, k] * grads[k, b, n]

Backward, one pass over grads and grad_out:
    grad_grads[k, b, n] = f[b] * weights[b, k] * grad_out[b, n]
    dots[b, k]          = sum_n grad_out[b, n] * grads[k, b, n]

weights is [K] (row stride 0: the same values for every row) or [B, K]; scale is a
0-d tensor (stride 0), a [B] tensor, or absent; alpha is a float kernel argument. So a
step with uniform coefficients reads K + 1 scalars per program and moves no [B] or
[B, K] tensors. Tensor coefficients are read from device memory inside the kernel, so a
captured CUDA graph replays correctly after they are updated in place; a float alpha is
baked into the capture.

Data (x, grads, y, grad_out, grad_grads) is loaded and stored in its own dtype T; all
arithmetic is done in the opmath dtype (float64 for float64 data, float32 otherwise),
which is the dtype of weights and scale. alpha is an fp64 argument (a Python float is
fp32 by default in Triton, which would round it for float64 data).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    FP_FUSION,
    SUB,
    configs_1d,
    configs_2d,
    device_guard,
    opmath_dtype,
    row_tile_1d,
    row_tile_2d,
)

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
    part_ptr,   # [B, NSUB, K]    opmath partial dots (out), NSUB = cdiv(N, SUB)
    alpha: tl.float64,
    B,
    N,
    NSUB,
    w_stride,
    s_stride,
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SUB: tl.constexpr,
    S: tl.constexpr,
):
    # One program covers S consecutive slices of SUB elements of one row b.
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


_epd_step_fwd_tuned = triton.autotune(configs=configs_1d(), key=["N", "K", "HAS_SCALE"])(
    _epd_step_fwd_kernel)
_epd_step_bwd_tuned = triton.autotune(configs=configs_2d(), key=["N", "K", "HAS_SCALE"])(
    _epd_step_bwd_kernel)


def _coef_args(weights, scale, lead):
    """(w_stride, scale pointer tensor, s_stride, HAS_SCALE) for a launch."""
    acc = opmath_dtype(lead.dtype)
    if weights.dtype != acc or not weights.is_contiguous():
        raise TypeError(f"weights must be a contiguous {acc} tensor, got {weights.dtype}")
    w_stride = weights.shape[-1] if weights.dim() == 2 else 0
    if scale is None:
        return w_stride, weights, 0, False  # any valid pointer: never read
    if scale.dtype != acc or scale.dim() > 1:
        raise TypeError(f"scale must be a 0-d or [B] {acc} tensor, got {scale.dtype} "
                        f"{list(scale.shape)}")
    return w_stride, scale, (1 if scale.dim() == 1 else 0), True


def _check(lead, grads, name):
    if lead.dim() != 2 or grads.dim() != 3 or grads.shape[1:] != lead.shape:
        raise ValueError(f"{name} must be [B, N] and grads [K, B, N], got "
                         f"{list(lead.shape)} and {list(grads.shape)}")
    if grads.dtype != lead.dtype or not (lead.is_contiguous() and grads.is_contiguous()):
        raise ValueError(f"{name} and grads must be contiguous with one dtype")
    if grads.shape[0] < 1:
        raise ValueError("grads has K = 0 branches: need at least one")


def _launch_fwd(x, grads, weights, scale, alpha, y):
    _check(x, grads, "x")
    B, N = x.shape
    w_stride, s, s_stride, has_scale = _coef_args(weights, scale, x)
    if B == 0 or N == 0:
        return
    grid = lambda meta: (B * triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
    with device_guard(x):
        _epd_step_fwd_tuned[grid](x, grads, weights, s, y, float(alpha), B, N, w_stride,
                                  s_stride, K=grads.shape[0], HAS_SCALE=has_scale,
                                  enable_fp_fusion=FP_FUSION)


def epd_step(x: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
             scale, alpha: float) -> torch.Tensor:
    """y = x + alpha * scale * sum_k weights[..., k] * grads[k]  ([B, N], x's dtype)."""
    y = torch.empty_like(x)
    _launch_fwd(x, grads, weights, scale, alpha, y)
    return y


def epd_step_out(x, grads, weights, scale, alpha, out) -> None:
    """`epd_step` written into `out` ([B, N], contiguous; may be x itself, must not
    overlap grads, weights or scale: the op layer checks that)."""
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {list(x.shape)}")
    _launch_fwd(x, grads, weights, scale, alpha, out)


def epd_step_backward(grad_out: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
                      scale, alpha: float):
    """Returns (grad_grads [K, B, N] in the data dtype, dots [B, K] in opmath)."""
    _check(grad_out, grads, "grad_out")
    B, N = grad_out.shape
    K = grads.shape[0]
    w_stride, s, s_stride, has_scale = _coef_args(weights, scale, grad_out)
    acc = opmath_dtype(grad_out.dtype)
    grad_grads = torch.empty_like(grads)
    if B == 0 or N == 0:
        grad_grads.zero_()
        return grad_grads, torch.zeros((B, K), dtype=acc, device=grad_out.device)
    nsub = triton.cdiv(N, SUB)
    # Every slot is written exactly once whatever S is tuned to: no zero-fill needed.
    partial = torch.empty((B, nsub, K), dtype=acc, device=grad_out.device)
    grid = lambda meta: (B * triton.cdiv(N, meta["S"] * SUB),)  # noqa: E731
    with device_guard(grad_out):
        _epd_step_bwd_tuned[grid](grad_out, grads, weights, s, grad_grads, partial,
                                  float(alpha), B, N, nsub, w_stride, s_stride, K=K,
                                  HAS_SCALE=has_scale, SUB=SUB,
                                  enable_fp_fusion=FP_FUSION)
    dots = partial.sum(dim=1)  # [B, K]; a fresh tensor, never a view of the scratch
    return grad_grads, dots
