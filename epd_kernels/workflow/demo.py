"""`epd demo`: distil EPD, AMED and D-ODE, compare every solver at equal latency, draw it.

On one model (default the embedded digits U-Net, labels = seed % 10) every solver samples
the same noise, in stages (sizes in `DemoConfig`; each stage timed in ``results.json``):
a many-step UniPC reference (error estimated against half its steps); every solver without
params (aliases skipped) at each of ``nfes``; D-ODE (closed form), EPD (on a pool of draws)
and AMED-Solver (the predictor, on fresh noise) at each of ``distill_nfes``; optional runs
only if their estimated time fits ``--budget`` (parallel solvers above NFE 5, ParaDiGMS
spending ~NFE^2 evaluations; then EPD-Plugin and AMED-Plugin); then ``table.md``,
``samples_grid.png``, ``rmse_vs_nfe.png``, ``params/``, ``results.json``. ``--quick``: tiny
settings (seconds) for tests; the defaults take 2-3 minutes on 2 cores.

Why these settings (digits-unet, mean per-sample RMSE to the reference on 256 samples):
EPD trains on a pool (the teacher runs once), so 150 iterations cost what 40 on fresh noise
did; lr 0.1 gives 0.049 at NFE 5 against iPNDM's 0.107, and EPD-Plugin does best at lr 0.05.
AMED's predictor reads the denoised estimate, which beat the U-Net bottleneck
("module:net.mid2") in all 7 matched runs; lr 0.2 (0.05 for AMED-Plugin, which starts from
iPNDM, much closer to the teacher).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from functools import partial
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..metrics import feature_stats, frechet_distance_from_stats, global_rmse
from ..noise import make_noise
from ..sampling import sample
from ..solvers.registry import solver_names, valid_budgets
from . import outputs, plots
from .errors import UserError, one_line
from .eval_job import model_data
from .resolve import (ALIASES, check_budget, label_cond, load_model_or_fail, model_shape,
                      needs_params)
from .threads import model_batch_runner, pick_threads

__all__ = ["run_demo", "DemoConfig", "DEFAULT", "QUICK"]


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
    amed_features: str = "denoised"   # a "module:" spec falls back to it without that module
    amed_lr: float = 0.2
    amed_plugin_lr: float = 0.05
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
                   amed_iterations=2, dode_batch=8, dode_teacher_factor=2, show=4,
                   budget_s=1e9)

#: The files a demo writes in its folder (params go to params/).
_RESULTS = ("table.md", "results.json", "samples_grid.png", "rmse_vs_nfe.png")
_OWN_FILES = "|".join(name.replace(".", r"\.") for name in _RESULTS)
_NO_MATPLOTLIB = "matplotlib, a dependency of epd_kernels, is missing (pip install matplotlib)"

_log = partial(print, flush=True)


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _table_cells(r: dict, name: str, rmse: str) -> List[str]:
    return [name, str(r["nfe"]), str(r["latency_nfe"]), _fmt(r["total_evals"]), rmse,
            _fmt(r["fd"]), f"{r['wall_time_s']:.2f}",
            f"{1000 * r['wall_time_s'] / r['num_samples']:.2f}"]


def _table(rows: List[dict], ref: dict) -> str:
    """The Markdown table: the reference, then the solvers by NFE (* = lowest RMSE)."""
    head = ["solver", "NFE", "latency NFE", "total evals", "global RMSE to ref",
            f"FD (pixels, n={ref['num_samples']})", "wall (s)", "ms/sample"]
    lines = [_table_cells(ref, f"reference: {ref['solver']}",
                          _fmt(ref["error_estimate"]) + " (est.)")]
    best = {n: min(r["rmse"] for r in rows if r["nfe"] == n) for n in {r["nfe"] for r in rows}}
    ran = list(dict.fromkeys(r["solver"] for r in rows))   # equal NFE and kind: in run order
    for r in sorted(rows, key=lambda r: (r["nfe"], r["distilled"], ran.index(r["solver"]))):
        star = " *" if r["rmse"] == best[r["nfe"]] else ""
        lines.append(_table_cells(r, r["solver"], _fmt(r["rmse"]) + star))
    w = [max(len(head[i]), *(len(cells[i]) for cells in lines)) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cells)) + " |"
           for cells in [head] + lines]
    out.insert(1, "|" + "|".join("-" * (wi + 2) for wi in w) + "|")
    return "\n".join(out)


def _config(args) -> DemoConfig:
    over = {"nfes": tuple(args.nfes) if args.nfes else None,
            "num_samples": args.num_samples, "budget_s": args.budget}
    cfg = dataclasses.replace(QUICK if args.quick else DEFAULT,
                              **{k: v for k, v in over.items() if v is not None})
    if cfg.num_samples < 2:
        raise UserError("--num-samples must be >= 2 (the Frechet distance needs 2)")
    return cfg


def run_demo(args) -> int:
    cfg = _config(args)
    _refuse_earlier_results(args.out, args.force)
    demo = _Demo(args, cfg)
    for name, stage in (("reference", demo.reference), ("baselines", demo.baselines),
                        ("d-ode", demo.dode), ("epd", partial(demo.distill_stage, "epd")),
                        ("amed", partial(demo.distill_stage, "amed")),
                        ("optional", demo.optional), ("outputs", demo.write_outputs)):
        t0 = time.perf_counter()
        stage()
        demo.timings[name] = time.perf_counter() - t0
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
        try:
            self.data_stats = feature_stats(model_data(args.model, self.model))
        except UserError:   # a model without data: no Frechet distance
            self.data_stats = None
        self.rows: List[dict] = []
        self.skipped: List[dict] = []
        self.cells: Dict[Tuple[str, int], np.ndarray] = {}
        self.cost: Dict[str, Tuple[int, float, float]] = {}  # solver: nfe, evals, s/eval
        self.deferred: List[Tuple[str, int]] = []
        self.params_files: List[dict] = []
        self.distilled: List[str] = []
        self.baseline_names = [s for s in solver_names()
                               if not needs_params(s) and s not in ALIASES]
        self.amed_features = _amed_features(cfg.amed_features, self.model)
        _log(f"epd demo: model {args.model} (shape {list(self.shape)}"
             + (f", labels = seed % {self.model.num_classes}" if self.cond else "")
             + f"), {N} samples, {self.threads} thread(s), output {self.out}"
             + (" [quick]" if args.quick else ""))

    def cond_for(self, keys) -> dict:
        return label_cond(self.model, keys, "seed", self.device)

    def fd_of(self, x) -> Optional[float]:
        if self.data_stats is None:
            return None
        return frechet_distance_from_stats(*feature_stats(x.numpy()), *self.data_stats)

    def run(self, solver, nfe, params=None, progress=False):
        """``(samples, stats, wall time)`` of one solver on the demo's noise, in chunks."""
        outs, wall, st0 = [], 0.0, None
        for a in range(0, self.N, self.cfg.chunk):
            part = slice(a, min(self.N, a + self.cfg.chunk))
            x, st = sample(self.model, self.noise[part], solver=solver, nfe=nfe, params=params,
                           return_stats=True, progress=progress,
                           **{k: v[part] for k, v in self.cond.items()})
            outs.append(x.detach().cpu())
            wall += st.wall_time_s
            st0 = st0 or st
        return torch.cat(outs), st0, wall

    def record(self, name, nfe, params=None) -> dict:
        """Samples with one solver (distilled if it has ``params``) and adds its row."""
        x, st, wall = self.run(name, nfe, params=params)
        r = {"solver": name, "nfe": int(nfe), "latency_nfe": st.latency_nfe,
             "total_evals": st.total_evals, "steps": st.steps,
             "rmse": global_rmse(x, self.ref), "fd": self.fd_of(x), "wall_time_s": wall,
             "num_samples": self.N, "distilled": params is not None}
        self.rows.append(r)
        self.cells[(name, int(nfe))] = x[:self.cfg.show].numpy()
        return r

    def skip(self, solver, nfe, reason) -> None:
        self.skipped.append({"solver": solver, "nfe": nfe, "reason": reason})
        _log(f"  skipped {solver} at NFE {nfe}: {reason}")

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
        from tqdm.auto import tqdm

        cfg, names = self.cfg, self.baseline_names
        jobs = []
        for s in names:
            ok = set(valid_budgets(s, up_to=max(cfg.nfes)))
            jobs += [(s, n) for n in cfg.nfes if n in ok]
            self.skipped += [{"solver": s, "nfe": n, "reason": "budget not reachable (valid: "
                              + ", ".join(map(str, sorted(ok))) + ")"}
                             for n in cfg.nfes if n not in ok]
        jobs.sort(key=lambda j: (j[1], names.index(j[0])))
        _log(f"[2/7] baselines: {len(names)} solvers x NFE {list(cfg.nfes)}")
        bar = tqdm(jobs, desc="baselines", dynamic_ncols=True, disable=not self.args.progress)
        for s, n in bar:
            c = self.cost.get(s)
            if n > cfg.defer_above and c is not None and c[1] > 2 * c[0]:  # expensive
                self.deferred.append((s, n))
            else:
                self.run_baseline(s, n)
            bar.set_postfix_str(f"{s} nfe={n}")
        bar.close()
        if self.deferred:
            _log("  deferred (many evaluations per latency NFE; run at the end if time "
                 "allows): " + ", ".join(f"{s} NFE {n}" for s, n in self.deferred))

    def run_baseline(self, s, n) -> None:
        try:
            r = self.record(s, n)
        except (ValueError, RuntimeError) as e:
            self.skip(s, n, one_line(e))
            return
        evals = float(r["total_evals"])
        self.cost[s] = (n, evals, r["wall_time_s"] / max(evals * self.N, 1e-9))

    # ---- 3-5. distilled solvers

    def save_and_sample(self, params, name, nfe, seconds) -> None:
        params.meta.update({"model": self.args.model, "shape": list(self.shape),
                            "class_labels": "seed", "command": "epd demo"})
        path = os.path.join(self.pdir, f"{name}-nfe{nfe}.safetensors")
        params.save(path, overwrite=True)   # its folder was checked (demo --force)
        self.params_files.append({"solver": name, "nfe": int(nfe), "path": path,
                                  "seconds": seconds,
                                  "final_loss": params.meta.get("final_loss")})
        r = self.record(name, nfe, params)
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
                self.save_and_sample(p, name, nfe, time.perf_counter() - t1)

    def distill_one(self, name, nfe) -> None:
        """EPD, AMED or a plugin of either, with the demo's training settings."""
        from ..distill import distill

        cfg, t1, plugin = self.cfg, time.perf_counter(), name.endswith("-ipndm")
        if name.startswith("amed"):   # fresh noise, labels per batch row
            settings = dict(method="amed", amed_form="predictor", features=self.amed_features,
                            lr=cfg.amed_plugin_lr if plugin else cfg.amed_lr,
                            iterations=cfg.amed_iterations, pool=None,
                            **self.cond_for(range(cfg.epd_batch)))
        else:                          # a pool of draws, one label per pool entry
            settings = dict(num_points=cfg.num_points,
                            lr=cfg.plugin_lr if plugin else cfg.epd_lr,
                            iterations=cfg.epd_iterations, pool=cfg.epd_pool,
                            **self.cond_for(range(cfg.epd_pool)))
        p = distill(self.model, nfe=nfe, shape=self.shape, plugin=plugin,
                    batch_size=cfg.epd_batch, M=cfg.epd_teacher_points, teacher="dpm2",
                    device=self.device,
                    progress=self.args.progress, time_budget_s=None, compare=False,
                    **settings)   # the demo sets every size itself and compares every solver
        self.save_and_sample(p, name, nfe, time.perf_counter() - t1)

    def distill_stage(self, name: str) -> None:
        """Stage 4 ("epd") or 5 ("amed"): that solver distilled at every distill NFE."""
        cfg, nfes = self.cfg, list(self.cfg.distill_nfes)
        if name == "epd":
            _log(f"[4/7] EPD: distilling at NFE {nfes} (K={cfg.num_points}, "
                 f"{cfg.epd_iterations} iterations of batch {cfg.epd_batch} from a pool of "
                 f"{cfg.epd_pool} draws)")
        else:
            _log(f"[5/7] AMED: distilling the predictor (features {self.amed_features!r}) at "
                 f"NFE {nfes} ({cfg.amed_iterations} iterations of batch {cfg.epd_batch})")
        for nfe in nfes:
            self.distill_one(name, nfe)

    # ---- 6. optional work, in order, each only if its estimated time fits the budget

    def estimate(self, kind, s, n) -> float:
        if kind == "plugin":  # a plugin costs what its solver cost at the same NFE
            return 1.15 * next(p["seconds"] for p in self.params_files
                               if (p["solver"], p["nfe"]) == (s[:-len("-ipndm")], n))
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
                self.skip(s, n, f"time budget: {elapsed:.0f} s used, about {need:.0f} s more "
                          f"needed, budget {cfg.budget_s:.0f} s (raise --budget to include it)")
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
                _log(f"  (the grid has no labels: {_NO_MATPLOTLIB})")
        except ValueError as e:
            _log(f"  no sample grid: {e}")
        series: Dict[str, List[Tuple[int, float]]] = {}
        for r in self.rows:
            series.setdefault(r["solver"], []).append((r["latency_nfe"], r["rmse"]))
        if plots.error_plot_png(plot_path, series, distilled=self.distilled,
                                title=f"{model}: global RMSE to the reference ({self.N} samples)"):
            files["rmse_plot"] = plot_path
        else:
            _log(f"  no RMSE plot: {_NO_MATPLOTLIB}")
        return files

    def write_outputs(self) -> None:
        _log("[7/7] figures and files")
        self.files = {"params": [p["path"] for p in self.params_files], **self.write_figures(),
                      "table": os.path.join(self.out, "table.md")}
        self.table = _table(self.rows, self.ref_info)
        outputs.write_atomic(self.files["table"], (self.table + "\n").encode())

    def report(self) -> None:
        """Writes results.json (with every stage's time) and prints the table."""
        self.timings["total"] = time.perf_counter() - self.t_start
        N = self.N
        json_path = self.files["results"] = os.path.join(self.out, "results.json")
        outputs.write_json(json_path, {
            "model": self.args.model, "shape": list(self.shape), "num_samples": N,
            "seeds": f"0-{N - 1}", "class_labels": "seed % num_classes" if self.cond else None,
            "threads": self.threads, "rmse_kind": "global", "quick": bool(self.args.quick),
            "config": dataclasses.asdict(self.cfg), "reference": self.ref_info,
            "results": self.rows, "skipped": self.skipped, "params": self.params_files,
            "files": self.files, "timings": self.timings,
            "command": "epd " + " ".join(sys.argv[1:])})
        _log("\n" + self.table)
        _log(f"\n* = lowest RMSE at that NFE. Global RMSE: the root of the mean squared "
             f"difference, over all {N} samples and their dimensions, to the reference "
             f"solution of the same ODE from the same noise; FD: Frechet distance in pixel "
             f"space to the data, from n = {N} samples. Wall time: sampling the {N} samples "
             f"on CPU.")
        _log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        _log("files: " + ", ".join([json_path] + [v for v in self.files.values()
                                                    if isinstance(v, str) and v != json_path]))


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
    try:
        model.get_submodule(spec[len("module:"):])
    except AttributeError:  # no such submodule, or not an nn.Module at all
        return "denoised"
    return spec
