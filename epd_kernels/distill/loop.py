"""`distill`: fit EPD / EPD-Plugin or AMED-Solver / AMED-Plugin parameters to a teacher (see
the package docstring). The method-specific part (what is optimised, how it is unrolled,
what is returned) is a student (`students`); everything else is shared."""
from __future__ import annotations

import contextlib
import math
import numbers
import time
import warnings
from typing import Callable, Optional, Union

import torch

from ..params.amed import AMED_FORMS, AMEDParams
from ..params import EPDParams
from ..sampling import _resolve_sigmas, nfe_to_steps
from ..solvers.common import check_cond_keywords, check_int
from . import checkpoint as ckpt
from .latent import DELTA_MAX, O_MAX
from .batches import TeacherBatches
from .students import AMEDStudent, EPDStudent, amed_start
from .teacher import INSERTIONS, TEACHERS

__all__ = ["distill", "mse_loss", "cosine_lr", "DEFAULT_ITERATIONS", "DEFAULT_BATCH_SIZE",
           "DEFAULT_LR", "DEFAULT_M", "DEFAULT_POOL", "METHODS"]

#: Defaults chosen by experiment on the 64-dim Gaussian mixture (package docstring).
DEFAULT_ITERATIONS = 300
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 0.05
DEFAULT_M = 15
DEFAULT_POOL = 4096
#: Default number of EPD branches.
DEFAULT_K = 2
#: What the loss compares (``distill(match=...)``): every student state with the teacher's
#: at the same sigma, or only the final state.
MATCHES = ("trajectory", "final")
#: Distillation methods: EPD-Solver (default) and AMED-Solver.
METHODS = ("epd", "amed")


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over batch and elements (the default distance)."""
    return (student - teacher).pow(2).mean()


def cosine_lr(lr: float, iteration: int, iterations: int) -> float:
    """Cosine decay from ``lr`` at iteration 0 towards 0 at ``iterations``."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * iteration / iterations))


# --------------------------------------------------------------------------------------
# helpers


def _dist():
    """(world_size, rank), (1, 0) without an initialised process group."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size(), d.get_rank()
    return 1, 0


@contextlib.contextmanager
def _frozen(denoiser):
    """Sets requires_grad False on an nn.Module's parameters; restores the flags afterwards."""
    if not isinstance(denoiser, torch.nn.Module):
        yield
        return
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _default_device(denoiser):
    if isinstance(denoiser, torch.nn.Module):
        for t in list(denoiser.parameters()) + list(denoiser.buffers()):
            return t.device
    return torch.device("cpu")


def _schedule_description(schedule):
    if schedule is None:
        return {"kind": "polynomial", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0}
    if isinstance(schedule, (str, dict)):
        return schedule
    return {"kind": "explicit"}


