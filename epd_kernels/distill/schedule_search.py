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
fixed-grid final run, a second run starts from its result and also learns the interior
sigmas (``distill(learn_grid=True)``: the final-state loss, since the teacher's states at
moving student sigmas are not fixed targets), with the learning rate scaled by
`LEARN_GRID_LR_SCALE` = 0.3; of the two, the lower validation RMSE is kept, so the
returned result is never worse on validation than the fixed-grid one. Why: an oracle that
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

import inspect
import math
import numbers
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..sampling import _resolve_sigmas, make_noise, nfe_to_steps, sample, steps_to_nfe
from ..solvers.common import check_int
from .batches import shared_pools
from .loop import DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS, DEFAULT_POOL, distill
from .noise import row_seed

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
    """Conditioning for the validation draws: ``val_cond`` if given, else ``cond`` when it
    has no per-row tensors (leading dimension in ``rows``: the global batch, or the pool;
    those belong to the training draws, not to validation)."""
    if val_cond is not None:
        if not isinstance(val_cond, Mapping):
            raise ValueError(f"val_cond must be a dict of conditioning, got "
                             f"{type(val_cond).__name__}")
        return dict(val_cond)
    per_row = [k for k, v in cond.items() if isinstance(v, torch.Tensor) and v.dim() >= 1
               and v.shape[0] in rows]
    if per_row:
        raise ValueError(f"conditioning {per_row} has one row per training sample; pass "
                         f"val_cond={{...}} with {val_size} rows for the validation draws")
    return dict(cond)


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


