r"""EPD-Solver and EPD-Plugin (Ensemble Parallel Direction; arXiv 2507.14797; docs/design.md,
"EPD step" and "EPD-Plugin"). Step n, ``t = t_n`` to ``t' = t_{n+1}``, ``h = t' - t``, with
`EPDParams` ``r [K]``, ``lambda [K]`` (simplex), ``delta [K]``, ``o`` of step n:

    d_n     = (x_n - D(x_n, t)) / t                    (AFS, step 0: d_0 = x_0 / sqrt(1 + t_0^2))
    v_n     = d_n  (EPD),  AB_p(d_n, d_{n-1}, ...)     (EPD-Plugin, p = min(max_order, n + 1))
    tau_k   = t'^{r_k} t^{1 - r_k},   x_k = x_n + (tau_k - t) v_n
    g_k     = (x_k - D(x_k, (1 + delta_k) tau_k)) / tau_k   (K branches, ONE call: `BranchRunner`)
    x_{n+1} = x_n + (1 + o_n) h sum_k lambda_k g_k     (`epd_step`, fused)

AB_p: iPNDM's Adams-Bashforth combination (`ipndm.AB_COEFFS`) over main-point gradients only
(the AFS ``d_0`` included, as in the authors' code). K = 1, r = 0, lambda = 1, delta = o = 0
is Euler without AFS; EPD-Plugin updates with the branch gradients only, so it is NOT iPNDM
for any parameters (as in the authors' update rule). Differentiable end to end when anything
requires grad (a ``sigmas`` tensor that does too); otherwise the branch call runs on static
buffers, captured where graphs are on (`epd_kernels.branches`).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from ..branches import BranchRunner, runner_for
from ..ops import epd_step
from ..params.epd import EPDParams
from ..reference import opmath_dtype
from .common import call_denoiser, check_int, gradient, step_range
from .counting import unwrap_counter
from .ipndm import ab_direction, push_history

__all__ = ["epd_sampler"]


def check_run(params, cls, x, sigmas, afs, plugin, max_order):
    """Checks shared by the EPD and AMED samplers; ``(grid as float64 CPU, plugin,
    max_order)`` with the params' values where the arguments are None."""
    if not isinstance(params, cls):
        raise TypeError(f"params must be an {cls.__name__}, got {type(params).__name__}")
    params.check_structure()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor of shape [B, ...]")
    sig = params.sigmas if sigmas is None else sigmas
    sig = torch.as_tensor(sig).detach().to("cpu", torch.float64).reshape(-1)
    params.check_compatible(sigmas=sig, afs=afs)
    plugin = params.plugin if plugin is None else bool(plugin)
    max_order = params.max_order if max_order is None else max_order
    return sig, plugin, check_int("max_order", max_order, 1, 4)


def epd_sampler(denoiser: Callable, x: torch.Tensor, sigmas=None, *, params: EPDParams,
                plugin: Optional[bool] = None, callback: Optional[Callable] = None,
                progress: bool = False, return_trajectory: bool = False,
                use_cuda_graph: Optional[bool] = None, afs: Optional[bool] = None,
                max_order: Optional[int] = None, runner: Optional[BranchRunner] = None,
                **cond):
    """EPD-Solver (or EPD-Plugin) from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``.

    ``sigmas`` (default ``params.sigmas``) and ``afs`` must match the params; ``plugin``
    and ``max_order`` default to theirs. ``callback`` gets the keys of `common.emit` plus
    ``grads`` ``[K, B, ...]``. ``use_cuda_graph``: see `BranchRunner` (None: the cached
    `runner_for`). ``runner``: a `BranchRunner` for this same denoiser, kept across calls.
    Returns ``x_S``, or ``(x_S, [x_0, ..., x_S])`` with ``return_trajectory``."""
    sig, plugin, max_order = check_run(params, EPDParams, x, sigmas, afs, plugin, max_order)
    K = params.num_points
    raw, counter = unwrap_counter(denoiser)
    if runner is None:
        runner = (runner_for(raw, K, x) if use_cuda_graph is None
                  else BranchRunner(raw, K, use_cuda_graph=use_cuda_graph))
    elif runner.num_points != K:
        raise ValueError(f"runner has K = {runner.num_points} but params have K = {K}")
    elif runner.denoiser is not raw:
        raise ValueError("runner was built for another denoiser: pass "
                         "BranchRunner(denoiser, K) for this one")
    with runner.counting(counter):
        return _epd_loop(denoiser, x, sig, sigmas, params, plugin, max_order, runner, callback,
                         progress, return_trajectory, cond)


