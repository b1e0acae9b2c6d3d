"""Adapters: the VP <-> VE mapping of DiffusersDenoiser checked against an exact Gaussian
denoiser, k-diffusion-style wrappers, and a real (tiny, random) diffusers UNet2DModel."""
import importlib.util
import math
import sys

import pytest
import torch

from epd_kernels import make_noise, sample
from epd_kernels.models import (DiffusersDenoiser, EpsDenoiser, GaussianModel,
                                KDiffusionDenoiser, VDenoiser)
from epd_kernels.models.adapters import require_diffusers

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(
    not HAS_DIFFUSERS, reason="diffusers is not installed (optional extra: pip install diffusers)")


def ddpm_alphas_cumprod(T=1000, beta_start=1e-4, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def gauss():
    g = torch.Generator().manual_seed(0)
    mean = 0.3 * torch.randn((2, 4, 4), generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand((2, 4, 4), generator=g, dtype=torch.float64)
    return GaussianModel(mean, std)


class FakeVPUnet(torch.nn.Module):
    """A 'diffusers unet' whose output is the exact eps / v / x0 of a Gaussian model, given
    the VP-scaled input and the (fractional) timestep, like a perfectly trained network."""

    def __init__(self, model, alphas_cumprod, prediction_type):
        super().__init__()
        self.model = model
        self.log_sigmas = torch.sqrt((1 - alphas_cumprod) / alphas_cumprod).log()
        self.prediction_type = prediction_type
        self.seen = []

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.seen.append((sample.clone(), timestep.clone(), class_labels))
        t = timestep.double()
        lo = t.floor().long().clamp(max=self.log_sigmas.numel() - 2)
        sigma = torch.exp(self.log_sigmas[lo] + (t - lo) * (self.log_sigmas[lo + 1] - self.log_sigmas[lo]))
        sv = sigma.reshape(-1, 1, 1, 1)
        x = sample * torch.sqrt(1 + sv ** 2)                 # back to VE
        x0 = self.model(x, sigma)
        eps = (x - x0) / sv
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "v_prediction":
            alpha, s = 1 / torch.sqrt(1 + sv ** 2), sv / torch.sqrt(1 + sv ** 2)
            out = alpha * eps - s * x0
        else:
            out = x0
        return (out,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_mapping_recovers_exact_gaussian_denoiser(gauss, prediction_type):
    ac = ddpm_alphas_cumprod()
    fake = FakeVPUnet(gauss, ac, prediction_type)
    D = DiffusersDenoiser(fake, ac, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    sig = torch.tensor([D.sigma_min, 0.02, 0.1, 0.7, 1.0, 3.3, 20.0, D.sigma_max],
                       dtype=torch.float64)
    x = gauss.mean + gauss.std * torch.randn((8, 2, 4, 4), generator=g, dtype=torch.float64)
    x = x + sig.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(D(x, sig), gauss(x, sig), rtol=1e-9, atol=1e-9)
    # and the unet saw the VP-scaled input
    seen_x, seen_t, _ = fake.seen[-1]
    torch.testing.assert_close(seen_x, x / torch.sqrt(1 + sig.reshape(-1, 1, 1, 1) ** 2))
    assert seen_t.dtype == torch.float64 and seen_t.shape == (8,)


def test_diffusers_sampling_matches_exact_solution(gauss):
    ac = ddpm_alphas_cumprod()
    D = DiffusersDenoiser(FakeVPUnet(gauss, ac, "epsilon"), ac)
    noise = make_noise(range(4), gauss.shape, dtype=torch.float64)
    sched = {"sigma_min": 0.02, "sigma_max": 80.0}
    a = sample(D, noise, solver="heun", nfe=9, schedule=sched)
    b = sample(gauss, noise, solver="heun", nfe=9, schedule=sched)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_sigma_to_t_table_and_inverse():
    ac = ddpm_alphas_cumprod()
    D = DiffusersDenoiser(lambda x, t: x, ac)
    table = torch.sqrt((1 - ac) / ac)
    t = D.sigma_to_t(table)
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-9)
    s = torch.exp(torch.linspace(math.log(table[0]), math.log(table[-1]), 257, dtype=torch.float64))
    torch.testing.assert_close(D.t_to_sigma(D.sigma_to_t(s)), s, rtol=1e-12, atol=0)
    # geometric midpoint of two table entries -> half-integer timestep
    mid = torch.sqrt(table[10] * table[11])
    assert abs(float(D.sigma_to_t(mid[None])) - 10.5) < 1e-9
    # clamped outside the table; quantized rounds
    assert D.sigma_to_t(torch.tensor([1e-6, 1e6], dtype=torch.float64)).tolist() == [0.0, 999.0]
    Dq = DiffusersDenoiser(lambda x, t: x, ac, quantize=True)
    assert float(Dq.sigma_to_t(mid[None] * 1.0001)) == 11.0
    assert D.sigma_min == pytest.approx(float(table[0])) and D.sigma_max == pytest.approx(float(table[-1]))


def test_diffusers_adapter_validation():
    ac = ddpm_alphas_cumprod(10)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(lambda x, t: x, ac, prediction_type="x0")
    with pytest.raises(ValueError, match="decreasing"):
        DiffusersDenoiser(lambda x, t: x, ac.flip(0))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusersDenoiser(lambda x, t: x, torch.tensor([0.5, 1.0]))


def test_require_diffusers_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)     # makes `import diffusers` fail
    with pytest.raises(ImportError, match="pip install diffusers"):
        require_diffusers()
    with pytest.raises(ImportError, match="pip install diffusers"):
        DiffusersDenoiser.from_pretrained("/nonexistent")


# ----------------------------------------------------------------------------- k-diffusion style


def test_kdiffusion_wrappers_against_exact(gauss):
    g = torch.Generator().manual_seed(2)
    x = torch.randn((5, 2, 4, 4), generator=g, dtype=torch.float64) * 2
    sig = torch.tensor([0.01, 0.3, 1.0, 4.0, 60.0], dtype=torch.float64)
    K = KDiffusionDenoiser(gauss)
    torch.testing.assert_close(K(x, sig), gauss(x, sig))
    torch.testing.assert_close(K(x, 0.3), gauss(x, torch.full((5,), 0.3, dtype=torch.float64)))
    assert K.shape == gauss.shape

    def eps_ve(xin, s):                # sees x = x0 + sigma n
        return (xin - gauss(xin, s)) / s.reshape(-1, 1, 1, 1)

    def eps_vp(xin, s):                # sees x / sqrt(1 + sigma^2)
        xv = xin * torch.sqrt(1 + s.reshape(-1, 1, 1, 1) ** 2)
        return eps_ve(xv, s)

    torch.testing.assert_close(EpsDenoiser(eps_ve)(x, sig), gauss(x, sig))
    torch.testing.assert_close(EpsDenoiser(eps_vp, input_scaling="vp")(x, sig), gauss(x, sig))

    sd = 0.5

    def v_model(xin, s):               # v = (c_skip x - D) / (-c_out) inverted from the EDM form
        sv = s.reshape(-1, 1, 1, 1)
        r = torch.sqrt(sv ** 2 + sd ** 2)
        xx = xin * r
        return (sd ** 2 / (sv ** 2 + sd ** 2) * xx - gauss(xx, s)) / (sv * sd / r)

    torch.testing.assert_close(VDenoiser(v_model, sigma_data=sd)(x, sig), gauss(x, sig))


def test_kdiffusion_passes_conditioning():
    calls = {}

    def model(x, sigma, class_labels=None):
        calls["labels"] = class_labels
        calls["sigma"] = sigma
        return x * 0

    K = KDiffusionDenoiser(model, shape=(3,), sigma_min=0.01, sigma_max=10)
    out = K(torch.ones(2, 3), 2.0, class_labels=torch.tensor([1, 2]))
    assert out.shape == (2, 3) and calls["labels"].tolist() == [1, 2]
    assert calls["sigma"].shape == (2,) and K.sigma_min == 0.01 and K.sigma_max == 10.0


# ----------------------------------------------------------------------------- real diffusers


def _tiny_unet(num_class_embeds=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_class_embeds).eval()


@needs_diffusers
def test_real_unet2d_through_adapter():
    from diffusers import DDPMScheduler

    unet = _tiny_unet(num_class_embeds=10)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                          prediction_type="epsilon")
    D = DiffusersDenoiser.from_scheduler(unet, sched)
    assert D.shape == (1, 8, 8) and D.num_classes == 10
    torch.testing.assert_close(D.log_sigmas.exp(), torch.sqrt((1 - ddpm_alphas_cumprod()) /
                                                              ddpm_alphas_cumprod()),
                               rtol=2e-4, atol=0)      # diffusers keeps alphas_cumprod in float32
    x = torch.randn(3, 1, 8, 8)
    sig = torch.tensor([0.1, 1.0, 10.0])
    labels = torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = D(x, sig, class_labels=labels)
        # by hand: eps from the unet at the mapped timestep and the VP-scaled input
        t = D.sigma_to_t(sig.double()).float()
        eps = unet(x / torch.sqrt(1 + sig[:, None, None, None] ** 2), t,
                   class_labels=labels).sample
    torch.testing.assert_close(out, x - sig[:, None, None, None] * eps)
    with torch.no_grad():
        other = D(x, sig, class_labels=torch.tensor([4, 5, 6]))
    assert (other - out).abs().max() > 0
    noise = make_noise(range(2), (1, 8, 8))
    y, stats = sample(D, noise, solver="dpm2", nfe=5, return_stats=True,
                      schedule={"sigma_min": D.sigma_min, "sigma_max": D.sigma_max},
                      class_labels=torch.tensor([0, 1]))
    assert y.shape == noise.shape and torch.isfinite(y).all() and stats.latency_nfe == 5


@needs_diffusers
def test_real_unet2d_v_prediction():
    from diffusers import DDPMScheduler

    unet = _tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    D = DiffusersDenoiser.from_scheduler(unet, sched)
    assert D.prediction_type == "v_prediction"
    x = torch.randn(2, 1, 8, 8)
    sig = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        v = unet(x / torch.sqrt(1 + sig[:, None, None, None] ** 2),
                 D.sigma_to_t(sig.double()).float()).sample
        s = sig[:, None, None, None]
        torch.testing.assert_close(D(x, sig), x / (1 + s ** 2) - s / torch.sqrt(1 + s ** 2) * v)


# ----------------------------------------------------------------------------- missing labels


class _ClassModel(torch.nn.Module):
    num_classes = 10

    def forward(self, x, sigma, class_labels=None):
        return x


def test_warn_missing_labels_once_per_denoiser_and_place():
    import warnings

    from epd_kernels.models import MissingLabelsWarning, warn_missing_labels

    D = _ClassModel()
    with pytest.warns(MissingLabelsWarning, match="class_labels=") as rec:
        assert warn_missing_labels(D, {}, "sample") is True
    assert "num_classes=10" in str(rec[0].message) and "sample()" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # a second warning would raise
        assert warn_missing_labels(D, {"other": 1}, "sample") is True   # missing, not re-warned
        assert warn_missing_labels(D, {"class_labels": torch.tensor([1])}, "distill") is False
        assert warn_missing_labels(lambda x, s: x, {}, "sample") is False  # no num_classes
        plain = _ClassModel()
        plain.num_classes = 0                      # 0 / None: not class-conditional
        assert warn_missing_labels(plain, {}, "sample") is False
    with pytest.warns(MissingLabelsWarning, match="distill"):
        warn_missing_labels(D, {"class_labels": None}, "distill")   # None counts as missing
    with pytest.warns(MissingLabelsWarning):
        warn_missing_labels(_ClassModel(), {}, "sample")            # another denoiser
    with pytest.warns(MissingLabelsWarning, match="y="):
        warn_missing_labels(_ClassModel(), {}, "sample", keyword="y")

    class Slotted:                                 # cannot be weakly referenced
        __slots__ = ()
        num_classes = 3

        def __call__(self, x, sigma, **cond):
            return x

    S = Slotted()
    with pytest.warns(MissingLabelsWarning):
        warn_missing_labels(S, {}, "sample")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_missing_labels(S, {}, "sample")


def test_wrappers_keep_num_classes():
    from epd_kernels.models import CFGDenoiser, FlowMatchDenoiser

    D = _ClassModel()
    assert CFGDenoiser(D, 2.0, {"class_labels": torch.tensor([10])}).num_classes == 10
    assert FlowMatchDenoiser(D).num_classes == 10
    assert KDiffusionDenoiser(D).num_classes == 10
