"""Embedded models: digits data, exact digits denoiser, the trained U-Net, the registry."""
import math

import pytest
import torch

from epd_kernels import make_noise, sample
from epd_kernels.models import (DigitsExactDenoiser, GaussianMixtureModel, GaussianModel,
                                load_digits_data, load_model, model_names)
from epd_kernels.models.unet import EDMPrecond, UNetConfig, weights_metadata


@pytest.fixture(scope="module")
def digits():
    return load_digits_data(dtype=torch.float64)


@pytest.fixture(scope="module")
def exact():
    return load_model("digits-exact")


@pytest.fixture(scope="module")
def unet():
    return load_model("digits-unet")


# ----------------------------------------------------------------------------- data


def test_digits_data_shape_and_scaling(digits):
    x, y = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float64
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    raw = (x + 1) * 8                                  # back to 0..16: exact integers
    assert torch.equal(raw, raw.round()) and raw.min() == 0 and raw.max() == 16
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    x32, _ = load_digits_data()
    assert x32.dtype == torch.float32 and torch.equal(x32, x.float())


# ----------------------------------------------------------------------------- exact denoiser


def _brute_force(images, x, sigma, keep=None):
    """sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i, one sample at a time, no tricks."""
    out = []
    for b in range(x.shape[0]):
        d2 = ((x[b][None] - images) ** 2).flatten(1).sum(1)
        logits = -d2 / (2 * float(sigma[b]) ** 2)
        if keep is not None:
            logits = logits.masked_fill(~keep[b], -math.inf)
        w = torch.softmax(logits, 0)
        out.append((w[:, None, None, None] * images).sum(0))
    return torch.stack(out)


def test_exact_denoiser_matches_brute_force(digits):
    x, y = digits
    sub, lab = x[:40], y[:40]
    D = DigitsExactDenoiser(sub, lab, batch_size=7)          # exercises the chunking
    g = torch.Generator().manual_seed(0)
    xt = sub[torch.randint(0, 40, (12,), generator=g)]
    sig = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 5.0] * 2, dtype=torch.float64)
    xt = xt + sig[:, None, None, None] * torch.randn(xt.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(D(xt, sig), _brute_force(sub, xt, sig), rtol=1e-10, atol=1e-10)
    # class-conditional: integer labels and the equivalent one-hot
    cls = lab[torch.arange(12) % 40]
    keep = cls[:, None] == lab[None, :]
    ref = _brute_force(sub, xt, sig, keep)
    torch.testing.assert_close(D(xt, sig, class_labels=cls), ref, rtol=1e-10, atol=1e-10)
    onehot = torch.nn.functional.one_hot(cls, 10).double()
    torch.testing.assert_close(D(xt, sig, class_labels=onehot), ref, rtol=1e-10, atol=1e-10)
    # float32 agrees with float64
    torch.testing.assert_close(D(xt.float(), sig.float()), D(xt, sig).float(),
                               rtol=1e-4, atol=1e-4)


def test_exact_denoiser_limits(exact, digits):
    x, y = digits
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 1797, (16,), generator=g)
    xt = x[idx] + 1e-3 * torch.randn((16, 1, 8, 8), generator=g, dtype=torch.float64)
    # sigma -> 0: the nearest training image (float32 too)
    for dt in (torch.float64, torch.float32):
        out = exact(xt.to(dt), torch.full((16,), 0.002, dtype=dt))
        assert out.dtype == dt
        torch.testing.assert_close(out.double(), x[idx], rtol=0, atol=1e-5)
    # sigma large: the data mean
    far = exact(torch.randn((4, 1, 8, 8), dtype=torch.float64) * 1e4, torch.full((4,), 1e6))
    torch.testing.assert_close(far, x.mean(0, keepdim=True).expand(4, -1, -1, -1),
                               rtol=0, atol=1e-6)
    # conditional, large sigma: the class mean
    c = torch.tensor([3, 7])
    out = exact(torch.zeros((2, 1, 8, 8), dtype=torch.float64), 1e6, class_labels=c)
    torch.testing.assert_close(out, torch.stack([x[y == k].mean(0) for k in (3, 7)]),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="class_labels"):
        exact(torch.zeros(2, 1, 8, 8), 1.0, class_labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="shape"):
        exact(torch.zeros(2, 64), 1.0)


