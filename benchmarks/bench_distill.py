#!/usr/bin/env python
"""Distillation benchmark: every distilled solver against every baseline at the same NFE.

Models (no download; each 64-dimensional):

* ``gaussian64``: a 64-dim Gaussian; reference: the closed-form ODE solution.
* ``mixture64``: 8 isotropic Gaussians in 64 dims; reference: scipy DOP853, rtol = atol =
  1e-10.
* ``digits-exact``: the exact denoiser of the 1797 8x8 digits (``load_model``); samples end
  on a training image, so a small error can switch the image ("flips").
* ``digits-unet``: the shipped class-conditional digits U-Net (float32).
  Reference for both digits models: UniPC with 320 (exact) / 160 (U-Net) steps, float64 /
  float32, its own error estimated against half the steps on 64 draws (reported).
  The digits models are class-conditional, as in the solver benchmark and the demo:
  every draw has the label ``seed % 10`` (test draws: their seed; the distillation's
  pool entries and D-ODE's fitting rows: their index; the grid search's validation
  draws: their index, ``val_cond``).

For each model and NFE (3, 5, 7, 9; quick: the two Gaussian models at NFE 5):

1. Baselines: every solver of `epd_kernels.sampling` that needs no distilled parameters,
   through `sample`, on the default grid (polynomial, rho = 7) and on every grid of
   `GRIDS`; "best" is the lowest TEST RMSE over all of them (the strictest opponent).
2. Distilled solvers (`DISTILLED`): EPD and EPD-Plugin through
   `epd_kernels.distill.schedule_search.distill_auto` (a short distillation per grid of
   `GRIDS`, the grid chosen on the search's own validation noise, then a full run on the
   winner and a run from that result which also learns the grid, the better of the two
   on validation kept ("+ learned" in the tables): what ``schedule="auto"`` does; the
   time covers all of it), plus one plain
   `distill` with the package defaults (polynomial rho = 7) for comparison (not on the
   U-Net: a run there costs minutes); D-ODE
   (d-euler, d-heun, d-ipndm) fitted in closed form on the default grid and on its base
   solver's best grid.

RMSE is over all elements of ``x(sigma_min)`` against the reference, on held-out noise
(seeds 10^6 + i; never used in training or in the grid choice). Bars (PASS / MISS):

* EPD below every baseline at each NFE and <= 0.6 x the best baseline at NFE 5: against the
  best over all solvers and grids, and again against the best of the baselines that spend
  no more total evaluations than EPD (ParaDiGMS spends 6-11x more);
* EPD-Plugin below iPNDM (on iPNDM's default grid and on its best grid);
* each D-ODE solver below its base solver on the same grid (default grid; base's best grid);
* distillation of NFE 5 (EPD and EPD-Plugin, grid search included) <= 60 s wall per model
  (the package defaults; on the U-Net, whose evaluations cost milliseconds on this CPU,
  `FAST_SETTINGS`, which it distils with throughout).

    python benchmarks/bench_distill.py [--quick] [--out benchmarks/results] [--nfes 3,5]
                                       [--models gaussian64,mixture64]

`run(quick, out_dir)` writes out_dir/distill.json, out_dir/distill.png and the params
files out_dir/distill_params/*.safetensors, and returns {"tables", "notes", ...}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from epd_kernels import fit_dode, make_noise, sample  # noqa: E402
from epd_kernels.distill import (DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS, DEFAULT_LR,  # noqa: E402
                                 DEFAULT_POOL, conditioning_rows, distill)
from epd_kernels.distill.schedule_search import (AUTO_LR, DEFAULT_CANDIDATES,  # noqa: E402
                                                 DEFAULT_REFERENCE_STEPS, FAST_SETTINGS,
                                                 SEARCH_OPTIONS,
                                                 DEFAULT_SEARCH_ITERATIONS, DEFAULT_VAL_SIZE,
                                                 distill_auto)
from epd_kernels.distill.dode_fit import DEFAULT_FIT_BATCH  # noqa: E402
from epd_kernels.models import GaussianMixtureModel, GaussianModel, load_model  # noqa: E402
from epd_kernels.solvers.registry import _SOLVERS, solver_names  # noqa: E402
from epd_kernels.workflow.resolve import class_labels_for  # noqa: E402

F64 = torch.float64
TIME_BAR_S = 60.0
RATIO_BAR = 0.6
RATIO_NFE = 5
TEST_SEED = 10 ** 6

#: Grids: the automatic search's candidates; baselines are also run on each of them.
GRIDS: Dict[str, object] = dict(DEFAULT_CANDIDATES)
DEFAULT_GRID = "poly7"  # what `sample` and `distill` use when no schedule is given
assert GRIDS[DEFAULT_GRID] == {"kind": "polynomial", "rho": 7.0}


# --------------------------------------------------------------------------------------
# models


def gaussian_64(seed: int = 0) -> GaussianModel:
    """N(mu, diag(s^2)) in 64 dims, mu ~ 0.5 N(0, 1), s ~ U(0.2, 1.0)."""
    g = torch.Generator().manual_seed(seed)
    return GaussianModel(0.5 * torch.randn(64, generator=g, dtype=F64),
                         0.2 + 0.8 * torch.rand(64, generator=g, dtype=F64))


def mixture_64(seed: int = 0, dim: int = 64, components: int = 8) -> GaussianMixtureModel:
    """8 isotropic components in 64 dims: means N(0, I) (about 11 apart), stds U(0.2, 0.6),
    weights U(0.5, 1.5) normalised."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=F64)
    stds = 0.2 + 0.4 * torch.rand(components, generator=g, dtype=F64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=F64)
    return GaussianMixtureModel(means, stds, weights)


