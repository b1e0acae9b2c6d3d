"""Cost accounting of a sampling run: latency NFE (sequential calls) and total evaluations.

`CountingDenoiser` counts the calls that run in Python. A graph replay runs no Python, so
whoever replays reports the logical call with `CountingDenoiser.count`; the counter never
sits inside a captured graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Tuple

import torch

from .common import check_int

__all__ = ["CountingDenoiser", "parallel_calls", "SampleStats", "unwrap_counter"]


class CountingDenoiser:
    """Counts ``calls`` (latency NFE) and ``evaluations`` (samples / ``batch_size``: a ``[K * B,
    ...]`` call is 1 call and K evaluations); inside ``with counter.parallel():`` all calls
    count as ONE call."""

    def __init__(self, denoiser: Callable, batch_size: int):
        self.denoiser = denoiser
        self.batch_size = check_int("batch_size", batch_size)
        self.calls = 0
        self.samples = 0
        self._parallel_depth = 0
        self._parallel_counted = False

    @property
    def evaluations(self) -> float:
        """Total evaluations: samples evaluated / batch_size (an int when divisible)."""
        q, r = divmod(self.samples, self.batch_size)
        return q if r == 0 else self.samples / self.batch_size

    @contextlib.contextmanager
    def parallel(self):
        """Calls inside the block are parallel: together they cost one latency NFE."""
        if self._parallel_depth == 0:
            self._parallel_counted = False
        self._parallel_depth += 1
        try:
            yield self
        finally:
            self._parallel_depth -= 1

    def count(self, samples: int, calls: int = 1) -> None:
        """Records ``calls`` sequential calls on ``samples`` samples in all that ran without
        passing through this wrapper (a graph replay)."""
        for _ in range(int(calls)):
            if self._parallel_depth == 0:
                self.calls += 1
            elif not self._parallel_counted:
                self.calls += 1
                self._parallel_counted = True
        self.samples += int(samples)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        self.count(int(x.shape[0]))
        return self.denoiser(x, sigma, **cond)

    def __getattr__(self, name):  # forward model attributes (shape, dim, ...)
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def unwrap_counter(denoiser: Callable) -> Tuple[Callable, Optional[CountingDenoiser]]:
    """``(the user's denoiser, the CountingDenoiser around it or None)``: graph code
    captures the former and reports its logical calls to the latter."""
    if isinstance(denoiser, CountingDenoiser):
        return denoiser.denoiser, denoiser
    return denoiser, None


def parallel_calls(denoiser):
    """``with parallel_calls(denoiser):`` marks parallel calls if `denoiser` counts them
    (a `CountingDenoiser`), and does nothing otherwise."""
    if isinstance(denoiser, CountingDenoiser):
        return denoiser.parallel()
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class SampleStats:
    """Cost of one `sample` call: latency NFE and total evaluations (graph replays
    included), steps, time, and the graph captures and replays it made."""

    latency_nfe: int
    total_evals: float
    steps: int
    wall_time_s: float
    solver: str
    nfe: int
    graph_captures: int = 0
    graph_replays: int = 0
