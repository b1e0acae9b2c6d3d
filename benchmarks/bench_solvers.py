#!/usr/bin/env python
"""Solver benchmark: final-state RMSE against a converged ODE solution, per latency NFE.

Every baseline solver at latency NFE 3, 5, 7, 9 (AFS on for Heun and DPM-Solver-2, whose
budgets are then odd), sampled from the same noise (``make_noise`` seeds 0..n-1) on:

* ``digits-unet``, the `epd demo` model (float32, labels ``seed % 10``); reference: the
  demo's reference solver with twice its steps, error estimated as RMSE(half steps) / 7;
* ``digits-exact``, the exact denoiser of the digits (float64); reference:
  `DigitsExactDenoiser.reference_solution` (RK4 with step doubling, Richardson estimate);
* ``gaussian-64`` (closed form) and ``gmm-64x8`` (scipy DOP853 at rtol = atol = 1e-12,
  checked against a 100x looser solve).

Row ``dpmpp3m-ref``: DPM-Solver++(3M) with the k-diffusion code's D'' weight. Per row: RMSE
at sigma_min (one global RMS), latency NFE and total evaluations as `sample` counts them,
wall time (one thread, benchmarks/timing.py). Distilled solvers (`DISTILLED`) get rows with
``distill=True`` or their params (``params={(model, solver, nfe): params or path}``, or
``--params-dir`` holding ``<model>-<solver>-nfe<N>.safetensors``).
Writes ``out_dir/solvers.json`` and ``out_dir/solvers.png`` (log-y error vs NFE).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from benchmarks.plot import error_panels  # noqa: E402
from benchmarks.run import section_main, str_list, torch_threads  # noqa: E402
from benchmarks.timing import Timer, bench_interleaved  # noqa: E402
from epd_kernels.distill.dode_fit import DEFAULT_FIT_BATCH as DODE_BATCH  # noqa: E402
from epd_kernels.models import GaussianMixtureModel, GaussianModel  # noqa: E402
from epd_kernels.models.registry import DEFAULT_MODEL, load_model  # noqa: E402
from epd_kernels.noise import make_noise  # noqa: E402
from epd_kernels.params import AMEDParams, DODEParams, EPDParams  # noqa: E402
from epd_kernels.sampling import sample  # noqa: E402
from epd_kernels.workflow.demo import DEFAULT as DEMO  # noqa: E402
from epd_kernels.workflow.resolve import class_labels_for  # noqa: E402

SOLVERS = ["euler", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis"]
# Extra rows: name -> (solver, its `options` for sample()).
VARIANTS = {"dpmpp3m-ref": ("dpmpp3m", {"variant": "reference"})}
NFES = [3, 5, 7, 9]
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
# The quick section (15-30 s on 2 shared cores) keeps all four budgets (stable columns).
QUICK = dict(samples=64, rtol=1e-10, digits_tol=1e-5, time_repeats=3)
FULL = dict(samples=256, rtol=1e-12, digits_tol=1e-6, time_repeats=7)
F64 = torch.float64
# Twice the demo's reference steps: on the U-Net (64 samples, against 240 steps) the error
# drops from 1.3e-4 to 1.2e-5 for 3 s more, >1000x below the best 9-NFE solver (4e-2).
REF_SOLVER, REF_NFE = DEMO.ref_solver, 2 * DEMO.ref_nfe
# A reference whose estimated error exceeds this fraction of a model's smallest RMSE is
# flagged in the notes (the RMSEs would then partly measure the reference).
REF_TOLERANCE = 0.01


# --------------------------------------------------------------------------------------
# models


@dataclasses.dataclass
class BenchModel:

    name: str
    denoiser: Callable
    dtype: torch.dtype
    reference: Callable  # (model, noise, cond, cfg) -> (x at sigma_min, info dict)
    role: str = ""
    cost_table: bool = False  # add the per-solver-and-NFE table (latency, evals, wall)

    @property
    def shape(self) -> tuple:
        return tuple(self.denoiser.shape)

    def cond(self, seeds) -> dict:
        """The `epd demo` conditioning: labels = seed % num_classes for conditional models."""
        lab = class_labels_for(self.denoiser, list(seeds), "seed")
        return {} if lab is None else {"class_labels": lab}


def build_models(dim: int = 64, components: int = 8, seed: int = 0) -> Dict[str, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    gauss = GaussianModel(0.8 * torch.randn(dim, generator=g, dtype=F64),
                          0.3 + 0.7 * torch.rand(dim, generator=g, dtype=F64))
    gmm = GaussianMixtureModel(torch.randn(components, dim, generator=g, dtype=F64),
                               0.3 + 0.3 * torch.rand(components, generator=g, dtype=F64),
                               0.5 + torch.rand(components, generator=g, dtype=F64))
    return {f"gaussian-{dim}": gauss, f"gmm-{dim}x{components}": gmm}


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def analytic_reference(model, noise, cond, cfg):
    """Exact for the Gaussian (where, in full runs, the mixture's ODE solver is also checked
    against the closed form), DOP853 for the mixture."""
    x_T, rtol = noise * SIGMA_MAX, cfg["rtol"]
    t0 = time.perf_counter()
    if isinstance(model, GaussianModel):
        ref = model.exact_solution(x_T, SIGMA_MAX, SIGMA_MIN)
        info = dict(method="closed form", seconds=time.perf_counter() - t0, error_estimate=0.0)
        if not cfg["quick"]:
            ode = model.reference_solution(x_T, SIGMA_MAX, SIGMA_MIN, rtol=rtol, atol=rtol)
            info["ode_solver_max_abs_error"] = float((ode - ref).abs().max())
        return ref, info
    ref = model.reference_solution(x_T, SIGMA_MAX, SIGMA_MIN, rtol=rtol, atol=rtol)
    seconds = time.perf_counter() - t0
    loose = model.reference_solution(x_T, SIGMA_MAX, SIGMA_MIN, rtol=rtol * 100, atol=rtol * 100)
    change = float((ref - loose).abs().max())
    return ref, dict(method=f"scipy DOP853 in log sigma, rtol=atol={rtol:g}", seconds=seconds,
                     max_abs_change_vs_rtol_x100=change, error_estimate=change)


def unet_reference(model, noise, cond, cfg):
    """The `epd demo` way: a third-order solver with many steps, checked against half."""
    t0 = time.perf_counter()
    ref = sample(model, noise, solver=REF_SOLVER, nfe=REF_NFE, **cond)
    seconds = time.perf_counter() - t0
    half = sample(model, noise, solver=REF_SOLVER, nfe=REF_NFE // 2, **cond)
    dtype = str(noise.dtype).replace("torch.", "")
    return ref, dict(method=f"{REF_SOLVER} with {REF_NFE} steps (the epd demo's reference "
                            f"solver, twice its {DEMO.ref_nfe} steps), {dtype}",
                     seconds=seconds, error_estimate=_rmse(half, ref) / 7.0,
                     error_check=f"RMSE to {REF_NFE // 2} steps / 7 (third order)")


def digits_exact_reference(model, noise, cond, cfg):
    t0 = time.perf_counter()
    ref, info = model.reference_solution(noise, SIGMA_MAX, SIGMA_MIN, tol=cfg["digits_tol"],
                                         return_info=True, **cond)
    return ref, dict(method=f"RK4 in 1/sigma, float64, {info['steps']} steps (step doubling to "
                            f"max-abs change <= {cfg['digits_tol']:g})",
                     seconds=time.perf_counter() - t0, error_estimate=info["error_estimate"],
                     error_check="last max-abs change / 15 (Richardson, fourth order)")


def model_names() -> list:
    return [DEFAULT_MODEL, "digits-exact"] + list(build_models())


def bench_models(names: Optional[Sequence[str]] = None) -> Dict[str, BenchModel]:
    """The benchmark's models in table order (the `epd demo` model first), or those named."""
    wanted = model_names() if names is None else list(names)
    unknown = [n for n in wanted if n not in model_names()]
    if unknown:
        raise ValueError(f"models: unknown {unknown}; known: {model_names()}")
    analytic = build_models()
    out = {}
    for n in wanted:
        if n == DEFAULT_MODEL:
            out[n] = BenchModel(n, load_model(n), torch.float32, unet_reference,
                                role="the epd demo model", cost_table=True)
        elif n == "digits-exact":
            out[n] = BenchModel(n, load_model(n), F64, digits_exact_reference,
                                role="exact denoiser of the digits", cost_table=True)
        else:
            out[n] = BenchModel(n, analytic[n], F64, analytic_reference)
    return out


