#!/usr/bin/env python
"""Branch benchmark: wall time of ONE EPD step, batched K*B call vs K sequential calls.

A step of EPD with K branches costs one main-point call (batch B) plus the K branch
evaluations. They can run as one batched call of size K*B (`BranchRunner`, what the
sampler does) or as K sequential calls of size B. The reference is a single-evaluation
step (Euler: one call of batch B). Reported per K: medians over repeats and the ratios

    batched / single      (the latency price of K parallel branches)
    sequential / single   (what it would cost without batching)

The denoiser is a small convolutional network built here (random init, eval mode, no
grad): EDM-style preconditioning around Conv2d 3->C->C->3 with a sigma embedding, on
``[8, 3, 32, 32]`` inputs. On a GPU, the batched call is also timed with CUDA-graph replay
vs eager; without a GPU that row is skipped with a note.

    python benchmarks/bench_branches.py [--quick] [--out benchmarks/results] [--device cpu]

`run(quick, out_dir)` returns {"tables", "notes", ...} and writes out_dir/branches.json.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # an installed epd_kernels wins

from epd_kernels.branches import BranchRunner  # noqa: E402
from epd_kernels.ops import epd_step  # noqa: E402

QUICK = dict(repeats=5, warmup=1, batch=8, hidden=32, ks=(2, 4))
FULL = dict(repeats=25, warmup=3, batch=8, hidden=64, ks=(2, 4))


class ConvDenoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, log sigma); F = 3 convs with a sigma embedding."""

    def __init__(self, channels: int = 3, hidden: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.emb = nn.Linear(1, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(max(1, p[0].numel()))))

    def forward(self, x, sigma, **_):
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(s ** 2 + 1)
        c_skip = 1 / (s ** 2 + 1)
        c_out = s / torch.sqrt(s ** 2 + 1)
        e = self.emb(torch.log(s.view(-1, 1)) / 4)[:, :, None, None]
        h = torch.nn.functional.silu(self.conv1(c_in * x) + e)
        h = torch.nn.functional.silu(self.conv2(h))
        return c_skip * x + c_out * self.conv3(h)


