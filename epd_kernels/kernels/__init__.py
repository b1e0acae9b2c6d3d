"""Triton kernels of epd_kernels (DESIGN.md section 2, "kernels" layer).

Pure launchers on canonical, contiguous tensors (the op layer in `ops.py` validates and
reshapes user inputs, and owns autograd):

    epd_step_fwd(x, grads, weights, h, o) -> y
    epd_step_bwd(grad_out, grads, weights, h, o) -> (grad_grads, dots)
    branch_states(x, d, c) -> out
    branch_states_out(x, d, c, out) -> None
    branch_states_bwd(grad_out, d, c) -> (grad_x, grad_d, grad_c)
    aot_compile(kernel_name, arch, dtype, K, aligned=True) -> PTX string

Shapes: x, d, grad_out [B, N]; grads [K, B, N]; weights, c [B, K]; h, o [B]. Data is
float32/float64/float16/bfloat16; weights/h/o/c are in the opmath dtype (float64 for
float64 data, float32 otherwise) and are read inside the kernels, so CUDA graphs that
capture these launches stay valid when those tensors are updated in place.

The kernels autotune over a few tile sizes on GPU; run each launch once before capturing
a CUDA graph so that autotuning does not happen during capture.

Importing this package never fails: without triton, `HAS_TRITON` is False and every
launcher raises a RuntimeError that says so. With TRITON_INTERPRET=1 set before this
package is first imported, the kernels run on CPU tensors through the Triton interpreter
(`INTERPRET` is True); that mode is for tests only.
"""
from __future__ import annotations

__all__ = [
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "INTERPRET",
    "epd_step_fwd",
    "epd_step_bwd",
    "branch_states",
    "branch_states_out",
    "branch_states_bwd",
    "aot_compile",
]

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
    from .aot import aot_compile
    from .branch_states import branch_states, branch_states_bwd, branch_states_out
    from .epd_step import epd_step_bwd, epd_step_fwd
else:
    INTERPRET = False

    def _missing(name):
        def launcher(*args, **kwargs):
            raise RuntimeError(
                f"epd_kernels.kernels.{name} needs Triton, which could not be imported "
                f"({TRITON_IMPORT_ERROR}). Install it with `pip install triton` (or "
                f"`pip install epd_kernels[triton]`), or use the CPU/reference backend."
            )

        launcher.__name__ = name
        launcher.__qualname__ = name
        return launcher

    epd_step_fwd = _missing("epd_step_fwd")
    epd_step_bwd = _missing("epd_step_bwd")
    branch_states = _missing("branch_states")
    branch_states_out = _missing("branch_states_out")
    branch_states_bwd = _missing("branch_states_bwd")
    aot_compile = _missing("aot_compile")
