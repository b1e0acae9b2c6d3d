"""epd_kernels: few-step diffusion sampling (EPD-Solver, EPD-Plugin, D-ODE, baselines) on fused kernels."""
from .ops import branch_states, branch_states_into, epd_step
from .backends import set_backend

__version__ = "0.1.0"

__all__ = ["epd_step", "branch_states", "branch_states_into", "set_backend", "__version__"]
