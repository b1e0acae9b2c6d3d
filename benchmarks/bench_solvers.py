#!/usr/bin/env python
"""Solver benchmark: final-state RMSE against a high-accuracy ODE solution, per latency NFE.

For every baseline solver at latency NFE 3, 5, 7, 9 (each solver's default AFS setting:
on for Heun and DPM-Solver-2, whose budgets are then odd, off for the one-call-per-step
solvers) and two analytic models in 64 dimensions:

* ``gaussian-64``: per-dimension Gaussian data, means ~ N(0, 0.8^2), stds in [0.3, 1.0];
  the reference is the closed-form ODE solution.
* ``gmm-64x8``: a mixture of 8 isotropic Gaussians (means ~ N(0, 1), stds in [0.3, 0.6],
  unequal weights); the reference is scipy's DOP853 at rtol = atol = 1e-12 (1e-10 in quick
  mode) in log sigma, whose own error is estimated against a looser solve and reported.

Row ``dpmpp3m-ref`` is DPM-Solver++(3M) with the DPM-Solver / k-diffusion code's D''
weight (``variant="reference"``, see `epd_kernels.solvers.dpmpp3m`), for comparison with
published baselines.

From the same noise (``make_noise`` seeds 0..n-1, float64 states), the RMSE over all
samples and dimensions of the state at sigma_min = 0.002 is reported. Latency NFE and
total evaluations are measured by `sample(..., return_stats=True)`, not assumed.

Writes ``out_dir/solvers.json`` and ``out_dir/solvers.png`` (log-y error vs NFE, one line
per solver, one panel per model). EPD / EPD-Plugin rows are added when parameters are
supplied (``params={(model, solver, nfe): EPDParams or path}`` or ``--params-dir`` with
files ``<model>-<solver>-nfe<N>.safetensors``) or with ``distill=True`` (runs
`epd_kernels.distill` per model and NFE; slow); otherwise a note says they come with
distillation.

    python benchmarks/bench_solvers.py [--quick] [--out benchmarks/results]
                                       [--params-dir DIR] [--distill]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings
from typing import Dict, Optional

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from epd_kernels.models import GaussianMixtureModel, GaussianModel  # noqa: E402
from epd_kernels.sampling import make_noise, sample  # noqa: E402

SOLVERS = ["euler", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis"]
# Extra rows run outside sample(): name -> (solver function, keyword arguments).
VARIANTS = {"dpmpp3m-ref": ("dpmpp3m", dict(variant="reference"))}
EPD_SOLVERS = ["epd", "epd-ipndm"]
NFES = [3, 5, 7, 9]
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
QUICK = dict(samples=64, rtol=1e-10)
FULL = dict(samples=256, rtol=1e-12)
F64 = torch.float64


def build_models(dim: int = 64, components: int = 8, seed: int = 0) -> Dict[str, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    gauss = GaussianModel(0.8 * torch.randn(dim, generator=g, dtype=F64),
                          0.3 + 0.7 * torch.rand(dim, generator=g, dtype=F64))
    gmm = GaussianMixtureModel(torch.randn(components, dim, generator=g, dtype=F64),
                               0.3 + 0.3 * torch.rand(components, generator=g, dtype=F64),
                               0.5 + torch.rand(components, generator=g, dtype=F64))
    return {f"gaussian-{dim}": gauss, f"gmm-{dim}x{components}": gmm}


def reference(name: str, model, x_T: torch.Tensor, rtol: float, check_ode: bool = True):
    """(x at sigma_min, info) for the model: exact for the Gaussian, DOP853 for the mixture.

    With `check_ode`, the ODE solver used for the mixture is also run on the Gaussian and
    its error against the closed form is reported."""
    t0 = time.perf_counter()
    if isinstance(model, GaussianModel):
        ref = model.exact_solution(x_T, SIGMA_MAX, SIGMA_MIN)
        info = dict(method="closed form", seconds=time.perf_counter() - t0)
        if check_ode:
            ode = model.reference_solution(x_T, SIGMA_MAX, SIGMA_MIN, rtol=rtol, atol=rtol)
            info["ode_solver_max_abs_error"] = float((ode - ref).abs().max())
        return ref, info
    ref = model.reference_solution(x_T, SIGMA_MAX, SIGMA_MIN, rtol=rtol, atol=rtol)
    seconds = time.perf_counter() - t0
    loose = model.reference_solution(x_T, SIGMA_MAX, SIGMA_MIN, rtol=rtol * 100, atol=rtol * 100)
    return ref, dict(method=f"scipy DOP853 in log sigma, rtol=atol={rtol:g}", seconds=seconds,
                     max_abs_change_vs_rtol_x100=float((ref - loose).abs().max()))


def _run_variant(model, noise, base, nfe, kw):
    """A solver variant with extra keywords, counted like sample() counts."""
    from epd_kernels.sampling import CountingDenoiser, SampleStats, nfe_to_steps
    from epd_kernels.solvers import SOLVERS as FUNCS
    from epd_kernels.solvers import get_sigmas

    steps = nfe_to_steps(base, nfe)
    sigmas = get_sigmas("polynomial", steps)
    counter = CountingDenoiser(model, noise.shape[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        x = FUNCS[base](counter, noise * float(sigmas[0]), sigmas, **kw)
    return x, SampleStats(counter.calls, counter.evaluations, steps,
                          time.perf_counter() - t0, base, nfe)


def _load_params(path):
    from epd_kernels.params import EPDParams

    return EPDParams.load(str(path))


def epd_params_for(model_name, model, solver, nfe, params, params_dir, distill, notes,
                   save_dir: Optional[pathlib.Path] = None):
    """EPDParams for (model, solver, nfe) from `params`, `params_dir` or a distillation
    (saved to `save_dir` as ``<model>-<solver>-nfe<N>.safetensors`` for reuse)."""
    key = (model_name, solver, nfe)
    if params and key in params:
        p = params[key]
        return _load_params(p) if isinstance(p, (str, pathlib.Path)) else p
    if params_dir is not None:
        f = pathlib.Path(params_dir) / f"{model_name}-{solver}-nfe{nfe}.safetensors"
        if f.exists():
            return _load_params(f)
    if distill:
        from epd_kernels.distill import distill as run_distill

        try:
            p = run_distill(model, nfe=nfe, shape=model.shape, num_points=2,
                            plugin=(solver == "epd-ipndm"), progress=False, dtype=F64)
        except Exception as e:  # noqa: BLE001 - report and go on with the baselines
            notes.append(f"distillation of {solver} at NFE {nfe} on {model_name} failed: "
                         f"{type(e).__name__}: {e}")
            return None
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            p.save(str(save_dir / f"{model_name}-{solver}-nfe{nfe}.safetensors"))
        return p
    return None


def run(quick: bool, out_dir: pathlib.Path, params: Optional[dict] = None,
        params_dir: Optional[str] = None, distill: bool = False, samples: Optional[int] = None,
        nfes=NFES) -> dict:
    """Runs the benchmark; writes out_dir/solvers.json and solvers.png; returns the tables."""
    cfg = dict(QUICK if quick else FULL)
    if samples is not None:
        cfg["samples"] = int(samples)
    # The models are tiny elementwise computations: one thread avoids thread-pool dispatch
    # costs that dominate them (and noise from other processes); restored on return.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, pathlib.Path(out_dir), cfg, params, params_dir, distill, nfes)
    finally:
        torch.set_num_threads(threads)


def _run(quick, out_dir, cfg, params, params_dir, distill, nfes):
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    models = build_models()
    noise = make_noise(range(cfg["samples"]), (64,), dtype=F64)
    x_T = noise * SIGMA_MAX
    notes, results, refs = [], [], {}
    want_epd = bool(params) or params_dir is not None or distill

    for mname, model in models.items():
        ref, info = reference(mname, model, x_T, cfg["rtol"], check_ode=not quick)
        refs[mname] = info
        scale = float(ref.pow(2).mean().sqrt())
        for solver in SOLVERS + list(VARIANTS) + (EPD_SOLVERS if want_epd else []):
            for nfe in nfes:
                kw = {}
                if solver in VARIANTS:
                    base, vkw = VARIANTS[solver]
                    x, st = _run_variant(model, noise, base, nfe, vkw)
                    rmse = float((x - ref).pow(2).mean().sqrt())
                    results.append(dict(model=mname, solver=solver, nfe=nfe, steps=st.steps,
                                        latency_nfe=st.latency_nfe, total_evals=st.total_evals,
                                        rmse=rmse, relative_rmse=rmse / scale,
                                        wall_time_s=st.wall_time_s))
                    continue
                if solver in EPD_SOLVERS:
                    p = epd_params_for(mname, model, solver, nfe, params, params_dir, distill,
                                       notes, save_dir=out_dir / "epd_params")
                    if p is None:
                        continue
                    kw["params"] = p
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # reference-backend notice
                    x, st = sample(model, noise, solver=solver, nfe=nfe, return_stats=True, **kw)
                rmse = float((x - ref).pow(2).mean().sqrt())
                results.append(dict(model=mname, solver=solver, nfe=nfe, steps=st.steps,
                                    latency_nfe=st.latency_nfe, total_evals=st.total_evals,
                                    rmse=rmse, relative_rmse=rmse / scale,
                                    wall_time_s=st.wall_time_s))
    if params or params_dir is not None:
        notes.append(f"EPD rows: parameters supplied"
                     + (f" from {params_dir}" if params_dir is not None else "")
                     + " (rows missing where no file matched)")
    if distill:
        notes.append("EPD rows: K=2 branches, distilled here with epd_kernels.distill defaults "
                     "(teacher dpm2, AFS); parameters saved in epd_params/ for --params-dir")
    if not want_epd:
        notes.append("EPD / EPD-Plugin rows come with distillation: pass --distill, or "
                     "--params-dir with <model>-<solver>-nfe<N>.safetensors files.")
    for mname, info in refs.items():
        if info["method"] == "closed form":
            extra = (f" (the ODE solver used for the mixture is off by "
                     f"{info['ode_solver_max_abs_error']:.1e} here)"
                     if "ode_solver_max_abs_error" in info else "")
            notes.append(f"{mname}: reference = closed form{extra}")
        else:
            notes.append(f"{mname}: reference = {info['method']} ({info['seconds']:.1f} s); "
                         f"it moves by {info['max_abs_change_vs_rtol_x100']:.1e} with a 100x "
                         f"looser tolerance")
    bad = [r for r in results if r["latency_nfe"] != r["nfe"]
           or (r["solver"] not in EPD_SOLVERS and r["total_evals"] != r["nfe"])]
    notes.append(f"{cfg['samples']} samples, float64, polynomial grid rho=7 from "
                 f"{SIGMA_MAX:g} to {SIGMA_MIN:g}; AFS on for heun/dpm2 (odd budgets), off "
                 f"for the others; latency NFE and total evaluations measured by sample(): "
                 + ("all equal to the budget" if not bad else f"{len(bad)} MISMATCHES"))
    for r in bad:
        notes.append(f"MISMATCH: {r['model']} {r['solver']} nfe={r['nfe']}: latency "
                     f"{r['latency_nfe']}, total {r['total_evals']}")

    tables = []
    for mname in models:
        rows = []
        for solver in SOLVERS + list(VARIANTS) + EPD_SOLVERS:
            cells = {r["nfe"]: r for r in results if r["model"] == mname and r["solver"] == solver}
            if not cells:
                continue
            row = {"solver": solver}
            for nfe in nfes:
                row[f"NFE {nfe}"] = f"{cells[nfe]['rmse']:.3e}" if nfe in cells else None
            rows.append(row)
        tables.append(dict(title=f"RMSE vs reference at sigma_min, {mname}",
                           columns=["solver"] + [f"NFE {n}" for n in nfes], rows=rows))

    payload = dict(config=dict(cfg, nfes=list(nfes), sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN,
                               schedule="polynomial rho=7", dtype="float64",
                               torch=torch.__version__, threads=torch.get_num_threads(),
                               quick=bool(quick)),
                   reference=refs, results=results, notes=notes,
                   seconds=time.perf_counter() - t_start)
    (out_dir / "solvers.json").write_text(json.dumps(payload, indent=2))
    plot = _plot(results, list(models), nfes, out_dir / "solvers.png")
    out = dict(tables=tables, notes=notes, results=results)
    if plot:
        out["plot"] = plot
    return out


def _plot(results, model_names, nfes, path: pathlib.Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(model_names), figsize=(6 * len(model_names), 4.2),
                             squeeze=False)
    for ax, mname in zip(axes[0], model_names):
        for solver in SOLVERS + list(VARIANTS) + EPD_SOLVERS:
            pts = sorted((r["nfe"], r["rmse"]) for r in results
                         if r["model"] == mname and r["solver"] == solver)
            if pts:
                style = "-s" if solver in EPD_SOLVERS else "--^" if solver in VARIANTS else "-o"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=solver)
        ax.set_yscale("log")
        ax.set_xticks(list(nfes))
        ax.set_xlabel("latency NFE")
        ax.set_ylabel("RMSE vs reference")
        ax.set_title(mname)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _print(result: dict) -> None:
    for t in result["tables"]:
        cols = t["columns"]
        rows = [[str(r.get(c, "-") if r.get(c) is not None else "-") for c in cols]
                for r in t["rows"]]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print(t["title"])
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                            for i, (v, w) in enumerate(zip(r, widths))))
        print()
    for n in result["notes"]:
        print(f"  * {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--params-dir", default=None)
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--samples", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.quick, pathlib.Path(args.out), params_dir=args.params_dir,
                 distill=args.distill, samples=args.samples)
    _print(result)
    print(f"\nwrote {pathlib.Path(args.out) / 'solvers.json'} and solvers.png "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
