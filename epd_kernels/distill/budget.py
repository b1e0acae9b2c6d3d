"""Sizing a distillation to a wall-time budget (``distill(time_budget_s=...)``).

`measure_cost` times denoiser calls (forward at the teacher's chunk and the training batch,
forward plus backward), one EPD sample (the solver's own time per call) and one unrolled,
differentiated student at two batch sizes (an iteration is affine in the batch). `plan`
then fills the settings left at `AUTO`:

* the held-out comparison (`verdict`): 1024 draws, fewer (at least 64) past 10 % of the
  budget;
* training: batch 64 and 300 iterations at most, fewer iterations (at least 40) and a
  batch down to 16 when training would take over 55 % of what is left;
* the teacher pool: the rest; ``M`` = 15, 7 or 3, the largest that affords 1024 draws
  (at most 4096), else M = 3 and what the rest affords (at least one batch).

The teacher makes ``S (M + 1)`` calls per draw (iPNDM; twice that for DPM-Solver-2 or
Heun); with ``schedule="auto"`` there is one pool per candidate grid and about
``C / 3 + 3`` runs' worth of training for EPD with a learned grid (else ``C / 3 + 2``;
``C`` for a full-length search such as the two learned starts). The choice and the
estimate go to ``params.meta["budget"]``; on a loaded machine the estimate is noisy.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .teacher import CALLS_PER_STEP
from .settings import (AUTO, DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS, DEFAULT_M, DEFAULT_POOL,
                       DistillSettings)

__all__ = ["measure_cost", "plan", "REFERENCE_STEPS", "COMPARE_DRAWS"]

#: Share of ``time_budget_s`` the plan fills (the rest is margin for the estimate's error).
BUDGET_SHARE = 0.85
#: Steps of the comparison's reference (UniPC, no AFS).
REFERENCE_STEPS = 64
#: Held-out draws of the comparison (at most). On the mixtures a few draws near a boundary
#: between components can carry most of a solver's squared error (at NFE 9 on the 768-dim
#: one, 2-7 in 2048 draws, each as much as all the others together), and 256 draws often
#: hold none of them (a distillation 26x better than DEIS on 256 was 1.4x worse on 2048).
COMPARE_DRAWS = 1024
#: Baselines the comparison runs per held-out draw, for the estimate (`verdict.BASELINES`).
_BASELINE_COUNT = 7
_TEACHER_CHUNK = 256


def _cycle(cond: dict, n: int) -> dict:
    """``n`` rows of the conditioning: per-row tensors cycled, the rest as is."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            v = v[torch.arange(n, device=v.device) % v.shape[0]]
        out[k] = v
    return out


