#!/usr/bin/env python
"""Benchmark section `speedup`: the NFE each baseline solver needs to match distilled EPD.

For each embedded model (`epd_kernels.models.registry`: ``gmm``, the 64-dim Gaussian
mixture, unconditional; ``gaussian``, the 64-dim Gaussian; ``digits-unet``, the trained
digits U-Net of ``epd demo``, unconditional: it was trained with 10% label dropout) and
each baseline solver of the package (`BASELINES`):

1. the baseline's error-vs-NFE curve: its RMSE at every latency NFE it can meet up to
   `MAX_NFE` (40) with its default settings (one call per step: every budget; Heun and
   DPM-Solver-2 with the analytic first step: the odd budgets). A budget `sample` refuses
   is recorded with its reason in the JSON;
2. EPD distilled at NFE 3, 5 and 7 by ``distill(D, nfe=n, shape=D.shape)`` with the
   library's defaults (the analytic models are distilled on a float32 copy, as `distill`
   computes its states in float32 by default, and evaluated in float64), and its RMSE;
3. per (model, baseline, EPD NFE), the NFE the baseline needs to reach EPD's RMSE
   (`match_nfe`: linear interpolation of log RMSE against NFE between the two budgets
   that bracket EPD's RMSE; "> 40" when no budget up to 40 reaches it; on a curve that is
   not monotone the first crossing, marked), and the speedup = that NFE / EPD's NFE.

RMSE: one global RMS over all samples and elements, ``sqrt(mean((x - ref)^2))``, of the
state at sigma_min against a many-step reference from the same noise (`REF_SOLVER` at
`REF_NFE` latency NFE, in the model's dtype; its error is estimated from the same solver
at half the budget, and on the Gaussian also measured against the closed form). The noise
is ``make_noise(TEST_SEED + i)``: held out from the distillation's training noise.

Quick form (``quick=True``): fewer samples and a short distillation (`QUICK_DISTILL`, not
the defaults; the table title says so), every model unless ``models`` says otherwise.

Output: out_dir/speedup.json (everything, read by `plot_from_json`), out_dir/speedup.png
(log RMSE vs NFE per baseline with EPD's points, one panel per model), and the tables; the
first table is the README block ``<!-- speedup:start -->`` ... ``<!-- speedup:end -->``.

    python benchmarks/bench_speedup.py [--quick] [--models gaussian] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import pathlib
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from epd_kernels import distill, make_noise, sample  # noqa: E402
from epd_kernels.models.registry import load_model  # noqa: E402

MODELS = ("gmm", "gaussian", "digits-unet")
MODEL_TEXT = {"gmm": "64-dim Gaussian mixture (gmm)", "gaussian": "64-dim Gaussian (gaussian)",
              "digits-unet": "digits U-Net (digits-unet)"}
BASELINES = ("euler", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis")
EPD_NFES = (3, 5, 7)
MAX_NFE = 40
REF_SOLVER, REF_NFE = "unipc", 320
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002   # sample()'s default grid (polynomial, rho = 7)
TEST_SEED = 10 ** 6
FULL = dict(samples=256)
QUICK = dict(samples=64)
#: The quick form's short distillation (the full form uses the library's defaults).
QUICK_DISTILL = dict(iterations=60, pool=256)
#: Baseline RMSE columns of the per-model curve tables (odd: every baseline meets them).
CURVE_COLUMNS = (3, 5, 7, 9, 15, 21, 31, 39)
#: A reference whose estimated error exceeds this fraction of EPD's smallest RMSE is
#: flagged: the crossings would then partly measure the reference.
REF_TOLERANCE = 0.01


# --------------------------------------------------------------------------------------
# the interpolation


def match_nfe(curve: Dict[int, float], target: float, max_nfe: int = MAX_NFE) -> dict:
    """The NFE at which an error-vs-NFE ``curve`` (budget -> error > 0) first reaches
    ``target``.

    Between the two measured budgets that bracket the first crossing, log(error) is
    interpolated linearly in NFE. Returns ``{"nfe": float or None, "status", "monotone",
    "crossings"}``; status is "crossed" (interpolated), "at first budget" (the smallest
    budget already reaches the target: ``nfe`` is that budget, an upper bound), or
    "not reached" (no budget up to ``max_nfe`` reaches it: ``nfe`` is None, "> max_nfe").
    ``monotone`` says whether the error decreases at every budget step up to the first
    budget at or below the target (the part of the curve the answer depends on; the whole
    curve when it is not reached); ``crossings`` counts the downward crossings of
    ``target`` (more than one: the curve rises above it again after the first, which is
    the one used). A non-finite error counts as above every target.
    """
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"target must be a finite error > 0, got {target!r}")
    pts = sorted((int(n), float(e)) for n, e in curve.items() if int(n) <= max_nfe)
    if not pts:
        raise ValueError(f"curve: no budget <= {max_nfe}")
    for n, e in pts:
        if not e > 0 and not math.isnan(e):
            raise ValueError(f"curve: error at NFE {n} must be > 0 (log scale), got {e!r}")
    errs = [e if math.isfinite(e) else math.inf for _, e in pts]
    below = [e <= target for e in errs]
    i = below.index(True) if any(below) else len(errs) - 1
    monotone = all(b < a for a, b in zip(errs[:i + 1], errs[1:i + 1]))
    crossings = int(below[0]) + sum(1 for a, b in zip(below, below[1:]) if b and not a)
    out = dict(monotone=monotone, crossings=crossings)
    if below[0]:
        return dict(out, nfe=float(pts[0][0]), status="at first budget")
    if not any(below):
        return dict(out, nfe=None, status="not reached")
    (n0, _), (n1, _) = pts[i - 1], pts[i]
    e0, e1 = errs[i - 1], errs[i]
    if math.isinf(e0):   # no log to interpolate from: the budget that reaches it
        return dict(out, nfe=float(n1), status="crossed")
    frac = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
    return dict(out, nfe=n0 + frac * (n1 - n0), status="crossed")


def speedup_cell(match: dict, epd_nfe: int, max_nfe: int = MAX_NFE) -> str:
    """"9.4 (3.13x)", "> 40 (> 13.33x)", "<= 1 (<= 0.33x)"; a trailing "*" marks a curve
    that is not monotone up to the crossing or crosses the target more than once."""
    mark = "" if match["monotone"] and match["crossings"] <= 1 else "*"
    if match["status"] == "not reached":
        return f"> {max_nfe} (> {max_nfe / epd_nfe:.2f}x){mark}"
    n = match["nfe"]
    if match["status"] == "at first budget":
        return f"<= {n:g} (<= {n / epd_nfe:.2f}x){mark}"
    return f"{n:.1f} ({n / epd_nfe:.2f}x){mark}"


def best_match(matches: Dict[str, dict]) -> tuple:
    """(baseline, match) of the baseline that needs the fewest NFE (the hardest one to
    beat); a baseline that never reaches EPD's error ranks last."""
    def key(item):
        m = item[1]
        return math.inf if m["nfe"] is None else m["nfe"]
    return min(matches.items(), key=key)


