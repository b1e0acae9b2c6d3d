"""`sample()`: one entry point for every solver, with exact NFE accounting.

    x0 = sample(denoiser, noise, solver="ipndm", nfe=5, **cond)
    x0 = sample(denoiser, noise, solver="unipc", nfe=6, options={"variant": "bh1"})
    x0, stats = sample(denoiser, noise, solver="epd", params=p, return_stats=True)

``nfe`` is the *latency* budget: the number of sequential denoiser calls. It is mapped to
a number of steps N per solver, exactly, and a budget a solver cannot meet is refused
(docs/design.md, "NFE rules"; `epd_kernels.solvers.registry`):

    solver                                  latency NFE            valid budgets
    euler/ddim, ipndm, dpmpp3m, unipc, deis N       (afs=False)    1, 2, 3, ...
                                            N - 1   (afs=True)     1, 2, 3, ...
    heun, dpm2                              2N - 1  (afs=True)     1, 3, 5, 7, ...  (default)
                                            2N      (afs=False)    2, 4, 6, ...
    epd, epd-ipndm                          2N - 1  (afs=True)     1, 3, 5, 7, ...  (default)
                                            2N      (afs=False)    2, 4, 6, ...
    amed, amed-ipndm                        2N - 1  (afs=True)     1, 3, 5, 7, ...  (default)
                                            2N      (afs=False)    2, 4, 6, ...

(``afs``: analytic first step, the first gradient ``x / sqrt(1 + sigma_0^2)`` costs no
call.) EPD also evaluates K branches per step in one batched call, so its *total*
evaluations are ``(K + 1) N - afs``; AMED's two calls per step are both sequential, so
its total evaluations equal its latency NFE. `SampleStats` reports both numbers as
counted: the calls that run in Python through `CountingDenoiser`, the graph replays by
whoever replays them (the branch runner, the solve graph).

Solver options (``variant``, ``max_order``, ``order``, ``lower_order_final``,
``max_step_ratio``, ...) travel in ``options``; every other keyword is conditioning for
the denoiser. Graphs: ``EPD_KERNELS_GRAPH`` (``auto``, ``off``, ``simulate``; read at
every call, `epd_kernels.solvers.graphs`) decides whether the EPD branch call is
captured; ``graph="solve"`` captures the whole loop (`epd_kernels.solvers.solve_graph`).

Noise: ``noise ~ N(0, I)`` of shape ``[B, ...]`` is scaled by ``sigmas[0]``; the result is
the state at ``sigmas[-1] = sigma_min`` (no extra denoising call). Use `make_noise` for
per-seed noise that does not depend on the batch size.
"""
from __future__ import annotations

import inspect
import numbers
import time
from typing import Callable, Optional

import torch

from .branches import clear_graph_cache as _clear_branch_runners
from .branches import runner_for
from .models.conditioning import warn_missing_labels
from .solvers import schedules as _schedules
from .solvers import solve_graph as _solve_graph
from .solvers.counting import CountingDenoiser, SampleStats
from .solvers.graphs import (check_cond_device, device_guard, graph_mode,
                             strategy_for)
from .solvers.registry import (all_option_names, is_explicit, nfe_to_steps, resolve_afs,
                               resolve_sigmas, spec, steps_to_nfe)

__all__ = ["sample", "clear_graph_cache", "DEFAULT_NFE"]

#: The budget of a solver without params when ``nfe`` is None and no explicit grid says.
DEFAULT_NFE = 5

GRAPHS = (None, "solve")


def clear_graph_cache() -> None:
    """Drops every cached branch runner and solve graph (and their memory pools), and
    forgets which denoisers failed to capture."""
    _clear_branch_runners()


