r"""AMED-Solver and AMED-Plugin (Zhou et al. 2024, "Fast ODE-based sampling for diffusion
models in around 5 steps", arXiv 2312.00094; formulas from the authors' diff-sampler code).

Sigmas decrease, ``t_0 = sigma_max > ... > t_S = sigma_min``. Step n goes from ``t = t_n``
to ``t' = t_{n+1}``, ``h = t' - t``. The params (`AMEDParams`: a table or the predictor
network) give per sample ``r in (0, 1)``, ``delta`` (scale_time = 1 + delta) and ``o``
(scale_dir = 1 + o) for the step:

    d       = (x - D(x, t)) / t                  main point (1 evaluation)
              (AFS, step 0 only: d = x / sqrt(1 + t^2), no evaluation; features are zeros)
    (r, delta, o) = params.step_values(n, features(x, t, D(x, t)), t, t')
    t_mid   = t'^r t^(1 - r)                     intermediate time (linear in log sigma)

AMED-Solver:

    x_mid   = x + (t_mid - t) d                  (`branch_states`, K = 1)
    g       = (x_mid - D(x_mid, (1 + delta) t_mid)) / t_mid
    x'      = x + (1 + o) h g                    (`epd_step`, K = 1, weight 1)

With r = 1/2, delta = o = 0 this is DPM-Solver-2 (`sample_dpm2`, the same geometric
midpoint). AMED-Plugin on iPNDM (Adams-Bashforth with the fixed iPNDM coefficients,
``AB(v, history)`` = `ipndm_direction`, order ``min(max_order, len(history) + 1)``):

    x_mid   = x + (t_mid - t) AB(d, history);        push d
    g       = (x_mid - D(x_mid, (1 + delta) t_mid)) / t_mid
    x'      = x_mid + (1 + o) (t' - t_mid) AB(g, history);   push g

so the plugin's history holds BOTH the main-point and the mid-point gradients (the AFS d
included), keeping the last ``max_order - 1``. At the neutral start it is iPNDM on the
refined grid ``t_0, mid_0, t_1, mid_1, ...``.

Cost: latency NFE = total evaluations = ``2 S - afs`` (both calls of a step are
sequential, batch B). NFE 5 with AFS is 3 steps.

Everything is differentiable when autograd is on: r (through t_mid: the mid state, the
evaluation sigma and the 1/t_mid of g), delta (through the denoiser's sigma input), o
(through the fused `epd_step`), and the states; features are always detached.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, List, Optional

import torch

from ..params import AMEDParams
from ..params.amed_predictor import FeatureExtractor
from ..ops import branch_states, epd_step
from ..reference import opmath_dtype
from .common import afs_d, call_denoiser, denoise
from .epd import ipndm_direction
from .ipndm import push_history

__all__ = ["amed_sampler"]


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d or [B] coefficient as a [B, 1] column (the [B, K] form of the ops, K = 1)."""
    return v.reshape(1, 1).expand(x.shape[0], 1) if v.dim() == 0 else v.reshape(-1, 1)


