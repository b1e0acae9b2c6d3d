"""The fused EPD ops: torch.library registration, input checks, autograd, dispatch.

Public entry points (user-facing shapes):

    epd_step(x, grads, weights, h, o=0.0)        x + (1 + o) * h * sum_k weights_k * grads_k
    branch_states(x, d, c)                       [K, B, ...]: x + c_k * d for each k
    branch_states_into(x, d, c, out)             same, written into a static buffer

Each is a thin Python function that validates and canonicalises its arguments (flatten
to [B, N], weights to [B, K], scalars to [B] tensors in the accumulation dtype), then
calls one `torch.ops.epd_kernels.*` custom op. The canonicalisation uses differentiable
torch ops, so gradients reach the user's original tensors (a [K] weight vector gets the
batch-summed gradient). Scalars become device tensors, never Python constants in a
kernel, so a CUDA graph captured around a step stays valid when they change.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch

from . import backends
from .reference import opmath_dtype

__all__ = ["epd_step", "branch_states", "branch_states_into"]

Scalar = Union[float, int, torch.Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------------------
# custom ops on canonical inputs


@torch.library.custom_op("epd_kernels::epd_step", mutates_args=())
def _epd_step_op(x: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
                 h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return backends.for_device(x.device).epd_step_fwd(x, grads, weights, h, o)


@_epd_step_op.register_fake
def _(x, grads, weights, h, o):
    return torch.empty_like(x)


@torch.library.custom_op("epd_kernels::epd_step_backward", mutates_args=())
def _epd_step_backward_op(grad_out: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor,
                          h: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.for_device(grads.device).epd_step_bwd(grad_out, grads, weights, h, o)


@_epd_step_backward_op.register_fake
def _(grad_out, grads, weights, h, o):
    return torch.empty_like(grads), weights.new_empty(weights.shape)


def _epd_step_setup(ctx, inputs, output):
    _, grads, weights, h, o = inputs
    ctx.save_for_backward(grads, weights, h, o)


def _epd_step_grad(ctx, grad_out):
    grads, weights, h, o = ctx.saved_tensors
    need_x, need_g, need_w, need_h, need_o = ctx.needs_input_grad
    grad_x = grad_out if need_x else None
    if not (need_g or need_w or need_h or need_o):
        return grad_x, None, None, None, None
    # One fused pass gives grad_grads and dots[b, k] = <grad_out_b, grads_kb>; the rest is
    # [B, K]-sized arithmetic.
    grad_grads, dots = _epd_step_backward_op(grad_out.contiguous(), grads, weights, h, o)
    one_plus_o = 1.0 + o
    scale = one_plus_o * h
    grad_w = scale[:, None] * dots if need_w else None
    wdot = (weights * dots).sum(1)
    grad_h = one_plus_o * wdot if need_h else None
    grad_o = h * wdot if need_o else None
    return grad_x, (grad_grads if need_g else None), grad_w, grad_h, grad_o


_epd_step_op.register_autograd(_epd_step_grad, setup_context=_epd_step_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "epd_kernels: second-order gradients of epd_step / branch_states are not supported "
        "(the backward kernels are not differentiable). Use first-order gradients only."
    )


def _setup_nothing(ctx, inputs, output):
    pass


_epd_step_backward_op.register_autograd(_no_double_backward, setup_context=_setup_nothing)


@torch.library.custom_op("epd_kernels::branch_states", mutates_args=())
def _branch_states_op(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return backends.for_device(x.device).branch_states(x, d, c)


@_branch_states_op.register_fake
def _(x, d, c):
    return x.new_empty((c.shape[1],) + tuple(x.shape))


@torch.library.custom_op("epd_kernels::branch_states_backward", mutates_args=())
def _branch_states_backward_op(grad_out: torch.Tensor, d: torch.Tensor,
                               c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.for_device(d.device).branch_states_bwd(grad_out, d, c)


@_branch_states_backward_op.register_fake
def _(grad_out, d, c):
    return torch.empty_like(d), torch.empty_like(d), c.new_empty(c.shape)


def _branch_states_setup(ctx, inputs, output):
    _, d, c = inputs
    ctx.save_for_backward(d, c)


def _branch_states_grad(ctx, grad_out):
    d, c = ctx.saved_tensors
    gx, gd, gc = _branch_states_backward_op(grad_out.contiguous(), d, c)
    nx, nd, nc = ctx.needs_input_grad
    return (gx if nx else None), (gd if nd else None), (gc if nc else None)


_branch_states_op.register_autograd(_branch_states_grad, setup_context=_branch_states_setup)
_branch_states_backward_op.register_autograd(_no_double_backward, setup_context=_setup_nothing)


@torch.library.custom_op("epd_kernels::branch_states_out", mutates_args=("out",))
def _branch_states_out_op(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                          out: torch.Tensor) -> None:
    backends.for_device(x.device).branch_states_out(x, d, c, out)


@_branch_states_out_op.register_fake
def _(x, d, c, out):
    return None


# --------------------------------------------------------------------------------------
# argument checking and canonicalisation


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_device(device, **named):
    for name, t in named.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but x is on {device}: all tensors must share a device")


def _as_batch_scalar(name, value, batch, device, acc):
    """A float, 0-d tensor or [B] tensor -> a [B] tensor of dtype `acc` on `device`."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape [B]={batch}, "
                        f"got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point()):
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        _check_device(device, **{name: value})
        if value.dim() == 0:
            return value.to(acc).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor of shape "
                             f"[{batch}] (one per sample), got shape {list(value.shape)}")
        return value.to(acc)
    return torch.full((batch,), float(value), dtype=acc, device=device)