# --------------------------------------------------------------------------------------
# distilled solvers: name -> how to load and how to fit its params


@dataclasses.dataclass(frozen=True)
class Distilled:
    """``params_class.load(path)`` reads a file; ``fit(bench_model, nfe, **overrides)`` makes
    params with the library's defaults or ``overrides`` (only with ``distill=True``)."""

    params_class: type
    fit: Callable


def _fit_epd(plugin: bool, method: Optional[str] = None):
    def fit(bm: BenchModel, nfe: int, **overrides):
        from epd_kernels.distill import (DEFAULT_BATCH_SIZE, DEFAULT_POOL, conditioning_rows,
                                         distill)

        # AMED distils with the EPD machinery (same teacher, batches, defaults), its
        # predictor (the paper's form) on the main-point denoised features.
        kw = dict(num_points=2, batch_size=DEFAULT_BATCH_SIZE, pool=DEFAULT_POOL,
                  progress=False, dtype=bm.dtype)
        if method:
            kw.update(method=method, num_points=None)
        kw.update(overrides)
        # Labels (conditional models) follow the training draws: one per pool entry, or
        # one per batch row with fresh noise (pool=None).
        cond = bm.cond(range(conditioning_rows(kw["pool"], kw["batch_size"])))
        return distill(bm.denoiser, nfe=nfe, shape=bm.shape, plugin=plugin, **kw, **cond)
    return fit


