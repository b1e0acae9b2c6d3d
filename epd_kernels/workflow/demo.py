"""`epd demo`: distil EPD, AMED and D-ODE, compare every solver at equal latency, draw it.

On one model (default the embedded digits U-Net, class-conditional, labels = seed % 10):

1. a reference: a high-order solver with many steps (UniPC, 60 steps) from the same
   noise as every solver, computed once; its own error is estimated against half the
   steps on a subset and reported (about 1e-4, 200x below the best 9-NFE solver);
2. every solver of `solver_names()` that needs no params (aliases skipped) at NFE
   3, 5, 7, 9 (a budget a solver cannot meet is skipped and listed);
3. D-ODE (d-euler, d-ipndm; closed-form fit) at NFE 3 and 5;
4. EPD (distilled, K = 2) at NFE 3 and 5: 150 iterations of batch 16 drawn from a pool
   of 256 noises (labels seed % 10, one per pool entry; the DPM-Solver-2 teacher with
   M = 3 runs once over the pool), lr 0.1 (EPD-Plugin: 0.05);
5. AMED-Solver (distilled, predictor form reading the denoised main-point estimate) at
   NFE 3 and 5: 40 iterations of batch 16 on fresh noise, the same teacher; all
   distilled solvers are sampled from the same noise;
6. optional runs, each only if its estimated time still fits ``--budget`` (default
   200 s): parallel solvers above NFE 5 (ParaDiGMS spends ~NFE^2 evaluations, ~180 per
   sample at NFE 9), then the plugins on iPNDM, EPD-Plugin (epd-ipndm) and AMED-Plugin
   (amed-ipndm), at NFE 5 and then 3; skipped runs are listed with the reason;
7. a table (RMSE to the reference, Frechet distance in pixel space to the data, latency
   NFE, total evaluations, wall time) printed and saved, ``samples_grid.png`` (rows =
   solvers, columns = NFE), ``rmse_vs_nfe.png``, the params under ``params/`` and
   ``results.json`` with every figure and the time of each stage (``timings``: reference,
   baselines, d-ode, epd, amed, optional, outputs, total).

``--quick`` uses tiny settings (seconds) for tests and runs everything. The default
settings were chosen to finish in about 2-3 minutes on 2 CPU cores; the threads are
picked by timing one batch with 1 and with all cores (a busy machine is often much faster
with one).

EPD's settings: one experiment on digits-unet (RMSE to the 60-step reference on the
demo's 256 samples, default grid). The earlier 40 iterations on fresh noise left
EPD-Plugin behind iPNDM (NFE 5: 0.148 against 0.098); with a pool an iteration no longer
runs the teacher, so 150 iterations cost about what 40 did (NFE 5: 22-26 s on one thread):
EPD NFE 5 / 3: 0.049 / 0.094 (lr 0.1); EPD-Plugin NFE 5: 0.096 / 0.112 / 0.151 at
lr 0.05 / 0.1 / 0.2 (150 / 150 / 100 iterations), NFE 3: 0.131 / 0.144 / 0.162 at lr 0.05 /
0.075 / 0.1, against iPNDM's 0.107 / 0.212 on the same samples.

AMED's settings (`AMED_FEATURES`, `AMED_LR`, `AMED_PLUGIN_LR`) come from one experiment on
digits-unet (40 iterations of batch 16, M = 3, training seeds 0 and 1, RMSE to the
60-step reference on the demo's 256 samples). The predictor's input: the denoised
estimate ("denoised", 64 values) beat the U-Net bottleneck ("module:net.mid2", 4 values)
in all 7 matched runs: NFE 5, lr 0.05 / 0.1 / 0.2 / 0.4: 0.146 / 0.136-0.138 /
0.127-0.137 / 0.128 against 0.171 / 0.145-0.151 / 0.143-0.150 / 0.130; NFE 3, lr 0.2:
0.211 against 0.223. So the demo reads "denoised" (and would fall back to it anyway for a
model without ``net.mid2``). The learning rate: 0.2 for AMED-Solver (0.4 gave the same),
0.05 for AMED-Plugin (NFE 5: 0.140-0.151 at 0.05, 0.149-0.157 at 0.1, 0.159 at 0.2;
NFE 3: 0.165-0.166 at all three), which starts from iPNDM on the refined grid, much
closer to the teacher than AMED-Solver's DPM-Solver-2 start (neutral RMSE at NFE 5:
0.33 and 0.45; at NFE 3: 0.19 and 3.7). With these short runs the table form was
better than the predictor at NFE 5 (0.088 at lr 0.2): its per-step values learn at the
full rate, while the predictor tells the steps apart through weights that learn at a
tenth of it; the demo shows the paper's predictor.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..metrics import feature_stats, frechet_distance_from_stats, global_rmse
from ..sampling import make_noise, sample, solver_names, valid_budgets
from . import outputs, plots
from .errors import UserError, one_line
from .resolve import (check_budget, class_labels_for, is_alias, load_model_or_fail,
                      model_shape, needs_params)
from .threads import model_batch_runner, pick_threads

__all__ = ["run_demo", "DemoConfig", "DEFAULT", "QUICK"]

# AMED settings, from the experiment in the module docstring (digits-unet, 40 iterations of
# batch 16, M = 3, RMSE to the reference on the demo's 256 samples): the main-point x0
# estimate beat the U-Net bottleneck as the predictor's input in every matched run.
AMED_FEATURES = "denoised"
AMED_LR = 0.2
AMED_PLUGIN_LR = 0.05


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    num_samples: int = 256            # samples per solver for RMSE and Frechet distance
    nfes: Tuple[int, ...] = (3, 5, 7, 9)
    distill_nfes: Tuple[int, ...] = (3, 5)
    ref_solver: str = "unipc"         # reference: a 3rd-order multistep solver, many steps
    ref_nfe: int = 60
    ref_check_samples: int = 32       # its error is estimated against ref_nfe // 2 steps
    epd_iterations: int = 150         # EPD and EPD-Plugin: on a pool (module docstring)
    epd_pool: int = 256               # training draws, labels seed % 10, teacher run once
    epd_batch: int = 16
    epd_lr: float = 0.1
    plugin_lr: float = 0.05
    epd_teacher_points: int = 3       # M: DPM-Solver-2 teacher with 4 sub-steps per step
    amed_iterations: int = 40         # AMED: fresh noise every iteration (module docstring)
    num_points: int = 2
    amed_features: str = AMED_FEATURES  # falls back to "denoised" without that submodule
    amed_lr: float = AMED_LR
    amed_plugin_lr: float = AMED_PLUGIN_LR
    dode_solvers: Tuple[str, ...] = ("d-euler", "d-ipndm")
    dode_batch: int = 64
    dode_teacher_factor: int = 10     # teacher sub-steps per student step
    show: int = 6                     # samples per grid cell
    chunk: int = 512                  # samples per sampling call
    defer_above: int = 5              # parallel solvers above this NFE run if time allows
    budget_s: float = 200.0


DEFAULT = DemoConfig()
QUICK = DemoConfig(num_samples=12, nfes=(3, 5), distill_nfes=(3, 5), ref_nfe=20,
                   ref_check_samples=4, epd_iterations=2, epd_pool=8, epd_batch=4,
                   amed_iterations=2, dode_batch=8,
                   dode_teacher_factor=2, show=4,
                   budget_s=1e9)


def _log(msg: str) -> None:
    print(msg, flush=True)


class _Runner:
    """Samples the demo's fixed noise with one solver, in chunks; collects stats."""

    def __init__(self, model, noise, cond, chunk):
        self.model, self.noise, self.cond, self.chunk = model, noise, cond, chunk

    def __call__(self, solver, nfe, params=None, progress=False):
        outs, wall, st0 = [], 0.0, None
        N = self.noise.shape[0]
        for a in range(0, N, self.chunk):
            b = min(N, a + self.chunk)
            cond = {k: v[a:b] for k, v in self.cond.items()}
            x, st = sample(self.model, self.noise[a:b], solver=solver, nfe=nfe, params=params,
                           return_stats=True, progress=progress, **cond)
            outs.append(x.detach().cpu())
            wall += st.wall_time_s
            st0 = st0 or st
        return torch.cat(outs), st0, wall


