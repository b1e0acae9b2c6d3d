"""Few-step sampling of a diffusers pixel-space unet (``UNet2DModel``) with the package's solvers.

    pip install diffusers
    python python/use_with_diffusers.py --model path/to/ddpm-cifar10-32 --nfe 5 --n 16
    python python/use_with_diffusers.py --tiny     # a tiny random unet: see the plumbing work

`DiffusersDenoiser` turns the unet into an EDM denoiser; every solver runs at the same latency
NFE from the same noise on the model's sigma range, and the table gives the RMSE to a
many-step Heun reference. Text-to-image pipelines: ``python/guided_latent_text_to_image.py``."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from epd_kernels import make_noise, sample  # noqa: E402
from epd_kernels.metrics import nfe_table, rmse  # noqa: E402
from epd_kernels.models.adapters import DiffusersDenoiser, require_diffusers  # noqa: E402


def tiny_denoiser():
    diffusers = require_diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3,
                                 layers_per_block=1, block_out_channels=(16, 32),
                                 norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    return DiffusersDenoiser.from_scheduler(unet, sched)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="diffusers model directory or hub id (unet/ + scheduler/)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random UNet2DModel")
    ap.add_argument("--solvers", default="euler,heun,dpm2,dpmpp3m,unipc,ipndm,deis")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--ref-nfe", type=int, default=99, help="latency NFE of the Heun reference")
    ap.add_argument("--n", type=int, default=8, help="number of samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="save a PNG grid of the samples")
    args = ap.parse_args(argv)

    if args.model:
        D = DiffusersDenoiser.from_pretrained(args.model, device=args.device)
    elif args.tiny:
        D = tiny_denoiser().to(args.device)
    else:
        ap.error("give --model PATH_OR_ID or --tiny")
    if D.shape is None:
        ap.error("cannot tell the sample shape from the unet config")
    sched = {"sigma_min": max(0.002, D.sigma_min), "sigma_max": min(80.0, D.sigma_max)}
    print(f"model sigma range [{D.sigma_min:.4g}, {D.sigma_max:.4g}], sampling on "
          f"[{sched['sigma_min']:.4g}, {sched['sigma_max']:.4g}], shape {D.shape}")

    noise = make_noise(range(args.seed, args.seed + args.n), D.shape, device=args.device)
    ref = sample(D, noise, solver="heun", nfe=args.ref_nfe, schedule=sched)
    rows, outs = [], {}
    for name in args.solvers.split(","):
        try:
            x, st = sample(D, noise, solver=name, nfe=args.nfe, schedule=sched, return_stats=True)
        except ValueError as e:  # budget this solver cannot meet (e.g. even nfe for heun)
            print(f"skip {name}: {e}")
            continue
        outs[name] = x
        rows.append((st, {"rmse_to_ref": rmse(x, ref)}))
    print(nfe_table(rows))

    if args.out and outs:   # a row per solver
        from epd_kernels.workflow.plots import sample_grid_png

        sample_grid_png(args.out, {(name, args.nfe): x.float().cpu().numpy()
                                   for name, x in outs.items()}, list(outs), [args.nfe], D.shape)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
