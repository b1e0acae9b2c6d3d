"""Choosing the time grid of a distilled EPD solver on held-out noise (``schedule="auto"``).

    params, report = distill_auto(denoiser, nfe=5, shape=(C, H, W))
    x0 = sample(denoiser, noise, solver=params.solver, params=params)  # grid inside params

Why a search and not one default grid. Plain 300-iteration distillations on each fixed
grid, RMSE to the ODE solution on held-out noise, divided by the best grid's, worst case
over the benchmark's models and NFEs (64-dim Gaussian and mixture at NFE 3, 5, 7, 9;
exact digits denoiser at 3, 5, 7, 9; digits U-Net at 5)::

                 poly rho 7   rho 5   rho 3.5   logsnr   time-uniform
    EPD             3.3        3.3      9.8       14        3.9
    EPD-Plugin      3.6        3.5      2.4       16        2.2

Every grid is the best somewhere (Gaussian: rho 5 / 3.5 / 7; mixture: time-uniform,
rho 3.5; exact digits: log-SNR, rho 7; U-Net: rho 5 / 7) and 2-16x off elsewhere, so no
fixed grid meets "does well everywhere". The grid is chosen per problem instead:

1. `choose_schedule`: one distillation per candidate grid (`distill`, the same settings
   for all; `DEFAULT_CANDIDATES`);
2. each result sampled from VALIDATION noise -- seeds ``VAL_SEED_BASE + i``, checked to be
   disjoint from every training-noise seed of the runs -- and scored by the RMSE of its
   final state to one shared reference of the same ODE from the same noise (UniPC, 128
   steps, no AFS: RMSE 1e-6-7e-5 to the exact solution on the Gaussian, mixture and
   exact-digits models, where DPM-Solver-2 with the same 128 evaluations is 1e-3-3e-2
   off);
3. the candidate with the lowest validation RMSE wins (the first one on a tie).

`distill_auto` (what ``schedule="auto"`` runs) makes the candidate runs short
(`DEFAULT_SEARCH_ITERATIONS` = 100) and then distils the winner for the full
``iterations`` (300) starting from its search parameters: a warm restart of Adam and of
the cosine learning rate. Measured on the Gaussian and the mixture, NFE 3-9, EPD and
EPD-Plugin (16 cases, RMSE on 512 held-out draws): search 100 + restart 300 beat
full-length (300) runs on every grid with the best kept in 12 of 16 cases, at about half
the work (800 vs 1500 iterations), e.g. Gaussian NFE 3: 0.0135 vs 0.046 (the full-length
search was scored against a DPM-Solver-2 reference), so a restart is worth more than
longer search runs. Its learning rate `AUTO_LR` = 0.1 (twice `distill`'s
0.05; every run is short) was better in 10 of those 16 cases and in all 4 of the exact
digits' EPD-Plugin cases (NFE 7: 0.113 vs 0.219). The whole procedure costs about 2.7
plain runs. The returned grid travels inside the parameters (``params.sigmas``); the
search's result is in ``params.meta["schedule_search"]``.

Learning the grid (EPD, the default of `distill_auto` and ``schedule="auto"``). After the
fixed-grid final run, a second run starts from the better of it and the search winner and
also learns the interior sigmas (``distill(learn_grid=True)``: the final-state loss, since
the teacher's states at moving student sigmas are not fixed targets), with the learning
rate scaled by `LEARN_GRID_LR_SCALE` = 0.3; of the search winner and the two runs the
lowest validation RMSE is kept (`_final_runs`). Why: an oracle that
fits EPD's parameters to the held-out draws' final error directly (the digits U-Net, K = 2,
one thread) reached 0.0464 at NFE 5 and 0.0268 at NFE 9 on the fixed grids chosen by the
search, but 0.0399 and 0.0143 when the grid was fitted too: at NFE 9 the grid, not the
distillation, was what kept EPD (0.031) behind iPNDM (0.0277). Measured with this
procedure (`distill_auto`, held-out RMSE): U-Net NFE 5 0.0479 -> 0.0411; exact-gradient
mixture NFE 3 / 5 / 7 / 9: 0.128 / 0.119 / 0.093 / 0.083 -> 0.111 / 0.110 / 0.094 / 0.085.
On the mixture the final-state loss is dominated by the few draws that end in another
component, so a learning rate of 0.1 moved grids far (NFE 7: 0.125) and 0.03 did not.

Works for every method `distill` has (``method="amed"`` too): the candidates are sampled
with ``params.solver``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..solvers.registry import resolve_sigmas as _resolve_sigmas, nfe_to_steps, steps_to_nfe
from ..noise import make_noise
from ..sampling import sample
from ..solvers.common import check_int
from .batches import shared_pools
from .budget import _cycle
from .loop import default_device, dist_info, train
from .noise import row_seed
from .settings import AUTO, DistillSettings, SearchSettings, split_keywords

__all__ = ["choose_schedule", "distill_auto", "DEFAULT_CANDIDATES", "VAL_SEED_BASE",
           "DEFAULT_VAL_SIZE", "DEFAULT_REFERENCE_STEPS", "DEFAULT_SEARCH_ITERATIONS", "AUTO_LR",
           "FAST_SETTINGS", "SEARCH_OPTIONS", "LEARN_GRID_LR_SCALE", "validation_seeds",
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
#: 1024 draws: with 256 the mixture's NFE-9 search kept the learned grid (validation
#: 0.5% better) that was 29% worse on 1024 held-out draws (0.094 vs 0.073 for the fixed
#: grid that 1024 validation draws keep); its error is a few draws ending in another
#: component, which 256 draws sample too thinly. NFE 3, 5 and 7 chose the same either way.
DEFAULT_VAL_SIZE = 1024
#: Steps of the validation reference (UniPC, no AFS, polynomial rho = 7 grid).
DEFAULT_REFERENCE_STEPS = 128
#: Iterations of each candidate run in `distill_auto` (then the winner gets a full run).
DEFAULT_SEARCH_ITERATIONS = 100
#: Adam learning rate of `distill_auto` (search and final run) unless ``lr`` is given:
#: twice `distill`'s, because each run is short and restarts (module docstring).
AUTO_LR = 0.1
#: Learning-rate factor of the final run that learns the grid (module docstring).
LEARN_GRID_LR_SCALE = 0.3

#: Settings for a denoiser whose evaluation is expensive (``distill_auto(...,
#: **FAST_SETTINGS)``). Measured on the shipped digits U-Net at NFE 5, one CPU thread:
#: 42-53 s wall with the grid search (the defaults: 300-570 s) for the same test RMSE
#: (0.0721 vs 0.0726 on 256 held-out draws). Its pieces, each measured there: the grid
#: ranking is settled after 20 iterations; the teacher with M = 7 is 10x more accurate
#: than the student; neither a pool of 1024 nor a batch of 32 (the defaults then) changed
#: the result, and the final run levels off by 150 iterations. On the cheap 64-dim Gaussian the defaults are
#: still 1.5-3x more accurate, which is why these are not the defaults.
#: With the learned grid (`distill_auto`'s second final run) the two final runs take 75
#: iterations each, which keeps the whole NFE-5 procedure near 50 s there (150 + 150: 91 s
#: for test RMSE 0.0411; 75 + 75: 51 s, 0.0411; 100 + 100 with a 15-iteration search:
#: 58 s, 0.0404); a plain `distill` with these settings keeps 150 iterations. 256
#: validation draws (the default before it became 1024) keep the U-Net's validation
#: reference (64 UniPC steps per draw) and scoring cheap.
FAST_SETTINGS = {"search_iterations": 20, "iterations": 150, "batch_size": 16, "pool": 256,
                 "M": 7, "reference_steps": 64, "final_iterations": 75, "grid_iterations": 75,
                 "val_size": 256}

_REFUSED = {
    "schedule": "the candidates are the schedules",
    "init": "an init belongs to one grid; it cannot start every candidate",
    "checkpoint": "a checkpoint file belongs to one run; distil the chosen grid with "
                  "checkpoint=... afterwards",
}
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


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _slice_cond(cond: dict, a: int, b: int, n: int) -> dict:
    return {k: (v[a:b] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n
                else v) for k, v in cond.items()}


@torch.no_grad()
def _run(denoiser, noise, cond, chunk, **kw) -> torch.Tensor:
    n = noise.shape[0]
    return torch.cat([sample(denoiser, noise[a:b], **kw, **_slice_cond(cond, a, b, n))
                      for a, b in _chunks(n, chunk)])


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    v = (x.to(torch.float64) - ref.to(torch.float64)).pow(2).mean().sqrt().item()
    return v if math.isfinite(v) else math.inf


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
        return _rmse(x, self.ref)


def _search_iterations(s: DistillSettings, default_full: bool) -> int:
    n = s.search.search_iterations
    if n == AUTO:
        n = None if default_full else min(DEFAULT_SEARCH_ITERATIONS, max(1, s.iterations // 3))
    return check_int("search_iterations", s.iterations if n is None else n, 1)


def _choose(denoiser, s: DistillSettings, cond: dict, search_iterations: int):
    """`choose_schedule` on settings: ``(schedule, report)``."""
    t_start = time.perf_counter()
    method = "amed" if s.method == "amed" else "epd"
    candidates = _check_candidates(DEFAULT_CANDIDATES if s.search.candidates is None
                                   else s.search.candidates, nfe_to_steps(method, s.nfe, s.afs))
    val = _Validation(denoiser, s, cond, search_iterations)
    results, params_of = {}, {}
    bar = _bar(s.progress, len(candidates), "grid search")
    run = dict(iterations=search_iterations, progress=False, checkpoint=None, learn_grid=None,
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
        raise RuntimeError("choose_schedule: every candidate distillation failed: " + "; ".join(
            f"{n}: {r['error']}" for n, r in results.items()))
    chosen = min(params_of, key=lambda n: results[n]["val_rmse"])
    report = {"chosen": chosen, "score": val.score, "params": params_of[chosen],
              "candidates": results, "search_iterations": search_iterations,
              "validation": val.info, "wall_s": time.perf_counter() - t_start}
    return candidates[chosen], report


def _entry_settings(denoiser, where: str, nfe, shape, plugin, kwargs: dict, refused=()):
    """Settings and conditioning of a keyword call of `choose_schedule` / `distill_auto`
    (the `AUTO` settings take the fixed defaults: no budget here)."""
    for key in refused:
        if kwargs.get(key) is not None:
            raise ValueError(f"{where} does not take {key}=...: {_REFUSED[key]}")
        kwargs.pop(key, None)
    kwargs.setdefault("lr", AUTO_LR)
    kwargs.setdefault("progress", False)
    s, cond = split_keywords(denoiser, dict(kwargs, schedule="auto", compare=False),
                             nfe=nfe, shape=shape, plugin=plugin)
    return s.with_fixed_defaults(), cond


def choose_schedule(denoiser: Callable, *, nfe: int, shape, plugin: bool = False,
                    search_iterations: Optional[int] = None, **kwargs) -> Tuple[object, dict]:
    """Distils EPD (or EPD-Plugin) on every candidate grid; picks the grid whose result has
    the lowest RMSE on held-out validation noise (module docstring).

    Args:
        denoiser, nfe, shape, plugin: as for `distill`.
        search_iterations: iterations of each candidate run (default: ``iterations``).
        **kwargs: the grid search's options (`SearchSettings`: candidates -- ``{name:
            schedule}`` or a list of names of `DEFAULT_CANDIDATES` / schedule kinds;
            val_size, val_seed (validation seeds `validation_seeds`); val_cond (their
            conditioning, needed when ``**cond`` has one row per training sample);
            reference_steps, reference_solver (UniPC, 128 steps, no AFS, polynomial rho 7);
            chunk), `distill`'s settings (the same for every candidate; ``schedule``,
            ``init`` and ``checkpoint`` are refused; lr defaults to `AUTO_LR`) and
            conditioning.

    Returns:
        ``(schedule, report)``: the winning candidate's schedule (as given) and a dict with
        ``chosen`` (its name), ``params`` (its distilled parameters), ``candidates``
        (per name: schedule, sigmas, val_rmse, final_loss, wall_s and params, or error),
        ``validation`` (seeds, size, reference), ``search_iterations``, ``wall_s`` and
        ``score`` (a function: any params' validation RMSE against the same reference).

    Raises:
        ValueError: bad arguments (named). RuntimeError: every candidate run failed.
    """
    s, cond = _entry_settings(denoiser, "choose_schedule", nfe, shape, plugin, dict(kwargs),
                              refused=("schedule", "init", "checkpoint"))
    n = s.iterations if search_iterations is None else search_iterations
    return _choose(denoiser, s, cond, check_int("search_iterations", n, 1))


def distill_auto(denoiser: Callable, *, nfe: int, shape, plugin: bool = False,
                 **kwargs) -> Tuple[object, dict]:
    """`choose_schedule`, then the distilled parameters on the winning grid:
    ``(params, report)``.

    Each candidate is distilled for ``search_iterations`` (default `DEFAULT_SEARCH_ITERATIONS`,
    at most a third of ``iterations``); the winner is then distilled again for
    ``final_iterations`` (default: ``iterations``) starting from its search parameters (a
    warm restart of Adam and of the cosine learning rate). With ``search_iterations=None``
    the candidate runs are full length and the winner's run is the result. ``lr`` defaults
    to `AUTO_LR`; ``checkpoint`` / ``checkpoint_every`` apply to the final run (a resumed
    call repeats the deterministic search, then resumes).

    ``learn_grid`` (default: True for EPD when there is a final run) and ``match`` apply
    to the final run only; a second final run then learns the interior sigmas
    (final-state loss, ``lr * LEARN_GRID_LR_SCALE``, ``grid_iterations``, default as many as
    the final run), and the search winner or run with the lowest validation RMSE is
    returned (`_final_runs`). ``report["final"]`` records every score and what was kept.
    """
    s, cond = _entry_settings(denoiser, "distill_auto", nfe, shape, plugin, dict(kwargs),
                              refused=("schedule", "init"))
    return _auto(denoiser, s, cond)


def search_and_distill(denoiser, s: DistillSettings, cond: dict):
    """What ``distill(schedule="auto")`` runs (settings resolved by `distill`)."""
    if s.lr is None:
        s = s.replace(lr=AUTO_LR)
    params, _ = _auto(denoiser, s, cond)
    return params


def _auto(denoiser, s: DistillSettings, cond: dict):
    t0 = time.perf_counter()
    o = s.search
    final_it = None if o.final_iterations is None else check_int(
        "final_iterations", o.final_iterations, 1)
    grid_it = None if o.grid_iterations is None else check_int(
        "grid_iterations", o.grid_iterations, 1)
    full = o.search_iterations is None
    for name in ("checkpoint", "learn_grid", "match"):
        if getattr(s, name) not in (None, False) and full:
            raise ValueError(f"{name}=... needs a final run: pass search_iterations (the "
                             f"full-length search has none)")
    with shared_pools():   # the final run reuses the winning grid's teacher pool
        schedule, report = _choose(denoiser, s, cond, _search_iterations(s, False))
        params = report["params"]
        score = report.pop("score")
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


def _final_runs(denoiser, score, start, s: DistillSettings, cond: dict,
                grid_iterations: Optional[int], progress: bool):
    """The final run(s) from the search winner ``start`` = (params, its validation RMSE,
    scored by the search): (params, record).

    The winner is distilled in full on its grid; with ``learn_grid`` (default for EPD) the
    better of the two on validation starts a second run that also learns the grid
    (final-state loss, lr scaled by `LEARN_GRID_LR_SCALE`). Of the search winner and these
    runs the lowest validation RMSE is kept: a longer run can be worse than the short one
    on validation (the 64-dim mixture at NFE 9: 0.072 after the search, 0.136 after the
    full run, whose trajectory loss does not see the few draws that end in another
    component)."""
    learn = s.method == "epd" if s.learn_grid is None else bool(s.learn_grid)
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
    kept = min(scores, key=scores.get)
    record = {"learn_grid": learn, "kept": kept,
              **{f"{name}_val_rmse": v for name, v in scores.items()}}
    return runs[kept], record


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="grid", leave=False, dynamic_ncols=True)
