"""Plain-PyTorch versions of every op: the oracle for tests and the fallback backend.

Each function is the formula of docs/design.md ("EPD step") with no fusion tricks; the
kernels in `csrc/` and `kernels/` must agree with it to per-dtype tolerances. Arguments are
the canonical ones of the `torch.ops.epd_kernels` ops (`csrc/ops.cpp`):

    x       [B, N]          state, flattened per sample (or all samples as one row)
    grads   [K, B, N]       K branch gradients
    weights [K] or [B, K]   convex weights (any real values are accepted here)
    scale   None, [] or [B] per-row factor; with the float alpha the step is
                            y = x + alpha * scale * sum_k weights_k * grads_k
    c       [K] or [B, K]   branch offsets: branch k starts at x + c[..., k] * d
"""
from __future__ import annotations

import torch

__all__ = ["opmath_dtype", "epd_step", "epd_step_out", "epd_step_backward", "branch_states",
           "branch_states_out", "branch_states_backward"]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t, B, acc):
    """A [K] or [B, K] coefficient tensor as [B, K] in `acc`."""
    t = t.to(acc)
    return t.expand(B, t.shape[-1]) if t.dim() == 1 else t


def _factor(scale, alpha, B, acc, device):
    """alpha * scale as a [B] tensor in `acc`."""
    if scale is None:
        return torch.full((B,), float(alpha), dtype=acc, device=device)
    return (float(alpha) * scale.to(acc)).expand(B)


def epd_step(x, grads, weights, scale, alpha):
    """y = x + alpha * scale * sum_k weights_k * grads_k, accumulated in opmath."""
    acc = opmath_dtype(x.dtype)
    B = x.shape[0]
    f = _factor(scale, alpha, B, acc, x.device)
    combo = torch.einsum("bk,kbn->bn", _rows(weights, B, acc), grads.to(acc))
    return (x.to(acc) + f[:, None] * combo).to(x.dtype)


def epd_step_out(x, grads, weights, scale, alpha, out):
    out.copy_(epd_step(x, grads, weights, scale, alpha))


def epd_step_backward(grad_out, grads, weights, scale, alpha):
    """(grad_grads [K,B,N] in the data dtype, dots [B,K] in opmath); dots[b, k] = sum_n
    grad_out[b, n] * grads[k, b, n] gives the op layer the weights' and scale's gradients."""
    acc = opmath_dtype(grads.dtype)
    B = grad_out.shape[0]
    coef = _factor(scale, alpha, B, acc, grads.device)[:, None] * _rows(weights, B, acc)
    gy = grad_out.to(acc)
    grad_grads = (coef.t()[:, :, None] * gy[None]).to(grads.dtype).contiguous()
    dots = torch.einsum("bn,kbn->bk", gy, grads.to(acc))
    return grad_grads, dots


def branch_states(x, d, c):
    """out[k, b, n] = x[b, n] + c[b, k] * d[b, n]  ->  [K, B, N] in x's dtype."""
    acc = opmath_dtype(x.dtype)
    cb = _rows(c, x.shape[0], acc)
    out = x.to(acc)[None] + cb.t()[:, :, None] * d.to(acc)[None]
    return out.to(x.dtype).contiguous()


def branch_states_out(x, d, c, out):
    out.view(-1).copy_(branch_states(x, d, c).view(-1))


def branch_states_backward(grad_out, d, c):
    """Returns (grad_x [B,N], grad_d [B,N] in the data dtype, grad_c [B,K] in opmath)."""
    acc = opmath_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    cb = _rows(c, d.shape[0], acc)
    grad_x = g.sum(0)
    grad_d = torch.einsum("bk,kbn->bn", cb, g)
    grad_c = torch.einsum("kbn,bn->bk", g, d.to(acc))
    return grad_x.to(grad_out.dtype), grad_d.to(grad_out.dtype), grad_c
