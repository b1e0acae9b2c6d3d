"""What one iteration trains on: starting states and teacher targets for a rank's rows.

Two sources, both pure functions of (seed, iteration, global row), so that resumed and
multi-process runs see exactly the data of one uninterrupted process:

* fresh noise (``pool=None``): row j of iteration i is ``training_noise(seed, i, [j])``;
  the teacher runs on every batch.
* a pool of P draws (``pool=P``, the default): row j of iteration i is pool entry
  ``row_seed(seed, i, j) mod P``, the noise of row p of iteration -1. The teacher runs once
  over the pool (chunks of `POOL_CHUNK` rows, on the first batch, split between processes)
  and its targets are kept, so an iteration only unrolls the student. Conditioning must
  then be the same for every row (no per-row tensors).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Callable, Optional

import torch

from .noise import row_seed, training_noise
from .teacher import teacher_targets

__all__ = ["TeacherBatches", "POOL_CHUNK", "shared_pools"]

#: Rows per teacher call when the pool is filled.
POOL_CHUNK = 256


#: Teacher pools kept for reuse inside a `shared_pools()` block, or None outside one.
_SHARED: contextvars.ContextVar = contextvars.ContextVar("epd_teacher_pools", default=None)


@contextlib.contextmanager
def shared_pools():
    """Within the block, runs with the same denoiser, grid, pool, seed and teacher settings
    share one teacher pool (the targets are a pure function of those): the grid search's
    final run continues on the winning grid without paying the teacher again."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _fingerprint(cond: dict) -> tuple:
    """A content key of conditioning (tensor bytes hashed), so that runs inside
    `shared_pools` share a pool only when their conditioning is equal, not just alike."""
    out = []
    for k in sorted(cond):
        v = cond[k]
        if isinstance(v, torch.Tensor):
            data = v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            out.append((k, str(v.dtype), tuple(v.shape), hashlib.sha1(data.tobytes()).hexdigest()))
        else:
            out.append((k, repr(v)))
    return tuple(out)


class TeacherBatches:
    """``batch(iteration, rows) -> (x [b, ...] at sigmas[0], targets [S, b, ...], cond)``;
    ``cond`` holds the batch's rows of the per-pool-entry conditioning (empty without)."""

    def __init__(self, denoiser: Callable, sigmas: torch.Tensor, shape, *, seed: int,
                 M: int, teacher: str, insert: str, rho: float, device, dtype,
                 pool: Optional[int] = None, cond: Optional[dict] = None,
                 pool_cond: Optional[dict] = None, world: int = 1, rank: int = 0,
                 progress: bool = False):
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.shape = tuple(shape)
        self.seed = seed
        self.teacher_kw = dict(M=M, teacher=teacher, insert=insert, rho=rho)
        self.device, self.dtype = device, dtype
        self.pool = pool
        self.cond = dict(cond or {})
        self.pool_cond = dict(pool_cond or {})   # tensors [pool, ...]: row p for entry p
        if self.pool_cond and pool is None:
            raise ValueError("pool_cond needs a pool")
        self.world, self.rank = world, rank
        self._pool_x = self._pool_y = None
        self.progress = progress

    def _teacher(self, x, cond, on_step=None):
        return teacher_targets(self.denoiser, x, self.sigmas, **self.teacher_kw,
                               on_step=on_step, **cond)

    def _pool_key(self):
        return (id(self.denoiser), tuple(self.sigmas.tolist()), self.shape, self.seed,
                tuple(sorted(self.teacher_kw.items())), str(self.device), self.dtype,
                self.pool, self.world, self.rank, _fingerprint(self.cond),
                _fingerprint(self.pool_cond))

    def _pool_rows_cond(self, idx) -> dict:
        """The per-pool-entry conditioning of the entries ``idx`` (a slice or an index
        tensor)."""
        return {k: v[idx if isinstance(idx, slice) else idx.to(v.device)]
                for k, v in self.pool_cond.items()}

    def _fill_pool(self, cond, scale):
        """Teacher over the whole pool (or the pool of an identical earlier run inside
        `shared_pools`: same denoiser object, grid, settings and conditioning content)."""
        shared = _SHARED.get()
        if shared is None:
            self._compute_pool(cond, scale)
            return
        key = self._pool_key()
        if key not in shared:
            self._compute_pool(cond, scale)
            shared[key] = (self._pool_x, self._pool_y)
        self._pool_x, self._pool_y = shared[key]

    def _compute_pool(self, cond, scale):
        """Teacher over the whole pool; with W processes (and P divisible by W) rank r
        computes rows [r P/W, (r+1) P/W) and the shards are all-gathered."""
        world, rank = (self.world, self.rank) if self.pool % self.world == 0 else (1, 0)
        share = self.pool // world
        starts = range(rank * share, (rank + 1) * share, POOL_CHUNK)
        bar = self._bar(len(starts))
        xs, ys = [], []
        try:
            for start in starts:
                rows = range(start, min(start + POOL_CHUNK, (rank + 1) * share))
                xs.append(training_noise(self.seed, -1, rows, self.shape, self.device,
                                         self.dtype) * scale)
                ys.append(self._teacher(xs[-1], dict(cond, **self._pool_rows_cond(
                    slice(rows.start, rows.stop))), None if bar is None else bar.update))
        finally:
            if bar is not None:
                bar.close()
        x, y = torch.cat(xs), torch.cat(ys, dim=1)
        if world > 1:
            x_all = [torch.empty_like(x) for _ in range(world)]
            y_all = [torch.empty_like(y) for _ in range(world)]
            torch.distributed.all_gather(x_all, x.contiguous())
            torch.distributed.all_gather(y_all, y.contiguous())
            x, y = torch.cat(x_all), torch.cat(y_all, dim=1)
        self._pool_x, self._pool_y = x, y

    def _bar(self, chunks: int):
        """A tqdm bar over the teacher's steps of the whole pool (None without progress)."""
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        steps = (len(self.sigmas) - 1) * (self.teacher_kw["M"] + 1)
        return tqdm(total=chunks * steps, desc=f"teacher pool ({self.pool} draws, "
                    f"M={self.teacher_kw['M']})", unit="step", leave=False, dynamic_ncols=True)

    def batch(self, iteration: int, rows: range):
        cond = self.cond
        scale = float(self.sigmas[0])
        if self.pool is None:
            noise = training_noise(self.seed, iteration, rows, self.shape, self.device, self.dtype)
            x = noise * scale
            return x, self._teacher(x, cond), {}
        if self._pool_x is None:
            self._fill_pool(cond, scale)
        idx = torch.tensor([row_seed(self.seed, iteration, j) % self.pool for j in rows],
                           device=self._pool_x.device)
        return self._pool_x[idx], self._pool_y[:, idx], self._pool_rows_cond(idx)
