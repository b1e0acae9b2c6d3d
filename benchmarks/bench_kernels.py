"""Benchmark section `kernels`: the fused EPD step against eager PyTorch and torch.compile.

    y = x + (1 + o) * h * sum_k w_k * g_k          x [B, N/B], g [K, B, N/B], w [K], h, o [B]

Timed in one interleaved comparison per configuration and direction (benchmarks/timing.py):
fused = `epd_kernels.epd_step` (public API, on the backend `backends.for_device` picks);
eager = the fastest of `EAGER_FORMS`, raced in this run per dtype and direction; compile =
`torch.compile(dynamic=False)` of the broadcast-sum form (compile time reported, not timed).
Forward runs in inference; backward is `torch.autograd.grad(y, (x, g, w, h, o), gy,
retain_graph=True)` on a graph built once, so the forward is excluded exactly.

GB/s = byte floor (`floor_bytes`) / median time. `dst.copy_(src)` is timed at the start, at
the end and inside every row's comparison, so "% of copy" is taken under the same load. The
op's own targets (`OP_TARGETS`) are stored in kernels.json ("op_targets") and noted.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import heap_probe  # noqa: E402
from benchmarks.plot import line_panels, size_label  # noqa: E402
from benchmarks.run import backend_info, loadavg, reporter, section_main  # noqa: E402
from benchmarks.timing import Timer, bench_interleaved  # noqa: E402
from epd_kernels import epd_step  # noqa: E402

__all__ = ["run"]

KI, MI = 1 << 10, 1 << 20
IMPLS = ("fused", "eager", "compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BATCH = 4
#: Elements of the allocation probe (`heap_probe`, full CPU runs): the largest size, where
#: each output (64 MB in fp32) is above glibc's mmap threshold.
HEAP_PROBE_N = 16 * MI

# select_n: size at which the eager forms are raced (the largest run size <= select_n).
FULL = dict(sizes=[64 * KI, 256 * KI, 1 * MI, 4 * MI, 16 * MI], ks=[2, 3, 4],
            dtypes=["float32", "bfloat16"], repeats=15, warmup=3, min_sample_s=0.010,
            select_n=4 * MI, select_forms=("bcast", "einsum", "matmul", "addcmul"),
            select_repeats=7)
QUICK = dict(sizes=[256 * KI, 4 * MI], ks=[2, 4], dtypes=["float32", "bfloat16"],
             bf16_sizes=[4 * MI], repeats=5, warmup=1, min_sample_s=0.003,
             select_n=1 * MI, select_forms=("bcast", "einsum", "matmul"), select_repeats=3)

# Targets, per device type. Rows outside the scope get no verdict ("-").
TARGETS = {
    "cpu": dict(min_n=4 * MI, dtypes=("float32",),
                fwd_frac_copy=0.85, fwd_speedup_vs_compile=1.3,
                bwd_frac_copy=0.70, bwd_speedup_vs_eager=1.0, bwd_speedup_vs_compile=1.0),
}
TARGET_TEXT = {
    "cpu": ("CPU, fp32, N >= 4M, K = 2..4: forward >= 85% of copy bandwidth and >= 1.3x "
            "faster than torch.compile; backward (floor bytes / time) >= 70% of copy "
            "bandwidth and faster than eager and than torch.compile's autograd"),
}
#: Per direction, the checks of `TARGETS`: (metric, key of its target, what it says).
TARGET_CHECKS = {
    "fwd": [("fused_frac_copy", "fwd_frac_copy", "of copy bw"),
            ("speedup_vs_compile", "fwd_speedup_vs_compile", "vs compile")],
    "bwd": [("fused_frac_copy", "bwd_frac_copy", "of copy bw"),
            ("speedup_vs_eager", "bwd_speedup_vs_eager", "vs eager"),
            ("speedup_vs_compile", "bwd_speedup_vs_compile", "vs compile")],
}


# --------------------------------------------------------------------------------------
# the maths in eager PyTorch (user-facing shapes; w, h, o stay float32 like EPD params)


def eager_bcast(x, g, w, h, o):
    s = ((1 + o) * h).to(x.dtype)
    return x + s[:, None] * (w.to(x.dtype)[:, None, None] * g).sum(0)


def eager_einsum(x, g, w, h, o):
    s = ((1 + o) * h).to(x.dtype)
    return x + s[:, None] * torch.einsum("k,kbn->bn", w.to(x.dtype), g)


def eager_matmul(x, g, w, h, o):
    s = ((1 + o) * h).to(x.dtype)
    combo = (w.to(x.dtype) @ g.reshape(g.shape[0], -1)).view_as(x)  # a gemv over K
    return torch.addcmul(x, s[:, None], combo)


def eager_addcmul(x, g, w, h, o):
    sw = (((1 + o) * h)[:, None] * w[None, :]).to(x.dtype)  # [B, K]
    y = torch.addcmul(x, sw[:, 0:1], g[0])
    for k in range(1, g.shape[0]):
        y = y.addcmul_(sw[:, k:k + 1], g[k])
    return y


EAGER_FORMS: Dict[str, Callable] = {"bcast": eager_bcast, "einsum": eager_einsum,
                                    "matmul": eager_matmul, "addcmul": eager_addcmul}
EAGER_FORM_TEXT = {
    "bcast": "x + s[:,None]*(w[:,None,None]*g).sum(0)",
    "einsum": "x + s[:,None]*einsum('k,kbn->bn', w, g)",
    "matmul": "addcmul(x, s[:,None], (w @ g.view(K,-1)).view_as(x))",
    "addcmul": "K chained addcmul_(s*w_k, g_k)",
}
COMPILE_FORM = "bcast"


# --------------------------------------------------------------------------------------
# inputs, checks, timing


def _inputs(dtype, K, N, device, seed=0):
    B = BATCH if (N % BATCH == 0 and N >= BATCH) else 1
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N // B, dtype=dtype, device=device, generator=gen)
    g = torch.randn(K, B, N // B, dtype=dtype, device=device, generator=gen)
    w = torch.softmax(torch.randn(K, device=device, generator=gen), 0)
    h = -0.5 + 0.01 * torch.randn(B, device=device, generator=gen)
    o = 0.01 * torch.randn(B, device=device, generator=gen)
    gy = torch.randn(B, N // B, dtype=dtype, device=device, generator=gen)
    return B, x, g, w, h, o, gy


def _upcast(ts):
    """float32 copies of low-precision tensors (float32/float64 ones are returned as is)."""
    return [t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in ts]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _tol(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2


def _bench(timer, fns: Dict[str, Callable], p: dict) -> Dict[str, dict]:
    return bench_interleaved(timer, fns, repeats=p["repeats"], warmup=p["warmup"],
                             min_sample_s=p["min_sample_s"])


def floor_bytes(K: int, N: int, itemsize: int) -> dict:
    """Bytes the op must move at least: forward (K + 2) N itemsize (x and the K grads read,
    y written), backward (2K + 1) N itemsize."""
    return {"fwd": (K + 2) * N * itemsize, "bwd": (2 * K + 1) * N * itemsize}


def _bandwidth(timer, src: torch.Tensor, dst: torch.Tensor, p: dict) -> dict:
    """GB/s of copy_ (read + write), clone (allocate + copy) and a read-only sum of `src`."""
    st = _bench(timer, {"copy": lambda: dst.copy_(src), "clone": src.clone, "sum": src.sum},
                dict(p, repeats=max(p["repeats"], 5)))
    nbytes = src.numel() * 4
    return dict(tensor_mb=nbytes // MI, copy_gbps=2 * nbytes / st["copy"]["median_s"] / 1e9,
                clone_gbps=2 * nbytes / st["clone"]["median_s"] / 1e9,
                read_gbps=nbytes / st["sum"]["median_s"] / 1e9, stats=st)


# --------------------------------------------------------------------------------------
# one configuration


def _time_ops(timer, inputs, fwd_ops: Dict[str, Callable], bwd_ops: Dict[str, Callable],
              p: dict, copy: Optional[Callable] = None) -> dict:
    """Forward (inference) and backward (on a graph built once) of every op, each direction
    one comparison (with copy_ when given), every result first checked against float32
    eager maths: {"fwd": stats, "bwd": stats, "check": {"fwd_NAME": rel err, ...}}."""
    B, x, g, w, h, o, gy = inputs
    extra = {"copy": copy} if copy else {}
    out = {"check": {}}
    with torch.no_grad():
        fns = {n: (lambda op=op: op(x, g, w, h, o)) for n, op in fwd_ops.items()}
        ref = eager_bcast(*_upcast((x, g, w, h, o)))
        out["check"].update({f"fwd_{n}": _rel_err(fn(), ref) for n, fn in fns.items()})
        del ref
        out["fwd"] = _bench(timer, {**fns, **extra}, p)
    leaves = [t.requires_grad_(True) for t in (x, g, w, h, o)]
    fns = {n: (lambda y=op(*leaves): torch.autograd.grad(y, leaves, gy, retain_graph=True))
           for n, op in bwd_ops.items()}
    ref_leaves = [t.detach().requires_grad_(True) for t in _upcast(leaves)]
    ref = torch.autograd.grad(eager_bcast(*ref_leaves), ref_leaves, gy.float())
    for n, fn in fns.items():
        out["check"][f"bwd_{n}"] = max(_rel_err(a, b) for a, b in zip(fn(), ref))
    del ref, ref_leaves
    out["bwd"] = _bench(timer, {**fns, **extra}, p)
    return out


def _select_eager_forms(timer, device, dtype, K, N, p, forms: Sequence[str]) -> dict:
    """Times the candidate eager forms (fwd and bwd) and returns the fastest of each."""
    ops = {f: EAGER_FORMS[f] for f in forms}
    res = _time_ops(timer, _inputs(dtype, K, N, device), ops, ops, p)
    for f in forms:
        if res["check"][f"fwd_{f}"] > _tol(dtype):
            raise AssertionError(f"eager form {f} disagrees with float32 maths: rel err "
                                 f"{res['check'][f'fwd_{f}']:.2e}")
    medians = {d: {f: res[d][f]["median_s"] for f in forms} for d in ("fwd", "bwd")}
    return dict(at=dict(K=K, N=N), fwd=min(forms, key=medians["fwd"].get),
                bwd=min(forms, key=medians["bwd"].get), fwd_median_s=medians["fwd"],
                bwd_median_s=medians["bwd"])


def _bench_config(timer, device, dtype_name, K, N, impls, eager_forms, p, copy) -> dict:
    """One row: every implementation and copy_ per direction (`_time_ops`); torch.compile
    compiles (timed apart) before."""
    B, x, g, w, h, o, gy = inputs = _inputs(DTYPES[dtype_name], K, N, device)
    floor = floor_bytes(K, N, x.element_size())
    row = dict(dtype=dtype_name, K=K, N=N, B=B, itemsize=x.element_size(),
               fwd_floor_bytes=floor["fwd"], bwd_floor_bytes=floor["bwd"],
               loadavg_start=loadavg(), eager_fwd_form=eager_forms["fwd"],
               eager_bwd_form=eager_forms["bwd"], compile_s={})
    ops = {d: {"fused": epd_step, "eager": EAGER_FORMS[eager_forms[d]]} for d in ("fwd", "bwd")}
    ops = {d: {n: op for n, op in by_name.items() if n in impls} for d, by_name in ops.items()}
    if "compile" in impls:
        torch._dynamo.reset()
        compiled = torch.compile(EAGER_FORMS[COMPILE_FORM], dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(x, g, w, h, o)
        timer.sync()
        row["compile_s"]["fwd"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # the autograd graph: forward and backward compiled
        leaves = [t.detach().requires_grad_(True) for t in (x, g, w, h, o)]
        torch.autograd.grad(compiled(*leaves), leaves, gy, retain_graph=True)
        timer.sync()
        row["compile_s"]["fwd_bwd"] = time.perf_counter() - t0
        ops["fwd"]["compile"] = ops["bwd"]["compile"] = compiled
    row.update(_time_ops(timer, inputs, ops["fwd"], ops["bwd"], p, copy))
    row["loadavg_end"] = loadavg()
    if "compile" in impls:
        torch._dynamo.reset()
    return row


def _derive(row: dict, copy_bytes: int) -> None:
    """GB/s, % of copy and speedups from the medians of one row (same-run ratios only)."""
    for d in ("fwd", "bwd"):
        st = row[d]
        copy_gbps = copy_bytes / st["copy"]["median_s"] / 1e9
        m = dict(copy_gbps=copy_gbps)
        for n in (n for n in IMPLS if n in st):
            m[f"{n}_ms"] = st[n]["median_s"] * 1e3
            m[f"{n}_gbps"] = row[f"{d}_floor_bytes"] / st[n]["median_s"] / 1e9
            m[f"{n}_frac_copy"] = m[f"{n}_gbps"] / copy_gbps
            if n != "fused" and "fused" in st:
                m[f"speedup_vs_{n}"] = st[n]["median_s"] / st["fused"]["median_s"]
        row[f"{d}_metrics"] = m


def _verdict(row: dict, device_type: str) -> None:
    """row["target_fwd"/"target_bwd"]: PASS, MISS (which) or n/a; None outside the scope."""
    tg = TARGETS.get(device_type)
    row["target_fwd"] = row["target_bwd"] = None
    if tg is None or row["N"] < tg["min_n"] or row["dtype"] not in tg["dtypes"]:
        return
    for d, checks in TARGET_CHECKS.items():
        m = row[f"{d}_metrics"]
        missing = [what for key, _, what in checks if key not in m]
        if missing:
            row[f"target_{d}"] = "n/a (not run: " + ", ".join(missing) + ")"
            continue
        misses = []
        for key, target, what in checks:
            val, need = m[key], tg[target]
            if key == "fused_frac_copy":
                if val < need:
                    misses.append(f"{val:.0%}<{need:.0%} {what}")
            # "faster than" (need == 1) is strict; ratios with a threshold are inclusive
            elif val < need or (need == 1.0 and val == need):
                misses.append(f"{val:.2f}x{'<=' if need == 1.0 else '<'}{need:g}x {what}")
        row[f"target_{d}"] = "MISS: " + "; ".join(misses) if misses else "PASS"


# --------------------------------------------------------------------------------------
# tables, plot


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if v < 1000 else f"{v:.0f}"


def _fmt_num(v: Optional[float]) -> str:
    """3 significant digits, no exponent for the ranges seen here (GB/s, ratios)."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 0.1:
        return f"{v:.3g}" if v >= 10 else f"{v:.2f}"
    return f"{v:.2g}"


