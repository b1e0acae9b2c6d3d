"""EPD-Solver / EPD-Plugin: special cases, batched-vs-separate oracle, conditioning,
gradients and exact NFE accounting (epd_kernels/solvers/epd.py)."""
from __future__ import annotations

import math

import pytest
import torch

from epd_kernels.branches import BranchRunner
from epd_kernels.solvers.graphs import SimulatedGraphStrategy
from epd_kernels.params import EPDParams
from epd_kernels.solvers.epd import epd_sampler
from epd_kernels.solvers.ipndm import AB_COEFFS as IPNDM_COEFFS, ab_direction

pytestmark = pytest.mark.filterwarnings("ignore:epd_kernels. using the plain-PyTorch reference")

F64 = torch.float64


# --------------------------------------------------------------------------------------
# small denoisers and oracles


def _sig(s, x):
    return s.view((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


def gaussian_denoiser(mu=0.3, sd=0.8):
    """Exact denoiser of N(mu, sd^2 I) data."""
    def D(x, sigma, **_):
        s = _sig(sigma, x)
        return mu + sd ** 2 / (sd ** 2 + s ** 2) * (x - mu)
    return D


def smooth_denoiser(x, sigma, **_):
    """Nonlinear, smooth in x and sigma (so that every parameter matters)."""
    s = _sig(sigma, x)
    a = 1.0 / torch.sqrt(1.0 + s ** 2)
    return 0.8 * torch.tanh(a * x) + 0.1 * x * a ** 2 + 0.05 * torch.sin(s)


def grid(S, smax=80.0, smin=0.002, rho=7.0):
    i = torch.arange(S + 1, dtype=F64) / S
    return (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def euler_oracle(D, x, sigmas, **cond):
    ts = sigmas.tolist()
    for t, tn in zip(ts[:-1], ts[1:]):
        d = (x - D(x, torch.full((x.shape[0],), t, dtype=F64), **cond)) / t
        x = x + (tn - t) * d
    return x


def epd_oracle(D, x, sigmas, p: EPDParams, plugin=None, states_out=None, **cond):
    """EPD written as plainly as possible: one denoiser call per branch, no fused ops."""
    plugin = p.plugin if plugin is None else plugin
    ts = sigmas.tolist()
    B = x.shape[0]
    hist = []
    for n in range(len(ts) - 1):
        t, tn = ts[n], ts[n + 1]
        if n == 0 and p.afs:
            d = x / math.sqrt(1 + t * t)
        else:
            d = (x - D(x, torch.full((B,), t, dtype=F64), **cond)) / t
        if plugin:
            order = min(p.max_order, len(hist) + 1)
            c = IPNDM_COEFFS[order - 1]
            v = c[0] * d + sum(c[j] * hist[-j] for j in range(1, order))
        else:
            v = d
        total = torch.zeros_like(x)
        for k in range(p.num_points):
            tau = tn ** p.r[n, k] * t ** (1 - p.r[n, k])
            xk = x + (tau - t) * v
            if states_out is not None:
                states_out.append(xk)
            sk = (1 + p.delta[n, k]) * tau
            gk = (xk - D(xk, sk * torch.ones(B, dtype=F64), **cond)) / tau
            total = total + p.weights[n, k] * gk
        x = x + (1 + p.o[n]) * (tn - t) * total
        if plugin:
            hist.append(d)
            hist = hist[-(p.max_order - 1):] if p.max_order > 1 else []
    return x


def random_params(sigmas, K, afs=True, plugin=False, seed=0, max_order=4):
    gen = torch.Generator().manual_seed(seed)
    S = len(sigmas) - 1
    w = torch.rand(S, K, generator=gen, dtype=F64) + 0.1
    return EPDParams(r=torch.rand(S, K, generator=gen, dtype=F64),
                     weights=w / w.sum(1, keepdim=True),
                     delta=0.1 * (torch.rand(S, K, generator=gen, dtype=F64) - 0.5),
                     o=0.1 * (torch.rand(S, generator=gen, dtype=F64) - 0.5),
                     sigmas=sigmas, afs=afs, plugin=plugin, max_order=max_order).validate()


def euler_params(sigmas, K=1, afs=True, plugin=False):
    S = len(sigmas) - 1
    return EPDParams(r=torch.zeros(S, K, dtype=F64), weights=torch.full((S, K), 1.0 / K, dtype=F64),
                     delta=torch.zeros(S, K, dtype=F64), o=torch.zeros(S, dtype=F64),
                     sigmas=sigmas, afs=afs, plugin=plugin).validate()


def noise(shape, seed=0, scale=80.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# --------------------------------------------------------------------------------------
# special cases


@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("plugin", [False, True])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("D", [gaussian_denoiser(), smooth_denoiser], ids=["gauss", "smooth"])
def test_r0_is_euler(afs, plugin, K, D):
    """K branches all at r=0 (any simplex weights), o=delta=0: plain Euler, AFS or not."""
    sig = grid(5)
    x = noise((4, 3, 2, 2))
    p = euler_params(sig, K=K, afs=afs, plugin=plugin)
    if K > 1:
        w = torch.rand(5, K, dtype=F64, generator=torch.Generator().manual_seed(1))
        p.weights = w / w.sum(1, keepdim=True)
    got = epd_sampler(D, x, sig, params=p)
    want = euler_oracle(D, x, sig)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("afs", [True, False])
def test_r0_is_the_package_euler(afs):
    """Same check against the package's own Euler solver (no AFS), once it exists."""
    from epd_kernels.solvers.euler import sample_euler as euler
    sig = grid(4)
    x = noise((2, 5))
    got = epd_sampler(smooth_denoiser, x, sig, params=euler_params(sig, afs=afs))
    torch.testing.assert_close(got, euler(smooth_denoiser, x, sig), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_plugin_r1_branch_state_is_ipndm_prediction(afs, max_order):
    """K=1, r=1: the denoiser sees x_n + h * AB(d history) at sigma t_{n+1}."""
    sig = grid(6)
    S = 6
    x0 = noise((3, 4))
    seen = []

    def D(x, sigma, **_):
        seen.append((x.clone(), sigma.clone()))
        return smooth_denoiser(x, sigma)

    p = EPDParams(r=torch.ones(S, 1, dtype=F64), weights=torch.ones(S, 1, dtype=F64),
                  delta=torch.zeros(S, 1, dtype=F64), o=torch.zeros(S, dtype=F64), sigmas=sig,
                  afs=afs, plugin=True, max_order=max_order)
    out = epd_sampler(D, x0, sig, params=p)
    # Call order: [main_0] branch_0 main_1 branch_1 ... (no main_0 with AFS).
    calls = list(seen)
    ts = sig.tolist()
    x, hist = x0, []
    for n in range(S):
        t, tn = ts[n], ts[n + 1]
        if n == 0 and afs:
            d = x / math.sqrt(1 + t * t)
        else:
            xm, sm = calls.pop(0)
            torch.testing.assert_close(xm, x, rtol=1e-12, atol=1e-12)
            assert torch.all(sm == t)
            d = (x - smooth_denoiser(x, sm)) / t
        order = min(max_order, len(hist) + 1)
        ab = sum(IPNDM_COEFFS[order - 1][j] * (d if j == 0 else hist[-j]) for j in range(order))
        pred = x + (tn - t) * ab
        xb, sb = calls.pop(0)
        torch.testing.assert_close(sb, torch.full_like(sb, tn), rtol=1e-14, atol=0)
        torch.testing.assert_close(xb, pred, rtol=1e-12, atol=1e-12)
        g = (pred - smooth_denoiser(pred, sb)) / tn
        x = x + (tn - t) * g            # the plugin's update uses the branch gradient only
        hist = (hist + [d])[-(max_order - 1):] if max_order > 1 else []
    assert not calls
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_ipndm_direction_orders():
    d, h1, h2, h3 = (torch.full((2,), v, dtype=F64) for v in (1.0, 2.0, 3.0, 4.0))
    # history newest first
    assert torch.equal(ab_direction(d, [], 4), d)
    torch.testing.assert_close(ab_direction(d, [h1], 4), (3 * d - h1) / 2)
    torch.testing.assert_close(ab_direction(d, [h1, h2], 4), (23 * d - 16 * h1 + 5 * h2) / 12)
    torch.testing.assert_close(ab_direction(d, [h1, h2, h3], 4),
                               (55 * d - 59 * h1 + 37 * h2 - 9 * h3) / 24)
    torch.testing.assert_close(ab_direction(d, [h1, h2, h3], 2), (3 * d - h1) / 2)
    # Each AB formula integrates constants exactly: coefficients sum to 1.
    for c in IPNDM_COEFFS:
        assert abs(sum(c) - 1) < 1e-15


# --------------------------------------------------------------------------------------
# batched call == K separate calls


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("plugin", [False, True])
@pytest.mark.parametrize("afs", [True, False])
def test_batched_equals_separate_calls(K, plugin, afs):
    sig = grid(5)
    x = noise((3, 2, 4, 4), seed=K)
    p = random_params(sig, K, afs=afs, plugin=plugin, seed=10 * K + plugin)
    got = epd_sampler(smooth_denoiser, x, sig, params=p)
    want = epd_oracle(smooth_denoiser, x, sig, p)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batched_equals_separate_with_graph_strategy_and_trajectory():
    sig = grid(4)
    x = noise((2, 6))
    p = random_params(sig, 3, plugin=True)
    strat = SimulatedGraphStrategy()
    runner = BranchRunner(smooth_denoiser, 3, graph_strategy=strat)
    got, traj = epd_sampler(smooth_denoiser, x, sig, params=p, runner=runner,
                            return_trajectory=True)
    torch.testing.assert_close(got, epd_oracle(smooth_denoiser, x, sig, p), rtol=1e-12, atol=1e-12)
    assert strat.captures == 1 and strat.replays == 4   # one capture for the whole run
    assert len(traj) == 5 and traj[0] is x and torch.equal(traj[-1], got)
    # Reusing the runner for a second sample keeps the graph.
    epd_sampler(smooth_denoiser, x + 1, sig, params=p, runner=runner)
    assert strat.captures == 1 and strat.replays == 8


def test_plugin_override_and_sigmas_default():
    sig = grid(4)
    x = noise((2, 3))
    p = random_params(sig, 2, plugin=False)
    got = epd_sampler(smooth_denoiser, x, None, params=p, plugin=True)
    torch.testing.assert_close(got, epd_oracle(smooth_denoiser, x, sig, p, plugin=True),
                               rtol=1e-12, atol=1e-12)


def test_float32_runs_and_matches_float64():
    sig = grid(4)
    x = noise((2, 3, 4, 4))
    p = random_params(sig, 2)
    y64 = epd_sampler(smooth_denoiser, x, sig, params=p)
    y32 = epd_sampler(smooth_denoiser, x.float(), sig, params=p.to(dtype=torch.float32))
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_epd_beats_euler_on_gaussian_with_good_points():
    """Sanity: on Gaussian data with the exact ODE solution known, K=2 EPD at the
    Gauss-Legendre start is closer than Euler at the same number of steps."""
    mu, sd = 0.3, 0.8
    D = gaussian_denoiser(mu, sd)
    sig = grid(6, smin=0.02)
    x = noise((8, 3))
    exact = mu + math.sqrt(sd ** 2 + sig[-1].item() ** 2) / math.sqrt(sd ** 2 + 80.0 ** 2) * (x - mu)
    e_euler = (euler_oracle(D, x, sig) - exact).abs().max()
    e_epd = (epd_sampler(D, x, sig, params=EPDParams.init(sig, 2, afs=False)) - exact).abs().max()
    assert e_epd < e_euler


# --------------------------------------------------------------------------------------
# conditioning


def class_denoiser(x, sigma, class_labels=None, bias=None, scale=1.0, tag=None):
    assert tag == "keep"                       # a non-tensor kwarg passes through
    assert bias is not None and bias.shape == (3,)   # a non-batch tensor passes through
    s = _sig(sigma, x)
    f = (1.0 + class_labels.to(x.dtype)).view((-1,) + (1,) * (x.dim() - 1))
    return scale * torch.tanh(x / f) / (1 + s ** 2) + bias.view(1, 3, 1) * 0.01 * f


@pytest.mark.parametrize("plugin", [False, True])
@pytest.mark.parametrize("graph", [False, True])
def test_conditioning_repeated_per_branch(plugin, graph):
    sig = grid(4)
    B = 4
    x = noise((B, 3, 5))
    labels = torch.tensor([0, 3, 1, 2])
    bias = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    p = random_params(sig, 3, plugin=plugin)
    runner = BranchRunner(class_denoiser, 3, graph_strategy=SimulatedGraphStrategy() if graph else None)
    got = epd_sampler(class_denoiser, x, sig, params=p, runner=runner, class_labels=labels,
                      bias=bias, scale=2.0, tag="keep")
    for b in range(B):
        alone = epd_sampler(class_denoiser, x[b:b + 1], sig, params=p, class_labels=labels[b:b + 1],
                            bias=bias, scale=2.0, tag="keep")
        torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        got, epd_oracle(class_denoiser, x, sig, p, class_labels=labels, bias=bias, scale=2.0,
                        tag="keep"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plugin", [False, True])
def test_conditioning_with_gaussian_mixture(plugin):
    """The package's class-conditional mixture: batch result == each sample alone."""
    from epd_kernels.models import analytic
    gmm = analytic.GaussianMixtureModel(means=[[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, 3.0]],
                                        stds=[0.3, 0.5, 0.2])
    sig = grid(4)
    labels = torch.tensor([2, 0, 1, 1, 0])
    x = noise((5, 3), seed=3)
    p = random_params(sig, 2, plugin=plugin, seed=4)
    got = epd_sampler(gmm, x, sig, params=p, class_labels=labels)
    for b in range(5):
        alone = epd_sampler(gmm, x[b:b + 1], sig, params=p, class_labels=labels[b:b + 1])
        torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, epd_oracle(gmm, x, sig, p, class_labels=labels),
                               rtol=1e-10, atol=1e-10)
    # conditioning matters: labels move the samples toward their component
    other = epd_sampler(gmm, x, sig, params=p, class_labels=(labels + 1) % 3)
    assert (got - other).abs().max() > 0.1


def test_conditioning_order_is_branch_major():
    seen = []

    def D(x, sigma, class_labels=None):
        seen.append((x.shape[0], class_labels.clone(), sigma.clone()))
        return 0.5 * x

    sig = grid(2)
    labels = torch.tensor([7, 8, 9])
    p = random_params(sig, 2)
    epd_sampler(D, noise((3, 2)), sig, params=p, class_labels=labels)
    branch = [s for s in seen if s[0] == 6]
    assert len(branch) == 2
    for _, lab, sigma in branch:
        assert lab.tolist() == [7, 8, 9, 7, 8, 9]
        assert torch.all(sigma[:3] == sigma[0]) and torch.all(sigma[3:] == sigma[3])


# --------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("plugin", [False, True])
def test_gradcheck_params(plugin):
    sig = grid(3, smin=0.05, smax=10.0)
    x = noise((2, 3), scale=10.0)
    p0 = random_params(sig, 2, plugin=plugin, afs=True)

    def f(r, w, delta, o):
        p = EPDParams(r=r, weights=w, delta=delta, o=o, sigmas=sig, afs=True, plugin=plugin)
        return epd_sampler(smooth_denoiser, x, sig, params=p)

    inputs = tuple(t.clone().clamp(0.05, 0.95).requires_grad_() if name == "r" else
                   t.clone().requires_grad_()
                   for name, t in zip("r w delta o".split(), (p0.r, p0.weights, p0.delta, p0.o)))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_reach_noise_and_denoiser_weights():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

        def forward(self, x, sigma):
            return smooth_denoiser(x, sigma) * self.a

    net = Net()
    sig = grid(3, smin=0.05, smax=10.0)
    p = random_params(sig, 2, afs=False)
    x = noise((2, 3), scale=10.0).requires_grad_()
    loss = epd_sampler(net, x, sig, params=p).square().sum()
    gx, ga = torch.autograd.grad(loss, (x, net.a))

    def L(xv, a):
        with torch.no_grad():
            net.a.fill_(a)
            return epd_sampler(net, xv, sig, params=p).square().sum().item()

    eps = 1e-6
    num_a = (L(x.detach(), 0.7 + eps) - L(x.detach(), 0.7 - eps)) / (2 * eps)
    net.a.data.fill_(0.7)
    assert abs(ga.item() - num_a) < 1e-5 * max(1.0, abs(num_a))
    e = torch.zeros_like(x)
    e[1, 2] = eps
    num_x = (L(x.detach() + e, 0.7) - L(x.detach() - e, 0.7)) / (2 * eps)
    net.a.data.fill_(0.7)
    assert abs(gx[1, 2].item() - num_x) < 1e-5 * max(1.0, abs(num_x))


def test_wrapped_module_with_grad_weights_gets_full_gradient():
    """A plain callable wrapping a module whose weights require grad: the branch call must
    take the autograd path too (the main-point output requires grad)."""
    lin = torch.nn.Linear(3, 3, dtype=F64)
    strat = SimulatedGraphStrategy()

    def D(x, sigma):
        return lin(x) / (1 + _sig(sigma, x))

    sig = grid(3, smin=0.05, smax=10.0)
    p = random_params(sig, 2, afs=False)
    runner = BranchRunner(D, 2, graph_strategy=strat)
    loss = epd_sampler(D, noise((2, 3), scale=10.0), sig, params=p, runner=runner).sum()
    loss.backward()
    assert strat.replays == 0
    g_auto = lin.weight.grad.clone()
    eps, i, j = 1e-6, 1, 2
    with torch.no_grad():
        vals = []
        for sgn in (1, -1):
            lin.weight[i, j] += sgn * eps
            vals.append(epd_sampler(D, noise((2, 3), scale=10.0), sig, params=p).sum().item())
            lin.weight[i, j] -= sgn * eps
    num = (vals[0] - vals[1]) / (2 * eps)
    assert abs(g_auto[i, j].item() - num) < 1e-5 * max(1.0, abs(num))


def test_no_grad_path_uses_static_runner_and_grad_path_does_not():
    sig = grid(3)
    x = noise((2, 3))
    p = random_params(sig, 2)
    strat = SimulatedGraphStrategy()
    runner = BranchRunner(smooth_denoiser, 2, graph_strategy=strat)
    y0 = epd_sampler(smooth_denoiser, x, sig, params=p, runner=runner)
    assert strat.replays == 3
    pr = EPDParams(r=p.r.clone().requires_grad_(), weights=p.weights, delta=p.delta, o=p.o,
                   sigmas=sig, afs=p.afs)
    y1 = epd_sampler(smooth_denoiser, x, sig, params=pr, runner=runner)
    assert strat.replays == 3 and y1.requires_grad
    torch.testing.assert_close(y1.detach(), y0, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        y2 = epd_sampler(smooth_denoiser, x, sig, params=pr, runner=runner)
    assert strat.replays == 6 and not y2.requires_grad


# --------------------------------------------------------------------------------------
# NFE accounting


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("afs", [True, False])
@pytest.mark.parametrize("plugin", [False, True])
@pytest.mark.parametrize("S", [1, 2, 4])
def test_exact_nfe(K, afs, plugin, S):
    calls = []

    def D(x, sigma, **_):
        calls.append(x.shape[0])
        return 0.9 * x

    B = 3
    sig = grid(S)
    p = EPDParams.init(sig, K, afs=afs, plugin=plugin)
    epd_sampler(D, noise((B, 2)), sig, params=p)
    assert len(calls) == 2 * S - afs == p.nfe
    assert sum(calls) // B == (K + 1) * S - afs == p.total_evaluations
    assert sorted(set(calls)) == sorted({K * B} | ({B} if (S > 1 or not afs) else set()))


def test_callback_and_progress():
    sig = grid(3)
    seen = []
    p = random_params(sig, 2)
    x = noise((2, 3))
    y = epd_sampler(smooth_denoiser, x, sig, params=p, callback=seen.append, progress=True)
    assert [s["i"] for s in seen] == [0, 1, 2]
    assert seen[0]["sigma"] == sig[0].item() and seen[-1]["sigma_next"] == sig[-1].item()
    assert seen[-1]["grads"].shape == (2, 2, 3) and torch.equal(seen[-1]["x_next"], y)
    for s in seen:
        assert s["denoised"].shape == x.shape


# --------------------------------------------------------------------------------------
# argument errors


def test_mismatched_grid_and_settings_raise():
    sig = grid(4)
    p = EPDParams.init(sig, 2)
    x = noise((2, 3))
    with pytest.raises(ValueError, match="grid"):
        epd_sampler(smooth_denoiser, x, grid(5), params=p)
    with pytest.raises(ValueError, match="sigma\\[1\\]"):
        epd_sampler(smooth_denoiser, x, grid(4, rho=3.0), params=p)
    with pytest.raises(ValueError, match="afs"):
        epd_sampler(smooth_denoiser, x, sig, params=p, afs=False)
    with pytest.raises(ValueError, match="K = 3"):
        epd_sampler(smooth_denoiser, x, sig, params=p, runner=BranchRunner(smooth_denoiser, 3))
    with pytest.raises(ValueError, match="another denoiser"):
        epd_sampler(smooth_denoiser, x, sig, params=p,
                    runner=BranchRunner(gaussian_denoiser(), 2))
    with pytest.raises(ValueError, match="shaped like x"):
        epd_sampler(lambda x, s: x[:, :1], x, sig, params=p)
    with pytest.raises(TypeError):
        epd_sampler(smooth_denoiser, x, sig, params={"r": 1})
    bad = EPDParams.init(sig, 2)
    bad.weights = torch.ones(4, 3, dtype=F64) / 3
    with pytest.raises(ValueError, match="weights"):
        epd_sampler(smooth_denoiser, x, sig, params=bad)


# --------------------------------------------------------------------------------------
# through the package's sample() entry point


@pytest.mark.parametrize("solver,plugin", [("epd", False), ("epd-ipndm", True)])
def test_sample_entry_point(solver, plugin):
    from epd_kernels import sampling
    from epd_kernels.solvers import schedules
    sig = schedules.get_sigmas("polynomial", 3)
    p = random_params(torch.as_tensor(sig, dtype=F64), 2, plugin=plugin)
    z = noise((4, 3), scale=1.0)
    out, stats = sampling.sample(smooth_denoiser, z, solver=solver, nfe=5, params=p,
                                 return_stats=True)
    want = epd_sampler(smooth_denoiser, z * float(sig[0]), sig, params=p)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert stats.latency_nfe == 5 and stats.total_evals == (2 + 1) * 3 - 1


def test_two_state_buffers_when_the_step_writes_into_out(monkeypatch):
    """With a fused step that takes ``out=`` the no-grad loop alternates two buffers (no
    state allocated per step) and gives the same result; with a callback it does not."""
    from epd_kernels.solvers import epd as epd_module

    plain = epd_module.epd_step
    outs = []

    def step_with_out(x, grads, weights, h, o=0.0, out=None):
        y = plain(x, grads, weights, h, o)
        if out is None:
            return y
        outs.append(out.data_ptr())
        return out.copy_(y)

    from epd_kernels.solvers.schedules import get_sigmas

    sig = get_sigmas("polynomial", 5)
    p = random_params(sig, 3, plugin=True)
    x = noise((4, 3))
    want = epd_sampler(smooth_denoiser, x, sig, params=p, use_cuda_graph=False)
    monkeypatch.setattr(epd_module, "epd_step", step_with_out)
    with torch.no_grad():
        got = epd_sampler(smooth_denoiser, x, sig, params=p, use_cuda_graph=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(outs) == 5 and len(set(outs)) == 2 and outs[0] != outs[1] == outs[3]
    outs.clear()
    with torch.no_grad():
        epd_sampler(smooth_denoiser, x, sig, params=p, callback=lambda info: None)
    assert outs == []      # a callback sees the states: they are not overwritten