def _fit_dode(solver: str):
    def fit(bm: BenchModel, nfe: int, **overrides):
        from epd_kernels.distill.dode_fit import fit_dode

        kw = {"batch_size": DODE_BATCH, "dtype": bm.dtype, **overrides}
        return fit_dode(bm.denoiser, solver=solver, nfe=nfe, shape=bm.shape, **kw,
                        **bm.cond(range(kw["batch_size"])))
    return fit


DISTILLED: Dict[str, Distilled] = {
    "epd": Distilled(EPDParams, _fit_epd(plugin=False)),
    "epd-ipndm": Distilled(EPDParams, _fit_epd(plugin=True)),
    "amed": Distilled(AMEDParams, _fit_epd(plugin=False, method="amed")),
    "amed-ipndm": Distilled(AMEDParams, _fit_epd(plugin=True, method="amed")),
    "d-euler": Distilled(DODEParams, _fit_dode("d-euler")),
    "d-ipndm": Distilled(DODEParams, _fit_dode("d-ipndm")),
}


def params_for(bm: BenchModel, solver, nfe, params, params_dir, distill, notes,
               save_dir: Optional[pathlib.Path] = None, overrides: Optional[dict] = None):
    """Params for (model, solver, nfe) from `params`, `params_dir` or a fit (saved to
    `save_dir` as ``<model>-<solver>-nfe<N>.safetensors`` for reuse); None if none."""
    entry = DISTILLED[solver]
    key, file_name = (bm.name, solver, nfe), f"{bm.name}-{solver}-nfe{nfe}.safetensors"
    if params and key in params:
        p = params[key]
        return entry.params_class.load(p) if isinstance(p, (str, pathlib.Path)) else p
    if params_dir is not None and (pathlib.Path(params_dir) / file_name).exists():
        return entry.params_class.load(pathlib.Path(params_dir) / file_name)
    if not distill:
        return None
    try:
        p = entry.fit(bm, nfe, **(overrides or {}))
    except Exception as e:  # noqa: BLE001 - report and go on with the baselines
        notes.append(f"fitting {solver} at NFE {nfe} on {bm.name} failed: "
                     f"{type(e).__name__}: {e}")
        return None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        p.save(str(save_dir / file_name), overwrite=True)
    return p


#: `epd demo`'s fitting settings, for ``demo_distilled=True``: the rows show what the demo's
#: one-command run gets; full-default fits and the bars are the `distill` section's job.
_DEMO_EPD = dict(iterations=DEMO.epd_iterations, batch_size=DEMO.epd_batch,
                 M=DEMO.epd_teacher_points, pool=DEMO.epd_pool)
_DEMO_AMED = dict(iterations=DEMO.amed_iterations, batch_size=DEMO.epd_batch,
                  M=DEMO.epd_teacher_points, pool=None, features=DEMO.amed_features)
_DEMO_DODE = dict(batch_size=DEMO.dode_batch, teacher_factor=DEMO.dode_teacher_factor)
DEMO_FIT = {"epd": dict(_DEMO_EPD, lr=DEMO.epd_lr),
            "epd-ipndm": dict(_DEMO_EPD, lr=DEMO.plugin_lr),
            "amed": dict(_DEMO_AMED, lr=DEMO.amed_lr),
            "amed-ipndm": dict(_DEMO_AMED, lr=DEMO.amed_plugin_lr),
            "d-euler": dict(_DEMO_DODE), "d-ipndm": dict(_DEMO_DODE)}


