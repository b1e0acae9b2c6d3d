"""epd_kernels: few-step diffusion sampling (EPD-Solver, EPD-Plugin, D-ODE, baselines) on fused kernels."""
# Before torch is first imported (its OpenMP runtime reads the variable when loaded):
# idle OpenMP threads sleep instead of spinning, unless the user chose a wait policy.
from .workflow.threads import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()
from .ops import branch_states, branch_states_into, epd_step
from .backends import set_backend

__version__ = "0.1.0"

__all__ = ["epd_step", "branch_states", "branch_states_into", "set_backend", "__version__"]

# Sampling side: schedules, baseline solvers, sample() with exact NFE accounting.
from .solvers.schedules import get_sigmas  # noqa: E402
from .sampling import (  # noqa: E402
    CountingDenoiser,
    SampleStats,
    make_noise,
    parallel_calls,
    sample,
)

__all__ += ["get_sigmas", "sample", "SampleStats", "CountingDenoiser", "make_noise",
            "parallel_calls"]

# Distillation side: EPD parameters and their distillation. `distill` is the package
# epd_kernels.distill, callable as its function `epd_kernels.distill.distill`.
from .params import EPDParams  # noqa: E402
from . import distill  # noqa: E402

__all__ += ["EPDParams", "distill"]

# D-ODE: one distilled scalar per step, fitted in closed form.
from .params import DODEParams  # noqa: E402
from .dode_fit import fit_dode  # noqa: E402

__all__ += ["DODEParams", "fit_dode"]

# AMED-Solver / AMED-Plugin: a predicted intermediate time per step (table or network).
from .params import AMEDParams  # noqa: E402
from .solvers.amed import amed_sampler  # noqa: E402

__all__ += ["AMEDParams", "amed_sampler"]
