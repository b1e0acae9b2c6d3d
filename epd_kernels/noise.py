"""Per-seed standard normal noise that does not depend on the batch it is drawn in."""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch

__all__ = ["make_noise"]


def make_noise(seeds: Union[int, Sequence[int]], shape: Sequence[int], device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[len(seeds), *shape]`` standard normal noise, one `torch.Generator` per seed. A seed
    gives the same noise whatever the batch and the device: the draw is made on the CPU
    (float64 if ``dtype`` is float64, float32 otherwise) and then moved."""
    seeds = [int(seeds)] if isinstance(seeds, numbers.Integral) else [int(s) for s in seeds]
    if len(seeds) == 0:
        raise ValueError("seeds must contain at least one seed")
    shape = tuple(int(n) for n in shape)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    out = [torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed),
                       dtype=draw) for seed in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)