def _stack_grads(grads, x):
    if isinstance(grads, (list, tuple)):
        if len(grads) == 0:
            raise ValueError("grads is an empty list: need at least one branch (K >= 1)")
        for i, g in enumerate(grads):
            _check_tensor(f"grads[{i}]", g)
            if g.shape != x.shape:
                raise ValueError(f"grads[{i}] has shape {list(g.shape)} but x has shape "
                                 f"{list(x.shape)}: each branch gradient must match x")
        return torch.stack(list(grads))
    _check_tensor("grads", grads)
    return grads


def _canonical_step_args(x, grads, weights, h, o):
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: shape [B, ...], got a 0-d tensor")
    grads = _stack_grads(grads, x)
    _check_tensor("weights", weights)
    _check_device(x.device, grads=grads, weights=weights)
    if grads.dtype != x.dtype:
        raise TypeError(f"grads has dtype {grads.dtype} but x has {x.dtype}: they must match")
    if grads.dim() != x.dim() + 1:
        raise ValueError(f"grads must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}]"
                         f", got {list(grads.shape)}")
    K, B = grads.shape[0], x.shape[0]
    if K == 0:
        raise ValueError("grads has K = 0 branches: need at least one")
    if grads.shape[1] != B:
        raise ValueError(f"batch mismatch: grads has batch {grads.shape[1]} but x has {B} "
                         f"(grads {list(grads.shape)}, x {list(x.shape)})")
    if grads.shape[2:] != x.shape[1:]:
        raise ValueError(f"trailing shape mismatch: grads {list(grads.shape)} has per-sample "
                         f"shape {list(grads.shape[2:])}, x {list(x.shape)} has {list(x.shape[1:])}")
    acc = opmath_dtype(x.dtype)
    if weights.dim() == 1 and weights.shape[0] == K:
        w = weights.to(acc)[None].expand(B, K)
    elif weights.dim() == 2 and tuple(weights.shape) == (B, K):
        w = weights.to(acc)
    else:
        raise ValueError(f"weights must have shape [K]=[{K}] or [B, K]=[{B}, {K}], "
                         f"got {list(weights.shape)}")
    hb = _as_batch_scalar("h", h, B, x.device, acc)
    ob = _as_batch_scalar("o", o, B, x.device, acc)
    N = math.prod(x.shape[1:])
    return (x.reshape(B, N).contiguous(), grads.reshape(K, B, N).contiguous(),
            w.contiguous(), hb.contiguous(), ob.contiguous())


