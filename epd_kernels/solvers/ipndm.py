"""iPNDM: improved pseudo-numerical method (Zhang & Chen 2023, DEIS paper App.; Liu et al.
2022 PNDM), i.e. explicit Adams-Bashforth on the gradient d with fixed coefficients.

Per step n, ``h_n = sigma_{n+1} - sigma_n``, ``d_n = (x_n - D(x_n, sigma_n)) / sigma_n``,
order ``p = min(max_order, n + 1)`` (history = past d's, the AFS gradient included):

    p = 1:  x_{n+1} = x_n + h_n d_n
    p = 2:  x_{n+1} = x_n + h_n (3 d_n - d_{n-1}) / 2
    p = 3:  x_{n+1} = x_n + h_n (23 d_n - 16 d_{n-1} + 5 d_{n-2}) / 12
    p = 4:  x_{n+1} = x_n + h_n (55 d_n - 59 d_{n-1} + 37 d_{n-2} - 9 d_{n-3}) / 24

The constant-step coefficients (as in the EPD, AMED and diff-sampler code) are used unchanged
on non-uniform grids: global order 4 on a uniform grid, 2 on a graded one.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .common import check_int, integrate

__all__ = ["sample_ipndm", "AB_COEFFS", "ab_direction", "push_history"]

#: Adams-Bashforth coefficients, newest gradient first, for orders 1..4.
AB_COEFFS = (
    (1.0,),
    (3.0 / 2.0, -1.0 / 2.0),
    (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
)


def ab_direction(d: torch.Tensor, history: List[torch.Tensor], max_order: int = 4):
    """AB_p(d, history[0], history[1], ...) with the fixed iPNDM coefficients, ``history``
    newest first, p = min(max_order, len(history) + 1)."""
    coeffs = AB_COEFFS[min(max_order, len(history) + 1) - 1]
    direction = coeffs[0] * d
    for c, d_old in zip(coeffs[1:], history):
        direction = direction + c * d_old
    return direction


def push_history(history: List[torch.Tensor], d: torch.Tensor, max_order: int) -> None:
    """Puts ``d`` first in a newest-first history that keeps the ``max_order - 1`` newest
    gradients (what AB of order ``max_order`` needs beside the current one)."""
    history.insert(0, d)
    del history[max_order - 1:]


def ipndm_direction(max_order: int) -> Callable:
    """``direction(i, x, d, s)`` of iPNDM: AB of d_n and the past d's (module docstring)."""
    history: List[torch.Tensor] = []

    def direction(i, x, d, s):
        v = ab_direction(d, history, max_order)
        push_history(history, d, max_order)
        return v

    return direction


def sample_ipndm(denoiser: Callable, x: torch.Tensor, sigmas, *,
                 callback: Optional[Callable] = None, progress: bool = False, afs: bool = False,
                 max_order: int = 4, **cond) -> torch.Tensor:
    """iPNDM from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``; ``max_order`` in 1..4 caps the
    Adams-Bashforth order."""
    direction = ipndm_direction(check_int("max_order", max_order, 1, 4))
    return integrate(denoiser, x, sigmas, direction, "ipndm", callback, progress, afs, cond)