def reference(model, noise: torch.Tensor) -> torch.Tensor:
    """Reference x(sigma_min) of the analytic models (closed form / DOP853)."""
    x = noise.to(F64) * 80.0
    if isinstance(model, GaussianModel):
        return model.exact_solution(x, 80.0, 0.002)
    return torch.cat([model.reference_solution(c, 80.0, 0.002, rtol=1e-10, atol=1e-10)
                      for c in x.split(256)])


@dataclasses.dataclass
class Problem:
    """One benchmark model: the denoiser evaluated (``model``, in ``dtype``), the one
    distilled (``model32``, float32), its reference solver and its discrete modes."""

    name: str
    model: Callable
    model32: Callable
    dtype: torch.dtype
    reference: Callable[[torch.Tensor], torch.Tensor]
    reference_note: str
    modes: Optional[torch.Tensor] = None   # [M, 64]: mixture means / training images
    plain: bool = True                     # also a plain `distill` on DEFAULT_GRID
    fast: bool = False                     # distil with FAST_SETTINGS (expensive denoiser)
    conditional: bool = False              # class labels, the `epd demo` rule

    def cond(self, keys) -> dict:
        """Conditioning of the draws ``keys`` (seeds or row indices): with ``conditional``,
        labels key % num_classes (`class_labels_for`, as `epd demo` and the solver section)."""
        lab = class_labels_for(self.model, list(keys), "seed") if self.conditional else None
        return {} if lab is None else {"class_labels": lab}


def _chunked(noise: torch.Tensor, cond: dict, size: int = 512):
    """(noise chunk, its rows of the per-draw conditioning) pairs."""
    for a in range(0, noise.shape[0], size):
        yield noise[a:a + size], {k: v[a:a + size] for k, v in cond.items()}


def _unipc_reference(model, steps: int, dtype):
    def ref(noise, **cond):
        return torch.cat([sample(model, c.to(dtype), solver="unipc", nfe=steps, **cc)
                          for c, cc in _chunked(noise, cond)])
    return ref


def _analytic(name, build) -> Problem:
    model = build()
    note = ("closed form" if isinstance(model, GaussianModel)
            else "scipy DOP853, rtol = atol = 1e-10")
    modes = getattr(model, "means", None)
    return Problem(name, model, copy.deepcopy(model).to(torch.float32), F64,
                   functools.partial(reference, model), note, modes)


