"""Whole-solve capture (``sample(..., graph="solve")``): the sampling loop captured once
for fixed shapes and replayed, which removes the launch overhead that dominates at batch 1.

The captured function is ``fn(noise, *param tensors, *conditioning tensors) -> x_final``
on static buffers refilled at every call, so new values of the same shapes replay one
graph. Everything the graph bakes in (denoiser, solver and options, grid, shapes, params
structure and D-ODE's lambdas, conditioning structure) is in the cache key. The calls the
capture run makes are the cost reported for every replay.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import warnings
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree

from .counting import CountingDenoiser
from .graphs import (GRAPH_ENV, DenoiserKey, check_cond_device, cond_rebuilder, device_guard,
                     freeze, strategy_for)

__all__ = ["solve", "clear", "unsupported_reason"]

CACHE_SIZE = 8

#: Parameter fields handed to a captured solve as static device tensors, per params class.
_DEVICE_FIELDS = {"EPDParams": ("r", "weights", "delta", "o"), "AMEDParams": ("r", "delta", "o")}

_GRAPHS: "collections.OrderedDict[tuple, _SolveGraph]" = collections.OrderedDict()


def clear() -> None:
    _GRAPHS.clear()


def unsupported_reason(solver: str, params) -> Optional[str]:
    """Why this solver cannot be captured whole (None if it can)."""
    if solver == "paradigms":
        return ("ParaDiGMS slides its window by data-dependent amounts, which a captured "
                "graph would freeze")
    if params is not None and getattr(params, "predictor", None) is not None:
        return "AMED params in predictor form read features on the host at every step"
    return None


def _params_signature(params):
    if params is None:
        return None
    dev = _DEVICE_FIELDS.get(type(params).__name__, ())
    sig = [type(params).__name__]
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        if f.name in dev:
            sig.append((f.name, tuple(v.shape), v.dtype))
        elif f.name != "meta":
            sig.append((f.name, freeze(v)))
    return tuple(sig)


class _Failed:
    """A solve whose capture failed: it runs without a graph from then on."""

    def __init__(self, ident):
        self.ident = ident


class _SolveGraph:
    """One captured solve: its static inputs, the graph, and the cost of one replay (the
    calls the capture run made)."""

    def __init__(self, ident, strategy, body, inputs):
        self.ident = ident
        self.inputs = inputs
        self.captured = strategy.capture(body, inputs)
        self.calls, self.samples = body.cost["calls"], body.cost["samples"]


def solve(fn: Callable, denoiser: Callable, counter: CountingDenoiser, x: torch.Tensor,
          sigmas: torch.Tensor, params, kwargs: dict, cond: dict, mode: str):
    """``(x_final, captures, replays)`` by a captured solve, or None when graphs are off
    for x's device (the caller then runs the solver eagerly)."""
    cls = strategy_for(mode, x.device)
    if cls is None:
        return None
    check_cond_device(cond, x.device)
    dev_fields = _DEVICE_FIELDS.get(type(params).__name__, ()) if params is not None else ()
    leaves, spec = pytree.tree_flatten(cond)
    ident = DenoiserKey(denoiser)
    key = (ident.key, fn, tuple(x.shape), x.dtype, x.device, mode,
           tuple(sigmas.tolist()), tuple(sorted((k, freeze(v)) for k, v in kwargs.items())),
           _params_signature(params), spec,
           tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else freeze(v)
                 for v in leaves))
    entry = _GRAPHS.get(key)
    if isinstance(entry, _Failed) and entry.ident.matches(ident):
        return None
    captures = 0
    with torch.no_grad(), device_guard(x.device):
        ptens = [getattr(params, n).to(x.device) for n in dev_fields]
        ctens = [v for v in leaves if isinstance(v, torch.Tensor)]
        if not isinstance(entry, _SolveGraph) or not entry.ident.matches(ident):
            inputs = tuple(t.detach().clone() for t in [x] + ptens + ctens)
            body = _make_body(fn, denoiser, sigmas, params, dev_fields, kwargs, leaves, spec,
                              x.shape[0])
            try:
                entry = _SolveGraph(ident, cls(), body, inputs)
            except Exception as e:
                warnings.warn(f"epd_kernels: capture of the whole solve failed ({e!r}); running "
                              f"it without a graph. Set {GRAPH_ENV}=off to skip the attempt.",
                              RuntimeWarning, stacklevel=3)
                _GRAPHS[key] = _Failed(ident)
                return None
            captures = 1
            _GRAPHS[key] = entry
            while len(_GRAPHS) > CACHE_SIZE:
                _GRAPHS.popitem(last=False)
        _GRAPHS.move_to_end(key)
        for buf, t in zip(entry.inputs, [x] + ptens + ctens):
            buf.copy_(t)
        out = entry.captured.replay().clone()
    counter.count(entry.samples, calls=entry.calls)
    return out, captures, 1


def _make_body(fn, denoiser, sigmas, params, dev_fields, kwargs, leaves, spec, leaves_batch):
    """The function a solve graph captures; it closes over no tensor that changes."""
    rebuild = cond_rebuilder(leaves, spec)
    takes_runner = "runner" in inspect.signature(fn).parameters
    np_ = len(dev_fields)
    sigma0 = float(sigmas[0])
    batch = int(leaves_batch)

    def body(x0, *tensors):
        kw = dict(kwargs)
        if params is not None:
            p = copy.copy(params)   # no validation: the values are device tensors
            for name, t in zip(dev_fields, tensors[:np_]):
                object.__setattr__(p, name, t)
            kw["params"] = p
        if takes_runner:    # the branch call without a graph of its own
            from ..branches import BranchRunner

            kw["runner"] = BranchRunner(denoiser, params.num_points, graph="off")
        counting = CountingDenoiser(denoiser, batch)  # (a traced shape is a tensor)
        out = fn(counting, x0 * sigma0, sigmas, **kw, **rebuild(tensors[np_:]))
        body_cost["calls"], body_cost["samples"] = counting.calls, counting.samples
        return out

    body_cost: dict = {}
    body.cost = body_cost
    return body