def amed_sampler(denoiser: Callable, x: torch.Tensor, sigmas=None, *, params: AMEDParams,
                 plugin: Optional[bool] = None, callback: Optional[Callable] = None,
                 progress: bool = False, return_trajectory: bool = False,
                 afs: Optional[bool] = None, max_order: Optional[int] = None, **cond):
    """Samples with AMED-Solver (or AMED-Plugin) from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> x0_hat``.
        x: initial state ``[B, ...]`` at ``sigmas[0]`` (noise already scaled by sigma_max).
        sigmas: the grid ``[S+1]``; None uses ``params.sigmas``; it must match them.
        params: `AMEDParams` (table or predictor form).
        plugin: AMED-Plugin on iPNDM instead of AMED-Solver; default ``params.plugin``.
        callback: called after every step with a dict: ``x``, ``x_next``, ``i``, ``sigma``,
            ``sigma_next``, ``denoised`` (main-point x0 estimate; on an AFS step the implied
            ``x - sigma * d``), ``grads`` (``[1, B, ...]``, the mid-point gradient g),
            ``x_mid``, ``sigma_mid`` (t_mid), ``r``, ``delta``, ``o``.
        progress: tqdm progress bar. return_trajectory: also return ``[x_0, ..., x_S]``.
        afs: must agree with ``params.afs``. max_order: iPNDM order of the plugin (default
            ``params.max_order``).
        **cond: conditioning keywords for the denoiser.

    Returns:
        ``x_S``, or ``(x_S, [x_0, ..., x_S])`` with ``return_trajectory``.
    """
    if not isinstance(params, AMEDParams):
        raise TypeError(f"params must be an AMEDParams, got {type(params).__name__}")
    params.check_structure()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor of shape [B, ...]")
    sig = params.sigmas if sigmas is None else sigmas
    sig = torch.as_tensor(sig).detach().to("cpu", torch.float64).reshape(-1)
    params.check_compatible(sigmas=sig)
    if afs is not None and bool(afs) != params.afs:
        raise ValueError(f"afs={afs} but the params were made with afs={params.afs}")
    plugin = params.plugin if plugin is None else bool(plugin)
    max_order = params.max_order if max_order is None else max_order
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be an integer in 1..4, got {max_order!r}")

    ts = sig.tolist()
    S, B, device = len(ts) - 1, x.shape[0], x.device
    sdt = opmath_dtype(x.dtype)  # dtype of the sigma tensors handed to the denoiser
    one = torch.ones(1, dtype=sdt, device=device)  # the single weight of epd_step
    table = params.predictor is None
    net = None
    if table:
        r_all, delta_all, o_all = (getattr(params, n).to(device) for n in ("r", "delta", "o"))
    else:
        net = params.predictor
        if next(net.parameters()).device != device:  # a copy: the params stay where they are
            net = copy.deepcopy(net).to(device)
    extractor = None if table else FeatureExtractor(
        params.features, denoiser, params.feature_dim, dtype=next(net.parameters()).dtype)

    steps = range(S)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="amed-ipndm" if plugin else "amed", total=S)

    trajectory = [x] if return_trajectory else None
    history: List[torch.Tensor] = []
    with extractor if extractor is not None else contextlib.nullcontext():
        for n in steps:
            t, t_next = ts[n], ts[n + 1]
            # main point: d (one evaluation, or AFS) and the predictor's features
            if n == 0 and params.afs:
                d = afs_d(x, t)
                denoised = None
                feats = None if table else extractor.zeros(x)
            else:
                if extractor is not None:
                    extractor.arm()
                denoised = denoise(denoiser, x, t, cond)
                d = (x - denoised) / t
                feats = None if table else extractor.collect(x, t, denoised)
            if table:
                r, delta, o = r_all[n], delta_all[n], o_all[n]
            else:
                r, delta, o = net(feats, t, t_next)
            # t_mid = t'^r t^(1-r) = t (t'/t)^r, per sample ([B]) or shared (0-d)
            t_mid = t * torch.exp(r.to(sdt) * math.log(t_next / t))
            v = ipndm_direction(d, history, max_order) if plugin else d
            x_mid = branch_states(x, v, _per_sample(t_mid - t, x))[0]
            if plugin:
                push_history(history, d, max_order)
            sigma_eval = ((1.0 + delta.to(sdt)) * t_mid).expand(B)
            g = (x_mid - call_denoiser(denoiser, x_mid, sigma_eval, cond)) / _column(t_mid, x)
            if plugin:
                # x' = x_mid + (1 + o) (t' - t_mid) AB(g, history)
                x_next = epd_step(x_mid, ipndm_direction(g, history, max_order)[None], one,
                                  t_next - t_mid.expand(B), o.to(sdt))
                push_history(history, g, max_order)
            else:
                # x' = x + (1 + o) h g
                x_next = epd_step(x, g[None], one, t_next - t, o.to(sdt))
            if callback is not None:
                callback({"x": x, "x_next": x_next, "i": n, "sigma": t, "sigma_next": t_next,
                          "denoised": x - t * d if denoised is None else denoised,
                          "grads": g[None], "x_mid": x_mid, "sigma_mid": t_mid, "r": r,
                          "delta": delta, "o": o})
            x = x_next
            if trajectory is not None:
                trajectory.append(x)
    if return_trajectory:
        return x, trajectory
    return x


def _column(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d or [B] tensor shaped to broadcast against x ([B, 1, ..., 1]), in x's dtype."""
    v = v.to(x.dtype)
    return v if v.dim() == 0 else v.reshape((-1,) + (1,) * (x.dim() - 1))
