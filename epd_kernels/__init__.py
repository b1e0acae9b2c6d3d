"""epd_kernels: few-step diffusion sampling (EPD-Solver, EPD-Plugin, AMED, D-ODE and the
baselines) on fused kernels. The names below are the public surface; `docs/design.md`
says which module holds what."""
# Before torch is first imported (its OpenMP runtime reads the variable when loaded):
# idle OpenMP threads sleep instead of spinning, unless the user chose a wait policy.
from .workflow.threads import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()

try:
    import torch as _torch  # noqa: F401,E402
except ImportError as _exc:  # torch is not a dependency (pip would pick a CUDA build)
    raise ImportError("epd_kernels needs torch >= 2.4: install the torch you want first "
                      "(pip install torch), then epd_kernels") from _exc

from .ops import epd_step  # noqa: E402
from .backends import set_backend  # noqa: E402
from .solvers.schedules import get_sigmas  # noqa: E402
from .noise import make_noise  # noqa: E402
from .solvers.counting import SampleStats  # noqa: E402
from .sampling import sample  # noqa: E402
from .params import AMEDParams, DODEParams, EPDParams  # noqa: E402
# `distill` is the package epd_kernels.distill, callable as its function.
from . import distill  # noqa: E402
from .distill.dode_fit import fit_dode  # noqa: E402

__version__ = "0.1.0"

__all__ = ["epd_step", "sample", "SampleStats", "get_sigmas", "make_noise", "distill",
           "fit_dode", "EPDParams", "AMEDParams", "DODEParams", "set_backend",
           "__version__"]