def sample(denoiser: Callable, noise: torch.Tensor, solver: str = "ipndm",
           nfe: Optional[int] = None, params=None, schedule=None, afs: Optional[bool] = None,
           return_stats: bool = False, progress: bool = False,
           callback: Optional[Callable] = None, options: Optional[dict] = None,
           graph: Optional[str] = None, **cond):
    """Integrates the probability-flow ODE from ``noise * sigmas[0]`` to ``sigmas[-1]``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> x0_hat``.
        noise: ``[B, ...]`` standard normal noise (see `make_noise`).
        solver: one of `solver_names()`: "euler" ("ddim"), "heun", "dpm2", "dpmpp3m",
            "unipc", "ipndm", "deis", "epd", "epd-ipndm", "amed", "amed-ipndm",
            "d-euler" ("d-ddim"), "d-heun", "d-ipndm", "paradigms".
        nfe: latency budget (sequential denoiser calls), mapped exactly to steps (module
            docstring). None: from an explicit schedule, else from ``params``, else
            `DEFAULT_NFE` (5). Given with params, it must match them.
        params: `EPDParams` for "epd" / "epd-ipndm", `AMEDParams` for "amed" /
            "amed-ipndm", `DODEParams` for the "d-*" solvers (their nfe, afs, sigmas
            and, for EPD / AMED, plugin must agree).
        schedule: None (polynomial, rho=7, sigma in [0.002, 80]), a kind name
            ("polynomial", "logsnr", "time-uniform"), a dict of `get_sigmas` keyword
            arguments (with optional "kind"), or an explicit decreasing list/tensor of
            sigmas (its step count must match nfe).
        afs: analytic first step; None uses the solver's default (on for heun, dpm2 and
            the EPD solvers, off for the one-call-per-step solvers).
        return_stats: also return a `SampleStats`.
        progress: tqdm progress bar. callback: per-step callback (see the solvers).
        options: solver options, e.g. ``{"variant": "bh1"}`` for unipc; the valid names
            per solver are `solver_options(solver)`.
        graph: None (the EPD branch call is captured as ``EPD_KERNELS_GRAPH`` says) or
            "solve" (the whole loop captured once per shape and replayed; no callback or
            progress; not for ParaDiGMS or predictor-form AMED).
        **cond: conditioning passed to the denoiser (e.g. ``class_labels``); may be nested
            (dicts, lists, tuples of tensors). Where a graph is captured it must be on
            noise's device (ValueError before the capture).

    Returns:
        ``x`` at sigma_min, shaped and typed like noise; ``(x, stats)`` with return_stats.
    """
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
    with the EPD branch call on the cached runner (whose counters give the graph work)."""
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
    x = noise * float(sigmas[0])
    if s.needs_params:
        out = fn(counter, x, sigmas, params=params, callback=callback, progress=progress,
                 **kwargs, **cond)
    else:
        out = fn(counter, x, sigmas, callback=callback, progress=progress, **kwargs, **cond)
    if runner is None:
        return out, 0, 0
    return out, runner.captures - c0, runner.replays - r0


def _check_options(s, options, cond, denoiser) -> dict:
    """The solver options as a dict; ValueError for unknown ones and for options given as
    conditioning keywords (a denoiser taking ``**kwargs`` would swallow them silently)."""
    valid = s.options()
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict of solver options, got {type(options).__name__}")
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {s.name!r}; its options are "
                         f"{list(valid) if valid else 'none'}")
    misplaced = sorted(k for k in cond if k in all_option_names() and not _names(denoiser, k))
    if misplaced:
        raise ValueError(f"sample() got {misplaced} as conditioning keywords, but these are "
                         f"solver options: pass options={{{', '.join(repr(k) + ': ...' for k in misplaced)}}}"
                         f" (solver {s.name!r} takes {list(valid) if valid else 'no options'})")
    return dict(options)


def _names(denoiser, name: str) -> bool:
    """Whether the denoiser's signature (its forward's for a module) names `name` itself
    (then a keyword of that name is its conditioning, not a misplaced option)."""
    fn = getattr(denoiser, "forward", denoiser)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _check_graph(graph, s, params, callback, progress) -> None:
    if graph not in GRAPHS:
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
        if s.name.startswith("d-"):
            _check_dode_params(s, params)
        else:
            _check_params_kind(s, params)
        sigmas, steps, a = _resolve_epd(s, params, nfe, schedule, afs)
        return sigmas, steps, steps_to_nfe(s.name, steps, a), extra
    if params is not None:
        raise ValueError(f"params are only used by the EPD, AMED and D-ODE solvers, not "
                         f"by {s.name!r}")
    a = resolve_afs(s, afs)
    extra["afs"] = a
    if is_explicit(schedule):
        sigmas = _schedules.check_sigmas(schedule, "schedule")
        steps = sigmas.numel() - 1
        implied = steps_to_nfe(s.name, steps, a)
        if nfe is None:
            nfe = implied
        elif nfe != implied:
            raise ValueError(
                f"the explicit schedule has {steps} steps, which costs nfe={implied} with "
                f"solver {s.name!r} (afs={a}), but nfe={nfe} was asked (pass "
                f"nfe={implied} or nfe=None to take it from the schedule)")
        if implied < 1:
            raise ValueError(f"the explicit schedule gives nfe={implied} < 1")
        return sigmas, steps, nfe, extra
    nfe = DEFAULT_NFE if nfe is None else nfe
    steps = nfe_to_steps(s.name, nfe, a)
    sigmas = resolve_sigmas(schedule, steps)
    if sigmas.numel() - 1 != steps:
        raise ValueError(f"the schedule has {sigmas.numel() - 1} steps but nfe={nfe} "
                         f"needs {steps}")
    return sigmas, steps, nfe, extra


def _check_dode_params(spec, params):
    from .params import DODEParams

    if not isinstance(params, DODEParams):
        raise ValueError(f"solver {spec.name!r} needs params (a DODEParams from "
                         f"epd_kernels.fit_dode(...) or DODEParams.load(path))")
    params.check_compatible(solver=spec.name)


def _check_params_kind(spec, params):
    """EPD solvers take EPDParams, AMED solvers AMEDParams, with the matching plugin flag."""
    from .params import AMEDParams

    amed = spec.name.startswith("amed")
    if amed:
        if params is None:
            raise ValueError(f"solver {spec.name!r} needs params (an AMEDParams from "
                             f"epd_kernels.distill(..., method='amed'), AMEDParams.init(...) "
                             f"or AMEDParams.load(path))")
        if not isinstance(params, AMEDParams):
            raise ValueError(f"solver {spec.name!r} needs AMEDParams, got "
                             f"{type(params).__name__}")
        params.check_compatible(plugin=dict(spec.extra)["plugin"])
    elif isinstance(params, AMEDParams):
        raise ValueError(f"these are AMED params: use solver {params.solver!r}, not "
                         f"{spec.name!r}")


def _resolve_epd(spec, params, nfe, schedule, afs):
    """(sigmas, steps, afs) for an EPD solver, checked against its params."""
    if params is None:
        raise ValueError(f"solver {spec.name!r} needs params (an EPDParams from "
                         f"epd_kernels.distill(...) or EPDParams.load(path))")
    p_afs = getattr(params, "afs", None)
    if afs is not None and p_afs is not None and bool(afs) != bool(p_afs):
        raise ValueError(f"afs={afs} but the params were distilled with afs={p_afs}")
    a = bool(p_afs) if p_afs is not None else resolve_afs(spec, afs)
    p_plugin = getattr(params, "plugin", None)
    want_plugin = dict(spec.extra).get("plugin")
    if p_plugin is not None and want_plugin is not None and bool(p_plugin) != bool(want_plugin):
        right = "epd-ipndm" if p_plugin else "epd"
        raise ValueError(f"these params are for solver {right!r} (plugin={bool(p_plugin)}), "
                         f"not {spec.name!r}")
    p_sigmas = getattr(params, "sigmas", None)
    if p_sigmas is not None:
        sigmas = _schedules.check_sigmas(p_sigmas, "params.sigmas")
        if schedule is not None:
            other = resolve_sigmas(schedule, sigmas.numel() - 1)
            if other.shape != sigmas.shape or not torch.allclose(other, sigmas, rtol=1e-6, atol=0):
                raise ValueError("schedule does not match params.sigmas, the grid the params "
                                 "were distilled on (leave schedule=None)")
    else:
        if nfe is None:
            raise ValueError("nfe must be given (params have no sigmas)")
        sigmas = resolve_sigmas(schedule, nfe_to_steps(spec.name, nfe, a))
    steps = sigmas.numel() - 1
    implied = steps_to_nfe(spec.name, steps, a)
    p_nfe = getattr(params, "nfe", None)
    if p_nfe is not None and int(p_nfe) != implied:
        raise ValueError(f"params.nfe={p_nfe} does not match params.sigmas ({steps} steps, "
                         f"afs={a} -> nfe={implied})")
    if nfe is not None and int(nfe) != implied:
        raise ValueError(f"nfe={nfe} was asked but the params are for nfe={implied} "
                         f"({steps} steps, afs={a}); pass nfe={implied} or nfe=None")
    return sigmas, steps, a
