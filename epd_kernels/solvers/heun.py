"""EDM's second-order Heun solver (Karras et al. 2022, Algorithm 1, deterministic).

Per step n, ``h = sigma_{n+1} - sigma_n``:

    d_n      = (x_n - D(x_n, sigma_n)) / sigma_n
    x~       = x_n + h * d_n                                   (Euler predictor)
    d~       = (x~ - D(x~, sigma_{n+1})) / sigma_{n+1}
    x_{n+1}  = x_n + h * (d_n + d~) / 2                        (trapezoidal corrector)

The correction is applied on every step, the last one included, because the grid ends at
``sigma_min > 0`` (EDM skips it only when the next sigma is 0). Global error O(h^2).

NFE rule: 2 denoiser calls per step, N steps -> 2N; with ``afs=True`` the first ``d_0``
is analytic, N steps -> 2N - 1 (so odd budgets 3, 5, 7, 9 are reachable).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import denoise, emit, gradient, sigma_list, step_range, to_d

__all__ = ["sample_heun"]


def sample_heun(denoiser: Callable, x: torch.Tensor, sigmas, *, callback: Optional[Callable] = None,
                progress: bool = False, afs: bool = False, **cond) -> torch.Tensor:
    """EDM Heun from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring)."""
    s = sigma_list(sigmas)
    for i in step_range(len(s) - 1, progress, "heun"):
        d, denoised = gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)
        h = s[i + 1] - s[i]
        x_pred = x + h * d
        d_pred = to_d(x_pred, denoise(denoiser, x_pred, s[i + 1], cond), s[i + 1])
        x_next = x + h * 0.5 * (d + d_pred)
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised)
        x = x_next
    return x