def _tables(rows: List[dict], impls: Sequence[str]) -> List[dict]:
    ratios = [n for n in ("eager", "compile") if n in impls] if "fused" in impls else []
    cols = (["dtype", "K", "N"] + [f"{n} ms" for n in impls] + [f"{n} GB/s" for n in impls]
            + ["copy GB/s", "fused %copy"] + [f"x{n}" for n in ratios] + ["target"])
    tables = []
    for d, title in (("fwd", "Forward (inference): y = x + (1+o)*h*sum_k w_k*g_k"),
                     ("bwd", "Backward: autograd.grad(y, (x, g, w, h, o), gy) on a retained "
                             "graph")):
        body = []
        for r in rows:
            m = r[f"{d}_metrics"]
            frac = m.get("fused_frac_copy")
            body.append([SHORT.get(r["dtype"], r["dtype"]), str(r["K"]), size_label(r["N"])]
                        + [_fmt_ms(m.get(f"{n}_ms")) for n in impls]
                        + [_fmt_num(m.get(f"{n}_gbps")) for n in impls]
                        + [_fmt_num(m["copy_gbps"]), "-" if frac is None else f"{frac:.0%}"]
                        + [_fmt_num(m.get(f"speedup_vs_{n}")) for n in ratios]
                        + [r[f"target_{d}"] or "-"])
        tables.append(dict(title=title, columns=cols, rows=body))
    return tables


