"""Few-step sampling of a flow-matching (rectified-flow) model with EPD and the baselines.

    python python/flow_matching_model.py                       # a Gaussian flow, exact answer
    python python/flow_matching_model.py --model my_module:make_velocity_model --iterations 300

A flow model is ``model(x_t, t [B], **cond) -> v`` (SD3 / Flux convention) with a ``shape``
attribute; `FlowMatchDenoiser` makes it an EDM denoiser for every solver and `distill`.
The default Gaussian data have a closed-form flow map, so the RMSE is to the exact answer;
with ``--model`` it is to a many-step Heun reference."""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from epd_kernels import distill, get_sigmas, make_noise, sample  # noqa: E402
from epd_kernels.metrics import nfe_table, rmse  # noqa: E402
from epd_kernels.models import FlowMatchDenoiser, load_model  # noqa: E402
from epd_kernels.models.flow import sigma_to_flow_t  # noqa: E402
from epd_kernels.solvers import sample_heun  # noqa: E402


class GaussianFlow(torch.nn.Module):
    """Exact velocity of Gaussian data ``N(mu, diag(s^2))`` under ``x_t = (1-t) x0 + t n``."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("mu", torch.randn(dim, generator=g, dtype=torch.float64))
        self.register_buffer("s", torch.exp(torch.linspace(math.log(0.05), math.log(2.0), dim,
                                                           dtype=torch.float64)))
        self.shape = (dim,)

    def forward(self, x_t, t):
        t = t[:, None].to(x_t.dtype)
        a = 1 - t
        var = a ** 2 * self.s ** 2 + t ** 2
        return (t - a * self.s ** 2) / var * (x_t - a * self.mu) - self.mu

    def exact(self, noise, sigma_max=80.0, sigma_min=0.002):
        """The flow's solution from EDM's start ``x = sigma_max n`` to ``sigma_min``, in EDM's
        variables: ``x_t = a mu + sqrt(V(t)) z`` with z constant, ``V = a^2 s^2 + t^2``."""
        t0, t1 = sigma_to_flow_t(sigma_max), sigma_to_flow_t(sigma_min)
        V0, V1 = ((1 - t) ** 2 * self.s ** 2 + t ** 2 for t in (t0, t1))
        x_t0 = noise * sigma_max / (1 + sigma_max)
        x_t1 = (1 - t1) * self.mu + torch.sqrt(V1 / V0) * (x_t0 - (1 - t0) * self.mu)
        return x_t1 * (1 + sigma_min)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="module:factory returning a velocity model with .shape")
    ap.add_argument("--dim", type=int, default=16, help="data dimension of the Gaussian flow")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--solvers", default="euler,heun,dpm2,dpmpp3m,unipc,ipndm,deis")
    args = ap.parse_args(argv)

    flow = load_model(args.model) if args.model else GaussianFlow(args.dim)
    shape = tuple(flow.shape)
    D = FlowMatchDenoiser(flow)
    dtype = torch.float64 if not args.model else torch.float32
    noise = make_noise(range(10_000, 10_000 + args.num_samples), shape, dtype=dtype)
    if args.model:
        ref = sample_heun(D, noise * 80.0, get_sigmas("polynomial", 200))
        what = "many-step Heun reference"
    else:
        ref = flow.exact(noise)
        what = "exact flow map"

    params = distill(D, nfe=args.nfe, shape=shape, num_points=2, iterations=args.iterations,
                     batch_size=args.batch_size, pool=args.pool, progress=True, seed=0)
    rows = []
    runs = [("epd", {"params": params})] + [(name, {"nfe": args.nfe})
                                             for name in args.solvers.split(",")]
    for name, kw in runs:
        try:
            x, st = sample(D, noise, solver=name, return_stats=True, **kw)
        except ValueError as e:  # a budget this solver cannot meet (e.g. even nfe for heun)
            print(f"skip {name}: {e}")
            continue
        rows.append((st, {"rmse": rmse(x, ref)}))
    print(f"flow model, shape {shape}, RMSE to the {what} on {args.num_samples} samples")
    print(nfe_table(rows))
    best = min(r[1]["rmse"] for r in rows[1:]) if len(rows) > 1 else float("nan")
    print(f"epd / best baseline RMSE at NFE {args.nfe}: {rows[0][1]['rmse'] / best:.3f}")


if __name__ == "__main__":
    main()