def _rank_cond(cond: dict, global_batch: int, rows: range) -> dict:
    """Tensors whose leading dim is the global batch are sliced to this rank's rows."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == global_batch:
            v = v[rows.start:rows.stop]
        out[k] = v
    return out


def _pool_cond(cond: dict, pool: int, global_batch: int) -> dict:
    """The conditioning tensors with one row per pool entry (leading dimension ``pool``).
    Tensors with one row per batch sample (and another length) cannot follow the pool."""
    rows = {k: v for k, v in cond.items() if isinstance(v, torch.Tensor) and v.dim() >= 1
            and v.shape[0] == pool}
    per_batch = [k for k, v in cond.items() if k not in rows and isinstance(v, torch.Tensor)
                 and v.dim() >= 1 and v.shape[0] == global_batch]
    if per_batch:
        raise ValueError(f"conditioning {per_batch} has one row per sample of the batch "
                         f"({global_batch}), which a fixed noise pool cannot follow: give one "
                         f"row per pool entry (leading dimension pool={pool}), or pass "
                         f"pool=None (fresh noise every iteration)")
    return rows


def conditioning_rows(pool: Optional[int], global_batch: int) -> int:
    """How many rows per-sample conditioning of a distillation has: one per pool entry
    with a pool, one per sample of the global batch with fresh noise (``pool=None``)."""
    return global_batch if pool is None else pool


def _rows_of(pool_cond: dict, n: int) -> dict:
    """``n`` rows of per-pool-entry conditioning (cycling), e.g. for a probing call."""
    return {k: v[torch.arange(n, device=v.device) % v.shape[0]] for k, v in pool_cond.items()}


def _clone(obj):
    """A copy of nested dicts / lists / tuples whose tensors are cloned (cheaper than
    copy.deepcopy for an optimizer state_dict, which is taken every iteration)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _callable_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _flat_grads(module) -> torch.Tensor:
    """All gradients of ``module`` in one vector (zeros where a gradient is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .to(torch.float64) for p in module.parameters()])


def _set_flat_grads(module, flat: torch.Tensor) -> None:
    i = 0
    for p in module.parameters():
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).to(p.dtype).clone()
        i += n


# --------------------------------------------------------------------------------------
# distill


#: Keywords of neighbouring functions that `distill` does not take: given to `distill` they
#: would travel to the denoiser as conditioning (`check_cond_keywords` refuses them).
_OTHER_OPTIONS = ("teacher_factor", "refine", "refine_iterations", "solver", "params",
                  "num_steps", "steps", "lambdas", "noise")


def distill(denoiser: Callable, *, nfe: int, shape, num_points: Optional[int] = None,
            plugin: bool = False, teacher: str = "dpm2", M: int = DEFAULT_M, schedule=None,
            afs: bool = True, iterations: int = DEFAULT_ITERATIONS,
            batch_size: int = DEFAULT_BATCH_SIZE, lr: Optional[float] = None, seed: int = 0,
            device=None, checkpoint=None, progress: bool = True,
            loss: Optional[Callable] = None, max_order: int = 4, insert: str = "polynomial",
            checkpoint_every: int = 25, dtype: torch.dtype = torch.float32,
            init: Union[EPDParams, AMEDParams, None] = None,
            delta_max: Optional[float] = None, o_max: Optional[float] = None,
            max_failures: int = 5, pool: Optional[int] = DEFAULT_POOL, method: str = "epd",
            amed_form: str = "predictor", features=None, match: Optional[str] = None,
            learn_grid: Optional[bool] = None, **cond) -> Union[EPDParams, AMEDParams]:
    """Distils EPD-Solver / EPD-Plugin (or, with ``method="amed"``, AMED-Solver / AMED-Plugin)
    parameters for ``denoiser`` at latency ``nfe``.

    The method, how the defaults were chosen (by experiment on the 64-dim Gaussian
    mixture: ``iterations=300``, ``batch_size=64``, ``lr=0.05``, ``M=15``, ``pool=4096``),
    checkpoints and multi-process runs are described in the `epd_kernels.distill` package
    docstring.

    Args:
        denoiser: ``D(x [B, *shape], sigma [B], **cond) -> x0_hat``; an ``nn.Module``'s
            weights are frozen during the run and their ``requires_grad`` restored after.
        nfe: latency budget, ``2 S - afs`` (odd with AFS: 3, 5, 7, 9, ...).
        shape: per-sample shape, e.g. ``(C, H, W)``.
        num_points: K parallel branches of EPD (default 2); must be 1 or unset for AMED.
        plugin: the plugin on iPNDM (``max_order``): EPD-Plugin, or AMED-Plugin.
        teacher: "dpm2" or "heun". M: points inserted in every student interval.
            insert: "polynomial" (uniform in sigma^(1/rho)) or "logsnr" / "geometric".
        schedule: "auto" (the grid is chosen among `schedule_search.DEFAULT_CANDIDATES`
            by short distillations scored on held-out validation noise, then the winner
            is distilled in full; about 2.7 plain runs; lr defaults to 0.1 there), or
            None (polynomial, rho 7, sigma 0.002..80), a kind name, a dict of
            `get_sigmas` arguments, or explicit sigmas (as in `sample`).
        afs: analytic first step (default on).
        iterations, batch_size (per process), lr: Adam with cosine decay.
        seed: the training noise is a pure function of (seed, iteration, row).
        pool: size P of the fixed noise pool (teacher run once), or None for fresh noise
            every iteration. Per-sample conditioning with a pool: give tensors with one row
            per pool entry (leading dimension P, e.g. ``class_labels=arange(P) % C``); each
            draw keeps its row for the teacher and in every batch that picks it. With
            ``pool=None`` per-sample tensors have one row per sample of the global batch.
        device: where to train (default: the denoiser's device, else CPU). dtype: of the
            states (the latents are float64).
        checkpoint: path of a resumable checkpoint; checkpoint_every: iterations between
            writes.
        progress: tqdm bar with the loss (rank 0).
        loss: ``callable(student_state, teacher_state) -> scalar``, summed over the S
            steps (``match="trajectory"``) or applied to the final state only
            (``match="final"``); default `mse_loss`.
        match: "trajectory" (the papers' loss: every student state against the teacher's
            state at the same sigma; the default on a fixed grid) or "final" (only
            ``x(sigma_min)``; the student may leave the teacher's path on the way; the
            default, and the only choice, with ``learn_grid``). See `MATCHES`.
        learn_grid: EPD only: also learn the interior noise levels of the grid (the ends
            stay; `latent.LatentEPD`), starting from ``schedule``'s grid. The teacher's
            states at the moving student sigmas would change with every step, so the loss
            compares final states only. The params carry the learned grid. Default: on
            for EPD with ``schedule="auto"`` (the searched grid is the start of the final
            run; see `schedule_search`), off otherwise.
        init: starting `EPDParams` (same grid, K, afs, plugin; default `EPDParams.init`),
            or for AMED starting `AMEDParams` (same grid, afs, plugin, form; default the
            neutral `AMEDParams.init`).
        delta_max, o_max: bounds of |delta| and |o|; default 0.1 / 0.1 for EPD
            (`latent`), the paper's 0.2 / 0.01 for AMED.
        max_failures: consecutive non-finite steps tolerated before RuntimeError.
        method: "epd" (default) or "amed" (AMED-Solver, arXiv 2312.00094).
        amed_form: for AMED, "predictor" (default, the paper's network) or "table" (one
            r, delta, o per step).
        features: for the AMED predictor: "denoised" (default), "module:<dotted.name>"
            (a forward hook on a submodule of an nn.Module denoiser, e.g. the U-Net
            bottleneck) or a callable ``(x, sigma, denoised) -> [B, F]``
            (`epd_kernels.amed_predictor`). Its size F is read from the data shape, or
            from one probing call (no grad) of the denoiser / the callable on zeros.
        **cond: conditioning for the denoiser (see the package docstring for how it is
            split between processes).

    Returns:
        Detached, validated `EPDParams` (`AMEDParams` for AMED) whose ``meta`` records
        the settings (teacher, M, pool, iterations, lr, batch, seed, ...), ``initial_loss``,
        ``final_loss`` (mean of the last 10 finite losses), ``skipped_steps`` and
        ``wall_time_s`` (summed over resumed runs).

    Raises:
        ValueError: invalid arguments, an NFE the grid cannot meet, or a checkpoint
            written with other settings. RuntimeError: ``max_failures`` non-finite steps
            in a row.
    """
    from .schedule_search import SEARCH_OPTIONS, distill_auto  # (imports this module)

    auto = isinstance(schedule, str) and schedule == "auto"
    if not auto:
        given = sorted(k for k in cond if k in SEARCH_OPTIONS)
        if given:
            raise ValueError(f"{given} only apply with schedule='auto' (the grid search)")
    check_cond_keywords(denoiser, {k: v for k, v in cond.items()
                                   if not (auto and k in SEARCH_OPTIONS)},
                        where="distill", options=_OTHER_OPTIONS)
    if auto:
        # The grid is chosen on held-out noise among candidate grids, then distilled in full
        # (`schedule_search.distill_auto`); it travels inside the returned params.

        auto_kw = dict(num_points=num_points, teacher=teacher, M=M, afs=afs,
                       iterations=iterations, batch_size=batch_size, seed=seed, device=device,
                       checkpoint=checkpoint, progress=progress, loss=loss,
                       max_order=max_order, insert=insert, checkpoint_every=checkpoint_every,
                       dtype=dtype, delta_max=delta_max, o_max=o_max,
                       max_failures=max_failures, pool=pool, method=method,
                       amed_form=amed_form, features=features, match=match,
                       learn_grid=learn_grid)
        if init is not None:
            raise ValueError("init= cannot be combined with schedule='auto' (each candidate "
                             "grid starts from its own neutral parameters)")
        if lr is not None:
            auto_kw["lr"] = lr
        params, _ = distill_auto(denoiser, nfe=nfe, shape=shape, plugin=plugin, **auto_kw,
                                 **cond)
        return params
    lr = DEFAULT_LR if lr is None else lr
    # ---- arguments
    nfe = check_int("nfe", nfe, 1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    amed = method == "amed"
    if amed:
        if num_points is not None and num_points != 1:
            raise ValueError(f"num_points must be 1 or unset for method='amed' (AMED has one "
                             f"intermediate point per step), got {num_points!r}")
        if amed_form not in AMED_FORMS:
            raise ValueError(f"amed_form must be one of {AMED_FORMS}, got {amed_form!r}")
        K = 1
    else:
        if features is not None:
            raise ValueError("features= is only used by method='amed' (the AMED predictor)")
        K = check_int("num_points", DEFAULT_K if num_points is None else num_points, 1)
    M = check_int("M", M, 0)
    iterations = check_int("iterations", iterations, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    max_failures = check_int("max_failures", max_failures, 1)
    seed = int(seed)
    shape = tuple(int(n) for n in ((shape,) if isinstance(shape, numbers.Integral) else shape))
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {sorted(TEACHERS)}, got {teacher!r}")
    if insert not in INSERTIONS:
        raise ValueError(f"insert must be one of {INSERTIONS}, got {insert!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    steps = nfe_to_steps("epd", nfe, afs)
    sigmas = _resolve_sigmas(schedule, steps)
    rho = float(schedule.get("rho", 7.0)) if isinstance(schedule, dict) else 7.0
    loss_fn = mse_loss if loss is None else loss
    if learn_grid is None:
        learn_grid = False
    if not isinstance(learn_grid, bool):
        raise ValueError(f"learn_grid must be True, False or None, got {learn_grid!r}")
    if match is None:
        match = "final" if learn_grid else "trajectory"
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if learn_grid and match != "final":
        raise ValueError("learn_grid=True needs match='final': the teacher's states at the "
                         "student sigmas move with the grid, its final state does not")
    if learn_grid and method == "amed":
        raise ValueError("learn_grid is only available for method='epd'")
    device = torch.device(device) if device is not None else _default_device(denoiser)

    world, rank = _dist()
    global_batch = world * batch_size
    rows = range(rank * batch_size, (rank + 1) * batch_size)
    # With a pool, tensors with one row per pool entry travel with the pool's draws (the
    # teacher sees each draw with its row; a batch gets the rows of its entries); with
    # fresh noise, tensors with one row per sample of the global batch are sliced per rank.
    if pool is not None:
        pool = check_int("pool", pool, 1)
        pool_cond = _pool_cond(cond, pool, global_batch)
        rank_cond = {k: v for k, v in cond.items() if k not in pool_cond}
    else:
        pool_cond = {}
        rank_cond = _rank_cond(cond, global_batch, rows)

    if amed:
        probe = torch.zeros((batch_size,) + shape, dtype=dtype, device=device)
        start, delta_max, o_max = amed_start(
            denoiser, sigmas, init=init, form=amed_form, features=features, plugin=plugin,
            afs=afs, max_order=max_order, schedule=_schedule_description(schedule),
            delta_max=delta_max, o_max=o_max, seed=seed, nfe=nfe, probe=probe,
            cond=dict(rank_cond, **_rows_of(pool_cond, batch_size)))
        student = AMEDStudent(denoiser, start, delta_max, o_max, device)
    else:
        delta_max = DELTA_MAX if delta_max is None else delta_max
        o_max = O_MAX if o_max is None else o_max
        if init is None:
            start = EPDParams.init(sigmas, K, afs=afs, plugin=plugin, max_order=max_order,
                                   schedule=_schedule_description(schedule))
        else:
            if not isinstance(init, EPDParams):
                raise ValueError(f"init must be EPDParams for method='epd', got "
                                 f"{type(init).__name__}")
            init.check_compatible(nfe=nfe, num_points=K, sigmas=sigmas)
            if init.afs != bool(afs) or init.plugin != bool(plugin):
                raise ValueError(f"init params have afs={init.afs}, plugin={init.plugin} but "
                                 f"afs={afs}, plugin={plugin} was asked")
            start = init.detach()
            start.max_order = max_order
        student = EPDStudent(denoiser, start, delta_max, o_max, device, learn_grid)
    latent = student.module
    optimizer = torch.optim.Adam(student.param_groups(), lr=lr)

    settings = {
        "nfe": nfe, "shape": list(shape), "num_points": K, "plugin": bool(plugin),
        "afs": bool(afs), "max_order": int(max_order), "teacher": teacher, "M": M,
        "insert": insert, "sigmas": sigmas.tolist(), "iterations": iterations,
        "global_batch_size": global_batch, "lr": float(lr), "seed": seed,
        "dtype": str(dtype), "delta_max": float(delta_max), "o_max": float(o_max),
        "loss": _callable_name(loss_fn), "init": student.init_summary(),
        "cond": sorted(cond), "pool": pool,
    }
    if match != "trajectory":  # (absent for the defaults, so older checkpoints resume)
        settings["match"] = match
    if learn_grid:
        settings["learn_grid"] = True
    if amed:  # (EPD's settings keep their historical keys, so old checkpoints resume)
        del settings["num_points"]
        settings.update(method="amed", amed_form=start.form, features=_feature_label(start))

    # ---- state (fresh or resumed)
    it, failures, skipped, losses, elapsed = 0, 0, 0, [], 0.0
    if checkpoint is not None:
        if rank == 0:
            ckpt.remove_stale_temporaries(checkpoint)
        saved = ckpt.load_checkpoint(checkpoint)
        if saved is not None:
            ckpt.check_settings(checkpoint, saved["settings"], settings)
            latent.load_state_dict(saved["latent"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            it, failures = int(saved["iteration"]), int(saved["failures"])
            skipped = int(saved["skipped"])
            losses, elapsed = list(saved["losses"]), float(saved["elapsed"])
        if world > 1:
            torch.distributed.barrier()

    def snapshot():
        return {"settings": settings, "iteration": it, "failures": failures, "skipped": skipped,
                "latent": _clone(latent.state_dict()),
                "optimizer": _clone(optimizer.state_dict()),
                "torch_rng": torch.get_rng_state(), "num_losses": len(losses),
                "elapsed": elapsed + (time.perf_counter() - t0)}

    def write(state):
        if checkpoint is not None and rank == 0:
            state = dict(state)
            state["losses"] = losses[:state.pop("num_losses")]
            ckpt.save_checkpoint(checkpoint, state)

    # ---- training
    data = TeacherBatches(denoiser, sigmas, shape, seed=seed, M=M, teacher=teacher,
                          insert=insert, rho=rho, device=device, dtype=dtype, pool=pool,
                          cond=rank_cond, pool_cond=pool_cond, world=world, rank=rank)
    S = steps
    first = it
    t0 = time.perf_counter()
    last = snapshot()
    bar = None
    if progress and rank == 0 and it < iterations:
        from tqdm.auto import tqdm
        bar = tqdm(total=iterations, initial=it, desc="distill " + student.solver,
                   dynamic_ncols=True)
    try:
        with _frozen(denoiser):
            while it < iterations:
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(lr, it, iterations) * group.get("lr_scale", 1.0)
                x, targets, batch_cond = data.batch(it, rows)
                traj = student.unroll(x, **rank_cond, **batch_cond)
                matched = range(S) if match == "trajectory" else (S - 1,)
                value = sum(loss_fn(traj[n + 1], targets[n]) for n in matched)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                flat = torch.cat([value.detach().reshape(1).to(torch.float64),
                                  _flat_grads(latent)])
                if world > 1:
                    torch.distributed.all_reduce(flat)
                    flat /= world
                loss_value = float(flat[0])
                if torch.isfinite(flat).all():
                    _set_flat_grads(latent, flat[1:])
                    optimizer.step()
                    failures = 0
                else:
                    failures += 1
                    skipped += 1
                    warnings.warn(f"distill: iteration {it}: non-finite "
                                  f"{'loss' if not math.isfinite(loss_value) else 'gradient'}"
                                  f" ({failures} in a row); the step is skipped",
                                  RuntimeWarning, stacklevel=2)
                    if failures >= max_failures:
                        raise RuntimeError(
                            f"distill: {failures} consecutive iterations (the last {it}) gave "
                            f"a non-finite loss or gradient; giving up. Check the denoiser "
                            f"(does it return NaN/inf at some sigma?), lower lr "
                            f"(now {lr}) or use dtype=torch.float64.")
                losses.append(loss_value)
                it += 1
                last = snapshot()
                if it % checkpoint_every == 0 and it < iterations:
                    write(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
    except KeyboardInterrupt:
        write(last)
        raise
    finally:
        if bar is not None:
            bar.close()
    if it > first:  # the finished state: rerunning the same call returns at once
        write(last)

    finite = [v for v in losses if math.isfinite(v)]
    tail = finite[-10:]
    meta = {
        "teacher": teacher, "M": M, "insert": insert, "pool": pool, "iterations": iterations,
        "lr": float(lr), "lr_schedule": "cosine", "optimizer": "adam",
        "batch_size": global_batch, "batch_per_rank": batch_size, "world_size": world,
        "seed": seed, "dtype": str(dtype), "delta_max": float(delta_max),
        "o_max": float(o_max), "loss": settings["loss"], "match": match,
        "learn_grid": learn_grid,
        "initial_loss": finite[0] if finite else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "skipped_steps": skipped,
        "wall_time_s": float(last["elapsed"]),
    }
    if amed:
        meta.update(method="amed", amed_form=start.form, features=settings["features"])
    return student.export(meta)


def _feature_label(start: AMEDParams):
    """The feature source as recorded in settings and meta (None for a table)."""
    if start.form == "table":
        return None
    f = start.features
    return f if isinstance(f, str) else "callable:" + _callable_name(f)