def _plot(rows, impls, copy_gbps, path, title) -> Optional[pathlib.Path]:
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda s: list(DTYPES).index(s))
    panels = []
    for d, dname in (("fwd", "forward"), ("bwd", "backward")):
        for dt in dtypes:
            series = []
            for n in impls:
                for K in sorted({r["K"] for r in rows if r["dtype"] == dt}):
                    pts = sorted((r["N"], r[f"{d}_metrics"].get(f"{n}_gbps")) for r in rows
                                 if r["dtype"] == dt and r["K"] == K)
                    pts = [(x, y) for x, y in pts if y is not None]
                    if pts:
                        series.append(dict(label=f"{n} K={K}", group=n, variant=f"K={K}",
                                           x=[a for a, _ in pts], y=[b for _, b in pts]))
            panels.append(dict(title=f"{dname}, {SHORT.get(dt, dt)} (floor bytes / median time)",
                               xlabel="N (elements of x)", ylabel="GB/s", series=series,
                               hlines=[dict(y=copy_gbps, label=f"copy_ {copy_gbps:.1f} GB/s")]))
    return line_panels(path, panels, title=title, ncols=len(dtypes))


# --------------------------------------------------------------------------------------
# the op's own targets: uniform coefficients (float h and o, [K] weights), fp32, K = 3

