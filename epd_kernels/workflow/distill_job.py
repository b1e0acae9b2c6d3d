"""`epd distill`: EPD / AMED distillation or a D-ODE fit, to a params file.

* ``epd``, ``epd-ipndm``, ``amed``, ``amed-ipndm``: `epd_kernels.distill` (its options map
  one to one; ``--fast`` applies `FAST_SETTINGS` beneath the options given explicitly);
  resumable with ``--checkpoint``; under torchrun as that package's docstring says.
* ``d-euler``, ``d-heun``, ``d-ipndm``: `fit_dode` (closed form), computed by rank 0.

An option of one family given to another is a `UserError`. Conditional models get labels
``row % num_classes`` (rows: pool entries, or batch rows with ``--pool none``;
``--class-label`` for one class or ``none``). The params record the model spec and sample
shape in their ``meta``, which `epd sample` checks.
"""
from __future__ import annotations

import os
import sys
import time

from ..params.amed import AMED_FORMS
from . import outputs
from .distributed import distributed_context, local_device
from .errors import UserError, one_line
from .resolve import (AMED_SOLVERS, DISTILLABLE, EPD_SOLVERS, check_budget, label_cond,
                      load_model_or_fail, model_shape, parse_class_label)
from .threads import model_batch_runner, pick_threads

__all__ = ["run_distill"]

#: Grid kinds `--schedule` takes besides "auto" (see `epd_kernels.get_sigmas`).
SCHEDULE_KINDS = ("polynomial", "logsnr", "time-uniform")
#: Options only the trained (EPD, AMED) solvers read.
_TRAINING_OPTIONS = ("num_points", "iterations", "lr", "checkpoint", "pool", "teacher_points",
                     "fast", "learn_grid")


def run_distill(args) -> int:
    solver = _check_options(args)
    check_budget(solver, args.nfe)
    outputs.ensure_writable_file(args.out, force=bool(args.force))
    if args.checkpoint:
        outputs.ensure_writable_file(args.checkpoint)
    label_mode = parse_class_label(args.class_label)
    args.device = local_device(args.device)
    model = load_model_or_fail(args.model, device=args.device)
    shape = model_shape(model)
    probe = args.batch_size or 64
    threads = pick_threads(args.threads, model_batch_runner(
        model, shape, probe, label_cond(model, range(probe), label_mode, args.device),
        args.device), args.device)

    with distributed_context(args.device) as dist:
        t0 = time.perf_counter()
        if dist.is_main:   # the library's bars show the phases; this says what runs
            print(f"epd distill: {solver} nfe={args.nfe} on {args.model} (shape {list(shape)})"
                  f", {threads} thread(s)" + (f" x {dist.world} processes" if dist.active
                                               else "") + f" -> {args.out}", flush=True)
        params = None
        if solver in EPD_SOLVERS + AMED_SOLVERS:
            params = _distill(args, solver, model, shape, label_mode, dist)
        elif dist.is_main:
            params = _fit_dode(args, solver, model, shape, label_mode)
        if dist.is_main:
            params.meta.update({"model": args.model, "shape": list(shape),
                                "class_labels": label_mode if isinstance(label_mode, str)
                                else int(label_mode),
                                "command": "epd " + " ".join(sys.argv[1:])})
            params.save(args.out, overwrite=args.force)
            loss = params.meta.get("final_loss")
            extra = f", final loss {loss:.4g}" if isinstance(loss, float) else ""
            print(f"epd distill: {solver} nfe={params.nfe} on {args.model}: wrote {args.out} "
                  f"({time.perf_counter() - t0:.1f} s{extra}, {threads} thread(s)"
                  + (f" in each of {dist.world} processes" if dist.active else "") + ")",
                  flush=True)
        dist.barrier()
    return 0


def _given(args, names):
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]


