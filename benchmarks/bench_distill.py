#!/usr/bin/env python
"""Benchmark section `distill`: `distill` with its defaults against every baseline.

Per model of `MODELS` and NFE of `NFES`: EPD from ``distill(D, nfe=n, shape=D.shape)``
alone (timed; analytic models distilled on a float32 copy, scored in float64); every
baseline of `BASELINES` at every NFE it meets up to `MAX_NFE` on the default grid (its
error-vs-NFE curve); then EPD's RMSE over the best baseline's at the same NFE and the
equal-quality speedup: the NFE the best baseline needs to reach EPD's RMSE (`match_nfe`:
log RMSE linear in NFE) over EPD's. The distillation issue's bars are marked PASS / MISS.

RMSE: one global RMS over all samples and elements, ``sqrt(mean((x - ref)^2))``, of the
state at sigma_min against `REF_SOLVER` at `REF_NFE` from the same noise
(``make_noise(TEST_SEED + i)``, never seen by the distillation; `SAMPLES` per model,
`MODEL_SAMPLES` where that is too costly). Per cell, the outlier draws of EPD and of the
best baseline (`tail`): on the mixtures a draw near a boundary between components can end
in the other one, and a few such draws can carry most of the squared error. ``--quick``:
two small models, NFE 5, 64 samples, curves to NFE 12, a short distillation
(`QUICK_DISTILL`).

    python benchmarks/bench_distill.py [--quick] [--models gaussian,skewed-16] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
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
from epd_kernels.models import GaussianMixtureModel  # noqa: E402
from epd_kernels.models.registry import load_model  # noqa: E402
from epd_kernels.distill.verdict import (  # noqa: E402
    OUTLIER_FACTOR, draw_errors, outlier_draws)

F64 = torch.float64


def mixture(dim: int, components: int = 8, seed: int = 0) -> GaussianMixtureModel:
    """A mixture no default was chosen on: unequal weights (1:12), a scale per component
    and per dimension (stds 0.05-1.0), means 1.5 N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(components, dim, generator=g, dtype=F64)
    stds = 0.05 + 0.95 * torch.rand(components, dim, generator=g, dtype=F64)
    return GaussianMixtureModel(means, stds, torch.linspace(1.0, 12.0, components, dtype=F64))


#: name -> (description, factory, NFE-5 wall-time bar in seconds)
MODELS = {
    "gaussian": ("64-dim Gaussian", lambda: load_model("gaussian"), 60),
    "gmm": ("64-dim mixture, 8 isotropic components", lambda: load_model("gmm"), 60),
    "skewed-16": ("16-dim skewed mixture, 4 components", lambda: mixture(16, 4, 11), 60),
    "mixture-128": ("128-dim skewed mixture", lambda: mixture(128, 8, 1), 60),
    "mixture-768": ("768-dim skewed mixture", lambda: mixture(768, 8, 2), 120),
    "digits-unet": ("digits U-Net (`epd demo`)", lambda: load_model("digits-unet"), 120),
}
BASELINES = ("euler", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis")
NFES = (3, 5, 7, 9)
MAX_NFE = 40
REF_SOLVER, REF_NFE = "unipc", 320
TEST_SEED = 10 ** 6
#: Held-out noises per model: 1024 where a model is cheap, since on the mixtures a few draws
#: near a boundary between components can carry most of a solver's squared error (see
#: `tail`), and 256 can miss them; the U-Net's reference and curves cost 4x more per draw.
SAMPLES = 1024
MODEL_SAMPLES = {"digits-unet": 256}
QUICK = dict(models=["gaussian", "skewed-16"], nfes=[5], samples=64, max_nfe=12)
#: The quick form's short distillation (the full form passes nothing: the defaults).
QUICK_DISTILL = dict(iterations=40, pool=256, time_budget_s=None, compare=False)
#: Baseline RMSE columns of the per-model tables.
CURVE_COLUMNS = (3, 5, 7, 9, 15, 21, 31, 39)
#: The bars: EPD / best baseline below 1 everywhere and at most 0.6 at NFE 5; equal-quality
#: speedup at NFE 5 of at least 2x on the U-Net.
RATIO_BAR, RATIO_BAR_NFE5, SPEEDUP_BAR = 1.0, 0.6, 2.0


# --------------------------------------------------------------------------------------
# equal quality


def match_nfe(curve: Dict[int, float], target: float, max_nfe: int = MAX_NFE) -> dict:
    """Where an error-vs-NFE ``curve`` first reaches ``target``: ``{"nfe", "status",
    "monotone", "crossings"}``. Status "crossed": log(error) interpolated linearly between
    the two budgets around the first crossing; "at first budget": the smallest budget
    already reaches it (``nfe`` an upper bound); "not reached" by ``max_nfe`` (``nfe``
    None). ``monotone``: the error falls at every step up to the crossing; ``crossings``:
    downward crossings of the target. A non-finite error is above every target."""
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"target must be a finite error > 0, got {target!r}")
    pts = sorted((int(n), float(e)) for n, e in curve.items() if int(n) <= max_nfe)
    if not pts:
        raise ValueError(f"curve: no budget <= {max_nfe}")
    if any(not e > 0 and not math.isnan(e) for _, e in pts):
        raise ValueError(f"curve: errors must be > 0 (log scale), got {pts}")
    errs = [e if math.isfinite(e) else math.inf for _, e in pts]
    below = [e <= target for e in errs]
    i = below.index(True) if any(below) else len(errs) - 1
    out = dict(monotone=all(b < a for a, b in zip(errs[:i + 1], errs[1:i + 1])),
               crossings=int(below[0]) + sum(b and not a for a, b in zip(below, below[1:])))
    if below[0]:
        return dict(out, nfe=float(pts[0][0]), status="at first budget")
    if not any(below):
        return dict(out, nfe=None, status="not reached")
    (n0, e0), (n1, e1) = (pts[i - 1][0], errs[i - 1]), (pts[i][0], errs[i])
    if math.isinf(e0):   # no log to interpolate from: the budget that reaches it
        return dict(out, nfe=float(n1), status="crossed")
    frac = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
    return dict(out, nfe=n0 + frac * (n1 - n0), status="crossed")


