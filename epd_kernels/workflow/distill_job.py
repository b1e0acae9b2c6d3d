"""`epd distill`: EPD / AMED distillation or D-ODE fitting, to a params file.

* ``epd``, ``epd-ipndm`` (EPD-Solver / EPD-Plugin, ``--num-points`` K branches) and
  ``amed``, ``amed-ipndm`` (AMED-Solver / AMED-Plugin, ``--amed-form predictor|table``,
  the predictor reading ``--features denoised|module:<name>``): `epd_kernels.distill`
  (Adam against a DPM-Solver-2 teacher with ``--teacher-points`` M extra points per
  interval; training noise drawn from a fixed ``--pool`` of draws, whose teacher targets
  are cached (default: `distill`'s, or `FAST_SETTINGS`' with ``--fast``), or fresh every
  iteration with ``--pool none``; class labels follow the draws: one per pool entry, or
  one per batch row with fresh noise); resumable with ``--checkpoint``;
  under torchrun every process takes ``--batch-size`` rows of the global batch and
  gradients are averaged, so W processes with batch b train exactly like one with batch
  W b; only rank 0 writes.
* ``d-euler``, ``d-heun``, ``d-ipndm``: `fit_dode` (closed-form least squares against a
  10x-step Heun teacher on ``--batch-size`` samples, default 512, then the joint
  refinement on the final state); computed by rank 0.

``--schedule`` picks the grid (a kind, or ``auto`` for the EPD / AMED grid search of
`distill_auto`; with per-row labels its validation draws get labels ``row % classes``
too); ``--learn-grid on|off`` (EPD) learns its interior sigmas too (default: on with
``auto``, off otherwise); ``--fast`` applies `FAST_SETTINGS` beneath the options given
explicitly.

An option of one family given to another (``--num-points`` for AMED, ``--amed-form`` or
``--features`` for EPD or D-ODE, the training options for D-ODE) is a `UserError`.
Conditional models are distilled with labels ``row % num_classes`` (rows: pool entries,
or batch rows with ``--pool none``; ``--class-label L`` for one class, ``none`` for
unconditional). The params record the model spec and the
sample shape in their ``meta``, which `epd sample` checks. An existing ``--out`` file is
replaced only with ``--force``.
"""
from __future__ import annotations

import os
import sys
import time

from ..params.amed import AMED_FORMS
from .distributed import distributed_context, local_device
from .errors import UserError, one_line
from .resolve import (AMED_SOLVERS, DISTILLABLE, EPD_SOLVERS, check_budget, class_labels_for,
                      load_model_or_fail, model_shape, parse_class_label)
from . import outputs
from .threads import model_batch_runner, pick_threads

__all__ = ["run_distill"]


def run_distill(args) -> int:
    solver = (args.solver or "").strip().lower()
    if solver not in DISTILLABLE:
        raise UserError(f"cannot distill solver {args.solver!r}; distillable solvers: "
                        f"{', '.join(DISTILLABLE)}")
    trained = solver in EPD_SOLVERS + AMED_SOLVERS
    _check_option_family(args, solver)
    if not trained:
        given = _given(args, ("num_points", "iterations", "lr", "checkpoint", "pool",
                              "teacher_points", "fast", "learn_grid"))
        if given:
            raise UserError(f"{', '.join(given)} only apply to the EPD and AMED solvers; "
                            f"D-ODE ({solver}) is fitted in closed form")
    if solver in AMED_SOLVERS:
        _features(args)  # option errors before the model is loaded
        if getattr(args, "learn_grid", None) is not None:
            raise UserError("--learn-grid applies to the EPD solvers only (epd, epd-ipndm)")
    _check_schedule(args, trained)
    check_budget(solver, args.nfe)
    for name in ("num_points", "iterations", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not os.fspath(args.out).endswith(".safetensors"):
        raise UserError(f"--out must be a .safetensors file, got {args.out!r}")
    outputs.ensure_writable_file(args.out, force=bool(args.force))
    if args.checkpoint:
        outputs.ensure_writable_file(args.checkpoint)
    label_mode = parse_class_label(args.class_label)
    args.device = local_device(args.device)
    model = load_model_or_fail(args.model, device=args.device)
    shape = model_shape(model)
    probe = args.batch_size or 64
    labels = class_labels_for(model, range(probe), label_mode)
    threads = pick_threads(args.threads, model_batch_runner(
        model, shape, probe, {} if labels is None else {"class_labels": labels.to(args.device)},
        args.device), args.device)

    with distributed_context(args.device) as dist:
        t0 = time.perf_counter()
        if dist.is_main:   # the library's bars show the phases; this says what runs
            print(f"epd distill: {solver} nfe={args.nfe} on {args.model} (shape {list(shape)})"
                  f", {threads} thread(s)" + (f" x {dist.world} processes" if dist.active
                                               else "") + f" -> {args.out}", flush=True)
        if trained:
            params = _distill(args, solver, model, shape, label_mode, dist)
        else:
            params = None
            if dist.is_main:
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


#: Grid kinds `--schedule` takes besides "auto" (see `epd_kernels.get_sigmas`).
SCHEDULE_KINDS = ("polynomial", "logsnr", "time-uniform")


def _check_schedule(args, trained: bool) -> None:
    s = args.schedule
    if s is None:
        return
    s = args.schedule = str(s).strip().lower()
    if s == "auto" and not trained:
        raise UserError("--schedule auto (the grid search) applies to the EPD and AMED "
                        "solvers; give D-ODE a grid kind: " + ", ".join(SCHEDULE_KINDS))
    if s != "auto" and s not in SCHEDULE_KINDS:
        raise UserError(f"--schedule must be 'auto' or one of {', '.join(SCHEDULE_KINDS)}, "
                        f"got {args.schedule!r}")


def _given(args, names):
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]


