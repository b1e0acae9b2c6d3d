"""Helpers shared by the solvers: grids as floats, gradient evaluation, AFS, callbacks.

Conventions (docs/design.md, "EDM convention"): a denoiser is ``D(x, sigma, **cond) -> x0_hat`` with
``x: [B, ...]`` and ``sigma: [B]``; the ODE is ``dx/dsigma = d(x, sigma) = (x - D) / sigma``
integrated from ``sigmas[0]`` down to ``sigmas[-1] > 0``.

Analytic first step (AFS, from the AMED / EPD authors' code): at sigma_0 = 80 the
denoiser output is tiny next to x (centred data of scale ~1), so the first gradient
``d = (x - D) / sigma ~ x / sigma`` is replaced by

    d_0 = x_0 / sqrt(1 + sigma_0^2)

(the noise estimate of the VP-scaled input) instead of one network call. It is an
approximation (relative error ~ |D| / |x| + 1 / (2 sigma_0^2)), saving one evaluation.
The implied denoised estimate is ``x_0 - sigma_0 * d_0``.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Iterable, List, Optional

import torch

from ..reference import opmath_dtype
from .schedules import check_sigmas

__all__ = [
    "sigma_list",
    "sigma_batch",
    "to_d",
    "afs_d",
    "denoise",
    "call_denoiser",
    "check_cond_keywords",
    "check_int",
    "step_range",
    "emit",
    "phi",
    "lam",
]


def sigma_list(sigmas) -> List[float]:
    """Validated grid as Python floats (float64): >= 2 values, > 0, strictly decreasing."""
    return check_sigmas(sigmas, "sigmas").tolist()


def sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A [B] tensor filled with `sigma` on x's device, in x's accumulation dtype (float64 for
    float64 states, float32 otherwise, as the EPD sampler does)."""
    return torch.full((x.shape[0],), float(sigma), dtype=opmath_dtype(x.dtype), device=x.device)


def to_d(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The ODE gradient d = (x - D) / sigma."""
    return (x - denoised) / sigma


def afs_d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytic first step gradient ``x / sqrt(1 + sigma^2)`` (no network call)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def gradient(denoiser: Callable, x: torch.Tensor, sigma: float, cond: dict, *,
             analytic: bool = False):
    """``(d, denoised)`` at ``(x, sigma)``: one denoiser call, or with ``analytic`` the
    analytic first step (AFS) and the denoised value it implies, with no call."""
    if analytic:
        d = afs_d(x, sigma)
        return d, x - sigma * d
    denoised = denoise(denoiser, x, sigma, cond)
    return to_d(x, denoised, sigma), denoised


def denoise(denoiser: Callable, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    """One sequential denoiser call ``D(x, sigma * ones(B), **cond)``, cast to x's dtype."""
    return call_denoiser(denoiser, x, sigma_batch(x, sigma), cond)


def call_denoiser(denoiser: Callable, x: torch.Tensor, sigma: torch.Tensor,
                  cond: dict) -> torch.Tensor:
    """``D(x, sigma, **cond)`` with per-sample ``sigma [B]``, checked to be shaped like x
    (a wrong shape would otherwise broadcast silently into the update) and cast to x's
    dtype."""
    out = denoiser(x, sigma, **cond)
    if out.shape != x.shape:
        raise ValueError(f"the denoiser returned shape {list(out.shape)} for an input of shape "
                         f"{list(x.shape)}: it must return x0_hat shaped like x")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def check_cond_keywords(denoiser: Callable, cond: dict, *, where: str,
                        options: Iterable[str] = ()) -> None:
    """ValueError for a conditioning keyword that is surely a mistake: one named like an
    option of a related function (`options`, e.g. ``teacher_factor`` given to `distill`),
    or one the denoiser cannot take (its signature, or its ``forward``'s for a module, has
    no such parameter and no ``**kwargs``). Functions that forward ``**cond`` to the
    denoiser would otherwise pass a typo on silently or fail deep inside a model call."""
    if not cond:
        return
    misplaced = sorted(k for k in cond if k in set(options))
    if misplaced:
        raise ValueError(f"{where}() got {misplaced}, which {where}() does not take; unknown "
                         f"keywords are passed to the denoiser as conditioning, and these are "
                         f"options of another function (fit_dode / distill / sample?)")
    fn = getattr(denoiser, "forward", denoiser)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, C extensions: nothing to check against
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in named}
    unknown = sorted(k for k in cond if k not in names)
    if unknown:
        raise ValueError(f"{where}() got {unknown}: neither an argument of {where}() nor a "
                         f"parameter of the denoiser {getattr(fn, '__qualname__', fn)!r} "
                         f"(which takes {sorted(names)})")


def check_int(name: str, value, minimum: int = 1) -> int:
    """``int(value)``, or ValueError naming `name` unless it is an integer >= minimum
    (bools are refused: True would pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def step_range(num_steps: int, progress: bool, desc: str):
    """range(num_steps), wrapped in a tqdm bar when `progress` is true."""
    if not progress:
        return range(num_steps)
    from tqdm.auto import trange

    return trange(num_steps, desc=desc, leave=False)


def emit(callback: Optional[Callable], i: int, x: torch.Tensor, x_next: torch.Tensor,
         sigma: float, sigma_next: float, denoised: Optional[torch.Tensor]) -> None:
    """Calls ``callback({'i', 'x', 'x_next', 'sigma', 'sigma_next', 'denoised'})`` if given.

    Called once per step, after the update (the same keys as the EPD sampler's callback):
    'x' is the state at 'sigma' at the start of step 'i', 'x_next' the new state at
    'sigma_next', and 'denoised' the x0 estimate at (x, sigma) (for an AFS step: the
    implied ``x - sigma * d_0``).
    """
    if callback is not None:
        callback({"i": i, "x": x, "x_next": x_next, "sigma": sigma, "sigma_next": sigma_next,
                  "denoised": denoised})


def lam(sigma: float) -> float:
    """Half log-SNR for EDM's alpha = 1: lambda = -log(sigma)."""
    return -math.log(sigma)


def phi(m: int, h: float) -> float:
    """psi_m(h) = e^{-h} int_0^h e^tau tau^(m-1)/(m-1)! dtau, for m >= 1, h >= 0.

    These are the exponential-integrator weights of the data-prediction form
    ``x_t = e^{-h} x_s + sum_{n>=0} psi_{n+1}(h) D^(n)(lambda_s)`` (DPM-Solver++, UniPC):

        psi_1 = 1 - e^{-h},  psi_2 = h - 1 + e^{-h},  psi_3 = h^2/2 - h + 1 - e^{-h}, ...

    Closed form ``(-1)^m (e^{-h} - sum_{i<m} (-h)^i / i!)``; for small h the series
    ``sum_{j>=0} (-1)^j h^(j+m) / (j+m)!`` is used instead to avoid cancellation.
    """
    if m < 1:
        raise ValueError("phi: m must be >= 1")
    if h < 2.0:
        term = h ** m / math.factorial(m)
        total = 0.0
        j = 0
        while True:
            total += term
            j += 1
            term *= -h / (j + m)
            if abs(term) < 1e-18 * abs(total) or j > 60:
                break
        return total
    acc = math.exp(-h)
    t = 1.0
    for i in range(m):
        if i > 0:
            t *= -h / i
        acc -= t
    return (-1) ** m * acc
