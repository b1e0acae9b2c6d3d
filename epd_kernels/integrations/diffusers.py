"""Latent text-to-image with a Stable-Diffusion-style diffusers pipeline, on this package's
solvers (EPD included), with classifier-free guidance.

    params = distill_pipeline(pipe, prompts, nfe=5, guidance_scale=7.5)      # EPDParams
    images = sample_pipeline(pipe, ["a red fox"], solver="epd", params=params,
                             guidance_scale=7.5, seeds=[0])                 # [B, 3, H, W]

A pipeline is any object with ``tokenizer``, ``text_encoder``, ``unet``, ``scheduler`` and
``vae`` like ``StableDiffusionPipeline``'s. The unet becomes an EDM denoiser
(`DiffusersDenoiser.from_scheduler`), in `CFGDenoiser` when guidance is on; one generator
per seed; the default grid is polynomial on the model's sigma range (`default_schedule`)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

from ..models.adapters import DiffusersDenoiser, config_value, module_place
from ..models.conditioning import first_output
from ..models.guidance import SCALE_KEYWORD, UNCOND_PREFIX, CFGDenoiser

__all__ = ["sample_pipeline", "distill_pipeline", "encode_prompts", "decode_latents"]

#: The unet's conditioning keyword (text embeddings).
COND_KEYWORD = "encoder_hidden_states"
OUTPUT_TYPES = ("pt", "np", "pil", "latent")

Prompts = Union[str, Sequence[str]]


def _as_prompts(prompts: Prompts, name: str = "prompts") -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return prompts


@torch.no_grad()
def encode_prompts(pipe, prompts: Prompts) -> torch.Tensor:
    """Text embeddings ``[len(prompts), L, D]`` on the unet's device and dtype."""
    prompts = _as_prompts(prompts)
    tok = pipe.tokenizer
    kw = dict(padding="max_length", truncation=True, return_tensors="pt")
    max_len = getattr(tok, "model_max_length", None)
    if max_len is not None:
        kw["max_length"] = max_len
    enc = tok(prompts, **kw)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc.input_ids
    enc_device, _ = module_place(pipe.text_encoder)
    out = pipe.text_encoder(ids.to(enc_device))
    emb = out if isinstance(out, torch.Tensor) else out[0]
    device, dtype = module_place(pipe.unet)
    return emb.to(device=device, dtype=dtype)


def pipeline_denoiser(pipe, quantize: bool = False) -> DiffusersDenoiser:
    """The pipeline's unet as an EDM denoiser (its scheduler's noise table)."""
    return DiffusersDenoiser.from_scheduler(pipe.unet, pipe.scheduler, quantize=quantize)


