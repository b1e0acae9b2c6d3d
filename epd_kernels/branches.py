"""K parallel branches in ONE batched denoiser call (DESIGN.md sections 1-2).

For one EPD step from ``t`` with direction ``v`` (``d_n``, or the iPNDM combination for the
plugin) and branch points ``tau [K]``:

    x_k     = x + (tau_k - t) * v                       branch states, k = 0..K-1
    sigma_k = (1 + delta_k) * tau_k                     per-sample noise level
    D       = denoiser(cat_k x_k, cat_k sigma_k, **cond repeated K times)   # batch K*B
    g_k     = (x_k - D_k) / tau_k                       -> returned as [K, B, ...]

The batch is branch-major (k-major): rows ``k*B .. k*B+B-1`` are branch k, for the states,
the sigmas and every repeated conditioning tensor alike.

`BranchRunner.run` (no autograd) writes the states with `branch_states_into` straight into
a static ``[K*B, ...]`` input buffer, fills a static sigma buffer ``[K*B]`` and static
conditioning buffers, and calls the denoiser once. A *graph strategy* may capture that call
(and the ``g`` arithmetic) once and replay it every step:

* `CudaGraphStrategy` (default for CUDA tensors): warm-up on a side stream, capture into a
  ``torch.cuda.CUDAGraph``, replay. Opt out with ``use_cuda_graph=False`` or the
  environment variable ``EPD_KERNELS_NO_CUDA_GRAPH=1`` (which wins over everything).
* `EagerGraphStrategy`: records the callable and counts captures and replays; each replay
  recomputes and overwrites one static output tensor, exactly like a real graph. It lets
  the CPU tests check buffer reuse, copy-in / copy-out and re-capture.

A capture is keyed by the shape, dtype and device of x, K, and the names, shapes and dtypes
of the conditioning tensors (plus the values of non-tensor conditioning); any change
re-allocates the buffers and captures again. The result is always copied out of the static
output before it is returned, so a later replay cannot overwrite it.

`BranchRunner.run_differentiable` is the autograd path (distillation): `branch_states` and
``torch.cat`` of the conditioning, no static buffers, so gradients reach r (through tau),
delta, x, v and the denoiser.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Union

import torch

from .ops import branch_states, branch_states_into
from .reference import opmath_dtype

__all__ = [
    "BranchRunner",
    "CudaGraphStrategy",
    "EagerGraphStrategy",
    "repeat_cond",
    "cuda_graphs_disabled_by_env",
    "resolve_use_cuda_graph",
]

ENV_NO_CUDA_GRAPH = "EPD_KERNELS_NO_CUDA_GRAPH"

Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------
# graph strategies: capture(fn) -> an object with .replay() -> the static output tensor


class _EagerCaptured:
    def __init__(self, fn, owner):
        self.fn = fn
        self.owner = owner
        self.output: Optional[torch.Tensor] = None

    def replay(self) -> torch.Tensor:
        self.owner.replays += 1
        out = self.fn()
        if self.output is None:
            self.output = out
        else:  # like a CUDA graph: the same output memory is overwritten on every replay
            self.output.copy_(out)
        return self.output


class EagerGraphStrategy:
    """A stand-in for CUDA graphs on any device: records the callable, counts, replays it.

    ``captures`` / ``replays`` count the calls; ``captured_fns`` lists what was captured.
    """

    name = "eager-graph"

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.captured_fns: list = []

    def capture(self, fn: Callable[[], torch.Tensor]) -> _EagerCaptured:
        self.captures += 1
        self.captured_fns.append(fn)
        return _EagerCaptured(fn, self)


class _CudaCaptured:  # pragma: no cover - needs a GPU
    def __init__(self, graph, output, owner):
        self.graph = graph
        self.output = output
        self.owner = owner

    def replay(self) -> torch.Tensor:
        self.owner.replays += 1
        self.graph.replay()
        return self.output


class CudaGraphStrategy:  # pragma: no cover - needs a GPU
    """Warm up on a side stream, capture one ``torch.cuda.CUDAGraph``, replay it.

    The warm-up runs let lazy initialisation (cuDNN autotuning, allocator growth) happen
    outside the capture, as the PyTorch CUDA-graph guide requires.
    """

    name = "cuda-graph"

    def __init__(self, warmup: int = 2, pool=None):
        self.warmup = warmup
        self.pool = pool
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> _CudaCaptured:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.captures += 1
        return _CudaCaptured(graph, out, self)


def cuda_graphs_disabled_by_env() -> bool:
    return os.environ.get(ENV_NO_CUDA_GRAPH, "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_use_cuda_graph(flag: Optional[bool], device: torch.device) -> bool:
    """Whether to capture CUDA graphs: default on for CUDA devices; env var opt-out wins."""
    device = torch.device(device)
    if cuda_graphs_disabled_by_env():
        return False
    if flag is None:
        return device.type == "cuda"
    if flag and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs CUDA tensors, got a tensor on {device} "
                         f"(pass use_cuda_graph=None or False)")
    return bool(flag)


# --------------------------------------------------------------------------------------
# conditioning


def _is_batch_tensor(v: Any, batch: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch


def repeat_cond(cond: dict, batch: int, num_points: int) -> dict:
    """Conditioning for the K*B batch: tensors with leading dim B are repeated k-major.

    Other values (non-tensors, 0-d tensors, tensors with another leading dim) pass through.
    Differentiable (uses ``torch.cat``).
    """
    return {k: (torch.cat([v] * num_points, 0) if _is_batch_tensor(v, batch) else v)
            for k, v in cond.items()}


def _freeze(v: Any):
    try:
        hash(v)
        return ("value", type(v).__name__, v)
    except TypeError:
        return ("id", id(v))


def _cond_signature(cond: dict, batch: int):
    sig = []
    for k in sorted(cond):
        v = cond[k]
        if isinstance(v, torch.Tensor):
            kind = "batch" if _is_batch_tensor(v, batch) else "static"
            sig.append((k, kind, tuple(v.shape), v.dtype, v.device))
        else:
            sig.append((k, "object", _freeze(v)))
    return tuple(sig)


def _as_bk(name: str, value, batch: int, K: int, dtype, device) -> torch.Tensor:
    """A [K] or [B, K] tensor (or float) -> [B, K] in `dtype` (differentiable)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((batch, K), float(value), dtype=dtype, device=device)
    value = value.to(device=device, dtype=dtype)
    if value.dim() == 0:
        return value.expand(batch, K)
    if value.dim() == 1 and value.shape[0] == K:
        return value[None].expand(batch, K)
    if value.dim() == 2 and tuple(value.shape) == (batch, K):
        return value
    raise ValueError(f"{name} must be a float, a [K]=[{K}] or a [B, K]=[{batch}, {K}] tensor, "
                     f"got shape {list(value.shape)}")


