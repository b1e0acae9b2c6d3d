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
7. a table (global RMSE to the reference, Frechet distance in pixel space to the data, latency
   NFE, total evaluations, wall time) printed and saved, ``samples_grid.png`` (rows =
   solvers, columns = NFE), ``rmse_vs_nfe.png``, the params under ``params/`` and
   ``results.json`` with every figure and the time of each stage (``timings``: reference,
   baselines, d-ode, epd, amed, optional, outputs, total).

``--quick`` uses tiny settings (seconds) for tests and runs everything. The default
settings were chosen to finish in about 2-3 minutes on 2 CPU cores; the threads are
picked by timing one batch with 1 and with all cores (a busy machine is often much faster
with one).

EPD's settings: one experiment on digits-unet (RMSE to the 60-step reference on the
demo's 256 samples, default grid). The RMSE figures of this paragraph and the next are
means of per-sample RMS values, which by Jensen's inequality lie at or below the global
RMSE the table reports (digits-unet, Euler NFE 3: 0.1891 against 0.2027); their ranking
is what the settings rest on. The earlier 40 iterations on fresh noise left
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
from ..noise import make_noise
from ..sampling import sample
from ..solvers.registry import solver_names, valid_budgets
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


def _config(args) -> DemoConfig:
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
    return cfg


def run_demo(args) -> int:
    cfg = _config(args)
    _refuse_earlier_results(args.out, args.force)
    demo = _Demo(args, cfg)
    demo.stage("reference", demo.reference)
    demo.stage("baselines", demo.baselines)
    demo.stage("d-ode", demo.dode)
    demo.stage("epd", demo.epd)
    demo.stage("amed", demo.amed)
    demo.stage("optional", demo.optional)
    demo.stage("outputs", demo.write_outputs)
    demo.report()
    return 0


