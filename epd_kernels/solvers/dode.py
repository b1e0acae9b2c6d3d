r"""D-ODE solvers (Kim, Tang, Yu, "Distilling ODE Solvers of Diffusion Models into Smaller
Steps", CVPR 2024), in EDM's sigma convention.

The paper's eq. (10) replaces a solver's estimate ``d_t`` by

    O_t = d_t + lambda_t (d_t - d_{t+1})

where ``d_{t+1}`` is the estimate of the previous (noisier) step, one scalar ``lambda_t``
per step; for higher-order solvers "d_t in eq. (10) is replaced by the high-order
approximation of each method" (Sec. 3.2). Here the estimate is the ODE direction ``v_n``
that the base solver moves along, ``x_{n+1} = x_n + h_n v_n`` with ``h_n = sigma_{n+1} -
sigma_n``, and the D-ODE step is

    x_{n+1} = x_n + h_n O_n,   O_n = v_n + lambda_n (v_n - v_{n-1})
            = a_n + lambda_n b_n,   a_n = x_n + h_n v_n  (the base step),
                                    b_n = h_n (v_n - v_{n-1}),

affine in lambda_n (which is what makes the closed-form fit in `epd_kernels.distill.dode_fit`
exact). ``v_{n-1}`` is the base estimate of the previous step (not its O), so the
gradient history of multistep bases is untouched, and step 0, which has no previous
estimate, is the plain base step (``lambdas[0]`` must be 0). With all lambdas 0 each
D-ODE solver is bit-for-bit its base solver.

    d-euler  (D-DDIM; DDIM is Euler in sigma)
        d_n = (x_n - D(x_n, sigma_n)) / sigma_n,      v_n = d_n
    d-heun   (D-EDM; O enters the final trapezoidal slope, the predictor is unchanged)
        x~  = x_n + h_n d_n,   d~ = (x~ - D(x~, sigma_{n+1})) / sigma_{n+1},
        v_n = (d_n + d~) / 2
    d-ipndm  (D-iPNDM; O is built on the Adams-Bashforth direction)
        v_n = AB_p(d_n, d_{n-1}, ...),  p = min(max_order, n + 1)

With ``afs=True`` the first gradient is analytic, ``d_0 = x_0 / sqrt(1 + sigma_0^2)``, as in
the base solvers. NFE rule: exactly the base solver's (lambda costs nothing):

    d-euler, d-ipndm   S steps -> S - afs sequential denoiser calls
    d-heun             S steps -> 2 S - afs

Every solver here has the baseline signature plus ``lambdas``::

    x = sample_d_euler(denoiser, x, sigmas, *, lambdas, callback=None, progress=False,
                       afs=False, **cond)

``lambdas`` is a sequence/tensor of S floats (``lambdas[0] == 0``), or a callable
``rule(i, a, b) -> float`` that chooses lambda_i from the base step ``a`` and the
direction ``b`` (used by the fitter, so that fitting and sampling share one code path).
`dode_sampler` runs the solver a `DODEParams` was fitted for.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from ..params import DODEParams
from .common import denoise, gradient, sigma_list, step_range, to_d
from .ipndm import ab_direction

__all__ = ["sample_d_euler", "sample_d_ddim", "sample_d_heun", "sample_d_ipndm",
           "dode_sampler", "DODE_SOLVERS"]

LambdaRule = Callable[[int, torch.Tensor, torch.Tensor], float]
Lambdas = Union[Sequence[float], torch.Tensor, LambdaRule]


def _lambda_rule(lambdas: Lambdas, num_steps: int) -> LambdaRule:
    """A rule ``(i, a, b) -> lambda_i`` from a list/tensor of S values (or a callable)."""
    if callable(lambdas) and not isinstance(lambdas, torch.Tensor):
        return lambdas
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


def _dode_update(rule: LambdaRule, i: int, a: torch.Tensor, h: float, v: torch.Tensor,
                 v_prev: Optional[torch.Tensor]):
    """``x_{n+1} = a + lambda_n * h (v - v_prev)`` (a = the base step); (x_next, lambda)."""
    if v_prev is None:
        return a, 0.0
    b = h * (v - v_prev)
    lam = float(rule(i, a, b))
    return (a + lam * b if lam != 0.0 else a), lam


def _emit(callback, i, x, x_next, sigma, sigma_next, denoised, lam):
    """Per-step callback: the baseline keys plus ``'lambda'`` (the lambda used)."""
    if callback is not None:
        callback({"i": i, "x": x, "x_next": x_next, "sigma": sigma, "sigma_next": sigma_next,
                  "denoised": denoised, "lambda": lam})


def _gradient(denoiser, x, s, i, afs, cond):
    """(d, denoised) at (x, s[i]); the analytic first step on step 0 with AFS."""
    return gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)


def sample_d_euler(denoiser: Callable, x: torch.Tensor, sigmas, *, lambdas: Lambdas,
                   callback: Optional[Callable] = None, progress: bool = False,
                   afs: bool = False, **cond) -> torch.Tensor:
    """D-Euler / D-DDIM (paper eq. 12):

        d_n     = (x_n - D(x_n, sigma_n)) / sigma_n
        x_{n+1} = x_n + h_n [d_n + lambda_n (d_n - d_{n-1})]

    One denoiser call per step (S - afs in all)."""
    s = sigma_list(sigmas)
    rule = _lambda_rule(lambdas, len(s) - 1)
    d_prev = None
    for i in step_range(len(s) - 1, progress, "d-euler"):
        d, denoised = _gradient(denoiser, x, s, i, afs, cond)
        h = s[i + 1] - s[i]
        a = x + h * d                                   # the Euler / DDIM step
        x_next, lam = _dode_update(rule, i, a, h, d, d_prev)
        _emit(callback, i, x, x_next, s[i], s[i + 1], denoised, lam)
        x, d_prev = x_next, d
    return x


#: D-DDIM is D-Euler in the sigma variable.
sample_d_ddim = sample_d_euler


def sample_d_heun(denoiser: Callable, x: torch.Tensor, sigmas, *, lambdas: Lambdas,
                  callback: Optional[Callable] = None, progress: bool = False,
                  afs: bool = False, **cond) -> torch.Tensor:
    """D-Heun / D-EDM: O replaces the Heun (trapezoidal) slope, the predictor is plain Euler:

        d_n     = (x_n - D(x_n, sigma_n)) / sigma_n
        x~      = x_n + h_n d_n
        d~      = (x~ - D(x~, sigma_{n+1})) / sigma_{n+1}
        v_n     = (d_n + d~) / 2
        x_{n+1} = x_n + h_n [v_n + lambda_n (v_n - v_{n-1})]

    Two denoiser calls per step (2 S - afs in all); the correction runs on every step as in
    `sample_heun` (the grid ends at sigma_min > 0)."""
    s = sigma_list(sigmas)
    rule = _lambda_rule(lambdas, len(s) - 1)
    v_prev = None
    for i in step_range(len(s) - 1, progress, "d-heun"):
        d, denoised = _gradient(denoiser, x, s, i, afs, cond)
        h = s[i + 1] - s[i]
        x_pred = x + h * d
        d_pred = to_d(x_pred, denoise(denoiser, x_pred, s[i + 1], cond), s[i + 1])
        a = x + h * 0.5 * (d + d_pred)                  # the Heun step
        v = 0.5 * (d + d_pred)
        x_next, lam = _dode_update(rule, i, a, h, v, v_prev)
        _emit(callback, i, x, x_next, s[i], s[i + 1], denoised, lam)
        x, v_prev = x_next, v
    return x


def sample_d_ipndm(denoiser: Callable, x: torch.Tensor, sigmas, *, lambdas: Lambdas,
                   callback: Optional[Callable] = None, progress: bool = False,
                   afs: bool = False, max_order: int = 4, **cond) -> torch.Tensor:
    """D-iPNDM: O is built on the Adams-Bashforth direction of `sample_ipndm`:

        d_n     = (x_n - D(x_n, sigma_n)) / sigma_n,   history = past d's (not O's)
        v_n     = AB_p(d_n, d_{n-1}, ..., d_{n-p+1}),  p = min(max_order, n + 1)
        x_{n+1} = x_n + h_n [v_n + lambda_n (v_n - v_{n-1})]

    One denoiser call per step (S - afs in all)."""
    if isinstance(max_order, bool) or int(max_order) != max_order or not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be an integer in 1..4, got {max_order!r}")
    s = sigma_list(sigmas)
    rule = _lambda_rule(lambdas, len(s) - 1)
    history: List[torch.Tensor] = []  # newest first
    v_prev = None
    for i in step_range(len(s) - 1, progress, "d-ipndm"):
        d, denoised = _gradient(denoiser, x, s, i, afs, cond)
        history.insert(0, d)
        del history[int(max_order):]
        v = ab_direction(history)
        h = s[i + 1] - s[i]
        a = x + h * v                                   # the iPNDM step
        x_next, lam = _dode_update(rule, i, a, h, v, v_prev)
        _emit(callback, i, x, x_next, s[i], s[i + 1], denoised, lam)
        x, v_prev = x_next, v
    return x


#: D-ODE solvers by base name.
DODE_SOLVERS = {"euler": sample_d_euler, "heun": sample_d_heun, "ipndm": sample_d_ipndm}


def dode_sampler(denoiser: Callable, x: torch.Tensor, sigmas=None, *, params: DODEParams,
                 solver: Optional[str] = None, callback: Optional[Callable] = None,
                 progress: bool = False, afs: Optional[bool] = None, **cond) -> torch.Tensor:
    """Samples with the D-ODE solver `params` were fitted for, from ``x`` at ``sigmas[0]``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> x0_hat``.
        x: initial state ``[B, ...]`` (noise already scaled by ``sigmas[0]``).
        sigmas: the grid; None uses ``params.sigmas``. It must match the params' grid.
        params: a `DODEParams` (from `fit_dode`, `DODEParams.load` or `DODEParams.zeros`).
        solver: if given ("d-euler", "d-heun", "d-ipndm" or aliases), it must be the solver
            the params were fitted for (lets `sample` refuse d-heun params for "d-euler").
        afs: if given, must equal ``params.afs``.
        callback, progress, **cond: as for the baseline solvers; the callback dict also
            holds ``'lambda'``.

    Returns the state at ``sigmas[-1]``. Latency NFE = that of the base solver
    (``params.nfe``).
    """
    if not isinstance(params, DODEParams):
        raise TypeError(f"params must be a DODEParams (from fit_dode or DODEParams.load), got "
                        f"{type(params).__name__}")
    params.validate()
    params.check_compatible(sigmas=sigmas, solver=solver, afs=afs)
    extra = {"max_order": params.max_order} if params.base == "ipndm" else {}
    return DODE_SOLVERS[params.base](denoiser, x, params.sigmas, lambdas=params.lambdas,
                                     callback=callback, progress=progress, afs=params.afs,
                                     **extra, **cond)