def _check_option_family(args, solver) -> None:
    """Options that only one family of solvers reads are refused for the others."""
    if solver in AMED_SOLVERS:
        given = _given(args, ("num_points",))
        if given:
            raise UserError(f"{', '.join(given)} only applies to the EPD solvers (epd, "
                            f"epd-ipndm); AMED ({solver}) has one intermediate point per step")
    else:
        given = _given(args, ("amed_form", "features"))
        if given:
            raise UserError(f"{', '.join(given)} only apply to the AMED solvers (amed, "
                            f"amed-ipndm), not to {solver}")


def _features(args):
    """``--features`` as the library's feature spec (None for the table form)."""
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
    auto = args.schedule == "auto"
    # --fast: FAST_SETTINGS under the options given explicitly; its grid-search options
    # only with --schedule auto.
    fast = dict(FAST_SETTINGS) if args.fast else {}
    search = {k: fast.pop(k) for k in SEARCH_OPTIONS if k in fast}
    if args.iterations is not None:   # an explicit length is also the final runs' length
        for k in ("final_iterations", "grid_iterations"):
            search.pop(k, None)
    pool = (_parse_pool(args.pool) if args.pool is not None
            else fast.get("pool", DEFAULT_POOL))
    # What is not given is left to distill's time budget (`--time-budget`), except the
    # pool, which the labels must know, and the batch where the labels follow it.
    bs = args.batch_size or fast.get("batch_size")
    if bs is None and pool is None:
        bs = DEFAULT_BATCH_SIZE
    # Labels follow the training draws: one per pool entry (the draw keeps its label in
    # every batch), or one per row of the global batch with fresh noise (--pool none).
    labels = class_labels_for(model, range(conditioning_rows(pool, (bs or 1) * dist.world)),
                              label_mode)
    cond = {} if labels is None else {"class_labels": labels.to(args.device)}
    extra = {"pool": pool}
    if args.teacher_points is not None:
        extra["M"] = args.teacher_points
    elif "M" in fast:
        extra["M"] = fast["M"]
    if auto:
        extra.update(search)
        if labels is not None and label_mode == "seed":   # labels of the validation draws
            val_rows = range(search.get("val_size", DEFAULT_VAL_SIZE))
            extra["val_cond"] = {"class_labels": class_labels_for(
                model, val_rows, label_mode).to(args.device)}
    if args.schedule is not None:
        extra["schedule"] = args.schedule
    if getattr(args, "learn_grid", None) is not None:
        extra["learn_grid"] = args.learn_grid == "on"
    for name, value in (("iterations", args.iterations or fast.get("iterations")),
                        ("batch_size", bs)):
        if value is not None:
            extra[name] = value
    try:
        return distill(model, nfe=args.nfe, shape=shape, plugin=solver.endswith("-ipndm"),
                       time_budget_s=args.time_budget, lr=args.lr, seed=args.seed,
                       device=args.device, checkpoint=args.checkpoint,
                       progress=args.progress and dist.is_main, **method, **extra, **cond)
    except ValueError as e:
        raise UserError(one_line(e)) from None


def _parse_pool(text):
    if str(text).lower() == "none":
        return None
    try:
        v = int(text)
    except ValueError:
        raise UserError(f"--pool must be an integer >= 1 or 'none', got {text!r}") from None
    if v < 1:
        raise UserError(f"--pool must be an integer >= 1 or 'none', got {v}")
    return v


def _fit_dode(args, solver, model, shape, label_mode):
    from ..distill.dode_fit import DEFAULT_FIT_BATCH, fit_dode

    bs = args.batch_size or DEFAULT_FIT_BATCH
    cond = {}
    labels = class_labels_for(model, range(bs), label_mode)
    if labels is not None:
        cond["class_labels"] = labels.to(args.device)
    try:
        return fit_dode(model, solver=solver, nfe=args.nfe, shape=shape, batch_size=bs,
                        seed=args.seed, device=args.device, schedule=args.schedule, **cond)
    except ValueError as e:
        raise UserError(one_line(e)) from None
