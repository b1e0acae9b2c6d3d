"""Choosing the time grid of a distilled solver on held-out noise: ``distill(...,
schedule="auto")``, for every method (candidates sampled with ``params.solver``). The grid
travels in ``params.sigmas``, the search's record in ``params.meta["schedule_search"]``.

Why: plain 300-iteration distillations on each fixed grid of `DEFAULT_CANDIDATES` were, at
worst over the benchmark's models and NFEs, 2.2-16x off the best grid's held-out RMSE (EPD:
rho 7 3.3x, rho 3.5 9.8x, log-SNR 14x), and every grid was the best somewhere. So:

1. `_choose`: one short run per candidate (`DEFAULT_SEARCH_ITERATIONS`, same settings),
   scored by its final state's RMSE on VALIDATION noise (`validation_seeds`, disjoint from
   every training seed) to one shared reference (UniPC, 128 steps, no AFS: 1e-6-7e-5 from
   the exact solution, DPM-Solver-2 with as many calls 1e-3-3e-2); lowest wins, first on a tie.
2. `_final_runs`: the winner is distilled for ``iterations`` from its search parameters
   (a warm restart: 100 + 300 iterations beat full-length search runs in 12 of 16 cases at
   half the work; the whole costs about 2.7 plain runs); for EPD a second run from the
   better of the two also learns the interior sigmas (digits U-Net, NFE 5: 0.0479 to
   0.0411; at NFE 9 an oracle fit showed the grid, not the distillation, kept EPD behind
   iPNDM), and a third learns them from neutral params on the rho-7 grid (`LEARNED_START`,
   where the budget's learned-grid default starts: learned grids end in different basins
   by start). The lowest validation RMSE among the winner and these runs is kept.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, Mapping, Optional

import torch

from ..solvers.registry import resolve_sigmas as _resolve_sigmas, nfe_to_steps, steps_to_nfe
from ..noise import make_noise
from ..sampling import sample
from ..solvers.common import check_int
from .batches import shared_pools
from .budget import _cycle
from .conditioning import slice_rows
from .loop import default_device, dist_info, train
from .noise import row_seed
from .settings import AUTO, DistillSettings, SearchSettings
from .verdict import progress_bar, rmse

__all__ = ["DEFAULT_CANDIDATES", "VAL_SEED_BASE", "DEFAULT_VAL_SIZE", "DEFAULT_REFERENCE_STEPS",
           "DEFAULT_SEARCH_ITERATIONS", "AUTO_LR", "FAST_SETTINGS", "SEARCH_OPTIONS",
           "LEARN_GRID_LR_SCALE", "LEARNED_START", "learns_grid", "validation_seeds",
           "training_seeds"]

#: Grids tried by default, in order (the first wins ties). Each is the best for some model
#: and NFE of the benchmark and 2.2-16x off the best for another (module docstring).
DEFAULT_CANDIDATES: Dict[str, object] = {
    "poly7": {"kind": "polynomial", "rho": 7.0},
    "poly5": {"kind": "polynomial", "rho": 5.0},
    "poly3.5": {"kind": "polynomial", "rho": 3.5},
    "logsnr": "logsnr",
    "time-uniform": "time-uniform",
}
#: Validation noise uses the per-sample seeds ``VAL_SEED_BASE + i`` (`make_noise`): far
#: from the small seeds users evaluate with, from D-ODE's fitting seeds (2^40 + ...) and,
#: checked at run time, from the hashed training seeds (`training_seeds`).
VAL_SEED_BASE = 3 * 2 ** 40
#: 1024 draws: with 256 the mixture's NFE-9 search kept a learned grid 29% worse on 1024
#: held-out draws (its error is a few draws ending in another component).
DEFAULT_VAL_SIZE = 1024
#: Steps of the validation reference (UniPC, no AFS, polynomial rho = 7 grid).
DEFAULT_REFERENCE_STEPS = 128
#: Iterations of each candidate run (at most a third of ``iterations``).
DEFAULT_SEARCH_ITERATIONS = 100
#: Adam learning rate of the search and final runs unless ``lr`` is given: twice
#: `distill`'s, as every run is short; better in 10 of 16 cases (exact digits, EPD-Plugin,
#: NFE 7: 0.113 vs 0.219).
AUTO_LR = 0.1
#: The start of the final run that learns the grid from neutral params (the grid that
#: `distill`'s learned-grid default starts from when no search fits).
LEARNED_START = "poly7"
#: Learning-rate factor of the final run that learns the grid: its final-state loss is
#: dominated by a few draws, and on the mixture lr 0.1 moved grids far (NFE 7: 0.125).
LEARN_GRID_LR_SCALE = 0.3

#: Settings for a denoiser whose evaluation is expensive (``--fast`` of `epd distill`).
#: On the digits U-Net at NFE 5, one thread: about 50 s instead of 300-570 s for the same
#: held-out RMSE (0.0721 vs 0.0726; the grid ranking is settled after 20 iterations, the
#: M = 7 teacher is 10x more accurate than the student). On the cheap 64-dim Gaussian the
#: defaults are 1.5-3x more accurate, hence not the defaults.
FAST_SETTINGS = {"search_iterations": 20, "iterations": 150, "batch_size": 16, "pool": 256,
                 "M": 7, "reference_steps": 64, "final_iterations": 75, "grid_iterations": 75,
                 "val_size": 256}

#: The grid search's options (`settings.SearchSettings`), as keywords of `distill`.
SEARCH_OPTIONS = tuple(f.name for f in dataclasses.fields(SearchSettings))

def validation_seeds(val_size: int, val_seed: int = 0) -> range:
    """The per-sample seeds of the validation noise."""
    start = VAL_SEED_BASE + int(val_seed) * 2 ** 20
    return range(start, start + int(val_size))


def training_seeds(seed: int, iterations: int, global_batch: int, pool: Optional[int]) -> set:
    """Every per-row seed the training noise of `distill` draws from (`distill.noise`):
    the pool's rows (iteration -1) or, without a pool, every row of every iteration."""
    if pool is not None:
        return {row_seed(seed, -1, j) for j in range(pool)}
    return {row_seed(seed, i, j) for i in range(iterations) for j in range(global_batch)}


