"""`sample()`: one entry point for every solver, with exact NFE accounting.

    x0 = sample(denoiser, noise, solver="ipndm", nfe=5, **cond)
    x0 = sample(denoiser, noise, solver="unipc", nfe=6, options={"variant": "bh1"})
    x0, stats = sample(denoiser, noise, solver="epd", params=p, return_stats=True)

``nfe`` is the latency budget, mapped exactly to steps per solver; a budget a solver cannot
meet is refused (docs/design.md, "NFE rules"). `SampleStats` reports the counted latency NFE
and total evaluations (graph replays reported by whoever replays them).
"""
from __future__ import annotations

import inspect
import numbers
import time
from typing import Callable, Optional

import torch

from .branches import clear_graph_cache, runner_for
from .models.conditioning import warn_missing_labels
from .solvers import schedules as _schedules
from .solvers import solve_graph as _solve_graph
from .solvers.common import keyword_names
from .solvers.counting import CountingDenoiser, SampleStats
from .solvers.graphs import (check_cond_device, device_guard, graph_mode,
                             strategy_for)
from .solvers.registry import (all_option_names, is_explicit, nfe_to_steps, resolve_afs,
                               resolve_sigmas, spec, steps_to_nfe)

__all__ = ["sample", "clear_graph_cache", "DEFAULT_NFE"]

#: The budget of a solver without params when ``nfe`` is None and no explicit grid says.
DEFAULT_NFE = 5

#: Per params family (the solver name's first part): the class and where it comes from.
_PARAMS = {"epd": ("EPDParams", "epd_kernels.distill(...) or EPDParams.load(path)"),
           "amed": ("AMEDParams", "epd_kernels.distill(..., method='amed'), "
                                  "AMEDParams.init(...) or AMEDParams.load(path)"),
           "d": ("DODEParams", "epd_kernels.fit_dode(...) or DODEParams.load(path)")}


def sample(denoiser: Callable, noise: torch.Tensor, solver: str = "ipndm",
           nfe: Optional[int] = None, params=None, schedule=None, afs: Optional[bool] = None,
           return_stats: bool = False, progress: bool = False,
           callback: Optional[Callable] = None, options: Optional[dict] = None,
           graph: Optional[str] = None, **cond):
    """Integrates the probability-flow ODE from ``noise * sigmas[0]`` to ``sigmas[-1]``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> x0_hat``.
        noise: ``[B, ...]`` standard normal noise (see `make_noise`).
        solver: one of `solver_names()`.
        nfe: latency budget (sequential denoiser calls). None: from an explicit schedule,
            else from ``params``, else `DEFAULT_NFE`. Given with params, it must match them.
        params: `EPDParams` for "epd" / "epd-ipndm", `AMEDParams` for "amed" /
            "amed-ipndm", `DODEParams` for the "d-*" solvers; their nfe, afs, grid and
            variant must agree with the other arguments.
        schedule: None (polynomial, rho=7, sigma in [0.002, 80]), a kind name, a dict of
            `get_sigmas` keyword arguments (with optional "kind"), or an explicit decreasing
            list/tensor of sigmas (its step count must match nfe).
        afs: analytic first step; None: the solver's default (on for the two-call solvers).
        return_stats: also return a `SampleStats`.
        progress, callback: tqdm bar; per-step callback (see the solvers).
        options: solver options (``{"variant": "bh1"}``); valid names: `solver_options`.
        graph: None (the EPD branch call is captured as ``EPD_KERNELS_GRAPH`` says) or
            "solve" (the whole loop captured once per shape and replayed; no callback or
            progress; not for ParaDiGMS or predictor-form AMED).
        **cond: conditioning for the denoiser, possibly nested; where a graph is captured it
            must be on noise's device (ValueError before the capture).

    Returns ``x`` at sigma_min, shaped and typed like noise; ``(x, stats)`` with return_stats."""
    s = spec(solver)
    mode = graph_mode()
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise ValueError("noise must be a floating tensor of shape [B, ...]")
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral)):
        raise ValueError(f"nfe must be an integer or None, got {nfe!r}")
    opts = _check_options(s, options, cond, denoiser)
    _check_graph(graph, s, params, callback, progress)
    warn_missing_labels(denoiser, cond, "sample")
    sigmas, steps, nfe, extra = _resolve_run(s, params, nfe, schedule, afs)

    fn = s.load()
    counter = CountingDenoiser(denoiser, noise.shape[0])
    sync = noise.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(noise.device)
    t0 = time.perf_counter()
    with torch.no_grad(), device_guard(noise.device):   # launches go to noise's device
        out, captures, replays = _run(fn, s, denoiser, counter, noise, sigmas, params,
                                      {**extra, **opts}, cond, mode, graph, callback, progress)
    if sync:
        torch.cuda.synchronize(noise.device)
    wall = time.perf_counter() - t0
    if not return_stats:
        return out
    stats = SampleStats(latency_nfe=counter.calls, total_evals=counter.evaluations,
                        steps=int(steps), wall_time_s=wall, solver=s.name, nfe=int(nfe),
                        graph_captures=captures, graph_replays=replays)
    return out, stats


