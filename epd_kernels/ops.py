"""The fused EPD ops (`epd_step`, `branch_states`, `branch_states_into`): argument checks,
canonical arguments, and the fake kernels and autograd of the `torch.ops.epd_kernels` ops.

Schemas and CPU kernels: `csrc/ops.cpp`; CUDA kernels: `backends.py`; without the library,
`reference.py` (one warning). Canonical arguments: `[K]` weights with a float (or 0-d) step
factor make the tensor one row `[1, B*N]`; `[B]` h/o or `[B, K]` weights keep one row per
sample. Float h and o fold into the float `alpha = (1 + o) * h`, tensor ones into the
differentiable `scale`. A captured CUDA graph bakes floats in: pass 0-d or [B] device
tensors for h and o when replays must see new values.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import backends
from . import reference as _ref
from .reference import opmath_dtype

__all__ = ["epd_step", "branch_states", "branch_states_into"]

Scalar = Union[float, int, torch.Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# the compiled library, or the reference when it did not build
_OPS = torch.ops.epd_kernels if backends.LIBRARY_LOADED else _ref


def _ops():
    if not backends.LIBRARY_LOADED:
        backends._warn_reference(
            f"the compiled extension did not load ({backends.library_error()}); reinstall "
            "with `pip install --no-build-isolation .`")
    return _OPS


def _register_fake_and_autograd():
    lib = "epd_kernels::"
    fakes = {
        "epd_step": lambda x, grads, weights, scale, alpha: torch.empty_like(x),
        "epd_step_out": lambda x, grads, weights, scale, alpha, out: None,
        "epd_step_backward": lambda grad_out, grads, weights, scale, alpha: (
            torch.empty_like(grads), weights.new_empty((grad_out.shape[0], grads.shape[0]))),
        "branch_states": lambda x, d, c: x.new_empty((c.shape[-1],) + tuple(x.shape)),
        "branch_states_out": lambda x, d, c, out: None,
        "branch_states_backward": lambda grad_out, d, c: (
            torch.empty_like(d), torch.empty_like(d), c.new_empty((d.shape[0], c.shape[-1]))),
    }
    for name, fake in fakes.items():
        torch.library.register_fake(lib + name, fake)
    torch.library.register_autograd(lib + "epd_step", _epd_step_grad,
                                    setup_context=_epd_step_setup)
    torch.library.register_autograd(lib + "branch_states", _branch_states_grad,
                                    setup_context=_branch_states_setup)
    for name in ("epd_step_backward", "branch_states_backward"):
        torch.library.register_autograd(lib + name, _no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)


def _epd_step_setup(ctx, inputs, output):
    _, grads, weights, scale, alpha = inputs
    ctx.save_for_backward(grads, weights, scale)
    ctx.alpha = alpha


def _epd_step_grad(ctx, grad_out):
    grads, weights, scale = ctx.saved_tensors
    need_x, need_g, need_w, need_s, _ = ctx.needs_input_grad
    alpha = ctx.alpha
    grad_x = grad_out if need_x else None
    if not (need_g or need_w or need_s):
        return grad_x, None, None, None, None
    # One fused pass gives grad_grads and dots[b, k] = <grad_out_b, grads_kb>; the rest
    # is [B, K]-sized arithmetic.
    grad_grads, dots = torch.ops.epd_kernels.epd_step_backward(
        grad_out.contiguous(), grads, weights, scale, alpha)
    grad_w = grad_s = None
    if need_w:
        factor = alpha if scale is None else (alpha * scale).reshape(-1, 1)
        grad_w = factor * dots
        if weights.dim() == 1:
            grad_w = grad_w.sum(0)
    if need_s:
        grad_s = alpha * (weights * dots).sum(-1)
        if scale.dim() == 0:
            grad_s = grad_s.sum()
    return grad_x, (grad_grads if need_g else None), grad_w, grad_s, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "epd_kernels: second-order gradients of epd_step / branch_states are not supported "
        "(the backward kernels are not differentiable). Use first-order gradients only.")


def _branch_states_setup(ctx, inputs, output):
    _, d, c = inputs
    ctx.save_for_backward(d, c)


def _branch_states_grad(ctx, grad_out):
    d, c = ctx.saved_tensors
    gx, gd, gc = torch.ops.epd_kernels.branch_states_backward(grad_out.contiguous(), d, c)
    if c.dim() == 1:
        gc = gc.sum(0)
    return tuple(g if need else None for g, need in zip((gx, gd, gc), ctx.needs_input_grad))


if backends.LIBRARY_LOADED:
    _register_fake_and_autograd()

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


def _check_x(x):
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: shape [B, ...], got a 0-d tensor")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _row_scalar(name, value, batch, device, acc):
    """A float, or a 0-d or [B] tensor h / o checked and cast to `acc`."""
    if _is_number(value):
        return float(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a tensor of shape [B]={batch}, "
                        f"got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    _check_device(device, **{name: value})
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor of shape "
                         f"[{batch}] (one per sample), got shape {list(value.shape)}")
    return value.to(acc).contiguous()


def _stack_grads(grads, x):
    if not isinstance(grads, (list, tuple)):
        _check_tensor("grads", grads)
        return grads
    if len(grads) == 0:
        raise ValueError("grads is an empty list: need at least one branch (K >= 1)")
    for i, g in enumerate(grads):
        _check_tensor(f"grads[{i}]", g)
        if g.shape != x.shape:
            raise ValueError(f"grads[{i}] has shape {list(g.shape)} but x has shape "
                             f"{list(x.shape)}: each branch gradient must match x")
    return torch.stack(list(grads))


def _check_step_shapes(x, grads, weights):
    if grads.dtype != x.dtype:
        raise TypeError(f"grads has dtype {grads.dtype} but x has {x.dtype}: they must match")
    if grads.dim() != x.dim() + 1:
        raise ValueError(f"grads must have shape [K, *x.shape] = [K, "
                         f"{', '.join(map(str, x.shape))}], got {list(grads.shape)}")
    K, B = grads.shape[0], x.shape[0]
    if K == 0:
        raise ValueError("grads has K = 0 branches: need at least one")
    if grads.shape[1] != B:
        raise ValueError(f"batch mismatch: grads has batch {grads.shape[1]} but x has {B} "
                         f"(grads {list(grads.shape)}, x {list(x.shape)})")
    if grads.shape[2:] != x.shape[1:]:
        raise ValueError(f"trailing shape mismatch: grads {list(grads.shape)} has per-sample "
                         f"shape {list(grads.shape[2:])}, x {list(x.shape)} has "
                         f"{list(x.shape[1:])}")
    if weights.shape not in ((K,), (B, K)):
        raise ValueError(f"weights must have shape [K]=[{K}] or [B, K]=[{B}, {K}], "
                         f"got {list(weights.shape)}")


def _rows(x, uniform):
    """x as the canonical [rows, N]: one row when the coefficients are uniform."""
    if uniform:
        return x.reshape(1, x.numel())
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _canonical_step_args(x, grads, weights, h, o):
    _check_x(x)
    grads = _stack_grads(grads, x)
    _check_tensor("weights", weights)
    _check_device(x.device, grads=grads, weights=weights)
    _check_step_shapes(x, grads, weights)
    B, acc = x.shape[0], opmath_dtype(x.dtype)
    h, o = _row_scalar("h", h, B, x.device, acc), _row_scalar("o", o, B, x.device, acc)
    if isinstance(h, float) and isinstance(o, float):  # alpha * scale = (1 + o) * h
        scale, alpha = None, (1.0 + o) * h
    else:
        scale, alpha = (1.0 + o) * h, 1.0
    x2 = _rows(x, weights.dim() == 1 and (scale is None or scale.dim() == 0))
    g2 = grads.reshape((grads.shape[0],) + tuple(x2.shape))
    return x2.contiguous(), g2.contiguous(), weights.to(acc).contiguous(), scale, alpha


def _canonical_branch_args(x, d, c):
    _check_x(x)
    _check_tensor("d", d)
    _check_tensor("c", c)
    _check_device(x.device, d=d, c=c)
    if d.shape != x.shape:
        raise ValueError(f"d has shape {list(d.shape)} but x has {list(x.shape)}: they must match")
    if d.dtype != x.dtype:
        raise TypeError(f"d has dtype {d.dtype} but x has {x.dtype}: they must match")
    B = x.shape[0]
    if c.dim() == 1 and c.shape[0] == 0:
        raise ValueError("c has K = 0 branch offsets: need at least one")
    if not (c.dim() == 1 or (c.dim() == 2 and c.shape[0] == B and c.shape[1] > 0)):
        raise ValueError(f"c must have shape [K] or [B, K] with B={B}, got {list(c.shape)}")
    x2 = _rows(x, c.dim() == 1)
    return (x2.contiguous(), d.reshape(x2.shape).contiguous(),
            c.to(opmath_dtype(x.dtype)).contiguous())


# --------------------------------------------------------------------------------------
# out= checks


def _byte_span(t):
    """[first, last) byte addresses that the elements of t can occupy."""
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _overlaps(a, b):
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _check_out(op, out, shape, x, may_be_x, **inputs):
    """`out` must be a tensor of `shape` and x's dtype/device, outside autograd, and
    overlap none of `inputs` (and x only when `may_be_x` and it is x itself)."""
    _check_tensor("out", out)
    _check_device(x.device, out=out)
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype} but x has {x.dtype}: they must match")
    if shape is not None and tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out must have shape {list(shape)}, got {list(out.shape)}")
    if torch.is_grad_enabled():
        for name, t in dict(inputs, x=x, out=out).items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"{op}(out=...) does not take part in autograd, but {name} requires "
                    f"grad: call {op} without out=, or under torch.no_grad()")
    if torch.compiler.is_compiling():
        return
    is_x = (out.data_ptr(), out.shape, out.stride()) == (x.data_ptr(), x.shape, x.stride())
    if _overlaps(out, x) and not (may_be_x and is_x):
        raise ValueError(f"{op}: out overlaps x; it must be "
                         f"{'x itself or ' if may_be_x else ''}separate memory")
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and _overlaps(out, t):
            raise ValueError(f"{op}: out overlaps {name}; it must be separate memory")


# --------------------------------------------------------------------------------------
# public functions


def epd_step(x: torch.Tensor, grads: Union[torch.Tensor, Sequence[torch.Tensor]],
             weights: torch.Tensor, h: Scalar, o: Scalar = 0.0, *,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One fused EPD update: ``x + (1 + o) * h * sum_k weights[..., k] * grads[k]``.

    x ``[B, ...]`` (float16, bfloat16, float32 or float64); grads ``[K, B, ...]`` or K tensors
    shaped like x; weights ``[K]`` or ``[B, K]``; h (``t_{n+1} - t_n``) and o a float, 0-d
    or ``[B]`` tensor. ``out=`` (x's shape, dtype and device, any strides) may be x itself
    but must not overlap grads, weights, h or o; it is outside autograd.

    Accumulates in float32 (float64 for float64 data) and rounds once to x's dtype.
    Differentiable in every tensor input (first order). float16 results beyond its range
    become +-inf, as a cast of the exact result would; NaN and inf propagate."""
    args = _canonical_step_args(x, grads, weights, h, o)
    ops = _ops()
    if out is None:
        return ops.epd_step(*args).view(x.shape)
    _check_out("epd_step", out, x.shape, x, True, grads=grads if isinstance(
        grads, torch.Tensor) else None, weights=weights, h=h, o=o)
    if out.is_contiguous():
        ops.epd_step_out(*args, out.view(args[0].shape))
    else:
        out.copy_(ops.epd_step(*args).view(x.shape))
    return out


