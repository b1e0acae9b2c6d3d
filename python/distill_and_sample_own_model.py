"""Recipe: distil EPD-Solver parameters for YOUR network, save them, sample with them.

Copy this file and edit the places marked EDIT. As shipped it runs on a stand-in network
(the package's digits U-Net) in about a minute on a laptop CPU:

    python python/distill_and_sample_own_model.py --nfe 5 --iterations 40 --out my_epd.safetensors

The same through the command line (``make_denoiser`` is a ``--model module:function``):

    PYTHONPATH=python epd distill --model distill_and_sample_own_model:make_denoiser \\
        --solver epd --nfe 5 --out my_epd.safetensors
    PYTHONPATH=python epd sample --model distill_and_sample_own_model:make_denoiser \\
        --solver epd --params my_epd.safetensors --seeds 0-999 --out samples/
    # several processes: the same under torchrun --nproc_per_node=4 -m epd_kernels ...
"""
from __future__ import annotations

import argparse

import torch

from epd_kernels import EPDParams, distill, make_noise, sample
from epd_kernels.metrics import rmse

SHAPE = (1, 8, 8)     # EDIT: the per-sample shape of your model, e.g. (4, 64, 64) latents
NUM_CLASSES = 10      # EDIT: 0 for an unconditional model


def build_network() -> torch.nn.Module:
    """EDIT: build or load your trained network (eval mode, frozen, on its device)."""
    from epd_kernels.models import load_digits_unet

    return load_digits_unet()  # stand-in: net(x, sigma, class_labels) -> denoised x


class MyDenoiser(torch.nn.Module):
    """``D(x, sigma [B], **cond) -> x0_hat`` with ``x = x0 + sigma * noise``. One sigma PER
    SAMPLE: EPD evaluates its K branches at different sigmas in one batch."""

    def __init__(self, net, shape=SHAPE, num_classes=NUM_CLASSES):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.shape = tuple(shape)          # the CLI and distill() read these attributes
        self.num_classes = num_classes
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x, sigma, class_labels=None):
        # EDIT: call your network. An EDM / k-diffusion preconditioned net gives x0_hat:
        return self.net(x, sigma, class_labels=class_labels)
        # Other nets: the adapters EpsDenoiser, VDenoiser, DiffusersDenoiser (epd_kernels.models).


def make_denoiser() -> MyDenoiser:
    """Factory for ``epd ... --model distill_and_sample_own_model:make_denoiser``."""
    return MyDenoiser(build_network())


def labels_for(n: int):
    """EDIT: your conditioning for n samples (here: class i % 10), or None."""
    return torch.arange(n) % NUM_CLASSES if NUM_CLASSES else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", type=int, default=5, help="latency budget (odd: 3, 5, 7, ...)")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pool", type=int, default=256,
                    help="training draws whose teacher targets are computed once")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--out", default="my_epd.safetensors")
    args = ap.parse_args(argv)

    D = make_denoiser()
    cond = lambda n: {} if labels_for(n) is None else {"class_labels": labels_for(n)}  # noqa: E731

    # 1. distil (resumable from the checkpoint); with a pool, the conditioning has one row
    #    per pool entry (with pool=None, one per batch sample)
    params = distill(D, nfe=args.nfe, shape=D.shape, num_points=2, iterations=args.iterations,
                     batch_size=args.batch_size, lr=args.lr, M=3, pool=args.pool,
                     **cond(args.pool), checkpoint=args.out + ".ckpt")

    # 2. save (atomic) with a note of what it is for; load it back as a user would
    params.meta.update({"model": "distill_and_sample_own_model:make_denoiser",
                        "shape": list(D.shape)})
    params.save(args.out, overwrite=True)   # a rerun resumes and rewrites it
    params = EPDParams.load(args.out)
    print(f"saved {args.out}: K={params.num_points}, nfe={params.nfe}, "
          f"final loss {params.meta.get('final_loss')}")

    # 3. sample: one generator per seed, so results do not depend on the batch size
    n = args.num_samples
    noise = make_noise(range(n), D.shape)
    x, stats = sample(D, noise, solver="epd", params=params, nfe=None, return_stats=True,
                      **cond(n))
    print(f"epd: latency NFE {stats.latency_nfe}, total evaluations {stats.total_evals}, "
          f"{1000 * stats.wall_time_s / n:.2f} ms/sample")

    # 4. how good: RMSE to a many-step solution of the same ODE, next to a baseline
    ref = sample(D, noise, solver="unipc", nfe=60, **cond(n))
    base = sample(D, noise, solver="ipndm", nfe=params.nfe, **cond(n))
    print(f"RMSE to the reference at NFE {params.nfe}: epd {rmse(x, ref):.4g}, "
          f"ipndm {rmse(base, ref):.4g}")
    torch.save({"samples": x, "seeds": torch.arange(n)}, args.out + ".samples.pt")


if __name__ == "__main__":
    main()
