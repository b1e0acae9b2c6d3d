"""`distill`: the entry point. Sorts its keywords into settings and conditioning
(`settings.split_keywords`), sizes the run to the time budget (`budget`), trains
(`loop.train`, or the grid search for ``schedule="auto"``), then compares the result with
the baselines on held-out noise (`verdict`)."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

from ..models.conditioning import warn_missing_labels
from . import budget as _budget
from . import verdict
from .conditioning import per_row_keys
from .loop import default_device, dist_info, frozen, train
from .schedule_search import LEARNED_START
from .settings import AUTO, DistillSettings, split_keywords

__all__ = ["distill"]


def distill(denoiser: Callable, *, nfe: Optional[int] = None, shape=None,
            settings: Optional[DistillSettings] = None, **keywords):
    """Distils EPD-Solver / EPD-Plugin (or, with ``method="amed"``, AMED-Solver / AMED-Plugin)
    parameters for ``denoiser`` at latency ``nfe``; returns detached, validated
    `EPDParams` (`AMEDParams` for AMED).

    Every setting is a keyword named like a field of `DistillSettings` (or of
    `SearchSettings` for ``schedule="auto"``), or comes from ``settings=``; all other
    keywords are conditioning for the denoiser (``D(x, sigma, **cond)``); one that looks
    like a misspelt setting or that the denoiser cannot take is refused. The settings:

        nfe, shape     latency (``2 S - afs``: 3, 5, 7, ... with AFS), per-sample shape.
        num_points     K branches of EPD (default 2; 1 or unset for AMED).
        plugin         EPD-Plugin / AMED-Plugin on iPNDM (``max_order``, default 4).
        method         "epd" (default) or "amed"; amed_form "predictor" (default) or
                       "table"; features of the AMED predictor ("denoised",
                       "module:<name>" or a callable).
        schedule       None: the budget's choice (`_default_grids`: the grid search, or
                       the grid learned from two starts; polynomial rho 7 without a
                       budget); a kind, a dict of `get_sigmas` arguments, explicit sigmas,
                       or "auto": the grid search of `schedule_search` (its options are
                       `SearchSettings` fields: val_size, search_iterations, ...).
        afs            analytic first step (default on).
        teacher, M, insert  "ipndm" (default), "dpm2" (the paper's) or "heun" on the
                       student grid with M points per interval ("polynomial" / "logsnr").
        iterations, batch_size (per process), lr (0.05; 0.1 with "auto"), pool (P draws
                       whose teacher runs once, or None: fresh noise), seed.
        time_budget_s  seconds (default 60): M, pool, iterations and batch_size left at
                       "auto" are sized to the model's measured cost (`budget`); None:
                       the fixed defaults 15 / 4096 / 300 / 64. See ``meta["budget"]``.
        compare        score the result and every baseline at the NFE on held-out noise
                       (`verdict`): ``meta["comparison"]``, a UserWarning naming the
                       baseline if EPD lost, and for EPD the start returned if it is
                       better (default True).
        loss, match    distance (default mean squared) over the trajectory or the final
                       state ("final"); learn_grid: learn the interior sigmas too (EPD).
        init, delta_max, o_max  start params and the bounds of |delta|, |o|.
        device, dtype  default: the denoiser's device, float32.
        checkpoint, checkpoint_every, max_failures  resumable checkpoint and its write
                       interval; consecutive non-finite steps before RuntimeError.
        progress       tqdm bars for the teacher pool, search, training and comparison.

    Raises:
        ValueError: invalid settings (named), an NFE the grid cannot meet, or a checkpoint
            written with other settings. RuntimeError: ``max_failures`` non-finite steps
            in a row.
    """
    t0 = time.perf_counter()
    required = {k: v for k, v in (("nfe", nfe), ("shape", shape)) if v is not None}
    if settings is None and len(required) < 2:
        raise ValueError("distill() needs nfe=... and shape=... (or settings=DistillSettings)")
    s, cond = split_keywords(denoiser, keywords, base=settings, **required)
    warn_missing_labels(denoiser, cond, "distill")
    device = default_device(denoiser) if s.device is None else s.device
    s, record = _sized(denoiser, s, cond, device)
    if s.auto_schedule:
        from .schedule_search import search_and_distill

        params = search_and_distill(denoiser, s, cond)
    else:
        params = train(denoiser, s, cond)
    if record is not None:
        params.meta["budget"] = record
    if s.compare:
        draws = record["compare_draws"] if record else _budget.COMPARE_DRAWS
        with frozen(denoiser):
            params, _ = verdict.compare(denoiser, params, s, cond, draws, device)
    if record is not None:   # the estimate beside what it cost (timings vary with load)
        params.meta["budget"]["wall_s"] = time.perf_counter() - t0
    return params


def _sized(denoiser, s: DistillSettings, cond: dict, device):
    """``(settings, record)``: the `AUTO` settings chosen by the budget, or the fixed
    defaults with ``time_budget_s=None`` (record None then)."""
    per_row = per_row_keys(cond)
    if per_row and s.pool == AUTO:
        raise ValueError(f"conditioning {per_row} has one row per draw: set pool=P (one row "
                         f"per pool entry) or pool=None (one row per sample of the global "
                         f"batch) explicitly, since the budget would otherwise choose it")
    if per_row and s.pool is None and s.batch_size == AUTO:
        raise ValueError(f"conditioning {per_row} has one row per sample of the global batch: "
                         f"set batch_size explicitly")
    if not s.unresolved():
        return s, None
    if s.time_budget_s is None:
        return s.with_fixed_defaults(), None
    resumed = _resumed(s)
    if resumed is not None:   # the budget chose them when the checkpoint was started
        return resumed, {"time_budget_s": s.time_budget_s, "from_checkpoint": True,
                         "chosen": {k: getattr(resumed, k) for k in s.unresolved()},
                         "compare_draws": _budget.COMPARE_DRAWS}
    from .schedule_search import DEFAULT_CANDIDATES

    world, _ = dist_info()
    cost = _budget.measure_cost(denoiser, s, device, cond)
    candidates = len(s.search.candidates or DEFAULT_CANDIDATES)
    for schedule, trial in _default_grids(s):   # the first that fits the budget
        out, record = _budget.plan(trial, cost, len(trial.search.candidates))
        if out.iterations >= MIN_SEARCH_ITERATIONS and (out.pool or 0) >= MIN_SEARCH_POOL:
            record.update(world_size=world, schedule=schedule)
            return out, record
    if _may_search(s) and s.method == "epd" and s.learn_grid is None:
        s = s.replace(learn_grid=True)
    out, record = _budget.plan(s, cost, candidates if s.auto_schedule else 1)
    record["world_size"] = world
    if _may_search(s):
        record["schedule"] = ("polynomial rho 7, learned" if s.learn_grid else
                              "polynomial rho 7") + ": the grid search does not fit the budget"
    return out, record


#: The smallest run for which the default picks the grid search (``schedule`` unset):
#: final runs of at least this many iterations, teacher pools of at least this many draws.
MIN_SEARCH_ITERATIONS = 150
MIN_SEARCH_POOL = 512
#: The candidates of the smaller search tried when the full one does not fit: one grid
#: per kind of model where it was best (rho 7: digits, U-Net, Gaussian; rho 3.5 and
#: time-uniform: the mixtures; `schedule_search` docstring).
SMALL_SEARCH = ("poly7", "poly3.5", "time-uniform")
#: The grids the default learns from when no search fits.
LEARNED_STARTS = (LEARNED_START, "logsnr")


def _default_grids(s: DistillSettings):
    """``(description, settings)`` of the ways the default finds its grid, best first: the
    grid search over every candidate; without it the grid is learned (final-state loss:
    on the digits U-Net it took NFE 5 / 7 from 0.081 / 0.091 to 0.057 / 0.047) from two
    starts, the better on validation kept (where a learned grid ends depends on its start
    and draws: NFE 5 0.050-0.052 or 0.055-0.057); then the small search."""
    from .schedule_search import DEFAULT_CANDIDATES

    if not _may_search(s):
        return
    # Search options are refused without schedule="auto", so the candidates are the defaults.
    search = s.replace(schedule="auto", search=dataclasses.replace(
        s.search, candidates=tuple(DEFAULT_CANDIDATES)))
    yield f"auto: the grid search over {list(search.search.candidates)} fits the budget", search
    if s.method == "epd" and s.learn_grid is None:
        yield (f"grid learned from {list(LEARNED_STARTS)}, the better on validation kept: "
               f"the full search does not fit the budget"), s.replace(
                   schedule="auto", learn_grid=True, search=dataclasses.replace(
                       s.search, candidates=LEARNED_STARTS, search_iterations=None))
    yield (f"auto: the grid search over {list(SMALL_SEARCH)} fits the budget",
           search.replace(search=dataclasses.replace(s.search, candidates=SMALL_SEARCH)))


def _resumed(s: DistillSettings) -> Optional[DistillSettings]:
    """The settings left at "auto" as an existing checkpoint recorded them, so that a
    resumed call continues the same run whatever the budget would choose today (None
    without a checkpoint file)."""
    from .checkpoint import load_checkpoint

    saved = None if s.checkpoint is None else load_checkpoint(s.checkpoint)
    if saved is None:
        return None
    st, (world, _) = saved["settings"], dist_info()
    known = {"iterations": st.get("iterations"), "M": st.get("M"), "pool": st.get("pool", AUTO),
             "batch_size": st.get("global_batch_size", 0) // world or None}
    return s.replace(**{k: known[k] for k in s.unresolved() if known[k] is not None})


def _may_search(s: DistillSettings) -> bool:
    """The default grid is the budget's choice when the user left both the grid and the
    run's length to it (``schedule`` None, ``iterations`` "auto") and gave no start or
    checkpoint (which belong to one grid)."""
    return (s.schedule is None and s.iterations == AUTO and s.init is None
            and s.checkpoint is None and s.time_budget_s is not None)