def _epd_loop(denoiser, x, sig, sigmas, params, plugin, max_order, runner, callback, progress,
              return_trajectory, cond):
    """The sampling loop of `epd_sampler` (arguments checked there)."""
    sdt = opmath_dtype(x.dtype)  # dtype of the sigma tensors handed to the denoiser
    # A grid that requires grad (a learned grid) is used as tensors; otherwise as floats.
    if isinstance(sigmas, torch.Tensor) and sigmas.requires_grad and torch.is_grad_enabled():
        ts = list(sigmas.to(device=x.device, dtype=sdt).reshape(-1).unbind())
    else:
        ts = sig.tolist()
    r_all, w_all, delta_all, o_all = (t.to(x.device) for t in (params.r, params.weights,
                                                                 params.delta, params.o))
    differentiable = runner.needs_grad(x, r_all, w_all, delta_all, o_all, cond, ts)
    trajectory = [x] if return_trajectory else None
    history: List[torch.Tensor] = []
    # Without autograd, callback or trajectory nothing outside the loop holds the states:
    # the fused step writes x_{n+1} over x_{n-1} in two buffers (no allocation per step).
    states = None
    if not (torch.is_grad_enabled() or x.requires_grad or callback is not None
            or return_trajectory):
        states = torch.empty_like(x), torch.empty_like(x)
    for n in step_range(params.num_steps, progress, "epd-ipndm" if plugin else "epd"):
        t, t_next = ts[n], ts[n + 1]
        # d_n: main-point gradient (one sequential evaluation), or AFS on step 0.
        if n == 0 and params.afs:   # at sigma_max, an end of the grid (fixed, never learned)
            d, denoised = gradient(denoiser, x, float(sig[0]), cond, analytic=True)
        elif isinstance(t, torch.Tensor):
            denoised = call_denoiser(denoiser, x, t.expand(x.shape[0]), cond)
            d = (x - denoised) / t.to(x.dtype)
        else:
            d, denoised = gradient(denoiser, x, t, cond)
        v = ab_direction(d, history, max_order) if plugin else d
        r, w, delta, o = r_all[n], w_all[n], delta_all[n], o_all[n]
        # tau_k = t'^{r_k} t^{1 - r_k} = t * (t'/t)^{r_k}; branch gradients in one call.
        tau = t * torch.exp(r.to(sdt) * (torch.log(t_next / t) if isinstance(t, torch.Tensor)
                                         else math.log(t_next / t)))
        # Autograd path when anything upstream needs gradients (params, x, or a denoiser
        # whose output requires grad); otherwise static buffers / graph replay.
        if differentiable or x.requires_grad or v.requires_grad:
            g = runner.run_differentiable(x, v, t, tau, delta, **cond)
        else:
            g = runner.run(x, v, t, tau, delta, **cond)
        x_next = epd_step(x, g, w, t_next - t, o, out=None if states is None else states[n % 2])
        if plugin:
            push_history(history, d, max_order)
        if callback is not None:
            callback({"x": x, "x_next": x_next, "i": n, "sigma": float(sig[n]),
                      "sigma_next": float(sig[n + 1]), "denoised": denoised, "grads": g})
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
