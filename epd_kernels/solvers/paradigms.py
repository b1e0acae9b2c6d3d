r"""ParaDiGMS: Picard iterations over a sliding window of the Euler (DDIM) trajectory.

Shih, Belkhale, Ermon, Sadigh, Anari, "Parallel Sampling of Diffusion Models", NeurIPS 2023.
Written from the paper's algorithm (Picard iteration, sliding window, tolerance-based
sliding); no code was taken from other implementations.

Grid ``t_0 = sigmas[0] > t_1 > ... > t_S = sigmas[-1]``, ``h_m = t_{m+1} - t_m`` (negative),
``d(x, t) = (x - D(x, t)) / t``. The target is the sequential Euler (= DDIM) trajectory
``x_{m+1} = x_m + h_m d(x_m, t_m)``. ParaDiGMS writes it as a fixed point over a window and
solves that by Picard iteration, like the paper, in the variable of the DDPM/DDIM update,
the VP-scaled state ``y = x / a``, ``a_m = sqrt(1 + t_m^2)`` (``1 / a = sqrt(alpha_bar)``):

    y_k = y_i + sum_{m=i}^{k-1} Delta_m,    Delta_m = DDIM(y_m; t_m -> t_{m+1}) - y_m
                                                    = (x_m + h_m d_m) / a_{m+1} - x_m / a_m.

(Its fixed point is exactly the Euler trajectory. The same sum written in EDM units,
``x_k = x_i + sum h_m d_m``, has the same fixed point but iterates very badly from the
initial guesses: a copy of a state at noise ``t_i`` fed to the network at ``t_k << t_i`` is
far out of distribution in EDM units (norm ~ ``t_i`` instead of ``t_k``) but not in VP units.
Measured on a Gaussian mixture at nfe 3..9, the EDM form gave errors 10..500x larger.)

State: a guess ``x_0 .. x_S`` of the trajectory (initially VP copies of ``x_0``,
``x_k = x_0 a_k / a_0``) and a window ``[i, i + n)``, ``n = min(W, S - i)``. One *round*:

1. gradients ``d_j = d(x_j, t_j)`` for every ``j`` in the window, in ONE batched denoiser
   call of batch ``n * B`` with per-sample sigma (position-major: rows ``j*B .. j*B+B-1``
   are window position ``i + j``; tensor conditioning with leading dim B is repeated the
   same way, see `epd_kernels.branches.repeat_cond`). The call runs inside
   ``parallel_calls(denoiser)``, so a `CountingDenoiser` counts it as 1 latency NFE and
   ``n`` evaluations;
2. Picard update for all positions at once (a cumulative sum):
   ``x'_{i+1} = x_i + h_i d_i`` (exact Euler, kept in EDM units) and
   ``x'_{i+j+1} = a_{i+j+1} (x'_{i+1} / a_{i+1} + sum_{m=i+1}^{i+j} Delta_m)``;
3. error per position ``e_k = ||x'_k - x_k||^2 / D`` (mean over the D dimensions of one
   sample), for ``k = i+1 .. i+n``;
4. slide: ``k*`` = the first position with ``e_k > tol^2 * v_k`` for ANY sample of the
   batch (a NaN error counts as a failure). States before ``k*`` did not move, so they
   are converged, and ``x'_{k*}`` itself is built from converged states only: the window
   start moves to ``k*`` (to ``i + n`` if no position fails). The stride is >= 1 (the
   first new state is always exact Euler) and <= n;
5. the entries after the old window end (``k > i + n``) are refilled with (VP) copies of
   the latest state: ``x_k = x'_{i+n} a_k / a_{i+n}``.

Rounds repeat until the window start reaches S; the result is ``x_S``. Since every round
slides by >= 1, at most S rounds are needed, and at least ``ceil(S / W)``. With
``window=1`` every round is one Euler step: the result IS sequential Euler (bit for bit).
The whole batch shares one window (a position fails if any sample fails), as in the
paper's batched implementation, so with a loose tolerance a sample's result can depend
on the other samples of its batch (all converge to their own Euler solution).

Tolerance (``noise_scale``): the paper compares the per-dimension squared error with
``tol^2`` times the variance of the noise the sampler would inject at that step. In EDM's
sigma units:

* ``"step"`` (default): ``v_k = t_k^2 (t_{k-1}^2 - t_k^2) / t_{k-1}^2``, the variance of the
  noise that an ancestral (DDPM posterior) step from ``t_{k-1}`` to ``t_k`` adds. This is
  the DDPM posterior variance ``beta~`` of the VP formulation divided by ``alpha_bar(t_k)``
  (= ``1 / a_k^2``), so the ratio error / variance is the same in VP and EDM units; it
  shrinks with the step size, so a finer grid is checked more tightly (as the paper's
  per-step noise variance ``g^2(t) / T``).
* ``"sigma"``: ``v_k = t_k^2``, the marginal noise variance of the state at ``t_k`` (a
  relative error ``tol`` of the noise level, independent of the grid).

``tol`` defaults to 1e-3 (the paper's value for DDIM).

Latency budget (``max_rounds``): with ``max_rounds=R`` the run stops after R rounds even
if the window has not reached the end. It then returns the current estimate of ``x_S``
with no further call: the newest state at the end of the last window, ``x'_{e}``
(``e = i + n``), taken to ``t_S`` by one DDIM/Euler jump with the newest gradient (noise
estimate) already computed, ``x_S = x'_e + (t_S - t_e) d_{e-1}``. So the number of
batched calls is ``min(R, rounds to converge)``: exactly R unless ParaDiGMS converged in
fewer rounds, and always exactly R when ``R <= ceil(S / W)``.

Mapping a latency budget ``nfe`` to ParaDiGMS (`paradigms_sampler`, used by ``sample()``):
the latency NFE of ParaDiGMS is the number of sequential batched rounds. ``sample()``
hands over the ``nfe``-step grid (one grid step per round, the same rule as Euler,
``nfe = steps``, no AFS); `paradigms_sampler` refines every interval into ``substeps``
(default 4) sub-intervals, uniform in ``sigma^(1/rho)`` (rho = 7; on the default
polynomial schedule this IS the ``4 nfe``-step polynomial grid), and runs ParaDiGMS on
that ``S = substeps * nfe`` grid with ``max_rounds = nfe`` and the window over all
remaining steps (``window=None``; the paper's Picard iteration over the whole
trajectory). Latency: exactly ``nfe`` batched calls, fewer only if the window reaches
the end earlier (then further calls would change nothing); pass ``window <= substeps``
to force exactly ``nfe``. Total evaluations: the sum of the window sizes, at most
``nfe * S``. (Measured on Gaussian mixtures, RMSE to the exact ODE solution, nfe 3/5/7/9:
this default beats Euler with nfe steps at every budget and iPNDM at 3 and 5; a window
of only ``substeps`` is worse than Euler; tolerances 1e-2..1e-4 give the same results
within 10%.)

Cost, measured (not predicted) by `run_paradigms` in a `ParadigmsStats`:
``rounds`` = batched calls = latency NFE; ``evaluations`` = sum of the window sizes
(samples evaluated / B).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, List, Optional, Tuple

import torch

from ..branches import repeat_cond
from ..reference import opmath_dtype
from .common import check_int
from .counting import parallel_calls
from .schedules import check_sigmas

__all__ = [
    "sample_paradigms",
    "run_paradigms",
    "paradigms_sampler",
    "paradigms_grid",
    "ParadigmsStats",
    "NOISE_SCALES",
]

#: Accepted values of ``noise_scale`` (see the module docstring).
NOISE_SCALES = ("step", "sigma")


@dataclasses.dataclass(frozen=True)
class ParadigmsStats:
    """Cost and outcome of one ParaDiGMS run.

    rounds: batched denoiser calls (= latency NFE). evaluations: total samples evaluated
    divided by the batch size (= sum of the window sizes). converged: the window reached
    the end (False: stopped by max_rounds, result extrapolated). strides: how far the
    window start moved in each round. steps: S, the number of grid steps. window: W.
    """

    rounds: int
    evaluations: int
    converged: bool
    strides: Tuple[int, ...]
    steps: int
    window: int


# --------------------------------------------------------------------------------------
# argument checks


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    t = float(tol)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    return t


def _variances(s: List[float], noise_scale: str) -> List[float]:
    """v_k for k = 0..S (v_0 unused): the noise variance the tolerance is scaled by."""
    if noise_scale == "step":
        return [0.0] + [s[k] ** 2 * (s[k - 1] ** 2 - s[k] ** 2) / s[k - 1] ** 2
                        for k in range(1, len(s))]
    if noise_scale == "sigma":
        return [v * v for v in s]
    raise ValueError(f"noise_scale must be one of {NOISE_SCALES}, got {noise_scale!r}")


# --------------------------------------------------------------------------------------
# the solver


def run_paradigms(denoiser: Callable, x: torch.Tensor, sigmas, *, window: Optional[int] = None,
                  tol: float = 1e-3, max_rounds: Optional[int] = None,
                  noise_scale: str = "step", callback: Optional[Callable] = None,
                  progress: bool = False, **cond) -> Tuple[torch.Tensor, ParadigmsStats]:
    """ParaDiGMS from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``; returns ``(x, stats)``.

    Args:
        denoiser: ``D(x [N, ...], sigma [N], **cond) -> x0_hat``; called once per round on
            a batch of ``n * B`` samples with per-sample sigma (``n`` = window size).
        x: ``[B, ...]`` state at ``sigmas[0]`` (``noise * sigmas[0]``).
        sigmas: the Euler grid, strictly decreasing, > 0 (S + 1 values).
        window: W >= 1 positions per round (default: all S steps); clipped to S.
        tol: > 0; a position is converged when ``||x_new - x_old||^2 / D <= tol^2 v_k``.
        max_rounds: latency budget (>= 1) or None (no limit; at most S rounds are needed).
        noise_scale: "step" or "sigma", the variance ``v_k`` (module docstring).
        callback: called after every round with a dict: 'round', 'i' (window start),
            'stride', 'window' (n), 'x' (state at 'sigma' = t_i), 'x_next' (the new
            converged state at 'sigma_next' = t_{i + stride}, or the extrapolated end state
            when the budget ran out), 'denoised' (x0 estimate at x_i), 'error' ([n, B]
            errors of positions i+1 .. i+n), 'threshold' ([n]), 'converged'.
        progress: tqdm bar over the S steps.
        **cond: conditioning for the denoiser (``class_labels`` [B] etc.).
    """
    s = check_sigmas(sigmas, "sigmas").tolist()
    S = len(s) - 1
    W = S if window is None else min(check_int("window", window), S)
    t = _check_tol(tol)
    R = None if max_rounds is None else check_int("max_rounds", max_rounds)
    var = _variances(s, noise_scale)
    thresh = [t * t * v for v in var]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor of shape [B, ...]")
    B = x.shape[0]
    tail = (1,) * (x.dim() - 1)
    sig_dtype = opmath_dtype(x.dtype)
    dev = x.device
    h = [s[m + 1] - s[m] for m in range(S)]
    a = [math.sqrt(1.0 + v * v) for v in s]          # x_vp = x / a (VP scale 1/a = sqrt(abar))

    def col(values):                                   # [n] floats -> [n, 1, ..., 1] in x's dtype
        return torch.tensor(values, dtype=x.dtype, device=dev).view((len(values), 1) + tail)

    # traj[k]: current guess of x_k (EDM units). Copies of a state are VP copies, rescaled
    # to their own noise level: x_k = x_latest * a_k / a_latest.
    traj: List[torch.Tensor] = [x] + [x * (a[k] / a[0]) for k in range(1, S + 1)]
    i, rounds, evals = 0, 0, 0
    strides: List[int] = []
    converged = False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=S, desc="paradigms", leave=False)
    try:
        while True:
            n = min(W, S - i)
            xs = torch.stack(traj[i:i + n], 0)                            # [n, B, ...]
            sig = torch.tensor(s[i:i + n], dtype=sig_dtype, device=dev).repeat_interleave(B)
            with parallel_calls(denoiser):
                den = denoiser(xs.reshape((n * B,) + tuple(x.shape[1:])), sig,
                               **repeat_cond(cond, B, n))
            if den.shape != (n * B,) + tuple(x.shape[1:]):
                raise ValueError(f"the denoiser returned shape {list(den.shape)} for an input "
                                 f"of shape {[n * B] + list(x.shape[1:])}: it must return "
                                 f"x0_hat shaped like x")
            if den.dtype != x.dtype:
                den = den.to(x.dtype)
            rounds += 1
            evals += n
            d = (xs - den.view(xs.shape)) / col(s[i:i + n])               # [n, B, ...]
            # Picard update of the DDIM trajectory in the VP variable y = x / a:
            #   y'_{k+1} = y_i + sum_{m=i}^{k} (DDIM(y_m, t_m -> t_{m+1}) - y_m),
            # where DDIM(y_m) - y_m = (x_m + h_m d_m) / a_{m+1} - x_m / a_m. The first term
            # (m = i) is kept in EDM units, so that x'_{i+1} = x_i + h_i d_i exactly.
            first = traj[i] + h[i] * d[0]
            if n > 1:
                inc = (xs[1:] * (col([1.0 / a[k + 1] - 1.0 / a[k] for k in range(i + 1, i + n)]))
                       + d[1:] * col([h[k] / a[k + 1] for k in range(i + 1, i + n)]))
                y = first / a[i + 1] + torch.cumsum(inc, dim=0)
                new = torch.cat([first[None], y * col(a[i + 2:i + n + 1])], 0)
            else:
                new = first[None]
            old = torch.stack(traj[i + 1:i + n + 1], 0)
            err = (new - old).reshape(n, B, -1).to(sig_dtype).pow(2).mean(dim=2)   # [n, B]
            thr = torch.tensor(thresh[i + 1:i + n + 1], dtype=sig_dtype, device=dev)
            fail = ~(err <= thr[:, None]).all(dim=1)                      # NaN fails too
            bad = torch.nonzero(fail)
            stride = int(bad[0, 0]) + 1 if bad.numel() else n
            for j in range(n):
                traj[i + 1 + j] = new[j]
            end = i + n
            latest = new[n - 1]
            for k in range(end + 1, S + 1):                              # refill (VP copies)
                traj[k] = latest * (a[k] / a[end])
            start = i
            i += stride
            strides.append(stride)
            if bar is not None:
                bar.update(stride)
            converged = i >= S
            out_of_budget = R is not None and rounds >= R and not converged
            if out_of_budget and end < S:
                # No call left: DDIM/Euler jump from the newest state x'_{end} to t_S with
                # the newest gradient (noise estimate) d_{end-1}.
                traj[S] = latest + (s[S] - s[end]) * d[n - 1]
            if callback is not None:
                k = S if out_of_budget else min(i, S)
                callback({"round": rounds - 1, "i": start, "stride": stride, "window": n,
                          "x": traj[start], "x_next": traj[k], "sigma": s[start],
                          "sigma_next": s[k], "denoised": den[:B], "error": err,
                          "threshold": thr, "converged": converged})
            if converged or out_of_budget:
                break
    finally:
        if bar is not None:
            bar.close()
    stats = ParadigmsStats(rounds=rounds, evaluations=evals, converged=converged,
                           strides=tuple(strides), steps=S, window=W)
    return traj[S], stats


def sample_paradigms(denoiser: Callable, x: torch.Tensor, sigmas, *, window: Optional[int] = None,
                     tol: float = 1e-3, max_rounds: Optional[int] = None,
                     noise_scale: str = "step", callback: Optional[Callable] = None,
                     progress: bool = False, **cond) -> torch.Tensor:
    """ParaDiGMS on the grid ``sigmas``; returns the state at ``sigmas[-1]``.

    Same arguments as `run_paradigms` (which also returns the cost).
    """
    return run_paradigms(denoiser, x, sigmas, window=window, tol=tol, max_rounds=max_rounds,
                         noise_scale=noise_scale, callback=callback, progress=progress,
                         **cond)[0]


# --------------------------------------------------------------------------------------
# latency-budget entry point for sample()


def paradigms_grid(sigmas, substeps: int = 4, rho: float = 7.0) -> torch.Tensor:
    """Refines every interval of ``sigmas`` into ``substeps`` sub-intervals, uniform in
    ``sigma^(1/rho)``; float64, ``substeps * (len(sigmas) - 1) + 1`` values.

    On a polynomial (Karras) grid with the same rho this gives exactly the polynomial grid
    with ``substeps`` times as many steps (up to rounding).
    """
    s = check_sigmas(sigmas, "sigmas")
    m = check_int("substeps", substeps)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (
            math.isfinite(float(rho)) and float(rho) > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    r = float(rho)
    a, b = s[:-1] ** (1.0 / r), s[1:] ** (1.0 / r)
    frac = torch.arange(m, dtype=torch.float64) / m
    inner = (a[:, None] + frac[None, :] * (b - a)[:, None]) ** r          # [N, m]
    inner[:, 0] = s[:-1]                                                 # exact knots
    out = torch.cat([inner.reshape(-1), s[-1:]])
    return check_sigmas(out, "refined sigmas")


def paradigms_sampler(denoiser: Callable, x: torch.Tensor, sigmas, *,
                      callback: Optional[Callable] = None, progress: bool = False,
                      afs: bool = False, substeps: int = 4, window: Optional[int] = None,
                      tol: float = 1e-3, noise_scale: str = "step", rho: float = 7.0,
                      **cond) -> torch.Tensor:
    """ParaDiGMS at a latency budget of ``N = len(sigmas) - 1`` batched rounds (``sample()``).

    ``sigmas`` is the budget grid of N = nfe steps (what ``sample()`` builds for a
    one-call-per-step solver). ParaDiGMS runs on `paradigms_grid(sigmas, substeps, rho)`
    (``S = substeps * N`` steps) with ``max_rounds = N`` and ``window`` (default None: all
    remaining steps). Latency: N batched calls, fewer only if it converges earlier; exactly
    N whenever ``window <= substeps``. ``afs`` must be False: the first gradient is part of
    the first batched round, so the analytic first step would save no call. Use
    `run_paradigms` on `paradigms_grid(...)` for the cost of a run.
    """
    if afs:
        raise ValueError("afs must be False for ParaDiGMS: the first gradient is evaluated in "
                         "the first batched round together with the rest of the window, so "
                         "the analytic first step saves no call")
    s = check_sigmas(sigmas, "sigmas")
    m = check_int("substeps", substeps)
    W = None if window is None else check_int("window", window)
    fine = paradigms_grid(s, m, rho)
    return sample_paradigms(denoiser, x, fine, window=W, tol=tol, max_rounds=s.numel() - 1,
                            noise_scale=noise_scale, callback=callback, progress=progress,
                            **cond)