def _check_candidates(candidates, steps) -> Dict[str, object]:
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    elif isinstance(candidates, (list, tuple)):
        items = []
        for c in candidates:
            if isinstance(c, str) and c in DEFAULT_CANDIDATES:
                items.append((c, DEFAULT_CANDIDATES[c]))
            elif isinstance(c, str):
                items.append((c, c))
            else:
                raise ValueError("candidates given as a list must hold names (a key of "
                                 f"DEFAULT_CANDIDATES or a schedule kind), got {c!r}; use a "
                                 "dict {name: schedule} for dicts or explicit sigmas")
    else:
        raise ValueError(f"candidates must be a dict {{name: schedule}} or a list of names, "
                         f"got {type(candidates).__name__}")
    if not items:
        raise ValueError("candidates must not be empty")
    out = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"candidate names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"candidates: duplicate name {name!r}")
        try:
            _resolve_sigmas(spec, steps)
        except ValueError as e:
            raise ValueError(f"candidates[{name!r}] = {spec!r} is not a valid schedule for "
                             f"{steps} steps: {e}") from None
        out[name] = spec
    return out


def _split_cond(cond: dict, val_cond: Optional[dict], rows: tuple, val_size: int) -> dict:
    """Conditioning for the validation draws: ``val_cond`` if given, else ``cond`` with its
    per-row tensors (leading dimension in ``rows``: the global batch, or the pool) cycled
    to ``val_size`` rows, validation draw i taking row i mod rows, as the held-out
    comparison (`verdict`) does; so labels such as ``arange(P) % C`` keep their mix."""
    if val_cond is not None:
        if not isinstance(val_cond, Mapping):
            raise ValueError(f"val_cond must be a dict of conditioning, got "
                             f"{type(val_cond).__name__}")
        return dict(val_cond)
    per_row = {k for k, v in cond.items() if isinstance(v, torch.Tensor) and v.dim() >= 1
               and v.shape[0] in rows}
    cycled = _cycle({k: cond[k] for k in per_row}, val_size)
    return {k: cycled.get(k, v) for k, v in cond.items()}


