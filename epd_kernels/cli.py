"""The ``epd`` command line (also ``python -m epd_kernels``): ``epd demo``, ``distill``,
``sample``, ``eval`` and ``list``; ``epd COMMAND --help`` for each.

Errors the user can fix print one line ``epd: error: ...`` and exit with code 2; a failed
command removes the output folders it created and left empty. This file only parses
arguments and dispatches to `epd_kernels.workflow` (one module per command).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``epd: error: ...``, exit code 2)."""

    def error(self, message):  # argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USER_ERROR)


def _int_at_least(minimum: int, word: Optional[str] = None):
    """argparse type: an integer >= minimum (or ``word``, kept as is)."""
    expected = f"an integer >= {minimum}" + (f" or '{word}'" if word else "")

    def parse(text: str):
        if word is not None and text.strip().lower() == word:
            return word
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    parse.__name__ = expected   # argparse names the type in some messages
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)
_threads = _int_at_least(1, "auto")


def _time_budget(text: str):
    """Seconds > 0, or 'none' for distill's fixed defaults."""
    if str(text).lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0:   # also NaN
        raise argparse.ArgumentTypeError(f"must be seconds > 0 or 'none', got {text!r}")
    return v


def _int_list(text: str) -> List[int]:
    vals = [_positive_int(t) for t in text.split(",") if t.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated budgets >= 1, got {text!r}")
    return vals


def _common(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--model", default=default_model,
                   help=f"model name or 'package.module:factory' (default {default_model})")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads, or 'auto' (default): time the model with 1 thread "
                        "and with all cores and keep the faster (a busy machine often runs "
                        "faster with 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models.registry import DEFAULT_MODEL

    ap = _Parser(prog="epd", description="Few-step diffusion sampling: EPD-Solver, EPD-Plugin, "
                 "AMED-Solver, AMED-Plugin, D-ODE and baseline solvers. 'epd COMMAND --help' "
                 "for details.")
    ap.add_argument("--version", action="version", version=f"epd_kernels {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_demo(sub, DEFAULT_MODEL)
    _add_distill(sub, DEFAULT_MODEL)
    _add_sample(sub, DEFAULT_MODEL)
    _add_eval(sub)
    sub.add_parser("list", help="solvers with their NFE rules and valid budgets; models")
    return ap


def _add_demo(sub, default_model: str) -> None:
    p = sub.add_parser("demo", help="distill and compare every solver on the default model",
                       description="Distills EPD and AMED (and their plugins on iPNDM when "
                       "time allows) and D-ODE, samples with every solver at NFE 3, 5, 7, 9 "
                       "from the same noise, and writes a table, a sample grid, an error-vs-NFE "
                       "plot, the params and a JSON of all figures.")
    p.add_argument("--out", default="epd_demo", help="output folder (default ./epd_demo)")
    p.add_argument("--force", action="store_true",
                   help="replace the results of an earlier demo in --out")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--nfes", type=_int_list, default=None,
                   help="budgets for the baseline solvers (default 3,5,7,9)")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="samples per solver for the metrics (default 256)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the demo aims to stay within; EPD-Plugin and AMED-Plugin "
                        "are distilled only if they fit (default 200)")
    _common(p, default_model)