def _time_calls(fn, max_calls: int = 5, max_s: float = 0.5) -> float:
    """Seconds per call of ``fn``: the fastest of a few timed calls after one warm-up (the
    minimum, since other processes only ever add time); fewer calls when slow."""
    fn()
    best, start = float("inf"), time.perf_counter()
    for _ in range(max_calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > max_s:
            break
    return best


def measure_cost(denoiser, s: DistillSettings, device, cond: dict) -> dict:
    """What the plan needs, in seconds: ``call_chunk`` (one forward call on a teacher chunk
    of draws, no autograd), ``overhead`` (the solver's own time per sequential call,
    from one EPD sample of a training batch), ``iteration`` (the neutral student unrolled
    and differentiated on a training batch: an iteration without its stored teacher
    targets), and ``measure_s`` (time spent here)."""
    from ..params import EPDParams
    from ..solvers.registry import resolve_sigmas as _resolve_sigmas
    from ..sampling import sample
    from .latent import DELTA_MAX, O_MAX
    from .loop import frozen
    from .students import EPDStudent

    t0 = time.perf_counter()
    batch = DEFAULT_BATCH_SIZE if s.batch_size == AUTO else s.batch_size
    chunk = _TEACHER_CHUNK if s.pool in (AUTO, None) else min(_TEACHER_CHUNK, s.pool)

    def call(n, grad):
        x = torch.randn((n,) + s.shape, dtype=s.dtype, device=device)
        sigma = torch.ones(n, dtype=s.dtype, device=device)
        if not grad:
            with torch.no_grad():
                denoiser(x, sigma, **_cycle(cond, n))
            return
        x.requires_grad_(True)
        denoiser(x, sigma, **_cycle(cond, n)).sum().backward()

    S, afs = s.steps, int(s.afs)
    start = EPDParams.init(_resolve_sigmas(None, S), s.K, afs=s.afs)
    noise = torch.randn((batch,) + s.shape, dtype=s.dtype, device=device)

    def epd():
        with torch.no_grad():
            sample(denoiser, noise, solver="epd", params=start, **_cycle(cond, batch))

    student = EPDStudent(denoiser, start, DELTA_MAX, O_MAX, device)

    def iteration(rows):   # a training iteration without the teacher (targets are stored)
        traj = student.unroll(noise[:rows] * float(start.sigmas[0]), **_cycle(cond, rows))
        sum(t.pow(2).mean() for t in traj[1:]).backward()

    with frozen(denoiser):
        fwd_b = _time_calls(lambda: call(batch, False))
        call_chunk = _time_calls(lambda: call(chunk, False)) if chunk != batch else fwd_b
        epd_b = _time_calls(epd, max_calls=2)
        step = _time_calls(lambda: iteration(batch), max_calls=2)
        # An iteration is not proportional to its batch (fixed costs per call): a second
        # size gives the affine fit that the plan scales with.
        small = max(1, batch // 4)
        step_small = _time_calls(lambda: iteration(small), max_calls=2) if small < batch else step
    calls = 2 * S - afs
    overhead = max(0.0, epd_b - ((s.K + 1) * S - afs) * fwd_b) / calls
    return {"call_chunk": call_chunk, "chunk": chunk, "overhead": overhead, "batch": batch,
            "iteration": step, "small_batch": small, "iteration_small": step_small,
            "measure_s": time.perf_counter() - t0}


def plan(s: DistillSettings, cost: dict, candidates: int = 1) -> tuple:
    """``(settings, record)``: ``s`` with its `AUTO` settings chosen for the budget
    (module docstring) and what was chosen, estimated and measured."""
    # A margin for what the estimate leaves out (Python overhead between phases, load
    # changing after the measurement).
    budget = BUDGET_SHARE * s.time_budget_s - cost["measure_s"]
    S, afs = s.steps, int(s.afs)
    per_call = cost["call_chunk"] + cost["overhead"]               # per chunk of draws
    per_draw = lambda calls: calls * per_call / cost["chunk"]      # noqa: E731
    teacher_calls = lambda M: CALLS_PER_STEP[s.teacher] * S * (M + 1)  # noqa: E731
    compare_draw = per_draw(REFERENCE_STEPS + _BASELINE_COUNT * s.nfe + 2 * (2 * S - afs))
    auto = s.auto_schedule
    # Training runs' worth of iterations: full-length candidate runs, or short ones and
    # the final runs.
    full = s.search.search_iterations is None
    from .schedule_search import learns_grid   # (it imports this module)

    # The final runs: the fixed grid, and the grid learned from it and from the neutral start
    finals = 3 if learns_grid(s) else 2
    runs = (candidates if full else candidates / 3 + finals) if auto else 1
    draws = _draws_within(COMPARE_DRAWS, 64, 0.10 * budget, compare_draw) if s.compare else 0
    rest = budget - draws * compare_draw
    val = _validation_plan(s, candidates, per_draw, budget) if auto else {}
    rest -= val.get("val_size", 0) * val.get("draw_s", 0.0)
    batch = DEFAULT_BATCH_SIZE if s.batch_size == AUTO else s.batch_size
    iters = DEFAULT_ITERATIONS if s.iterations == AUTO else s.iterations
    per_iter = lambda b: runs * _iteration_s(cost, b)  # noqa: E731
    if s.batch_size == AUTO:
        while batch > 16 and iters * per_iter(batch) > 0.55 * rest:
            batch //= 2
    if s.iterations == AUTO:
        iters = int(min(DEFAULT_ITERATIONS, max(40, 0.55 * rest / per_iter(batch))))
    rest -= iters * per_iter(batch)
    pools = candidates if auto else 1
    M, pool = s.M, s.pool
    if pool == AUTO or M == AUTO:
        M, pool = _teacher_plan(s, rest / pools, lambda m: per_draw(teacher_calls(m)), batch)
    chosen = {"iterations": iters, "batch_size": batch, "pool": pool, "M": M}
    out = s.replace(**{k: v for k, v in chosen.items() if getattr(s, k) == AUTO})
    if auto and s.search.val_size is None:
        out = out.replace(search=dataclasses.replace(out.search, val_size=val["val_size"]))
        chosen["val_size"] = val["val_size"]
    teacher_s = 0.0 if out.pool is None else pools * out.pool * per_draw(teacher_calls(out.M))
    estimate = (cost["measure_s"] + draws * compare_draw + teacher_s
                + val.get("val_size", 0) * val.get("draw_s", 0.0)
                + out.iterations * per_iter(out.batch_size))
    record = {"time_budget_s": s.time_budget_s,
              "measured": {k: v for k, v in cost.items()},
              "chosen": {k: v for k, v in chosen.items()
                         if k == "val_size" or k in s.unresolved()},
              "compare_draws": draws, "estimated_s": estimate}
    return out, record


def _iteration_s(cost: dict, b: int) -> float:
    """Seconds of an iteration of batch ``b``: affine in the batch through the two measured
    sizes (proportional when only one was measured), never below the smaller's share."""
    big, small = cost["batch"], cost.get("small_batch", cost["batch"])
    if small >= big:
        return cost["iteration"] * b / big
    slope = max(0.0, (cost["iteration"] - cost["iteration_small"]) / (big - small))
    return max(cost["iteration_small"] + slope * (b - small), cost["iteration"] * b / big)


def _validation_plan(s: DistillSettings, candidates: int, per_draw, budget: float) -> dict:
    """The grid search's validation draws: 1024 (its default), fewer (at least 256) when
    their reference and scoring would take over 15 % of the budget."""
    from .schedule_search import DEFAULT_REFERENCE_STEPS, DEFAULT_VAL_SIZE

    steps = s.search.reference_steps or DEFAULT_REFERENCE_STEPS
    draw_s = per_draw(steps + (candidates + 2) * (2 * s.steps - int(s.afs)))
    size = s.search.val_size
    if size is None:
        size = _draws_within(DEFAULT_VAL_SIZE, 256, 0.15 * budget, draw_s)
    return {"val_size": size, "draw_s": draw_s}


def _draws_within(n: int, least: int, seconds: float, draw_s: float) -> int:
    """``n`` draws, or fewer (at least ``least``) when they would take over ``seconds``."""
    return n if n * draw_s <= seconds else max(least, int(seconds / draw_s))


def _teacher_plan(s: DistillSettings, seconds: float, per_draw, batch: int):
    """``(M, pool)`` for the teacher's share of the budget (module docstring)."""
    choices = (DEFAULT_M, 7, 3) if s.M == AUTO else (s.M,)
    for M in choices:
        affordable = int(seconds / per_draw(M)) if seconds > 0 else 0
        if s.pool != AUTO:       # pool given (or None: fresh noise): only M is chosen
            if s.pool is None or affordable >= s.pool or M == choices[-1]:
                return M, s.pool
            continue
        if affordable >= 1024 or M == choices[-1]:
            return M, max(batch, min(DEFAULT_POOL, affordable))
    raise AssertionError("unreachable")
