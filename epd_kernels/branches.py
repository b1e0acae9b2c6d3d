"""K parallel branches in ONE batched denoiser call (docs/design.md, "EPD step"): for a step
from ``t`` along ``v``, the states ``x_k = x + (tau_k - t) v`` at ``sigma_k = (1 + delta_k)
tau_k`` go through one denoiser call of batch K*B (conditioning repeated K times) and come
back as ``g_k = (x_k - D_k) / tau_k``, ``[K, B, ...]``.

The batch is k-major (rows ``k*B .. k*B+B-1`` are branch k) for states, sigmas and every
conditioning tensor leaf with leading dim B (possibly nested). `BranchRunner.run` (no
autograd) fills static buffers and, with graphs on (`epd_kernels.solvers.graphs`), captures
the call once per key and replays it; `run_differentiable` is the autograd path. `runner_for`
caches runners; a denoiser whose capture failed runs eagerly from then on.
"""
from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Any, Callable, List, Optional, Union

import torch
from torch.utils import _pytree as pytree

from .ops import branch_states, branch_states_into
from .reference import opmath_dtype
from .solvers.counting import unwrap_counter
from .solvers.common import check_int
from .solvers.graphs import (GRAPH_ENV, DenoiserKey, check_cond_device, cond_rebuilder,
                             device_guard, freeze, graph_mode, strategy_for)

__all__ = ["BranchRunner", "repeat_cond", "check_cond_device", "runner_for",
           "clear_graph_cache", "capture_failed", "remember_capture_failure"]

Scalar = Union[float, torch.Tensor]

CACHE_SIZE = 8        # runners kept by runner_for (each may hold a graph and its pool)


def _is_batch_tensor(v: Any, batch: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch


def repeat_cond(cond: dict, batch: int, num_points: int) -> dict:
    """Conditioning for the K*B batch: tensor leaves (also inside dicts, lists, tuples)
    with leading dim B are repeated k-major; other leaves pass through. Differentiable."""
    return pytree.tree_map(
        lambda v: torch.cat([v] * num_points, 0) if _is_batch_tensor(v, batch) else v, cond)


def _leaf_signature(v: Any, batch: int):
    if isinstance(v, torch.Tensor):
        kind = "batch" if _is_batch_tensor(v, batch) else "static"
        return (kind, tuple(v.shape), v.dtype, v.device)
    return ("object", freeze(v))


def _expand(name: str, value, shape: tuple, dtype, device) -> torch.Tensor:
    """A float, a 0-d tensor or a tensor of the trailing dims of `shape` ([B]; [K] or
    [B, K]) expanded to `shape` in `dtype` (differentiable)."""
    if not isinstance(value, torch.Tensor):
        return torch.full(shape, float(value), dtype=dtype, device=device)
    if tuple(value.shape) != tuple(shape[len(shape) - value.dim():]):
        raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor of the trailing "
                         f"dims of {list(shape)}, got shape {list(value.shape)}")
    return value.to(device=device, dtype=dtype).expand(shape)


_FAILED: "collections.deque[DenoiserKey]" = collections.deque(maxlen=64)


def capture_failed(denoiser: Callable) -> bool:
    """Whether a graph capture of `denoiser` failed before (it then runs eagerly)."""
    key = DenoiserKey(denoiser)
    return any(k.matches(key) for k in _FAILED)


def remember_capture_failure(denoiser: Callable) -> None:
    _FAILED.append(DenoiserKey(denoiser))