def _as_b(name: str, value, batch: int, dtype, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), float(value), dtype=dtype, device=device)
    value = value.to(device=device, dtype=dtype)
    if value.dim() == 0:
        return value.expand(batch)
    if value.dim() == 1 and value.shape[0] == batch:
        return value
    raise ValueError(f"{name} must be a float, a 0-d or a [B]=[{batch}] tensor, got shape "
                     f"{list(value.shape)}")


# --------------------------------------------------------------------------------------
# the runner


class BranchRunner:
    """Evaluates K branch gradients of one EPD step with one batched denoiser call.

    Args:
        denoiser: ``D(x [N, ...], sigma [N], **cond) -> x0_hat [N, ...]``.
        num_points: K.
        use_cuda_graph: None (default: on for CUDA tensors), True or False. The
            environment variable EPD_KERNELS_NO_CUDA_GRAPH=1 turns CUDA graphs off
            regardless (an injected strategy is only turned off by ``False``).
        graph_strategy: an object with ``capture(fn) -> captured`` (``captured.replay()``
            returns the static output). Given, it is used on any device (tests inject
            `EagerGraphStrategy`); otherwise `CudaGraphStrategy` is used when graphs are on.

    Attributes after `run`: ``input_buffer`` [K*B, ...], ``sigma_buffer`` [K*B],
    ``tau_buffer`` [K*B, 1, ...], ``cond_buffers`` (name -> static tensor), ``captures``
    and ``calls`` counters.
    """

    def __init__(self, denoiser: Callable, num_points: int, use_cuda_graph: Optional[bool] = None,
                 graph_strategy: Any = None):
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}")
        self.denoiser = denoiser
        self.num_points = num_points
        self.use_cuda_graph = use_cuda_graph
        self.graph_strategy = graph_strategy
        self._graph_failed = False
        self._cuda_strategy = None
        self.reset()

    def reset(self) -> None:
        """Drops the static buffers and any captured graph."""
        self._key = None
        self._captured = None
        self.input_buffer: Optional[torch.Tensor] = None
        self.sigma_buffer: Optional[torch.Tensor] = None
        self.tau_buffer: Optional[torch.Tensor] = None
        self.cond_buffers: dict = {}
        self._call_cond: dict = {}
        self.captures = 0
        self.calls = 0

    # ------------------------------------------------------------------ helpers

    def _branch_scalars(self, x, t, tau, delta):
        """(c [B,K], sigma [K*B], tau [K*B]) in the sigma dtype (differentiable)."""
        B, K = x.shape[0], self.num_points
        dt = opmath_dtype(x.dtype)  # sigma dtype: float32, float64 for float64 data
        tau_bk = _as_bk("tau", tau, B, K, dt, x.device)
        delta_bk = _as_bk("delta", 0.0 if delta is None else delta, B, K, dt, x.device)
        t_b = _as_b("t", t, B, dt, x.device)
        c = tau_bk - t_b[:, None]
        sigma = ((1.0 + delta_bk) * tau_bk).t().reshape(K * B)
        return c, sigma, tau_bk.t().reshape(K * B)

    def _check_inputs(self, x, v):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor of shape [B, ...]")
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            raise ValueError(f"v must have the shape of x {list(x.shape)}, got "
                             f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")

    def _graphs_on(self, device) -> bool:
        if self._graph_failed:
            return False
        if self.graph_strategy is not None:  # injected (tests): on unless turned off
            return self.use_cuda_graph is not False
        return resolve_use_cuda_graph(self.use_cuda_graph, device)

    def _allocate(self, x, cond, sigma_dtype, graphs):
        B, K = x.shape[0], self.num_points
        self.input_buffer = torch.empty((K * B,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        self.sigma_buffer = torch.empty(K * B, dtype=sigma_dtype, device=x.device)
        self.tau_buffer = torch.empty((K * B,) + (1,) * (x.dim() - 1), dtype=sigma_dtype,
                                      device=x.device)
        self.cond_buffers = {}
        call_cond = {}
        for name, value in cond.items():
            if isinstance(value, torch.Tensor):
                if _is_batch_tensor(value, B):
                    buf = torch.empty((K * B,) + tuple(value.shape[1:]), dtype=value.dtype,
                                      device=value.device)
                elif graphs:  # a graph reads fixed addresses: keep a static copy
                    buf = torch.empty_like(value, memory_format=torch.contiguous_format)
                else:         # passes through unchanged
                    call_cond[name] = value
                    continue
                self.cond_buffers[name] = buf
                call_cond[name] = buf
            else:
                call_cond[name] = value
        self._call_cond = call_cond

    def _fill_cond(self, cond, B):
        K = self.num_points
        for name, buf in self.cond_buffers.items():
            value = cond[name]
            if _is_batch_tensor(value, B):
                buf.view((K,) + tuple(value.shape)).copy_(value.unsqueeze(0).expand((K,) + tuple(value.shape)))
            else:
                buf.copy_(value)

    def _static_fn(self):
        xin, sig, tau, den, cond = (self.input_buffer, self.sigma_buffer, self.tau_buffer,
                                    self.denoiser, self._call_cond)

        def fn():
            d = den(xin, sig, **cond)
            return ((xin - d) / tau).to(xin.dtype)

        return fn

    # ------------------------------------------------------------------ public

    def run(self, x: torch.Tensor, v: torch.Tensor, t: Scalar, tau, delta=None,
            **cond) -> torch.Tensor:
        """Branch gradients ``g [K, B, ...]`` (no autograd; static buffers, maybe a graph).

        Args:
            x, v: ``[B, ...]`` state and direction.
            t: current sigma (float, 0-d or [B] tensor).
            tau: branch sigmas, ``[K]`` or ``[B, K]``.
            delta: sigma perturbations, None, ``[K]`` or ``[B, K]``.
            **cond: conditioning for the denoiser (see `repeat_cond`).
        """
        self._check_inputs(x, v)
        B, K = x.shape[0], self.num_points
        with torch.no_grad():
            c, sigma, tau_flat = self._branch_scalars(x, t, tau, delta)
            graphs = self._graphs_on(x.device)
            key = (tuple(x.shape), x.dtype, x.device, K, sigma.dtype, graphs,
                   _cond_signature(cond, B))
            if key != self._key:
                self._allocate(x, cond, sigma.dtype, graphs)
                self._key = key
                self._captured = None
            branch_states_into(x.detach(), v.detach(), c, self.input_buffer)
            self.sigma_buffer.copy_(sigma)
            self.tau_buffer.view(-1).copy_(tau_flat)
            self._fill_cond(cond, B)
            if not graphs:  # pass-through values must be the caller's current objects
                for name, value in cond.items():
                    if name not in self.cond_buffers:
                        self._call_cond[name] = value
            self.calls += 1
            if graphs:
                if self._captured is None:
                    self._captured = self._capture()
                if self._captured is not None:
                    out = self._captured.replay()
                    # Copy out of the static output: the next replay overwrites it.
                    return out.clone().view((K, B) + tuple(x.shape[1:]))
            g = self._static_fn()()
            return g.view((K, B) + tuple(x.shape[1:]))

    def _capture(self):
        strategy = self.graph_strategy
        if strategy is None:
            if self._cuda_strategy is None:
                self._cuda_strategy = CudaGraphStrategy()
            strategy = self._cuda_strategy
        try:
            captured = strategy.capture(self._static_fn())
        except Exception as e:  # pragma: no cover - capture failures need a GPU
            if self.graph_strategy is not None:
                raise
            warnings.warn(f"epd_kernels: CUDA graph capture of the denoiser failed ({e!r}); "
                          f"running the branch call eagerly. Set {ENV_NO_CUDA_GRAPH}=1 to skip "
                          f"the attempt.", RuntimeWarning, stacklevel=3)
            self._graph_failed = True
            return None
        self.captures += 1
        return captured

    def run_differentiable(self, x: torch.Tensor, v: torch.Tensor, t: Scalar, tau, delta=None,
                           **cond) -> torch.Tensor:
        """Same result as `run`, differentiable in x, v, tau, delta, cond and the denoiser."""
        self._check_inputs(x, v)
        B, K = x.shape[0], self.num_points
        c, sigma, tau_flat = self._branch_scalars(x, t, tau, delta)
        states = branch_states(x, v, c).reshape((K * B,) + tuple(x.shape[1:]))
        self.calls += 1
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

        def any_grad(obj):
            if isinstance(obj, torch.Tensor):
                return obj.requires_grad
            if isinstance(obj, dict):
                return any(any_grad(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return any(any_grad(v) for v in obj)
            return False

        if any_grad(tensors):
            return True
        if isinstance(self.denoiser, torch.nn.Module):
            return any(p.requires_grad for p in self.denoiser.parameters())
        return False