class _Timer:
    """Times several callables round-robin (one of each per repeat), so that a load burst
    on a shared machine hits every variant alike; returns per-callable medians and minima."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fns: dict, repeats: int, warmup: int) -> dict:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                if self.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if self.cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def _step_fns(net, x, K, t, t_next, use_cuda_graph):
    """Callables for one step: single (Euler), batched (runner), sequential (K calls)."""
    B = x.shape[0]
    h = t_next - t
    r = torch.linspace(0.2, 0.8, K, dtype=torch.float64)
    tau = (t * (t_next / t) ** r).to(torch.float32)
    delta = torch.zeros(K)
    w = torch.full((K,), 1.0 / K)
    main_sigma = torch.full((B,), t, device=x.device)
    runner = BranchRunner(net, K, use_cuda_graph=use_cuda_graph)
    tau_d, w_d, delta_d = tau.to(x.device), w.to(x.device), delta.to(x.device)

    def main_d():
        return (x - net(x, main_sigma)) / t

    def single():
        return x + h * main_d()

    def batched():
        d = main_d()
        g = runner.run(x, d, t, tau_d, delta_d)
        return epd_step(x, g, w_d, h, 0.0)

    seq_sigmas = [torch.full((B,), float(tau[k]), device=x.device) for k in range(K)]

    def sequential():
        d = main_d()
        gs = []
        for k in range(K):
            xk = x + (float(tau[k]) - t) * d
            gs.append((xk - net(xk, seq_sigmas[k])) / float(tau[k]))
        return epd_step(x, torch.stack(gs), w_d, h, 0.0)

    return single, batched, sequential, runner


def _fmt_ms(s):
    return f"{1e3 * s:.2f}"


def run(quick: bool, out_dir: pathlib.Path, *, device: str = "cpu",
        ks: Optional[Sequence[int]] = None, repeats: Optional[int] = None,
        verbose: bool = True) -> dict:
    """Times one EPD step per K; writes out_dir/branches.json and returns the tables."""
    t_start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch.cuda.is_available() is False")
    p = dict(QUICK if quick else FULL)
    if repeats is not None:
        p["repeats"] = max(1, int(repeats))
    ks = tuple(int(k) for k in (ks or p["ks"]))
    say = (lambda *a: print("[branches]", *a, flush=True)) if verbose else (lambda *a: None)
    timer = _Timer(dev)

    net = ConvDenoiser(3, p["hidden"]).to(dev).eval()
    for q in net.parameters():
        q.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(p["batch"], 3, 32, 32, generator=g) * 10.0).to(dev)
    t, t_next = 10.0, 5.0

    rows, records, notes = [], [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # reference-backend notice
        for K in ks:
            single, batched, sequential, _ = _step_fns(net, x, K, t, t_next, use_cuda_graph=False)
            # the two EPD variants must agree (same maths, different batching)
            torch.testing.assert_close(batched(), sequential(), rtol=1e-4, atol=1e-4)
            fns = {"single": single, "batched": batched, "sequential": sequential}
            if dev.type == "cuda":  # pragma: no cover - needs a GPU
                _, batched_g, _, runner = _step_fns(net, x, K, t, t_next, use_cuda_graph=True)
                torch.testing.assert_close(batched_g(), batched(), rtol=1e-4, atol=1e-4)
                fns["graph"] = batched_g
            res = timer(fns, p["repeats"], p["warmup"])
            t_single, t_b, t_s = res["single"][0], res["batched"][0], res["sequential"][0]
            rec = {"K": K, "batch": p["batch"], "single_ms": 1e3 * t_single,
                   "batched_ms": 1e3 * t_b, "sequential_ms": 1e3 * t_s,
                   "batched_over_single": t_b / t_single,
                   "sequential_over_single": t_s / t_single,
                   "min_ms": {k: 1e3 * v[1] for k, v in res.items()},
                   "graph_ms": None, "graph_over_eager": None}
            if "graph" in res:  # pragma: no cover - needs a GPU
                rec["graph_ms"] = 1e3 * res["graph"][0]
                rec["graph_over_eager"] = res["graph"][0] / t_b
                rec["graph_captures"] = runner.captures
            records.append(rec)
            rows.append([K, p["batch"], _fmt_ms(t_single), _fmt_ms(t_b), _fmt_ms(t_s),
                         f"{t_b / t_single:.2f}", f"{t_s / t_single:.2f}",
                         "-" if rec["graph_ms"] is None else _fmt_ms(rec["graph_ms"]),
                         "-" if rec["graph_over_eager"] is None else f"{rec['graph_over_eager']:.2f}"])
            say(f"K={K}: single {_fmt_ms(t_single)} ms, batched {_fmt_ms(t_b)} ms, "
                f"sequential {_fmt_ms(t_s)} ms")
    if dev.type != "cuda":
        notes.append("CUDA-graph replay vs eager: skipped (no GPU on this machine); run with "
                     "--device cuda on a GPU machine to fill the graph columns.")
    notes.append(f"One EPD step = main call (batch B) + K branch evaluations; single = one "
                 f"Euler step (one call of batch B). Medians over {p['repeats']} repeats "
                 f"(variants timed round-robin), after {p['warmup']} warm-up runs; device {dev.type}, "
                 f"{torch.get_num_threads()} CPU threads, denoiser: 3 convs, hidden "
                 f"{p['hidden']}, input [{p['batch']}, 3, 32, 32].")
    if dev.type == "cpu":
        notes.append("On a CPU the network is compute-bound, so a K*B batch costs about K "
                     "times a B batch and batching saves only per-call overhead; the latency "
                     "win of parallel branches needs an accelerator with idle capacity at "
                     "batch B.")
    columns = ["K", "B", "single ms", "batched ms", "sequential ms", "batched/single",
               "sequential/single", "graph ms", "graph/eager"]
    table = {"title": "One EPD step: batched K*B call vs K sequential calls vs one Euler step",
             "columns": columns, "rows": rows}
    result = {"tables": [table], "notes": notes, "records": records,
              "config": {**p, "ks": list(ks), "device": dev.type, "quick": bool(quick)},
              "elapsed_s": time.perf_counter() - t_start}
    with open(out_dir / "branches.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def _print_table(result: dict) -> None:
    for tab in result["tables"]:
        cols = tab["columns"]
        cells = [[str(c) for c in row] for row in tab["rows"]]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        print(tab["title"])
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for r in cells:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for n in result.get("notes", []):
        print("-", n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", default=None, help="comma-separated K values, e.g. 2,4")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    result = run(args.quick, pathlib.Path(args.out), device=args.device, ks=ks,
                 repeats=args.repeats)
    _print_table(result)
    print(f"wrote {pathlib.Path(args.out) / 'branches.json'} in {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