def _check_options(args) -> str:
    """The solver's name; `UserError` for an option its family does not read, or a bad
    value, before the model is loaded."""
    solver = (args.solver or "").strip().lower()
    if solver not in DISTILLABLE:
        raise UserError(f"cannot distill solver {args.solver!r}; distillable solvers: "
                        f"{', '.join(DISTILLABLE)}")
    trained = solver in EPD_SOLVERS + AMED_SOLVERS
    if solver in AMED_SOLVERS and _given(args, ("num_points",)):
        raise UserError(f"--num-points only applies to the EPD solvers (epd, epd-ipndm); "
                        f"AMED ({solver}) has one intermediate point per step")
    given = _given(args, ("amed_form", "features"))
    if solver not in AMED_SOLVERS and given:
        raise UserError(f"{', '.join(given)} only apply to the AMED solvers (amed, "
                        f"amed-ipndm), not to {solver}")
    given = _given(args, _TRAINING_OPTIONS) + ([] if args.compare else ["--no-compare"])
    if not trained and given:
        raise UserError(f"{', '.join(given)} only apply to the EPD and AMED solvers; "
                        f"D-ODE ({solver}) is fitted in closed form")
    if solver in AMED_SOLVERS:
        _features(args)
        if getattr(args, "learn_grid", None) is not None:
            raise UserError("--learn-grid applies to the EPD solvers only (epd, epd-ipndm)")
    if args.schedule is not None:
        s = args.schedule = str(args.schedule).strip().lower()
        if s == "auto" and not trained:
            raise UserError("--schedule auto (the grid search) applies to the EPD and AMED "
                            "solvers; give D-ODE a grid kind: " + ", ".join(SCHEDULE_KINDS))
        if s != "auto" and s not in SCHEDULE_KINDS:
            raise UserError(f"--schedule must be 'auto' or one of "
                            f"{', '.join(SCHEDULE_KINDS)}, got {s!r}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not os.fspath(args.out).endswith(".safetensors"):
        raise UserError(f"--out must be a .safetensors file, got {args.out!r}")
    return solver


def _features(args):
    """``(--amed-form, --features)`` as the library takes them (features None for the
    table form)."""
    form = args.amed_form or "predictor"
    if form not in AMED_FORMS:
        raise UserError(f"--amed-form must be one of {', '.join(AMED_FORMS)}, got "
                        f"{args.amed_form!r}")
    if form == "table":
        if args.features is not None:
            raise UserError("--features is only read by the AMED predictor; the table form "
                            "(--amed-form table) reads no features")
        return form, None
    spec = args.features or "denoised"
    if spec != "denoised" and not (spec.startswith("module:") and len(spec) > 7):
        raise UserError(f"--features must be 'denoised' or 'module:<dotted.submodule.name>' "
                        f"(e.g. module:net.mid2, the embedded U-Net's bottleneck), got "
                        f"{spec!r}")
    return form, spec


def _distill(args, solver, model, shape, label_mode, dist):
    """EPD or AMED by `epd_kernels.distill`, with the command line's conditioning."""
    from ..distill import DEFAULT_BATCH_SIZE, DEFAULT_POOL, conditioning_rows, distill
    from ..distill.schedule_search import DEFAULT_VAL_SIZE, FAST_SETTINGS, SEARCH_OPTIONS

    if solver in AMED_SOLVERS:
        form, features = _features(args)
        method = dict(method="amed", amed_form=form, features=features)
    else:
        method = dict(num_points=args.num_points or 2)
    # --fast: FAST_SETTINGS under the options given explicitly; its grid-search options
    # only with --schedule auto.
    fast = dict(FAST_SETTINGS) if args.fast else {}
    search = {k: fast.pop(k) for k in SEARCH_OPTIONS if k in fast}
    if args.iterations is not None:   # an explicit length is also the final runs' length
        for k in ("final_iterations", "grid_iterations"):
            search.pop(k, None)
    pool = fast.get("pool", DEFAULT_POOL) if args.pool is None else args.pool
    pool = None if pool == "none" else pool
    # What is not given is left to distill's time budget (`--time-budget`), except the
    # pool, which the labels must know, and the batch where the labels follow it.
    bs = args.batch_size or fast.get("batch_size")
    if bs is None and pool is None:
        bs = DEFAULT_BATCH_SIZE
    # Labels follow the training draws: one per pool entry (the draw keeps its label in
    # every batch), or one per row of the global batch with fresh noise (--pool none).
    cond = label_cond(model, range(conditioning_rows(pool, (bs or 1) * dist.world)),
                      label_mode, args.device)
    extra = {"pool": pool, "M": args.teacher_points if args.teacher_points is not None
             else fast.get("M"), "iterations": args.iterations or fast.get("iterations"),
             "batch_size": bs, "schedule": args.schedule}
    if args.schedule == "auto":
        extra.update(search)
        if cond and label_mode == "seed":   # labels of the validation draws
            val_rows = range(search.get("val_size", DEFAULT_VAL_SIZE))
            extra["val_cond"] = label_cond(model, val_rows, label_mode, args.device)
    if getattr(args, "learn_grid", None) is not None:
        extra["learn_grid"] = args.learn_grid == "on"
    extra = {k: v for k, v in extra.items() if v is not None or k == "pool"}
    try:
        return distill(model, nfe=args.nfe, shape=shape, plugin=solver.endswith("-ipndm"),
                       time_budget_s=args.time_budget, lr=args.lr, seed=args.seed,
                       device=args.device, checkpoint=args.checkpoint, compare=args.compare,
                       progress=args.progress and dist.is_main, **method, **extra, **cond)
    except ValueError as e:
        raise UserError(one_line(e)) from None


def _fit_dode(args, solver, model, shape, label_mode):
    from ..distill.dode_fit import DEFAULT_FIT_BATCH, fit_dode

    bs = args.batch_size or DEFAULT_FIT_BATCH
    try:
        return fit_dode(model, solver=solver, nfe=args.nfe, shape=shape, batch_size=bs,
                        seed=args.seed, device=args.device, schedule=args.schedule,
                        **label_cond(model, range(bs), label_mode, args.device))
    except ValueError as e:
        raise UserError(one_line(e)) from None