#: (name, shape) of each target case; the quick run uses the smaller shapes.
OP_TARGET_SHAPES = {
    False: {"1d": (16 * MI,), "small": (4, 16 * KI), "wide": (8, 2 * MI)},
    True: {"1d": (1 * MI,), "small": (4, 16 * KI), "wide": (8, 128 * KI)},
}
OP_TARGETS = (
    # (case, what, measured key, at least)
    ("1d", "1-D x, fused vs torch.compile (speed ratio)", "x_compile", 0.8),
    ("small", "[4, 16K], fused vs the eager expression (speed ratio)", "x_eager", 1.0),
    ("wide", "[8, N] with out=: (K+2) streams vs copy_ bandwidth", "out_frac_copy", 0.85),
    ("wide", "[8, N] allocating, fused vs torch.compile (speed ratio)", "x_compile", 1.0),
)


def _uniform_expression(x, g, w, h: float, o: float):
    """The EPD step as a user writes it in PyTorch (w is [K], h and o are floats)."""
    return x + (1 + o) * h * (w.view((-1,) + (1,) * x.dim()) * g).sum(0)


def _op_target_case(timer, dev, shape, p, compiled_cache) -> dict:
    K, h, o = 3, -0.5, 0.01
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, generator=gen)
    g = torch.randn((K,) + tuple(shape), device=dev, generator=gen)
    w = torch.softmax(torch.randn(K, device=dev, generator=gen), 0)
    out, src, dst = torch.empty_like(x), torch.randn_like(x), torch.empty_like(x)
    compiled = compiled_cache.setdefault(len(shape),
                                         torch.compile(_uniform_expression, dynamic=False))
    with torch.no_grad():
        want = _uniform_expression(x, g, w, h, o)
        compiled(x, g, w, h, o)  # compile outside the timing
        err = _rel_err(epd_step(x, g, w, h, o), want)
        t = {n: v["median_s"] for n, v in _bench(timer, {
            "fused": lambda: epd_step(x, g, w, h, o),
            "fused_out": lambda: epd_step(x, g, w, h, o, out=out),
            "eager": lambda: _uniform_expression(x, g, w, h, o),
            "compile": lambda: compiled(x, g, w, h, o),
            "copy": lambda: dst.copy_(src),
        }, p).items()}
    out_gbps = (K + 2) * x.numel() * 4 / t["fused_out"] / 1e9
    copy_gbps = 2 * x.numel() * 4 / t["copy"] / 1e9
    return dict(shape=list(shape), K=K, rel_err=err, median_ms={k: v * 1e3 for k, v in t.items()},
                x_eager=t["eager"] / t["fused"], x_compile=t["compile"] / t["fused"],
                out_gbps=out_gbps, copy_gbps=copy_gbps, out_frac_copy=out_gbps / copy_gbps)


