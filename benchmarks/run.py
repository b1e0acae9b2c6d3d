#!/usr/bin/env python
"""Benchmark driver: runs benchmark sections, writes JSON/PNG, prints tables, and keeps
the generated blocks of BENCHMARKS.md (and README.md) in step with a real run
(``python benchmarks/run.py --help`` lists the options).

Section NAME lives in `benchmarks/bench_NAME.py` (imported only when it runs) and exposes
`run(quick: bool, out_dir: pathlib.Path, **options) -> dict`; it gets those of the options
(`OPTION_NAMES`) its signature names. A section whose module is missing or fails to import,
has no `run`, or whose `run` raises has FAILED (the others still run; exit status 1). It is
SKIPPED (exit status 0) only when `run` returned ``{"skipped": "reason"}`` or an optional
dependency (`OPTIONAL_PACKAGES`) is missing. Exit status 2 for an unknown section name.

What `run` returns (all keys optional; dumped to out/NAME.json unless the section wrote it):
    "tables": [{"title": str, "columns": [str], "rows": [[cell, ...] or {column: cell}]}]
    "rows":   [{column: cell}]          (a single untitled table, when there is no "tables")
    "table":  str                       (preformatted text, printed as is)
    "notes":  [str]                     (printed under the tables, bullets in markdown)
    "plot" / "plots": file name(s) in out_dir, linked from the markdown block
    "readme": {"block": NAME, "table": i, "notes": [str]}  (what --readme writes: table i,
              the notes, machine and command between <!-- NAME:start/end -->; without it,
              the first table between <!-- bench:readme-SECTION:start/end -->)
    "skipped": str                      (the section did not run, for this reason)

The machine (CPU, torch and threads, backend, date, git commit, command line) goes to
out/machine.json. `--markdown PATH` rewrites, per successful section, the block between
`<!-- bench:NAME:start/end -->` (appended when absent), never the text outside the markers.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from importlib import metadata
from typing import Callable, List, Optional, Sequence, Tuple

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("kernels", "solvers", "branches", "distill")  # canonical order
DEFAULT_SECTIONS = ("kernels",)
#: Top-level modules of the package's optional dependencies (pyproject.toml extras): a
#: section that needs one of them and does not find it is skipped, with the reason.
OPTIONAL_PACKAGES = {"triton": "triton", "matplotlib": "matplotlib",
                     "sklearn": "scikit-learn", "diffusers": "diffusers"}

for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.append(_p)  # after site-packages: an installed epd_kernels wins


# --------------------------------------------------------------------------------------
# sections


def known_sections() -> List[str]:
    """The canonical sections, then any other benchmarks/bench_*.py, in name order."""
    extra = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    return list(SECTIONS) + [s for s in extra if s not in SECTIONS]


def module_path(name: str) -> pathlib.Path:
    return HERE / f"bench_{name}.py"


def missing_optional(e: BaseException) -> Optional[str]:
    """The reason to skip when `e` says an optional dependency is not installed, else None."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    if isinstance(e, ModuleNotFoundError) and top in OPTIONAL_PACKAGES:
        return (f"needs the optional package {OPTIONAL_PACKAGES[top]!r}, which is not "
                f"installed (pip install {OPTIONAL_PACKAGES[top]})")
    return None


