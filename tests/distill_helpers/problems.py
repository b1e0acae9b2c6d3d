"""Small distillation problems shared by tests/test_distill*.py and their subprocess workers."""
from __future__ import annotations

import pathlib
import sys
import time

import torch

from epd_kernels.models import GaussianModel

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_distill import mixture_64 as mixture  # noqa: E402,F401  (the benchmark's model)

F64 = torch.float64


def gaussian(dim: int = 8, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    return GaussianModel(0.5 * torch.randn(dim, generator=g, dtype=F64),
                         0.2 + 0.8 * torch.rand(dim, generator=g, dtype=F64))


class Slow(torch.nn.Module):
    """Wraps a denoiser and sleeps on every call, so that a run lasts long enough to be
    killed in the middle."""

    def __init__(self, inner, seconds: float):
        super().__init__()
        self.inner = inner
        self.seconds = seconds

    def forward(self, x, sigma, **cond):
        time.sleep(self.seconds)
        return self.inner(x, sigma, **cond)


#: Settings of the small runs that the resume and multi-process tests compare (without the
#: held-out comparison, which test_distill_settings covers).
SMALL = dict(nfe=5, num_points=2, M=3, iterations=12, lr=0.05, seed=3, dtype=F64,
             progress=False, compare=False)


def ddp_cases(global_batch: int) -> dict:
    """The runs that test_distill_multiproc compares between 2 ranks and 1 rank:
    ``{name: (model, pool, cond)}``. Class labels on the 8-component mixture: one per
    sample of the global batch with fresh noise (sliced per rank), one per pool entry with
    a pool (they travel with the pool's draws)."""
    g, m = gaussian(), mixture()
    K = m.means.shape[0]
    return {
        "fresh": (g, None, {}),
        "pool": (g, 64, {}),
        "fresh-labels": (m, None, {"class_labels": torch.arange(global_batch) % K}),
        "pool-labels": (m, 48, {"class_labels": (torch.arange(48) * 5) % K}),
    }


def skewed_mixture(dim: int = 16, components: int = 4, seed: int = 11):
    """A mixture the distillation defaults were not chosen on: unequal weights (about 1:12),
    a different scale per component and per dimension (stds 0.05-1.0), means 1.5 N(0, I)."""
    from epd_kernels.models import GaussianMixtureModel

    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(components, dim, generator=g, dtype=F64)
    stds = 0.05 + 0.95 * torch.rand(components, dim, generator=g, dtype=F64)
    weights = torch.linspace(1.0, 12.0, components, dtype=F64)
    return GaussianMixtureModel(means, stds, weights)