def op_targets(timer, dev, quick, p, say) -> List[dict]:
    """Times the op's target cases and returns one verdict per target (met / missed)."""
    cases, compiled_cache = {}, {}
    for name, shape in OP_TARGET_SHAPES[quick].items():
        c = cases[name] = _op_target_case(timer, dev, shape, p, compiled_cache)
        ms = c["median_ms"]
        say(f"op target case {name} {c['shape']}: fused {ms['fused']:.3g} ms, out= "
            f"{ms['fused_out']:.3g}, eager {ms['eager']:.3g}, compile {ms['compile']:.3g}, "
            f"copy_ {ms['copy']:.3g} (rel err {c['rel_err']:.1e})")
    return [dict(case=case, shape=cases[case]["shape"], target=what, measured=cases[case][key],
                 need=need, met=bool(cases[case][key] >= need))
            for case, what, key, need in OP_TARGETS]


# --------------------------------------------------------------------------------------
# entry point


def _configs(quick, sizes, ks, dtypes):
    if quick and sizes is None and ks is None and dtypes is None:
        return ([("float32", K, N) for N in QUICK["sizes"] for K in QUICK["ks"]]
                + [("bfloat16", K, N) for N in QUICK["bf16_sizes"] for K in QUICK["ks"]])
    base = QUICK if quick else FULL
    dtypes = list(dtypes or base["dtypes"])
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"unknown dtype {dt!r}; choose from {sorted(DTYPES)}")
    return [(dt, K, N) for dt in dtypes for N in (sizes or base["sizes"])
            for K in (ks or base["ks"])]


