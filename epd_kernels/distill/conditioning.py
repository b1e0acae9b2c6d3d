"""How conditioning follows the training draws of a distillation.

With a pool (``pool=P``), tensors with one row per pool entry (leading dimension P) travel
with the pool's draws: the teacher sees each draw with its row, and a batch gets the rows
of its entries. With fresh noise (``pool=None``), tensors with one row per sample of the
global batch are sliced per rank. Everything else is passed as is.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["conditioning_rows", "split_rank_cond", "rows_of", "per_row_keys", "slice_rows"]


def conditioning_rows(pool: Optional[int], global_batch: int) -> int:
    """How many rows per-sample conditioning of a distillation has: one per pool entry
    with a pool, one per sample of the global batch with fresh noise (``pool=None``)."""
    return global_batch if pool is None else pool


def per_row_keys(cond: dict) -> list:
    """Conditioning tensors with a leading dimension above 1 (one row per draw)."""
    return sorted(k for k, v in cond.items()
                  if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1)


def slice_rows(cond: dict, n: int, rows: range) -> dict:
    """Tensors with leading dimension ``n`` (one row per sample) sliced to ``rows``."""
    return {k: (v[rows.start:rows.stop] if isinstance(v, torch.Tensor) and v.dim() >= 1
                and v.shape[0] == n else v) for k, v in cond.items()}


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


def split_rank_cond(cond: dict, pool: Optional[int], global_batch: int, rows: range):
    """``(rank_cond, pool_cond)``: conditioning passed on every call of this rank, and the
    per-pool-entry tensors that follow the draws (empty without a pool)."""
    if pool is None:
        return slice_rows(cond, global_batch, rows), {}
    pool_cond = _pool_cond(cond, pool, global_batch)
    return {k: v for k, v in cond.items() if k not in pool_cond}, pool_cond


def rows_of(pool_cond: dict, n: int) -> dict:
    """``n`` rows of per-pool-entry conditioning (cycling), e.g. for a probing call."""
    return {k: v[torch.arange(n, device=v.device) % v.shape[0]] for k, v in pool_cond.items()}
