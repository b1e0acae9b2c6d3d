"""Which kernels implement the `torch.ops.epd_kernels` ops, decided once, not per call.

The op library (`csrc/ops.cpp`) defines every op's schema and registers its C++ CPU
kernels. This module loads that library (`load_library`, the one place that does) and
registers, once, the CUDA kernels: the Triton launchers of `epd_kernels.kernels` when a
CUDA device and Triton are present, else the plain-torch reference with one warning.
After that, torch's dispatcher picks the kernel from the tensors' device; no Python runs
per call to choose.

Backends (`available()` lists those usable here):
    cpp        the C++ CPU kernels (needs the built extension)
    triton     the Triton kernels: listed when a CUDA device exists, or when the kernels
               run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors, tests)
    reference  the plain-torch formulas of `reference.py` (any device)
    auto       cpp on CPU, triton on CUDA (the default)

`set_backend(name)` (or the environment variable EPD_KERNELS_BACKEND, read once when
the package is imported) forces one backend for CPU and CUDA tensors alike by
registering its kernels over the defaults; `set_backend("auto")` removes them again.
When the extension did not build, the ops do not exist: `epd_kernels.ops` then runs the
reference directly, after one warning.
"""
from __future__ import annotations

import contextlib
import os
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
    """Loads the compiled op library (schemas and CPU kernels); True when it is loaded.
    `epd_kernels._extension` finds it: the build of the running torch, or a build into the
    per-torch cache on first use (a minute, announced on stderr)."""
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


def _triton_kernels(require_usable: bool = True):
    """The `epd_kernels.kernels` module when its kernels can run here, else None."""
    if require_usable and not (torch.cuda.is_available()
                               or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return None
    try:
        from . import kernels
    except ImportError:  # pragma: no cover - the package imports without triton
        return None
    if not kernels.HAS_TRITON:
        return None
    if not (torch.cuda.is_available() or kernels.INTERPRET):
        return None
    return kernels


def available() -> list:
    """The backends that can run here (see the module docstring for when triton is)."""
    names = ["cpp"] if LIBRARY_LOADED else []
    if LIBRARY_LOADED and _triton_kernels() is not None:
        names.append("triton")
    return names + ["reference"]


def _warn_reference(why: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(f"epd_kernels: using the plain-PyTorch reference: {why}. Results are "
                  "correct but slower.", RuntimeWarning, stacklevel=3)


def _reference_on_cuda(name):
    fn = getattr(_ref, name)

    def kernel(*args):
        _warn_reference(f"Triton is not usable here ({_triton_missing_reason()})")
        return fn(*args)

    return kernel


def _triton_missing_reason() -> str:
    try:
        from . import kernels
    except ImportError as exc:  # pragma: no cover
        return str(exc)
    return kernels.TRITON_IMPORT_ERROR or "no CUDA device"


def _cpp_only(name):
    def kernel(*args):
        raise RuntimeError(f"epd_kernels: the forced backend 'cpp' runs CPU tensors only; "
                           f"{name} got a CUDA tensor (use set_backend('auto'))")

    return kernel


@contextlib.contextmanager
def _quiet_override():
    # Registering over an existing kernel makes torch warn once per op; here that is the
    # point, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        yield


def _register_defaults() -> None:
    """The CUDA kernels of every op (the CPU ones come from the C++ library)."""
    global _defaults
    if not LIBRARY_LOADED or _defaults is not None:
        return
    kernels = _triton_kernels() if torch.cuda.is_available() else None
    lib = torch.library.Library("epd_kernels", "IMPL")
    for name in OPS:
        fn = getattr(kernels, name) if kernels is not None else _reference_on_cuda(name)
        lib.impl(name, fn, "CUDA")
    _defaults = lib


def current() -> str:
    """The forced backend, or "auto"."""
    return _forced or "auto"


def current_forced() -> Optional[str]:
    """The forced backend, or None under "auto"."""
    return _forced


def active(device) -> str:
    """The backend whose kernels run tensors on `device` now."""
    kind = torch.device(device).type
    if not LIBRARY_LOADED:
        return "reference"
    if _forced is not None:
        return _forced
    if kind == "cpu":
        return "cpp"
    if kind == "cuda" and _triton_kernels() is not None:
        return "triton"
    return "reference"


def for_device(device):
    """A record naming the backend that runs tensors on `device` (`.name`), for reports."""
    import types

    return types.SimpleNamespace(name=active(device))


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every call ("cpp", "triton", "reference"), or "auto"/None."""
    global _forced, _override
    name = "auto" if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name != "auto" and name not in available():
        raise RuntimeError(f"backend {name!r} is not available here (available: "
                           f"{', '.join(available())}){_why_unavailable(name)}")
    if name == current():
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
    with _quiet_override():
        for op in OPS:
            if _forced == "cpp":
                lib.impl(op, _cpp_only(op), "CUDA")
            else:
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