def _json_safe(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _select_all_eager(timer, dev, configs, p, say, notes) -> dict:
    """dtype -> the fastest eager forms, raced at the largest K of that dtype and the run
    size nearest below `select_n`."""
    run_sizes = sorted({N for _, _, N in configs})
    if run_sizes[0] <= p["select_n"] <= run_sizes[-1]:
        n_sel = p["select_n"]
    else:
        n_sel = max([N for N in run_sizes if N <= p["select_n"]] or run_sizes[:1])
    psel = dict(p, repeats=min(p["repeats"], p["select_repeats"]))
    eager_forms = {}
    for dt in dict.fromkeys(dt for dt, _, _ in configs):
        k_sel = max(K for d, K, _ in configs if d == dt)
        sel = eager_forms[dt] = _select_eager_forms(timer, dev, DTYPES[dt], k_sel, n_sel, psel,
                                                    list(p["select_forms"]))
        at = f"K={k_sel}, N={size_label(n_sel)}"
        notes.append(f"eager {SHORT.get(dt, dt)}: forward = {sel['fwd']} "
                     f"[{EAGER_FORM_TEXT[sel['fwd']]}], backward = {sel['bwd']} "
                     f"[{EAGER_FORM_TEXT[sel['bwd']]}] (fastest of "
                     f"{', '.join(p['select_forms'])} at {at}, timed in this run)")
        say(notes[-1])  # the race's medians are in kernels.json ("eager_forms")
    return eager_forms


def _measure(timer, dev, quick, configs, impls, p, say) -> dict:
    """Everything timed in this process: bandwidth at start and end, the eager race, one
    row per configuration, the op targets; notes on what was timed and any mismatch."""
    bi = backend_info(dev)
    backend_name = bi["backend"]
    notes = [f"backend timed as 'fused': {backend_name} (device {dev.type}; available: "
             f"{', '.join(bi['backends_available'])})"]
    if backend_name == "reference":
        notes.append("the C++/Triton extension is not in use, so 'fused' times the "
                     "plain-PyTorch reference fallback (einsum), not a fused kernel")
    if bi["backend_note"]:
        notes.append(f"warning: {bi['backend_note']}")
    say(notes[0])
    say(f"{len(configs)} configurations, {p['repeats']} repeats, "
        f"{torch.get_num_threads()} threads, impls: {', '.join(impls)}")
    copy_mb = 64 if dev.type == "cpu" else 256
    src = torch.full((copy_mb * MI // 4,), 1.5, device=dev)
    dst = src.clone()
    bw_start = _bandwidth(timer, src, dst, p)
    say(f"copy_ bandwidth {bw_start['copy_gbps']:.2f} GB/s, clone {bw_start['clone_gbps']:.2f},"
        f" read (sum) {bw_start['read_gbps']:.2f}  ({copy_mb} MB fp32)")
    eager_forms = _select_all_eager(timer, dev, configs, p, say, notes) if "eager" in impls else {}
    rows = []
    for dt, K, N in configs:
        forms = eager_forms.get(dt, dict(fwd=COMPILE_FORM, bwd=COMPILE_FORM))
        row = _bench_config(timer, dev, dt, K, N, impls, forms, p, lambda: dst.copy_(src))
        _derive(row, 2 * src.numel() * 4)
        _verdict(row, dev.type)
        rows.append(row)
        fm, bm = row["fwd_metrics"], row["bwd_metrics"]
        say(f"{SHORT.get(dt, dt)} K={K} N={size_label(N)}: fwd "
            + " ".join(f"{n} {fm[n + '_ms']:.3g}ms" for n in impls)
            + " | bwd " + " ".join(f"{n} {bm[n + '_ms']:.3g}ms" for n in impls)
            + (f" | compile {sum(row['compile_s'].values()):.1f}s" if row["compile_s"] else ""))
        notes += [f"MISMATCH {SHORT.get(dt, dt)} K={K} N={size_label(N)} {key}: relative "
                  f"error {err:.2e} vs float32 eager maths"
                  for key, err in row["check"].items() if err > _tol(DTYPES[dt])]
        gc.collect()
    verdicts = []
    if "compile" in impls and "eager" in impls:
        say("op targets (fp32, K = 3, float h and o, [K] weights)")
        verdicts = op_targets(timer, dev, quick, p, say)
        notes += [f"op target: {v['target']} at {v['shape']}: {v['measured']:.2f} (need >= "
                  f"{v['need']}): {'met' if v['met'] else 'missed'}" for v in verdicts]
    bw_end = _bandwidth(timer, src, dst, p)
    notes.append(f"copy_ bandwidth ({copy_mb} MB fp32, 2 bytes moved per byte copied): "
                 f"{bw_start['copy_gbps']:.2f} GB/s at start, {bw_end['copy_gbps']:.2f} at end; "
                 f"clone (alloc + copy) {bw_start['clone_gbps']:.2f}; read-only sum "
                 f"{bw_start['read_gbps']:.2f}. '%copy' uses the copy_ timed interleaved in the "
                 "same row")
    return dict(backend=backend_name, notes=notes, rows=rows, eager_forms=eager_forms,
                op_targets=verdicts, bandwidth=dict(start=bw_start, end=bw_end, copy_gbps=max(
                    bw_start["copy_gbps"], bw_end["copy_gbps"])))


def _closing_notes(m: dict, dev, quick: bool, configs, say) -> list:
    """The allocation probe (full CPU runs), the definitions, the load and target summary."""
    notes = m["notes"]
    if dev.type == "cpu" and not quick and max(N for _, _, N in configs) >= HEAP_PROBE_N:
        say("allocation probe (child processes)")  # two child processes, ~30 s
        m["allocation_probe"] = heap_probe.probe(HEAP_PROBE_N, (2, 3, 4),
                                                 threads=torch.get_num_threads(),
                                                 backend=m["backend"])
        notes.append(heap_probe.note(m["allocation_probe"], HEAP_PROBE_N))
        say(notes[-1])
    notes.append("GB/s = byte floor / median time; floors: forward (K+2)*N*itemsize, "
                 "backward (2K+1)*N*itemsize; 'x eager' / 'x compile' = their median time / "
                 "fused median time (> 1: fused is faster)")
    notes.append("backward is timed with torch.autograd.grad(..., retain_graph=True) on a "
                 "graph built once, so the forward is excluded exactly; compile = "
                 f"torch.compile(dynamic=False) of the {COMPILE_FORM} form, its AOTAutograd "
                 "backward for 'compile' backward; compile time excluded")
    loads = [r[k][0] for r in m["rows"] for k in ("loadavg_start", "loadavg_end") if r.get(k)]
    ncpu = os.cpu_count() or 1
    if loads and max(loads) > 1.5 * ncpu:
        notes.insert(0, f"WARNING: 1-min load average reached {max(loads):.1f} on {ncpu} CPUs "
                        f"(this benchmark: about {torch.get_num_threads()}): other processes "
                        "competed, so absolute times are inflated and noisy; same-row ratios "
                        "less so")
    if dev.type not in TARGET_TEXT:
        return notes + [f"no targets defined for device {dev.type}"]
    verdicts = [r[f"target_{d}"] for r in m["rows"] for d in ("fwd", "bwd") if r[f"target_{d}"]]
    n_pass = sum(v == "PASS" for v in verdicts)
    return notes + [f"targets ({TARGET_TEXT[dev.type]}): " + (
        f"{n_pass}/{len(verdicts)} PASS" if verdicts else "no row of this run is in scope")]


def run(quick: bool, out_dir: pathlib.Path, *, device: str = "cpu",
        sizes: Optional[Sequence[int]] = None, ks: Optional[Sequence[int]] = None,
        dtypes: Optional[Sequence[str]] = None, repeats: Optional[int] = None,
        impls: Optional[Sequence[str]] = None, verbose: bool = True) -> dict:
    """Writes out_dir/kernels.json and out_dir/kernels.png; times the backend in force
    (run.py and `section_main` apply --backend)."""
    from epd_kernels import backends

    t_start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
    impls = [n for n in IMPLS if n in (impls or IMPLS)]
    if not impls:
        raise ValueError(f"impls must name at least one of {IMPLS}")
    p = dict(QUICK if quick else FULL)
    if repeats is not None:
        p["repeats"] = max(1, int(repeats))
    configs = _configs(quick, sizes, ks, dtypes)
    say = reporter("kernels", verbose)
    with contextlib.ExitStack() as stack:
        if "compile" in impls:
            # The backward is timed with retain_graph=True, which a backward compiled
            # with donated buffers refuses (it did for bfloat16).
            import torch._functorch.config as functorch_config

            stack.enter_context(functorch_config.patch(donated_buffer=False))
        if "compile" in impls and dev.type == "cpu":
            # One compile worker: on a small machine the worker pool's start-up dominates
            # the compile time. Only compile time changes, not the generated code.
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(compile_threads=1))
        m = _measure(Timer(dev), dev, quick, configs, impls, p, say)
    notes = _closing_notes(m, dev, quick, configs, say)

    result = dict(
        section="kernels", device=dev.type,
        device_name=(torch.cuda.get_device_name(dev) if dev.type == "cuda" else None),
        backend=m["backend"], backends_available=backends.available(), quick=quick,
        threads=torch.get_num_threads(), batch=BATCH,
        params=dict(repeats=p["repeats"], warmup=p["warmup"], min_sample_s=p["min_sample_s"],
                    impls=impls, configs=[list(c) for c in configs]),
        bandwidth=m["bandwidth"], allocation_probe=m.get("allocation_probe"),
        eager_forms=m["eager_forms"], eager_form_text=EAGER_FORM_TEXT, compile_form=COMPILE_FORM,
        targets=dict(scope=TARGETS.get(dev.type), text=TARGET_TEXT.get(dev.type)),
        op_targets=m["op_targets"], results=m["rows"], notes=notes,
        tables=_tables(m["rows"], impls), wall_time_s=None, files=["kernels.json"])
    png = _plot(m["rows"], impls, m["bandwidth"]["copy_gbps"], out_dir / "kernels.png",
                f"epd_step on {dev.type} ({m['backend']} backend), "
                f"{torch.get_num_threads()} threads")
    if png is not None:
        result.update(plot="kernels.png", files=["kernels.json", "kernels.png"])
    result["wall_time_s"] = time.perf_counter() - t_start
    (out_dir / "kernels.json").write_text(json.dumps(_json_safe(result), indent=1))
    say(f"done in {result['wall_time_s']:.1f} s -> {out_dir / 'kernels.json'}")
    return result


if __name__ == "__main__":
    sys.exit(section_main("kernels", run, ["--device", "--sizes", "--ks", "--dtypes",
                                           "--repeats", "--impls", "--backend"]))
