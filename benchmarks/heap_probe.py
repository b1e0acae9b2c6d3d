"""Allocation probe: how much of a large CPU kernel call is the allocator's, not the kernel's.

glibc serves a block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps
it on free, so every 64 MB output is page-faulted in again (eager PyTorch and torch.compile
pay the same). With ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` both set high
(`HEAP_ENV`; either alone changed nothing on glibc 2.36) freed blocks stay in the heap. glibc
reads them at start-up, so each setting is timed in its own child process (parent's thread
count): copy_, clone, and the fused forward and backward at each K, as
``probe(n=16 * 2**20, ks=(2, 3, 4)) -> {"glibc default": {...}, "freed blocks kept": {...}}``.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Both thresholds at 4 GiB: no block of these sizes is mmapped, and free never trims.
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2 ** 30), "MALLOC_TRIM_THRESHOLD_": str(4 * 2 ** 30)}
SETTINGS = {"glibc default": {}, "freed blocks kept": HEAP_ENV}

# The child imports the parent's epd_kernels (first on sys.path: else ``python -c`` puts the
# working directory first, maybe a source tree without the built extension).
_CHILD = """
import json, sys
sys.path.insert(0, {pkg_root!r})
sys.path.append({root!r})
from benchmarks.heap_probe import measure
print(json.dumps(measure({n}, {ks!r}, {repeats}, {threads})))
"""


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def measure(n: int, ks: Sequence[int], repeats: int, threads: int) -> dict:
    """In this process: GB/s of copy_, clone, the fused forward and backward (fp32, n)."""
    import torch

    import epd_kernels
    from benchmarks.bench_kernels import _inputs, floor_bytes
    from benchmarks.timing import Timer, bench_interleaved
    from epd_kernels import backends, epd_step

    torch.set_num_threads(threads)
    src = torch.full((n,), 1.5)
    dst = src.clone()
    fns = {"copy": lambda: dst.copy_(src), "clone": src.clone}
    for K in ks:
        _, x, g, w, h, o, gy = _inputs(torch.float32, K, n, torch.device("cpu"))
        fns[f"fused K={K}"] = (lambda a=(x, g, w, h, o): epd_step(*a))
        # backward as bench_kernels times it: autograd.grad on a graph built once
        leaves = tuple(t.clone().requires_grad_() for t in (x, g, w, h, o))
        y = epd_step(*leaves)
        fns[f"backward K={K}"] = (lambda y=y, leaves=leaves, gy=gy:
                                  torch.autograd.grad(y, leaves, gy, retain_graph=True))
    st = bench_interleaved(Timer(torch.device("cpu")), fns, repeats=repeats, warmup=2,
                           min_sample_s=0.02)
    copy_gbps = 2 * n * 4 / st["copy"]["median_s"] / 1e9
    out = {"env": {k: os.environ.get(k) for k in HEAP_ENV}, "threads": threads,
           "epd_kernels": str(pathlib.Path(epd_kernels.__file__).resolve()),
           "backend": backends.for_device(torch.device("cpu")).name,
           "copy_gbps": copy_gbps, "clone_gbps": 2 * n * 4 / st["clone"]["median_s"] / 1e9,
           "fused": {}, "backward": {}}
    for K in ks:
        for kind, key in (("fused", "fwd"), ("backward", "bwd")):
            med = st[f"{kind} K={K}"]["median_s"]
            gbps = floor_bytes(K, n, 4)[key] / med / 1e9
            out[kind][str(K)] = {"median_s": med, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps}
    return out


def probe(n: int = 16 * 2 ** 20, ks: Sequence[int] = (2, 3, 4), *, repeats: int = 7,
          threads: Optional[int] = None, backend: Optional[str] = None,
          timeout_s: float = 900) -> Optional[dict]:
    """`measure` in one child process per entry of `SETTINGS` (``backend``: the fused op's
    backend there, via EPD_KERNELS_BACKEND); None where glibc is absent."""
    if not is_glibc():
        return None
    import epd_kernels
    import torch

    pkg_root = str(pathlib.Path(epd_kernels.__file__).resolve().parent.parent)
    code = _CHILD.format(pkg_root=pkg_root, root=str(ROOT), n=int(n),
                         ks=tuple(int(k) for k in ks), repeats=int(repeats),
                         threads=int(threads or torch.get_num_threads()))
    results = {}
    for label, extra in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(extra)
        if backend is not None:
            env["EPD_KERNELS_BACKEND"] = backend
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"heap probe child ({label}) failed with code {proc.returncode}:"
                               f"\n{proc.stderr[-2000:]}")
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def note(results: Optional[dict], n: int) -> str:
    """One line for the kernels section's notes."""
    if results is None:
        return "allocation probe: not run (needs glibc on Linux)"
    parts = []
    for label, r in results.items():
        pct = {kind: " / ".join(f"{v['pct_copy']:.0f}%" for v in r[kind].values())
               for kind in ("fused", "backward")}
        parts.append(f"{label}: clone {r['clone_gbps']:.1f} GB/s (copy_ {r['copy_gbps']:.1f}), "
                     f"fused forward K={'/'.join(r['fused'])} {pct['fused']}, backward "
                     f"{pct['backward']} of copy")
    env = " ".join(f"{k}={v}" for k, v in HEAP_ENV.items())
    return (f"allocation probe (fp32, N={n // 2 ** 20}M, one child process per setting; "
            f"'freed blocks kept' = {env}, see benchmarks/heap_probe.py): " + "; ".join(parts))
