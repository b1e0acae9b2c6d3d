r"""ParaDiGMS: Picard iterations over a sliding window of the Euler (DDIM) trajectory.

Shih, Belkhale, Ermon, Sadigh, Anari, "Parallel Sampling of Diffusion Models", NeurIPS 2023,
written from the paper's algorithm (no code taken from other implementations).

Grid ``t_0 > ... > t_S``, ``h_m = t_{m+1} - t_m``, ``d(x, t) = (x - D(x, t)) / t``. Picard
iteration runs in the VP-scaled state ``y = x / a``, ``a_m = sqrt(1 + t_m^2)`` (EDM-unit
copies fed at far lower noise are out of distribution: errors 10..500x larger on a mixture):

    y_k = y_i + sum_{m=i}^{k-1} Delta_m,    Delta_m = (x_m + h_m d_m) / a_{m+1} - x_m / a_m.

State: a guess ``x_0 .. x_S`` (initially ``x_k = x_0 a_k / a_0``) and a window ``[i, i + n)``,
``n = min(W, S - i)``. One *round* (1 latency NFE, ``n`` evaluations):

1. ``d_j`` at every window position in ONE denoiser call of batch ``n * B`` (position-major);
2. ``x'_{i+1} = x_i + h_i d_i`` (exact Euler),
   ``x'_{i+j+1} = a_{i+j+1} (x'_{i+1} / a_{i+1} + sum_{m=i+1}^{i+j} Delta_m)``;
3. slide to the first ``k`` with ``||x'_k - x_k||^2 / D > tol^2 v_k`` for ANY sample (NaN
   fails), or to ``i + n``; refill ``k > i + n`` with ``x'_{i+n} a_k / a_{i+n}``.

``window=1`` is sequential Euler bit for bit. The batch shares one window, so with a loose
tolerance a sample's result can depend on its batch. ``noise_scale``: ``"step"``
``v_k = t_k^2 (t_{k-1}^2 - t_k^2) / t_{k-1}^2`` (the DDPM posterior variance) or ``"sigma"``
``v_k = t_k^2``; ``tol`` = 1e-3 (the paper's for DDIM). ``max_rounds=R`` stops after R rounds
and jumps from the window end ``e`` to ``t_S``: ``x_S = x'_e + (t_S - t_e) d_{e-1}``.

Latency budget (`paradigms_sampler`, used by ``sample()``): the ``nfe``-step grid refined
into ``substeps`` (4) sub-intervals per interval, ``max_rounds = nfe``, window over all
remaining steps. Measured on Gaussian mixtures at nfe 3..9: beats Euler at every budget and
iPNDM at 3 and 5; a window of only ``substeps`` is worse than Euler.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Tuple

import torch

from ..branches import repeat_cond
from ..reference import opmath_dtype
from .common import check_int
from .counting import parallel_calls
from .schedules import check_positive, check_sigmas

__all__ = ["sample_paradigms", "run_paradigms", "paradigms_sampler", "paradigms_grid",
           "ParadigmsStats"]

#: Accepted values of ``noise_scale`` (see the module docstring).
NOISE_SCALES = ("step", "sigma")


@dataclasses.dataclass(frozen=True)
class ParadigmsStats:
    """``rounds`` = batched calls = latency NFE; ``evaluations`` = the sum of the window
    sizes; ``converged``: False when stopped by max_rounds (result extrapolated)."""

    rounds: int
    evaluations: int
    converged: bool
    strides: Tuple[int, ...]
    steps: int
    window: int


def _variances(s: List[float], noise_scale: str) -> List[float]:
    """v_k for k = 0..S (v_0 unused): the noise variance the tolerance is scaled by."""
    if noise_scale == "step":
        return [0.0] + [s[k] ** 2 * (s[k - 1] ** 2 - s[k] ** 2) / s[k - 1] ** 2
                        for k in range(1, len(s))]
    if noise_scale == "sigma":
        return [v * v for v in s]
    raise ValueError(f"noise_scale must be one of {NOISE_SCALES}, got {noise_scale!r}")


def run_paradigms(denoiser: Callable, x: torch.Tensor, sigmas, *, window: Optional[int] = None,
                  tol: float = 1e-3, max_rounds: Optional[int] = None,
                  noise_scale: str = "step", callback: Optional[Callable] = None,
                  progress: bool = False, **cond) -> Tuple[torch.Tensor, ParadigmsStats]:
    """ParaDiGMS from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``; returns ``(x, stats)``.
    ``window`` W (default and cap: S). ``callback`` gets after every round: 'round', 'i'
    (window start), 'stride', 'window' (n), 'x' (at 'sigma' = t_i), 'x_next' (the new
    converged state at 'sigma_next' = t_{i + stride}, or the extrapolated end state),
    'denoised' (at x_i), 'error' ([n, B], positions i+1 .. i+n), 'threshold', 'converged'."""
    s = check_sigmas(sigmas, "sigmas").tolist()
    S = len(s) - 1
    W = S if window is None else min(check_int("window", window), S)
    t = check_positive("tol", tol)
    R = None if max_rounds is None else check_int("max_rounds", max_rounds)
    thresh = [t * t * v for v in _variances(s, noise_scale)]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor of shape [B, ...]")
    B, sig_dtype = x.shape[0], opmath_dtype(x.dtype)
    a = [math.sqrt(1.0 + v * v) for v in s]          # x_vp = x / a (VP scale 1/a = sqrt(abar))
    # traj[k]: current guess of x_k (EDM units); copies are VP copies, x_k = x_j a_k / a_j.
    traj: List[torch.Tensor] = [x] + [x * (a[k] / a[0]) for k in range(1, S + 1)]
    i, rounds, evals = 0, 0, 0
    strides: List[int] = []
    converged = False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=S, desc="paradigms", leave=False)
    try:
        while not converged:
            n = min(W, S - i)
            new, d, den = _picard_round(denoiser, traj, i, n, s, a, cond)
            rounds += 1
            evals += n
            old = torch.stack(traj[i + 1:i + n + 1], 0)
            err = (new - old).reshape(n, B, -1).to(sig_dtype).pow(2).mean(dim=2)   # [n, B]
            thr = torch.tensor(thresh[i + 1:i + n + 1], dtype=sig_dtype, device=x.device)
            bad = torch.nonzero(~(err <= thr[:, None]).all(dim=1))         # NaN fails too
            stride = int(bad[0, 0]) + 1 if bad.numel() else n
            end = i + n
            traj[i + 1:end + 1] = list(new)
            for k in range(end + 1, S + 1):                              # refill (VP copies)
                traj[k] = new[n - 1] * (a[k] / a[end])
            start, i = i, i + stride
            strides.append(stride)
            if bar is not None:
                bar.update(stride)
            converged = i >= S
            out_of_budget = R is not None and rounds >= R and not converged
            if out_of_budget and end < S:
                # No call left: Euler jump from the newest state x'_{end} to t_S with the
                # newest gradient (noise estimate) d_{end-1}.
                traj[S] = new[n - 1] + (s[S] - s[end]) * d[n - 1]
            if callback is not None:
                k = S if out_of_budget else min(i, S)
                callback({"round": rounds - 1, "i": start, "stride": stride, "window": n,
                          "x": traj[start], "x_next": traj[k], "sigma": s[start],
                          "sigma_next": s[k], "denoised": den[:B], "error": err,
                          "threshold": thr, "converged": converged})
            if out_of_budget:
                break
    finally:
        if bar is not None:
            bar.close()
    stats = ParadigmsStats(rounds=rounds, evaluations=evals, converged=converged,
                           strides=tuple(strides), steps=S, window=W)
    return traj[S], stats


def _picard_round(denoiser, traj, i, n, s, a, cond):
    """One batched call on window positions ``i .. i+n-1`` and the Picard update (module
    docstring, steps 1-2): ``(x'_{i+1 .. i+n} [n, B, ...], d [n, B, ...], denoised)``."""
    x = traj[i]
    B, dev, tail = x.shape[0], x.device, (1,) * (x.dim() - 1)

    def col(values):                                   # [n] floats -> [n, 1, ..., 1] in x's dtype
        return torch.tensor(values, dtype=x.dtype, device=dev).view((len(values), 1) + tail)

    xs = torch.stack(traj[i:i + n], 0)                                    # [n, B, ...]
    sig = torch.tensor(s[i:i + n], dtype=opmath_dtype(x.dtype), device=dev).repeat_interleave(B)
    with parallel_calls(denoiser):
        den = denoiser(xs.reshape((n * B,) + tuple(x.shape[1:])), sig, **repeat_cond(cond, B, n))
    if den.shape != (n * B,) + tuple(x.shape[1:]):
        raise ValueError(f"the denoiser returned shape {list(den.shape)} for an input of shape "
                         f"{[n * B] + list(x.shape[1:])}: it must return x0_hat shaped like x")
    den = den.to(x.dtype)
    d = (xs - den.view(xs.shape)) / col(s[i:i + n])                       # [n, B, ...]
    # y'_{k+1} = y_i + sum_{m=i}^{k} ((x_m + h_m d_m) / a_{m+1} - x_m / a_m), with the first
    # term (m = i) kept in EDM units, so that x'_{i+1} = x_i + h_i d_i exactly.
    first = x + (s[i + 1] - s[i]) * d[0]
    if n == 1:
        return first[None], d, den
    inc = (xs[1:] * col([1.0 / a[k + 1] - 1.0 / a[k] for k in range(i + 1, i + n)])
           + d[1:] * col([(s[k + 1] - s[k]) / a[k + 1] for k in range(i + 1, i + n)]))
    y = first / a[i + 1] + torch.cumsum(inc, dim=0)
    return torch.cat([first[None], y * col(a[i + 2:i + n + 1])], 0), d, den


def sample_paradigms(denoiser: Callable, x: torch.Tensor, sigmas, *, window: Optional[int] = None,
                     tol: float = 1e-3, max_rounds: Optional[int] = None,
                     noise_scale: str = "step", callback: Optional[Callable] = None,
                     progress: bool = False, **cond) -> torch.Tensor:
    """ParaDiGMS on the grid ``sigmas``: `run_paradigms` without the cost."""
    return run_paradigms(denoiser, x, sigmas, window=window, tol=tol, max_rounds=max_rounds,
                         noise_scale=noise_scale, callback=callback, progress=progress,
                         **cond)[0]


def paradigms_grid(sigmas, substeps: int = 4, rho: float = 7.0) -> torch.Tensor:
    """Every interval of ``sigmas`` refined into ``substeps`` sub-intervals uniform in
    ``sigma^(1/rho)`` (float64; on a polynomial grid of the same rho: the polynomial grid of
    ``substeps`` times the steps, up to rounding)."""
    s = check_sigmas(sigmas, "sigmas")
    m = check_int("substeps", substeps)
    r = check_positive("rho", rho)
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
    """ParaDiGMS at a latency budget of ``N = len(sigmas) - 1`` batched rounds, on
    `paradigms_grid(sigmas, substeps, rho)` with ``max_rounds = N``; ``afs`` must be False."""
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
