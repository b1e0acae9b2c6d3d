"""Training noise as a pure function of (seed, iteration, row).

Row ``j`` of the global batch of iteration ``i`` is standard normal noise drawn from its
own generator, seeded with ``row_seed(seed, i, j)`` (a SplitMix64 hash of the three
integers). Hence a resumed run draws exactly what an uninterrupted one draws (no generator
state to carry), and W processes of per-rank batch b, rank r taking rows ``[r b, (r + 1)
b)``, see exactly the noise of one process with batch W b.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..noise import make_noise

__all__ = ["row_seed", "training_noise"]

_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def row_seed(seed: int, iteration: int, row: int) -> int:
    """A 63-bit generator seed for one noise row, decorrelated from its neighbours."""
    h = _splitmix64(int(seed) & _MASK)
    h = _splitmix64(h ^ (int(iteration) & _MASK))
    h = _splitmix64(h ^ (int(row) & _MASK))
    return h >> 1


def training_noise(seed: int, iteration: int, rows: range, shape: Sequence[int], device=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[len(rows), *shape]`` N(0, I) noise for the given global rows of one iteration."""
    return make_noise([row_seed(seed, iteration, j) for j in rows], shape, device=device,
                      dtype=dtype)