def latent_shape(pipe, height: Optional[int] = None, width: Optional[int] = None) -> tuple:
    """``(C, height / f, width / f)``: the unet's channels and the VAE's downsampling ``f``;
    the default image size is ``unet.config.sample_size * f``."""
    blocks = config_value(pipe.vae, "block_out_channels")
    f = getattr(pipe, "vae_scale_factor", None) or (2 ** (len(blocks) - 1) if blocks else 8)
    size = config_value(pipe.unet, "sample_size")
    hw = (size, size) if isinstance(size, int) else tuple(size) if size else (None, None)
    height = height if height is not None else (hw[0] * f if hw[0] else None)
    width = width if width is not None else (hw[1] * f if hw[1] else None)
    if height is None or width is None:
        raise ValueError("height and width must be given (the unet config has no sample_size)")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < f or v % f:
            raise ValueError(f"{name} must be a positive multiple of the VAE factor {f}, got {v!r}")
    return (int(config_value(pipe.unet, "in_channels")), int(height) // f, int(width) // f)


def default_schedule(denoiser: DiffusersDenoiser) -> dict:
    """The polynomial (rho = 7) grid on the model's own sigma range."""
    return {"kind": "polynomial", "sigma_min": float(denoiser.sigma_min),
            "sigma_max": float(denoiser.sigma_max)}


def _guidance_on(guidance_scale, n: int) -> bool:
    """Whether guidance is on; ValueError unless a float or one value per prompt (n)."""
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.numel() not in (1, n):
            raise ValueError(f"guidance_scale must be a float or hold one value per prompt "
                             f"({n}), got {guidance_scale.numel()} values")
        return True
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise ValueError(f"guidance_scale must be a float or a [B] tensor, got {guidance_scale!r}")
    return float(guidance_scale) > 1.0


def _guided(pipe, base: DiffusersDenoiser, guidance_scale, negative_embeds, on: bool):
    """`base` in `CFGDenoiser` when guidance is on (unconditional branch: the negative
    embeddings, default the empty prompt's)."""
    if not on:
        return base
    if negative_embeds is None:
        negative_embeds = encode_prompts(pipe, [""])
    return CFGDenoiser(base, guidance_scale, {COND_KEYWORD: negative_embeds})


def _negative(pipe, negative_prompt, n: int) -> Optional[torch.Tensor]:
    """Embeddings of the negative prompt(s): one row, or one per prompt."""
    if negative_prompt is None:
        return None
    neg = _as_prompts(negative_prompt, "negative_prompt")
    if len(neg) not in (1, n):
        raise ValueError(f"negative_prompt must be one string or {n} strings (one per prompt), "
                         f"got {len(neg)}")
    return encode_prompts(pipe, neg)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pt"):
    """Latents -> images in [0, 1]: ``[B, 3, H, W]`` ("pt"), ``[B, H, W, 3]`` numpy ("np"),
    PIL images ("pil"), or the latents unchanged ("latent")."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return latents
    vae = pipe.vae
    z = latents / float(config_value(vae, "scaling_factor", 1.0))
    shift = config_value(vae, "shift_factor", None)
    if shift is not None:
        z = z + float(shift)
    _, vdtype = module_place(vae)
    out = vae.decode(z.to(vdtype))
    img = (first_output(out).float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return img
    arr = img.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def _check_seeds(seeds, n: int) -> list:
    seeds = list(range(n)) if seeds is None else ([seeds] if isinstance(seeds, numbers.Integral)
                                                  else list(seeds))
    if len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per prompt ({n}), got {len(seeds)}")
    return [int(s) for s in seeds]


def sample_pipeline(pipe, prompts: Prompts, *, solver: str = "ipndm", nfe: Optional[int] = None,
                    params=None, guidance_scale=7.5, seeds=None,
                    negative_prompt: Optional[Prompts] = None, height: Optional[int] = None,
                    width: Optional[int] = None, schedule=None, output_type: str = "pt",
                    return_stats: bool = False, progress: bool = False):
    """Images for ``prompts`` (one seed each, default ``0 .. B-1``) by one of the package's
    solvers; ``solver``, ``nfe``, ``params``, ``schedule`` as for `epd_kernels.sample`.
    Guidance is on when ``guidance_scale > 1`` or a per-prompt tensor is given."""
    from ..noise import make_noise
    from ..sampling import sample

    prompts = _as_prompts(prompts)
    n = len(prompts)
    seeds = _check_seeds(seeds, n)
    shape = latent_shape(pipe, height, width)
    device, dtype = module_place(pipe.unet)
    base = pipeline_denoiser(pipe)
    cond = {COND_KEYWORD: encode_prompts(pipe, prompts)}
    on = _guidance_on(guidance_scale, n)
    neg = _negative(pipe, negative_prompt, n) if on else None
    D = _guided(pipe, base, guidance_scale, neg, on)
    if params is None:
        if schedule is None:
            schedule = default_schedule(base)
        if nfe is None:
            nfe = 5
    elif schedule is not None:
        raise ValueError("schedule is not used with params: the params carry their grid")
    noise = make_noise(seeds, shape, device=device, dtype=dtype)
    x0, stats = sample(D, noise, solver=solver, nfe=nfe, params=params, schedule=schedule,
                       return_stats=True, progress=progress, **cond)
    images = decode_latents(pipe, x0, output_type)
    return (images, stats) if return_stats else images


def distill_pipeline(pipe, prompts: Prompts, *, nfe: int = 5, guidance_scale=7.5,
                     negative_prompt: Optional[Prompts] = None, num_points: int = 2,
                     iterations: int = 100, batch_size: int = 8, pool: Optional[int] = 256,
                     seed: int = 0, height: Optional[int] = None, width: Optional[int] = None,
                     schedule=None, progress: bool = True, **distill_settings):
    """`EPDParams` distilled for the guided pipeline over ``prompts``: pool entry p (or batch
    row p with ``pool=None``) gets prompt ``p mod len(prompts)``. Other keywords are
    `distill` settings (``M``, ``lr``, ...), never conditioning."""
    from ..distill import distill

    prompts = _as_prompts(prompts)
    shape = latent_shape(pipe, height, width)
    base = pipeline_denoiser(pipe)
    emb = encode_prompts(pipe, prompts)
    P = len(prompts)
    on = _guidance_on(guidance_scale, P)
    neg = _negative(pipe, negative_prompt, P) if on else None
    rows = pool if pool is not None else batch_size
    if rows is None or isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"pool must be an integer >= 1 or None, got {pool!r}")
    idx = torch.arange(int(rows), device=emb.device) % P
    cond = {COND_KEYWORD: emb[idx]}
    shared_neg = neg if neg is not None and neg.shape[0] == 1 else None
    if neg is not None and shared_neg is None:  # one negative prompt per prompt: follows the rows
        cond[UNCOND_PREFIX + COND_KEYWORD] = neg[idx]
    if isinstance(guidance_scale, torch.Tensor):   # one scale per prompt: follows the rows
        scale = guidance_scale.reshape(-1)
        cond[SCALE_KEYWORD] = scale.to(emb.device)[idx % scale.numel()]
    D = _guided(pipe, base, guidance_scale, shared_neg, on)
    if schedule is None:
        schedule = default_schedule(base)
    clash = sorted(k for k in distill_settings if k in cond or k.startswith(UNCOND_PREFIX))
    if clash:
        raise ValueError(f"distill_pipeline() builds the conditioning itself; {clash} cannot "
                         f"be given")
    params = distill(D, nfe=nfe, shape=shape, num_points=num_points, iterations=iterations,
                     batch_size=batch_size, pool=pool, progress=progress, seed=seed,
                     schedule=schedule, **distill_settings, **cond)
    scale = guidance_scale.tolist() if isinstance(guidance_scale, torch.Tensor) \
        else float(guidance_scale)
    params.meta["pipeline"] = {"num_prompts": P, "guidance_scale": scale,
                               "negative_prompt": negative_prompt is not None}
    return params