# --------------------------------------------------------------------------------------
# running


def run(quick: bool, out_dir: pathlib.Path, params: Optional[dict] = None,
        params_dir: Optional[str] = None, distill: bool = False, samples: Optional[int] = None,
        nfes=NFES, models: Optional[Sequence[str]] = None,
        distill_settings: Optional[Dict[str, dict]] = None,
        demo_distilled: bool = False) -> dict:
    """Writes out_dir/solvers.json and solvers.png; returns the tables. `models`: names from
    `bench_models` (default all). `distill_settings`: solver -> keyword overrides of its
    `DISTILLED` fit (only with ``distill=True``). `demo_distilled` (what run.py asks for):
    with neither params nor ``distill``, fit every distilled solver on the `epd demo` model
    only, with the demo's settings (`DEMO_FIT`): every solver at equal latency."""
    if demo_distilled and not distill and not params and params_dir is None:
        distill = [DEFAULT_MODEL]
        distill_settings = {**DEMO_FIT, **(distill_settings or {})}
    unknown = sorted(set(distill_settings or {}) - set(DISTILLED))
    if unknown:
        raise ValueError(f"distill_settings: unknown solvers {unknown}; known: {list(DISTILLED)}")
    cfg = dict(QUICK if quick else FULL, quick=bool(quick))
    cfg["samples"] = int(cfg["samples"] if samples is None else samples)
    nfes = [int(n) for n in nfes]
    if cfg["samples"] < 1 or not nfes or min(nfes) < 1:
        raise ValueError(f"samples and nfes must be >= 1, got {samples!r} and {nfes!r}")
    # Tiny elementwise models and small U-Net batches: one thread avoids dispatch costs and
    # most of the noise from other processes (and is what `epd demo` picks when busy).
    with torch_threads(1):
        return _run(pathlib.Path(out_dir), cfg, params, params_dir, distill, nfes, models,
                    dict(distill_settings or {}))


def _time_calls(results, mname, calls, nfes, cfg):
    """Per NFE, one interleaved comparison of the solvers' calls of one model: the median
    goes to ``wall_time_s``, the spread to ``wall_stats_s``."""
    by_key = {(r["solver"], r["nfe"]): r for r in results if r["model"] == mname}
    for nfe in nfes:
        fns = {solver: fn for (solver, n), fn in calls.items() if n == nfe}
        if not fns:
            continue
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # backend notice
            stats = bench_interleaved(Timer(torch.device("cpu")), fns,
                                      repeats=cfg["time_repeats"], warmup=1)
        for solver, st in stats.items():
            row = by_key[(solver, nfe)]
            row["wall_time_s"] = st["median_s"]
            row["wall_stats_s"] = {k: st[k] for k in ("min_s", "q25_s", "q75_s", "repeats")}