class _Demo:
    """One demo run: its settings, model and noise, and the results its stages (one method
    each, run in order by `run_demo`) add up."""

    def __init__(self, args, cfg: DemoConfig):
        self.args, self.cfg = args, cfg
        self.t_start = time.perf_counter()
        self.timings: Dict[str, float] = {}
        self.out = outputs.ensure_writable_dir(args.out)
        self.pdir = outputs.ensure_writable_dir(os.path.join(self.out, "params"))
        outputs.remove_stale_temporaries(self.out, _OWN_FILES)
        self.device = args.device
        self.model = load_model_or_fail(args.model, device=self.device)
        self.shape = model_shape(self.model)
        self.N = N = cfg.num_samples
        if args.threads == "auto" and args.quick:
            self.threads = pick_threads(1, None)  # tiny batches never gain from more threads
        else:
            self.threads = pick_threads(args.threads, model_batch_runner(
                self.model, self.shape, 128, self.cond_for(range(128)), self.device),
                self.device)
        self.noise = make_noise(range(N), self.shape, device=self.device)
        self.cond = self.cond_for(range(N))
        data = _data_for(args.model, self.model)
        self.data_stats = feature_stats(data) if data is not None else None
        self.run = _Runner(self.model, self.noise, self.cond, cfg.chunk)
        self.rows: List[dict] = []
        self.skipped: List[dict] = []
        self.cells: Dict[Tuple[str, int], np.ndarray] = {}
        self.order: Dict[str, int] = {}
        self.cost: Dict[str, Tuple[int, float, float]] = {}  # solver: nfe, evals, s/eval
        self.deferred: List[Tuple[str, int]] = []
        self.params_files: List[dict] = []
        self.distilled: List[str] = []
        self.seconds: Dict[Tuple[str, int], float] = {}  # (solver, nfe): distill time
        self.baseline_names = [s for s in solver_names()
                               if not needs_params(s) and not is_alias(s)]
        self.amed_features = _amed_features(cfg.amed_features, self.model)
        _log(f"epd demo: model {args.model} (shape {list(self.shape)}"
             + (f", labels = seed % {self.model.num_classes}" if self.cond else "")
             + f"), {N} samples, {self.threads} thread(s), output {self.out}"
             + (" [quick]" if args.quick else ""))

    def stage(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t0

    def cond_for(self, keys) -> dict:
        lab = class_labels_for(self.model, keys, "seed")
        return {} if lab is None else {"class_labels": lab.to(self.device)}

    def fd_of(self, x) -> Optional[float]:
        if self.data_stats is None:
            return None
        mu, cov = feature_stats(x.numpy())
        return frechet_distance_from_stats(mu, cov, *self.data_stats)

    def record(self, name, nfe, x, st, wall, distilled) -> dict:
        self.order.setdefault(name, len(self.order))
        r = {"solver": name, "nfe": int(nfe), "latency_nfe": st.latency_nfe,
             "total_evals": st.total_evals, "steps": st.steps,
             "rmse": global_rmse(x, self.ref), "fd": self.fd_of(x), "wall_time_s": wall,
             "num_samples": self.N, "distilled": distilled, "order": self.order[name]}
        self.rows.append(r)
        self.cells[(name, int(nfe))] = x[:self.cfg.show].numpy()
        return r

    # ---- 1. reference

    def reference(self) -> None:
        cfg, m = self.cfg, min(self.cfg.ref_check_samples, self.N)
        _log(f"[1/7] reference: {cfg.ref_solver} with {cfg.ref_nfe} steps")
        self.ref, st, wall = self.run(cfg.ref_solver, cfg.ref_nfe, progress=self.args.progress)
        half = sample(self.model, self.noise[:m], solver=cfg.ref_solver, nfe=cfg.ref_nfe // 2,
                      **{k: v[:m] for k, v in self.cond.items()})
        self.ref_info = {
            "solver": cfg.ref_solver, "nfe": cfg.ref_nfe, "latency_nfe": st.latency_nfe,
            "steps": st.steps, "total_evals": st.total_evals,
            "error_estimate": global_rmse(half.cpu(), self.ref[:m]) / 7.0,  # 3rd order: 2^3-1
            "error_check": f"global RMSE to {cfg.ref_nfe // 2} steps on {m} samples / 7",
            "fd": self.fd_of(self.ref), "wall_time_s": wall, "num_samples": self.N}

    # ---- 2. baselines (parallel solvers above NFE 5 are deferred: they cost far more
    # evaluations than their latency NFE and run at the end if the time budget allows)

    def baselines(self) -> None:
        cfg, names = self.cfg, self.baseline_names
        jobs = []
        for s in names:
            ok = set(valid_budgets(s, up_to=max(cfg.nfes)))
            for n in cfg.nfes:
                if n in ok:
                    jobs.append((s, n))
                else:
                    self.skipped.append({"solver": s, "nfe": n, "reason": f"budget not "
                                         f"reachable (valid: {', '.join(map(str, sorted(ok)))})"})
        jobs.sort(key=lambda j: (j[1], names.index(j[0])))
        _log(f"[2/7] baselines: {len(names)} solvers x NFE {list(cfg.nfes)}")
        bar = _bar(len(jobs), "baselines", self.args.progress)
        for s, n in jobs:
            c = self.cost.get(s)
            if n > cfg.defer_above and c is not None and c[1] > 2 * c[0]:  # expensive
                self.deferred.append((s, n))
            else:
                self.run_baseline(s, n)
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{s} nfe={n}")
        if bar:
            bar.close()
        if self.deferred:
            _log("  deferred (many evaluations per latency NFE; run at the end if time "
                 "allows): " + ", ".join(f"{s} NFE {n}" for s, n in self.deferred))

    def run_baseline(self, s, n) -> None:
        try:
            x, st, wall = self.run(s, n)
        except (ValueError, RuntimeError) as e:
            self.skipped.append({"solver": s, "nfe": n, "reason": one_line(e)})
            _log(f"  skipped {s} at NFE {n}: {one_line(e)}")
            return
        self.record(s, n, x, st, wall, False)
        evals = float(st.total_evals)
        self.cost[s] = (n, evals, wall / max(evals * self.N, 1e-9))

    # ---- 3-5. distilled solvers

    def save(self, params, name, nfe, seconds) -> None:
        params.meta.update({"model": self.args.model, "shape": list(self.shape),
                            "class_labels": "seed", "command": "epd demo"})
        path = os.path.join(self.pdir, f"{name}-nfe{nfe}.safetensors")
        params.save(path, overwrite=True)   # its folder was checked (demo --force)
        self.params_files.append({"solver": name, "nfe": int(nfe), "path": path,
                                  "seconds": seconds,
                                  "final_loss": params.meta.get("final_loss")})

    def sample_distilled(self, name, nfe, params) -> None:
        x, st, wall = self.run(name, nfe, params=params)
        r = self.record(name, nfe, x, st, wall, True)
        if name not in self.distilled:
            self.distilled.append(name)
        _log(f"  {name} nfe={nfe}: RMSE {r['rmse']:.4g}, FD {_fmt(r['fd'])}")

    def dode(self) -> None:
        from ..distill.dode_fit import fit_dode

        cfg = self.cfg
        _log(f"[3/7] D-ODE: {', '.join(cfg.dode_solvers)} at NFE {list(cfg.distill_nfes)} "
             f"(closed form, batch {cfg.dode_batch})")
        for name in cfg.dode_solvers:
            for nfe in cfg.distill_nfes:
                check_budget(name, nfe)
                t1 = time.perf_counter()
                p = fit_dode(self.model, solver=name, nfe=nfe, shape=self.shape,
                             batch_size=cfg.dode_batch, teacher_factor=cfg.dode_teacher_factor,
                             device=self.device, **self.cond_for(range(cfg.dode_batch)))
                self.save(p, name, nfe, time.perf_counter() - t1)
                self.sample_distilled(name, nfe, p)

    def distill_one(self, name, nfe) -> None:
        """EPD, AMED or a plugin of either, with the demo's training settings."""
        from ..distill import distill

        cfg, t1 = self.cfg, time.perf_counter()
        if name.startswith("amed"):   # fresh noise, labels per batch row
            settings = dict(method="amed", amed_form="predictor", features=self.amed_features,
                            lr=cfg.amed_plugin_lr if name == "amed-ipndm" else cfg.amed_lr,
                            iterations=cfg.amed_iterations, pool=None,
                            **self.cond_for(range(cfg.epd_batch)))
        else:                          # a pool of draws, one label per pool entry
            settings = dict(num_points=cfg.num_points,
                            lr=cfg.plugin_lr if name == "epd-ipndm" else cfg.epd_lr,
                            iterations=cfg.epd_iterations, pool=cfg.epd_pool,
                            **self.cond_for(range(cfg.epd_pool)))
        p = distill(self.model, nfe=nfe, shape=self.shape, plugin=name.endswith("-ipndm"),
                    batch_size=cfg.epd_batch, M=cfg.epd_teacher_points, device=self.device,
                    progress=self.args.progress, time_budget_s=None, compare=False,
                    **settings)   # the demo sets every size itself and compares every solver
        sec = time.perf_counter() - t1
        self.seconds[(name, nfe)] = sec
        self.save(p, name, nfe, sec)
        self.sample_distilled(name, nfe, p)

    def epd(self) -> None:
        cfg = self.cfg
        _log(f"[4/7] EPD: distilling at NFE {list(cfg.distill_nfes)} (K={cfg.num_points}, "
             f"{cfg.epd_iterations} iterations of batch {cfg.epd_batch} from a pool of "
             f"{cfg.epd_pool} draws)")
        for nfe in cfg.distill_nfes:
            self.distill_one("epd", nfe)

    def amed(self) -> None:
        cfg = self.cfg
        _log(f"[5/7] AMED: distilling the predictor (features {self.amed_features!r}) at NFE "
             f"{list(cfg.distill_nfes)} ({cfg.amed_iterations} iterations of batch "
             f"{cfg.epd_batch})")
        for nfe in cfg.distill_nfes:
            self.distill_one("amed", nfe)

    # ---- 6. optional work, in order, each only if its estimated time fits the budget

    def estimate(self, kind, s, n) -> float:
        if kind == "plugin":  # a plugin costs what its solver cost at the same NFE
            return 1.15 * self.seconds[(s[:-len("-ipndm")], n)]
        n0, evals0, spe = self.cost[s]
        return evals0 * (n / n0) ** 2 * self.N * spe  # parallel solvers: evals ~ NFE^2

    def optional(self) -> None:
        cfg, reserve = self.cfg, 5.0  # seconds kept for the figures and files
        todo = [("baseline", s, n) for s, n in self.deferred]
        for n in sorted(cfg.distill_nfes, reverse=True):
            todo += [("plugin", "epd-ipndm", n), ("plugin", "amed-ipndm", n)]
        if todo:
            _log(f"[6/7] optional runs within the {cfg.budget_s:.0f} s budget: "
                 + ", ".join(f"{s} NFE {n}" for _, s, n in todo))
        for kind, s, n in todo:
            elapsed = time.perf_counter() - self.t_start
            need = self.estimate(kind, s, n)
            if elapsed + need + reserve > cfg.budget_s:
                reason = (f"time budget: {elapsed:.0f} s used, about {need:.0f} s more "
                          f"needed, budget {cfg.budget_s:.0f} s (raise --budget to include it)")
                self.skipped.append({"solver": s, "nfe": n, "reason": reason})
                _log(f"  skipped {s} at NFE {n}: {reason}")
            elif kind == "plugin":
                what = "EPD-Plugin" if s == "epd-ipndm" else "AMED-Plugin"
                _log(f"  {what} ({s}) at NFE {n}, about {need:.0f} s")
                self.distill_one(s, n)
            else:
                _log(f"  {s} at NFE {n}, about {need:.0f} s")
                self.run_baseline(s, n)

    # ---- 7. figures, table, results.json

    def write_figures(self) -> dict:
        cfg, model, files = self.cfg, self.args.model, {}
        grid_path = os.path.join(self.out, "samples_grid.png")
        plot_path = os.path.join(self.out, "rmse_vs_nfe.png")
        row_names = ([s for s in self.baseline_names if any(k[0] == s for k in self.cells)]
                     + self.distilled)
        grid_nfes = sorted(set(cfg.nfes) | set(cfg.distill_nfes))
        title = f"{model}: seeds 0-{cfg.show - 1}" + (
            f", labels 0-{min(cfg.show, self.model.num_classes) - 1}" if self.cond else "")
        try:
            labelled = plots.sample_grid_png(grid_path, self.cells, row_names, grid_nfes,
                                             self.shape, reference=self.ref[:cfg.show].numpy(),
                                             title=title)
            files["samples_grid"] = grid_path
            if not labelled:
                _log("  (matplotlib, a dependency of epd_kernels, is missing: the grid has "
                     "no labels; pip install matplotlib)")
        except ValueError as e:
            _log(f"  no sample grid: {e}")
        series: Dict[str, List[Tuple[int, float]]] = {}
        for r in self.rows:
            series.setdefault(r["solver"], []).append((r["latency_nfe"], r["rmse"]))
        if plots.error_plot_png(plot_path, series, distilled=self.distilled,
                                title=f"{model}: global RMSE to the reference ({self.N} "
                                      f"samples)"):
            files["rmse_plot"] = plot_path
        else:
            _log("  no RMSE plot: matplotlib, a dependency of epd_kernels, is missing "
                 "(pip install matplotlib)")
        return files

    def write_outputs(self) -> None:
        _log("[7/7] figures and files")
        self.files = {"params": [p["path"] for p in self.params_files]}
        self.files.update(self.write_figures())
        self.table = _table(self.rows, self.ref_info)
        table_path = os.path.join(self.out, "table.md")
        outputs.atomic_write_bytes(table_path, (self.table + "\n").encode())
        self.files["table"] = table_path

    def report(self) -> None:
        """Writes results.json (with every stage's time) and prints the table."""
        self.timings["total"] = time.perf_counter() - self.t_start
        N, cfg = self.N, self.cfg
        json_path = os.path.join(self.out, "results.json")
        self.files["results"] = json_path
        outputs.write_json(json_path, {
            "model": self.args.model, "shape": list(self.shape), "num_samples": N,
            "seeds": f"0-{N - 1}",
            "class_labels": "seed % num_classes" if self.cond else None,
            "threads": self.threads, "rmse_kind": "global", "quick": bool(self.args.quick),
            "config": dataclasses.asdict(cfg), "reference": self.ref_info,
            "results": [{k: v for k, v in r.items() if k != "order"} for r in self.rows],
            "skipped": self.skipped, "params": self.params_files, "files": self.files,
            "timings": self.timings, "command": "epd " + " ".join(sys.argv[1:])})
        _log("")
        _log(self.table)
        _log(f"\n* = lowest RMSE at that NFE. Global RMSE: the root of the mean squared "
             f"difference, over all {N} samples and their dimensions, to the reference "
             f"solution of the same ODE from the same noise; FD: Frechet distance in pixel "
             f"space to the data, from n = {N} samples. Wall time: sampling the {N} samples "
             f"on CPU.")
        _log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        _log("files: " + ", ".join([json_path] + [v for v in self.files.values()
                                                    if isinstance(v, str) and v != json_path]))


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
