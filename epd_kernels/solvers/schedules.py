"""Noise-level grids (time schedules) for the samplers, in EDM's sigma convention.

``get_sigmas(kind, num_steps)``: ``num_steps + 1`` strictly decreasing levels from
``sigma_max`` to ``sigma_min`` (no appended zero), computed in float64, cast to ``dtype``.
With ``i = 0..N``, ``N = num_steps``:

- ``"polynomial"`` (EDM eq. 5; ``rho = 1`` uniform in sigma, ``rho -> inf`` log-SNR)::

      sigma_i = (sigma_max^(1/rho) + i/N * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

- ``"logsnr"``: uniform in ``log sigma`` (the half log-SNR for EDM's ``alpha = 1``);
- ``"time-uniform"``: the EPD authors' VP-SDE time grid (``beta_d = 19.9``,
  ``beta_min = 0.1``), ends set to exactly ``sigma_max`` and ``sigma_min``::

      sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),   t_i uniform in t

- ``"explicit"``: the list/tensor given as ``sigmas`` (strictly decreasing, all > 0).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["SCHEDULES", "get_sigmas", "check_sigmas", "vp_sigma", "vp_sigma_inv"]

VP_BETA_D = 19.9
VP_BETA_MIN = 0.1

#: Canonical schedule names.
SCHEDULES = ("polynomial", "logsnr", "time-uniform", "explicit")

_ALIASES = {"polynomial": "polynomial", "karras": "polynomial", "edm": "polynomial",
            "logsnr": "logsnr", "log-snr": "logsnr", "log_snr": "logsnr",
            "time-uniform": "time-uniform", "time_uniform": "time-uniform",
            "timeuniform": "time-uniform", "vp": "time-uniform", "explicit": "explicit"}

SigmasLike = Union[torch.Tensor, Sequence[float]]


def vp_sigma(t, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) of the VP-SDE (tensor or float)."""
    m = torch if isinstance(t, torch.Tensor) else math
    return m.sqrt(m.expm1(0.5 * beta_d * t * t + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN):
    """The exact inverse t(sigma) of `vp_sigma` (tensor, numpy array or float): the root t > 0
    of ``beta_d t^2 / 2 + beta_min t = L = log(1 + sigma^2)``, written without cancellation
    as ``2 L / (sqrt(beta_min^2 + 2 beta_d L) + beta_min)``."""
    m = torch if isinstance(sigma, torch.Tensor) else np if isinstance(sigma, np.ndarray) else math
    L = m.log1p(sigma * sigma)
    return 2.0 * L / (m.sqrt(beta_min ** 2 + 2.0 * beta_d * L) + beta_min)


def check_positive(name: str, value) -> float:
    """``float(value)``, or ValueError naming `name` unless it is a finite real > 0."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)) \
            or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_sigmas(sigmas: SigmasLike, name: str = "sigmas") -> torch.Tensor:
    """An explicit grid as a 1-D float64 CPU tensor; ValueError naming `name` unless it has
    at least two values (one step), all finite and > 0, strictly decreasing."""
    if sigmas is None:
        raise ValueError(f"{name} must be given (a 1-D list or tensor of noise levels)")
    try:
        s = torch.as_tensor(sigmas.detach() if isinstance(sigmas, torch.Tensor) else sigmas,
                            dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a 1-D list or tensor of numbers: {e}") from None
    if s.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(s.shape)}")
    if s.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 noise levels (one step), got {s.numel()}")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} must be finite, got {s.tolist()}")
    if not (s > 0).all():
        raise ValueError(
            f"{name} must all be > 0 (sampling ends at sigma_min > 0; a trailing 0 is not "
            f"supported), got {s.tolist()}")
    steps = s[1:] - s[:-1]
    if not (steps < 0).all():
        i = int(torch.nonzero(steps >= 0)[0])
        raise ValueError(
            f"{name} must be strictly decreasing, but {name}[{i}] = {s[i].item()!r} <= "
            f"{name}[{i + 1}] = {s[i + 1].item()!r}")
    return s


def get_sigmas(kind: str, num_steps: Optional[int] = None, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, sigmas: Optional[SigmasLike] = None,
               device: Union[str, torch.device, None] = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The grid of the module docstring. ``kind``: "polynomial" (alias "karras"), "logsnr",
    "time-uniform" (alias "vp") or "explicit" (``sigmas`` given; ``num_steps`` None or
    ``len(sigmas) - 1``; the ends and ``rho`` unused)."""
    if not isinstance(kind, str):
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    key = _ALIASES.get(kind.strip().lower())
    if key is None:
        raise ValueError(f"kind must be one of {SCHEDULES} (or an alias: "
                         f"{sorted(set(_ALIASES) - set(SCHEDULES))}), got {kind!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(
            num_steps, numbers.Integral) or num_steps < 1):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")

    if key == "explicit":
        if sigmas is None:
            raise ValueError("sigmas must be given when kind='explicit'")
        s = check_sigmas(sigmas, "sigmas")
        if num_steps is not None and int(num_steps) != s.numel() - 1:
            raise ValueError(f"num_steps={num_steps} does not match the explicit sigmas, which "
                             f"have {s.numel()} values = {s.numel() - 1} steps")
    else:
        if sigmas is not None:
            raise ValueError(f"sigmas is only used with kind='explicit', not kind={kind!r}")
        if num_steps is None:
            raise ValueError(f"num_steps must be given for kind={kind!r}")
        n = int(num_steps)
        lo = check_positive("sigma_min", sigma_min)
        hi = check_positive("sigma_max", sigma_max)
        if not lo < hi:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo!r}, "
                             f"sigma_max={hi!r}")
        frac = torch.arange(n + 1, dtype=torch.float64) / n
        if key == "polynomial":
            r = check_positive("rho", rho)
            a, b = hi ** (1.0 / r), lo ** (1.0 / r)
            s = (a + frac * (b - a)) ** r
        elif key == "logsnr":
            s = torch.exp(math.log(hi) + frac * (math.log(lo) - math.log(hi)))
        else:  # time-uniform
            t_hi, t_lo = vp_sigma_inv(hi), vp_sigma_inv(lo)
            s = vp_sigma(t_hi + frac * (t_lo - t_hi))
        # Exact ends (the formulas agree to an ulp; make them bit-exact).
        s[0], s[-1] = hi, lo
        if not (s[1:] < s[:-1]).all():  # only possible for absurdly many steps
            raise ValueError(f"num_steps={n} is too large: neighbouring sigmas coincide in float64")

    out = s.to(dtype=dtype)
    if out.numel() > 1 and not (out[1:] < out[:-1]).all():
        raise ValueError(f"the schedule is not strictly decreasing once cast to {dtype} "
                         f"(num_steps too large for this dtype); use dtype=torch.float64")
    return out.to(device) if device is not None else out