# --------------------------------------------------------------------------------------
# public functions


def epd_step(x: torch.Tensor, grads: Union[torch.Tensor, Sequence[torch.Tensor]],
             weights: torch.Tensor, h: Scalar, o: Scalar = 0.0) -> torch.Tensor:
    """One fused EPD update: ``x + (1 + o) * h * sum_k weights[..., k] * grads[k]``.

    Args:
        x: state ``[B, ...]`` (float16, bfloat16, float32 or float64).
        grads: ``[K, B, ...]`` branch gradients, or a list of K tensors shaped like x.
        weights: ``[K]`` (shared by the batch) or ``[B, K]``; any real values.
        h: step size ``t_{n+1} - t_n``: a float, a 0-d tensor or a ``[B]`` tensor.
        o: scale perturbation, same forms as h.

    Accumulates in float32 (float64 for float64 data); returns x's dtype and shape.
    Differentiable in every tensor input (first order).
    """
    x2, g2, w2, h2, o2 = _canonical_step_args(x, grads, weights, h, o)
    return _epd_step_op(x2, g2, w2, h2, o2).view(x.shape)


def _canonical_branch_args(x, d, c):
    _check_tensor("x", x)
    _check_tensor("d", d)
    _check_tensor("c", c)
    _check_device(x.device, d=d, c=c)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: shape [B, ...], got a 0-d tensor")
    if d.shape != x.shape:
        raise ValueError(f"d has shape {list(d.shape)} but x has {list(x.shape)}: they must match")
    if d.dtype != x.dtype:
        raise TypeError(f"d has dtype {d.dtype} but x has {x.dtype}: they must match")
    B = x.shape[0]
    acc = opmath_dtype(x.dtype)
    if c.dim() == 1:
        if c.shape[0] == 0:
            raise ValueError("c has K = 0 branch offsets: need at least one")
        cb = c.to(acc)[None].expand(B, c.shape[0])
    elif c.dim() == 2 and c.shape[0] == B and c.shape[1] > 0:
        cb = c.to(acc)
    else:
        raise ValueError(f"c must have shape [K] or [B, K] with B={B}, got {list(c.shape)}")
    N = math.prod(x.shape[1:])
    return x.reshape(B, N).contiguous(), d.reshape(B, N).contiguous(), cb.contiguous()


def branch_states(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Branch starting points ``out[k] = x + c[..., k] * d``, shape ``[K, *x.shape]``.

    ``c`` is ``[K]`` or ``[B, K]`` (EPD uses ``c_k = tau_k - t_n``). Differentiable in x, d, c.
    """
    x2, d2, c2 = _canonical_branch_args(x, d, c)
    return _branch_states_op(x2, d2, c2).view((c2.shape[1],) + tuple(x.shape))


def branch_states_into(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """Writes ``branch_states(x, d, c)`` into a contiguous buffer of K*B*N elements.

    The buffer is typically the static ``[K*B, ...]`` input of a batched (graph-captured)
    denoiser call. No autograd: use `branch_states` when gradients are needed.
    """
    x2, d2, c2 = _canonical_branch_args(x, d, c)
    _check_tensor("out", out)
    _check_device(x.device, out=out)
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype} but x has {x.dtype}: they must match")
    if not out.is_contiguous() or out.numel() != c2.shape[1] * x2.numel():
        raise ValueError(f"out must be contiguous with K*B*N = {c2.shape[1] * x2.numel()} "
                         f"elements, got shape {list(out.shape)}"
                         f"{'' if out.is_contiguous() else ' (non-contiguous)'}")
    _branch_states_out_op(x2, d2, c2, out)
    return out