def _digits_exact() -> Problem:
    m32 = load_model("digits-exact")
    m64 = copy.deepcopy(m32).to(F64)
    return Problem("digits-exact", m64, m32, F64, _unipc_reference(m64, 320, F64),
                   "UniPC, 320 steps, float64", m64.images.reshape(m64.num_images, -1),
                   conditional=True)


def _digits_unet() -> Problem:
    m = load_model("digits-unet")
    return Problem("digits-unet", m, m, torch.float32, _unipc_reference(m, 160, torch.float32),
                   "UniPC, 160 steps, float32", plain=False, fast=True, conditional=True)


MODELS: Dict[str, Callable[[], Problem]] = {
    "gaussian64": lambda: _analytic("gaussian64", gaussian_64),
    "mixture64": lambda: _analytic("mixture64", mixture_64),
    "digits-exact": _digits_exact,
    "digits-unet": _digits_unet,
}

QUICK = dict(models=("gaussian64", "mixture64"), nfes=(5,), test=512, plain=True)
FULL = dict(models=tuple(MODELS), nfes=(3, 5, 7, 9), test=1024, plain=True)
#: Held-out draws per model in the full run (the U-Net's reference is the costly part).
FULL_TEST = {"digits-unet": 512}
#: Extra keyword arguments of every distillation / D-ODE fit (empty: the package defaults,
#: which is what the bars judge; the smoke test shrinks them).
DISTILL_KW: dict = {}
SEARCH_KW: dict = {}
DODE_KW: dict = {}


def baseline_solvers() -> list:
    """Registered solvers that need no distilled parameters (aliases skipped)."""
    seen, out = set(), []
    for name in solver_names():
        spec = _SOLVERS[name]
        key = spec.fn if spec.fn is not None else (spec.lazy, spec.extra)
        if spec.needs_params or key in seen:
            continue
        seen.add(key)
        out.append(name)
    return out


# --------------------------------------------------------------------------------------
# distilled solvers: one row each. ``fit(problem, nfe, grid)`` returns (params, info);
# ``grid`` is None for the solver's own choice (EPD: the automatic search) or a name of
# GRIDS. ``must_beat``: "every baseline" (with the 0.6x bar at NFE 5) or a base solver,
# compared on the same grid. To add a solver (e.g. distilled AMED) append one entry.


def _fit_auto(problem, nfe, grid, *, plugin, method="epd"):
    """`distill_auto`: short runs on every grid of GRIDS, the winner on validation noise
    trained in full. ``grid`` given: one plain `distill` on that grid instead."""
    kw = dict(nfe=nfe, shape=tuple(problem.model32.shape), plugin=plugin, progress=False)
    search_kw = dict(SEARCH_KW)
    if problem.fast:  # FAST_SETTINGS: search options to distill_auto, the rest to distill
        search_kw.update({k: v for k, v in FAST_SETTINGS.items() if k in SEARCH_OPTIONS})
        kw.update({k: v for k, v in FAST_SETTINGS.items() if k not in SEARCH_OPTIONS})
    kw.update(DISTILL_KW)
    if method != "epd":
        kw["method"] = method
    if problem.conditional:   # one label per training draw: the pool's entries (or batch rows)
        kw.update(problem.cond(range(conditioning_rows(
            kw.get("pool", DEFAULT_POOL), kw.get("batch_size", DEFAULT_BATCH_SIZE)))))
        search_kw["val_cond"] = problem.cond(range(search_kw.get("val_size",
                                                                 DEFAULT_VAL_SIZE)))
    wall, cpu = time.perf_counter(), time.process_time()
    if grid is None:
        params, rep = distill_auto(problem.model32, candidates=GRIDS, **search_kw, **kw)
        learned = (rep.get("final") or {}).get("kept") == "learned"
        info = {"grid": rep["chosen"] + (" + learned" if learned else ""),
                "final": rep.get("final"), "search": {
            n: {"val_rmse": c["val_rmse"], "wall_s": c["wall_s"]}
            for n, c in rep["candidates"].items()}}
    else:   # the fixed defaults on that grid (no budget, no held-out comparison of its own)
        params = distill(problem.model32, schedule=GRIDS[grid], time_budget_s=None,
                         compare=False, **kw)
        info = {"grid": grid}
    info.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                settings="fast" if problem.fast else "defaults")
    return params, info


