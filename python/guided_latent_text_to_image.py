"""Text-to-image with a Stable-Diffusion-style diffusers pipeline, classifier-free guidance
and EPD distilled for that pipeline.

    pip install diffusers transformers
    python python/guided_latent_text_to_image.py --model path/to/stable-diffusion --device cuda \\
        --prompts "a red fox in snow" "a lighthouse at dusk" --iterations 300 --out grid.png
    python python/guided_latent_text_to_image.py --tiny   # tiny random components, offline

`distill_pipeline` distils EPD for the guided model over the prompts; `sample_pipeline`
samples them with EPD and the baselines at the same latency NFE; the table gives the latent
RMSE to a many-step reference, and ``--out`` saves the decoded images (a row per solver).
The tiny pipeline's images are noise: it shows shapes, NFE and guidance, not quality."""
from __future__ import annotations

import argparse
import os
import sys
import types
import zlib

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from epd_kernels.integrations.diffusers import (decode_latents, distill_pipeline,  # noqa: E402
                                                sample_pipeline)
from epd_kernels.metrics import nfe_table, rmse  # noqa: E402
from epd_kernels.models.adapters import require_diffusers  # noqa: E402


class WordTokenizer:
    """A stand-in tokenizer for the tiny pipeline: words -> ids by a fixed hash."""

    def __init__(self, vocab: int = 64, max_length: int = 8):
        self.vocab, self.model_max_length = vocab, max_length

    def __call__(self, texts, padding="max_length", max_length=None, truncation=True,
                 return_tensors="pt"):
        n = max_length or self.model_max_length
        rows = []
        for t in texts:
            words = [1 + zlib.crc32(w.encode()) % (self.vocab - 3) for w in t.split()][:n - 2]
            ids = [self.vocab - 2] + words + [self.vocab - 1]
            rows.append(ids + [0] * (n - len(ids)))
        return {"input_ids": torch.tensor(rows)}


class TinyTextEncoder(torch.nn.Module):
    def __init__(self, vocab: int = 64, width: int = 16, max_length: int = 8):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(0.1 * torch.randn(max_length, width))
        self.proj = torch.nn.Linear(width, width)

    def forward(self, input_ids):
        return (torch.tanh(self.proj(self.tok(input_ids) + self.pos[:input_ids.shape[1]])),)


def tiny_pipeline(seed: int = 0):
    """Random UNet2DConditionModel (cross-attention) + AutoencoderKL + DDPM table (SD's
    scaled-linear betas) + a word tokenizer and an embedding text encoder."""
    diffusers = require_diffusers()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  block_out_channels=(8, 8), norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085,
                                    beta_end=0.012, beta_schedule="scaled_linear")
    text = TinyTextEncoder()
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return types.SimpleNamespace(tokenizer=WordTokenizer(), text_encoder=text, unet=unet,
                                 vae=vae, scheduler=sched)


def load_pipeline(name: str, device: str):
    diffusers = require_diffusers()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(name, torch_dtype=dtype,
                                                             safety_checker=None)
    return pipe.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="StableDiffusionPipeline directory or hub id")
    ap.add_argument("--tiny", action="store_true", help="tiny random components (offline)")
    ap.add_argument("--prompts", nargs="+", default=["a red fox in the snow",
                                                     "a lighthouse at dusk"])
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--solvers", default="dpmpp3m,unipc,ipndm,heun")
    ap.add_argument("--iterations", type=int, default=100, help="distillation iterations")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pool", type=int, default=16, help="distillation noise pool")
    ap.add_argument("--ref-nfe", type=int, default=41, help="latency NFE of the reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="save a PNG grid of the decoded images")
    args = ap.parse_args(argv)

    if args.model:
        pipe = load_pipeline(args.model, args.device)
    elif args.tiny:
        pipe = tiny_pipeline()
    else:
        ap.error("give --model PATH_OR_ID or --tiny")
    seeds = list(range(len(args.prompts)))
    common = dict(guidance_scale=args.guidance, seeds=seeds)

    params = distill_pipeline(pipe, args.prompts, nfe=args.nfe, guidance_scale=args.guidance,
                              iterations=args.iterations, batch_size=args.batch_size,
                              pool=args.pool, progress=True)
    print(f"distilled EPD for NFE {params.nfe}: loss {params.meta['initial_loss']:.4g} -> "
          f"{params.meta['final_loss']:.4g}")

    ref = sample_pipeline(pipe, args.prompts, solver="dpm2", nfe=args.ref_nfe,
                          output_type="latent", **common)
    latents, rows = {}, []
    runs = [("epd", {"params": params})] + [(s, {"nfe": args.nfe})
                                             for s in args.solvers.split(",")]
    for name, kw in runs:
        try:
            x, st = sample_pipeline(pipe, args.prompts, solver=name, output_type="latent",
                                    return_stats=True, **kw, **common)
        except ValueError as e:  # a budget this solver cannot meet (e.g. even nfe for heun)
            print(f"skip {name}: {e}")
            continue
        latents[name] = x
        rows.append((st, {"latent_rmse_to_ref": rmse(x, ref)}))
    print(f"guidance {args.guidance}, {len(args.prompts)} prompts, reference: dpm2 at NFE "
          f"{args.ref_nfe}")
    print(nfe_table(rows))
    if args.out:   # the decoded images, in [0, 1], drawn as [-1, 1]: a row per solver
        from epd_kernels.workflow.plots import sample_grid_png

        img = {n: (2 * decode_latents(pipe, x) - 1).cpu().numpy()
               for n, x in {**latents, "reference": ref}.items()}
        sample_grid_png(args.out, {(n, args.nfe): a for n, a in img.items()}, list(img),
                        [args.nfe], img["reference"].shape[1:])
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
