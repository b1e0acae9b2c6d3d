"""AMED-Solver / AMED-Plugin (epd_kernels/solvers/amed.py) and their distillation.

Oracles: DPM-Solver-2 (the neutral AMED-Solver), an iPNDM written here from the formula on
the refined grid (the neutral AMED-Plugin), the Gaussian model's closed-form denoiser for
r / delta / o, finite differences for the gradients, an independent call counter for the
NFE, and the high-accuracy ODE solution for the distilled quality.
"""
from __future__ import annotations

import math

import pytest
import torch

from distill_helpers.problems import F64, SMALL, gaussian, mixture
from epd_kernels import AMEDParams, EPDParams, distill, get_sigmas, make_noise, sample
from epd_kernels.solvers.amed import amed_sampler
from epd_kernels.params.amed_predictor import pool_features
from epd_kernels.distill import load_checkpoint
from epd_kernels.models import GaussianMixtureModel
from epd_kernels.solvers.ipndm import sample_ipndm

pytestmark = [pytest.mark.filterwarnings("ignore:epd_kernels. using the plain-PyTorch reference"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def mix5():
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureModel(torch.randn(3, 5, generator=g, dtype=F64), 0.5)


class Spy:
    """Independent counter of sequential calls and evaluated samples."""

    def __init__(self, model):
        self.model, self.calls, self.samples = model, 0, 0

    def __call__(self, x, sigma, **cond):
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        self.samples += x.shape[0]
        return self.model(x, sigma, **cond)


def neutral(S, form, afs=True, plugin=False, **kw):
    return AMEDParams.init(get_sigmas("polynomial", S), form=form, afs=afs, plugin=plugin,
                           shape=(5,), **kw)


def randomize_heads(params, seed=0, scale=0.5):
    """Non-zero heads, so that the predictor's outputs depend on features and sigmas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.predictor.named_parameters():
            if name.startswith("head_"):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return params


# --------------------------------------------------------------------------------------
# neutral start = known solvers


@pytest.mark.parametrize("form", ["table", "predictor"])
@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("S", [1, 3, 4])
def test_neutral_amed_solver_is_dpm2(mix5, form, afs, S):
    p = neutral(S, form, afs=afs)
    noise = make_noise(range(6), (5,), dtype=F64)
    nfe = 2 * S - afs
    ref = sample(mix5, noise, solver="dpm2", nfe=nfe, afs=afs)
    out = sample(mix5, noise, solver="amed", nfe=nfe, params=p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    direct = amed_sampler(mix5, noise * 80.0, params=p)
    torch.testing.assert_close(direct, ref, rtol=1e-12, atol=1e-12)


def ipndm_on_refined_grid(model, x, grid, afs, max_order):
    """iPNDM written from its formula: x_{j+1} = x_j + (g_{j+1} - g_j) AB_p(d_j, history),
    every gradient (the AFS one included) pushed into the history, AB coefficients of
    orders 1..4 for p = min(max_order, len(history) + 1)."""
    ab = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
          4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    hist = []
    for j in range(len(grid) - 1):
        s = float(grid[j])
        if j == 0 and afs:
            d = x / math.sqrt(1.0 + s * s)
        else:
            d = (x - model(x, torch.full((x.shape[0],), s, dtype=F64))) / s
        p = min(max_order, len(hist) + 1)
        direction = sum(c * v for c, v in zip(ab[p], [d] + hist[::-1]))
        x = x + (float(grid[j + 1]) - s) * direction
        hist.append(d)
        hist = hist[-(max_order - 1):] if max_order > 1 else []
    return x


@pytest.mark.parametrize("form", ["table", "predictor"])
@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_neutral_amed_plugin_is_ipndm_on_refined_grid(mix5, form, afs, max_order):
    S = 4
    p = neutral(S, form, afs=afs, plugin=True, max_order=max_order)
    s = p.sigmas
    refined = torch.stack([s[:-1], torch.sqrt(s[:-1] * s[1:])], dim=1).reshape(-1)
    refined = torch.cat([refined, s[-1:]])
    x = make_noise(range(5), (5,), dtype=F64) * 80.0
    ref = ipndm_on_refined_grid(mix5, x, refined, afs, max_order)
    out = amed_sampler(mix5, x, params=p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # and the package's own iPNDM on that grid agrees
    pkg = sample_ipndm(mix5, x, refined, afs=afs, max_order=max_order)
    torch.testing.assert_close(out, pkg, rtol=1e-12, atol=1e-12)
    # with sample(): the NFE of the plugin is that of the refined iPNDM
    _, stats = sample(mix5, x / 80.0, solver="amed-ipndm", nfe=None, params=p,
                      return_stats=True)
    assert stats.latency_nfe == len(refined) - 1 - afs


# --------------------------------------------------------------------------------------
# closed forms on the Gaussian model


def gaussian_step(mu, var, x, t, t_next, r, delta, o, first_afs=False):
    """One AMED-Solver step for D(x, s) = mu + var / (var + s^2) (x - mu), by hand."""
    d = x / math.sqrt(1 + t * t) if first_afs else t * (x - mu) / (var + t * t)
    t_mid = t_next ** r * t ** (1 - r)
    x_mid = x + (t_mid - t) * d
    s = (1 + delta) * t_mid
    g = (x_mid - mu) * s * s / ((var + s * s) * t_mid)
    return x + (1 + o) * (t_next - t) * g


@pytest.mark.parametrize("afs", [True, False])
def test_table_values_match_closed_form_on_gaussian(afs):
    model = gaussian(dim=6, seed=1)
    mu, var = model.mean, model.std ** 2
    sig = get_sigmas("polynomial", 3)
    p = AMEDParams(sigmas=sig, r=torch.tensor([0.3, 0.0, 0.85], dtype=F64),
                   delta=torch.tensor([0.1, -0.15, 0.05], dtype=F64),
                   o=torch.tensor([0.02, -0.05, 0.0], dtype=F64), afs=afs).validate()
    x = make_noise(range(4), model.shape, dtype=F64) * 80.0
    ref = x
    for n in range(3):
        ref = gaussian_step(mu, var, ref, float(sig[n]), float(sig[n + 1]), float(p.r[n]),
                            float(p.delta[n]), float(p.o[n]), first_afs=afs and n == 0)
    torch.testing.assert_close(amed_sampler(model, x, params=p), ref, rtol=1e-12, atol=1e-12)


def test_r0_is_euler_without_afs_and_scale_dir_multiplies_the_step():
    model = gaussian(dim=6, seed=2)
    sig = get_sigmas("polynomial", 4)
    x = make_noise(range(3), model.shape, dtype=F64) * 80.0
    zeros = torch.zeros(4, dtype=F64)
    for afs in (True, False):
        # r = 0: the mid point is the main point, so the step is Euler's, evaluated (even
        # on the AFS step, whose analytic d only moves the mid state, which r = 0 does not)
        p = AMEDParams(sigmas=sig, r=zeros, delta=zeros, o=zeros, afs=afs)
        euler = sample(model, x / 80.0, solver="euler", schedule=sig, nfe=4, afs=False)
        torch.testing.assert_close(amed_sampler(model, x, params=p), euler, rtol=1e-12,
                                   atol=1e-12)
    # scale_dir = 1 + o multiplies the whole update of a step: x' - x = (1 + o) (x'_0 - x)
    one = AMEDParams(sigmas=sig[:2], r=[0.4], delta=[0.0], o=[0.0], afs=False)
    scaled = AMEDParams(sigmas=sig[:2], r=[0.4], delta=[0.0], o=[-0.3], afs=False)
    step0 = amed_sampler(model, x, params=one) - x
    torch.testing.assert_close(amed_sampler(model, x, params=scaled) - x, 0.7 * step0,
                               rtol=1e-12, atol=1e-12)


def test_predictor_values_per_sample_match_closed_form():
    """Per-sample (r, delta, o) from the predictor: each sample follows the closed form
    with its own values (read back through the callback)."""
    model = gaussian(dim=5, seed=3)
    mu, var = model.mean, model.std ** 2
    p = randomize_heads(AMEDParams.init(get_sigmas("polynomial", 3), form="predictor",
                                        features=lambda x, s, d: x / s, feature_dim=5,
                                        afs=True), seed=4, scale=0.5)
    x = make_noise(range(6), model.shape, dtype=F64) * 80.0
    seen = []
    out = amed_sampler(model, x, params=p, callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 2]
    assert seen[1]["r"].shape == (6,) and seen[1]["r"].std() > 1e-3  # really per sample
    ref = x
    for n, info in enumerate(seen):
        t, tn = info["sigma"], info["sigma_next"]
        rows = []
        for b in range(6):
            rows.append(gaussian_step(mu, var, ref[b], t, tn, float(info["r"][b]),
                                      float(info["delta"][b]), float(info["o"][b]),
                                      first_afs=n == 0))
        ref = torch.stack(rows)
        torch.testing.assert_close(info["x_next"], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert {"x", "x_mid", "sigma_mid", "grads", "denoised"} <= set(seen[0])
    # zeros features on the AFS step: the outputs there do not depend on x
    r0 = p.predictor(torch.zeros(2, p.feature_dim, dtype=F64), float(p.sigmas[0]),
                     float(p.sigmas[1]))[0]
    # (to rounding: BLAS may sum a batch of 6 and one of 2 in different orders)
    torch.testing.assert_close(seen[0]["r"], r0[:1].expand(6), rtol=0, atol=1e-14)


def test_float32_matches_float64(mix5):
    p = randomize_heads(neutral(3, "predictor"), seed=11, scale=0.3)
    noise = make_noise(range(4), (5,), dtype=F64)
    ref = sample(mix5, noise, solver="amed", params=p)
    out = sample(mix5.to(torch.float32), noise.float(), solver="amed", params=p)
    mix5.to(F64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# NFE


@pytest.mark.parametrize("solver", ["amed", "amed-ipndm"])
@pytest.mark.parametrize("form", ["table", "predictor"])
@pytest.mark.parametrize("nfe,afs", [(3, True), (5, True), (7, True), (4, False)])
def test_exact_nfe(mix5, solver, form, nfe, afs):
    S = (nfe + afs) // 2
    p = neutral(S, form, afs=afs, plugin=solver == "amed-ipndm")
    B = 3
    spy = Spy(mix5)
    x, stats = sample(spy, make_noise(range(B), (5,), dtype=F64), solver=solver, nfe=nfe,
                      params=p, return_stats=True)
    assert spy.calls == nfe == stats.latency_nfe == stats.total_evals == p.total_evaluations
    assert spy.samples == nfe * B and stats.steps == S and torch.isfinite(x).all()


def test_sample_rejects_mismatched_params(mix5):
    noise = make_noise(range(2), (5,), dtype=F64)
    p = neutral(3, "table")
    with pytest.raises(ValueError, match="needs params"):
        sample(mix5, noise, solver="amed", nfe=5)
    with pytest.raises(ValueError, match="'amed'.*not 'amed-ipndm'"):
        sample(mix5, noise, solver="amed-ipndm", nfe=5, params=p)
    with pytest.raises(ValueError, match="'amed-ipndm'.*not 'amed'"):
        sample(mix5, noise, solver="amed", nfe=5, params=neutral(3, "table", plugin=True))
    with pytest.raises(ValueError, match="nfe"):
        sample(mix5, noise, solver="amed", nfe=7, params=p)
    with pytest.raises(ValueError, match="schedule"):
        sample(mix5, noise, solver="amed", nfe=5, params=p, schedule="logsnr")
    with pytest.raises(ValueError, match="afs"):
        sample(mix5, noise, solver="amed", nfe=5, params=p, afs=False)
    with pytest.raises(ValueError, match="AMEDParams"):
        sample(mix5, noise, solver="amed", nfe=5,
               params=EPDParams.init(get_sigmas("polynomial", 3), 1))
    with pytest.raises(ValueError, match="AMED params: use solver 'amed'"):
        sample(mix5, noise, solver="epd", nfe=5, params=p)
    with pytest.raises(ValueError, match="different time grid"):
        amed_sampler(mix5, noise * 80, get_sigmas("logsnr", 3), params=p)
    with pytest.raises(ValueError, match="afs"):
        amed_sampler(mix5, noise * 80, params=p, afs=False)
    with pytest.raises(TypeError, match="AMEDParams"):
        amed_sampler(mix5, noise * 80, params=EPDParams.init(get_sigmas("polynomial", 3), 1))


# --------------------------------------------------------------------------------------
# features


def test_module_features_hook_the_unet_bottleneck():
    from epd_kernels.models import load_digits_unet

    net = load_digits_unet(dtype=F64)
    captured = []
    probe = net.net.mid2.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    p = randomize_heads(AMEDParams.init(get_sigmas("polynomial", 3), form="predictor",
                                        features="module:net.mid2", feature_dim=4))
    seen, feats = [], []
    real_forward = p.predictor.forward

    def spy_forward(f, t, tn):
        feats.append(f)
        return real_forward(f, t, tn)

    p.predictor.forward = spy_forward
    noise = make_noise(range(2), net.shape, dtype=F64)
    labels = torch.tensor([3, 7])
    sample(net, noise, solver="amed", params=p, callback=seen.append, class_labels=labels)
    probe.remove()
    assert not net.net.mid2._forward_hooks  # the sampler removed its hook
    # main-point calls are calls 0, 2 after the AFS step (call 1 and 3 are mid points)
    assert len(captured) == 5 and len(feats) == 3
    assert torch.equal(feats[0], torch.zeros(2, 4, dtype=F64))
    for k, call in ((1, 1), (2, 3)):
        assert captured[call].shape == (2, 64, 2, 2)
        torch.testing.assert_close(feats[k], captured[call].mean(1).reshape(2, 4), rtol=0,
                                   atol=0)
    with pytest.raises(ValueError, match="no submodule 'net.nope'"):
        sample(net, noise, solver="amed", params=p.with_features("module:net.nope"),
               class_labels=labels)
    with pytest.raises(ValueError, match="nn.Module"):
        sample(lambda x, s, **c: net(x, s, **c), noise, solver="amed", params=p,
               class_labels=labels)
    with pytest.raises(ValueError, match="expects 4"):
        sample(net, noise, solver="amed", params=p.with_features("module:net.enc.1.0"),
               class_labels=labels)


def test_callable_and_denoised_features(mix5):
    calls = []

    def feats(x, sigma, denoised):
        calls.append(sigma)
        return torch.cat([x[:, :2], denoised[:, :1]], dim=1)

    p = AMEDParams.init(get_sigmas("polynomial", 3), form="predictor", features=feats,
                        feature_dim=3)
    x = make_noise(range(4), (5,), dtype=F64) * 80
    amed_sampler(mix5, x, params=p)
    s = p.sigmas.tolist()
    assert calls == [s[1], s[2]]  # no call on the AFS step
    with pytest.raises(ValueError, match="expects 3"):
        amed_sampler(mix5, x, params=p.with_features(lambda x, s, d: x))
    # pooling rules
    assert pool_features(torch.ones(2, 3, 16, 12)).shape == (2, 64)
    assert pool_features(torch.ones(2, 3, 4, 4)).shape == (2, 16)
    assert pool_features(torch.ones(2, 300)).shape == (2, 64)
    assert pool_features(torch.ones(2, 5, 7)).shape == (2, 35)
    img = torch.arange(2 * 2 * 16 * 16, dtype=F64).reshape(2, 2, 16, 16)
    torch.testing.assert_close(pool_features(img)[:, 0], img[:, :, :2, :2].mean((1, 2, 3)))


# --------------------------------------------------------------------------------------
# gradients


def _loss_of(params, model, x, w):
    return (amed_sampler(model, x, params=params) * w).sum()


@pytest.mark.parametrize("plugin", [False, True])
def test_gradients_reach_predictor_weights(plugin):
    """Directional derivative of a loss of x_S along a random direction in the predictor's
    weights: autograd (through epd_step, branch_states and the denoiser's sigma) against
    central finite differences, float64.

    Features are detached by design (as in the paper), so the gradient ignores how a
    change of the weights moves later features; the features here are fixed per sample
    and step (a callable of sigma only), for which the two derivatives must agree."""
    model = gaussian(dim=4, seed=5)
    base_feats = torch.randn(3, 5, generator=torch.Generator().manual_seed(10), dtype=F64)

    def feats(x, sigma, denoised):
        return base_feats * math.log(sigma)

    p = AMEDParams.init(get_sigmas("polynomial", 3), form="predictor", features=feats,
                        feature_dim=5, hidden=6, plugin=plugin, delta_max=0.3, o_max=0.2)
    randomize_heads(p, seed=6, scale=1.0)
    x = make_noise(range(3), model.shape, dtype=F64) * 80.0
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    net = p.predictor.requires_grad_(True)
    loss = _loss_of(p, model, x, w)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), grads):
        if name.startswith("head_"):  # r, delta and o all carry gradient
            assert g.abs().sum() > 0, name
    gen = torch.Generator().manual_seed(8)
    dirs = [torch.randn(q.shape, generator=gen, dtype=F64) for q in net.parameters()]
    analytic = sum((g * v).sum() for g, v in zip(grads, dirs)).item()
    eps = 1e-6
    with torch.no_grad():
        base = [q.clone() for q in net.parameters()]
        vals = []
        for sign in (1, -1):
            for q, b, v in zip(net.parameters(), base, dirs):
                q.copy_(b + sign * eps * v)
            vals.append(_loss_of(p, model, x, w).item())
        for q, b in zip(net.parameters(), base):
            q.copy_(b)
    numeric = (vals[0] - vals[1]) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("plugin", [False, True])
def test_gradcheck_table(plugin):
    model = gaussian(dim=3, seed=9)
    sig = get_sigmas("polynomial", 2)
    x = make_noise(range(2), model.shape, dtype=F64) * 80.0

    def run(r, delta, o):
        p = AMEDParams(sigmas=sig, r=r, delta=delta, o=o, plugin=plugin, afs=True)
        return amed_sampler(model, x, params=p)

    inputs = tuple(torch.tensor(v, dtype=F64, requires_grad=True)
                   for v in ([0.3, 0.6], [0.05, -0.1], [0.02, -0.03]))
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------
# distillation


def small_amed(model, **kw):
    args = dict(SMALL, num_points=None, batch_size=8, pool=64, shape=(8,), method="amed")
    args.update(kw)
    return distill(model, **args)


@pytest.mark.parametrize("form", ["table", "predictor"])
@pytest.mark.parametrize("plugin", [False, True])
def test_amed_distill_loss_decreases_and_meta(form, plugin):
    model = gaussian()
    p = small_amed(model, amed_form=form, plugin=plugin, iterations=60)
    assert isinstance(p, AMEDParams) and p.form == form and p.plugin == plugin
    assert p.solver == ("amed-ipndm" if plugin else "amed") and p.nfe == 5 and p.afs
    m = p.meta
    assert m["final_loss"] < 0.5 * m["initial_loss"], m
    assert m["method"] == "amed" and m["amed_form"] == form
    assert m["delta_max"] == 0.2 and m["o_max"] == 0.01  # the paper's bounds
    if form == "table":
        assert p.delta.abs().max() < 0.2 and p.o.abs().max() < 0.01
        assert not p.r.requires_grad and not torch.allclose(p.r, torch.full((3,), 0.5, dtype=F64))
    else:
        assert m["features"] == "denoised" and p.predictor.config["o_max"] == 0.01
        assert not any(q.requires_grad for q in p.predictor.parameters())
    x = sample(model, make_noise(range(4), model.shape, dtype=F64), solver=p.solver, params=p)
    assert torch.isfinite(x).all()


def test_amed_distill_argument_errors():
    model = gaussian()
    with pytest.raises(ValueError, match="num_points must be 1 or unset"):
        small_amed(model, num_points=2)
    with pytest.raises(ValueError, match="amed_form"):
        small_amed(model, amed_form="lookup")
    with pytest.raises(ValueError, match="method"):
        small_amed(model, method="amed2")
    with pytest.raises(ValueError, match="only used by method='amed'"):
        distill(model, **dict(SMALL, batch_size=8, pool=64, shape=model.shape),
                features="denoised")
    with pytest.raises(ValueError, match="init must be AMEDParams"):
        small_amed(model, init=EPDParams.init(get_sigmas("polynomial", 3), 1))
    with pytest.raises(ValueError, match="features"):
        small_amed(model, features="pixels")
    with pytest.raises(ValueError, match="only read by the AMED predictor"):
        small_amed(model, amed_form="table", features="denoised")
    p1 = small_amed(model, num_points=1, iterations=2, amed_form="table")  # 1 is allowed
    assert p1.form == "table"
    with pytest.raises(ValueError, match="form 'table' but amed_form='predictor'"):
        small_amed(model, init=p1)
    with pytest.raises(ValueError, match="plugin"):
        small_amed(model, init=p1, amed_form="table", plugin=True)
    # init continues from given params: 2 + 2 iterations move on from the first 2
    p2 = small_amed(model, init=p1, amed_form="table", iterations=2)
    assert not torch.equal(p2.r, p1.r) and p2.meta["initial_loss"] < p1.meta["initial_loss"]


def test_amed_distill_with_unet_bottleneck_features():
    from epd_kernels.models import load_digits_unet

    net = load_digits_unet(dtype=F64)
    p = distill(net, nfe=3, shape=net.shape, method="amed", features="module:net.mid2",
                iterations=3, batch_size=2, pool=4, M=1, dtype=F64, progress=False, lr=0.01,
                compare=False)   # (the comparison is tested on cheaper models)
    assert p.feature_dim == 4 and p.features == "module:net.mid2"
    assert not net.net.mid2._forward_hooks
    x = sample(net, make_noise(range(2), net.shape, dtype=F64), solver="amed", nfe=None,
               params=p)
    assert torch.isfinite(x).all()


def test_amed_predictor_checkpoint_resume_matches_uninterrupted(tmp_path):
    class Interrupt(torch.nn.Module):
        def __init__(self, inner, at):
            super().__init__()
            self.inner, self.at, self.count = inner, at, 0

        def forward(self, x, sigma, **cond):
            if torch.is_grad_enabled():
                self.count += 1
                if self.count == self.at:
                    raise KeyboardInterrupt
            return self.inner(x, sigma)

    model = gaussian()
    ck = tmp_path / "amed.ckpt"
    ref = small_amed(model)
    with pytest.raises(KeyboardInterrupt):  # 5 calls per iteration: stop inside the 8th
        small_amed(Interrupt(model, at=5 * 7 + 3), checkpoint=ck, checkpoint_every=100)
    assert load_checkpoint(ck)["iteration"] == 7
    resumed = small_amed(Interrupt(model, at=-1), checkpoint=ck, checkpoint_every=100)
    a, b = resumed.predictor.state_dict(), ref.predictor.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)
    assert resumed.meta["final_loss"] == pytest.approx(ref.meta["final_loss"], rel=1e-12)
    # a finished checkpoint returns at once; other settings are refused
    again = small_amed(Interrupt(model, at=1), checkpoint=ck)
    torch.testing.assert_close(again.predictor.head_r.weight, ref.predictor.head_r.weight)
    with pytest.raises(ValueError, match="amed_form"):
        small_amed(model, checkpoint=ck, amed_form="table")
    with pytest.raises(ValueError, match="different settings"):
        distill(model, **dict(SMALL, batch_size=8, pool=64, shape=model.shape),
                checkpoint=ck)


def test_distilled_amed_beats_euler_on_mixture_heldout():
    """NFE 5 on the 64-dim Gaussian mixture: RMSE to the ODE solution on held-out noise.
    Both forms of AMED-Solver beat Euler and their own start (DPM-Solver-2, which is very
    poor here: 3 steps with a huge first one); the AMED-Plugin beats iPNDM."""
    model = mixture()
    noise = make_noise(range(10 ** 6, 10 ** 6 + 192), model.shape, dtype=F64)
    ref = model.reference_solution(noise * 80.0, 80.0, 0.002, rtol=1e-9, atol=1e-9)

    def rmse(x):
        return (x - ref).pow(2).mean().sqrt().item()

    euler = rmse(sample(model, noise, solver="euler", nfe=5))
    dpm2 = rmse(sample(model, noise, solver="dpm2", nfe=5))
    ipndm = rmse(sample(model, noise, solver="ipndm", nfe=5))
    results = {}
    for form, plugin, iterations in (("table", False, 150), ("predictor", False, 400),
                                     ("table", True, 150)):
        model.to(torch.float32)
        p = distill(model, nfe=5, shape=model.shape, method="amed", amed_form=form,
                    plugin=plugin, iterations=iterations, pool=512, seed=0, progress=False)
        model.to(F64)
        results[form, plugin] = rmse(sample(model, noise, solver=p.solver, params=p))
    print(f"RMSE euler {euler:.4f} dpm2 {dpm2:.4f} ipndm {ipndm:.4f} amed {results}")
    for form in ("table", "predictor"):
        assert results[form, False] < 0.92 * euler, (results, euler)
        assert results[form, False] < 0.5 * dpm2, (results, dpm2)
    assert results["table", True] < 0.75 * ipndm, (results, ipndm)