#: Paired bootstrap of the RMSE ratio: resamples and the central interval's level.
BOOTSTRAP_RESAMPLES, INTERVAL_LEVEL = 4000, 0.95


def ratio_interval(sq_a: torch.Tensor, sq_b: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                   level: float = INTERVAL_LEVEL, seed: int = 0) -> tuple:
    """Central ``level`` interval of RMSE(a) / RMSE(b) = sqrt(sum sq_a / sum sq_b) over
    draws resampled with replacement, the same draws for both (paired: both solvers ran
    from the same noises). Why: on the mixtures a handful of draws that end in another
    component carry most of a solver's squared error, so a ratio from 1024 draws can sit
    on either side of 1 by chance; the interval says when it does."""
    a, b = sq_a.to(torch.float64).reshape(-1), sq_b.to(torch.float64).reshape(-1)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"sq_a and sq_b must be per-draw errors of the same draws, got "
                         f"{tuple(sq_a.shape)} and {tuple(sq_b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return (math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (resamples, a.numel()), generator=g)
    ratio = (a[idx].sum(1) / b[idx].sum(1)).sqrt()
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(ratio, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return (float(lo), float(hi))


def speedup_text(match: dict, epd_nfe: int, max_nfe: int = MAX_NFE) -> str:
    """The baseline's NFE over EPD's: "3.13x", "> 13.33x" (not reached by ``max_nfe``),
    "<= 0.33x" (reached at its first budget); "*" marks a curve that is not monotone up
    to the crossing or crosses the target more than once."""
    mark = "" if match["monotone"] and match["crossings"] <= 1 else "*"
    if match["status"] == "not reached":
        return f"> {max_nfe / epd_nfe:.2f}x{mark}"
    prefix = "<= " if match["status"] == "at first budget" else ""
    return f"{prefix}{match['nfe'] / epd_nfe:.2f}x{mark}"


# --------------------------------------------------------------------------------------
# measuring


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    v = float((x.double() - ref.double()).pow(2).mean().sqrt())
    return v if math.isfinite(v) else math.inf


def _dtype(model) -> torch.dtype:
    """The model's floating dtype (its first tensor's; float32 for a model without any)."""
    return next((v.dtype for v in model.state_dict().values() if v.is_floating_point()),
                torch.float32)


def tail(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """How much of the global RMSE a few draws carry: `verdict.outlier_draws` (the same
    statistic `distill` records in ``meta["comparison"]["outlier_draws"]``)."""
    return outlier_draws(draw_errors(x, ref))


def samples_for(cfg: dict, name: str) -> int:
    """Held-out noises of model ``name``: the run's count, else the model's default."""
    return cfg["samples"] or MODEL_SAMPLES.get(name, SAMPLES)


def reference(model, noise: torch.Tensor) -> tuple:
    """(state at sigma_min, info): `REF_SOLVER` at `REF_NFE`, its error estimated as
    RMSE(half budget, ref) / 7 (third order), and measured where a closed form exists."""
    t0 = time.perf_counter()
    ref = sample(model, noise, solver=REF_SOLVER, nfe=REF_NFE)
    info = dict(method=f"{REF_SOLVER} at NFE {REF_NFE}, {str(noise.dtype)[6:]}",
                seconds=time.perf_counter() - t0,
                error_estimate=_rmse(sample(model, noise, solver=REF_SOLVER,
                                            nfe=REF_NFE // 2), ref) / 7.0)
    if hasattr(model, "exact_solution"):
        info["rmse_to_closed_form"] = _rmse(ref, model.exact_solution(noise * 80.0, 80.0, 0.002))
    return ref, info


def baseline_curve(model, noise, ref, solver: str, max_nfe: int) -> dict:
    """{nfe: rmse} for every budget up to ``max_nfe`` that ``solver`` meets (sample()
    refuses the others, e.g. even budgets for Heun with its analytic first step)."""
    curve = {}
    for n in range(1, max_nfe + 1):
        try:
            curve[n] = _rmse(sample(model, noise, solver=solver, nfe=n), ref)
        except ValueError:
            continue
    if not curve:
        raise RuntimeError(f"baseline {solver!r} met no budget in 1..{max_nfe}")
    return curve


def distill_epd(model, noise, ref, nfe: int, kw: dict, progress: bool) -> dict:
    """EPD distilled at ``nfe`` (on a float32 copy of a float64 model), timed and scored;
    with what the budget chose and what distill's own held-out check said."""
    student = copy.deepcopy(model).to(torch.float32) if _dtype(model) == F64 else model
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = distill(student, nfe=nfe, shape=tuple(model.shape), progress=progress, **kw)
    wall = time.perf_counter() - t0
    x, st = sample(model, noise, solver="epd", params=params, return_stats=True)
    if st.latency_nfe != nfe:
        raise RuntimeError(f"EPD distilled for NFE {nfe} spent latency {st.latency_nfe}")
    budget, check = params.meta.get("budget", {}), params.meta.get("comparison", {})
    sq = draw_errors(x, ref)
    return dict(rmse=_rmse(x, ref), tail=outlier_draws(sq), distill_s=wall, draw_sq=sq,
                total_evals=st.total_evals,
                chosen=budget.get("chosen"), schedule=budget.get("schedule"),
                estimated_s=budget.get("estimated_s"), kept=check.get("kept"),
                check_ratio=check.get("ratio"),
                warnings=sorted({str(w.message).split(". ")[0] for w in caught
                                 if not issubclass(w.category, RuntimeWarning)}))


# --------------------------------------------------------------------------------------
# the section


def run(quick: bool, out_dir: pathlib.Path, *, models: Optional[Sequence[str]] = None,
        nfes: Optional[Sequence[int]] = None, samples: Optional[int] = None,
        threads: Optional[int] = None, verbose: bool = True) -> dict:
    """Runs the section (module docstring); writes out_dir/distill.json and distill.png
    after every model, so an interrupted run keeps what it measured."""
    cfg = dict(models=list(MODELS), nfes=list(NFES), samples=None, max_nfe=MAX_NFE,
               distill_kw={}, quick=bool(quick))
    if quick:
        cfg.update(QUICK, distill_kw=dict(QUICK_DISTILL))
    cfg.update({k: list(v) for k, v in (("models", models), ("nfes", nfes)) if v})
    if samples:
        cfg["samples"] = int(samples)   # else QUICK's count, or None: per model (samples_for)
    unknown = [m for m in cfg["models"] if m not in MODELS]
    if unknown:
        raise ValueError(f"models: unknown {unknown}; known: {list(MODELS)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads or 1))
    cfg["threads"] = torch.get_num_threads()
    say = (lambda *a: print("[distill]", *a, flush=True)) if verbose else (lambda *a: None)
    data = dict(section="distill", config=cfg, references={}, curves={}, epd={})
    t_start = time.perf_counter()
    try:
        for name in cfg["models"]:
            _measure(name, cfg, data, say, verbose)
            data["elapsed_s"] = time.perf_counter() - t_start
            data["complete"] = name == cfg["models"][-1]
            tmp = out_dir / "distill.json.tmp"
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(out_dir / "distill.json")
    finally:
        torch.set_num_threads(saved)
    result = dict(data, tables=tables(data), notes=notes(data),
                  readme={"block": "headline", "table": 0, "notes": readme_notes(data)})
    png = plot(data, out_dir / "distill.png")
    if png:
        result["plot"] = png
    return result


def _measure(name: str, cfg: dict, data: dict, say, verbose: bool) -> None:
    model = MODELS[name][1]()
    dtype = _dtype(model)
    count = samples_for(cfg, name)
    noise = make_noise(range(TEST_SEED, TEST_SEED + count), tuple(model.shape), dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # missing-label and backend notices
        ref, data["references"][name] = reference(model, noise)
        data["references"][name]["samples"] = count
        say(f"{name}: reference {data['references'][name]['method']}, estimated error "
            f"{data['references'][name]['error_estimate']:.1e}")
        data["curves"][name] = {s: baseline_curve(model, noise, ref, s, cfg["max_nfe"])
                                for s in BASELINES}
    data["epd"][name] = {}
    for n in cfg["nfes"]:
        r = distill_epd(model, noise, ref, n, cfg["distill_kw"], verbose)
        epd_sq = r.pop("draw_sq")   # per-draw errors: kept out of the JSON
        best, _ = _best(data, name, n)
        if best is not None:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x_best = sample(model, noise, solver=best, nfe=n)
            best_sq = draw_errors(x_best, ref)
            r["best_tail"] = outlier_draws(best_sq)
            r["ratio_interval"] = list(ratio_interval(epd_sq, best_sq))
        data["epd"][name][n] = r
        say(f"{name}: EPD NFE {n}: RMSE {r['rmse']:.3g}, distilled in {r['distill_s']:.1f} s "
            f"({r['schedule']})")


# --------------------------------------------------------------------------------------
# tables, notes, plot


def _best(data: dict, name: str, n: int) -> tuple:
    """(baseline, its RMSE) of the best baseline at NFE ``n`` (None if none meets it)."""
    at_n = {s: c[n] for s, c in data["curves"][name].items() if n in c}
    return min(at_n.items(), key=lambda kv: kv[1]) if at_n else (None, math.inf)


def _cell(data: dict, name: str, n: int) -> dict:
    """Everything the tables say about one model and NFE: the best baseline at the same NFE
    (for the ratio) and the one that needs the fewest NFE to reach EPD (for the speedup)."""
    r, max_nfe = data["epd"][name][n], data["config"]["max_nfe"]
    best, best_rmse = _best(data, name, n)
    matches = {s: match_nfe(c, r["rmse"], max_nfe) for s, c in data["curves"][name].items()}
    fastest = min(matches, key=lambda s: math.inf if matches[s]["nfe"] is None
                  else matches[s]["nfe"])
    return dict(r, best=best, best_rmse=best_rmse, ratio=r["rmse"] / best_rmse,
                fastest=fastest, match=matches[fastest])


def _ints(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def _normalised(data: dict) -> dict:
    """JSON turns integer keys into strings; the tables want them back."""
    out = dict(data, epd={m: _ints(v) for m, v in data["epd"].items()})
    out["curves"] = {m: {s: _ints(c) for s, c in v.items()} for m, v in data["curves"].items()}
    return out


def _how(cfg: dict) -> str:
    kw = cfg["distill_kw"]
    return ("distill's defaults" if not kw else "quick form, NOT the defaults: distill with "
            + ", ".join(f"{k}={v}" for k, v in kw.items()))


def _samples_text(cfg: dict) -> str:
    if cfg["samples"]:
        return f"{cfg['samples']} per model"
    return f"{SAMPLES} per model, " + ", ".join(f"{m} {n}" for m, n in MODEL_SAMPLES.items())


def _rmse_text(cfg: dict) -> str:
    return (f"RMSE = global RMS over all elements, sqrt(mean((x - ref)^2)), against a "
            f"{REF_SOLVER} NFE-{REF_NFE} reference from the same held-out noises "
            f"({_samples_text(cfg)})")


def _tail_text(t: Optional[dict]) -> str:
    """"k (s %)": outlier draws and their share of the squared error."""
    return "-" if not t else f"{t['outliers']} ({100 * t['share']:.0f} %)"


def tables(data: dict) -> List[dict]:
    """The headline (EPD / best baseline, equal-quality speedup, distillation time per
    model and NFE), what the budget chose, and the baseline curves per model."""
    data = _normalised(data)
    cfg, done = data["config"], list(data["epd"])
    nfes = cfg["nfes"]
    head = [[MODELS[m][0]] + [_headline_cell(_cell(data, m, n), n, cfg["max_nfe"]) for n in nfes]
            for m in done]
    chosen = []
    for m in done:
        for n in nfes:
            c = _cell(data, m, n)
            picked = ", ".join(f"{k} {v}" for k, v in (c["chosen"] or {}).items())
            speed = f"{c['fastest']} {speedup_text(c['match'], n, cfg['max_nfe'])}"
            chosen.append([m, n, c["schedule"] or "-", picked or "-",
                           _num(c["estimated_s"], ".0f"), f"{c['distill_s']:.0f}",
                           c["kept"] or "-", _num(c["check_ratio"], ".2f"),
                           f"{c['rmse']:.3e}", f"{c['best']} {c['best_rmse']:.3e}",
                           _interval_text(c.get("ratio_interval")), speed,
                           f"{_tail_text(c.get('tail'))} / {_tail_text(c.get('best_tail'))}"])
    out = [dict(title=f"EPD ({_how(cfg)}) against the best baseline at the same NFE: RMSE "
                      f"ratio, equal-quality speedup, distillation seconds "
                      f"({cfg['threads']} thread); {_rmse_text(cfg)}",
                columns=["model"] + [f"NFE {n}" for n in nfes], rows=head),
           dict(title="What the budget chose, and distill's own held-out check",
                columns=["model", "NFE", "grid", "chosen", "estimated s", "wall s", "kept",
                         "own check ratio", "EPD RMSE", "best baseline RMSE",
                         f"ratio, {100 * INTERVAL_LEVEL:.0f} % interval", "speedup against",
                         "outlier draws: EPD / best baseline"],
                rows=chosen)]
    cols = [n for n in CURVE_COLUMNS if n <= cfg["max_nfe"]]
    for m in done:
        rows = [[s] + [_num(c.get(n), ".3e") for n in cols]
                for s, c in data["curves"][m].items()]
        rows.append(["EPD"] + [_num(data["epd"][m].get(n, {}).get("rmse"), ".3e") for n in cols])
        out.append(dict(title=f"{MODELS[m][0]}: RMSE at selected NFE; {_rmse_text(cfg)}",
                        columns=["solver"] + [f"NFE {n}" for n in cols], rows=rows))
    return out


def _headline_cell(c: dict, n: int, max_nfe: int) -> str:
    return (f"{c['ratio']:.2f} · {speedup_text(c['match'], n, max_nfe)} · "
            f"{c['distill_s']:.0f} s")


def _interval_text(iv) -> str:
    return "-" if not iv or any(math.isnan(v) for v in iv) else f"{iv[0]:.2f}-{iv[1]:.2f}"


def _bar_text(c: dict, bar: float) -> str:
    """"bar b", then the ratio's interval and whether it contains the bar (a cell decided
    by the draws rather than the solvers)."""
    iv = c.get("ratio_interval")
    text = _interval_text(iv)
    if text == "-":
        return f"bar {bar}"
    held = ", which contains the bar" if iv[0] <= bar <= iv[1] else ""
    return f"bar {bar}; {100 * INTERVAL_LEVEL:.0f} % interval {text}{held}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def bars(data: dict) -> List[str]:
    """PASS / MISS per bar of the distillation issue."""
    data = _normalised(data)
    out = []
    for m in data["epd"]:
        for n in data["config"]["nfes"]:
            c = _cell(data, m, n)
            bar = RATIO_BAR_NFE5 if n == 5 else RATIO_BAR
            verdict = "PASS" if c["ratio"] < bar or (n == 5 and c["ratio"] <= bar) else "MISS"
            line = (f"{verdict}: {m} NFE {n}: EPD / {c['best']} = {c['ratio']:.2f} "
                    f"({_bar_text(c, bar)})")
            if n == 5:
                limit = MODELS[m][2]
                line += (f"; distilled in {c['distill_s']:.0f} s "
                         f"({'PASS' if c['distill_s'] <= limit else 'MISS'}: bar {limit} s)")
                if m == "digits-unet":
                    nfe = c["match"]["nfe"]
                    sp = math.inf if nfe is None else nfe / n
                    line += (f"; speedup {sp:.2f}x against {c['fastest']} "
                             f"({'PASS' if sp >= SPEEDUP_BAR else 'MISS'}: bar {SPEEDUP_BAR}x)")
            out.append(line)
    return out


def readme_notes(data: dict) -> List[str]:
    cfg = data["config"]
    return [f"Cells: EPD's RMSE over the best baseline's at the same NFE (below 1: EPD is "
            f"better) · equal-quality speedup: the NFE the fastest baseline needs to reach "
            f"EPD's RMSE (log RMSE interpolated between its budgets; \">\": not by NFE "
            f"{cfg['max_nfe']}) over EPD's NFE · seconds `distill` took. Baselines: {', '.join(BASELINES)}, on the default grid.",
            *bars(data)]


def notes(data: dict) -> List[str]:
    cfg = data["config"]
    out = readme_notes(data)
    for name, info in data["references"].items():
        out.append(f"{name}: reference {info['method']} ({info['seconds']:.1f} s), estimated "
                   f"error {info['error_estimate']:.1e}"
                   + (f", {info['rmse_to_closed_form']:.1e} to the closed form"
                      if "rmse_to_closed_form" in info else ""))
    out.append(f"Ratio intervals: central {100 * INTERVAL_LEVEL:.0f} % of the RMSE ratio over "
               f"{BOOTSTRAP_RESAMPLES} resamples of the held-out draws with replacement, the "
               f"same draws for EPD and the best baseline (paired bootstrap).")
    out.append(f"Outlier draws: held-out draws whose RMSE exceeds {OUTLIER_FACTOR:g}x the "
               f"solver's median draw RMSE, and their share of its squared error.")
    for name, by_nfe in data["epd"].items():
        for n, r in by_nfe.items():
            out += [f"{name}, NFE {n}: distill warned: {w}" for w in r["warnings"]]
            t, bt = r.get("tail"), r.get("best_tail")
            if t and t["share"] > 0.5:
                out.append(f"{name}, NFE {n}: {t['outliers']} of {t['draws']} draws carry "
                           f"{100 * t['share']:.0f} % of EPD's squared error; without them "
                           f"EPD's RMSE is {t['rmse_without']:.3e}"
                           + (f" (the best baseline has {bt['outliers']}, "
                              f"{100 * bt['share']:.0f} %; {bt['rmse_without']:.3e} without "
                              f"them)" if bt else ""))
    if not data.get("complete", True):
        out.insert(0, "INCOMPLETE: not measured: "
                   + ", ".join(m for m in cfg["models"] if m not in data["epd"]))
    out.append(f"Held-out noises: {_samples_text(cfg)} (seeds {TEST_SEED}..); "
               f"{cfg['threads']} torch thread; section wall time {data['elapsed_s']:.0f} s")
    return out


def plot(data: dict, png_path: pathlib.Path) -> Optional[str]:
    """Log RMSE vs NFE: a line per baseline and EPD's points, a panel per model."""
    from benchmarks.plot import error_panels

    data = _normalised(data)
    panels = []
    for m, curves in data["curves"].items():
        epd = sorted((n, r["rmse"]) for n, r in data["epd"].get(m, {}).items())
        shown = [e for c in curves.values() for n, e in c.items() if n >= 3 and e < math.inf]
        shown += [e for _, e in epd]
        panels.append({"title": MODELS[m][0], "xlabel": "latency NFE",
                       "ylabel": "RMSE vs reference (global RMS)",
                       "ylim": (0.5 * min(shown), 2.0 * max(shown)),
                       "series": [{"label": s, "x": sorted(c), "y": [c[n] for n in sorted(c)]}
                                  for s, c in curves.items()],
                       "points": [{"label": "EPD (distill defaults)", "x": [p[0] for p in epd],
                                   "y": [p[1] for p in epd]}]})
    written = error_panels(png_path, panels, title="Error vs NFE: baselines and distilled EPD")
    return pathlib.Path(png_path).name if written else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--models", default=None, help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--nfes", default=None, help="e.g. 3,5")
    args = ap.parse_args(argv)
    res = run(args.quick, pathlib.Path(args.out),
              models=args.models.split(",") if args.models else None,
              nfes=[int(n) for n in args.nfes.split(",")] if args.nfes else None)
    for t in res["tables"]:
        print(t["title"])
        for r in [t["columns"]] + t["rows"]:
            print("  ".join(str(c) for c in r))
        print()
    print("\n".join(" * " + n for n in res["notes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