def test_exact_reference_solution_converges_and_memorises(exact, digits):
    x, _ = digits
    noise = make_noise(range(3), (1, 8, 8), dtype=torch.float64)
    ref, info = exact.reference_solution(noise, tol=1e-4, return_info=True)
    assert info["error_estimate"] < 1e-5 and info["steps"] >= 128
    # it ends within ~sigma_min of a training image (the empirical ODE memorises)
    d = ((ref[:, None] - x[None]) ** 2).flatten(2).sum(2).sqrt().min(1).values
    assert (d < 0.05).all(), d
    # a many-step Heun agrees with it
    heun = sample(exact, noise, solver="heun", nfe=99)
    assert (heun - ref).abs().max() < 5e-3
    # float32 noise gives float32 output; too few steps warns
    with pytest.warns(RuntimeWarning, match="not converged"):
        rough = exact.reference_solution(noise.float(), min_steps=8, max_steps=16)
    assert rough.dtype == torch.float32 and torch.isfinite(rough).all()


# ----------------------------------------------------------------------------- U-Net


def test_unet_loads_by_name(unet):
    assert isinstance(unet, EDMPrecond) and not unet.training
    assert unet.shape == (1, 8, 8) and unet.num_classes == 10
    assert unet.sigma_min == 0.002 and unet.sigma_max == 80.0
    assert all(not p.requires_grad for p in unet.parameters())
    meta = weights_metadata()
    assert meta["config"]["img_resolution"] == 8
    for k in ("command", "iterations", "wall_time_s", "final_loss"):
        assert k in meta["training"]
    n = sum(p.numel() for p in unet.parameters())
    assert n == meta["training"]["params"]


def test_unet_shape_determinism_and_conditioning(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((6, 1, 8, 8), generator=g)
    s = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
    a = unet(x, s)
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(unet(x, s), a, rtol=0, atol=0)
    # a batch of one gives the same as inside the batch (no batch coupling)
    torch.testing.assert_close(unet(x[2:3], s[2:3]), a[2:3], rtol=1e-5, atol=1e-5)
    c = torch.arange(6)
    b = unet(x, s, class_labels=c)
    assert (b - a).abs().max() > 1e-2
    torch.testing.assert_close(unet(x, s, class_labels=torch.nn.functional.one_hot(c, 10).float()),
                               b, rtol=1e-6, atol=1e-6)
    assert (unet(x, s, class_labels=(c + 1) % 10) - b).abs().max() > 1e-2
    # float64 input -> float64 output; float sigma broadcast
    assert unet(x.double(), s.double()).dtype == torch.float64
    torch.testing.assert_close(unet(x[:2], 0.5), unet(x[:2], torch.full((2,), 0.5)))
    with pytest.raises(ValueError):
        unet(x, s, class_labels=torch.full((6,), 10))


def test_unet_denoises_well_at_mid_sigma(unet, digits):
    """Honest quality check: MSE at sigma = 0.5 against the trivial estimators (the data
    mean, the identity) and the best linear (Wiener) denoiser, on all the digits."""
    x, y = digits
    x = x.float()
    g = torch.Generator().manual_seed(123)
    sigma = 0.5
    xt = x + sigma * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        mse_unet = float(((unet(xt, sigma) - x) ** 2).mean())
        mse_cond = float(((unet(xt, sigma, class_labels=y) - x) ** 2).mean())
    mse_mean = float(((x.mean(0, keepdim=True) - x) ** 2).mean())
    mse_id = sigma ** 2
    xf = x.reshape(-1, 64).double()
    mu, C = xf.mean(0), torch.cov(xf.T)
    A = C @ torch.linalg.inv(C + sigma ** 2 * torch.eye(64, dtype=torch.float64))
    wiener = mu + (xt.reshape(-1, 64).double() - mu) @ A.T
    mse_wiener = float(((wiener - xf) ** 2).mean())
    assert mse_unet < 0.3 * min(mse_mean, mse_id), (mse_unet, mse_mean, mse_id)
    assert mse_unet < 0.8 * mse_wiener, (mse_unet, mse_wiener)
    assert mse_cond < mse_unet


def test_unet_samples_with_sample(unet):
    noise = make_noise(range(8), (1, 8, 8))
    out, stats = sample(unet, noise, solver="heun", nfe=9, return_stats=True,
                        class_labels=torch.arange(8))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert stats.latency_nfe == 9
    assert float(out.min()) > -3 and float(out.max()) < 3


def test_unet_config_roundtrip():
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,), num_classes=0)
    m = EDMPrecond(UNetConfig.from_dict(cfg.to_dict()))
    assert m.cfg == cfg
    x = torch.randn(3, 1, 8, 8)
    assert m(x, torch.ones(3)).shape == x.shape
    assert m(x, torch.ones(3), class_labels=torch.zeros(3, dtype=torch.long)).shape == x.shape


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_attributes():
    assert set(model_names()) >= {"gaussian", "gmm", "digits-exact", "digits-unet"}
    g = load_model("gaussian")
    assert isinstance(g, GaussianModel) and g.shape == (64,)
    m = load_model("GMM")
    assert isinstance(m, GaussianMixtureModel) and m.shape == (64,) and m.num_classes == 8
    for name in model_names():
        model = load_model(name)
        assert model.sigma_min == 0.002 and model.sigma_max == 80.0
        x = torch.randn((2,) + tuple(model.shape))
        assert model(x, torch.ones(2)).shape == x.shape
    # the default configs are fixed (same model every time)
    torch.testing.assert_close(load_model("gmm").means, m.means)


