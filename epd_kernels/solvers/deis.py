"""DEIS (Zhang & Chen 2023): exponential-integrator multistep, "tAB" (Adams-Bashforth in t).

With ``alpha = 1`` and ``eps = d = (x - D) / sigma``, the exponential integrator is
``x_{n+1} = x_n + int_{sigma_n}^{sigma_{n+1}} eps dsigma``. tAB-DEIS integrates exactly the
Lagrange polynomial through the last q values of eps in the VP-SDE time t
(`schedules.vp_sigma_inv`):

    x_{n+1} = x_n + sum_{j<q} C_{n,j} eps_{n-j},
    C_{n,j} = int_{sigma_n}^{sigma_{n+1}} L_j(t(sigma)) dsigma,
    L_j(t)  = prod_{m<q, m!=j} (t - t_{n-m}) / (t_{n-j} - t_{n-m}).

``mode="rhoab"`` fits in ``rho = sigma`` instead. Coefficients: once per grid, Gauss-Legendre
in ``log sigma`` (8 panels x 32 nodes: float64 round-off). ``q = min(max_order, n + 1)``;
``max_order = 3`` (the paper's tAB2) gives global order 3; q = 1 is Euler/DDIM.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .common import check_int, emit, gradient, sigma_list, step_range
from .schedules import vp_sigma_inv

__all__ = ["sample_deis"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(32)
_PANELS = 8


def _quadrature_in_sigma(s_a: float, s_b: float):
    """Nodes and weights for int_{s_a}^{s_b} f(sigma) dsigma: composite Gauss-Legendre in
    u = log sigma (dsigma = sigma du), `_PANELS` panels of 32 nodes."""
    edges = np.linspace(math.log(s_a), math.log(s_b), _PANELS + 1)
    half = 0.5 * (edges[1:] - edges[:-1])                      # [P]
    mid = 0.5 * (edges[1:] + edges[:-1])
    u = (mid[:, None] + half[:, None] * _GL_NODES[None]).ravel()  # [P * 32]
    sig = np.exp(u)
    w = (half[:, None] * _GL_WEIGHTS[None]).ravel() * sig
    return sig, w


def deis_coefficients(sigmas: Sequence[float], max_order: int = 3,
                      mode: str = "tab") -> List[List[float]]:
    """C[n][j]: the weight of eps_{n-j} in step n (see module docstring), float64."""
    if mode == "tab":
        to_t = vp_sigma_inv
    elif mode == "rhoab":
        to_t = lambda s: s  # noqa: E731
    else:
        raise ValueError(f"mode must be 'tab' or 'rhoab', got {mode!r}")
    s = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    ts = to_t(s)
    coeffs = []
    for n in range(len(s) - 1):
        q = min(max_order, n + 1)
        nodes = [ts[n - j] for j in range(q)]
        sig, w = _quadrature_in_sigma(s[n], s[n + 1])
        t = to_t(sig)
        row = []
        for j in range(q):
            basis = np.ones_like(t)
            for m in range(q):
                if m != j:
                    basis = basis * (t - nodes[m]) / (nodes[j] - nodes[m])
            row.append(float(np.dot(w, basis)))
        coeffs.append(row)
    return coeffs


def sample_deis(denoiser: Callable, x: torch.Tensor, sigmas, *,
                callback: Optional[Callable] = None, progress: bool = False, afs: bool = False,
                max_order: int = 3, mode: str = "tab", **cond) -> torch.Tensor:
    """DEIS (tAB by default) from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``; ``max_order`` in
    1..4 is the number of eps values in the polynomial (the global order)."""
    max_order = check_int("max_order", max_order, 1, 4)
    s = sigma_list(sigmas)
    C = deis_coefficients(s, max_order, mode)
    history: List[torch.Tensor] = []  # eps values, newest first
    for i in step_range(len(s) - 1, progress, "deis"):
        eps, denoised = gradient(denoiser, x, s[i], cond, analytic=afs and i == 0)
        history.insert(0, eps)
        del history[max_order:]
        x_next = x
        for c, e in zip(C[i], history):
            x_next = x_next + c * e
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised)
        x = x_next
    return x
