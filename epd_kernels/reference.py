"""Plain-PyTorch versions of every op: the oracle for tests and the CPU fallback.

Every function here works for any floating dtype (float64 included) and any strides,
and is written as the formula in DESIGN.md section 1, with no fusion tricks, so that a
reader can check it against the paper. The kernels in `csrc/` and `kernels/` must agree
with these to per-dtype tolerances.

Canonical shapes (the op layer in `ops.py` brings user inputs to these):
    x       [B, N]       state, flattened per sample
    grads   [K, B, N]    K branch gradients
    weights [B, K]       convex weights (any real values are accepted here)
    h, o    [B]          step size and scale perturbation
    c       [B, K]       branch offsets: branch k starts at x + c[:, k] * d
"""
from __future__ import annotations

import torch

__all__ = [
    "opmath_dtype",
    "epd_step",
    "epd_step_backward",
    "branch_states",
    "branch_states_backward",
]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def epd_step(x, grads, weights, h, o):
    """x_next = x + (1 + o) * h * sum_k weights_k * grads_k, accumulated in opmath."""
    acc = opmath_dtype(x.dtype)
    scale = ((1.0 + o.to(acc)) * h.to(acc))  # [B]
    combo = torch.einsum("bk,kbn->bn", weights.to(acc), grads.to(acc))
    return (x.to(acc) + scale[:, None] * combo).to(x.dtype)


def epd_step_backward(grad_out, grads, weights, h, o):
    """Returns (grad_grads [K,B,N] in the data dtype, dots [B,K] in opmath).

    dots[b, k] = sum_n grad_out[b, n] * grads[k, b, n]: the partial reduction from which
    the op layer forms grad_weights, grad_h and grad_o (grad_x is grad_out itself).
    """
    acc = opmath_dtype(grads.dtype)
    scale = (1.0 + o.to(acc)) * h.to(acc)
    coef = scale[:, None] * weights.to(acc)  # [B, K]
    gy = grad_out.to(acc)
    grad_grads = (coef.t()[:, :, None] * gy[None]).to(grads.dtype).contiguous()
    dots = torch.einsum("bn,kbn->bk", gy, grads.to(acc))
    return grad_grads, dots


def branch_states(x, d, c):
    """out[k, b, n] = x[b, n] + c[b, k] * d[b, n]  ->  [K, B, N] in x's dtype."""
    acc = opmath_dtype(x.dtype)
    out = x.to(acc)[None] + c.to(acc).t()[:, :, None] * d.to(acc)[None]
    return out.to(x.dtype).contiguous()


def branch_states_backward(grad_out, d, c):
    """Returns (grad_x [B,N], grad_d [B,N], grad_c [B,K] in opmath) for branch_states."""
    acc = opmath_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    grad_x = g.sum(0)
    grad_d = torch.einsum("bk,kbn->bn", c.to(acc), g)
    grad_c = torch.einsum("kbn,bn->bk", g, d.to(acc))
    return grad_x.to(grad_out.dtype), grad_d.to(grad_out.dtype), grad_c
