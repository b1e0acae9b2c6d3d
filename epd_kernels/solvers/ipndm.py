"""iPNDM: improved pseudo-numerical method (Zhang & Chen 2023, DEIS paper App.; Liu et al.
2022 PNDM), i.e. explicit Adams-Bashforth on the gradient d with fixed coefficients.

Per step n, ``h_n = sigma_{n+1} - sigma_n``, ``d_n = (x_n - D(x_n, sigma_n)) / sigma_n``,
order ``p = min(max_order, n + 1)`` (lower order during the warm-up, history = past d's):

    p = 1:  x_{n+1} = x_n + h_n d_n
    p = 2:  x_{n+1} = x_n + h_n (3 d_n - d_{n-1}) / 2
    p = 3:  x_{n+1} = x_n + h_n (23 d_n - 16 d_{n-1} + 5 d_{n-2}) / 12
    p = 4:  x_{n+1} = x_n + h_n (55 d_n - 59 d_{n-1} + 37 d_{n-2} - 9 d_{n-3}) / 24

The coefficients are those of constant-step Adams-Bashforth (as in the EPD, AMED and
diff-sampler code), used unchanged on non-uniform grids. On a grid uniform in sigma the
method has global order 4. On a smoothly graded grid (polynomial / logSNR) a constant-
coefficient AB-p is still consistent, but the step-size variation leaves a local error
``~ h_n (h_n - h_{n-1}) d'`` (for p >= 2), so the asymptotic global order there is 2;
at few steps the higher-order terms dominate and iPNDM is one of the best baselines.

NFE rule: one denoiser call per step, N steps -> N; with ``afs=True`` the first gradient
(which also enters the history) is analytic, N steps -> N - 1.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .common import emit, gradient, sigma_list, step_range

__all__ = ["sample_ipndm", "AB_COEFFS", "ab_direction", "push_history"]

#: Adams-Bashforth coefficients, newest gradient first, for orders 1..4.
AB_COEFFS = (
    (1.0,),
    (3.0 / 2.0, -1.0 / 2.0),
    (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
)


def ab_direction(history: List[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of ``history`` (newest gradient first) at the order
    ``len(history)`` (1..4): the fixed iPNDM coefficients, whatever the step sizes."""
    coeffs = AB_COEFFS[len(history) - 1]
    direction = coeffs[0] * history[0]
    for c, d_old in zip(coeffs[1:], history[1:]):
        direction = direction + c * d_old
    return direction


def push_history(history: List[torch.Tensor], v: torch.Tensor, max_order: int) -> None:
    """Appends ``v`` to an oldest-first history that keeps the ``max_order - 1`` newest
    gradients (what AB of order ``max_order`` needs beside the current one)."""
    if max_order > 1:
        history.append(v)
        if len(history) > max_order - 1:
            history.pop(0)


def sample_ipndm(denoiser: Callable, x: torch.Tensor, sigmas, *, callback: Optional[Callable] = None,
                 progress: bool = False, afs: bool = False, max_order: int = 4,
                 **cond) -> torch.Tensor:
    """iPNDM from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring).

    ``max_order`` in 1..4 caps the Adams-Bashforth order (default 4).
    """
    if isinstance(max_order, bool) or int(max_order) != max_order or not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be an integer in 1..4, got {max_order!r}")
    s = sigma_list(sigmas)
    history: List[torch.Tensor] = []  # newest first
    for i in step_range(len(s) - 1, progress, "ipndm"):
        d, denoised = gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)
        history.insert(0, d)
        del history[int(max_order):]
        x_next = x + (s[i + 1] - s[i]) * ab_direction(history)
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised)
        x = x_next
    return x