def _run(fn, s, denoiser, counter, noise, sigmas, params, kwargs, cond, mode, graph,
         callback, progress):
    """``(x, graph captures, graph replays)``: a captured solve, or the solver in Python
    with the EPD branch call on the cached runner."""
    if graph == "solve":
        done = _solve_graph.solve(fn, denoiser, counter, noise, sigmas, params, kwargs, cond,
                                  mode)
        if done is not None:
            return done
    runner = None
    if "runner" in inspect.signature(fn).parameters and params is not None:
        runner = runner_for(denoiser, params.num_points, noise, mode)
        kwargs = dict(kwargs, runner=runner)
        if strategy_for(mode, noise.device) is not None:   # refused before any call
            check_cond_device(cond, noise.device)
    c0, r0 = (runner.captures, runner.replays) if runner is not None else (0, 0)
    if s.needs_params:
        kwargs = dict(kwargs, params=params)
    out = fn(counter, noise * float(sigmas[0]), sigmas, callback=callback, progress=progress,
             **kwargs, **cond)
    if runner is None:
        return out, 0, 0
    return out, runner.captures - c0, runner.replays - r0


def _check_options(s, options, cond, denoiser) -> dict:
    """The solver options as a dict; ValueError for unknown ones and for options given as
    conditioning keywords (a denoiser taking ``**kwargs`` would swallow them silently)."""
    valid = s.options()
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict of solver options, got {type(options).__name__}")
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {s.name!r}; its options are "
                         f"{list(valid) if valid else 'none'}")
    # A keyword the denoiser's signature names itself is its conditioning, not an option.
    signature = keyword_names(denoiser)
    named = signature[0] if signature is not None else set()
    misplaced = sorted(k for k in cond if k in all_option_names() and k not in named)
    if misplaced:
        given = ", ".join(repr(k) + ": ..." for k in misplaced)
        raise ValueError(f"sample() got {misplaced} as conditioning keywords, but these are "
                         f"solver options: pass options={{{given}}} (solver {s.name!r} takes "
                         f"{list(valid) if valid else 'no options'})")
    return dict(options)


def _check_graph(graph, s, params, callback, progress) -> None:
    if graph not in (None, "solve"):
        raise ValueError(f"graph must be None or 'solve', got {graph!r}")
    if graph != "solve":
        return
    if callback is not None or progress:
        raise ValueError("graph='solve' replays the whole loop without running Python: it "
                         "takes no callback and no progress bar")
    why = _solve_graph.unsupported_reason(s.name, params)
    if why:
        raise ValueError(f"graph='solve' cannot capture solver {s.name!r}: {why}")


def _resolve_run(s, params, nfe, schedule, afs):
    """``(sigmas, steps, nfe, fixed solver keywords)`` for this solver and its arguments."""
    extra = dict(s.extra)
    if s.needs_params:
        sigmas = _check_params(s, params, schedule, afs)
        steps = sigmas.numel() - 1
        if nfe is not None and int(nfe) != params.nfe:
            raise ValueError(f"nfe={nfe} was asked but the params are for nfe={params.nfe} "
                             f"({steps} steps, afs={params.afs}); pass nfe={params.nfe} or "
                             f"nfe=None")
        return sigmas, steps, params.nfe, extra
    if params is not None:
        raise ValueError(f"params are only used by the EPD, AMED and D-ODE solvers, not "
                         f"by {s.name!r}")
    a = extra["afs"] = resolve_afs(s, afs)
    if not is_explicit(schedule):
        nfe = DEFAULT_NFE if nfe is None else nfe
        steps = nfe_to_steps(s.name, nfe, a)
        sigmas = resolve_sigmas(schedule, steps)
        if sigmas.numel() - 1 != steps:
            raise ValueError(f"the schedule has {sigmas.numel() - 1} steps but nfe={nfe} "
                             f"needs {steps}")
        return sigmas, steps, nfe, extra
    sigmas = _schedules.check_sigmas(schedule, "schedule")
    steps = sigmas.numel() - 1
    implied = steps_to_nfe(s.name, steps, a)
    if nfe is not None and nfe != implied:
        raise ValueError(f"the explicit schedule has {steps} steps, which costs nfe={implied} "
                         f"with solver {s.name!r} (afs={a}), but nfe={nfe} was asked (pass "
                         f"nfe={implied} or nfe=None to take it from the schedule)")
    if implied < 1:
        raise ValueError(f"the explicit schedule gives nfe={implied} < 1")
    return sigmas, steps, implied, extra


def _check_params(s, params, schedule, afs) -> torch.Tensor:
    """The params' grid, after checking that they fit the solver (class, variant, afs) and
    that a given schedule gives the same grid."""
    from . import params as params_module

    family = s.name.split("-")[0]
    cls_name, origin = _PARAMS[family]
    if family == "epd" and isinstance(params, params_module.AMEDParams):
        raise ValueError(f"these are AMED params: use solver {params.solver!r}, not "
                         f"{s.name!r}")
    if not isinstance(params, getattr(params_module, cls_name)):
        got = "" if params is None else f", got {type(params).__name__}"
        raise ValueError(f"solver {s.name!r} needs params (an {cls_name} from {origin}){got}")
    params.check_structure()
    if family == "d":
        params.check_compatible(solver=s.name, afs=afs)
    else:
        params.check_compatible(plugin=dict(s.extra)["plugin"], afs=afs)
    sigmas = _schedules.check_sigmas(params.sigmas, "params.sigmas")
    if schedule is not None:
        other = resolve_sigmas(schedule, sigmas.numel() - 1)
        if other.shape != sigmas.shape or not torch.allclose(other, sigmas, rtol=1e-6, atol=0):
            raise ValueError("schedule does not match params.sigmas, the grid the params "
                             "were distilled on (leave schedule=None)")
    return sigmas
