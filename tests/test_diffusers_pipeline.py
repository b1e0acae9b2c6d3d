"""Latent text-to-image through a diffusers pipeline, offline, with tiny randomly initialised
components built from configs: a ``UNet2DConditionModel`` with cross-attention, an
``AutoencoderKL``, a DDPM noise table, a word-level tokenizer and a text encoder
(transformers' ``CLIPTextModel`` from a tiny config when transformers is installed, and a
small embedding encoder in every case). Checked: shapes, exact NFE, one batched unet call
per evaluation with guidance (2B rows, 2KB in EPD's branch call), equality with a
hand-written guided Euler loop (float64), per-seed latents, negative prompts, and a short
distillation."""
import importlib.util
import math
import types
import zlib

import numpy as np
import pytest
import torch

from epd_kernels import EPDParams, get_sigmas

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

from epd_kernels.integrations.diffusers import (decode_latents, default_schedule,  # noqa: E402
                                                distill_pipeline, encode_prompts,
                                                latent_shape, pipeline_denoiser,
                                                sample_pipeline)

# Tiny problems: extra intra-op threads only add synchronisation on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
VOCAB, MAX_LEN, WIDTH = 64, 6, 16


class WordTokenizer:
    """Words -> ids by a fixed hash; BOS, words, EOS, padded to ``model_max_length``."""

    model_max_length = MAX_LEN
    bos, eos, pad = VOCAB - 2, VOCAB - 1, 0

    def __call__(self, texts, padding="max_length", max_length=None, truncation=True,
                 return_tensors="pt"):
        n = max_length or self.model_max_length
        rows = []
        for t in texts:
            words = [1 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in t.split()][:n - 2]
            ids = [self.bos] + words + [self.eos]
            rows.append(ids + [self.pad] * (n - len(ids)))
        return {"input_ids": torch.tensor(rows)}


