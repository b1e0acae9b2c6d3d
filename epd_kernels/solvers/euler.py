"""Euler (= DDIM) in EDM's sigma variable.

Karras et al. 2022, Alg. 1 without the correction; DDIM is exactly Euler in ``sigma``:

    d_n     = (x_n - D(x_n, sigma_n)) / sigma_n
    x_{n+1} = x_n + (sigma_{n+1} - sigma_n) * d_n

Global error O(h). One call per step: N steps -> N - afs calls (docs/design.md, "NFE rules").
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import integrate

__all__ = ["sample_euler", "sample_ddim"]


def euler_direction(i, x, d, s):
    """v_n = d_n."""
    return d


def sample_euler(denoiser: Callable, x: torch.Tensor, sigmas, *,
                 callback: Optional[Callable] = None, progress: bool = False, afs: bool = False,
                 **cond) -> torch.Tensor:
    """Euler / DDIM from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring)."""
    return integrate(denoiser, x, sigmas, euler_direction, "euler", callback, progress, afs,
                     cond)


#: DDIM is Euler in the sigma variable (deterministic, eta = 0).
sample_ddim = sample_euler
