#!/usr/bin/env python
"""Distillation benchmark: EPD / EPD-Plugin vs every baseline solver at the same NFE.

Models (no download): a 64-dim Gaussian (exact ODE solution) and a 64-dim mixture of 8
Gaussians (reference: scipy DOP853 at rtol = atol = 1e-10). For each model and NFE
(3, 5, 7, 9; quick: 5):

1. Baselines: every solver of `epd_kernels.sampling` that needs no distilled parameters,
   through `sample`, on the default schedule (polynomial, rho = 7) and, for an honest
   comparison with a tuned EPD, also on "time-uniform" and "logsnr"; "best" is the lowest
   RMSE over all of them.
2. EPD and EPD-Plugin with `distill`'s defaults (schedule polynomial rho = 7): the
   distillation wall/CPU time and the RMSE.
3. Improvement pass: the same distillation on a few other standard schedules
   (polynomial rho 5 / 3.5, time-uniform); the schedule is chosen by the RMSE on a
   VALIDATION set of noise (its own seeds and reference solutions), never on the test set.

RMSE is over all elements of ``x(sigma_min)`` against the reference, on 1024 (quick: 512)
held-out noise draws (seeds 10^6 + i, never used in training; validation: 1024 (quick:
256) draws from seeds 2 10^6 + i). Bars (PASS / MISS):

* distillation of NFE 5 on a 64-dim model <= 60 s wall (per run, defaults),
* EPD below every baseline at each NFE, and <= 0.6 x the best baseline at NFE 5, against
  the best baseline over all solvers and schedules, and again against the best of the
  baselines that spend no more total evaluations than EPD (ParaDiGMS spends 6-12x more),
* EPD-Plugin below iPNDM at each NFE (iPNDM on its default and on its best schedule),

judged for the default run and for the tuned (validation-selected) run. On the mixture, most of the RMSE comes from a few samples
that end in the wrong component (the decision falls at sigma ~ 2-7); "flips" counts them.

    python benchmarks/bench_distill.py [--quick] [--out benchmarks/results] [--nfes 3,5]

`run(quick, out_dir)` writes out_dir/distill.json, out_dir/distill.png and the params
files out_dir/distill_params/*.safetensors, and returns {"tables", "notes", ...}.
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
from typing import Dict, Optional, Sequence

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from epd_kernels import make_noise, sample  # noqa: E402
from epd_kernels.distill import DEFAULT_ITERATIONS, distill  # noqa: E402
from epd_kernels.models import GaussianMixtureModel, GaussianModel  # noqa: E402
from epd_kernels.sampling import _SOLVERS, solver_names  # noqa: E402

F64 = torch.float64
TIME_BAR_S = 60.0
RATIO_BAR = 0.6
TEST_SEED, VAL_SEED = 10 ** 6, 2 * 10 ** 6

#: EPD schedules tried: the default first (it is the "default" run).
CANDIDATES = {
    "poly7": None,
    "poly5": {"kind": "polynomial", "rho": 5.0},
    "poly3.5": {"kind": "polynomial", "rho": 3.5},
    "time-uniform": "time-uniform",
}
BASELINE_SCHEDULES = ("polynomial", "time-uniform", "logsnr")
QUICK = dict(nfes=(5,), iterations=DEFAULT_ITERATIONS, test=512, val=256,
             candidates=("poly7", "poly3.5", "time-uniform"))
FULL = dict(nfes=(3, 5, 7, 9), iterations=DEFAULT_ITERATIONS, test=1024, val=1024,
            candidates=tuple(CANDIDATES))
VARIANTS = (("epd", False), ("epd-ipndm", True))


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


MODELS = {"gaussian64": gaussian_64, "mixture64": mixture_64}


def reference(model, noise: torch.Tensor) -> torch.Tensor:
    x = noise.to(F64) * 80.0
    if isinstance(model, GaussianModel):
        return model.exact_solution(x, 80.0, 0.002)
    return torch.cat([model.reference_solution(c, 80.0, 0.002, rtol=1e-10, atol=1e-10)
                      for c in x.split(256)])


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
# measurement


class _Data:
    """Noise, reference and metrics for one model."""

    def __init__(self, model, n_test: int, n_val: int):
        self.model = model
        self.test = make_noise(range(TEST_SEED, TEST_SEED + n_test), model.shape, dtype=F64)
        self.val = make_noise(range(VAL_SEED, VAL_SEED + n_val), model.shape, dtype=F64)
        self.test_ref = reference(model, self.test)
        self.val_ref = reference(model, self.val)
        means = getattr(model, "means", None)
        self.components = None if means is None else torch.cdist(self.test_ref, means).argmin(1)

    def rmse(self, x, ref) -> float:
        return (x.to(F64) - ref).pow(2).mean().sqrt().item()

    def flips(self, x) -> Optional[int]:
        if self.components is None:
            return None
        return int((torch.cdist(x.to(F64), self.model.means).argmin(1) != self.components).sum())

    def evaluate(self, solver, nfe=None, params=None, schedule=None, split="test") -> dict:
        """{"rmse", "flips", "total_evals"} of one solver on the test (or val) noise."""
        noise, ref = (self.test, self.test_ref) if split == "test" else (self.val, self.val_ref)
        x, stats = sample(self.model, noise, solver=solver, nfe=nfe, params=params,
                          schedule=schedule, return_stats=True)
        return {"rmse": self.rmse(x, ref), "flips": self.flips(x) if split == "test" else None,
                "total_evals": stats.total_evals}


def _timed_distill(model32, nfe, plugin, schedule, iterations):
    wall, cpu = time.perf_counter(), time.process_time()
    p = distill(model32, nfe=nfe, shape=model32.shape, plugin=plugin, schedule=schedule,
                iterations=iterations, seed=0, progress=False)
    return p, time.perf_counter() - wall, time.process_time() - cpu


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
        verbose: bool = True) -> dict:
    """Runs the benchmark (module docstring); returns the tables and writes the files."""
    t_start = time.perf_counter()
    cfg = dict(QUICK if quick else FULL)
    if nfes:
        cfg["nfes"] = tuple(int(n) for n in nfes)
    out_dir = pathlib.Path(out_dir)
    params_dir = out_dir / "distill_params"
    params_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print("[distill]", *a, flush=True)) if verbose else (lambda *a: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-dim problems: intra-op threads only add overhead
    baselines = baseline_solvers()
    results: Dict[str, dict] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # reference-backend notice
            for mname, build in MODELS.items():
                model = build()
                model32 = copy.deepcopy(model).to(torch.float32)
                t0 = time.perf_counter()
                data = _Data(model, cfg["test"], cfg["val"])
                say(f"{mname}: references for {cfg['test']} test + {cfg['val']} validation "
                    f"draws in {time.perf_counter() - t0:.1f} s")
                per_nfe = {}
                for nfe in cfg["nfes"]:
                    per_nfe[nfe] = _one_nfe(data, model32, nfe, cfg, baselines, params_dir,
                                            mname, say)
                results[mname] = per_nfe
    finally:
        torch.set_num_threads(threads)

    tables, bars = _tables(results, cfg, baselines)
    plot = _plot(results, cfg, out_dir / "distill.png")
    notes = _notes(results, cfg, bars)
    out = {
        "section": "distill",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "candidates": {k: CANDIDATES[k] for k in cfg["candidates"]},
        "baselines": baselines,
        "baseline_schedules": list(BASELINE_SCHEDULES),
        "torch_threads": 1,
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


def _one_nfe(data, model32, nfe, cfg, baselines, params_dir, mname, say) -> dict:
    rec = {"baselines": {}, "epd": {}}
    for solver in baselines:
        row = {}
        for sch in BASELINE_SCHEDULES:
            try:
                row[sch] = data.evaluate(solver, nfe=nfe, schedule=sch)
            except ValueError as e:  # e.g. an NFE budget this solver cannot meet
                row[sch] = {"error": str(e).split(";")[0]}
        rec["baselines"][solver] = row
    valid = [dict(r, solver=s, schedule=sch) for s, row in rec["baselines"].items()
             for sch, r in row.items() if "rmse" in r]
    # EPD's total evaluations: (K + 1) S - 1 with K = 2, AFS
    epd_evals = 3 * (nfe + 1) // 2 - 1
    rec["epd_total_evals"] = epd_evals
    rec["best_baseline"] = min(valid, key=lambda v: v["rmse"])
    rec["best_baseline_same_cost"] = min((v for v in valid if v["total_evals"] <= epd_evals),
                                         key=lambda v: v["rmse"])
    ipndm = [v for v in valid if v["solver"] == "ipndm"]
    rec["ipndm_default"] = next((v for v in ipndm if v["schedule"] == "polynomial"), None)
    rec["ipndm_best"] = min(ipndm, key=lambda v: v["rmse"]) if ipndm else None
    b, c = rec["best_baseline"], rec["best_baseline_same_cost"]
    say(f"{mname} NFE {nfe}: best baseline {b['solver']}/{b['schedule']} {b['rmse']:.4g} "
        f"({b['total_evals']:g} evals); at <= {epd_evals} evals {c['solver']}/{c['schedule']} "
        f"{c['rmse']:.4g}")

    for variant, plugin in VARIANTS:
        runs = {}
        for cand in cfg["candidates"]:
            p, wall, cpu = _timed_distill(model32, nfe, plugin, CANDIDATES[cand],
                                          cfg["iterations"])
            ev = data.evaluate(variant, params=p)
            test, flips = ev["rmse"], ev["flips"]
            val = data.evaluate(variant, params=p, split="val")["rmse"]
            path = params_dir / f"{mname}_{variant}_nfe{nfe}_{cand}.safetensors"
            p.save(path)
            runs[cand] = {"rmse": test, "val_rmse": val, "flips": flips, "wall_s": wall,
                          "cpu_s": cpu, "final_loss": p.meta["final_loss"],
                          "total_evals": ev["total_evals"], "sigmas": p.sigmas.tolist(),
                          "file": path.name}
            say(f"{mname} NFE {nfe} {variant} [{cand}]: {wall:.1f} s wall ({cpu:.1f} s cpu), "
                f"val {val:.4g}, test {test:.4g}" + ("" if flips is None else f", flips {flips}"))
        chosen = min(runs, key=lambda c: runs[c]["val_rmse"])
        rec["epd"][variant] = {"runs": runs, "default": "poly7", "tuned": chosen}
    return rec


# --------------------------------------------------------------------------------------
# tables, bars, notes, plot


def _tables(results, cfg, baselines):
    rmse_rows, bar_rows, bars = [], [], []
    for mname, per_nfe in results.items():
        for nfe, rec in per_nfe.items():
            bb, bc = rec["best_baseline"], rec["best_baseline_same_cost"]
            row = [mname, nfe]
            for s in baselines:
                r = rec["baselines"][s].get("polynomial", {})
                row.append(_fmt(r.get("rmse")))
            row.append(f"{_fmt(bb['rmse'])} {bb['solver']}/{bb['schedule']}")
            row.append(f"{_fmt(bc['rmse'])} {bc['solver']}/{bc['schedule']}")
            for variant, _ in VARIANTS:
                e = rec["epd"][variant]
                d, t = e["runs"][e["default"]], e["runs"][e["tuned"]]
                row += [_fmt(d["rmse"]), f"{_fmt(t['rmse'])} {e['tuned']}"]
            rmse_rows.append(row)

            for which in ("default", "tuned"):
                e, p = rec["epd"]["epd"], rec["epd"]["epd-ipndm"]
                er, pr = e["runs"][e[which]], p["runs"][p[which]]
                checks = []
                for ref, label in ((bb, "every baseline"),
                                   (bc, f"every baseline with <= {rec['epd_total_evals']} evals")):
                    q = er["rmse"] / ref["rmse"]
                    checks.append((f"EPD < {label}", q, q < 1.0))
                    if nfe == 5:
                        checks.append((f"EPD <= {RATIO_BAR} x best of {label}", q,
                                       q <= RATIO_BAR))
                for ref, label in ((rec["ipndm_default"], "default schedule"),
                                   (rec["ipndm_best"], "best schedule")):
                    if ref is not None:
                        q = pr["rmse"] / ref["rmse"]
                        checks.append((f"EPD-Plugin < iPNDM ({label})", q, q < 1.0))
                if nfe == 5 and which == "default":
                    for v, r in (("EPD", er), ("EPD-Plugin", pr)):
                        checks.append((f"{v} distill time <= {TIME_BAR_S:.0f} s", r["wall_s"],
                                       r["wall_s"] <= TIME_BAR_S))
                for name, value, ok in checks:
                    bars.append({"model": mname, "nfe": nfe, "run": which, "bar": name,
                                 "value": value, "pass": bool(ok)})
                    bar_rows.append([mname, nfe, which, name, _fmt(value, 3), _bar(ok)])
    cols = ["model", "NFE"] + baselines + ["best baseline (any schedule)",
                                           "best with <= EPD evals", "EPD", "EPD tuned",
                                           "EPD-Plugin", "Plugin tuned"]
    tables = [
        {"title": "RMSE to the reference on held-out noise (baselines: default polynomial "
                  "schedule; 'tuned': schedule chosen on validation noise)",
         "columns": cols, "rows": rmse_rows},
        {"title": "Bars (value: RMSE ratio EPD / baseline, or seconds)",
         "columns": ["model", "NFE", "run", "bar", "value", "result"], "rows": bar_rows},
    ]
    time_rows = []
    for mname, per_nfe in results.items():
        for nfe, rec in per_nfe.items():
            for variant, _ in VARIANTS:
                for cand, r in rec["epd"][variant]["runs"].items():
                    time_rows.append([mname, nfe, variant, cand, _fmt(r["wall_s"], 3),
                                      _fmt(r["cpu_s"], 3), _fmt(r["val_rmse"]),
                                      _fmt(r["rmse"]), _fmt(r["flips"])])
    tables.append({"title": f"Every distillation ({cfg['iterations']} iterations, batch 32, "
                            f"1 thread): time, validation and test RMSE",
                   "columns": ["model", "NFE", "solver", "schedule", "wall s", "cpu s",
                               "val RMSE", "test RMSE", "flips"],
                   "rows": time_rows})
    return tables, bars


def _notes(results, cfg, bars):
    notes = []
    for which in ("default", "tuned"):
        missed = [b for b in bars if b["run"] == which and not b["pass"]]
        total = len([b for b in bars if b["run"] == which])
        notes.append(f"{which} run: {total - len(missed)}/{total} bars PASS" +
                     ("" if not missed else "; MISS: " + "; ".join(
                         f"{b['model']} NFE {b['nfe']} {b['bar']} ({_fmt(b['value'], 3)})"
                         for b in missed)))
    notes.append("Total evaluations per sample at equal latency NFE (EPD, K = 2: "
                 "(K + 1) S - 1): " + "; ".join(
                     f"{m} NFE {n}: EPD {r['epd_total_evals']}, best baseline "
                     f"{r['best_baseline']['solver']} {r['best_baseline']['total_evals']:g}"
                     for m, v in results.items() for n, r in v.items()))
    notes.append("Improvement tried: schedules " + ", ".join(cfg["candidates"]) +
                 " for every model/NFE/solver, chosen by validation RMSE (separate noise "
                 "seeds and references), so the test RMSE stays held out.")
    mix = results.get("mixture64", {})
    if mix:
        flips = []
        for nfe, rec in mix.items():
            e = rec["epd"]["epd"]
            f = e["runs"][e["tuned"]]["flips"]
            bb = rec["best_baseline"]
            flips.append(f"NFE {nfe}: EPD {f}, best baseline {bb['flips']}")
        notes.append(f"mixture: samples ending in another component than the reference "
                     f"(of {cfg['test']}): " + "; ".join(flips) + ". They dominate the RMSE.")
    return notes


def _plot(results, cfg, path: pathlib.Path):
    from benchmarks.plot import have_matplotlib, pyplot

    if not have_matplotlib():
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.6), squeeze=False)
    for ax, (mname, per_nfe) in zip(axes[0], results.items()):
        nfes = sorted(per_nfe)
        solvers = list(next(iter(per_nfe.values()))["baselines"])
        cmap = plt.get_cmap("tab10")
        for i, s in enumerate(solvers):
            ys = [per_nfe[n]["baselines"][s].get("polynomial", {}).get("rmse", math.nan)
                  for n in nfes]
            ax.plot(nfes, ys, color=cmap(i % 10), marker="o", ms=3, lw=1, alpha=0.7, label=s)
        ax.plot(nfes, [per_nfe[n]["best_baseline"]["rmse"] for n in nfes], color="black",
                ls=":", marker="x", lw=1.2, label="best baseline, any schedule")
        for variant, color in (("epd", "tab:red"), ("epd-ipndm", "tab:blue")):
            for which, ls in (("default", "--"), ("tuned", "-")):
                ys = [per_nfe[n]["epd"][variant]["runs"][per_nfe[n]["epd"][variant][which]]["rmse"]
                      for n in nfes]
                ax.plot(nfes, ys, color=color, ls=ls, marker="s", ms=5, lw=2.2,
                        label=f"{variant} ({which})")
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xlabel("NFE (sequential denoiser calls)")
        ax.set_ylabel(f"RMSE vs reference ({cfg['test']} held-out draws)")
        ax.set_title(mname)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
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
    args = ap.parse_args(argv)
    nfes = [int(n) for n in args.nfes.split(",")] if args.nfes else None
    result = run(args.quick, pathlib.Path(args.out), nfes=nfes)
    from benchmarks.run import render_text
    print(render_text("distill", result))
    print(f"wrote {pathlib.Path(args.out) / 'distill.json'} in {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
