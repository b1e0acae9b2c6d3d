"""UniPC (Zhao et al. 2023): unified predictor-corrector, data prediction, variant bh2.

Notation as in `dpmpp3m`; ``m_k = D(x_k, sigma_k)``. For points ``lambda_n + r_k h`` with
values ``m_(k)`` a step is

    x_{n+1} = e^{-h} x_n + psi_1(h) m_n + B(h) sum_k a_k (m_(k) - m_n) / r_k

with ``a`` matching the exact solution's Taylor terms up to ``j = K`` (K points):

    sum_k a_k r_k^(j-1) = j! psi_{j+1}(h) / (h^j B(h)),     j = 1..K

(the paper's ``R_p(h) a_p = g_p(h) / B(h)``; ``B(h) = 1 - e^{-h}`` is "bh2", ``B(h) = h``
"bh1"), solved exactly for K >= 2; for one point ``a_1 = 1/2``, the h -> 0 limit.

* UniP-p (predictor): the K = p - 1 previous outputs, ``r_k = (lambda_{n-k} - lambda_n) / h``.
* UniC (corrector): with ``m_{n+1} = D(x~_{n+1}, sigma_{n+1})`` at the predicted state, the
  step from x_n is redone with the points plus ``r = 1``, raising the order by one;
  ``m_{n+1}`` is reused by the next step (no extra call). None after the final step.

Order: `dpmpp3m.multistep_order` capped by ``order`` (the previous step's corrector is
unaffected); predictor order p gives global order p + 1 (UniPC paper, Thm. 3.1).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .common import check_int, denoise, emit, gradient, lam, phi, sigma_list, step_range
from .dpmpp3m import MAX_STEP_RATIO, check_multistep, multistep_order, step_ratio

__all__ = ["sample_unipc"]


def unipc_coefficients(rs: Sequence[float], h: float,
                       variant: str = "bh2") -> Tuple[float, List[float]]:
    """(B(h), a) for the relative points ``rs`` (see module docstring), in float64."""
    if variant == "bh2":
        B = phi(1, h)
    elif variant == "bh1":
        B = h
    else:
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    K = len(rs)
    if K == 0:
        return B, []
    if K == 1:
        return B, [0.5]
    R = np.array([[r ** (j - 1) for r in rs] for j in range(1, K + 1)], dtype=np.float64)
    g = np.array([math.factorial(j) * phi(j + 1, h) / (h ** j * B) for j in range(1, K + 1)])
    return B, np.linalg.solve(R, g).tolist()


def _unipc_update(x, m0, lam0, h, points, variant):
    """e^{-h} x + psi_1 m0 + B sum_k a_k (m_k - m0) / r_k over points = [(lambda_k, m_k)]."""
    out = math.exp(-h) * x + phi(1, h) * m0
    if points:
        rs = [(lk - lam0) / h for lk, _ in points]
        B, a = unipc_coefficients(rs, h, variant)
        acc = None
        for ak, rk, (_, mk) in zip(a, rs, points):
            term = (ak / rk) * (mk - m0)
            acc = term if acc is None else acc + term
        out = out + B * acc
    return out


def sample_unipc(denoiser: Callable, x: torch.Tensor, sigmas, *,
                 callback: Optional[Callable] = None, progress: bool = False, afs: bool = False,
                 order: int = 3, variant: str = "bh2", lower_order_final: bool = True,
                 max_step_ratio: Optional[float] = MAX_STEP_RATIO, **cond) -> torch.Tensor:
    """UniPC from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``; ``order`` in 1..3 is the
    predictor order p, ``variant`` "bh2" or "bh1" (module docstring)."""
    order = check_int("order", order, 1, 3)
    max_step_ratio = check_multistep(variant, ("bh1", "bh2"), max_step_ratio)
    s = sigma_list(sigmas)
    N = len(s) - 1
    lams = [lam(v) for v in s]
    _, m = gradient(denoiser, x, s[0], cond, analytic=afs)
    hist: List[Tuple[float, torch.Tensor]] = [(lams[0], m)]  # newest first
    prev = None  # (x_n, previous points used by the predictor) for the corrector
    for i in step_range(N, progress, "unipc"):
        if i > 0:
            m_new = denoise(denoiser, x, s[i], cond)
            x_base, m_base, pts = prev
            # UniC: redo the step from x_{i-1} with the new value at r = 1.
            x = _unipc_update(x_base, m_base, lams[i - 1], lams[i] - lams[i - 1],
                              pts + [(lams[i], m_new)], variant)
            hist.insert(0, (lams[i], m_new))
            del hist[order:]
        p = multistep_order(i, N, order, lower_order_final, step_ratio(lams, i),
                            max_step_ratio)
        m_i = hist[0][1]
        pts = hist[1:p]
        h = lams[i + 1] - lams[i]
        x_next = _unipc_update(x, m_i, lams[i], h, pts, variant)  # UniP-p
        emit(callback, i, x, x_next, s[i], s[i + 1], m_i)
        prev = (x, m_i, pts)
        x = x_next
    return x
