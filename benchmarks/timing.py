"""The one timer of the benchmark sections: candidates of a comparison timed interleaved.

    timer = Timer(torch.device("cpu"))
    stats = bench_interleaved(timer, {"fused": f, "eager": g}, repeats=25, warmup=3,
                              min_sample_s=0.005)
    stats["fused"]["median_s"], stats["fused"]["min_s"], stats["fused"]["q25_s"], ...

How a comparison is timed:

- every candidate is warmed up, then its number of back-to-back calls per sample
  (``inner``) is chosen so that one sample lasts about ``min_sample_s`` (at least one call,
  at most 1000): sub-millisecond kernels are then not measured at the clock's resolution;
- ``repeats`` rounds follow; each round takes one sample of every candidate, and the order
  of the candidates rotates from round to round (round r starts with candidate r mod n).
  A burst of load from another process then hits all candidates alike instead of the one
  that happened to be timed at that moment, and no candidate is always first after a
  switch (cold caches, a clock that ramps up);
- the garbage collector is paused while timing; on CUDA, samples are taken with CUDA
  events after a synchronisation.

What is reported, per candidate: the **median** over the rounds (``median_s``, seconds per
call) is the figure the tables show; the spread is reported beside it as the minimum and
the quartiles (``min_s``, ``q25_s``, ``q75_s``), with ``repeats`` and ``inner``.

Why the median and not the minimum: the benchmarks run on shared machines. The minimum is
the single luckiest sample; for calls that allocate and last milliseconds it is neither
what a user sees nor stable from one run to the next. The median ignores any disturbance
that hits fewer than half of the rounds, and because the rounds interleave the candidates,
the ratio of two medians compares them under the same load. The quartiles show how much
load there was: a wide q25-q75 band says the run should be repeated on a quiet machine.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Dict, List

import torch

__all__ = ["Timer", "bench_interleaved", "summarize"]

#: Bounds on the calls per sample: at least one; at most this many, so that a call far
#: faster than its first timed call suggested cannot make a sample run for minutes.
MAX_INNER = 1000


class Timer:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable, inner: int) -> float:
        if self.cuda:
            self.sync()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def summarize(samples: List[float], inner: int = 1) -> dict:
    """The statistics `bench_interleaved` reports for one candidate's samples."""
    if not samples:
        raise ValueError("samples: need at least one timing")
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0]] * 3
    return dict(median_s=statistics.median(s), min_s=s[0], q25_s=q[0], q75_s=q[2],
                repeats=len(s), inner=inner)


def bench_interleaved(timer: Timer, fns: Dict[str, Callable], *, repeats: int,
                      warmup: int = 1, min_sample_s: float = 0.0) -> Dict[str, dict]:
    """Times every candidate of ``fns`` (name -> no-argument callable), interleaved with a
    rotating order (module docstring); returns name -> `summarize` statistics."""
    if not fns:
        raise ValueError("fns: need at least one candidate to time")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if int(warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if not min_sample_s >= 0:
        raise ValueError(f"min_sample_s must be >= 0, got {min_sample_s!r}")
    inner = {}
    for name, fn in fns.items():
        for _ in range(int(warmup)):
            fn()
        timer.sync()
        if min_sample_s > 0:
            t = timer.measure(fn, 1)
            inner[name] = max(1, min(MAX_INNER, math.ceil(min_sample_s / max(t, 1e-7))))
        else:
            inner[name] = 1
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(int(repeats)):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                samples[n].append(timer.measure(fns[n], inner[n]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: summarize(samples[n], inner[n]) for n in names}
