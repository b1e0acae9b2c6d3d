"""Triton kernels of epd_kernels (docs/design.md, "Layers": the kernels layer).

Launchers on the canonical arguments of the `torch.ops.epd_kernels` ops (formulas in
`reference.py`), registered as their CUDA kernels by `backends.py`. They autotune on GPU:
run each launch once before capturing a CUDA graph. `kernels.aot` compiles ahead of time.
Importing never fails: without triton, `HAS_TRITON` is False and every launcher raises.
With TRITON_INTERPRET=1 set before the first import they run on CPU tensors (tests).
"""
from __future__ import annotations

OPS = ("epd_step", "epd_step_out", "epd_step_backward",
       "branch_states", "branch_states_out", "branch_states_backward")

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "INTERPRET", *OPS]

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as _exc:  # ImportError, or a broken install raising at import time
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None

if HAS_TRITON:
    from ._common import INTERPRET
    from .branch_states import branch_states, branch_states_backward, branch_states_out
    from .epd_step import epd_step, epd_step_backward, epd_step_out
else:
    INTERPRET = False

    def _missing(name):
        def launcher(*args, **kwargs):
            raise RuntimeError(
                f"epd_kernels.kernels.{name} needs Triton, which could not be imported "
                f"({TRITON_IMPORT_ERROR}). Install it with `pip install triton` (or "
                f"`pip install epd_kernels[triton]`), or use the CPU/reference backend.")

        launcher.__name__ = launcher.__qualname__ = name
        return launcher

    for _name in OPS:
        globals()[_name] = _missing(_name)
    del _name
