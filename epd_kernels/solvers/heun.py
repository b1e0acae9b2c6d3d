"""EDM's second-order Heun solver (Karras et al. 2022, Algorithm 1, deterministic).

Per step n, ``h = sigma_{n+1} - sigma_n``, the last step included (the grid ends at
sigma_min > 0):

    d_n      = (x_n - D(x_n, sigma_n)) / sigma_n
    x~       = x_n + h * d_n                                   (Euler predictor)
    d~       = (x~ - D(x~, sigma_{n+1})) / sigma_{n+1}
    x_{n+1}  = x_n + h * (d_n + d~) / 2                        (trapezoidal corrector)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import denoise, integrate, to_d

__all__ = ["sample_heun"]


def heun_direction(denoiser: Callable, cond: dict) -> Callable:
    """``direction(i, x, d, s)`` of Heun: ``(d_n + d~) / 2`` (module docstring)."""
    def direction(i, x, d, s):
        x_pred = x + (s[i + 1] - s[i]) * d
        return 0.5 * (d + to_d(x_pred, denoise(denoiser, x_pred, s[i + 1], cond), s[i + 1]))

    return direction


def sample_heun(denoiser: Callable, x: torch.Tensor, sigmas, *,
                callback: Optional[Callable] = None, progress: bool = False, afs: bool = False,
                **cond) -> torch.Tensor:
    """EDM Heun from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring)."""
    return integrate(denoiser, x, sigmas, heun_direction(denoiser, cond), "heun", callback,
                     progress, afs, cond)