@torch.no_grad()
def _run(denoiser, noise, cond, chunk, **kw) -> torch.Tensor:
    n = noise.shape[0]
    rows = [range(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    return torch.cat([sample(denoiser, noise[r.start:r.stop], **kw, **slice_rows(cond, n, r))
                      for r in rows])


class _Validation:
    """Held-out validation noise, its conditioning and the shared reference; `score`
    gives any params' validation RMSE."""

    def __init__(self, denoiser, s: DistillSettings, cond: dict, search_iterations: int):
        o = s.search
        size = check_int("val_size", DEFAULT_VAL_SIZE if o.val_size is None else o.val_size, 1)
        seed = check_int("val_seed", o.val_seed, 0)
        steps = check_int("reference_steps", DEFAULT_REFERENCE_STEPS
                          if o.reference_steps is None else o.reference_steps, 1)
        self.chunk = check_int("chunk", o.chunk, 1)
        world, _ = dist_info()
        seeds = validation_seeds(size, seed)
        clash = training_seeds(s.seed, search_iterations, world * s.batch_size, s.pool) & set(seeds)
        if clash:  # a 2^-40-scale event for hashed seeds; refuse rather than select on it
            raise ValueError(f"validation seeds {sorted(clash)[:3]} are also training seeds; "
                             f"pass another val_seed")
        self.cond = _split_cond(cond, o.val_cond, (world * s.batch_size, s.pool), size)
        device = default_device(denoiser) if s.device is None else s.device
        self.denoiser = denoiser
        self.noise = make_noise(seeds, s.shape, device=device, dtype=s.dtype)
        try:
            ref_nfe = steps_to_nfe(o.reference_solver, steps, afs=False)
        except (KeyError, ValueError) as e:
            raise ValueError(f"reference_solver {o.reference_solver!r}: {e}") from None
        t0 = time.perf_counter()
        self.ref = _run(denoiser, self.noise, self.cond, self.chunk, solver=o.reference_solver,
                        afs=False, nfe=ref_nfe, schedule={"kind": "polynomial", "rho": 7.0})
        self.info = {"size": size, "seeds": [seeds.start, seeds.stop - 1],
                     "reference": f"{o.reference_solver}, no AFS, {steps} steps, "
                                  f"polynomial rho 7",
                     "reference_wall_s": time.perf_counter() - t0}

    def score(self, params) -> float:
        """RMSE of ``params``' samples of the validation noise to the shared reference."""
        x = _run(self.denoiser, self.noise, self.cond, self.chunk, solver=params.solver,
                 nfe=None, params=params)
        return rmse(x, self.ref)


def _search_iterations(s: DistillSettings) -> int:
    n = s.search.search_iterations
    if n == AUTO:
        n = min(DEFAULT_SEARCH_ITERATIONS, max(1, s.iterations // 3))
    return check_int("search_iterations", s.iterations if n is None else n, 1)


def _choose(denoiser, s: DistillSettings, cond: dict, search_iterations: int):
    """One run per candidate grid, scored on validation: ``(schedule, report)``; the
    report keeps every candidate's params and scores and ``score`` (params -> validation
    RMSE)."""
    t_start = time.perf_counter()
    method = "amed" if s.method == "amed" else "epd"
    candidates = _check_candidates(DEFAULT_CANDIDATES if s.search.candidates is None
                                   else s.search.candidates, nfe_to_steps(method, s.nfe, s.afs))
    val = _Validation(denoiser, s, cond, search_iterations)
    results, params_of = {}, {}
    bar = progress_bar(s.progress, len(candidates), "grid search", "grid")
    # Full-length runs (no final run) may learn their grid: the search is then over starts.
    learn = s.learn_grid if s.search.search_iterations is None else None
    run = dict(iterations=search_iterations, progress=False, checkpoint=None, learn_grid=learn,
               match=None, search=SearchSettings())
    for name, spec in candidates.items():
        t0 = time.perf_counter()
        try:
            p = train(denoiser, s.replace(schedule=spec, **run), cond)
        except RuntimeError as e:  # e.g. persistent non-finite losses on this grid
            results[name] = {"schedule": spec, "val_rmse": math.inf, "error": str(e),
                             "wall_s": time.perf_counter() - t0}
            continue
        finally:
            if bar is not None:
                bar.update(1)
        results[name] = {"schedule": spec, "sigmas": p.sigmas.tolist(),
                         "val_rmse": val.score(p), "final_loss": p.meta.get("final_loss"),
                         "wall_s": time.perf_counter() - t0, "params": p}
        params_of[name] = p
    if bar is not None:
        bar.close()
    if not params_of:
        raise RuntimeError("schedule search: every candidate distillation failed: " + "; ".join(
            f"{n}: {r['error']}" for n, r in results.items()))
    chosen = min(params_of, key=lambda n: results[n]["val_rmse"])
    report = {"chosen": chosen, "score": val.score, "params": params_of[chosen],
              "candidates": results, "search_iterations": search_iterations,
              "validation": val.info, "wall_s": time.perf_counter() - t_start}
    return candidates[chosen], report


def search_and_distill(denoiser, s: DistillSettings, cond: dict):
    """What ``distill(schedule="auto")`` runs (settings resolved by `distill`): the
    search, then the final runs unless ``search_iterations`` is None (full-length search
    runs, the winner is the result)."""
    if s.lr is None:
        s = s.replace(lr=AUTO_LR)
    params, _ = _auto(denoiser, s, cond)
    return params


def _auto(denoiser, s: DistillSettings, cond: dict):
    """The search and the final runs: ``(params, report)`` (`_choose`'s report, with
    ``final``: the final runs' scores and which result was kept)."""
    t0 = time.perf_counter()
    o = s.search
    final_it = None if o.final_iterations is None else check_int(
        "final_iterations", o.final_iterations, 1)
    grid_it = None if o.grid_iterations is None else check_int(
        "grid_iterations", o.grid_iterations, 1)
    full = o.search_iterations is None
    for name in ("checkpoint", "match"):
        if getattr(s, name) not in (None, False) and full:
            raise ValueError(f"{name}=... needs a final run: pass search_iterations (the "
                             f"full-length search has none)")
    with shared_pools():   # the final run reuses the winning grid's teacher pool
        schedule, report = _choose(denoiser, s, cond, _search_iterations(s))
        params = report["params"]
        score = report["score"]
        report["continued"] = not full
        if not full:
            final = s.replace(schedule=schedule, iterations=final_it or s.iterations,
                              progress=False, search=SearchSettings())
            start_score = report["candidates"][report["chosen"]]["val_rmse"]
            params, report["final"] = _final_runs(denoiser, score, (params, start_score),
                                                  final, cond, grid_it, s.progress)
    params.meta["schedule_search"] = {
        "chosen": report["chosen"], "final": report.get("final"),
        "val_rmse": {n: (r["val_rmse"] if math.isfinite(r["val_rmse"]) else None)
                     for n, r in report["candidates"].items()},
        "search_iterations": report["search_iterations"], "validation": report["validation"],
    }
    report["params"] = params
    report["wall_s"] = time.perf_counter() - t0
    return params, report


def learns_grid(s: DistillSettings) -> bool:
    """Whether the final runs learn the grid (from the winner and from `LEARNED_START`):
    by default for EPD, as ``learn_grid`` says otherwise."""
    return s.method == "epd" if s.learn_grid is None else bool(s.learn_grid)


def _final_runs(denoiser, score, start, s: DistillSettings, cond: dict,
                grid_iterations: Optional[int], progress: bool):
    """The final run(s) from the search winner ``start`` = (params, its validation RMSE):
    ``(params, record)`` (module docstring). The search winner is a candidate too: a longer
    run can be worse on validation (the 64-dim mixture at NFE 9: 0.072 after the search,
    0.136 after the full run, whose trajectory loss misses the few draws that end in
    another component)."""
    learn = learns_grid(s)
    start, start_score = start
    fixed = train(denoiser, s.replace(init=start, learn_grid=False,
                                      match=None if learn else s.match, progress=progress), cond)
    runs = {"search": start, "fixed": fixed}
    scores = {"search": start_score, "fixed": score(fixed)}
    if learn:
        base = runs[min(scores, key=scores.get)]
        its = s.iterations if grid_iterations is None else grid_iterations
        grid = s.replace(schedule=base.sigmas, init=base, learn_grid=True, iterations=its,
                         lr=s.lr * LEARN_GRID_LR_SCALE, progress=progress,
                         checkpoint=None if s.checkpoint is None else f"{s.checkpoint}.learn_grid")
        runs["learned"] = train(denoiser, grid, cond)
        scores["learned"] = score(runs["learned"])
        # Learned grids end in different basins by start: the winner's can be worse than
        # the grid learned from the neutral rho-7 start that small budgets use (U-Net,
        # NFE 5: poly5's ended at 0.065 on test draws, rho 7's at 0.058), so a larger budget
        # would lose what a smaller one finds. That start's run is a candidate too.
        neutral = s.replace(schedule=DEFAULT_CANDIDATES[LEARNED_START], init=None,
                            learn_grid=True, iterations=its, progress=progress, checkpoint=None
                            if s.checkpoint is None else f"{s.checkpoint}.learned_start")
        runs["learned_start"] = train(denoiser, neutral, cond)
        scores["learned_start"] = score(runs["learned_start"])
    kept = min(scores, key=scores.get)
    record = {"learn_grid": learn, "kept": kept,
              **{f"{name}_val_rmse": v for name, v in scores.items()}}
    return runs[kept], record