def _run_model(bm, cfg, row_names, nfes, get_params, results, skipped) -> dict:
    """Every row of one model against its reference, then the timing; returns the
    reference's info."""
    seeds = range(cfg["samples"])
    noise = make_noise(seeds, bm.shape, dtype=bm.dtype)
    cond = bm.cond(seeds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a non-converged reference must be reported
        ref, info = bm.reference(bm.denoiser, noise, cond, cfg)
    info.update(warnings=sorted({str(w.message) for w in caught}), role=bm.role,
                class_labels="seed % num_classes" if cond else None,
                dtype=str(bm.dtype).replace("torch.", ""))
    calls = {}  # (solver, nfe) -> the call whose result was recorded, for timing
    for solver in row_names:
        for nfe in nfes:
            kw = {}
            try:
                if solver in DISTILLED:
                    kw["params"] = get_params(bm, solver, nfe)
                    if kw["params"] is None:
                        continue
                base, options = VARIANTS.get(solver, (solver, None))
                call = functools.partial(sample, bm.denoiser, noise, solver=base, nfe=nfe,
                                         options=options, **kw, **cond)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # backend notice
                    x, st = call(return_stats=True)
            except ValueError as e:  # a budget the solver cannot meet, mismatched params
                skipped.append(dict(model=bm.name, solver=solver, nfe=nfe, reason=str(e)))
                continue
            total, rmse = getattr(kw.get("params"), "total_evaluations", None), _rmse(x, ref)
            results.append(dict(model=bm.name, solver=solver, nfe=nfe, steps=st.steps,
                                latency_nfe=st.latency_nfe, total_evals=st.total_evals,
                                expected_total_evals=nfe if total is None else total, rmse=rmse,
                                relative_rmse=rmse / _rmse(ref, torch.zeros_like(ref)),
                                wall_time_s=None, finite=bool(torch.isfinite(x).all())))
            calls[(solver, nfe)] = call
    _time_calls(results, bm.name, calls, nfes, cfg)
    return info


def _run(out_dir, cfg, params, params_dir, distill, nfes, model_names, settings):
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    models = bench_models(model_names)
    notes, results, refs, skipped = [], [], {}, []
    want_distilled = bool(params) or params_dir is not None or distill
    row_names = SOLVERS + list(VARIANTS) + (list(DISTILLED) if want_distilled else [])

    def get_params(bm, solver, nfe):
        fit = distill if isinstance(distill, bool) else bm.name in distill
        return params_for(bm, solver, nfe, params, params_dir, fit, notes,
                          save_dir=out_dir / "distilled_params", overrides=settings.get(solver))

    for mname, bm in models.items():
        refs[mname] = _run_model(bm, cfg, row_names, nfes, get_params, results, skipped)
    _add_notes(notes, cfg, refs, results, skipped, params, params_dir, distill,
               want_distilled, settings)
    payload = dict(config=dict(cfg, nfes=list(nfes), sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN,
                               schedule="polynomial rho=7", models=list(models),
                               reference_solver=[REF_SOLVER, REF_NFE],
                               distill=distill if isinstance(distill, list) else bool(distill),
                               distill_settings=settings,
                               torch=torch.__version__, threads=torch.get_num_threads()),
                   reference=refs, results=results, skipped=skipped, notes=notes,
                   seconds=time.perf_counter() - t_start)
    (out_dir / "solvers.json").write_text(json.dumps(payload, indent=2))
    out = dict(tables=_tables(models, results, nfes, row_names, cfg), notes=notes,
               results=results, reference=refs, skipped=skipped)
    if _plot(results, list(models), nfes, row_names, out_dir / "solvers.png"):
        out["plot"] = "solvers.png"
    return out


def _reference_notes(refs, results) -> list:
    notes = []
    for mname, info in refs.items():
        best = min((r["rmse"] for r in results if r["model"] == mname), default=math.inf)
        head = mname + (f" ({info['role']})" if info.get("role") else "")
        if info["method"] == "closed form":
            extra = (f" (the ODE solver used for the mixture is off by "
                     f"{info['ode_solver_max_abs_error']:.1e} here)"
                     if "ode_solver_max_abs_error" in info else "")
            notes.append(f"{head}: reference = closed form{extra}")
            continue
        if "max_abs_change_vs_rtol_x100" in info:
            text = (f"it moves by {info['max_abs_change_vs_rtol_x100']:.1e} with a 100x looser "
                    f"tolerance")
        else:
            text = f"estimated error {info['error_estimate']:.1e} ({info['error_check']})"
        labels = ", class labels = seed % 10" if info.get("class_labels") else ""
        notes += [f"WARNING: {mname}: reference: {w}" for w in info.get("warnings", [])]
        notes.append(f"{head}: {info['dtype']}{labels}; reference = {info['method']} "
                     f"({info['seconds']:.1f} s); {text}")
        if info["error_estimate"] > REF_TOLERANCE * best:
            notes.append(f"WARNING: {mname}: the reference error estimate "
                         f"{info['error_estimate']:.1e} is not far below the smallest RMSE "
                         f"{best:.1e}; the smallest RMSEs partly measure the reference")
    return notes


def _add_notes(notes, cfg, refs, results, skipped, params, params_dir, distill, want,
               settings):
    if params or params_dir is not None:
        notes.append("distilled rows: parameters supplied"
                     + (f" from {params_dir}" if params_dir is not None else "")
                     + " (rows missing where no file matched)")
    if isinstance(distill, list):
        notes.append(f"distilled rows fitted here on {', '.join(distill)} only, with the short "
                     "runs of `epd demo` (the `distill` section fits with the library defaults "
                     f"and checks the bars); settings: {settings}")
    elif distill:
        notes.append("distilled rows fitted here with the library defaults: EPD / EPD-Plugin "
                     "by epd_kernels.distill (K=2, teacher dpm2, AFS; class-conditional "
                     "models: one label per pool entry), D-ODE by fit_dode (batch "
                     f"{DODE_BATCH}); saved in distilled_params/ for --params-dir"
                     + (f"; settings changed: {settings}" if settings else ""))
    if not want:
        notes.append(f"Distilled rows ({', '.join(DISTILLED)}) come with --distill, or "
                     "--params-dir with <model>-<solver>-nfe<N>.safetensors files.")
    notes += _reference_notes(refs, results)
    bad = [r for r in results if r["latency_nfe"] != r["nfe"]
           or r["total_evals"] != r["expected_total_evals"]]
    notes.append(f"{cfg['samples']} samples per model, polynomial grid rho=7 from "
                 f"{SIGMA_MAX:g} to {SIGMA_MIN:g}; AFS on for heun/dpm2 (odd budgets), off "
                 f"for the others; latency NFE and total evaluations measured by sample(): "
                 + ("all as expected (latency = budget; total = budget, EPD: (K+1) steps - 1)"
                    if not bad else f"{len(bad)} MISMATCHES")
                 + f"; wall time: median of {cfg['time_repeats']} runs of the whole batch, "
                 f"the solvers of one model and NFE timed interleaved in rotating order "
                 f"(benchmarks/timing.py; min and quartiles in the JSON), 1 thread")
    notes += [f"MISMATCH: {r['model']} {r['solver']} nfe={r['nfe']}: latency "
              f"{r['latency_nfe']}, total {r['total_evals']} (expected "
              f"{r['expected_total_evals']})" for r in bad]
    notes += [f"NON-FINITE: {r['model']} {r['solver']} nfe={r['nfe']}" for r in results
              if not r["finite"] or not math.isfinite(r["rmse"])]
    notes += [f"skipped {s['model']} {s['solver']} nfe={s['nfe']}: {s['reason']}"
              for s in skipped]


def _tables(models, results, nfes, row_names, cfg):
    rmse_tables, cost_tables = [], []
    for mname, bm in models.items():
        rows = []
        for solver in row_names:
            cells = {r["nfe"]: r for r in results if r["model"] == mname and r["solver"] == solver}
            if cells:
                rows.append({"solver": solver, **{f"NFE {n}": f"{cells[n]['rmse']:.3e}"
                                                  if n in cells else None for n in nfes}})
        role = f" ({bm.role})" if bm.role else ""
        rmse_tables.append(dict(title=f"RMSE vs reference at sigma_min, {mname}{role}; "
                                      f"global RMS over all elements",
                                columns=["solver"] + [f"NFE {n}" for n in nfes], rows=rows))
        if bm.cost_table:
            order = {s: i for i, s in enumerate(row_names)}
            mine = sorted((r for r in results if r["model"] == mname),
                          key=lambda r: (r["nfe"], order[r["solver"]]))
            cost_tables.append(dict(
                title=f"{mname}: latency NFE, total evaluations, RMSE and wall time per solver "
                      f"and NFE ({cfg['samples']} samples in one call, median of "
                      f"{cfg['time_repeats']} interleaved runs, 1 thread)",
                columns=["solver", "NFE", "latency NFE", "total evals", "RMSE", "wall ms"],
                rows=[{"solver": r["solver"], "NFE": r["nfe"], "latency NFE": r["latency_nfe"],
                       "total evals": r["total_evals"], "RMSE": f"{r['rmse']:.3e}",
                       "wall ms": f"{1e3 * r['wall_time_s']:.1f}"} for r in mine]))
    return rmse_tables + cost_tables


def _plot(results, model_names, nfes, row_names, path: pathlib.Path):
    """Log-y RMSE vs NFE, one panel per model, a line per solver (variants dashed)."""
    panels = []
    for mname in model_names:
        series = []
        for solver in row_names:
            pts = sorted((r["nfe"], r["rmse"]) for r in results
                         if r["model"] == mname and r["solver"] == solver)
            if pts:
                series.append(dict(label=solver, x=[a for a, _ in pts], y=[b for _, b in pts],
                                   linestyle="--" if solver in VARIANTS else "-"))
        panels.append(dict(title=mname, xlabel="latency NFE", ylabel="RMSE vs reference",
                           series=series, xticks=nfes))
    return error_panels(path, panels, ncols=min(2, len(panels)))


if __name__ == "__main__":
    sys.exit(section_main("solvers", run, [
        ("--params-dir", {}), ("--distill", dict(action="store_true")),
        ("--samples", dict(type=int)), "--nfes",
        ("--models", dict(type=str_list, help=f"subset of {','.join(model_names())}"))]))
