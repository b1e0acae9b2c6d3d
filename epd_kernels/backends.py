"""Which raw-kernel implementation runs for a tensor: C++ (CPU), Triton (GPU), or reference.

Every backend exposes the same five raw functions on canonical, contiguous inputs (see
`reference.py` for shapes):

    epd_step_fwd(x, grads, weights, h, o) -> y
    epd_step_bwd(grad_out, grads, weights, h, o) -> (grad_grads, dots)
    branch_states(x, d, c) -> out
    branch_states_out(x, d, c, out) -> None
    branch_states_bwd(grad_out, d, c) -> (grad_x, grad_d, grad_c)

The choice is made per call from the tensor's device, unless forced with `set_backend`
or the environment variable EPD_KERNELS_BACKEND (tests use this to run the Triton kernels
under TRITON_INTERPRET=1 on CPU tensors, and to compare backends).
"""
from __future__ import annotations

import os
import types
import warnings
from typing import Optional

import torch

from . import reference as _ref

BACKENDS = ("auto", "cpp", "triton", "reference")

_forced: Optional[str] = None
_warned_fallback = False


def _load_cpp():
    from . import _extension

    if _extension.load() is None:  # loading registers torch.ops.epd_kernels_cpp
        return None
    ops = torch.ops.epd_kernels_cpp
    return types.SimpleNamespace(
        name="cpp",
        epd_step_fwd=ops.epd_step_fwd,
        epd_step_bwd=ops.epd_step_bwd,
        branch_states=ops.branch_states,
        branch_states_out=ops.branch_states_out,
        branch_states_bwd=ops.branch_states_bwd,
    )


def _load_triton():
    try:
        from . import kernels
    except ImportError:
        return None
    if not getattr(kernels, "HAS_TRITON", False):
        return None
    return types.SimpleNamespace(
        name="triton",
        epd_step_fwd=kernels.epd_step_fwd,
        epd_step_bwd=kernels.epd_step_bwd,
        branch_states=kernels.branch_states,
        branch_states_out=kernels.branch_states_out,
        branch_states_bwd=kernels.branch_states_bwd,
    )


def _reference_branch_states_out(x, d, c, out):
    out.view(-1).copy_(_ref.branch_states(x, d, c).view(-1))


REFERENCE = types.SimpleNamespace(
    name="reference",
    epd_step_fwd=_ref.epd_step,
    epd_step_bwd=_ref.epd_step_backward,
    branch_states=_ref.branch_states,
    branch_states_out=_reference_branch_states_out,
    branch_states_bwd=_ref.branch_states_backward,
)

_cache: dict = {}


def get(name: str):
    """The backend namespace called `name`, or None when it is not available here."""
    if name == "reference":
        return REFERENCE
    if name not in _cache:
        _cache[name] = {"cpp": _load_cpp, "triton": _load_triton}[name]()
    return _cache[name]


def available() -> list:
    return [n for n in ("cpp", "triton", "reference") if get(n) is not None]


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every call ("cpp", "triton", "reference"), or "auto"/None."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in (None, "auto") and get(name) is None:
        raise RuntimeError(f"backend {name!r} is not available on this installation")
    _forced = None if name == "auto" else name


def current_forced() -> Optional[str]:
    if _forced is not None:
        return _forced
    env = os.environ.get("EPD_KERNELS_BACKEND", "auto")
    return None if env in ("", "auto") else env


def for_device(device: torch.device):
    """The backend that runs tensors on `device`."""
    forced = current_forced()
    if forced is not None:
        backend = get(forced)
        if backend is None:
            raise RuntimeError(f"EPD_KERNELS_BACKEND={forced!r} is not available here")
        return backend
    preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else None
    backend = get(preferred) if preferred else None
    if backend is None:
        _warn_fallback(device, preferred)
        return REFERENCE
    return backend


def _warn_fallback(device, preferred):
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    if preferred == "cpp":
        from . import _extension

        why = f"the C++ extension is unavailable: {_extension.load_error()}"
    else:
        why = {
            "triton": "triton is not installed (`pip install triton`)",
            None: f"no fused kernel exists for device type {device.type!r}",
        }[preferred]
    warnings.warn(
        f"epd_kernels: using the plain-PyTorch reference on {device.type}: {why}. "
        "Results are correct but slower.",
        RuntimeWarning,
        stacklevel=4,
    )
