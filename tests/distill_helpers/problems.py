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

from benchmarks.bench_distill import mixture as _bench_mixture  # noqa: E402

F64 = torch.float64


def mixture(seed: int = 0, dim: int = 64, components: int = 8):
    """8 isotropic components in 64 dims: means N(0, I), stds U(0.2, 0.6), weights
    U(0.5, 1.5)."""
    from epd_kernels.models import GaussianMixtureModel

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=F64)
    stds = 0.2 + 0.4 * torch.rand(components, generator=g, dtype=F64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=F64)
    return GaussianMixtureModel(means, stds, weights)


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


def skewed_mixture():
    """The distill benchmark's 16-dim skewed mixture (unequal weights, per-dimension scales),
    which the distillation defaults were not chosen on."""
    return _bench_mixture(16, 4, 11)
