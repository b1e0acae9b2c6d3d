"""CPU threads that fit a shared machine: how many, and how idle OpenMP threads wait.

* When another process keeps a core busy, every parallel region of torch's OpenMP team
  waits for the member that is not scheduled: a busy 2-core machine can run a model
  several times slower with 2 threads than with 1. `pick_threads` (``--threads auto``)
  times a small batch with 1 thread and with all, interleaved, and keeps the faster.
* GNU OpenMP's idle threads spin before sleeping, taking the CPU from the thread the team
  waits for; ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once. The runtime reads it
  when torch is first imported, so `prefer_passive_wait` runs first thing in
  ``epd_kernels/__init__.py``, and this module imports torch only inside its functions.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Optional, Union

__all__ = ["prefer_passive_wait", "pick_threads", "model_batch_runner"]

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_wait(environ=None) -> bool:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set or torch is already imported;
    True if the policy in force for torch's OpenMP runtime is passive."""
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return environ[WAIT_POLICY].strip().upper() == "PASSIVE"
    if "torch" in sys.modules:
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    return True


def pick_threads(requested: Union[str, int, None], run_batch: Optional[Callable[[], object]],
                 device: str = "cpu", repeats: int = 2) -> int:
    """Sets torch's CPU threads and returns their number: ``requested`` (an integer), or
    for "auto" 1 or all cores, whichever runs ``run_batch()`` faster (best of ``repeats``,
    interleaved so that a change of load affects both, after one untimed warm-up call each).
    Off the CPU, on one core, or without ``run_batch``, nothing is timed."""
    import torch

    if requested != "auto":
        torch.set_num_threads(int(requested))
        return int(requested)
    most = torch.get_num_threads()
    if most <= 1 or not str(device).startswith("cpu") or run_batch is None:
        return most
    best = {1: math.inf, most: math.inf}
    with torch.no_grad():
        for n in best:
            torch.set_num_threads(n)
            run_batch()
        for _ in range(repeats):
            for n in best:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                run_batch()
                best[n] = min(best[n], time.perf_counter() - t0)
    chosen = 1 if best[1] <= best[most] else most
    torch.set_num_threads(chosen)
    return chosen


def model_batch_runner(model, shape, batch: int, cond: Optional[dict] = None,
                       device: str = "cpu") -> Callable[[], object]:
    """A `pick_threads` probe: one call of ``model`` on ``batch`` noisy samples at sigma 1
    (the middle of the usual noise range)."""
    import torch

    x = torch.randn((batch,) + tuple(shape), device=device)
    s = torch.ones(batch, device=device)
    return lambda: model(x, s, **(cond or {}))
