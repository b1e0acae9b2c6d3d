"""Helpers shared by the solvers: grids as floats, gradients, AFS, the one-direction loop.

Conventions: docs/design.md, "EDM convention". The analytic first step (AFS, from the AMED
/ EPD authors' code) replaces the first gradient at sigma_0 = 80, where ``D`` is tiny next to
``x``, by ``d_0 = x_0 / sqrt(1 + sigma_0^2)``, saving one call; its implied denoised estimate
is ``x_0 - sigma_0 * d_0``.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Iterable, List, Optional

import torch

from ..reference import opmath_dtype
from .schedules import check_sigmas

__all__ = ["afs_d", "phi"]


def sigma_list(sigmas) -> List[float]:
    """Validated grid as Python floats (float64): >= 2 values, > 0, strictly decreasing."""
    return check_sigmas(sigmas, "sigmas").tolist()


def to_d(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The ODE gradient d = (x - D) / sigma."""
    return (x - denoised) / sigma


def afs_d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytic first step gradient ``x / sqrt(1 + sigma^2)`` (no network call)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def gradient(denoiser: Callable, x: torch.Tensor, sigma: float, cond: dict, *,
             analytic: bool = False):
    """``(d, denoised)`` at ``(x, sigma)``: one call, or the AFS gradient with ``analytic``."""
    if analytic:
        d = afs_d(x, sigma)
        return d, x - sigma * d
    denoised = denoise(denoiser, x, sigma, cond)
    return to_d(x, denoised, sigma), denoised


def denoise(denoiser: Callable, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    """One sequential call ``D(x, sigma * ones(B), **cond)`` (sigma in x's opmath dtype)."""
    sigma_b = torch.full((x.shape[0],), float(sigma), dtype=opmath_dtype(x.dtype),
                         device=x.device)
    return call_denoiser(denoiser, x, sigma_b, cond)


def call_denoiser(denoiser: Callable, x: torch.Tensor, sigma: torch.Tensor,
                  cond: dict) -> torch.Tensor:
    """``D(x, sigma [B], **cond)`` cast to x's dtype; ValueError unless shaped like x (a
    wrong shape would otherwise broadcast silently into the update)."""
    out = denoiser(x, sigma, **cond)
    if out.shape != x.shape:
        raise ValueError(f"the denoiser returned shape {list(out.shape)} for an input of shape "
                         f"{list(x.shape)}: it must return x0_hat shaped like x")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def keyword_names(denoiser: Callable):
    """``(names the denoiser takes by keyword, whether it takes **kwargs)`` from its
    signature (its ``forward``'s for a module); None where there is none to read."""
    fn = getattr(denoiser, "forward", denoiser)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins, C extensions
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return ({p.name for p in params if p.kind in named},
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))


def check_cond_keywords(denoiser: Callable, cond: dict, *, where: str,
                        options: Iterable[str] = ()) -> None:
    """ValueError for a conditioning keyword that is surely a mistake: one named like an
    option of a related function (`options`), or one the denoiser cannot take."""
    if not cond:
        return
    misplaced = sorted(k for k in cond if k in set(options))
    if misplaced:
        raise ValueError(f"{where}() got {misplaced}, which {where}() does not take; unknown "
                         f"keywords are passed to the denoiser as conditioning, and these are "
                         f"options of another function (fit_dode / distill / sample?)")
    signature = keyword_names(denoiser)
    if signature is None or signature[1]:
        return
    names = signature[0]
    unknown = sorted(k for k in cond if k not in names)
    if unknown:
        fn = getattr(denoiser, "forward", denoiser)
        raise ValueError(f"{where}() got {unknown}: neither an argument of {where}() nor a "
                         f"parameter of the denoiser {getattr(fn, '__qualname__', fn)!r} "
                         f"(which takes {sorted(names)})")


def check_int(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``int(value)``, or ValueError naming `name` unless an integer (not a bool) in range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum \
            or (maximum is not None and value > maximum):
        want = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{name} must be an integer {want}, got {value!r}")
    return int(value)


def step_range(num_steps: int, progress: bool, desc: str):
    """range(num_steps), wrapped in a tqdm bar when `progress` is true."""
    if not progress:
        return range(num_steps)
    from tqdm.auto import trange

    return trange(num_steps, desc=desc, leave=False)


def emit(callback: Optional[Callable], i: int, x: torch.Tensor, x_next: torch.Tensor,
         sigma: float, sigma_next: float, denoised: Optional[torch.Tensor], **extra) -> None:
    """Calls ``callback`` after each step with 'i', 'x' (at 'sigma'), 'x_next' (at
    'sigma_next'), 'denoised' (the x0 estimate at x; AFS: ``x - sigma * d_0``) and `extra`."""
    if callback is not None:
        callback({"i": i, "x": x, "x_next": x_next, "sigma": sigma, "sigma_next": sigma_next,
                  "denoised": denoised, **extra})


def integrate(denoiser: Callable, x: torch.Tensor, sigmas, direction: Callable, desc: str,
              callback: Optional[Callable], progress: bool, afs: bool, cond: dict,
              rule: Optional[Callable] = None) -> torch.Tensor:
    """The loop of the solvers that move along one direction per step (Euler, Heun,
    DPM-Solver-2, iPNDM) and of their D-ODE variants:

        d_n     = (x_n - D(x_n, sigma_n)) / sigma_n     (AFS on step 0 with ``afs``)
        v_n     = direction(i, x_n, d_n, sigmas)
        x_{n+1} = x_n + h_n v_n [+ lambda_n h_n (v_n - v_{n-1})]   (D-ODE, with ``rule``)

    ``rule(i, a, b) -> lambda_i`` gets the base step ``a`` and ``b = h_n (v_n - v_{n-1})``;
    step 0 is the base step."""
    s = sigma_list(sigmas)
    v_prev = None
    for i in step_range(len(s) - 1, progress, desc):
        d, denoised = gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)
        h = s[i + 1] - s[i]
        v = direction(i, x, d, s)
        x_next = x + h * v
        extra = {}
        if rule is not None:
            lam = 0.0
            if v_prev is not None:
                b = h * (v - v_prev)
                lam = float(rule(i, x_next, b))
                x_next = x_next + lam * b if lam != 0.0 else x_next
            extra, v_prev = {"lambda": lam}, v
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised, **extra)
        x = x_next
    return x


def lam(sigma: float) -> float:
    """Half log-SNR for EDM's alpha = 1: lambda = -log(sigma)."""
    return -math.log(sigma)


def phi(m: int, h: float) -> float:
    """psi_m(h) = e^{-h} int_0^h e^tau tau^(m-1)/(m-1)! dtau (m >= 1, h >= 0): the weights
    of the exponential integrator ``x_t = e^{-h} x_s + sum_n psi_{n+1}(h) D^(n)(lambda_s)``
    (DPM-Solver++, UniPC). Closed form ``(-1)^m (e^{-h} - sum_{i<m} (-h)^i / i!)``; for
    h < 2 the series ``sum_j (-1)^j h^(j+m) / (j+m)!``, which avoids the cancellation."""
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