def _add_distill(sub, default_model: str) -> None:
    p = sub.add_parser("distill", help="distill EPD / AMED params or fit D-ODE params",
                       description="Writes a params file (atomically). EPD and AMED runs "
                       "resume from --checkpoint and run unchanged under torchrun "
                       "(--batch-size per process; only rank 0 writes).")
    p.add_argument("--solver", required=True,
                   help="epd, epd-ipndm, amed, amed-ipndm, d-euler, d-heun or d-ipndm")
    p.add_argument("--nfe", type=_positive_int, required=True, help="latency budget")
    p.add_argument("--num-points", type=_positive_int, default=None,
                   help="EPD only: parallel points K (default 2)")
    p.add_argument("--amed-form", choices=["predictor", "table"], default=None,
                   help="AMED only: 'predictor' (default; the paper's small network, per "
                        "sample) or 'table' (one r, delta, o per step)")
    p.add_argument("--features", default=None,
                   help="AMED predictor only: what it reads at each step: 'denoised' "
                        "(default, the x0 estimate) or 'module:<dotted.name>', the output of "
                        "that submodule of the model (the embedded digits U-Net's bottleneck "
                        "is 'module:net.mid2'); 'epd sample' needs the same model")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help="EPD / AMED iterations (default: sized to --time-budget)")
    p.add_argument("--time-budget", type=_time_budget, default=60.0,
                   help="seconds the distillation may take; iterations, teacher points and "
                        "batch not given are sized to it (default 60; 'none': fixed defaults)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="batch per process (EPD / AMED, default 64) or fitting batch (D-ODE, "
                        "default 512)")
    p.add_argument("--lr", type=float, default=None,
                   help="EPD / AMED learning rate (default 0.05; the AMED predictor's weights "
                        "learn at lr/10, its output biases at lr)")
    p.add_argument("--teacher-points", type=_nonneg_int, default=None,
                   help="EPD / AMED teacher: extra points M per student interval (library "
                        "default)")
    p.add_argument("--pool", type=_int_at_least(1, "none"), default=None,
                   help="EPD / AMED: fixed pool of N training noises with cached teacher "
                        "targets, or 'none' for fresh noise (default: the library's, or "
                        "--fast's); class labels: one per pool entry (per batch row with "
                        "'none')")
    p.add_argument("--seed", type=int, default=0,
                   help="training noise seed (and the AMED predictor's initial weights)")
    p.add_argument("--schedule", default=None,
                   help="time grid: polynomial (default), logsnr, time-uniform, or (EPD / AMED) "
                        "'auto': chosen among candidate grids on held-out noise (EPD: then "
                        "learned from there, see --learn-grid), ~3-4x the cost")
    p.add_argument("--learn-grid", choices=("on", "off"), default=None,
                   help="EPD: also learn the grid's interior sigmas (final-state loss); "
                        "default on with --schedule auto (kept only if better on held-out "
                        "noise), off otherwise")
    p.add_argument("--fast", action="store_const", const=True, default=None,
                   help="EPD / AMED: the library's FAST_SETTINGS for an expensive model "
                        "(fewer, smaller iterations; a shorter grid search); options given "
                        "explicitly still win")
    p.add_argument("--checkpoint", default=None, help="EPD / AMED checkpoint file (resume)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="EPD / AMED: skip the held-out comparison with every baseline at the "
                        "NFE (meta 'comparison', the warning if EPD lost, the start kept if "
                        "better); within --time-budget it takes at most a tenth")
    p.add_argument("--class-label", default=None,
                   help="conditional models: 'seed' (row %% classes, default), an int, or 'none'")
    p.add_argument("--out", required=True, help="params file (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    _common(p, default_model)


def _add_sample(sub, default_model: str) -> None:
    p = sub.add_parser("sample", help="sample seeds to PNG/.npy files or an .npz",
                       description="One generator per seed: the output does not depend on "
                       "the batch size or the number of processes. Finished seeds are "
                       "skipped on rerun (resume).",
                       epilog="Output: a folder gets seed-NNNNNN.npy (float32) and, for "
                       "images, seed-NNNNNN.png per seed, plus run.json (the settings; "
                       "resuming with other settings is refused). X.npz: per-seed shards "
                       "go to X.npz.parts/ and are assembled into X.npz (samples, seeds, "
                       "class_labels, run) at the end; rerunning reuses the seeds an "
                       "existing X.npz holds. All files are written atomically. Under "
                       "torchrun each process takes every W-th unfinished seed.")
    p.add_argument("--solver", required=True, help="solver name (see 'epd list')")
    p.add_argument("--nfe", type=_positive_int, default=None,
                   help="latency budget (taken from --params when given)")
    p.add_argument("--params", default=None,
                   help="params file for epd / epd-ipndm / amed / amed-ipndm / d-* (from "
                        "'epd distill')")
    p.add_argument("--seeds", required=True, help="seeds, e.g. '0-99' or '0-9,100'")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="samples per batch (default 64)")
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--class-label", default=None,
                     help="conditional models: one label for all samples, or 'none'")
    grp.add_argument("--class-labels", choices=["seed"], default=None,
                     help="'seed': label = seed %% num_classes (the default)")
    p.add_argument("--png-scale", type=_nonneg_int, default=0,
                   help="upscale factor of the per-seed PNGs (0: auto, to >= 64 px)")
    p.add_argument("--out", required=True, help="output folder, or a file ending in .npz")
    _common(p, default_model)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="metrics of samples: RMSE to a reference, Frechet distance",
                       description="RMSE to --reference (matched by seed) and Frechet distance "
                       "in pixel space to the model's data (--model) or to --data.")
    p.add_argument("--samples", required=True, help="folder of seed-*.npy files or an .npz")
    p.add_argument("--model", default=None, help="model whose data the samples are compared with")
    p.add_argument("--data", default=None,
                   help="data file (.npy, or .npz with samples/images/data)")
    p.add_argument("--reference", default=None, help="reference samples (folder or .npz)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads (default 'auto': torch's, nothing to time here)")


#: command: (module of epd_kernels.workflow, its function), imported when run
_COMMANDS = {"list": ("listing", "run_list"), "demo": ("demo", "run_demo"),
             "distill": ("distill_job", "run_distill"), "sample": ("sample_job", "run_sample"),
             "eval": ("eval_job", "run_eval")}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from .workflow.errors import UserError, one_line
    from .workflow.outputs import new_folders

    module, function = _COMMANDS[args.command]
    with new_folders() as remove_empty:   # folders a failed command made and left empty go
        try:
            job = getattr(importlib.import_module(f".workflow.{module}", __package__), function)
            code = int(job(args) or 0)
        except UserError as e:
            sys.stderr.write(f"epd: error: {one_line(e)}\n")
            code = EXIT_USER_ERROR
        except KeyboardInterrupt:
            sys.stderr.write("epd: interrupted\n")
            code = 130
        except BrokenPipeError:  # e.g. 'epd list | head'
            return 0
        if code != 0:
            remove_empty()
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