class EmbeddingTextEncoder(torch.nn.Module):
    """Token + position embeddings and one linear layer; returns a tuple like transformers."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, WIDTH)
        self.pos = torch.nn.Parameter(0.1 * torch.randn(MAX_LEN, WIDTH))
        self.proj = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, input_ids):
        return (torch.tanh(self.proj(self.tok(input_ids) + self.pos[:input_ids.shape[1]])),)


def clip_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=MAX_LEN, bos_token_id=VOCAB - 2,
                         eos_token_id=VOCAB - 1, pad_token_id=0)
    return CLIPTextModel(cfg)


def make_pipe(encoder="embedding", dtype=torch.float64):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH,
        attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 8), norm_num_groups=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text = clip_text_encoder() if encoder == "clip" else EmbeddingTextEncoder()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    for m in (unet, vae, text):
        m.to(dtype).eval().requires_grad_(False)
    return types.SimpleNamespace(tokenizer=WordTokenizer(), text_encoder=text, unet=unet,
                                 vae=vae, scheduler=sched)


class UnetCalls:
    """Records the batch size and the text embeddings of every unet call (forward hook)."""

    def __init__(self, unet):
        self.batches, self.embeds = [], []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.batches.append(int(args[0].shape[0]))
        self.embeds.append(kwargs.get("encoder_hidden_states"))

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_shapes_nfe_and_one_batched_call_per_evaluation(pipe):
    calls = UnetCalls(pipe.unet)
    try:
        images, stats = sample_pipeline(pipe, ["a red fox", "a blue bird"], solver="heun",
                                        nfe=5, guidance_scale=4.0, seeds=[1, 2],
                                        return_stats=True)
    finally:
        calls.close()
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert stats.latency_nfe == 5 and calls.batches == [4] * 5
    empty = encode_prompts(pipe, [""])
    assert all(torch.equal(e[2:], empty.expand(2, -1, -1)) for e in calls.embeds)
    # without guidance (scale 1): B rows per call
    calls = UnetCalls(pipe.unet)
    try:
        sample_pipeline(pipe, ["a red fox", "a blue bird"], solver="dpmpp3m", nfe=3,
                        guidance_scale=1.0)
    finally:
        calls.close()
    assert calls.batches == [2] * 3


def _random_params(sigmas, K):
    p = EPDParams.init(sigmas, K)
    g = torch.Generator().manual_seed(0)
    p.r = torch.rand(p.r.shape, generator=g, dtype=torch.float64).clamp(0.1, 0.9)
    return p


def test_epd_branch_call_is_one_call_of_2KB_rows(pipe):
    D = pipeline_denoiser(pipe)
    sched = default_schedule(D)
    sigmas = get_sigmas("polynomial", 3, sigma_min=sched["sigma_min"],
                        sigma_max=sched["sigma_max"])
    K, B = 3, 2
    params = _random_params(sigmas, K)
    calls = UnetCalls(pipe.unet)
    try:
        images, stats = sample_pipeline(pipe, ["a cat", "a dog"], solver="epd", params=params,
                                        guidance_scale=6.0, return_stats=True)
    finally:
        calls.close()
    assert stats.latency_nfe == params.nfe == 5
    assert calls.batches == [2 * K * B] + [2 * B, 2 * K * B] * 2
    assert stats.total_evals == (K + 1) * 3 - 1
    assert images.shape == (2, 3, 16, 16)


def _karras(smin, smax, n, rho=7.0):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return [(a + i / n * (b - a)) ** rho for i in range(n + 1)]


def test_equals_hand_written_guided_euler_loop(pipe):
    prompts, seeds, g, n = ["a small house", "two trees"], [11, 4], 5.0, 4
    got_latents = sample_pipeline(pipe, prompts, solver="euler", nfe=n, guidance_scale=g,
                                  seeds=seeds, output_type="latent")
    got_images = sample_pipeline(pipe, prompts, solver="euler", nfe=n, guidance_scale=g,
                                 seeds=seeds)
    # by hand: embeddings, one generator per seed, the DDPM sigma table, two unet calls
    with torch.no_grad():
        def embed(texts):
            return pipe.text_encoder(pipe.tokenizer(texts, max_length=MAX_LEN)["input_ids"])[0]

        cond, uncond = embed(prompts), embed([""]).expand(2, -1, -1)
        x = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s),
                                     dtype=torch.float64) for s in seeds])
        ac = pipe.scheduler.alphas_cumprod.double()
        table = torch.sqrt((1 - ac) / ac)
        sig = _karras(float(table[0]), float(table[-1]), n)
        x = x * sig[0]
        for i in range(n):
            s = sig[i]
            t = float(np.interp(math.log(s), table.log().numpy(), np.arange(1000)))
            xin = x / math.sqrt(1 + s * s)
            ts = torch.full((2,), t, dtype=torch.float64)
            eps_c = pipe.unet(xin, ts, encoder_hidden_states=cond).sample
            eps_u = pipe.unet(xin, ts, encoder_hidden_states=uncond).sample
            eps = eps_u + g * (eps_c - eps_u)          # d = (x - D) / sigma = eps
            x = x + (sig[i + 1] - s) * eps
        img = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got_latents, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_images, img.float(), rtol=1e-5, atol=1e-6)


def test_one_generator_per_seed_and_negative_prompts(pipe):
    kw = dict(solver="ipndm", nfe=3, guidance_scale=3.0, output_type="latent")
    three = sample_pipeline(pipe, ["a", "b c", "d"], seeds=[5, 6, 7], **kw)
    one = sample_pipeline(pipe, ["b c"], seeds=[6], **kw)
    torch.testing.assert_close(three[1:2], one, rtol=1e-9, atol=1e-9)
    calls = UnetCalls(pipe.unet)
    try:
        neg = sample_pipeline(pipe, ["a", "b c"], seeds=[5, 6],
                              negative_prompt=["blurry", "dark"], **kw)
    finally:
        calls.close()
    want = encode_prompts(pipe, ["blurry", "dark"])
    assert all(torch.equal(e[2:], want) for e in calls.embeds)
    assert (neg - three[:2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="negative_prompt"):
        sample_pipeline(pipe, ["a", "b"], negative_prompt=["x", "y", "z"], **kw)
    with pytest.raises(ValueError, match="seeds"):
        sample_pipeline(pipe, ["a", "b"], seeds=[1], **kw)


def test_output_types(pipe):
    lat = sample_pipeline(pipe, ["x"], nfe=2, output_type="latent")
    assert lat.shape == (1,) + latent_shape(pipe) == (1, 4, 8, 8)
    arr = decode_latents(pipe, lat, "np")
    assert arr.shape == (1, 16, 16, 3)
    pil = decode_latents(pipe, lat, "pil")
    assert pil[0].size == (16, 16)
    with pytest.raises(ValueError, match="output_type"):
        decode_latents(pipe, lat, "jpg")
    with pytest.raises(ValueError, match="height"):
        latent_shape(pipe, height=15)


def test_distill_pipeline_runs_through_guidance():
    pipe32 = make_pipe(dtype=torch.float32)
    calls = UnetCalls(pipe32.unet)
    try:
        params = distill_pipeline(pipe32, ["a cat", "a dog"], nfe=3, guidance_scale=5.0,
                                  iterations=3, batch_size=2, pool=4, progress=False, M=3)
    finally:
        calls.close()
    assert isinstance(params, EPDParams) and params.nfe == 3
    D = pipeline_denoiser(pipe32)
    assert float(params.sigmas[0]) == pytest.approx(D.sigma_max, rel=1e-6)
    assert float(params.sigmas[-1]) == pytest.approx(D.sigma_min, rel=1e-6)
    assert all(b % 2 == 0 for b in calls.batches)       # every call guided (teacher too)
    # the pool's entries are paired with the prompts in turn
    emb = encode_prompts(pipe32, ["a cat", "a dog"])
    first = calls.embeds[0]
    assert torch.equal(first[:4], emb[torch.arange(4) % 2])
    assert params.meta["pipeline"]["num_prompts"] == 2 and params.meta["M"] == 3
    with pytest.raises(ValueError, match="conditioning"):
        distill_pipeline(pipe32, ["a"], nfe=3, iterations=1, encoder_hidden_states=None)
    images = sample_pipeline(pipe32, ["a cat"], solver="epd", params=params, guidance_scale=5.0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.skipif(not HAS_TRANSFORMERS,
                    reason="transformers is not installed (pip install --no-deps transformers "
                           "tokenizers)")
def test_with_a_clip_text_encoder():
    pipe = make_pipe("clip")
    emb = encode_prompts(pipe, ["a cat", "a dog"])
    assert emb.shape == (2, MAX_LEN, WIDTH) and emb.dtype == torch.float64
    calls = UnetCalls(pipe.unet)
    try:
        images, stats = sample_pipeline(pipe, ["a cat", "a dog"], solver="dpm2", nfe=3,
                                        guidance_scale=7.5, return_stats=True)
    finally:
        calls.close()
    assert images.shape == (2, 3, 16, 16) and stats.latency_nfe == 3
    assert calls.batches == [4] * 3 and torch.equal(calls.embeds[0][:2], emb)
