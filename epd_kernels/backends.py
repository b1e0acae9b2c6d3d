"""Which kernels implement the `torch.ops.epd_kernels` ops, decided once, not per call.

`load_library` loads the op library of `csrc/ops.cpp` (schemas and C++ CPU kernels); the
CUDA kernels are registered once here (Triton, else the reference with one warning), and
torch's dispatcher picks by device. Backends: cpp, triton (CUDA, or CPU tensors under
TRITON_INTERPRET=1), reference (any device) and auto (cpp on CPU, triton on CUDA).
`set_backend(name)` or EPD_KERNELS_BACKEND (read at import) forces one for every device by
registering its kernels over the defaults. Without the library `ops.py` runs the reference.
"""
from __future__ import annotations

import os
import types
import warnings
from typing import Optional

import torch

from . import _extension
from . import reference as _ref

BACKENDS = ("auto", "cpp", "triton", "reference")
ENV_VAR = "EPD_KERNELS_BACKEND"
OPS = ("epd_step", "epd_step_out", "epd_step_backward",
       "branch_states", "branch_states_out", "branch_states_backward")

_LIBRARY_ERROR: Optional[str] = None
_forced: Optional[str] = None
_override: Optional[torch.library.Library] = None
_defaults: Optional[torch.library.Library] = None
_warned = False


def load_library() -> bool:
    """Loads the compiled op library (found or built by `_extension`); True when loaded."""
    global _LIBRARY_ERROR
    if hasattr(torch.ops.epd_kernels, "epd_step"):
        return True
    if _extension.load() is None:
        _LIBRARY_ERROR = str(_extension.load_error())
        return False
    return True


LIBRARY_LOADED: bool = load_library()


def library_error() -> Optional[str]:
    """Why the compiled library did not load (None when it did)."""
    return _LIBRARY_ERROR


def _triton_kernels():
    """The `epd_kernels.kernels` module when its kernels can run here, else None."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not (torch.cuda.is_available() or interpret):
        return None
    from . import kernels  # never fails: without triton, HAS_TRITON is False

    if kernels.HAS_TRITON and (torch.cuda.is_available() or kernels.INTERPRET):
        return kernels
    return None


def available() -> list:
    """The backends that can run here (see the module docstring for when triton is)."""
    names = ["cpp"] if LIBRARY_LOADED else []
    if LIBRARY_LOADED and _triton_kernels() is not None:
        names.append("triton")
    return names + ["reference"]


def _warn_reference(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"epd_kernels: using the plain-PyTorch reference: {why}. Results are "
                      "correct but slower.", RuntimeWarning, stacklevel=3)


def _reference_on_cuda(name):
    def kernel(*args):
        from . import kernels

        why = kernels.TRITON_IMPORT_ERROR or "no CUDA device"
        _warn_reference(f"Triton is not usable here ({why})")
        return getattr(_ref, name)(*args)

    return kernel


def _cpp_only(name):
    def kernel(*args):
        raise RuntimeError(f"epd_kernels: the forced backend 'cpp' runs CPU tensors only; "
                           f"{name} got a CUDA tensor (use set_backend('auto'))")

    return kernel


def _register_defaults() -> None:
    """The CUDA kernels of every op (the CPU ones come from the C++ library)."""
    global _defaults
    if not LIBRARY_LOADED or _defaults is not None:
        return
    kernels = _triton_kernels() if torch.cuda.is_available() else None
    _defaults = torch.library.Library("epd_kernels", "IMPL")
    for name in OPS:
        fn = getattr(kernels, name) if kernels is not None else _reference_on_cuda(name)
        _defaults.impl(name, fn, "CUDA")


def current_forced() -> Optional[str]:
    """The forced backend, or None under "auto"."""
    return _forced


def for_device(device):
    """A record naming (`.name`) the backend that runs tensors on `device` now."""
    kind = torch.device(device).type
    if not LIBRARY_LOADED or _forced is not None:
        name = _forced or "reference"
    elif kind == "cpu":
        name = "cpp"
    else:
        name = "triton" if kind == "cuda" and _triton_kernels() is not None else "reference"
    return types.SimpleNamespace(name=name)


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every call ("cpp", "triton", "reference"), or "auto"/None."""
    global _forced, _override
    name = "auto" if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name != "auto" and name not in available():
        raise RuntimeError(f"backend {name!r} is not available here (available: "
                           f"{', '.join(available())}){_why_unavailable(name)}")
    if name == (_forced or "auto"):
        return
    if _override is not None:
        _override._destroy()
        _override = None
    _forced = None if name == "auto" else name
    # auto: the defaults; without the library only "reference" is available, and ops.py
    # runs it directly.
    if _forced is None or not LIBRARY_LOADED:
        return
    lib = torch.library.Library("epd_kernels", "IMPL")
    # Registering over an existing kernel makes torch warn once per op; here that is the
    # point, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for op in OPS:
            if _forced == "cpp":
                lib.impl(op, _cpp_only(op), "CUDA")
                continue
            module = _ref if _forced == "reference" else _triton_kernels()
            for key in ("CPU", "CUDA"):
                lib.impl(op, getattr(module, op), key)
    _override = lib


def _why_unavailable(name: str) -> str:
    if not LIBRARY_LOADED:
        return f": the compiled library did not load ({_LIBRARY_ERROR})"
    if name == "triton":
        return (": Triton kernels run on a CUDA device, or on CPU tensors under "
                "TRITON_INTERPRET=1 (tests)")
    return ""


def _backend_from_env() -> Optional[str]:
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; use one of "
                         f"{', '.join(BACKENDS)}")
    return value


_register_defaults()
_env_backend = _backend_from_env()
if _env_backend is not None:
    set_backend(_env_backend)
