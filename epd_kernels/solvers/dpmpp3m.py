"""DPM-Solver++(3M): multistep, data prediction, third order (Lu et al. 2022, "DPM-Solver++").

With EDM's ``alpha = 1`` the half log-SNR is ``lambda = -log sigma`` and the exact solution
of the ODE from ``sigma_n`` to ``sigma_{n+1}`` (``h = lambda_{n+1} - lambda_n > 0``) is

    x_{n+1} = e^{-h} x_n + sigma_{n+1} int_{lambda_n}^{lambda_{n+1}} e^lambda D(lambda) dlambda
            = e^{-h} x_n + psi_1(h) D_n + psi_2(h) D'_n + psi_3(h) D''_n + O(h^4)

with ``D^(k)`` derivatives in lambda and (see `common.phi`)

    psi_1 = 1 - e^{-h},   psi_2 = h - 1 + e^{-h},   psi_3 = h^2/2 - h + 1 - e^{-h}.

The multistep method replaces the derivatives by those of the polynomial through the last
``q`` denoised values (Newton form on the nodes lambda_n, lambda_{n-1}, lambda_{n-2};
``a = lambda_n - lambda_{n-1}``):

    q = 1:  D'_n ~ 0                                                (DDIM / DPM-Solver++1)
    q = 2:  D'_n ~ D[n, n-1] = (D_n - D_{n-1}) / a                  (DPM-Solver++(2M))
    q = 3:  D'_n ~ D[n, n-1] + a D[n, n-1, n-2],  D''_n ~ 2 D[n, n-1, n-2]

In the reference code's notation (``r0 = a / h``, ``r1 = (lambda_{n-1} - lambda_{n-2}) / h``,
``D1 = h D'_n``, ``D2 = (D1_0 - D1_1) / (r0 + r1) = h^2 D''_n / 2``) the q = 3 update is
``e^{-h} x + psi_1 D_n + (psi_2 / h) D1 + (2 psi_3 / h^2) D2``. Global error O(h^q).

``variant="reference"`` uses ``psi_3 / h^2`` on D2 instead, as the DPM-Solver(++) and
k-diffusion code does (``- phi_3 * D2`` with ``phi_3 = phi_2 / h - 1/2 = -psi_3 / h^2``).
That weights the D'' term by half its Taylor coefficient (check with D = lambda^2: the
exact increment is ``2 psi_3``, the reference update adds ``psi_3``), so that variant is
asymptotically second order (measured 1.95 on the Gaussian test model, against 3.00
for the default), but its damped extrapolation is often a little more accurate at NFE
<= 10; it is provided to reproduce published baselines.

Order schedule: ``q = min(3, n + 1)`` (warm-up with lower order) and, for grids of fewer
than 10 steps, ``q <= N - n`` on the final steps (``lower_order_final``, as in the
DPM-Solver++ reference code: order 1 on the last step, 2 on the one before), which
stabilises very few-step sampling.

Step-ratio guard (``max_step_ratio``, default 3): a step more than 3 times longer in lambda
than the step before it is taken with order 1. The multistep terms extrapolate the
polynomial through the previous outputs across the new step, which multiplies their error
by about ``(h / a)^(q - 1)``; near ``sigma_min`` the time-uniform (VP) grid has
``sigma ~ sqrt(t)``, so its last step grows in lambda with N (6-7 times the step before it
at 10-80 steps) and, without the guard, sampling there did not converge (UniPC on
``load_model("gmm")``, time-uniform grid, RMSE at 10 / 20 / 40 / 80 steps: 0.73 / 0.24 /
0.25 / 0.11; with it 0.086 / 0.034 / 0.013 / 0.0055; see the test
``test_multistep_converges_on_time_uniform_grid``). The polynomial and log-SNR grids have ratios below 1.6, so the guard never
fires there. ``max_step_ratio=None`` turns it off (the reference code's behaviour).

NFE rule: one denoiser call per step (at sigma_0 .. sigma_{N-1}), N steps -> N; with
``afs=True`` the first denoised value is ``x_0 - sigma_0 d_0`` from the analytic first
gradient, N steps -> N - 1.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from .common import afs_d, denoise, emit, lam, phi, sigma_list, step_range

__all__ = ["sample_dpmpp3m", "multistep_order", "step_ratio", "MAX_STEP_RATIO"]


#: Default of ``max_step_ratio``: a step this many times longer (in lambda) than the one
#: before it is taken with order 1 (module docstring).
MAX_STEP_RATIO = 3.0


def step_ratio(lams, i: int) -> Optional[float]:
    """h_i / h_{i-1} in lambda (None on the first step)."""
    if i == 0:
        return None
    return (lams[i + 1] - lams[i]) / (lams[i] - lams[i - 1])


def check_max_step_ratio(max_step_ratio) -> Optional[float]:
    if max_step_ratio is None:
        return None
    if isinstance(max_step_ratio, bool) or not isinstance(max_step_ratio, (int, float)) \
            or not math.isfinite(max_step_ratio) or max_step_ratio < 1.0:
        raise ValueError(f"max_step_ratio must be a number >= 1 or None, got {max_step_ratio!r}")
    return float(max_step_ratio)


def multistep_order(i: int, num_steps: int, max_order: int, lower_order_final: bool,
                    ratio: Optional[float] = None, max_step_ratio: Optional[float] = None) -> int:
    """The order used on step i of a multistep method: warm-up, lower-order final steps,
    and order 1 on a step ``ratio`` = h_i / h_{i-1} > ``max_step_ratio`` times longer than
    the one before it."""
    q = min(max_order, i + 1)
    if lower_order_final and num_steps < 10:
        q = min(q, num_steps - i)
    if ratio is not None and max_step_ratio is not None and ratio > max_step_ratio:
        q = 1
    return max(q, 1)


def sample_dpmpp3m(denoiser: Callable, x: torch.Tensor, sigmas, *,
                   callback: Optional[Callable] = None, progress: bool = False,
                   afs: bool = False, max_order: int = 3, lower_order_final: bool = True,
                   variant: str = "exact", max_step_ratio: Optional[float] = MAX_STEP_RATIO,
                   **cond) -> torch.Tensor:
    """DPM-Solver++(3M) from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` (see module docstring).

    ``max_order`` in 1..3 (3: DPM-Solver++(3M), 2: (2M)); ``lower_order_final`` and
    ``max_step_ratio`` as above; ``variant`` "exact" (third order) or "reference" (the
    DPM-Solver / k-diffusion code's D'' weight, see the module docstring).
    """
    if isinstance(max_order, bool) or int(max_order) != max_order or not 1 <= max_order <= 3:
        raise ValueError(f"max_order must be an integer in 1..3, got {max_order!r}")
    if variant not in ("exact", "reference"):
        raise ValueError(f"variant must be 'exact' or 'reference', got {variant!r}")
    max_step_ratio = check_max_step_ratio(max_step_ratio)
    c2 = 2.0 if variant == "exact" else 1.0
    s = sigma_list(sigmas)
    N = len(s) - 1
    lams = [lam(v) for v in s]
    hist: List[Tuple[float, torch.Tensor]] = []  # (lambda, denoised), newest first
    for i in step_range(N, progress, "dpmpp3m"):
        if afs and i == 0:
            denoised = x - s[0] * afs_d(x, s[0])
        else:
            denoised = denoise(denoiser, x, s[i], cond)
        hist.insert(0, (lams[i], denoised))
        del hist[3:]
        q = min(multistep_order(i, N, int(max_order), lower_order_final,
                                step_ratio(lams, i), max_step_ratio), len(hist))
        h = lams[i + 1] - lams[i]
        x_next = math.exp(-h) * x + phi(1, h) * denoised
        if q >= 2:
            (l0, D0), (l1, D1) = hist[0], hist[1]
            a = l0 - l1
            dd01 = (D0 - D1) / a
            if q == 2:
                x_next = x_next + phi(2, h) * dd01
            else:
                l2, D2 = hist[2]
                dd12 = (D1 - D2) / (l1 - l2)
                dd012 = (dd01 - dd12) / (l0 - l2)
                x_next = x_next + phi(2, h) * (dd01 + a * dd012) + (c2 * phi(3, h)) * dd012
        emit(callback, i, x, x_next, s[i], s[i + 1], denoised)
        x = x_next
    return x