def load_section(name: str):
    """(module, None, None), or (None, status, reason) with status "failed" or "skipped"."""
    path = module_path(name)
    if not path.exists():
        return None, "failed", f"{path.relative_to(ROOT)} not found"
    try:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
    except Exception as e:  # noqa: BLE001 - reported; only a missing optional package skips
        why = missing_optional(e)
        if why:
            return None, "skipped", why
        return None, "failed", (f"import of benchmarks.bench_{name} failed: "
                                f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    if not callable(getattr(mod, "run", None)):
        return None, "failed", f"benchmarks/bench_{name}.py has no run(quick, out_dir) function"
    return mod, None, None


# --------------------------------------------------------------------------------------
# helpers the sections share


def loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """torch's intra-op thread count set to ``n`` (None: unchanged) and restored after."""
    import torch

    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def reporter(section: str, verbose: bool = True) -> Callable:
    """A print function prefixed with the section's name and its elapsed seconds."""
    t0 = time.perf_counter()

    def say(*parts):
        if verbose:
            print(f"[{section} +{time.perf_counter() - t0:5.1f}s]", *parts, flush=True)
    return say


def int_list(s: str) -> List[int]:
    """'4096,256K,4M' -> [4096, 262144, 4194304]."""
    out = []
    for tok in (t.strip().upper() for t in s.split(",")):
        if not tok:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(tok[-1], 1)
        try:
            out.append(int(float(tok[:-1] if mult > 1 else tok) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {tok!r} (use e.g. 4096, 256K, 4M)")
    return out


def str_list(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


#: Options shared by run.py and the sections run alone (`section_main`): flag -> argparse
#: keywords. Each reaches the sections whose `run` names it.
OPTIONS = {
    "--device": dict(default="cpu", choices=["cpu", "cuda"]),
    "--backend": dict(choices=["auto", "cpp", "triton", "reference"],
                      help="force an epd_kernels backend (default: per device)"),
    "--threads": dict(type=int, help="torch.set_num_threads"),
    "--sizes": dict(type=int_list, help="e.g. 256K,4M (elements of x)"),
    "--ks": dict(type=int_list, help="branch counts, e.g. 2,3,4"),
    "--dtypes": dict(type=str_list, help="e.g. float32,bfloat16"),
    "--repeats": dict(type=int, help="timed repeats per measurement"),
    "--impls": dict(type=str_list, help="e.g. fused,eager,compile"),
    "--models": dict(type=str_list, help="models of the sections that take them, in each "
                     "section's own names (distill: gaussian,gmm,skewed-16,mixture-128,"
                     "mixture-768,digits-unet)"),
    "--nfes": dict(type=int_list, help="NFEs of the sections that take them (distill: 3,5,7,9)"),
}
#: The keyword options a section's `run` may name (`--no-distilled` is `demo_distilled`).
OPTION_NAMES = tuple(flag[2:] for flag in OPTIONS) + ("demo_distilled",)


def section_main(name: str, run: Callable, options: Sequence = (),
                 argv: Optional[Sequence[str]] = None) -> int:
    """A section module run as a script: --quick, --out and its `options` (a flag of
    `OPTIONS`, or (flag, argparse keywords)), passed to `run` by name when given."""
    ap = argparse.ArgumentParser(description=f"benchmark section {name!r} alone")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    for opt in options:
        flag, kw = (opt, OPTIONS[opt]) if isinstance(opt, str) else opt
        ap.add_argument(flag, **kw)
    args = vars(ap.parse_args(argv))
    quick, out = args.pop("quick"), args.pop("out")
    backend = args.pop("backend", None)
    if backend:  # for the whole process, as main() does
        from epd_kernels import backends

        backends.set_backend(backend)
    t0 = time.perf_counter()
    result = run(quick, out, **{k: v for k, v in args.items() if v is not None})
    print(render_text(name, result))
    print(f"\nwrote {out / (name + '.json')} in {time.perf_counter() - t0:.1f} s")
    return 0


# --------------------------------------------------------------------------------------
# tables


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def section_tables(result: dict) -> List[dict]:
    """Normalises a section's result into [{"title", "columns", "rows": [[str]]}]."""
    raw = result.get("tables")
    if raw is None and isinstance(result.get("rows"), list) and result["rows"] \
            and all(isinstance(r, dict) for r in result["rows"]):
        raw = [dict(title=result.get("title", ""), rows=result["rows"])]
    out = []
    for t in raw or []:
        rows = t.get("rows", [])
        cols = list(t.get("columns") or [])
        if not cols:
            for r in rows:
                cols += [k for k in r if k not in cols] if isinstance(r, dict) else []
        body = [[_cell(r.get(c)) for c in cols] if isinstance(r, dict) else [_cell(c) for c in r]
                for r in rows]
        out.append(dict(title=t.get("title", ""), columns=[str(c) for c in cols], rows=body))
    return out


_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?[%xKMG]?$")


def _numeric_column(rows, i) -> bool:
    cells = [r[i] for r in rows if i < len(r) and r[i] not in ("-", "")]
    return bool(cells) and all(_NUM.match(c) for c in cells)


def text_table(t: dict) -> str:
    cols, rows = t["columns"], t["rows"]
    widths = [max([len(c)] + [len(r[i]) for r in rows if i < len(r)])
              for i, c in enumerate(cols)]
    right = [_numeric_column(rows, i) for i in range(len(cols))]

    def line(cells):
        return "  ".join(c.rjust(w) if right[i] else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [t["title"]] if t.get("title") else []
    return "\n".join(lines + [line(cols), line(["-" * w for w in widths])]
                     + [line(r) for r in rows])


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(t: dict) -> str:
    cols = t["columns"]
    lines = [f"**{_md_escape(t['title'])}**", ""] if t.get("title") else []
    lines.append("| " + " | ".join(_md_escape(c) for c in cols) + " |")
    lines.append("|" + "|".join("---:" if _numeric_column(t["rows"], i) else "---"
                                for i in range(len(cols))) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in t["rows"]]
    return "\n".join(lines)


def render_text(name: str, result: dict) -> str:
    parts = [text_table(t) for t in section_tables(result)]
    if isinstance(result.get("table"), str):
        parts.append(result["table"])
    if result.get("notes"):
        parts.append("\n".join(f"  * {n}" for n in result["notes"]))
    return "\n\n".join(parts) if parts else f"(section {name} returned no table)"


# --------------------------------------------------------------------------------------
# machine information


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def commit_label(commit: Optional[str], dirty: Optional[bool]) -> str:
    """'abcdef0123', with ' + uncommitted changes' when the tracked tree differs from it."""
    return (commit or "unknown")[:10] + (" + uncommitted changes" if dirty else "")


def _read(path: str) -> str:
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return ""


def git(*args) -> Optional[str]:
    """Output of a git command in the repository, None when it fails."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _pkg_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def backend_info(device: str) -> dict:
    """The backend `device` gets, the available ones, and any warning the choice gave."""
    import torch

    try:
        from epd_kernels import backends

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name = backends.for_device(torch.device(device)).name
        return dict(backend=name, backends_available=backends.available(),
                    backend_note="; ".join(str(w.message) for w in caught) or None)
    except Exception as e:  # noqa: BLE001
        return dict(backend=None, backends_available=None, backend_note=(
            f"could not query epd_kernels.backends: {type(e).__name__}: {e}"))


def machine_info(device: str = "cpu") -> dict:
    import torch

    cpuinfo = _read("/proc/cpuinfo")
    cores = set(re.findall(r"^physical id\s*:\s*(\d+)$.*?^core id\s*:\s*(\d+)$", cpuinfo,
                           re.M | re.S))
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return dict(
        cpu_model=cpu_model(), logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        physical_cores=len(cores) or None,
        cpu_flags=sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma", "f16c",
                                  "avx512bw", "avx512vl"}),
        mem_total_gb=round(int(mem.group(1)) / 2**20, 1) if mem else None,
        platform=platform.platform(), python=platform.python_version(),
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        numpy=_pkg_version("numpy"), triton=_pkg_version("triton"),
        cuda_available=torch.cuda.is_available(), cuda_version=torch.version.cuda,
        gpu=(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        device=device, **backend_info(device),
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git("rev-parse", "HEAD"),
        git_dirty=(bool(dirty) if dirty is not None else None),
        git_branch=git("rev-parse", "--abbrev-ref", "HEAD"),
        command=shlex.join(["python"] + sys.argv), argv=sys.argv, cwd=os.getcwd(),
        executable=sys.executable,
        env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                        "EPD_KERNELS_BACKEND", "TRITON_INTERPRET",
                                        "CUDA_VISIBLE_DEVICES") if k in os.environ},
        loadavg_start=loadavg())


def machine_line(info: dict) -> str:
    gpu = f" ({info['gpu']})" if info.get("gpu") else ""
    parts = [info.get("cpu_model") or "unknown CPU", f"{info.get('logical_cpus')} logical CPUs",
             f"torch {info.get('torch')}", f"{info.get('torch_threads')} threads",
             f"device {info.get('device')}{gpu}", f"backend `{info.get('backend')}`",
             f"commit `{commit_label(info.get('git_commit'), info.get('git_dirty'))}`",
             f"{info.get('date_utc')}"]
    if info.get("loadavg_start"):
        parts.append(f"load avg at start {info['loadavg_start'][0]}")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------
# markdown


MARKDOWN_HEADER = (
    "# Benchmarks\n\n"
    "Every number between `<!-- bench:...:start/end -->` markers is written by "
    "`python benchmarks/run.py --markdown BENCHMARKS.md` from a real run; do not edit "
    "inside the markers (it is overwritten). Text outside them is kept.\n"
)
#: Where `markdown_body` copies the plots, relative to the markdown file: the run's output
#: folder is usually outside the repository (or ignored), so a link into it would break.
PLOT_DIR = pathlib.PurePosixPath("docs") / "bench"


def markers(block: str) -> Tuple[str, str]:
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


def update_markdown(path: pathlib.Path, section: str, body: str,
                    marker_pair: Optional[Tuple[str, str]] = None) -> str:
    """(Re)writes the generated block of `section` in `path` (between the bench:SECTION
    markers, or `marker_pair`); returns 'created', 'appended' or 'replaced'. Raises
    ValueError on malformed markers (nothing written)."""
    path = pathlib.Path(path)
    start, end = marker_pair or markers(f"bench:{section}")
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else MARKDOWN_HEADER
    how = None if path.exists() else "created"
    n_start, n_end = text.count(start), text.count(end)
    if n_start == 1 and n_end == 1 and text.index(start) < text.index(end):
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
        how = how or "replaced"
    elif n_start == 0 and n_end == 0:
        text = text.rstrip("\n") + f"\n\n## {section}\n\n{block}\n"
        how = how or "appended"
    else:
        raise ValueError(f"{path}: malformed markers for section {section!r} "
                         f"({n_start} x {start!r}, {n_end} x {end!r}); fix them by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return how


def markdown_body(name: str, result: dict, info: dict, out_dir: pathlib.Path,
                  md_path: pathlib.Path) -> str:
    lines = [f"_Generated by `{info['command']}` — do not edit inside this block; rerun "
             "instead._", "", f"**Machine:** {machine_line(info)}", ""]
    if result.get("wall_time_s") is not None:
        lines += [f"Section wall time: {result['wall_time_s']:.1f} s.", ""]
    for t in section_tables(result):
        lines += [markdown_table(t), ""]
    if isinstance(result.get("table"), str):
        lines += ["```", result["table"].rstrip(), "```", ""]
    if result.get("notes"):
        lines += [f"- {n}" for n in result["notes"]] + [""]
    for p in result.get("plots") or ([result["plot"]] if result.get("plot") else []):
        lines += [f"![{name}: {p}]({publish_plot(out_dir / p, md_path)})", ""]
    return "\n".join(lines)


def publish_plot(plot: pathlib.Path, md_path: pathlib.Path) -> str:
    """Copies ``plot`` to `PLOT_DIR` beside ``md_path``; returns the link relative to it."""
    dest = pathlib.Path(md_path).resolve().parent / PLOT_DIR / pathlib.Path(plot).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if pathlib.Path(plot).resolve() != dest:
        shutil.copyfile(plot, dest)
    return (PLOT_DIR / dest.name).as_posix()


def write_readme(path: pathlib.Path, name: str, result: dict, info: dict) -> Optional[str]:
    """Writes the section's README block: the block it names itself (``result["readme"]``),
    else its first table between ``bench:readme-NAME`` markers. Returns a message or None."""
    own = result.get("readme")
    tables = section_tables(result)
    if isinstance(own, dict) and own.get("block"):
        t = tables[int(own.get("table", 0))]
        lines = [f"_{machine_line(info)}; `{info['command']}`_", "", markdown_table(t), ""]
        lines += [f"- {n}" for n in own.get("notes") or []]
        how = update_markdown(path, name, "\n".join(lines), markers(own["block"]))
        return f"README block {own['block']!r} {how} in {path}"
    if not tables:
        return None
    head = tables[0]
    body = (f"_{head['title']}_ — {machine_line(info)}; `{info['command']}`\n\n"
            f"{markdown_table(head)}\n")
    return f"headline table {update_markdown(path, f'readme-{name}', body)} in {path}"


# --------------------------------------------------------------------------------------
# command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few sizes and repeats (< 1 min/section)")
    ap.add_argument("--all", action="store_true", help="every section whose module exists")
    ap.add_argument("--sections", type=str_list, default=None,
                    help=f"comma list from {','.join(SECTIONS)} (default: kernels)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results",
                    help="output folder for JSON/PNG (default benchmarks/results)")
    ap.add_argument("--readme", type=pathlib.Path, default=None,
                    help="also write each section's headline table into this file "
                         "(between <!-- bench:readme-SECTION:start/end --> markers)")
    ap.add_argument("--markdown", type=pathlib.Path, default=None,
                    help="rewrite the generated blocks of this markdown file")
    g = ap.add_argument_group("section options (passed to sections whose run() accepts them)")
    for flag, kw in OPTIONS.items():
        (ap if flag in ("--device", "--backend", "--threads") else g).add_argument(flag, **kw)
    g.add_argument("--no-distilled", action="store_true",
                   help="solvers section: skip fitting the distilled solvers on the demo model")
    return ap.parse_args(argv)


def run_section(name: str, args, options: dict, info: dict, out_dir: pathlib.Path) -> dict:
    """Runs one section, prints and writes its outputs; returns its entry for machine.json
    (status "ok", "failed" or "skipped")."""
    mod, status, why = load_section(name)
    if mod is None:
        print(f"{status}: {why}", file=sys.stderr if status == "failed" else sys.stdout)
        return dict(status=status, reason=why.splitlines()[0])
    params = inspect.signature(mod.run).parameters
    passed = {k: v for k, v in options.items() if v is not None and k in params}
    t0, started = time.perf_counter(), time.time()
    try:
        result = mod.run(args.quick, out_dir, **passed)
    except Exception as e:  # noqa: BLE001 - report, keep going with the other sections
        skip = missing_optional(e)
        if skip:
            print(f"skipped: {skip}")
            return dict(status="skipped", reason=skip)
        print(traceback.format_exc(), file=sys.stderr)
        return dict(status="failed", reason=f"{type(e).__name__}: {e}",
                    wall_time_s=time.perf_counter() - t0)
    if not isinstance(result, dict):
        result = {} if result is None else {"result": result}
    if result.get("skipped"):
        print(f"skipped: {result['skipped']}")
        return dict(status="skipped", reason=str(result["skipped"]))
    wall = time.perf_counter() - t0
    result.setdefault("wall_time_s", wall)
    json_path = out_dir / f"{name}.json"
    if not json_path.exists() or json_path.stat().st_mtime < started - 1:
        json_path.write_text(json.dumps(result, indent=1, default=str))  # the section wrote none
    print(f"\n{render_text(name, result)}\n\n[{name}] {wall:.1f} s; wrote {json_path}")
    entry = dict(status="ok", wall_time_s=wall, options=passed, json=str(json_path))
    for kind, path in (("markdown", args.markdown), ("readme", args.readme)):
        if not path:
            continue
        try:
            if kind == "markdown":
                body = markdown_body(name, result, info, out_dir, path)
                msg = f"markdown block {update_markdown(path, name, body)} in {path}"
            else:
                msg = write_readme(path, name, result, info)
        except ValueError as e:
            entry.update(status="failed", reason=f"{kind} not written: {e}")
            print(f"error: {e}", file=sys.stderr)
            continue
        if msg:
            print(f"[{name}] {msg}")
            entry[kind] = msg
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    known = known_sections()
    wanted = known if args.all else (args.sections or list(DEFAULT_SECTIONS))
    unknown = [s for s in wanted if s not in known]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch  # after argument parsing, so --help stays fast

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        from epd_kernels import backends

        backends.set_backend(args.backend)  # for every section (and the machine info)
    info = machine_info(args.device)
    print(f"machine: {machine_line(info)}\ncommand: {info['command']}")
    if info.get("backend_note"):
        print(f"note: {info['backend_note']}")
    info["sections"] = {}

    def write_machine():
        info["loadavg_end"] = loadavg()
        (out_dir / "machine.json").write_text(json.dumps(info, indent=1, default=str))

    write_machine()
    options = {k: getattr(args, k, None) for k in OPTION_NAMES}
    options["demo_distilled"] = not args.no_distilled
    for name in wanted:
        print(f"\n=== section {name} ===", flush=True)
        info["sections"][name] = run_section(name, args, options, info, out_dir)
        write_machine()

    print("\nsummary: " + "; ".join(
        f"{n}: {e['status']}" + (f" ({e['wall_time_s']:.1f} s)" if "wall_time_s" in e else "")
        + (f" ({e['reason']})" if e.get("reason") else "")
        for n, e in info["sections"].items()))
    print(f"machine info: {out_dir / 'machine.json'}")
    failed = [n for n, e in info["sections"].items() if e["status"] == "failed"]
    if failed:
        print(f"error: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