def test_registry_factory_spec():
    m = load_model("epd_kernels.models.registry:gaussian_default")
    assert isinstance(m, GaussianModel)
    m = load_model("epd_kernels.models.analytic:GaussianModel", mean=0.0, std=[1.0, 2.0])
    assert m.shape == (2,)
    m = load_model("epd_kernels.models.unet:EDMPrecond")          # untrained, but loads
    assert m.shape == (1, 8, 8)


@pytest.mark.parametrize("spec,match", [
    ("no-such-model", "unknown model"),
    ("", "non-empty"),
    ("no_such_module_xyz:f", "cannot import module"),
    ("epd_kernels.models.registry:no_such_factory", "no attribute"),
    ("epd_kernels.models.registry:DEFAULT_MODEL", "not callable"),
    ("epd_kernels.models.registry:", "bad model spec"),
    (":gaussian_default", "bad model spec"),
    ("a:b:c", "bad model spec"),
])
def test_registry_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_registry_kwargs_for_builtin_rejected():
    with pytest.raises(ValueError, match="keyword"):
        load_model("gaussian", dim=3)


def test_exact_denoiser_integer_labels_match_one_hot_with_gradients(digits):
    """The per-class path of integer labels against the masked one-hot path, values and
    the gradient with respect to x and sigma (distillation backpropagates through it)."""
    x, y = digits
    D = DigitsExactDenoiser(x[:300], y[:300], batch_size=16)
    g = torch.Generator().manual_seed(1)
    cls = torch.randint(0, 10, (37,), generator=g)           # odd count, shuffled classes
    xt = torch.randn((37, 1, 8, 8), generator=g, dtype=torch.float64) * 2
    sig = torch.rand(37, generator=g, dtype=torch.float64) * 3 + 0.1
    outs = []
    for labels in (cls, torch.nn.functional.one_hot(cls, 10).double()):
        xi, si = xt.clone().requires_grad_(), sig.clone().requires_grad_()
        out = D(xi, si, class_labels=labels)
        (out * torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 1, 8, 8)).sum().backward()
        outs.append((out.detach(), xi.grad, si.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # an empty batch gives an empty result on both paths
    for labels in (None, cls[:0]):
        assert D(xt[:0], sig[:0], class_labels=labels).shape == (0, 1, 8, 8)
    # a label-free class in the data set is refused with the argument's name
    with pytest.raises(ValueError, match="class has no image"):
        DigitsExactDenoiser(x[:20], torch.zeros(20, dtype=torch.long))(xt[:2], 1.0,
                                                                      class_labels=torch.tensor([0, 3]))
