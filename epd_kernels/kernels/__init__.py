"""Triton kernels of epd_kernels (docs/design.md, "Layers": the kernels layer).

Launchers on the canonical arguments of the `torch.ops.epd_kernels` ops (see
`csrc/ops.cpp` and `epd_kernels/reference.py`), registered as those ops' CUDA kernels by
`epd_kernels.backends`; the op layer in `ops.py` validates and reshapes user inputs and
owns autograd:

    epd_step(x, grads, weights, scale, alpha) -> y
    epd_step_out(x, grads, weights, scale, alpha, out) -> None
    epd_step_backward(grad_out, grads, weights, scale, alpha) -> (grad_grads, dots)
    branch_states(x, d, c) -> out
    branch_states_out(x, d, c, out) -> None
    branch_states_backward(grad_out, d, c) -> (grad_x, grad_d, grad_c)

Shapes: x, d, grad_out [B, N]; grads [K, B, N]; weights, c [K] or [B, K]; scale None, []
or [B]. Ahead-of-time compilation for GPUs that are not present: `kernels.aot`.

The kernels autotune over a few tile sizes on GPU; run each launch once before capturing
a CUDA graph so that autotuning does not happen during capture.

Importing this package never fails: without triton, `HAS_TRITON` is False and every
launcher raises a RuntimeError that says so. With TRITON_INTERPRET=1 set before this
package is first imported, the kernels run on CPU tensors through the Triton interpreter
(`INTERPRET` is True); that mode is for tests only.
"""
from __future__ import annotations

OPS = ("epd_step", "epd_step_out", "epd_step_backward",
       "branch_states", "branch_states_out", "branch_states_backward")

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "INTERPRET", "OPS", *OPS]

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
                f"`pip install epd_kernels[triton]`), or use the CPU/reference backend."
            )

        launcher.__name__ = name
        launcher.__qualname__ = name
        return launcher

    for _name in OPS:
        globals()[_name] = _missing(_name)
    del _name
