#!/usr/bin/env python
"""Branch benchmark: the K branch evaluations of one EPD step, batched vs sequential.

The K branch gradients ``g_k = (x_k - D(x_k, tau_k)) / tau_k`` of a step come from ONE call
on a ``[K*B, ...]`` batch (`BranchRunner.run`, what the sampler does) or from K sequential
calls of batch B. Timed per B and K = 1..4 on the `epd demo` model (digits U-Net, labels
``row % 10``) as one interleaved comparison (benchmarks/timing.py), after a check that
batched and sequential agree:

    main        one forward of batch B (the main-point call)
    batched     branch states + one forward of batch K*B + gradients (BranchRunner.run)
    sequential  K x (branch state + one forward of batch B + gradient)

with the ratios batched / main (1: the branches are free), sequential / main and sequential
/ batched. On a GPU the batched call is also timed with CUDA-graph replay.
Writes out_dir/branches.json and out_dir/branches.png.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
import warnings
from typing import Optional, Sequence

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from benchmarks.plot import line_panels  # noqa: E402
from benchmarks.run import int_list, reporter, section_main, torch_threads  # noqa: E402
from benchmarks.timing import Timer, bench_interleaved  # noqa: E402
from epd_kernels.branches import BranchRunner  # noqa: E402
from epd_kernels.models.registry import DEFAULT_MODEL, load_model  # noqa: E402
from epd_kernels.noise import make_noise  # noqa: E402

QUICK = dict(repeats=15, warmup=2, batches=(8, 64), ks=(1, 2, 3, 4))
FULL = dict(repeats=25, warmup=3, batches=(1, 8, 64, 256), ks=(1, 2, 3, 4))
T, T_NEXT = 10.0, 5.0  # one step of the sampler's range; the U-Net's cost does not depend on it


def _branch_fns(net, x, cond, K, use_cuda_graph):
    """(batched, sequential) callables for the K branch gradients at the same points."""
    B = x.shape[0]
    r = torch.linspace(0.2, 0.8, K, dtype=torch.float64)
    tau = (T * (T_NEXT / T) ** r).to(torch.float32)     # geometric branch points in (t', t)
    d = (x - net(x, torch.full((B,), T, device=x.device), **cond)) / T
    runner, tau_d = BranchRunner(net, K, use_cuda_graph=use_cuda_graph), tau.to(x.device)

    def batched():
        return runner.run(x, d, T, tau_d, None, **cond)

    taus = [float(v) for v in tau]
    sigmas = [torch.full((B,), v, device=x.device) for v in taus]

    def sequential():
        gs = []
        for k in range(K):
            xk = x + (taus[k] - T) * d
            gs.append((xk - net(xk, sigmas[k], **cond)) / taus[k])
        return torch.stack(gs)

    return batched, sequential, runner


def _stats_ms(st: dict) -> dict:
    """`bench_interleaved` statistics in milliseconds: median, min, q25, q75."""
    return {k[:-2]: 1e3 * st[k] for k in ("median_s", "min_s", "q25_s", "q75_s")}


def run(quick: bool, out_dir: pathlib.Path, *, device: str = "cpu",
        ks: Optional[Sequence[int]] = None, repeats: Optional[int] = None,
        batches: Optional[Sequence[int]] = None, model: str = DEFAULT_MODEL,
        threads: Optional[int] = None, verbose: bool = True) -> dict:
    """`threads`: torch CPU threads for the run (restored after); default 1 on a CPU: the
    8x8 U-Net batches are too small to split well, and two threads on a shared 2-core
    machine made the medians erratic (a B=64 main call: 11 ms in one run, 89 in another)."""
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    cpu = torch.device(device).type == "cpu"
    with torch_threads(threads or (1 if cpu else None)):
        return _run(quick, out_dir, device, ks, repeats, batches, model, verbose)


def _run(quick, out_dir, device, ks, repeats, batches, model, verbose) -> dict:
    t_start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch.cuda.is_available() is False")
    p = dict(QUICK if quick else FULL, **({} if repeats is None else {"repeats": int(repeats)}))
    ks = tuple(int(k) for k in (ks or p["ks"]))
    batches = tuple(int(b) for b in (batches or p["batches"]))
    for what, values in (("repeats", [p["repeats"]]), ("ks", ks), ("batches", batches)):
        if min(values) < 1:
            raise ValueError(f"{what} must be >= 1, got {list(values)}")
    say = reporter("branches", verbose)
    timer = Timer(dev)

    net = load_model(model, device=dev)
    shape = tuple(int(n) for n in net.shape)
    classes = int(getattr(net, "num_classes", 0) or 0)
    records = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # reference-backend notice
        for B in batches:
            for rec in _time_batch(net, B, ks, dev, timer, p, shape, classes):
                records.append(rec)
                say(f"B={B} K={rec['K']}: main {rec['main_ms']:.2f} ms, batched "
                    f"{rec['batched_ms']:.2f} ms, sequential {rec['sequential_ms']:.2f} ms")
    columns = ["B", "K", "main ms", "batched ms", "sequential ms", "batched/main",
               "sequential/main", "sequential/batched", "graph ms", "graph/eager"]
    table = {"title": f"{model} (the epd demo model): K branch evaluations in one K*B call "
                      f"vs K sequential B calls vs the main-point call",
             "columns": columns, "rows": [_row(rec) for rec in records]}
    result = {"tables": [table], "notes": _notes(records, p, dev, model, shape, classes, ks),
              "records": records,
              "config": {**p, "ks": list(ks), "batches": list(batches), "model": model,
                         "shape": list(shape), "device": dev.type,
                         "threads": torch.get_num_threads(), "quick": bool(quick)},
              "elapsed_s": time.perf_counter() - t_start}
    plot = _plot(records, batches, model, out_dir / "branches.png")
    if plot:
        result["plot"] = plot
    (out_dir / "branches.json").write_text(json.dumps(result, indent=2))
    return result


def _time_batch(net, B, ks, dev, timer, p, shape, classes) -> list:
    """One interleaved comparison at batch B: the main call and, per K, the batched and
    sequential branch evaluations (checked to agree first); one record per K."""
    x = (make_noise(range(B), shape) * T).to(dev)
    cond = ({"class_labels": (torch.arange(B) % classes).to(dev)} if classes else {})
    sigma_t = torch.full((B,), T, device=dev)
    fns = {"main": lambda: (x - net(x, sigma_t, **cond)) / T}
    runners = {}
    for K in ks:
        batched, sequential, _ = _branch_fns(net, x, cond, K, use_cuda_graph=False)
        # same maths, different batching: the timed variants must agree
        torch.testing.assert_close(batched(), sequential(), rtol=1e-4, atol=1e-4)
        fns[f"batched{K}"], fns[f"sequential{K}"] = batched, sequential
        if dev.type == "cuda":  # pragma: no cover - needs a GPU
            graph, _, runners[K] = _branch_fns(net, x, cond, K, use_cuda_graph=True)
            torch.testing.assert_close(graph(), batched(), rtol=1e-4, atol=1e-4)
            fns[f"graph{K}"] = graph
    res = bench_interleaved(timer, fns, repeats=p["repeats"], warmup=p["warmup"])
    t_main = res["main"]["median_s"]
    records = []
    for K in ks:
        t_b, t_s = res[f"batched{K}"]["median_s"], res[f"sequential{K}"]["median_s"]
        rec = {"B": B, "K": K, "main_ms": 1e3 * t_main, "batched_ms": 1e3 * t_b,
               "sequential_ms": 1e3 * t_s, "batched_over_main": t_b / t_main,
               "sequential_over_main": t_s / t_main, "sequential_over_batched": t_s / t_b,
               "stats_ms": {name: _stats_ms(res[name])
                            for name in ("main", f"batched{K}", f"sequential{K}")},
               "graph_ms": None, "graph_over_eager": None}
        if f"graph{K}" in res:  # pragma: no cover - needs a GPU
            rec["graph_ms"] = 1e3 * res[f"graph{K}"]["median_s"]
            rec["graph_over_eager"] = res[f"graph{K}"]["median_s"] / t_b
            rec["graph_captures"] = runners[K].captures
        records.append(rec)
    return records


def _row(rec: dict) -> list:
    keys = ("main_ms", "batched_ms", "sequential_ms", "batched_over_main",
            "sequential_over_main", "sequential_over_batched", "graph_ms", "graph_over_eager")
    return [rec["B"], rec["K"]] + ["-" if rec[k] is None else f"{rec[k]:.2f}" for k in keys]


def _notes(records, p, dev, model, shape, classes, ks):
    notes = []
    if dev.type != "cuda":
        notes.append("CUDA-graph replay vs eager: skipped (no GPU on this machine); run with "
                     "--device cuda on a GPU machine to fill the graph columns.")
    notes.append(f"Model {model}, input [B, {', '.join(map(str, shape))}]"
                 + (f", class labels row % {classes} (repeated per branch)" if classes else "")
                 + f"; medians over {p['repeats']} rounds after {p['warmup']} warm-up runs, "
                 "all variants of one B timed interleaved in rotating order (benchmarks/"
                 f"timing.py); device {dev.type}, {torch.get_num_threads()} CPU thread(s).")
    kmax = max(ks)
    if kmax > 1:
        parts = []
        for r in records:
            if r["K"] == kmax:
                gain = 1 - 1 / r["sequential_over_batched"]
                effect = (f"batching saves {100 * gain:.0f}%" if gain >= 0 else
                          f"the batched call takes {-100 * gain:.0f}% longer")
                parts.append(f"B={r['B']}: {r['batched_over_main']:.2f}x the main call batched, "
                             f"{r['sequential_over_main']:.2f}x sequential ({effect})")
        notes.append(f"Measured here, K={kmax} branches cost " + "; ".join(parts) + ". "
                     "A ratio batched/main near 1 means the branches ride along for free "
                     "(an accelerator with idle capacity at batch B); near K means the device "
                     "is compute-bound and batching only saves per-call overhead.")
    return notes


def _plot(records, batches, model, path: pathlib.Path):
    panels = []
    for B in batches:
        mine = sorted((r for r in records if r["B"] == B), key=lambda r: r["K"])
        if not mine:
            continue
        xs = [r["K"] for r in mine]
        panels.append({
            "title": f"B = {B}", "xlabel": "K (branches)", "ylabel": "median ms",
            "series": [{"label": "batched: one K*B call", "x": xs, "group": "batched",
                        "y": [r["batched_ms"] for r in mine]},
                       {"label": "sequential: K calls of B", "x": xs, "group": "sequential",
                        "y": [r["sequential_ms"] for r in mine]}],
            "hlines": [{"y": mine[0]["main_ms"], "label": "main-point call (batch B)"}]})
    written = line_panels(path, panels, title=f"{model}: branch evaluations of one EPD step",
                          xlog2=False)
    return path.name if written else None


if __name__ == "__main__":
    sys.exit(section_main("branches", run, [
        "--device", "--ks", "--repeats", "--threads", ("--batches", dict(type=int_list)),
        ("--model", dict(default=DEFAULT_MODEL))]))