def _data_for(spec: str, model) -> Optional[np.ndarray]:
    from .eval_job import model_data

    try:
        return model_data(spec, model)
    except UserError:
        return None


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(rows: List[dict], ref: dict) -> str:
    n = ref["num_samples"]
    head = ["solver", "NFE", "latency NFE", "total evals", "global RMSE to ref",
            f"FD (pixels, n={n})", "wall (s)", "ms/sample"]
    lines = []
    r0 = ref
    lines.append([f"reference: {r0['solver']}", str(r0["nfe"]), str(r0["latency_nfe"]),
                  _fmt(r0["total_evals"]), _fmt(r0.get("error_estimate")) + " (est.)",
                  _fmt(r0.get("fd")), f"{r0['wall_time_s']:.2f}",
                  f"{1000 * r0['wall_time_s'] / r0['num_samples']:.2f}"])
    best = {}
    for r in rows:
        if r["rmse"] is not None:
            best[r["nfe"]] = min(best.get(r["nfe"], math.inf), r["rmse"])
    for r in sorted(rows, key=lambda r: (r["nfe"], r["distilled"], r["order"])):
        star = " *" if r["rmse"] is not None and r["rmse"] == best.get(r["nfe"]) else ""
        lines.append([r["solver"], str(r["nfe"]), str(r["latency_nfe"]), _fmt(r["total_evals"]),
                      _fmt(r["rmse"]) + star, _fmt(r["fd"]), f"{r['wall_time_s']:.2f}",
                      f"{1000 * r['wall_time_s'] / r['num_samples']:.2f}"])
    w = [max(len(head[i]), *(len(l[i]) for l in lines)) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |",
           "|" + "|".join("-" * (w[i] + 2) for i in range(len(head))) + "|"]
    for l in lines:
        out.append("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(l)) + " |")
    return "\n".join(out)


def run_demo(args) -> int:
    cfg = QUICK if args.quick else DEFAULT
    over = {}
    if args.nfes:
        over["nfes"] = tuple(args.nfes)
    if args.num_samples:
        over["num_samples"] = int(args.num_samples)
    if args.budget is not None:
        over["budget_s"] = float(args.budget)
    cfg = dataclasses.replace(cfg, **over)
    if cfg.num_samples < 2:
        raise UserError("--num-samples must be >= 2 (the Frechet distance needs 2)")
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    _refuse_earlier_results(args.out, args.force)
    out = outputs.ensure_writable_dir(args.out)
    pdir = outputs.ensure_writable_dir(os.path.join(out, "params"))
    outputs.remove_stale_temporaries(out, _OWN_FILES)
    device = args.device

    # ---- model, noise, labels, data
    model = load_model_or_fail(args.model, device=device)
    shape = model_shape(model)
    N = cfg.num_samples
    seeds = list(range(N))

    def cond_for(keys):
        lab = class_labels_for(model, keys, "seed")
        return {} if lab is None else {"class_labels": lab.to(device)}

    if args.threads == "auto" and args.quick:
        threads = pick_threads(1, None)  # tiny batches never gain from more threads
    else:
        threads = pick_threads(args.threads, model_batch_runner(
            model, shape, 128, cond_for(range(128)), device), device)
    noise = make_noise(seeds, shape, device=device)
    cond = cond_for(seeds)
    data = _data_for(args.model, model)
    data_stats = feature_stats(data) if data is not None else None
    run = _Runner(model, noise, cond, cfg.chunk)
    _log(f"epd demo: model {args.model} (shape {list(shape)}"
         + (f", labels = seed % {model.num_classes}" if cond else "") + f"), {N} samples, "
         f"{threads} thread(s), output {out}" + (" [quick]" if args.quick else ""))

    def fd_of(x):
        if data_stats is None:
            return None
        mu, cov = feature_stats(x.numpy())
        return frechet_distance_from_stats(mu, cov, *data_stats)

    # ---- reference
    t0 = time.perf_counter()
    _log(f"[1/7] reference: {cfg.ref_solver} with {cfg.ref_nfe} steps")
    ref, ref_st, ref_wall = run(cfg.ref_solver, cfg.ref_nfe, progress=args.progress)
    m = min(cfg.ref_check_samples, N)
    half = sample(model, noise[:m], solver=cfg.ref_solver, nfe=cfg.ref_nfe // 2,
                  **{k: v[:m] for k, v in cond.items()})
    ref_info = {"solver": cfg.ref_solver, "nfe": cfg.ref_nfe, "latency_nfe": ref_st.latency_nfe,
                "steps": ref_st.steps, "total_evals": ref_st.total_evals,
                "error_estimate": global_rmse(half.cpu(), ref[:m]) / 7.0,  # 3rd order: (2^3 - 1)
                "error_check": f"rmse to {cfg.ref_nfe // 2} steps on {m} samples / 7",
                "fd": fd_of(ref), "wall_time_s": ref_wall, "num_samples": N}
    timings["reference"] = time.perf_counter() - t0

    rows: List[dict] = []
    skipped: List[dict] = []
    cells: Dict[Tuple[str, int], np.ndarray] = {}
    order = {}

    def record(name, nfe, x, st, wall, distilled):
        order.setdefault(name, len(order))
        r = {"solver": name, "nfe": int(nfe), "latency_nfe": st.latency_nfe,
             "total_evals": st.total_evals, "steps": st.steps, "rmse": global_rmse(x, ref),
             "fd": fd_of(x), "wall_time_s": wall, "num_samples": N, "distilled": distilled,
             "order": order[name]}
        rows.append(r)
        cells[(name, int(nfe))] = x[:cfg.show].numpy()
        return r

    # ---- baselines (parallel solvers above NFE 5 are deferred: they cost far more
    # evaluations than their latency NFE and run at the end if the time budget allows)
    t0 = time.perf_counter()
    baselines = [s for s in solver_names() if not needs_params(s) and not is_alias(s)]
    jobs = []
    for s in baselines:
        ok = set(valid_budgets(s, up_to=max(cfg.nfes)))
        for n in cfg.nfes:
            if n in ok:
                jobs.append((s, n))
            else:
                skipped.append({"solver": s, "nfe": n, "reason": f"budget not reachable "
                                f"(valid: {', '.join(map(str, sorted(ok)))})"})
    jobs.sort(key=lambda j: (j[1], baselines.index(j[0])))
    cost: Dict[str, Tuple[int, float, float]] = {}   # solver -> (nfe, evals/sample, s/eval)
    deferred = []

    def run_baseline(s, n):
        try:
            x, st, wall = run(s, n)
        except (ValueError, RuntimeError) as e:
            skipped.append({"solver": s, "nfe": n, "reason": one_line(e)})
            _log(f"  skipped {s} at NFE {n}: {one_line(e)}")
            return
        record(s, n, x, st, wall, False)
        cost[s] = (n, float(st.total_evals), wall / max(float(st.total_evals) * N, 1e-9))

    def expensive(s):
        c = cost.get(s)
        return c is not None and c[1] > 2 * c[0]

    _log(f"[2/7] baselines: {len(baselines)} solvers x NFE {list(cfg.nfes)}")
    bar = _bar(len(jobs), "baselines", args.progress)
    for s, n in jobs:
        if n > cfg.defer_above and expensive(s):
            deferred.append((s, n))
        else:
            run_baseline(s, n)
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"{s} nfe={n}")
    if bar:
        bar.close()
    if deferred:
        _log("  deferred (many evaluations per latency NFE; run at the end if time allows): "
             + ", ".join(f"{s} NFE {n}" for s, n in deferred))
    timings["baselines"] = time.perf_counter() - t0

    # ---- distillation
    params_files = []
    distilled = []

    def save(params, name, nfe, seconds):
        params.meta.update({"model": args.model, "shape": list(shape), "class_labels": "seed",
                            "command": "epd demo"})
        path = os.path.join(pdir, f"{name}-nfe{nfe}.safetensors")
        params.save(path)
        params_files.append({"solver": name, "nfe": int(nfe), "path": path,
                             "seconds": seconds, "final_loss": params.meta.get("final_loss")})
        return path

    def sample_distilled(name, nfe, params):
        x, st, wall = run(name, nfe, params=params)
        r = record(name, nfe, x, st, wall, True)
        if name not in distilled:
            distilled.append(name)
        _log(f"  {name} nfe={nfe}: RMSE {r['rmse']:.4g}, FD {_fmt(r['fd'])}")

    from ..dode_fit import fit_dode

    t0 = time.perf_counter()
    _log(f"[3/7] D-ODE: {', '.join(cfg.dode_solvers)} at NFE {list(cfg.distill_nfes)} "
         f"(closed form, batch {cfg.dode_batch})")
    for name in cfg.dode_solvers:
        for nfe in cfg.distill_nfes:
            check_budget(name, nfe)
            t1 = time.perf_counter()
            p = fit_dode(model, solver=name, nfe=nfe, shape=shape, batch_size=cfg.dode_batch,
                         teacher_factor=cfg.dode_teacher_factor, device=device,
                         **cond_for(range(cfg.dode_batch)))
            save(p, name, nfe, time.perf_counter() - t1)
            sample_distilled(name, nfe, p)
    timings["d-ode"] = time.perf_counter() - t0

    from ..distill import distill

    amed_features = _amed_features(cfg.amed_features, model)
    seconds: Dict[Tuple[str, int], float] = {}   # (solver, nfe) -> distillation time

    def distill_one(name, nfe):
        """EPD, AMED or a plugin of either, with the demo's training settings."""
        t1 = time.perf_counter()
        if name.startswith("amed"):   # fresh noise, labels per batch row
            settings = dict(method="amed", amed_form="predictor", features=amed_features,
                            lr=cfg.amed_plugin_lr if name == "amed-ipndm" else cfg.amed_lr,
                            iterations=cfg.amed_iterations, pool=None,
                            **cond_for(range(cfg.epd_batch)))
        else:                          # a pool of draws, one label per pool entry
            settings = dict(num_points=cfg.num_points,
                            lr=cfg.plugin_lr if name == "epd-ipndm" else cfg.epd_lr,
                            iterations=cfg.epd_iterations, pool=cfg.epd_pool,
                            **cond_for(range(cfg.epd_pool)))
        p = distill(model, nfe=nfe, shape=shape, plugin=name.endswith("-ipndm"),
                    batch_size=cfg.epd_batch, M=cfg.epd_teacher_points, device=device,
                    progress=args.progress, **settings)
        sec = time.perf_counter() - t1
        seconds[(name, nfe)] = sec
        save(p, name, nfe, sec)
        sample_distilled(name, nfe, p)

    t0 = time.perf_counter()
    _log(f"[4/7] EPD: distilling at NFE {list(cfg.distill_nfes)} (K={cfg.num_points}, "
         f"{cfg.epd_iterations} iterations of batch {cfg.epd_batch} from a pool of "
         f"{cfg.epd_pool} draws)")
    for nfe in cfg.distill_nfes:
        distill_one("epd", nfe)
    timings["epd"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log(f"[5/7] AMED: distilling the predictor (features {amed_features!r}) at NFE "
         f"{list(cfg.distill_nfes)} ({cfg.amed_iterations} iterations of batch "
         f"{cfg.epd_batch})")
    for nfe in cfg.distill_nfes:
        distill_one("amed", nfe)
    timings["amed"] = time.perf_counter() - t0

    # ---- optional work, in order, each only if its estimated time fits the budget
    t0 = time.perf_counter()
    optional = [("baseline", s, n) for s, n in deferred]
    for n in sorted(cfg.distill_nfes, reverse=True):
        optional += [("plugin", "epd-ipndm", n), ("plugin", "amed-ipndm", n)]
    reserve = 5.0  # figures and files

    def estimate(kind, s, n):
        if kind == "plugin":  # a plugin costs what its solver cost at the same NFE
            return 1.15 * seconds[(s[:-len("-ipndm")], n)]
        n0, evals0, spe = cost[s]
        return evals0 * (n / n0) ** 2 * N * spe  # parallel solvers: evaluations ~ NFE^2

    if optional:
        _log(f"[6/7] optional runs within the {cfg.budget_s:.0f} s budget: "
             + ", ".join(f"{s} NFE {n}" for _, s, n in optional))
    for kind, s, n in optional:
        elapsed = time.perf_counter() - t_start
        need = estimate(kind, s, n)
        if elapsed + need + reserve > cfg.budget_s:
            reason = (f"time budget: {elapsed:.0f} s used, about {need:.0f} s more needed, "
                      f"budget {cfg.budget_s:.0f} s (raise --budget to include it)")
            skipped.append({"solver": s, "nfe": n, "reason": reason})
            _log(f"  skipped {s} at NFE {n}: {reason}")
        elif kind == "plugin":
            what = "EPD-Plugin" if s == "epd-ipndm" else "AMED-Plugin"
            _log(f"  {what} ({s}) at NFE {n}, about {need:.0f} s")
            distill_one(s, n)
        else:
            _log(f"  {s} at NFE {n}, about {need:.0f} s")
            run_baseline(s, n)
    timings["optional"] = time.perf_counter() - t0

    # ---- outputs
    t0 = time.perf_counter()
    _log("[7/7] figures and files")
    files = {"params": [p["path"] for p in params_files]}
    grid_path = os.path.join(out, "samples_grid.png")
    plot_path = os.path.join(out, "rmse_vs_nfe.png")
    row_names = [s for s in baselines if any(k[0] == s for k in cells)] + distilled
    grid_nfes = sorted(set(cfg.nfes) | set(cfg.distill_nfes))
    title = f"{args.model}: seeds 0-{cfg.show - 1}" + (
        f", labels 0-{min(cfg.show, model.num_classes) - 1}" if cond else "")
    try:
        labelled = plots.sample_grid_png(grid_path, cells, row_names, grid_nfes, shape,
                                         reference=ref[:cfg.show].numpy(), title=title)
        files["samples_grid"] = grid_path
        if not labelled:
            _log("  (matplotlib, a dependency of epd_kernels, is missing: the grid has no "
                 "labels; pip install matplotlib)")
    except ValueError as e:
        _log(f"  no sample grid: {e}")
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(r["solver"], []).append((r["latency_nfe"], r["rmse"]))
    if plots.error_plot_png(plot_path, series, distilled=distilled,
                            title=f"{args.model}: global RMSE to the reference ({N} samples)"):
        files["rmse_plot"] = plot_path
    else:
        _log("  no RMSE plot: matplotlib, a dependency of epd_kernels, is missing "
             "(pip install matplotlib)")
    table = _table(rows, ref_info)
    table_path = os.path.join(out, "table.md")
    outputs.atomic_write_bytes(table_path, (table + "\n").encode())
    files["table"] = table_path
    timings["outputs"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    results = {
        "model": args.model, "shape": list(shape), "num_samples": N, "seeds": f"0-{N - 1}",
        "class_labels": "seed % num_classes" if cond else None, "threads": threads,
        "rmse_kind": "global",
        "quick": bool(args.quick), "config": dataclasses.asdict(cfg),
        "reference": ref_info,
        "results": [{k: v for k, v in r.items() if k != "order"} for r in rows],
        "skipped": skipped, "params": params_files, "files": files, "timings": timings,
        "command": "epd " + " ".join(sys.argv[1:]),
    }
    json_path = os.path.join(out, "results.json")
    files["results"] = json_path
    outputs.write_json(json_path, results)

    _log("")
    _log(table)
    _log(f"\n* = lowest RMSE at that NFE. Global RMSE: the root of the mean squared "
         f"difference, over all {N} samples and their dimensions, to the reference solution "
         f"of the same ODE from the same noise; FD: Frechet distance in pixel space to the "
         f"data, from n = {N} samples. Wall time: sampling the {N} samples on CPU.")
    _log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    _log("files: " + ", ".join([json_path] + [v for k, v in files.items()
                                                if isinstance(v, str) and v != json_path]))
    return 0


#: The files a demo writes in its folder (regex of names; params go to params/).
_OWN_FILES = r"table\.md|results\.json|samples_grid\.png|rmse_vs_nfe\.png"
_RESULTS = ("table.md", "results.json", "samples_grid.png", "rmse_vs_nfe.png")


def _refuse_earlier_results(out, force: bool) -> None:
    """`UserError` if ``out`` holds an earlier demo's results, unless ``force``."""
    found = [n for n in _RESULTS if os.path.isfile(os.path.join(out, n))]
    pdir = os.path.join(out, "params")
    if os.path.isdir(pdir) and any(n.endswith(".safetensors") for n in os.listdir(pdir)):
        found.append("params/")
    if found and not force:
        raise UserError(f"--out {out} holds the results of an earlier demo "
                        f"({', '.join(found)}); give --force to replace them, or another --out")


def _amed_features(spec: str, model) -> str:
    """``spec`` if the model can give it (a ``module:`` spec needs that submodule),
    else "denoised", which every denoiser gives."""
    if spec == "denoised":
        return spec
    name = spec[len("module:"):]
    try:
        model.get_submodule(name)
    except AttributeError:  # no such submodule, or not an nn.Module at all
        return "denoised"
    return spec


def _bar(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)
