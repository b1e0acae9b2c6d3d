r"""AMED-Solver and AMED-Plugin (Zhou et al. 2024, arXiv 2312.00094; formulas from the
authors' diff-sampler code; docs/design.md, "AMED"). Step n, ``t = t_n`` to
``t' = t_{n+1}``, ``h = t' - t``; the params give per sample ``r in (0, 1)``, ``delta``, ``o``:

    d       = (x - D(x, t)) / t      (AFS, step 0: d = x / sqrt(1 + t^2); features are zeros)
    (r, delta, o) = table[n], or predictor(features(x, t, D(x, t)), t, t')
    t_mid   = t'^r t^(1 - r)                     intermediate time (linear in log sigma)

AMED-Solver (r = 1/2, delta = o = 0: DPM-Solver-2, `sample_dpm2`):

    x_mid   = x + (t_mid - t) d
    g       = (x_mid - D(x_mid, (1 + delta) t_mid)) / t_mid,   x' = x + (1 + o) h g

AMED-Plugin on iPNDM (``AB(v, history)`` = `ipndm.ab_direction`; the history holds BOTH the
main-point and the mid-point gradients):

    x_mid   = x + (t_mid - t) AB(d, history);        push d
    g       = (x_mid - D(x_mid, (1 + delta) t_mid)) / t_mid
    x'      = x_mid + (1 + o) (t' - t_mid) AB(g, history);   push g

Differentiable in r, delta, o; features are detached.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, List, Optional

import torch

from ..ops import branch_states, epd_step
from ..params import AMEDParams
from ..params.amed_predictor import FeatureExtractor
from ..reference import opmath_dtype
from .common import afs_d, call_denoiser, denoise, step_range
from .epd import check_run
from .ipndm import ab_direction, push_history

__all__ = ["amed_sampler"]


def amed_sampler(denoiser: Callable, x: torch.Tensor, sigmas=None, *, params: AMEDParams,
                 plugin: Optional[bool] = None, callback: Optional[Callable] = None,
                 progress: bool = False, return_trajectory: bool = False,
                 afs: Optional[bool] = None, max_order: Optional[int] = None, **cond):
    """AMED-Solver (or AMED-Plugin): arguments and result as for `epd_sampler`. The callback
    also gets ``grads`` (``[1, B, ...]``, g), ``x_mid``, ``sigma_mid``, ``r``, ``delta``, ``o``."""
    sig, plugin, max_order = check_run(params, AMEDParams, x, sigmas, afs, plugin, max_order)
    ts = sig.tolist()
    table = params.predictor is None
    extractor = None
    if table:
        r_all, delta_all, o_all = (getattr(params, n).to(x.device) for n in ("r", "delta", "o"))
    else:
        net = params.predictor
        if next(net.parameters()).device != x.device:  # a copy: the params stay where they are
            net = copy.deepcopy(net).to(x.device)
        extractor = FeatureExtractor(params.features, denoiser, params.feature_dim,
                                     dtype=next(net.parameters()).dtype)
    trajectory = [x] if return_trajectory else None
    history: List[torch.Tensor] = []
    with extractor if extractor is not None else contextlib.nullcontext():
        for n in step_range(len(ts) - 1, progress, "amed-ipndm" if plugin else "amed"):
            t, t_next = ts[n], ts[n + 1]
            # main point: d (one evaluation, or AFS) and the predictor's features
            if n == 0 and params.afs:
                d = afs_d(x, t)
                denoised = x - t * d
                feats = None if table else extractor.zeros(x)
            else:
                if extractor is not None:
                    extractor.arm()
                denoised = denoise(denoiser, x, t, cond)
                d = (x - denoised) / t
                feats = None if table else extractor.collect(x, t, denoised)
            r, delta, o = (r_all[n], delta_all[n], o_all[n]) if table else net(feats, t, t_next)
            x_next, g, x_mid, t_mid = _amed_step(denoiser, x, d, t, t_next, r, delta, o,
                                                 history if plugin else None, max_order, cond)
            if callback is not None:
                callback({"x": x, "x_next": x_next, "i": n, "sigma": t, "sigma_next": t_next,
                          "denoised": denoised, "grads": g[None], "x_mid": x_mid,
                          "sigma_mid": t_mid, "r": r, "delta": delta, "o": o})
            x = x_next
            if trajectory is not None:
                trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def _amed_step(denoiser, x, d, t, t_next, r, delta, o, history, max_order, cond):
    """One step from the main-point gradient ``d`` (module docstring; the plugin's when a
    ``history`` list is given); ``(x', g, x_mid, t_mid)``. r, delta, o: 0-d or [B]."""
    sdt = opmath_dtype(x.dtype)  # dtype of the sigma tensors handed to the denoiser
    B = x.shape[0]
    one = torch.ones(1, dtype=sdt, device=x.device)  # the single weight of epd_step
    # t_mid = t'^r t^(1-r) = t (t'/t)^r, per sample ([B]) or shared (0-d)
    t_mid = t * torch.exp(r.to(sdt) * math.log(t_next / t))
    v = d if history is None else ab_direction(d, history, max_order)
    offset = t_mid - t   # as a [B, 1] column: the [B, K] form of the ops, K = 1
    offset = offset.reshape(1, 1).expand(B, 1) if offset.dim() == 0 else offset.reshape(-1, 1)
    x_mid = branch_states(x, v, offset)[0]
    if history is not None:
        push_history(history, d, max_order)
    sigma_eval = ((1.0 + delta.to(sdt)) * t_mid).expand(B)
    t_col = t_mid.to(x.dtype)
    t_col = t_col if t_col.dim() == 0 else t_col.reshape((-1,) + (1,) * (x.dim() - 1))
    g = (x_mid - call_denoiser(denoiser, x_mid, sigma_eval, cond)) / t_col
    if history is None:   # x' = x + (1 + o) h g
        return epd_step(x, g[None], one, t_next - t, o.to(sdt)), g, x_mid, t_mid
    # x' = x_mid + (1 + o) (t' - t_mid) AB(g, history)
    x_next = epd_step(x_mid, ab_direction(g, history, max_order)[None], one,
                      t_next - t_mid.expand(B), o.to(sdt))
    push_history(history, g, max_order)
    return x_next, g, x_mid, t_mid
