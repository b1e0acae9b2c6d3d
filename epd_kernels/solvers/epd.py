r"""EPD-Solver and EPD-Plugin (Ensemble Parallel Direction; arXiv 2507.14797).

Sigmas decrease, ``t_0 = sigma_max > ... > t_S = sigma_min``; S steps. Step n goes from
``t = t_n`` to ``t' = t_{n+1}``, ``h = t' - t`` (negative). With the parameters of step n
(`EPDParams`: ``r [K]``, ``lambda [K]`` on the simplex, ``delta [K]``, ``o``):

    d_n     = (x_n - D(x_n, t)) / t                    main-point gradient (1 evaluation)
              (AFS, step 0 only:  d_0 = x_0 / sqrt(1 + t_0^2), no evaluation)
    v_n     = d_n                                      EPD
            = AB_p(d_n, d_{n-1}, ..., d_{n-p+1})       EPD-Plugin (iPNDM), p = min(max_order, n + 1)
                AB_1 = d_n
                AB_2 = (3 d_n - d_{n-1}) / 2
                AB_3 = (23 d_n - 16 d_{n-1} + 5 d_{n-2}) / 12
                AB_4 = (55 d_n - 59 d_{n-1} + 37 d_{n-2} - 9 d_{n-3}) / 24
    tau_k   = t'^{r_k} t^{1 - r_k}                     branch points (linear in log sigma)
    x_k     = x_n + (tau_k - t) v_n                    branch states   (`branch_states[_into]`)
    g_k     = (x_k - D(x_k, (1 + delta_k) tau_k)) / tau_k
              all K branches in ONE denoiser call of batch K*B, k-major (`BranchRunner`)
    x_{n+1} = x_n + (1 + o_n) h sum_k lambda_k g_k     (`epd_step`, fused)

The plugin's history holds main-point gradients only (the AFS ``d_0`` included, as in the
authors' code); branch gradients never enter it.

Cost, for S steps and K branches:

    latency NFE        = 2 S - afs        (sequential evaluations: main point, then branches)
    total evaluations  = (K + 1) S - afs  (samples evaluated / B)

So NFE 5 with AFS is 3 steps.

Special cases used as tests:

* K = 1, r = 0, lambda = 1, delta = o = 0 is Euler (DDIM): the branch state is x_n itself,
  so its gradient is d(x_n, t_n) — with AFS too, since the AFS ``d_0`` only moves the
  branch state, which r = 0 does not move. The result is plain Euler WITHOUT AFS.
* EPD-Plugin with K = 1, r = 1 evaluates the gradient at the iPNDM prediction
  ``x_n + h AB(d)``, but the update still uses that single gradient,
  ``x_{n+1} = x_n + h g``; with r = 0 the plugin is again Euler. Following the authors'
  update rule, the plugin is therefore NOT iPNDM for any setting of the parameters: iPNDM
  would combine the history in the update itself, whereas EPD-Plugin uses the history only
  to place the branch states. (Note for reviewers: this is deliberate and matches the
  reference implementation.)

When the parameter tensors (or x, or the denoiser's weights) require grad and autograd is
on, the sampler is differentiable end to end: r (through tau), lambda, delta and o, and
through the denoiser. A ``sigmas`` tensor that requires grad makes it differentiable in the
grid too (``distill(learn_grid=True)``): h, tau and the main-point noise levels are then
taken from that tensor (its values must equal ``params.sigmas``). Otherwise the branch
call runs without autograd on static buffers, captured in a CUDA graph on GPUs (see
`epd_kernels.branches`).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, List, Optional

import torch

from ..branches import BranchRunner, runner_for
from ..ops import epd_step
from ..params.epd import EPDParams, epd_latency_nfe, epd_total_evaluations
from ..reference import opmath_dtype
from .common import call_denoiser, denoise
from .counting import unwrap_counter
from .ipndm import AB_COEFFS, ab_direction, push_history

__all__ = ["epd_sampler", "ipndm_direction", "IPNDM_COEFFS", "epd_latency_nfe",
           "epd_total_evaluations"]

#: Adams-Bashforth coefficients of iPNDM, newest gradient first (the same table as
#: `sample_ipndm`'s).
IPNDM_COEFFS = AB_COEFFS


def ipndm_direction(d: torch.Tensor, history: List[torch.Tensor], max_order: int = 4) -> torch.Tensor:
    """AB_p(d, history[-1], history[-2], ...) with p = min(max_order, len(history) + 1)
    (``history`` oldest first, as the plugin keeps it)."""
    order = min(max_order, len(history) + 1)
    return ab_direction([d] + history[::-1][:order - 1])


def _sigma_list(sigmas, params: EPDParams):
    if sigmas is None:
        sigmas = params.sigmas
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
    return s


def epd_sampler(denoiser: Callable, x: torch.Tensor, sigmas=None, *, params: EPDParams,
                plugin: Optional[bool] = None, callback: Optional[Callable] = None,
                progress: bool = False, return_trajectory: bool = False,
                use_cuda_graph: Optional[bool] = None, afs: Optional[bool] = None,
                max_order: Optional[int] = None, runner: Optional[BranchRunner] = None,
                **cond):
    """Samples with EPD-Solver (or EPD-Plugin) from ``x`` at ``sigmas[0]`` to ``sigmas[-1]``.

    Args:
        denoiser: ``D(x [N, ...], sigma [N], **cond) -> x0_hat``.
        x: initial state ``[B, ...]`` at ``sigmas[0]`` (noise already scaled by sigma_max).
        sigmas: the grid ``[S+1]`` (decreasing); None uses ``params.sigmas``. It must match
            the grid the params were made for.
        params: `EPDParams` with S steps and K branches.
        plugin: EPD-Plugin (iPNDM direction) instead of EPD; default ``params.plugin``.
        callback: called after every step with a dict: ``x`` (state at sigma), ``x_next``,
            ``i``, ``sigma``, ``sigma_next``, ``denoised`` (main-point x0 estimate; with AFS
            on step 0 the implied ``x - sigma * d_0``), ``grads`` ``[K, B, ...]``.
        progress: show a tqdm progress bar.
        return_trajectory: also return ``[x_0, ..., x_S]``.
        use_cuda_graph: see `BranchRunner`. None (default): graphs as ``EPD_KERNELS_GRAPH``
            says (`epd_kernels.solvers.graphs`), with the runner cached across calls
            (`epd_kernels.branches.runner_for`).
        afs, max_order: must agree with / override the params' values (afs must match:
            params are distilled for one setting; max_order defaults to params.max_order).
        runner: a `BranchRunner(denoiser, K)` to use (keeps its static buffers and
            captured graph across calls); it must wrap this same denoiser. A
            `CountingDenoiser` is unwrapped: the runner wraps the user's denoiser and
            reports its logical calls to the counter (a replayed graph runs no Python).
        **cond: conditioning keywords for the denoiser (``class_labels=...``); tensors with
            leading dim B are repeated for the branch batch.

    Returns:
        ``x_S`` ``[B, ...]``, or ``(x_S, [x_0, ..., x_S])`` with ``return_trajectory``.
    """
    if not isinstance(params, EPDParams):
        raise TypeError(f"params must be an EPDParams, got {type(params).__name__}")
    params.check_structure()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor of shape [B, ...]")
    sig = _sigma_list(sigmas, params)
    params.check_compatible(sigmas=sig)
    if afs is not None and bool(afs) != params.afs:
        raise ValueError(f"afs={afs} but the params were made with afs={params.afs}")
    plugin = params.plugin if plugin is None else bool(plugin)
    max_order = params.max_order if max_order is None else int(max_order)
    if not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be in 1..4, got {max_order}")
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


def _state_buffers(x: torch.Tensor, private: bool):
    """Two state buffers for the no-grad path, or None. Used when the fused step can write
    into a caller's buffer (``out=``) and no callback or trajectory keeps the states, so
    the loop allocates no state per step."""
    if torch.is_grad_enabled() or not private or x.requires_grad:
        return None
    if "out" not in inspect.signature(epd_step).parameters:
        return None
    return torch.empty_like(x), torch.empty_like(x)


def _epd_loop(denoiser, x, sig, sigmas, params, plugin, max_order, runner, callback, progress,
              return_trajectory, cond):
    """The sampling loop of `epd_sampler` (arguments checked there)."""
    S = params.num_steps
    device = x.device
    sdt = opmath_dtype(x.dtype)  # dtype of the sigma tensors handed to the denoiser
    # A grid that requires grad (a learned grid) is used as tensors; otherwise as floats.
    if isinstance(sigmas, torch.Tensor) and sigmas.requires_grad and torch.is_grad_enabled():
        ts = list(sigmas.to(device=device, dtype=sdt).reshape(-1).unbind())
    else:
        ts = sig.tolist()
    r_all, w_all, delta_all, o_all = (t.to(device) for t in (params.r, params.weights,
                                                               params.delta, params.o))
    differentiable = runner.needs_grad(x, r_all, w_all, delta_all, o_all, cond, ts)

    steps = range(S)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="epd-ipndm" if plugin else "epd", total=S)

    trajectory = [x] if return_trajectory else None
    history: List[torch.Tensor] = []
    states = _state_buffers(x, callback is None and trajectory is None)
    for n in steps:
        t, t_next = ts[n], ts[n + 1]
        h = t_next - t
        # d_n: main-point gradient (one sequential evaluation), or AFS on step 0.
        if n == 0 and params.afs:
            d = x / math.sqrt(1.0 + float(sig[0]) ** 2)  # (sigma_max: an end of the grid, fixed)
            denoised = None
        elif isinstance(t, torch.Tensor):
            denoised = call_denoiser(denoiser, x, t.expand(x.shape[0]), cond)
            d = (x - denoised) / t.to(x.dtype)
        else:
            denoised = denoise(denoiser, x, t, cond)
            d = (x - denoised) / t
        # v_n: EPD uses d_n; the plugin an Adams-Bashforth combination of main-point d's.
        v = ipndm_direction(d, history, max_order) if plugin else d
        # tau_k = t'^{r_k} t^{1 - r_k} = t * (t'/t)^{r_k}; branch gradients in one call.
        r, w, delta, o = r_all[n], w_all[n], delta_all[n], o_all[n]
        tau = t * torch.exp(r.to(sdt) * (torch.log(t_next / t) if isinstance(t, torch.Tensor)
                                         else math.log(t_next / t)))
        # Autograd path when anything upstream needs gradients (params, x, or a denoiser
        # whose output requires grad); otherwise static buffers / graph replay.
        if differentiable or x.requires_grad or v.requires_grad:
            g = runner.run_differentiable(x, v, t, tau, delta, **cond)
        else:
            g = runner.run(x, v, t, tau, delta, **cond)
        # x_{n+1} = x_n + (1 + o_n) h sum_k lambda_k g_k   (fused, differentiable)
        if states is None:
            x_next = epd_step(x, g, w, h, o)
        else:       # x_{n+1} over x_{n-1}: nothing outside the loop holds the old states
            x_next = epd_step(x, g, w, h, o, out=states[n % 2])
        if plugin:
            push_history(history, d, max_order)
        if callback is not None:
            callback({"x": x, "x_next": x_next, "i": n, "sigma": float(sig[n]),
                      "sigma_next": float(sig[n + 1]),
                      "denoised": x - float(sig[n]) * d if denoised is None else denoised,
                      "grads": g})
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    if return_trajectory:
        return x, trajectory
    return x