def _fit_dode(problem, nfe, grid, *, solver):
    wall, cpu = time.perf_counter(), time.process_time()
    rows = range(DODE_KW.get("batch_size", DEFAULT_FIT_BATCH))   # one label per row
    params = fit_dode(problem.model32, solver=solver, nfe=nfe, shape=tuple(problem.model32.shape),
                      schedule=GRIDS[grid or DEFAULT_GRID], **DODE_KW, **problem.cond(rows))
    return params, {"grid": grid or DEFAULT_GRID, "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu}


@dataclasses.dataclass(frozen=True)
class Distilled:
    """One distilled solver. ``auto``: its own grid (``fit(..., grid=None)``), timed
    against the bar at NFE 5 and, with ``plain``, also one plain run on DEFAULT_GRID;
    otherwise fitted on the default grid and on its base solver's best grid."""

    solver: str                     # name for `sample`
    label: str                      # name in tables
    fit: Callable                   # fit(problem, nfe, grid) -> (params, info)
    must_beat: str                  # EVERY or the base solver's name
    auto: bool = False
    plain: bool = False

    def runs(self, base_best: Optional[str]) -> Dict[str, Optional[str]]:
        """{run key: grid name or None for the automatic choice}."""
        if self.auto:
            return {"auto": None, **({"plain": DEFAULT_GRID} if self.plain else {})}
        out = {"default": DEFAULT_GRID}
        if base_best is not None and base_best != DEFAULT_GRID:
            out["base-best"] = base_best
        return out


EVERY = "every baseline"
#: Distilled AMED would be one more line each, e.g.
#:   Distilled("amed", "AMED", functools.partial(_fit_auto, plugin=False, method="amed"),
#:             EVERY, auto=True, plain=True)
DISTILLED: Tuple[Distilled, ...] = (
    Distilled("epd", "EPD", functools.partial(_fit_auto, plugin=False), EVERY, True, True),
    Distilled("epd-ipndm", "EPD-Plugin", functools.partial(_fit_auto, plugin=True), "ipndm",
              True, True),
    Distilled("d-euler", "D-Euler", functools.partial(_fit_dode, solver="d-euler"), "euler"),
    Distilled("d-heun", "D-Heun", functools.partial(_fit_dode, solver="d-heun"), "heun"),
    Distilled("d-ipndm", "D-iPNDM", functools.partial(_fit_dode, solver="d-ipndm"), "ipndm"),
)


# --------------------------------------------------------------------------------------
# measurement


class _Data:
    """Held-out noise, its reference and the metrics for one problem."""

    def __init__(self, problem: Problem, n_test: int, first_seed: int = TEST_SEED):
        self.p = problem
        seeds = range(first_seed, first_seed + n_test)
        self.noise = make_noise(seeds, problem.model.shape, dtype=problem.dtype)
        self.cond = problem.cond(seeds)
        t0 = time.perf_counter()
        self.ref = problem.reference(self.noise, **self.cond)
        self.ref_wall = time.perf_counter() - t0
        self.mode = None if problem.modes is None else self._nearest(self.ref)

    def check_reference(self, solver="unipc", steps=None, n=64) -> Optional[float]:
        """RMSE between the reference and the same solver with half the steps, on n draws
        (an upper bound of the reference's own error); None for closed-form references."""
        if steps is None:
            return None
        cond = {k: v[:n] for k, v in self.cond.items()}
        half = torch.cat([sample(self.p.model, c, solver=solver, nfe=steps // 2, **cc)
                          for c, cc in _chunked(self.noise[:n], cond)])
        return self.rmse(half, self.ref[:n])

    def _nearest(self, x):
        return torch.cdist(x.reshape(x.shape[0], -1).to(F64), self.p.modes.to(F64)).argmin(1)

    @staticmethod
    def rmse(x, ref) -> float:
        v = (x.to(F64) - ref.to(F64)).pow(2).mean().sqrt().item()
        return v if math.isfinite(v) else math.inf

    def evaluate(self, solver, nfe=None, params=None, schedule=None) -> dict:
        """{"rmse", "flips", "total_evals"} of one solver on the held-out noise."""
        outs, stats = [], None
        for c, cc in _chunked(self.noise, self.cond):
            x, stats = sample(self.p.model, c, solver=solver, nfe=nfe, params=params,
                              schedule=schedule, return_stats=True, **cc)
            outs.append(x)
        x = torch.cat(outs)
        flips = None if self.mode is None else int((self._nearest(x) != self.mode).sum())
        return {"rmse": self.rmse(x, self.ref), "flips": flips,
                "total_evals": float(stats.total_evals)}


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
    return str(v)


def _bar(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


# --------------------------------------------------------------------------------------
# run


def run(quick: bool, out_dir: pathlib.Path, *, nfes: Optional[Sequence[int]] = None,
        models: Optional[Sequence[str]] = None, verbose: bool = True) -> dict:
    """Runs the benchmark (module docstring); returns the tables and writes the files."""
    t_start = time.perf_counter()
    cfg = dict(QUICK if quick else FULL)
    if nfes:
        cfg["nfes"] = tuple(int(n) for n in nfes)
    if models:
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {list(MODELS)}")
        cfg["models"] = tuple(models)
    out_dir = pathlib.Path(out_dir)
    params_dir = out_dir / "distill_params"
    params_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print("[distill]", *a, flush=True)) if verbose else (lambda *a: None)
    threads = torch.get_num_threads()
    # One thread: these problems are small, and on a shared 2-core machine a second
    # OpenMP thread that gets descheduled makes a U-Net step 10-40x slower (measured).
    torch.set_num_threads(1)
    baselines = baseline_solvers()
    results: Dict[str, dict] = {}
    refs: Dict[str, dict] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # reference-backend notice
            for mname in cfg["models"]:
                problem = MODELS[mname]()
                n_test = cfg["test"] if quick else FULL_TEST.get(mname, cfg["test"])
                data = _Data(problem, n_test)
                steps = {"digits-exact": 320, "digits-unet": 160}.get(mname)
                refs[mname] = {"reference": problem.reference_note, "test_draws": n_test,
                               "wall_s": data.ref_wall,
                               "error_estimate": data.check_reference(steps=steps)}
                say(f"{mname}: reference ({problem.reference_note}) for {n_test} draws in "
                    f"{data.ref_wall:.1f} s")
                results[mname] = {nfe: _one_nfe(data, nfe, cfg, baselines, params_dir, mname,
                                                say) for nfe in cfg["nfes"]}
    finally:
        torch.set_num_threads(threads)

    tables, bars = _tables(results, baselines)
    plot = _plot(results, out_dir / "distill.png")
    notes = _notes(results, bars, refs, cfg)
    out = {
        "section": "distill",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "grids": GRIDS,
        "baselines": baselines,
        "distilled": [d.solver for d in DISTILLED],
        "references": refs,
        "results": {m: {str(n): r for n, r in v.items()} for m, v in results.items()},
        "bars": bars,
        "tables": tables,
        "notes": notes,
        "params_dir": str(params_dir.relative_to(out_dir)),
        "elapsed_s": time.perf_counter() - t_start,
    }
    if plot is not None:
        out["plot"] = plot.name
    (out_dir / "distill.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def baseline_results(data, nfe, baselines) -> dict:
    """{"baselines": {solver: {grid: evaluation or {"error"}}}, "best_baseline": the row
    with the lowest test RMSE over every solver and grid}."""
    rec = {"baselines": {}}
    for solver in baselines:
        row = {}
        for g, spec in GRIDS.items():
            try:
                row[g] = data.evaluate(solver, nfe=nfe, schedule=spec)
            except ValueError as e:  # e.g. an NFE budget this solver cannot meet
                row[g] = {"error": str(e).split(";")[0]}
        rec["baselines"][solver] = row
    rec["best_baseline"] = min(valid_baselines(rec), key=lambda v: v["rmse"])
    return rec


def valid_baselines(rec) -> list:
    """Every evaluated (solver, grid) of ``rec["baselines"]`` as flat rows."""
    return [dict(r, solver=s, grid=g) for s, row in rec["baselines"].items()
            for g, r in row.items() if "rmse" in r]


def _one_nfe(data, nfe, cfg, baselines, params_dir, mname, say) -> dict:
    rec = dict(baseline_results(data, nfe, baselines), distilled={})
    b = rec["best_baseline"]
    say(f"{mname} NFE {nfe}: best baseline {b['solver']}/{b['grid']} {b['rmse']:.4g} "
        f"({b['total_evals']:g} evals)")

    for d in DISTILLED:
        runs = {}
        base_row = rec["baselines"].get(d.must_beat, {})
        base_best = min((g for g, r in base_row.items() if "rmse" in r),
                        key=lambda g: base_row[g]["rmse"], default=None)
        for key, grid in d.runs(base_best).items():
            if key == "plain" and not (cfg.get("plain") and data.p.plain):
                continue
            params, info = d.fit(data.p, nfe, grid)
            ev = data.evaluate(d.solver, params=params)
            path = params_dir / f"{mname}_{d.solver}_nfe{nfe}_{key}.safetensors"
            params.save(path, overwrite=True)
            runs[key] = dict(info, **ev, file=path.name, sigmas=params.sigmas.tolist())
            say(f"{mname} NFE {nfe} {d.solver} [{key}: {info['grid']}]: {info['wall_s']:.1f} s "
                f"wall, test {ev['rmse']:.4g}" + ("" if ev["flips"] is None
                                                  else f", flips {ev['flips']}"))
        rec["distilled"][d.solver] = {"runs": runs, "base_best_grid": base_best}
    return rec


# --------------------------------------------------------------------------------------
# tables, bars, notes, plot


def _bar_checks(rec, nfe, d: Distilled):
    """[(bar name, value, pass)] of one distilled solver at one NFE."""
    e = rec["distilled"][d.solver]
    runs, checks = e["runs"], []
    if d.must_beat == EVERY:
        r = runs["auto"]
        valid = valid_baselines(rec)
        same_cost = [v for v in valid if v["total_evals"] <= r["total_evals"]]
        for ref, label in ((min(valid, key=lambda v: v["rmse"]), "every baseline"),
                           (min(same_cost, key=lambda v: v["rmse"], default=None),
                            f"every baseline with <= {r['total_evals']:g} evals")):
            if ref is None:
                continue
            q = r["rmse"] / ref["rmse"]
            checks.append((f"{d.label} < {label} ({ref['solver']}/{ref['grid']})", q, q < 1.0))
            if nfe == RATIO_NFE:
                checks.append((f"{d.label} <= {RATIO_BAR} x best of {label}", q, q <= RATIO_BAR))
    else:
        base = rec["baselines"][d.must_beat]
        best = e["base_best_grid"]
        if d.auto:  # own grid vs the base on its default and on its best grid
            pairs = [("auto", DEFAULT_GRID, "default grid"), ("auto", best, f"best grid {best}")]
        else:  # the same grid on both sides
            pairs = [("default", DEFAULT_GRID, "default grid")]
            if "base-best" in runs:
                pairs.append(("base-best", best, f"its best grid {best}"))
        for key, grid, label in pairs:
            if grid is None or "rmse" not in base.get(grid, {}):
                continue
            q = runs[key]["rmse"] / base[grid]["rmse"]
            checks.append((f"{d.label} < {d.must_beat} ({label})", q, q < 1.0))
    if d.auto and nfe == RATIO_NFE:
        w = runs["auto"]["wall_s"]
        checks.append((f"{d.label} distill time (grid search included) <= {TIME_BAR_S:.0f} s",
                       w, w <= TIME_BAR_S))
    return checks


def _tables(results, baselines):
    rmse_rows, bar_rows, bars, time_rows = [], [], [], []
    for mname, per_nfe in results.items():
        for nfe, rec in per_nfe.items():
            bb = rec["best_baseline"]
            row = [mname, nfe]
            row += [_fmt(rec["baselines"][s].get(DEFAULT_GRID, {}).get("rmse"))
                    for s in baselines]
            row.append(f"{_fmt(bb['rmse'])} {bb['solver']}/{bb['grid']}")
            for d in DISTILLED:
                runs = rec["distilled"][d.solver]["runs"]
                main = runs.get("auto") or runs.get("default")
                row.append(f"{_fmt(main['rmse'])}" + (f" {main['grid']}" if d.auto else ""))
                if d.plain:
                    row.append(_fmt(runs.get("plain", {}).get("rmse")))
            rmse_rows.append(row)
            for d in DISTILLED:
                for name, value, ok in _bar_checks(rec, nfe, d):
                    bars.append({"model": mname, "nfe": nfe, "solver": d.solver, "bar": name,
                                 "value": value, "pass": bool(ok)})
                    bar_rows.append([mname, nfe, name, _fmt(value, 3), _bar(ok)])
                for key, r in rec["distilled"][d.solver]["runs"].items():
                    search = r.get("search")
                    time_rows.append([
                        mname, nfe, d.solver, key, r.get("settings", "defaults"), r["grid"],
                        _fmt(r["wall_s"], 3),
                        _fmt(r["cpu_s"], 3), _fmt(r["rmse"]), _fmt(r["flips"]),
                        "-" if not search else " ".join(
                            f"{g}:{_fmt(s['val_rmse'], 3)}" for g, s in search.items())])
    cols = ["model", "NFE"] + baselines + ["best baseline (any grid)"]
    for d in DISTILLED:
        cols.append(d.label + (" (auto grid)" if d.auto else ""))
        if d.plain:
            cols.append(f"{d.label} plain {DEFAULT_GRID}")
    tables = [
        {"title": f"RMSE to the reference on held-out noise (baselines and D-ODE on the "
                  f"default grid {DEFAULT_GRID}; EPD / EPD-Plugin on the grid chosen "
                  f"automatically, and a plain distill on {DEFAULT_GRID})",
         "columns": cols, "rows": rmse_rows},
        {"title": "Bars (value: RMSE ratio distilled / baseline, or seconds)",
         "columns": ["model", "NFE", "bar", "value", "result"], "rows": bar_rows},
        {"title": "Every distillation: grid, time (1 thread), test RMSE, flips; for the "
                  "automatic runs the validation RMSE of each searched grid",
         "columns": ["model", "NFE", "solver", "run", "settings", "grid", "wall s", "cpu s",
                     "test RMSE", "flips", "search: val RMSE per grid"],
         "rows": time_rows},
    ]
    grid_rows = []
    for mname, per_nfe in results.items():
        for nfe, rec in per_nfe.items():
            for s in baselines:
                row = rec["baselines"][s]
                grid_rows.append([mname, nfe, s] + [_fmt(row[g].get("rmse")) for g in GRIDS])
    tables.append({"title": "Baselines on every grid (test RMSE)",
                   "columns": ["model", "NFE", "solver"] + list(GRIDS), "rows": grid_rows})
    return tables, bars


def _notes(results, bars, refs, cfg):
    notes = []
    missed = [b for b in bars if not b["pass"]]
    notes.append(f"{len(bars) - len(missed)}/{len(bars)} bars PASS" + (
        "" if not missed else "; MISS: " + "; ".join(
            f"{b['model']} NFE {b['nfe']} {b['bar']} ({_fmt(b['value'], 3)})" for b in missed)))
    notes.append("References: " + "; ".join(
        f"{m}: {r['reference']} ({r['test_draws']} held-out draws, {r['wall_s']:.0f} s"
        + ("" if r["error_estimate"] is None else
           f"; vs half the steps on 64 draws: {r['error_estimate']:.2g}") + ")"
        for m, r in refs.items()))
    notes.append(f"EPD / EPD-Plugin 'auto': `distill_auto` with its defaults "
                 f"({DEFAULT_SEARCH_ITERATIONS} iterations per grid of {', '.join(GRIDS)}; the "
                 f"grid with the lowest RMSE to a UniPC-{DEFAULT_REFERENCE_STEPS} reference on "
                 f"{DEFAULT_VAL_SIZE} validation draws (seeds 3 2^40 + i) wins and is distilled "
                 f"for {DEFAULT_ITERATIONS} iterations from its search parameters; lr {AUTO_LR}, "
                 f"batch {DISTILL_KW.get('batch_size', DEFAULT_BATCH_SIZE)}, pool of "
                 f"{DISTILL_KW.get('pool', DEFAULT_POOL)} draws). "
                 f"The wall time covers the search. 'plain': `distill` with the package "
                 f"defaults (grid {DEFAULT_GRID}, lr {DEFAULT_LR}). Settings 'fast' (the "
                 f"U-Net, whose evaluations cost milliseconds): "
                 f"`distill_auto(..., **FAST_SETTINGS)` = {FAST_SETTINGS}.")
    notes.append("Class-conditional models (digits-exact, digits-unet): every draw carries "
                 "the label seed % 10 (test draws: their seed; training pool entries, D-ODE "
                 "fitting rows and validation draws: their index), as in the solver "
                 "benchmark and the demo.")
    notes.append("Baselines: the best is the lowest TEST RMSE over every solver and grid, "
                 "a stricter opponent than a validation choice. D-ODE: fitted in closed "
                 f"form (batch {DODE_KW.get('batch_size', DEFAULT_FIT_BATCH)}, Heun teacher "
                 "with 10x steps) and refined jointly on the "
                 "final state (`fit_dode` defaults) on the same grid as the base solver it is "
                 "compared with.")
    flips = []
    for m, per_nfe in results.items():
        for nfe, rec in per_nfe.items():
            r = rec["distilled"]["epd"]["runs"]["auto"]
            if r["flips"] is not None:
                flips.append(f"{m} NFE {nfe}: EPD {r['flips']}, best baseline "
                             f"{rec['best_baseline']['flips']}")
    if flips:
        notes.append("Samples that end nearest to another mixture component / training "
                     "image than their reference (they dominate the RMSE there): "
                     + "; ".join(flips))
    return notes


def _plot(results, path: pathlib.Path):
    from benchmarks.plot import have_matplotlib, pyplot

    if not have_matplotlib():
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (mname, per_nfe) in zip(axes[0], results.items()):
        nfes = sorted(per_nfe)
        solvers = list(next(iter(per_nfe.values()))["baselines"])
        for i, s in enumerate(solvers):
            ys = [per_nfe[n]["baselines"][s].get(DEFAULT_GRID, {}).get("rmse", math.nan)
                  for n in nfes]
            ax.plot(nfes, ys, color=cmap(i % 10), marker="o", ms=3, lw=1, alpha=0.6, label=s)
        ax.plot(nfes, [per_nfe[n]["best_baseline"]["rmse"] for n in nfes], color="black",
                ls=":", marker="x", lw=1.2, label="best baseline, any grid")
        for d, color in zip(DISTILLED, ("tab:red", "tab:blue", "tab:olive", "tab:brown",
                                        "tab:purple", "tab:pink", "tab:cyan")):
            for key, ls, lw in (("auto", "-", 2.2), ("default", "-", 1.6), ("plain", "--", 1.4)):
                ys = [per_nfe[n]["distilled"][d.solver]["runs"].get(key, {}).get("rmse", math.nan)
                      for n in nfes]
                if all(math.isnan(y) for y in ys):
                    continue
                ax.plot(nfes, ys, color=color, ls=ls, marker="s", ms=4, lw=lw,
                        label=f"{d.solver}" + {"auto": " (auto grid)", "default": "",
                                               "plain": f" (plain {DEFAULT_GRID})"}[key])
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xlabel("NFE (sequential denoiser calls)")
        ax.set_ylabel("RMSE vs reference (held-out draws)")
        ax.set_title(mname)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--nfes", default=None, help="comma-separated NFEs, e.g. 3,5")
    ap.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)}")
    args = ap.parse_args(argv)
    nfes = [int(n) for n in args.nfes.split(",")] if args.nfes else None
    models = args.models.split(",") if args.models else None
    result = run(args.quick, pathlib.Path(args.out), nfes=nfes, models=models)
    from benchmarks.run import render_text
    print(render_text("distill", result))
    print(f"wrote {pathlib.Path(args.out) / 'distill.json'} in {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
