"""The package's solvers called the k-diffusion way (the signature ComfyUI-like tools use).

    python python/k_diffusion_style.py

    import epd_kernels.k_diffusion as kd
    x0 = kd.sample_dpmpp3m(model, noise * sigmas[0], sigmas, extra_args={"class_labels": y},
                           callback=preview, disable=True)
    x0 = kd.sample_epd(model, noise * sigmas[0], sigmas, extra_args=..., params=params)

On a class-conditional Gaussian mixture, this distils EPD and prints each solver's model
calls (the final step to sigma = 0 is one more call) and its RMSE to a many-step reference."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import epd_kernels.k_diffusion as kd  # noqa: E402
from epd_kernels import distill, get_sigmas, make_noise  # noqa: E402
from epd_kernels.metrics import rmse  # noqa: E402
from epd_kernels.models import GaussianMixtureModel  # noqa: E402


class Counted:
    """A k-diffusion-style model that counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        return self.model(x, sigma, **extra_args)


def with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """A k-diffusion grid: the noise levels followed by 0."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="positive grid points minus one")
    ap.add_argument("--iterations", type=int, default=60, help="EPD distillation iterations")
    ap.add_argument("--num-samples", type=int, default=64)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    classes = 4
    model = GaussianMixtureModel(2.0 * torch.randn((classes, 8), generator=g,
                                                   dtype=torch.float64), stds=0.3)
    B = args.num_samples
    labels = torch.arange(B) % classes
    extra = {"class_labels": labels}
    noise = make_noise(range(B), model.shape, dtype=torch.float64)
    sigmas = with_zero(get_sigmas("polynomial", args.steps))   # k-diffusion style: ends in 0
    x = noise * sigmas[0]
    ref = kd.sample_heun(model, x, with_zero(get_sigmas("polynomial", 200)), extra_args=extra,
                         disable=True)

    # EPD's grid is the positive part (params carry it); the trailing 0 adds one denoise.
    pool = 256
    params = distill(model, nfe=2 * args.steps - 1, shape=model.shape, num_points=2,
                     iterations=args.iterations, batch_size=32, pool=pool, progress=True,
                     class_labels=torch.arange(pool) % classes)

    previews = []
    print(f"grid: {args.steps + 1} noise levels > 0, then 0 ({sigmas.numel() - 1} steps, the "
          f"last one a plain denoise)")
    print("| solver | model calls | rmse to reference |\n|---|---|---|")
    for name in ("euler", "heun", "dpm_2", "dpmpp3m", "unipc", "ipndm", "deis", "epd"):
        counted = Counted(model)
        kw = {"params": params} if name == "epd" else {}
        out = getattr(kd, f"sample_{name}")(counted, x, sigmas, extra_args=extra, disable=True,
                                            callback=previews.append, **kw)
        print(f"| {name} | {counted.calls} | {rmse(out, ref):.4g} |")
    last = previews[-1]
    print(f"callback keys: {sorted(last)}; last step i={last['i']} at sigma="
          f"{float(last['sigma']):.4g}")


if __name__ == "__main__":
    main()
