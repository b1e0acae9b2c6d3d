r"""D-ODE solvers (Kim, Tang, Yu, "Distilling ODE Solvers of Diffusion Models into Smaller
Steps", CVPR 2024; docs/design.md, "D-ODE"): the paper's eq. (10) applied to the direction
``v_n`` the base solver moves along (`common.integrate`), in EDM's sigma convention:

    x_{n+1} = x_n + h_n O_n,   O_n = v_n + lambda_n (v_n - v_{n-1})
            = a_n + lambda_n b_n,   a_n = x_n + h_n v_n (the base step), b_n = h_n (v_n - v_{n-1})

    d-euler  (D-DDIM)  v_n = d_n = (x_n - D(x_n, sigma_n)) / sigma_n
    d-heun   (D-EDM)   x~ = x_n + h_n d_n,  d~ = (x~ - D(x~, sigma_{n+1})) / sigma_{n+1},
                       v_n = (d_n + d~) / 2          (the predictor is unchanged)
    d-ipndm            v_n = AB_p(d_n, d_{n-1}, ...),  p = min(max_order, n + 1)

``v_{n-1}`` is the previous base estimate (not its O), so multistep histories are untouched;
``lambdas[0]`` must be 0; all lambdas 0 is bit-for-bit the base solver. AFS and the NFE rule
are the base solver's. ``lambdas``: S floats or a callable ``rule(i, a, b) -> lambda_i`` (the
fitter's, `epd_kernels.distill.dode_fit`: one code path). The callback also gets ``'lambda'``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..params import DODEParams
from .common import check_int, integrate, sigma_list
from .euler import euler_direction
from .heun import heun_direction
from .ipndm import ipndm_direction

__all__ = ["sample_d_euler", "sample_d_ddim", "sample_d_heun", "sample_d_ipndm",
           "dode_sampler", "DODE_SOLVERS"]

Lambdas = Union[Sequence[float], torch.Tensor, Callable[[int, torch.Tensor, torch.Tensor], float]]


def _lambda_rule(lambdas: Lambdas, sigmas) -> Callable:
    """A rule ``(i, a, b) -> lambda_i`` from S values (one per step of `sigmas`) or a
    callable."""
    if callable(lambdas) and not isinstance(lambdas, torch.Tensor):
        return lambdas
    num_steps = len(sigma_list(sigmas)) - 1
    try:
        lam = torch.as_tensor(lambdas.detach() if isinstance(lambdas, torch.Tensor) else lambdas,
                              dtype=torch.float64).cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"lambdas must be a sequence of {num_steps} numbers or a callable: "
                         f"{e}") from None
    if lam.numel() != num_steps:
        raise ValueError(f"lambdas has {lam.numel()} values but the grid has {num_steps} steps "
                         f"(one lambda per step)")
    if not torch.isfinite(lam).all():
        raise ValueError(f"lambdas must be finite, got {lam.tolist()}")
    if lam[0].item() != 0.0:
        raise ValueError(f"lambdas[0] must be 0: step 0 has no previous estimate to "
                         f"extrapolate from (got {lam[0].item()!r})")
    values = lam.tolist()
    return lambda i, a, b: values[i]


def sample_d_euler(denoiser: Callable, x: torch.Tensor, sigmas, *, lambdas: Lambdas,
                   callback: Optional[Callable] = None, progress: bool = False,
                   afs: bool = False, **cond) -> torch.Tensor:
    """D-Euler / D-DDIM (paper eq. 12): ``x_{n+1} = x_n + h_n [d_n + lambda_n (d_n -
    d_{n-1})]``."""
    return integrate(denoiser, x, sigmas, euler_direction, "d-euler", callback, progress, afs,
                     cond, _lambda_rule(lambdas, sigmas))


#: D-DDIM is D-Euler in the sigma variable.
sample_d_ddim = sample_d_euler


def sample_d_heun(denoiser: Callable, x: torch.Tensor, sigmas, *, lambdas: Lambdas,
                  callback: Optional[Callable] = None, progress: bool = False,
                  afs: bool = False, **cond) -> torch.Tensor:
    """D-Heun / D-EDM: O replaces the trapezoidal slope ``v_n = (d_n + d~) / 2``."""
    return integrate(denoiser, x, sigmas, heun_direction(denoiser, cond), "d-heun", callback,
                     progress, afs, cond, _lambda_rule(lambdas, sigmas))


def sample_d_ipndm(denoiser: Callable, x: torch.Tensor, sigmas, *, lambdas: Lambdas,
                   callback: Optional[Callable] = None, progress: bool = False,
                   afs: bool = False, max_order: int = 4, **cond) -> torch.Tensor:
    """D-iPNDM: O is built on the Adams-Bashforth direction of `sample_ipndm` (whose
    history holds past d's, not O's)."""
    direction = ipndm_direction(check_int("max_order", max_order, 1, 4))
    return integrate(denoiser, x, sigmas, direction, "d-ipndm", callback, progress, afs, cond,
                     _lambda_rule(lambdas, sigmas))


#: D-ODE solvers by base name.
DODE_SOLVERS = {"euler": sample_d_euler, "heun": sample_d_heun, "ipndm": sample_d_ipndm}


def dode_sampler(denoiser: Callable, x: torch.Tensor, sigmas=None, *, params: DODEParams,
                 solver: Optional[str] = None, callback: Optional[Callable] = None,
                 progress: bool = False, afs: Optional[bool] = None, **cond) -> torch.Tensor:
    """The D-ODE solver `params` were fitted for; ``sigmas`` (default ``params.sigmas``),
    ``afs`` and ``solver`` (e.g. "d-euler") must match the params when given."""
    if not isinstance(params, DODEParams):
        raise TypeError(f"params must be a DODEParams (from fit_dode or DODEParams.load), got "
                        f"{type(params).__name__}")
    params.validate()
    params.check_compatible(sigmas=sigmas, solver=solver, afs=afs)
    extra = {"max_order": params.max_order} if params.base == "ipndm" else {}
    return DODE_SOLVERS[params.base](denoiser, x, params.sigmas, lambdas=params.lambdas,
                                     callback=callback, progress=progress, afs=params.afs,
                                     **extra, **cond)
