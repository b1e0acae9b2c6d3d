"""Graph capture and replay: CUDA graphs on GPUs, and a CPU stand-in with the same semantics.

A *strategy* captures ``fn(*inputs) -> tensor`` once (``inputs``: static buffers the caller
refills); ``replay()`` of the result reruns the work and returns one static output.
`CudaGraphStrategy`: ``torch.cuda.CUDAGraph``. `SimulatedGraphStrategy`: one trace of
``fn``, replayed without its Python, so code that relies on Python running at replay time
(a counter inside a denoiser, data-dependent branches) is caught on a CPU.

`graph_mode` reads ``EPD_KERNELS_GRAPH``: ``auto`` (default: CUDA graphs for CUDA tensors),
``off`` or ``simulate``; ``EPD_KERNELS_NO_CUDA_GRAPH=1`` means ``off`` when it is unset.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import _pytree

__all__ = ["GRAPH_ENV", "graph_mode", "CudaGraphStrategy", "SimulatedGraphStrategy"]

GRAPH_ENV = "EPD_KERNELS_GRAPH"
LEGACY_ENV = "EPD_KERNELS_NO_CUDA_GRAPH"
GRAPH_MODES = ("auto", "off", "simulate")
WARMUP = 2


def graph_mode(mode: Optional[str] = None) -> str:
    """``mode`` if given, else ``EPD_KERNELS_GRAPH`` (default ``auto``); ValueError naming
    the valid values for anything else."""
    where = "graph mode"
    if mode is None:
        raw = os.environ.get(GRAPH_ENV)
        if raw is None:
            legacy = os.environ.get(LEGACY_ENV, "0").strip().lower()
            return "off" if legacy in ("1", "true", "yes", "on") else "auto"
        mode, where = raw, f"environment variable {GRAPH_ENV}"
    m = str(mode).strip().lower()
    if m not in GRAPH_MODES:
        raise ValueError(f"{where} must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")
    return m


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (launches and captures then go to
    the tensors' device, not the current one), a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_cond_device(cond: dict, device: torch.device) -> None:
    """ValueError naming the keyword if a conditioning tensor is not on ``device`` (a graph
    would otherwise capture a copy on the wrong device, or fail inside the capture)."""
    device = torch.device(device)
    for name, value in cond.items():
        for leaf in _pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.device != device:
                raise ValueError(f"conditioning {name!r} has a tensor on {leaf.device} but x is "
                                 f"on {device}: move the conditioning to x's device")


def freeze(v):
    """A hashable cache-key part: a tensor by shape, dtype, device and values, a hashable
    value with its type (1, 1.0 and True hash alike), anything else by identity."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device,
                tuple(v.detach().cpu().reshape(-1).tolist()))
    try:
        hash(v)
        return ("value", type(v).__name__, v)
    except TypeError:
        return ("id", id(v))


class _Captured:
    """A captured graph: ``replay()`` reruns it and returns the static output."""

    def __init__(self, run: Callable[[], Any], output: Optional[torch.Tensor], owner):
        self._run = run
        self.output = output
        self._owner = owner

    def replay(self) -> torch.Tensor:
        self._owner.replays += 1
        out = self._run()
        if out is not None:  # the stand-in: copy into the one static output
            if self.output is None:
                self.output = out.clone()
            else:
                self.output.copy_(out)
        return self.output


def cond_rebuilder(leaves: list, spec) -> Callable:
    """``rebuild(tensors) -> cond``: the flattened conditioning (`leaves`, `spec`) with its
    tensor leaves replaced by `tensors` in order (a replay sees what the buffers hold)."""
    template = [None if isinstance(v, torch.Tensor) else v for v in leaves]
    slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

    def rebuild(tensors):
        vals = list(template)
        for i, t in zip(slots, tensors):
            vals[i] = t
        return _pytree.tree_unflatten(vals, spec)

    return rebuild


class _Strategy:
    def __init__(self, warmup: int = WARMUP):
        self.warmup = int(warmup)
        self.pool = None
        self.captures = 0
        self.replays = 0


class SimulatedGraphStrategy(_Strategy):
    """CUDA-graph semantics on any device (module docstring): warm-up, one traced capture,
    replays that run the trace."""

    name = "simulate"

    def capture(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]):
        inputs = tuple(inputs)
        for _ in range(self.warmup):
            fn(*inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(fn, inputs, check_trace=False)
        self.captures += 1
        return _Captured(lambda: traced(*inputs), None, self)


class CudaGraphStrategy(_Strategy):  # pragma: no cover - needs a GPU (tests marked gpu)
    """Warm-up on a side stream, one ``torch.cuda.CUDAGraph`` capture, replays; every
    capture of this strategy shares one memory pool."""

    name = "cuda"

    def capture(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]):
        inputs = tuple(inputs)
        device = inputs[0].device
        with torch.cuda.device(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(*inputs)
        self.captures += 1

        def run():
            with torch.cuda.device(device):
                graph.replay()

        return _Captured(run, out, self)


def strategy_for(mode: str, device: torch.device):
    """The strategy class for ``mode`` and ``device`` (None: no graphs)."""
    if mode == "simulate":
        return SimulatedGraphStrategy
    if mode == "auto" and torch.device(device).type == "cuda":
        return CudaGraphStrategy
    return None


class DenoiserKey:
    """Identity of a denoiser for caches, without keeping it alive where it can be held
    weakly. A bound method (a new object at every attribute access) is identified by its
    object and function."""

    def __init__(self, denoiser: Callable):
        if inspect.ismethod(denoiser):
            owner, self.key = denoiser.__self__, (id(denoiser.__self__), id(denoiser.__func__))
        else:
            owner, self.key = denoiser, (id(denoiser),)
        try:
            self._ref = weakref.ref(owner)
        except TypeError:     # not weakly referenceable: held (caches are bounded)
            self._ref = lambda o=owner: o
        self._owner_id = id(owner)

    def alive(self) -> bool:
        o = self._ref()
        return o is not None and id(o) == self._owner_id

    def matches(self, other: "DenoiserKey") -> bool:
        return self.key == other.key and self.alive() and other.alive() and (
            self._ref() is other._ref())
