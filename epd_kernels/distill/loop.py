"""`train`: one distillation run with resolved settings (no `AUTO` left, a fixed or learned
grid, no search): Adam on a student's latents against teacher targets, with checkpoints
and multi-process averaging. `distill` (`api`) decides the settings and calls it."""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

from ..solvers.registry import resolve_sigmas as _resolve_sigmas
from . import checkpoint as ckpt
from .batches import TeacherBatches
from .conditioning import rows_of, split_rank_cond
from .settings import DEFAULT_LR, DistillSettings
from .students import build_student, callable_name

__all__ = ["train", "mse_loss", "cosine_lr"]


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over batch and elements (the default distance)."""
    return (student - teacher).pow(2).mean()


def cosine_lr(lr: float, iteration: int, iterations: int) -> float:
    """Cosine decay from ``lr`` at iteration 0 towards 0 at ``iterations``."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * iteration / iterations))


def dist_info():
    """(world_size, rank), (1, 0) without an initialised process group."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size(), d.get_rank()
    return 1, 0


@contextlib.contextmanager
def frozen(denoiser):
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


def default_device(denoiser):
    if isinstance(denoiser, torch.nn.Module):
        for t in list(denoiser.parameters()) + list(denoiser.buffers()):
            return t.device
    return torch.device("cpu")


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


class _Run:
    """The state of one run: student, optimizer, data, counters, checkpoint I/O."""

    def __init__(self, denoiser, s: DistillSettings, cond: dict):
        self.s, self.denoiser = s, denoiser
        self.lr = DEFAULT_LR if s.lr is None else float(s.lr)
        self.loss_fn = mse_loss if s.loss is None else s.loss
        self.match = s.match or ("final" if s.learn_grid else "trajectory")
        if s.learn_grid and self.match != "final":
            raise ValueError("learn_grid=True needs match='final': the teacher's states at the "
                             "student sigmas move with the grid, its final state does not")
        self.device = torch.device(s.device) if s.device is not None else default_device(denoiser)
        self.world, self.rank = dist_info()
        self.global_batch = self.world * s.batch_size
        self.rows = range(self.rank * s.batch_size, (self.rank + 1) * s.batch_size)
        self.sigmas = _resolve_sigmas(s.schedule, s.steps)
        self.rank_cond, pool_cond = split_rank_cond(cond, s.pool, self.global_batch, self.rows)
        self.student = build_student(denoiser, s, self.sigmas, self.device,
                                     dict(self.rank_cond, **rows_of(pool_cond, s.batch_size)))
        self.optimizer = torch.optim.Adam(self.student.param_groups(), lr=self.lr)
        rho = float(s.schedule.get("rho", 7.0)) if isinstance(s.schedule, dict) else 7.0
        self.data = TeacherBatches(denoiser, self.sigmas, s.shape, seed=s.seed, M=s.M,
                                   teacher=s.teacher, insert=s.insert, rho=rho,
                                   device=self.device, dtype=s.dtype, pool=s.pool,
                                   cond=self.rank_cond, pool_cond=pool_cond, world=self.world,
                                   rank=self.rank, progress=s.progress and self.rank == 0)
        self.settings = self._settings(sorted(cond))
        self.it = self.failures = self.skipped = 0
        self.losses, self.elapsed, self.t0 = [], 0.0, time.perf_counter()

    def _settings(self, cond_names) -> dict:
        """What a checkpoint must match to be resumed (keys kept stable across versions)."""
        s, st = self.s, self.student
        out = {"nfe": s.nfe, "shape": list(s.shape), "num_points": s.K, "plugin": s.plugin,
               "afs": s.afs, "max_order": s.max_order, "teacher": s.teacher, "M": s.M,
               "insert": s.insert, "sigmas": self.sigmas.tolist(), "iterations": s.iterations,
               "global_batch_size": self.global_batch, "lr": self.lr, "seed": s.seed,
               "dtype": str(s.dtype), "delta_max": st.delta_max, "o_max": st.o_max,
               "loss": callable_name(self.loss_fn), "init": st.init_summary(),
               "cond": cond_names, "pool": s.pool}
        if self.match != "trajectory":   # (absent for the defaults, so older checkpoints resume)
            out["match"] = self.match
        if s.learn_grid:
            out["learn_grid"] = True
        if s.method == "amed":
            del out["num_points"]
            out.update(method="amed", amed_form=st.start.form, features=st.feature_label())
        return out

    def resume(self):
        path = self.s.checkpoint
        if path is None:
            return
        if self.rank == 0:
            ckpt.remove_stale_temporaries(path)
        saved = ckpt.load_checkpoint(path)
        if saved is not None:
            ckpt.check_settings(path, saved["settings"], self.settings)
            self.student.module.load_state_dict(saved["latent"])
            self.optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            self.it, self.failures = int(saved["iteration"]), int(saved["failures"])
            self.skipped = int(saved["skipped"])
            self.losses, self.elapsed = list(saved["losses"]), float(saved["elapsed"])
        if self.world > 1:
            torch.distributed.barrier()

    def snapshot(self) -> dict:
        return {"settings": self.settings, "iteration": self.it, "failures": self.failures,
                "skipped": self.skipped, "latent": _clone(self.student.module.state_dict()),
                "optimizer": _clone(self.optimizer.state_dict()),
                "torch_rng": torch.get_rng_state(), "num_losses": len(self.losses),
                "elapsed": self.elapsed + (time.perf_counter() - self.t0)}

    def write(self, state: dict):
        if self.s.checkpoint is not None and self.rank == 0:
            state = dict(state)
            state["losses"] = self.losses[:state.pop("num_losses")]
            ckpt.save_checkpoint(self.s.checkpoint, state)

    def step(self) -> float:
        """One iteration; returns the (all-reduced) loss."""
        s, S = self.s, self.s.steps
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.lr, self.it, s.iterations) * group.get("lr_scale", 1.0)
        x, targets, batch_cond = self.data.batch(self.it, self.rows)
        traj = self.student.unroll(x, **self.rank_cond, **batch_cond)
        matched = range(S) if self.match == "trajectory" else (S - 1,)
        value = sum(self.loss_fn(traj[n + 1], targets[n]) for n in matched)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        flat = torch.cat([value.detach().reshape(1).to(torch.float64),
                          _flat_grads(self.student.module)])
        if self.world > 1:
            torch.distributed.all_reduce(flat)
            flat /= self.world
        loss = float(flat[0])
        if torch.isfinite(flat).all():
            _set_flat_grads(self.student.module, flat[1:])
            self.optimizer.step()
            self.failures = 0
        else:
            self._skip(loss)
        self.losses.append(loss)
        self.it += 1
        return loss

    def _skip(self, loss: float):
        self.failures += 1
        self.skipped += 1
        what = "loss" if not math.isfinite(loss) else "gradient"
        warnings.warn(f"distill: iteration {self.it}: non-finite {what} ({self.failures} in a "
                      f"row); the step is skipped", RuntimeWarning, stacklevel=4)
        if self.failures >= self.s.max_failures:
            raise RuntimeError(
                f"distill: {self.failures} consecutive iterations (the last {self.it}) gave a "
                f"non-finite loss or gradient; giving up. Check the denoiser (does it return "
                f"NaN/inf at some sigma?), lower lr (now {self.lr}) or use "
                f"dtype=torch.float64.")

    def meta(self, wall: float) -> dict:
        s, finite = self.s, [v for v in self.losses if math.isfinite(v)]
        tail = finite[-10:]
        out = {"teacher": s.teacher, "M": s.M, "insert": s.insert, "pool": s.pool,
               "iterations": s.iterations, "lr": self.lr, "lr_schedule": "cosine",
               "optimizer": "adam", "batch_size": self.global_batch,
               "batch_per_rank": s.batch_size, "world_size": self.world, "seed": s.seed,
               "dtype": str(s.dtype), "delta_max": self.student.delta_max,
               "o_max": self.student.o_max, "loss": self.settings["loss"], "match": self.match,
               "learn_grid": bool(s.learn_grid),
               "initial_loss": finite[0] if finite else None,
               "final_loss": sum(tail) / len(tail) if tail else None,
               "skipped_steps": self.skipped, "wall_time_s": wall}
        if s.method == "amed":
            out.update(method="amed", amed_form=self.settings["amed_form"],
                       features=self.settings["features"])
        return out


def train(denoiser, s: DistillSettings, cond: dict):
    """Distils with resolved settings ``s`` (no `AUTO`, no ``schedule="auto"``); returns the
    student's detached, validated params whose ``meta`` records the run."""
    run = _Run(denoiser, s, cond)
    run.resume()
    first, last = run.it, run.snapshot()
    bar = None
    if s.progress and run.rank == 0 and run.it < s.iterations:
        from tqdm.auto import tqdm
        bar = tqdm(total=s.iterations, initial=run.it, desc="distill " + run.student.solver,
                   dynamic_ncols=True)
    try:
        with frozen(denoiser):
            while run.it < s.iterations:
                loss = run.step()
                last = run.snapshot()
                if run.it % s.checkpoint_every == 0 and run.it < s.iterations:
                    run.write(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    except KeyboardInterrupt:
        run.write(last)
        raise
    finally:
        if bar is not None:
            bar.close()
    if run.it > first:  # the finished state: rerunning the same call returns at once
        run.write(last)
    return run.student.export(run.meta(float(last["elapsed"])))
