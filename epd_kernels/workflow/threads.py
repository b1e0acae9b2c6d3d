"""CPU threads for the commands: how many, and how idle OpenMP threads wait.

Two problems of a CPU shared with other work (another program, other users):

* torch runs its CPU kernels on an OpenMP team of ``torch.get_num_threads()`` threads
  (all cores by default). When another process keeps a core busy, every parallel region
  waits for the team member that is not scheduled, and a busy 2-core machine can run a
  model several times slower with 2 threads than with 1. `pick_threads` times a small
  batch of the model with 1 thread and with all of them, interleaved, and keeps the
  faster (the default of every ``epd`` command: ``--threads auto``).
* GNU OpenMP's idle threads spin (busy-wait) for a while before sleeping, taking the CPU
  from the thread the team waits for. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at
  once. The runtime reads the variable when it is loaded, that is when torch is first
  imported, so `prefer_passive_wait` must run before ``import torch``: the package calls
  it first thing in ``epd_kernels/__init__.py`` (the ``epd`` command imports the package
  before anything else). A value the user set is kept; after torch is loaded it changes
  nothing and says so.

This module imports torch only inside `pick_threads`, so that importing it does not load
the OpenMP runtime.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Optional, Union

from .errors import UserError

__all__ = ["prefer_passive_wait", "pick_threads", "model_batch_runner"]

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_wait(environ=None) -> bool:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set or torch is already imported.

    Returns True if the policy in force for torch's OpenMP runtime is passive (set here
    or by the user), False otherwise (the user chose another policy, or torch was
    imported first, when the runtime had already read its environment).
    """
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return environ[WAIT_POLICY].strip().upper() == "PASSIVE"
    if "torch" in sys.modules:
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    return True


def parse_threads(text: Union[str, int, None]) -> Union[str, int]:
    """``--threads``: "auto" (also None) or an integer >= 1; `UserError` otherwise."""
    if text is None or str(text).strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--threads must be an integer >= 1 or 'auto', got {text!r}") from None
    if n < 1:
        raise UserError(f"--threads must be an integer >= 1 or 'auto', got {n}")
    return n


def pick_threads(requested: Union[str, int, None], run_batch: Optional[Callable[[], object]],
                 device: str = "cpu", repeats: int = 2) -> int:
    """Sets torch's CPU threads and returns their number.

    ``requested``: an integer (used as is) or "auto": 1 or all cores, whichever runs
    ``run_batch()`` (one representative call, e.g. the model on a batch) faster. Both
    counts are timed ``repeats`` times, interleaved so that a change of load affects both,
    and the best time of each is compared; each count runs the batch once untimed first
    (allocations, the team's start). Off the CPU, or on one core, nothing is timed.
    """
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
    cond = cond or {}
    return lambda: model(x, s, **cond)
