"""Euler (= DDIM) in EDM's sigma variable.

Formula (Karras et al. 2022, Alg. 1 without the correction; Song et al. 2021 DDIM, which
is exactly Euler in ``sigma = sigma_t / alpha_t`` for the probability-flow ODE):

    d_n     = (x_n - D(x_n, sigma_n)) / sigma_n
    x_{n+1} = x_n + (sigma_{n+1} - sigma_n) * d_n

First-order accurate: global error O(h).

NFE rule: one denoiser call per step, N steps -> N calls; with ``afs=True`` the first
gradient is the analytic ``x_0 / sqrt(1 + sigma_0^2)``, so N steps -> N - 1 calls.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import emit, gradient, sigma_list, step_range

__all__ = ["sample_euler", "sample_ddim"]


def sample_euler(denoiser: Callable, x: torch.Tensor, sigmas, *, callback: Optional[Callable] = None,
                 progress: bool = False, afs: bool = False, **cond) -> torch.Tensor:
    """Euler / DDIM from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring)."""
    s = sigma_list(sigmas)
    for i in step_range(len(s) - 1, progress, "euler"):
        d, denoised = gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)
        x_next = x + (s[i + 1] - s[i]) * d
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised)
        x = x_next
    return x


#: DDIM is Euler in the sigma variable (deterministic, eta = 0).
sample_ddim = sample_euler
