"""DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r_1 = 1/2), noise prediction, EDM sigma form.

For ``alpha = 1`` the noise-prediction exponential integrator is Euler in sigma; the
second-order method evaluates eps = d once at the midpoint in lambda = -log sigma, on every
step, the last one included (global error O(h^2)):

    sigma_mid = sqrt(sigma_n * sigma_{n+1})                    (r = 0.5 in log sigma)
    d_n       = (x_n - D(x_n, sigma_n)) / sigma_n
    u         = x_n + (sigma_mid - sigma_n) * d_n
    d_mid     = (u - D(u, sigma_mid)) / sigma_mid
    x_{n+1}   = x_n + (sigma_{n+1} - sigma_n) * d_mid
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .common import denoise, integrate, to_d

__all__ = ["sample_dpm2"]


def sample_dpm2(denoiser: Callable, x: torch.Tensor, sigmas, *,
                callback: Optional[Callable] = None, progress: bool = False, afs: bool = False,
                **cond) -> torch.Tensor:
    """DPM-Solver-2 from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring)."""
    def midpoint_direction(i, x, d, s):
        s_mid = math.sqrt(s[i] * s[i + 1])
        u = x + (s_mid - s[i]) * d
        return to_d(u, denoise(denoiser, u, s_mid, cond), s_mid)

    return integrate(denoiser, x, sigmas, midpoint_direction, "dpm2", callback, progress, afs,
                     cond)