def choose_schedule(denoiser: Callable, *, nfe: int, shape, plugin: bool = False,
                    candidates=None, search_iterations: Optional[int] = None,
                    val_size: int = DEFAULT_VAL_SIZE, val_seed: int = 0,
                    val_cond: Optional[dict] = None,
                    reference_steps: int = DEFAULT_REFERENCE_STEPS,
                    reference_solver: str = "unipc", chunk: int = 256,
                    **distill_kwargs) -> Tuple[object, dict]:
    """Distils EPD (or EPD-Plugin) on every candidate grid; picks the grid whose result has
    the lowest RMSE on held-out validation noise (module docstring).

    Args:
        denoiser, nfe, shape, plugin: as for `distill`.
        candidates: ``{name: schedule}`` (a schedule as `distill` takes it: None, a kind
            name, a dict of `get_sigmas` arguments or explicit sigmas), or a list of names
            (keys of `DEFAULT_CANDIDATES` or schedule kinds); default `DEFAULT_CANDIDATES`.
        search_iterations: iterations of each candidate run (default: ``iterations`` of
            the distillation, i.e. full runs whose winner is final).
        val_size, val_seed: validation draws, seeds `validation_seeds(val_size, val_seed)`.
        val_cond: conditioning for the validation draws (needed when ``**cond`` has one row
            per training sample; otherwise ``**cond`` is used as is).
        reference_steps, reference_solver: the validation reference: ``reference_solver``
            (a baseline solver name, default "unipc") without AFS on the polynomial rho = 7
            grid of ``reference_steps`` steps (default 128), computed once.
        chunk: samples per validation sampling call.
        **distill_kwargs: everything else `distill` takes (iterations, lr, M, teacher,
            num_points, batch_size, pool, seed, dtype, device, **cond ...), the same for
            every candidate. ``schedule``, ``init`` and ``checkpoint`` are refused.

    Returns:
        ``(schedule, report)``: the winning candidate's schedule (as given) and a dict with
        ``chosen`` (its name), ``params`` (its distilled parameters), ``candidates``
        (per name: schedule, sigmas, val_rmse, final_loss, wall_s and params, or error),
        ``validation`` (seeds, size, reference), ``search_iterations``, ``wall_s`` and
        ``score`` (a function: any params' validation RMSE against the same reference).

    Raises:
        ValueError: bad arguments (named). RuntimeError: every candidate run failed.
    """
    t_start = time.perf_counter()
    for key, why in _REFUSED.items():
        if distill_kwargs.get(key) is not None:
            raise ValueError(f"choose_schedule does not take {key}=...: {why}")
        distill_kwargs.pop(key, None)
    nfe = check_int("nfe", nfe, 1)
    val_size = check_int("val_size", val_size, 1)
    val_seed = check_int("val_seed", val_seed, 0)
    reference_steps = check_int("reference_steps", reference_steps, 1)
    chunk = check_int("chunk", chunk, 1)
    afs = bool(distill_kwargs.get("afs", True))
    method = distill_kwargs.get("method", "epd")
    steps = nfe_to_steps("amed" if method == "amed" else "epd", nfe, afs)
    candidates = _check_candidates(DEFAULT_CANDIDATES if candidates is None else candidates,
                                   steps)
    iterations = check_int("iterations", distill_kwargs.get("iterations", DEFAULT_ITERATIONS), 1)
    if search_iterations is None:
        search_iterations = iterations
    search_iterations = check_int("search_iterations", search_iterations, 1)
    shape = tuple(int(n) for n in ((shape,) if isinstance(shape, numbers.Integral) else shape))

    # ---- training vs validation noise: disjoint seeds, checked rather than assumed
    seed = int(distill_kwargs.get("seed", 0))
    world = torch.distributed.get_world_size() if (
        torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
    batch = int(distill_kwargs.get("batch_size", DEFAULT_BATCH_SIZE))
    pool = distill_kwargs.get("pool", DEFAULT_POOL)
    seeds = validation_seeds(val_size, val_seed)
    clash = training_seeds(seed, search_iterations, world * batch, pool) & set(seeds)
    if clash:  # a 2^-40-scale event for hashed seeds; refuse rather than select on it
        raise ValueError(f"validation seeds {sorted(clash)[:3]} are also training seeds; "
                         f"pass another val_seed")

    cond = {k: v for k, v in distill_kwargs.items() if k not in _DISTILL_ARGS}
    vcond = _split_cond(cond, val_cond, (world * batch, pool), val_size)

    # ---- validation noise and the shared reference
    dtype = distill_kwargs.get("dtype", torch.float32)
    device = distill_kwargs.get("device")
    if device is None and isinstance(denoiser, torch.nn.Module):
        device = next((t.device for t in list(denoiser.parameters()) + list(denoiser.buffers())),
                      None)
    noise = make_noise(seeds, shape, device=device, dtype=dtype)
    t0 = time.perf_counter()
    try:
        ref_nfe = steps_to_nfe(reference_solver, reference_steps, afs=False)
    except (KeyError, ValueError) as e:
        raise ValueError(f"reference_solver {reference_solver!r}: {e}") from None
    ref = _run(denoiser, noise, vcond, chunk, solver=reference_solver, afs=False, nfe=ref_nfe,
               schedule={"kind": "polynomial", "rho": 7.0})
    ref_wall = time.perf_counter() - t0

    # ---- one distillation per candidate
    kw = dict(distill_kwargs, iterations=search_iterations)
    kw.setdefault("progress", False)
    results, params_of = {}, {}
    for name, spec in candidates.items():
        t0 = time.perf_counter()
        try:
            p = distill(denoiser, nfe=nfe, shape=shape, plugin=plugin, schedule=spec, **kw)
        except RuntimeError as e:  # e.g. persistent non-finite losses on this grid
            results[name] = {"schedule": spec, "val_rmse": math.inf, "error": str(e),
                             "wall_s": time.perf_counter() - t0}
            continue
        wall = time.perf_counter() - t0
        x = _run(denoiser, noise, vcond, chunk, solver=p.solver, nfe=None, params=p)
        results[name] = {"schedule": spec, "sigmas": p.sigmas.tolist(),
                         "val_rmse": _rmse(x, ref), "final_loss": p.meta.get("final_loss"),
                         "wall_s": wall, "params": p}
        params_of[name] = p
    finished = [n for n in results if n in params_of]
    if not finished:
        raise RuntimeError("choose_schedule: every candidate distillation failed: " + "; ".join(
            f"{n}: {r['error']}" for n, r in results.items()))
    chosen = min(finished, key=lambda n: results[n]["val_rmse"])

    def score(params) -> float:
        """RMSE of ``params``' samples of the validation noise to the shared reference."""
        x = _run(denoiser, noise, vcond, chunk, solver=params.solver, nfe=None, params=params)
        return _rmse(x, ref)

    report = {
        "chosen": chosen,
        "score": score,
        "params": params_of[chosen],
        "candidates": results,
        "search_iterations": search_iterations,
        "validation": {"size": val_size, "seeds": [seeds.start, seeds.stop - 1],
                       "reference": f"{reference_solver}, no AFS, {reference_steps} steps, "
                                    f"polynomial rho 7", "reference_wall_s": ref_wall},
        "wall_s": time.perf_counter() - t_start,
    }
    return candidates[chosen], report


def distill_auto(denoiser: Callable, *, nfe: int, shape, plugin: bool = False,
                 candidates=None, search_iterations: Optional[int] = DEFAULT_SEARCH_ITERATIONS,
                 final_iterations: Optional[int] = None, grid_iterations: Optional[int] = None,
                 **kwargs) -> Tuple[object, dict]:
    """`choose_schedule`, then the distilled parameters on the winning grid.

    Each candidate is distilled for ``search_iterations``; the winner is then distilled
    again for ``final_iterations`` (default: ``iterations``, the plain run's length)
    starting from its search parameters (``init``: a warm restart of Adam and of the
    cosine learning rate). With ``search_iterations=None`` the candidate runs are full
    length and the winner's run is the result (no second run). ``lr`` defaults to
    `AUTO_LR`; ``checkpoint`` / ``checkpoint_every`` apply to the final run (a resumed call
    repeats the deterministic search, then resumes). The report gains ``continued`` and
    its ``wall_s`` covers everything.

    ``learn_grid`` (default: True for EPD when there is a final run) and ``match`` apply
    to the final run only: the candidates are compared on their named grids with the
    trajectory loss; a second final run then learns the winner's interior sigmas, with the
    final-state loss and the learning rate ``lr * LEARN_GRID_LR_SCALE``, starting from the
    fixed-grid final run, for ``grid_iterations`` (default: as many as the final run);
    the one of the two with the lower validation RMSE is returned (module docstring,
    "Learning the grid"). ``report["final"]`` records both scores.
    """
    t0 = time.perf_counter()
    if final_iterations is not None:
        final_iterations = check_int("final_iterations", final_iterations, 1)
    if grid_iterations is not None:
        grid_iterations = check_int("grid_iterations", grid_iterations, 1)
    kwargs.setdefault("lr", AUTO_LR)
    choice_kw = {k: kwargs.pop(k) for k in CHOICE_OPTIONS if k in kwargs}
    # A checkpoint belongs to the final run. The search is deterministic, so a resumed call
    # repeats it, finds the same winner and start, and the checkpoint's settings match.
    final_kw = {k: kwargs.pop(k) for k in ("checkpoint", "checkpoint_every", "match",
                                           "learn_grid") if k in kwargs}
    for name in ("checkpoint", "learn_grid", "match"):
        if final_kw.get(name) not in (None, False) and search_iterations is None:
            raise ValueError(f"{name}=... needs a final run: pass search_iterations (the "
                             f"full-length search has none)")
    if final_kw.get("learn_grid") is None and search_iterations is not None:
        final_kw["learn_grid"] = kwargs.get("method", "epd") == "epd"
    with shared_pools():   # the final run reuses the winning grid's teacher pool
        schedule, report = choose_schedule(denoiser, nfe=nfe, shape=shape, plugin=plugin,
                                           candidates=candidates,
                                           search_iterations=search_iterations,
                                           **choice_kw, **kwargs)
        params = report["params"]
        score = report.pop("score")
        report["continued"] = search_iterations is not None
        if report["continued"]:
            iterations = kwargs.get("iterations", DEFAULT_ITERATIONS)
            kw = dict(kwargs, iterations=iterations if final_iterations is None
                      else final_iterations)
            kw.setdefault("progress", False)
            params, report["final"] = _final_runs(
                denoiser, score, params,
                dict(nfe=nfe, shape=shape, plugin=plugin, schedule=schedule, **kw), final_kw,
                grid_iterations)
    params.meta["schedule_search"] = {
        "chosen": report["chosen"], "final": report.get("final"),
        "val_rmse": {n: (r["val_rmse"] if math.isfinite(r["val_rmse"]) else None)
                     for n, r in report["candidates"].items()},
        "search_iterations": report["search_iterations"], "validation": report["validation"],
    }
    report["params"] = params
    report["wall_s"] = time.perf_counter() - t0
    return params, report


def _final_runs(denoiser, score, start, kw: dict, final_kw: dict,
                grid_iterations: Optional[int]):
    """The final run(s) of `distill_auto` from the search winner ``start``: (params, record).

    The winner is distilled in full on its grid; with ``learn_grid`` that result is the
    start of a second run that also learns the grid (final-state loss, lr scaled by
    `LEARN_GRID_LR_SCALE`), and the one with the lower validation RMSE is returned."""
    learn = bool(final_kw.get("learn_grid"))
    checkpoint = final_kw.get("checkpoint")
    every = {k: v for k, v in final_kw.items() if k == "checkpoint_every"}
    fixed_kw = dict(kw, **every, checkpoint=checkpoint)
    if not learn and final_kw.get("match") is not None:
        fixed_kw["match"] = final_kw["match"]
    fixed = distill(denoiser, init=start, **fixed_kw)
    record = {"learn_grid": learn}
    if not learn:
        return fixed, record
    grid_kw = dict(kw, **every, schedule=fixed.sigmas, learn_grid=True,
                   match=final_kw.get("match"), lr=kw["lr"] * LEARN_GRID_LR_SCALE,
                   iterations=kw["iterations"] if grid_iterations is None else grid_iterations,
                   checkpoint=None if checkpoint is None else f"{checkpoint}.learn_grid")
    learned = distill(denoiser, init=fixed, **grid_kw)
    record.update(fixed_val_rmse=score(fixed), learned_val_rmse=score(learned))
    better = record["learned_val_rmse"] < record["fixed_val_rmse"]
    record["kept"] = "learned" if better else "fixed"
    return (learned if better else fixed), record


#: `distill`'s own keyword arguments; anything else in **distill_kwargs is conditioning.
_DISTILL_ARGS = frozenset(
    n for n, p in inspect.signature(distill).parameters.items()
    if p.kind is not inspect.Parameter.VAR_KEYWORD)


def _own_options(fn, shared=("nfe", "shape", "plugin")) -> tuple:
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in shared)


#: `choose_schedule`'s own options (its other keywords go to `distill`).
CHOICE_OPTIONS = _own_options(choose_schedule, ("nfe", "shape", "plugin", "candidates",
                                                "search_iterations"))
#: What ``distill(schedule="auto", ...)`` hands on to `distill_auto` beyond `distill`'s own
#: arguments (the grid search's options; FAST_SETTINGS holds some of them).
SEARCH_OPTIONS = _own_options(distill_auto) + CHOICE_OPTIONS