class BranchRunner:
    """The K branch gradients of an EPD step in one call (module docstring). A
    `CountingDenoiser` is unwrapped and gets the runner's logical calls. ``use_cuda_graph``:
    None (follow ``graph``: "auto", "off", "simulate", None for ``EPD_KERNELS_GRAPH``), False
    or True (ValueError off CUDA); ``graph_strategy``: a strategy used on any device.
    Counters: ``calls``, ``samples``, ``captures``, ``replays``."""

    def __init__(self, denoiser: Callable, num_points: int, use_cuda_graph: Optional[bool] = None,
                 graph_strategy: Any = None, graph: Optional[str] = None):
        num_points = check_int("num_points", num_points)
        # A counting wrapper never goes into a graph: the runner calls the model and
        # reports its logical calls to the wrapper's counts instead.
        self.denoiser, self._own_counter = unwrap_counter(denoiser)
        self.num_points = num_points
        self.use_cuda_graph = use_cuda_graph
        self.graph = graph_mode(graph)
        self._strategy = graph_strategy
        self._counter = None
        self.captures = 0
        self.replays = 0
        self.reset()

    def reset(self) -> None:
        """Drops the static buffers and any captured graph (the counters stay)."""
        self._key = None
        self._captured = None
        self._fn = None
        self.input_buffer: Optional[torch.Tensor] = None
        self.sigma_buffer: Optional[torch.Tensor] = None
        self.tau_buffer: Optional[torch.Tensor] = None
        self.cond_buffers: List[Optional[torch.Tensor]] = []
        self.calls = 0
        self.samples = 0

    @contextlib.contextmanager
    def counting(self, counter):
        """Reports every logical branch call made inside the block to ``counter`` (a
        `CountingDenoiser`, or None)."""
        before, self._counter = self._counter, counter
        try:
            yield self
        finally:
            self._counter = before

    def _branch_scalars(self, x, t, tau, delta):
        """(c [B,K], sigma [K*B], tau [K*B]) in the sigma dtype (differentiable)."""
        B, K = x.shape[0], self.num_points
        dt = opmath_dtype(x.dtype)  # sigma dtype: float32, float64 for float64 data
        tau_bk = _expand("tau", tau, (B, K), dt, x.device)
        delta_bk = _expand("delta", 0.0 if delta is None else delta, (B, K), dt, x.device)
        t_b = _expand("t", t, (B,), dt, x.device)
        c = tau_bk - t_b[:, None]
        sigma = ((1.0 + delta_bk) * tau_bk).t().reshape(K * B)
        return c, sigma, tau_bk.t().reshape(K * B)

    def _check_inputs(self, x, v):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor of shape [B, ...]")
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            raise ValueError(f"v must have the shape of x {list(x.shape)}, got "
                             f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")

    def _strategy_for(self, device):
        """The graph strategy for tensors on `device`, or None (eager)."""
        device = torch.device(device)
        if self.use_cuda_graph is False or capture_failed(self.denoiser):
            return None
        if self.use_cuda_graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs CUDA tensors, got a tensor on {device} "
                             f"(pass use_cuda_graph=None or False)")
        if self._strategy is not None:
            return self._strategy
        cls = strategy_for("auto" if self.use_cuda_graph else self.graph, device)
        if cls is not None:
            self._strategy = cls()
        return self._strategy

    def _allocate(self, x, leaves, spec, sigma_dtype, graphs):
        B, K = x.shape[0], self.num_points
        self.input_buffer = torch.empty((K * B,) + tuple(x.shape[1:]), dtype=x.dtype,
                                        device=x.device)
        self.sigma_buffer = torch.empty(K * B, dtype=sigma_dtype, device=x.device)
        self.tau_buffer = torch.empty((K * B,) + (1,) * (x.dim() - 1), dtype=sigma_dtype,
                                      device=x.device)
        # One static buffer per tensor leaf: repeated ones always, the others only for a
        # graph (which reads fixed addresses); without a graph those pass through.
        self.cond_buffers = []
        for v in leaves:
            if _is_batch_tensor(v, B):
                self.cond_buffers.append(torch.empty((K * B,) + tuple(v.shape[1:]),
                                                     dtype=v.dtype, device=v.device))
            elif isinstance(v, torch.Tensor) and graphs:
                self.cond_buffers.append(torch.empty_like(v,
                                                          memory_format=torch.contiguous_format))
            else:
                self.cond_buffers.append(None)
        self._fn = self._make_fn(leaves, spec, x.dtype)

    def _make_fn(self, leaves, spec, dtype):
        """``fn(xin, sigma, tau, *tensor leaves) -> g``: the work a graph captures. It closes
        over the non-tensor leaves only, so a replay sees whatever the buffers hold."""
        den, rebuild = self.denoiser, cond_rebuilder(leaves, spec)

        def fn(xin, sig, tau, *tensors):
            d = den(xin, sig, **rebuild(tensors))
            return ((xin - d) / tau).to(dtype)

        return fn

    def _fill(self, leaves, B):
        """Copies the conditioning into its buffers; returns the tensor inputs of `_fn`."""
        K = self.num_points
        tensors = []
        for v, buf in zip(leaves, self.cond_buffers):
            if not isinstance(v, torch.Tensor):
                continue
            if buf is None:
                tensors.append(v)
                continue
            if _is_batch_tensor(v, B):
                buf.view((K,) + tuple(v.shape)).copy_(v.unsqueeze(0).expand((K,) + tuple(v.shape)))
            else:
                buf.copy_(v)
            tensors.append(buf)
        return (self.input_buffer, self.sigma_buffer, self.tau_buffer) + tuple(tensors)

    def _capture(self, strategy, inputs):
        try:
            captured = strategy.capture(self._fn, inputs)
        except Exception as e:
            warnings.warn(f"epd_kernels: graph capture of the denoiser failed ({e!r}); its "
                          f"branch calls run eagerly from now on. Set {GRAPH_ENV}=off to skip "
                          f"the attempt.", RuntimeWarning, stacklevel=4)
            remember_capture_failure(self.denoiser)
            return None
        self.captures += 1
        return captured

    def run(self, x: torch.Tensor, v: torch.Tensor, t: Scalar, tau, delta=None,
            **cond) -> torch.Tensor:
        """Branch gradients ``g [K, B, ...]`` (no autograd; static buffers, maybe a graph)
        for ``x, v [B, ...]``, ``t`` (float, 0-d or [B]), ``tau`` and ``delta`` (None,
        ``[K]`` or ``[B, K]``); with a graph, conditioning must be on x's device."""
        self._check_inputs(x, v)
        B, K = x.shape[0], self.num_points
        with torch.no_grad(), device_guard(x.device):
            c, sigma, tau_flat = self._branch_scalars(x, t, tau, delta)
            strategy = self._strategy_for(x.device)
            if strategy is not None:   # a graph would hold a copy on the wrong device
                check_cond_device(cond, x.device)
            leaves, spec = pytree.tree_flatten(cond)
            key = (tuple(x.shape), x.dtype, x.device, K, sigma.dtype, strategy is not None,
                   spec, tuple(_leaf_signature(v_, B) for v_ in leaves))
            if key != self._key:
                self._allocate(x, leaves, spec, sigma.dtype, strategy is not None)
                self._key = key
                self._captured = None
            branch_states_into(x.detach(), v.detach(), c, self.input_buffer)
            self.sigma_buffer.copy_(sigma)
            self.tau_buffer.view(-1).copy_(tau_flat)
            inputs = self._fill(leaves, B)
            self._record(K * B)
            shape = (K, B) + tuple(x.shape[1:])
            if strategy is not None:
                if self._captured is None:
                    self._captured = self._capture(strategy, inputs)
                if self._captured is not None:
                    self.replays += 1
                    # Copy out of the static output: the next replay overwrites it.
                    return self._captured.replay().clone().view(shape)
            return self._fn(*inputs).view(shape)

    def _record(self, rows: int) -> None:
        self.calls += 1
        self.samples += rows
        counter = self._counter if self._counter is not None else self._own_counter
        if counter is not None:
            counter.count(rows)

    def run_differentiable(self, x: torch.Tensor, v: torch.Tensor, t: Scalar, tau, delta=None,
                           **cond) -> torch.Tensor:
        """Same result as `run`, differentiable in x, v, tau, delta, cond and the denoiser."""
        self._check_inputs(x, v)
        B, K = x.shape[0], self.num_points
        c, sigma, tau_flat = self._branch_scalars(x, t, tau, delta)
        states = branch_states(x, v, c).reshape((K * B,) + tuple(x.shape[1:]))
        self._record(K * B)
        d = self.denoiser(states, sigma, **repeat_cond(cond, B, K))
        g = (states - d) / tau_flat.view((K * B,) + (1,) * (x.dim() - 1))
        return g.to(x.dtype).view((K, B) + tuple(x.shape[1:]))

    def __call__(self, x, v, t, tau, delta=None, **cond) -> torch.Tensor:
        """`run_differentiable` when autograd needs it, else `run`."""
        if self.needs_grad(x, v, tau, delta, cond):
            return self.run_differentiable(x, v, t, tau, delta, **cond)
        return self.run(x, v, t, tau, delta, **cond)

    def needs_grad(self, *tensors) -> bool:
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(t, torch.Tensor) and t.requires_grad
               for t in pytree.tree_leaves(tensors)):
            return True
        if isinstance(self.denoiser, torch.nn.Module):
            return any(p.requires_grad for p in self.denoiser.parameters())
        return False