def branch_states(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor, *,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Branch starting points ``out[k] = x + c[..., k] * d``, shape ``[K, *x.shape]``; ``c``
    ``[K]`` or ``[B, K]``. Differentiable; ``out=`` as in `branch_states_into`."""
    if out is not None:
        return branch_states_into(x, d, c, out)
    x2, d2, c2 = _canonical_branch_args(x, d, c)
    return _ops().branch_states(x2, d2, c2).view((c2.shape[-1],) + tuple(x.shape))


def branch_states_into(x: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """Writes ``branch_states(x, d, c)`` into a contiguous buffer of K*B*N elements (e.g. the
    static ``[K*B, ...]`` input of a captured denoiser call) that does not overlap x, d or c.
    No autograd: with grad mode on, inputs that require grad are refused."""
    x2, d2, c2 = _canonical_branch_args(x, d, c)
    size = c2.shape[-1] * x2.numel()
    _check_out("branch_states", out, None, x, False, d=d, c=c)
    if not out.is_contiguous() or out.numel() != size:
        raise ValueError(f"out must be contiguous with K*B*N = {size} elements, got shape "
                         f"{list(out.shape)}{'' if out.is_contiguous() else ' (non-contiguous)'}")
    _ops().branch_states_out(x2, d2, c2, out)
    return out