# --------------------------------------------------------------------------------------
# measuring


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Global RMS over all samples and elements (the one RMSE of the benchmarks)."""
    return float((x.double() - ref.double()).pow(2).mean().sqrt())


def _dtype(model) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def reference(name: str, model, noise: torch.Tensor) -> tuple:
    """(reference state at sigma_min, info): `REF_SOLVER` at `REF_NFE`, its error
    estimated against half the budget (third order: error(n/2) ~ 8 error(n), so
    RMSE(half, ref) / 7), and for a model with a closed form also measured."""
    t0 = time.perf_counter()
    ref = sample(model, noise, solver=REF_SOLVER, nfe=REF_NFE)
    seconds = time.perf_counter() - t0
    half = sample(model, noise, solver=REF_SOLVER, nfe=REF_NFE // 2)
    info = dict(method=f"{REF_SOLVER} at NFE {REF_NFE}, {str(noise.dtype).replace('torch.', '')}",
                seconds=seconds, error_estimate=_rmse(half, ref) / 7.0,
                error_check=f"RMSE to NFE {REF_NFE // 2} / 7 (third order)")
    if hasattr(model, "exact_solution"):
        exact = model.exact_solution(noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)
        info["rmse_to_closed_form"] = _rmse(ref, exact)
    return ref, info


def baseline_curve(model, noise, ref, solver: str, max_nfe: int, say,
                   progress: bool = False) -> tuple:
    """({nfe: rmse} for every budget up to max_nfe that `solver` meets, {nfe: reason} for
    the refused ones). A solver that meets no budget at all is an error."""
    from tqdm.auto import tqdm

    curve, refused = {}, {}
    for n in tqdm(range(1, max_nfe + 1), desc=f"{solver} NFE 1..{max_nfe}", leave=False,
                  disable=not progress):
        try:
            x = sample(model, noise, solver=solver, nfe=n)
        except ValueError as e:   # a budget the solver cannot meet (e.g. even for Heun)
            refused[n] = str(e)
            continue
        curve[n] = _rmse(x, ref)
    if not curve:
        raise RuntimeError(f"baseline {solver!r} met no budget in 1..{max_nfe}: "
                           f"{next(iter(refused.values()))}")
    say(f"{solver}: {len(curve)} budgets, RMSE {curve[min(curve)]:.3g} at NFE {min(curve)} "
        f"-> {curve[max(curve)]:.3g} at NFE {max(curve)}")
    return curve, refused


def distill_epd(model, noise, ref, nfe: int, kw: dict, progress: bool) -> dict:
    """Distils EPD at `nfe` (float32 copy of a float64 model) and evaluates it."""
    student = model if _dtype(model) == torch.float32 else \
        copy.deepcopy(model).to(torch.float32)
    t0 = time.perf_counter()
    params = distill(student, nfe=nfe, shape=tuple(model.shape), progress=progress, **kw)
    wall = time.perf_counter() - t0
    x, st = sample(model, noise, solver="epd", params=params, return_stats=True)
    if st.latency_nfe != nfe:
        raise RuntimeError(f"EPD distilled for NFE {nfe} spent latency {st.latency_nfe}")
    return dict(rmse=_rmse(x, ref), distill_s=wall, latency_nfe=st.latency_nfe,
                total_evals=st.total_evals, num_points=getattr(params, "num_points", None))


# --------------------------------------------------------------------------------------
# the section


def run(quick: bool, out_dir: pathlib.Path, *, models: Optional[Sequence[str]] = None,
        nfes: Sequence[int] = EPD_NFES, baselines: Sequence[str] = BASELINES,
        max_nfe: int = MAX_NFE, samples: Optional[int] = None,
        distill_kw: Optional[dict] = None, time_budget_s: Optional[float] = None,
        threads: Optional[int] = None, verbose: bool = True) -> dict:
    """Runs the section; writes out_dir/speedup.json and speedup.png; returns the tables.

    `distill_kw`: keyword arguments for every `distill` call (default: none in the full
    form, `QUICK_DISTILL` in the quick form); `time_budget_s` is passed to `distill` (an
    error if this `distill` has no such keyword). `threads`: torch CPU threads (default 1,
    restored after)."""
    cfg = _config(quick, models, nfes, baselines, max_nfe, samples, distill_kw, time_budget_s)
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads or 1))
    try:
        return _run(pathlib.Path(out_dir), cfg, verbose)
    finally:
        torch.set_num_threads(saved)


def _config(quick, models, nfes, baselines, max_nfe, samples, distill_kw, time_budget_s):
    models = list(models or MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"models: unknown {unknown}; known: {list(MODELS)}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad or not baselines:
        raise ValueError(f"baselines: need a non-empty subset of {list(BASELINES)}, got "
                         f"{list(baselines)}")
    nfes = [int(n) for n in nfes]
    if not nfes or any(n < 1 or n > max_nfe for n in nfes):
        raise ValueError(f"nfes: EPD budgets in 1..{max_nfe}, got {nfes}")
    cfg = dict(QUICK if quick else FULL, quick=bool(quick), models=models, nfes=nfes,
               baselines=list(baselines), max_nfe=int(max_nfe))
    if samples is not None:
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples!r}")
        cfg["samples"] = int(samples)
    kw = dict(QUICK_DISTILL if quick and distill_kw is None else (distill_kw or {}))
    if time_budget_s is not None:
        if "time_budget_s" not in inspect.signature(distill).parameters:
            raise ValueError("time_budget_s: this epd_kernels.distill has no time_budget_s "
                             "keyword")
        if not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {time_budget_s!r}")
        kw["time_budget_s"] = float(time_budget_s)
    cfg["distill_kw"] = kw
    return cfg


def _run(out_dir: pathlib.Path, cfg: dict, verbose: bool) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    say = (lambda *a: print("[speedup]", *a, flush=True)) if verbose else (lambda *a: None)
    data = dict(section="speedup", config=dict(cfg, reference=[REF_SOLVER, REF_NFE],
                                               test_seed=TEST_SEED, threads=torch.get_num_threads(),
                                               torch=torch.__version__),
                references={}, curves={}, refused={}, epd={}, matches={})
    for name in cfg["models"]:
        _measure_model(name, cfg, data, say, verbose)
        # written after every model, so a crash or an interrupt keeps what was measured
        data.update(elapsed_s=time.perf_counter() - t_start,
                    complete=name == cfg["models"][-1])
        data["tables"] = tables(data)
        data["notes"] = notes(data)
        tmp = out_dir / "speedup.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out_dir / "speedup.json")
    plot = plot_from_json(out_dir / "speedup.json", out_dir / "speedup.png")
    result = dict(data, readme={"block": "speedup", "table": 0,
                                "notes": readme_notes(data)})
    if plot:
        result["plot"] = plot
    return result


def _measure_model(name: str, cfg: dict, data: dict, say, verbose: bool) -> None:
    model = load_model(name)
    dtype = _dtype(model)
    noise = make_noise(range(TEST_SEED, TEST_SEED + cfg["samples"]), tuple(model.shape),
                       dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # reference-backend notice
        say(f"{name}: reference ({REF_SOLVER} at NFE {REF_NFE} and {REF_NFE // 2}, "
            f"{cfg['samples']} samples)")
        ref, info = reference(name, model, noise)
        say(f"{name}: reference {info['method']} ({info['seconds']:.1f} s), estimated error "
            f"{info['error_estimate']:.2e}")
        data["references"][name] = info
        curves, refused = {}, {}
        for solver in cfg["baselines"]:
            curves[solver], refused[solver] = baseline_curve(
                model, noise, ref, solver, cfg["max_nfe"], say, progress=verbose)
    epd = {}
    for nfe in cfg["nfes"]:
        say(f"{name}: distilling EPD at NFE {nfe} ({cfg['distill_kw'] or 'defaults'})")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")   # distill's warnings go to the notes
            epd[nfe] = distill_epd(model, noise, ref, nfe, cfg["distill_kw"], verbose)
        epd[nfe]["warnings"] = sorted({str(w.message) for w in caught
                                       if not issubclass(w.category, RuntimeWarning)})
        say(f"{name}: EPD NFE {nfe}: RMSE {epd[nfe]['rmse']:.3g} "
            f"(distilled in {epd[nfe]['distill_s']:.1f} s)")
    data["curves"][name] = {s: {str(n): e for n, e in c.items()} for s, c in curves.items()}
    data["refused"][name] = {s: sorted(r) for s, r in refused.items() if r}
    data["refusal_reasons"] = {s: next(iter(r.values())) for s, r in refused.items() if r}
    data["epd"][name] = {str(n): r for n, r in epd.items()}
    data["matches"][name] = {
        str(n): {s: match_nfe(c, epd[n]["rmse"], cfg["max_nfe"]) for s, c in curves.items()}
        for n in cfg["nfes"]}


# --------------------------------------------------------------------------------------
# tables, notes, plot


def _distill_text(cfg: dict) -> str:
    kw = cfg["distill_kw"]
    if not kw:
        return "distill's defaults"
    text = ", ".join(f"{k}={v}" for k, v in kw.items())
    return f"quick form: distill with {text}, NOT the defaults" if cfg["quick"] else \
        f"distill with {text}"


def _rmse_text(cfg: dict) -> str:
    return (f"RMSE = global RMS over all elements, sqrt(mean((x - ref)^2)), against a "
            f"{REF_SOLVER} NFE-{REF_NFE} reference from the same {cfg['samples']} noises")


def tables(data: dict) -> List[dict]:
    """The headline table (NFE each baseline needs, speedup), EPD's own figures, and one
    table of baseline RMSEs per model."""
    cfg = data["config"]
    nfes = cfg["nfes"]
    done = list(data["matches"])   # the models measured (all, unless interrupted)
    rows = []
    for name in done:
        by_nfe = data["matches"][name]
        for solver in cfg["baselines"]:
            rows.append([MODEL_TEXT[name], solver]
                        + [speedup_cell(by_nfe[str(n)][solver], n, cfg["max_nfe"]) for n in nfes])
        best = [best_match(by_nfe[str(n)]) for n in nfes]
        rows.append([MODEL_TEXT[name], "best baseline"]
                    + [f"{s}: {speedup_cell(m, n, cfg['max_nfe'])}"
                       for (s, m), n in zip(best, nfes)])
    head = dict(title=f"Equal-quality speedup of EPD ({_distill_text(cfg)}): the NFE a "
                      f"baseline needs to match EPD's RMSE (interpolated in log RMSE vs NFE), "
                      f"and NFE / EPD's NFE; {_rmse_text(cfg)}",
                columns=["model", "baseline"] + [f"EPD NFE {n}" for n in nfes], rows=rows)
    epd_rows = [[MODEL_TEXT[name]] + [f"{data['epd'][name][str(n)]['rmse']:.3e}" for n in nfes]
                + [f"{data['epd'][name][str(n)]['distill_s']:.1f}" for n in nfes]
                for name in done]
    epd_table = dict(title=f"EPD's RMSE and distillation wall time ({_distill_text(cfg)}, "
                           f"{cfg['threads']} thread(s)); {_rmse_text(cfg)}",
                     columns=["model"] + [f"RMSE NFE {n}" for n in nfes]
                     + [f"distill s NFE {n}" for n in nfes], rows=epd_rows)
    out = [head, epd_table]
    cols = [n for n in CURVE_COLUMNS if n <= cfg["max_nfe"]]
    for name in done:
        curve_rows = [[s] + [_fmt(data["curves"][name][s].get(str(n))) for n in cols]
                      for s in cfg["baselines"]]
        curve_rows.append(["EPD"] + [_fmt(data["epd"][name].get(str(n), {}).get("rmse"))
                                     for n in cols])
        out.append(dict(title=f"{MODEL_TEXT[name]}: baseline RMSE at selected NFE (the full "
                              f"curves are in speedup.json); {_rmse_text(cfg)}",
                        columns=["solver"] + [f"NFE {n}" for n in cols], rows=curve_rows))
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3e}"


def readme_notes(data: dict) -> List[str]:
    cfg = data["config"]
    return [f"Cells: the NFE the baseline needs to reach EPD's RMSE at the column's NFE "
            f"(linear in log RMSE between the two measured budgets around it) and, in "
            f"brackets, that NFE / EPD's NFE. \"> {cfg['max_nfe']}\": not reached by NFE "
            f"{cfg['max_nfe']}. \"*\": the baseline's RMSE is not monotone in NFE up to "
            f"there, or crosses EPD's RMSE more than once; the first crossing is used.",
            _budgets_text(data) + " Models run unconditionally."]


def _budgets_text(data: dict) -> str:
    """Which budgets the curves hold, read from what sample() refused."""
    refused = {s: set(r) for per_model in data["refused"].values() for s, r in per_model.items()}
    if not refused:
        return f"Every baseline meets every budget 1..{data['config']['max_nfe']}."
    evens = set(range(2, data["config"]["max_nfe"] + 1, 2))
    parts = [f"{s}: " + ("odd budgets only" if r == evens else f"{len(r)} budgets refused")
             for s, r in sorted(refused.items())]
    return (f"{'; '.join(parts)} (with their default analytic first step); the other "
            f"baselines every budget 1..{data['config']['max_nfe']}.")


def notes(data: dict) -> List[str]:
    cfg = data["config"]
    out = readme_notes(data)
    for name, info in data["references"].items():
        text = (f"{name}: reference {info['method']} ({info['seconds']:.1f} s), estimated "
                f"error {info['error_estimate']:.1e} ({info['error_check']})")
        if "rmse_to_closed_form" in info:
            text += f"; RMSE to the closed-form solution {info['rmse_to_closed_form']:.1e}"
        out.append(text)
        smallest = min(r["rmse"] for r in data["epd"][name].values())
        err = max(info["error_estimate"], info.get("rmse_to_closed_form", 0.0))
        if err > REF_TOLERANCE * smallest:
            out.append(f"WARNING: {name}: the reference error {err:.1e} is not far below "
                       f"EPD's smallest RMSE {smallest:.1e}; the crossings partly measure "
                       f"the reference")
    for name, by_nfe in data["epd"].items():
        for n, r in by_nfe.items():
            for w in r.get("warnings", []):
                out.append(f"{name}, EPD NFE {n}: distill warned: {w}")
    for s, reason in data.get("refusal_reasons", {}).items():
        out.append(f"{s}: the budgets sample() refuses are left out of its curve "
                   f"({reason.split(';')[0]})")
    for name, curves in data["curves"].items():
        for s, c in curves.items():
            pts = sorted((int(n), e) for n, e in c.items())
            rises = [f"{a}->{b}" for (a, ea), (b, eb) in zip(pts, pts[1:]) if not eb < ea]
            if rises:
                more = f" and {len(rises) - 6} more" if len(rises) > 6 else ""
                out.append(f"{name}, {s}: RMSE not monotone in NFE, rises at NFE "
                           f"{', '.join(rises[:6])}{more}")
        for n, ms in data["matches"][name].items():
            again = [s for s, m in ms.items() if m["crossings"] > 1]
            if again:
                out.append(f"{name}, EPD NFE {n}: {', '.join(again)} cross EPD's RMSE more "
                           f"than once; the first crossing is used")
    if not data.get("complete", True):
        missing = [m for m in cfg["models"] if m not in data["matches"]]
        out.insert(0, f"INCOMPLETE: not measured (yet): {', '.join(missing)}")
    out.append(f"{cfg['samples']} held-out noises per model (seeds {TEST_SEED}..); EPD "
               f"distilled with {_distill_text(cfg)} on a float32 copy of float64 models; "
               f"{cfg['threads']} torch thread(s); section wall time {data['elapsed_s']:.1f} s")
    return out


def plot_from_json(json_path: pathlib.Path, png_path: pathlib.Path) -> Optional[str]:
    """The plot of a speedup.json: log RMSE vs NFE, one line per baseline and EPD's points,
    one panel per model. Returns the PNG's file name, or None without matplotlib."""
    from benchmarks.plot import error_panels

    data = json.loads(pathlib.Path(json_path).read_text())
    panels = []
    for name in data["matches"]:
        series = []
        for s, c in data["curves"][name].items():
            pts = sorted((int(n), e) for n, e in c.items())
            series.append({"label": s, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        epd = sorted((int(n), r["rmse"]) for n, r in data["epd"][name].items())
        # from NFE 3 on: the 1-NFE errors of Heun / DPM-Solver-2 would squash the rest
        shown = [e for c in data["curves"][name].values() for n, e in c.items()
                 if int(n) >= 3 and math.isfinite(e)] + [e for _, e in epd]
        panels.append({"title": MODEL_TEXT.get(name, name), "xlabel": "latency NFE",
                       "ylim": (0.5 * min(shown), 2.0 * max(shown)),
                       "ylabel": "RMSE vs reference (global RMS)", "series": series,
                       "points": [{"label": "EPD (distilled)", "x": [p[0] for p in epd],
                                   "y": [p[1] for p in epd]}]})
    written = error_panels(png_path, panels, title="Error vs NFE: baselines and distilled EPD")
    return pathlib.Path(png_path).name if written else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    res = run(args.quick, pathlib.Path(args.out), samples=args.samples, threads=args.threads,
              models=args.models.split(",") if args.models else None)
    for t in res["tables"]:
        print(t["title"])
        for r in [t["columns"]] + t["rows"]:
            print("  ".join(str(c) for c in r))
        print()
    for n in res["notes"]:
        print(" *", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
