"""Puts the output of a real `epd demo` run into README.md (table, plot, sample grid).

    python tools/readme_demo.py                 # runs `epd demo --out docs/demo`, then updates
    python tools/readme_demo.py --from docs/demo    # only updates, from an existing run

The README block between ``<!-- demo:start -->`` and ``<!-- demo:end -->`` is replaced by
the run's machine, command, wall time, its ``table.md`` and links to its two PNGs, so that
the figures in the README always come from a run, never from typing. Of ``docs/demo/`` only
the PNGs, the table and the JSON are meant to be committed.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.run import commit_label, cpu_model, git, markers, update_markdown  # noqa: E402

START, END = markers("demo")


def block(run_dir: str, readme_dir: str, commit: str) -> str:
    """The README block's text (without its markers) for the demo run in `run_dir`."""
    import torch

    res = json.loads(pathlib.Path(run_dir, "results.json").read_text())
    table = pathlib.Path(run_dir, "table.md").read_text().strip()
    rel, t, skipped = os.path.relpath(run_dir, readme_dir), res["timings"], res.get("skipped")
    lines = [
        f"_Written by `python tools/readme_demo.py` from a run of `{res['command']}` — "
        f"{cpu_model()} · {os.cpu_count()} logical CPUs · {res['threads']} thread(s) · "
        f"torch {torch.__version__} · commit `{commit}`; total {t['total']:.0f} s "
        f"(reference {t['reference']:.0f} s, baselines {t['baselines']:.0f} s, D-ODE "
        f"{t['d-ode']:.0f} s, EPD {t['epd']:.0f} s"
        + (f", AMED {t['amed']:.0f} s" if "amed" in t else "")
        + f", optional {t['optional']:.0f} s)._",
        "",
        f"Model `{res['model']}` (shape {res['shape']}), {res['num_samples']} samples "
        f"(seeds {res['seeds']}" + (", class label = seed % 10" if res.get("class_labels") else "")
        + "), the same noise for every solver. RMSE: global, the root of the mean squared "
        "difference over all samples and pixels to the reference. `*` marks the lowest RMSE "
        "at each NFE.",
        "",
        table,
        "",
    ]
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{s['solver']} NFE {s['nfe']} ({s['reason']})"
                                              for s in skipped) + ".")
        lines.append("")
    lines += [
        f"![RMSE to the reference versus latency NFE]({rel}/rmse_vs_nfe.png)",
        "",
        f"![Samples: rows are solvers, columns NFE]({rel}/samples_grid.png)",
    ]
    return "\n".join(lines)


def update_readme(readme: str, text: str) -> None:
    if START not in pathlib.Path(readme).read_text():
        raise SystemExit(f"{readme}: no {START} ... {END} block to replace")
    update_markdown(pathlib.Path(readme), "demo", text, (START, END))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", help="use an existing demo output folder")
    ap.add_argument("--out", default="docs/demo", help="demo output folder (default docs/demo)")
    ap.add_argument("--readme", default="README.md")
    args, demo_args = ap.parse_known_args(argv)
    run_dir, commit = args.src, "of an earlier run (--from)"
    if run_dir is None:
        # The tree the demo runs on, read before the run rewrites docs/demo and the README.
        dirty = git("status", "--porcelain", "--untracked-files=no")
        commit, run_dir = commit_label(git("rev-parse", "HEAD"), bool(dirty)), args.out
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        epd = os.path.join(os.path.dirname(sys.executable), "epd")
        subprocess.run([epd, "demo", "--out", run_dir, *demo_args], check=True)
    update_readme(args.readme, block(run_dir, os.path.dirname(os.path.abspath(args.readme)),
                                     commit))
    print(f"updated {args.readme} from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