_RUNNERS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def runner_for(denoiser: Callable, num_points: int, x: torch.Tensor,
               graph: Optional[str] = None) -> BranchRunner:
    """The cached runner for this denoiser, K, x's shape / dtype / device and graph mode
    (a new one on a miss; the least recently used one is dropped beyond `CACHE_SIZE`)."""
    mode = graph_mode(graph)
    ident = DenoiserKey(denoiser)
    key = (ident.key, int(num_points), tuple(x.shape), x.dtype, x.device, mode)
    hit = _RUNNERS.get(key)
    if hit is not None and hit[0].matches(ident):
        _RUNNERS.move_to_end(key)
        return hit[1]
    runner = BranchRunner(denoiser, int(num_points), graph=mode)
    _RUNNERS[key] = (ident, runner)
    _RUNNERS.move_to_end(key)
    for k in [k for k, (i, _) in _RUNNERS.items() if not i.alive()]:
        del _RUNNERS[k]
    while len(_RUNNERS) > CACHE_SIZE:
        _RUNNERS.popitem(last=False)
    return runner


def clear_graph_cache() -> None:
    """Drops every cached runner (their graphs and memory pools) and solve graph, and
    forgets which denoisers failed to capture."""
    _RUNNERS.clear()
    _FAILED.clear()
    from .solvers import solve_graph

    solve_graph.clear()
