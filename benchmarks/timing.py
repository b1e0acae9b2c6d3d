"""The one timer of the benchmark sections: candidates of a comparison timed interleaved.

    stats = bench_interleaved(Timer(device), {"fused": f, "eager": g}, repeats=25)
    stats["fused"]["median_s"], stats["fused"]["min_s"], stats["fused"]["q25_s"], ...

After a warm-up, each candidate's calls per sample (``inner``) make a sample last about
``min_sample_s``; ``repeats`` rounds each take one sample of every candidate, round r
starting with candidate r mod n (a burst of load hits all alike, none is always first after
a switch). The garbage collector is paused; on CUDA, samples are CUDA events after a sync.

The tables show the **median** (seconds per call): the minimum is the single luckiest sample,
neither what a user sees nor stable on a shared machine; the median ignores disturbances of
fewer than half the rounds, and two interleaved medians compare under the same load. A wide
q25-q75 band says: repeat on a quiet machine.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Dict, List

import torch

__all__ = ["Timer", "bench_interleaved"]

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
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
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


def _summarize(samples: List[float], inner: int = 1) -> dict:
    """The statistics `bench_interleaved` reports for one candidate's samples."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0]] * 3
    return dict(median_s=statistics.median(s), min_s=s[0], q25_s=q[0], q75_s=q[2],
                repeats=len(s), inner=inner)


def bench_interleaved(timer: Timer, fns: Dict[str, Callable], *, repeats: int,
                      warmup: int = 1, min_sample_s: float = 0.0) -> Dict[str, dict]:
    """Times every candidate of ``fns`` (name -> no-argument callable), interleaved with a
    rotating order (module docstring); returns name -> `_summarize` statistics."""
    if not fns:
        raise ValueError("fns: need at least one candidate to time")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    inner = {}
    for name, fn in fns.items():
        for _ in range(int(warmup)):
            fn()
        timer.sync()
        once = timer.measure(fn, 1) if min_sample_s > 0 else math.inf
        inner[name] = max(1, min(MAX_INNER, math.ceil(min_sample_s / max(once, 1e-7))))
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
    return {n: _summarize(samples[n], inner[n]) for n in names}
