"""DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r_1 = 1/2), noise prediction, EDM sigma form.

For ``alpha = 1`` the half log-SNR is ``lambda = -log sigma`` and the first-order
exponential integrator with noise prediction ``eps = d`` reduces to Euler in sigma. The
second-order method evaluates eps once at the midpoint in lambda (geometric mean of the
two sigmas) and uses it for the whole step:

    sigma_mid = sqrt(sigma_n * sigma_{n+1})                    (r = 0.5 in log sigma)
    d_n       = (x_n - D(x_n, sigma_n)) / sigma_n
    u         = x_n + (sigma_mid - sigma_n) * d_n
    d_mid     = (u - D(u, sigma_mid)) / sigma_mid
    x_{n+1}   = x_n + (sigma_{n+1} - sigma_n) * d_mid

(paper: ``u = x_s - sigma_s1 (e^{h/2} - 1) eps(x_s)``, ``x_t = x_s - sigma_t (e^h - 1)
eps(u, s1)``, identical for alpha = 1). Global error O(h^2). The grid ends at
``sigma_min > 0``, so every step, the last one included, is a DPM-Solver-2 step.

NFE rule: 2 denoiser calls per step, N steps -> 2N; with ``afs=True`` the first ``d_0``
is analytic, N steps -> 2N - 1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .common import denoise, emit, gradient, sigma_list, step_range, to_d

__all__ = ["sample_dpm2"]


def sample_dpm2(denoiser: Callable, x: torch.Tensor, sigmas, *, callback: Optional[Callable] = None,
                progress: bool = False, afs: bool = False, **cond) -> torch.Tensor:
    """DPM-Solver-2 from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring)."""
    s = sigma_list(sigmas)
    for i in step_range(len(s) - 1, progress, "dpm2"):
        d, denoised = gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)
        s_mid = math.sqrt(s[i] * s[i + 1])
        u = x + (s_mid - s[i]) * d
        d_mid = to_d(u, denoise(denoiser, u, s_mid, cond), s_mid)
        x_next = x + (s[i + 1] - s[i]) * d_mid
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised)
        x = x_next
    return x
