"""Solvers: schedules, the baseline ODE solvers (one module each, beside its formula), and
EPD, AMED, D-ODE and ParaDiGMS (`epd`, `amed`, `dode`, `paradigms`).

Every baseline solver has one signature (k-diffusion style)::

    x_final = solver(denoiser, x, sigmas, *, callback=None, progress=False, afs=False, **cond)

with ``x = noise * sigmas[0]``; the result is the state at ``sigmas[-1] > 0``. The solvers
are autograd-transparent. ``SOLVERS`` maps the baseline names to functions.
"""
from .common import afs_d
from .deis import deis_coefficients, sample_deis
from .dpm2 import sample_dpm2
from .dpmpp3m import sample_dpmpp3m
from .euler import sample_ddim, sample_euler
from .heun import sample_heun
from .ipndm import sample_ipndm
from .schedules import SCHEDULES, check_sigmas, get_sigmas, vp_sigma, vp_sigma_inv
from .unipc import sample_unipc

#: Baseline solvers by name ("ddim" is an alias of "euler").
SOLVERS = {
    "euler": sample_euler,
    "ddim": sample_ddim,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpmpp3m": sample_dpmpp3m,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
}

__all__ = ["SOLVERS", "SCHEDULES", "get_sigmas", "check_sigmas", "vp_sigma", "vp_sigma_inv",
           "afs_d", "sample_euler", "sample_ddim", "sample_heun", "sample_dpm2",
           "sample_dpmpp3m", "sample_unipc", "sample_ipndm", "sample_deis", "deis_coefficients"]


def __getattr__(name):
    if name == "epd_sampler":
        from .epd import epd_sampler

        return epd_sampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
