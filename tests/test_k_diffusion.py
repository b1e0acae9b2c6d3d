"""epd_kernels.k_diffusion against k-diffusion's own samplers (same model, same grid,
float64, to round-off), grids ending in 0, callbacks, conditioning in EPD's branch call,
and the option checks.

k-diffusion's package ``__init__`` imports torchvision, accelerate, wandb and more, so its
``sampling.py`` is loaded by file path inside a bare package object. Its ``utils.py``
imports ``torchvision.transforms.functional`` for image helpers that the three samplers
compared here do not use: that one import is stubbed when torchvision is absent (the
samplers' own helper, ``utils.append_dims``, is k-diffusion's real code). ``torchsde`` and
``torchdiffeq`` (imported by ``sampling.py`` for other samplers) are real when installed,
stubbed otherwise.
"""
import importlib.util
import sys
import types

import pytest
import torch

import epd_kernels.k_diffusion as kd
from epd_kernels import EPDParams, get_sigmas, make_noise
from epd_kernels.solvers.registry import solver_names
from epd_kernels.models import GaussianMixtureModel, GaussianModel
from epd_kernels.solvers import sample_heun
from epd_kernels.solvers.epd import epd_sampler

# Tiny problems: extra intra-op threads only add synchronisation on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@pytest.fixture(scope="module")
def ksampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        functional = _stub("torchvision.transforms.functional")
        transforms = _stub("torchvision.transforms", functional=functional)
        stubs.update({"torchvision": _stub("torchvision", transforms=transforms),
                      "torchvision.transforms": transforms,
                      "torchvision.transforms.functional": functional})
    for name, attrs in (("torchsde", {}), ("torchdiffeq", {"odeint": None})):
        if importlib.util.find_spec(name) is None:
            stubs[name] = _stub(name, **attrs)
    pkg_name = "_kdiffusion_under_test"
    pkg = _stub(pkg_name)
    pkg.__path__ = [pkg_dir]
    added = dict(stubs, **{pkg_name: pkg})
    saved = {k: sys.modules.get(k) for k in added}
    sys.modules.update(added)
    try:
        for sub in ("utils", "sampling"):
            s = importlib.util.spec_from_file_location(f"{pkg_name}.{sub}", f"{pkg_dir}/{sub}.py")
            mod = importlib.util.module_from_spec(s)
            sys.modules[s.name] = mod
            s.loader.exec_module(mod)
            setattr(pkg, sub, mod)
        return pkg.sampling
    finally:
        for k in stubs:   # leave no stub behind for other tests
            if saved[k] is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = saved[k]


@pytest.fixture(scope="module")
def gauss():
    g = torch.Generator().manual_seed(0)
    mean = 0.5 * torch.randn((2, 4, 4), generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand((2, 4, 4), generator=g, dtype=torch.float64)
    return GaussianModel(mean, std)


@pytest.fixture(scope="module")
def gmm():
    g = torch.Generator().manual_seed(1)
    return GaussianMixtureModel(torch.randn((3, 2, 4), generator=g, dtype=torch.float64),
                                stds=0.4)


class Counter:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.model(x, sigma, **kw)


def karras(ksampling, n, end_in_zero=True):
    s = ksampling.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()
    return s if end_in_zero else s[:-1]


PAIRS = [("euler", "sample_euler"), ("heun", "sample_heun"), ("dpm2", "sample_dpm_2")]


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("end_in_zero", [True, False])
def test_matches_k_diffusion(ksampling, gauss, ours, theirs, end_in_zero):
    n = 6
    sigmas = karras(ksampling, n, end_in_zero)
    x = make_noise(range(3), gauss.shape, dtype=torch.float64) * sigmas[0]
    mine, ref = Counter(gauss), Counter(gauss)
    logs = {"ours": [], "theirs": []}
    a = getattr(kd, f"sample_{ours}")(mine, x, sigmas, disable=True,
                                      callback=logs["ours"].append)
    b = getattr(ksampling, theirs)(ref, x, sigmas, disable=True, callback=logs["theirs"].append)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the same number of model calls: k-diffusion's last step to 0 is one Euler call
    assert mine.calls == ref.calls
    steps = sigmas.numel() - 1
    expected = steps if ours == "euler" else 2 * steps - (1 if end_in_zero else 0)
    assert mine.calls == expected
    # the same callback stream
    assert [c["i"] for c in logs["ours"]] == [c["i"] for c in logs["theirs"]] == list(range(steps))
    for c, r in zip(logs["ours"], logs["theirs"]):
        assert set(c) == set(r) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        torch.testing.assert_close(c["x"], r["x"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c["denoised"], r["denoised"], rtol=1e-12, atol=1e-12)
        assert float(c["sigma"]) == float(r["sigma"]) and float(c["sigma_hat"]) == float(
            r["sigma_hat"])


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_extra_args_reach_the_model(ksampling, gmm, ours, theirs):
    sigmas = karras(ksampling, 5)
    x = make_noise(range(4), gmm.shape, dtype=torch.float64) * sigmas[0]
    extra = {"class_labels": torch.tensor([0, 2, 1, 2])}
    a = getattr(kd, f"sample_{ours}")(gmm, x, sigmas, extra_args=extra, disable=True)
    b = getattr(ksampling, theirs)(gmm, x, sigmas, extra_args=extra, disable=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    c = getattr(kd, f"sample_{ours}")(gmm, x, sigmas, disable=True)
    assert (a - c).abs().max() > 1e-3          # the labels did change the result


def test_final_step_to_zero_is_a_denoise(gauss):
    sig = get_sigmas("polynomial", 4)
    grid = torch.cat([sig, sig.new_zeros(1)])
    x = make_noise(range(2), gauss.shape, dtype=torch.float64) * 80.0
    for name in ("ipndm", "dpmpp3m", "unipc", "deis"):
        fn = getattr(kd, f"sample_{name}")
        m = Counter(gauss)
        out = fn(m, x, grid, disable=True)
        before = fn(gauss, x, sig, disable=True)
        torch.testing.assert_close(out, gauss(before, torch.full((2,), float(sig[-1]),
                                                                dtype=torch.float64)))
        assert m.calls == 4 + 1
    # a grid [s, 0] is one denoise
    one = kd.sample_heun(gauss, x, torch.tensor([80.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(one, gauss(x, torch.full((2,), 80.0, dtype=torch.float64)))


def _params(sigmas, K=2, plugin=False):
    p = EPDParams.init(sigmas, K, plugin=plugin)
    g = torch.Generator().manual_seed(5)
    p.r = torch.rand(p.r.shape, generator=g, dtype=torch.float64).clamp(0.1, 0.9)
    w = torch.rand(p.weights.shape, generator=g, dtype=torch.float64) + 0.2
    p.weights = w / w.sum(1, keepdim=True)
    return p


@pytest.mark.parametrize("plugin", [False, True])
def test_sample_epd_with_per_sample_extra_args(gmm, plugin):
    """extra_args with one row per sample are tiled for EPD's K*B branch call exactly as
    `sample` tiles conditioning; a trailing 0 adds one denoise."""
    sigmas = get_sigmas("polynomial", 3)
    p = _params(sigmas, K=3, plugin=plugin)
    x = make_noise(range(4), gmm.shape, dtype=torch.float64) * 80.0
    labels = torch.tensor([1, 0, 2, 2])
    fn = kd.sample_epd_ipndm if plugin else kd.sample_epd
    m = Counter(gmm)
    got = fn(m, x, sigmas, extra_args={"class_labels": labels}, params=p, disable=True)
    want = epd_sampler(gmm, x, sigmas, params=p, class_labels=labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert m.calls == p.nfe                       # latency NFE: 2 S - 1
    grid = torch.cat([sigmas, sigmas.new_zeros(1)])
    m = Counter(gmm)
    got0 = fn(m, x, grid, extra_args={"class_labels": labels}, params=p, disable=True)
    torch.testing.assert_close(got0, gmm(want, torch.full((4,), 0.002, dtype=torch.float64),
                                         class_labels=labels), rtol=1e-12, atol=1e-12)
    assert m.calls == p.nfe + 1
    # sigmas=None: the params' grid
    torch.testing.assert_close(fn(gmm, x, None, extra_args={"class_labels": labels}, params=p),
                               want, rtol=0, atol=0)


def test_every_solver_has_a_function():
    funcs = kd.solver_functions()
    assert set(funcs) == set(solver_names())
    for name, fn in funcs.items():
        assert fn.__name__ == "sample_" + name.replace("-", "_")
        assert getattr(kd, fn.__name__) is fn


def test_baselines_are_the_package_solvers(gauss):
    """Without a trailing 0 each function is the package's solver on the same grid."""
    from epd_kernels.solvers import SOLVERS
    from epd_kernels.solvers.paradigms import paradigms_sampler

    sig = get_sigmas("polynomial", 6)
    x = make_noise(range(2), gauss.shape, dtype=torch.float64) * 80.0
    for name, solver in dict(SOLVERS, paradigms=paradigms_sampler).items():
        out = getattr(kd, f"sample_{name}")(gauss, x, sig, disable=True)
        torch.testing.assert_close(out, solver(gauss, x, sig), rtol=0, atol=0)
    a = kd.sample_ipndm(gauss, x, sig, max_order=1)
    torch.testing.assert_close(a, kd.sample_euler(gauss, x, sig))
    # AFS is an option here (off by default, as in k-diffusion)
    m = Counter(gauss)
    kd.sample_heun(m, x, sig, afs=True)
    assert m.calls == 2 * 6 - 1


def test_option_errors(gauss):
    sig = get_sigmas("polynomial", 3)
    x = torch.zeros((1,) + gauss.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown option 'varient'.*variant"):
        kd.sample_unipc(gauss, x, sig, varient="bh1")
    with pytest.raises(ValueError, match="s_churn"):
        kd.sample_euler(gauss, x, sig, s_churn=1.0)
    kd.sample_euler(gauss, x, sig, s_churn=0.0, s_noise=1.0, s_tmin=0.0)   # accepted
    with pytest.raises(ValueError, match="decreasing"):
        kd.sample_euler(gauss, x, sig.flip(0))
    with pytest.raises(ValueError, match="> 0"):
        kd.sample_euler(gauss, x, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="params"):
        kd.sample_epd(gauss, x, sig, params=None)
    with pytest.raises(ValueError, match="extra_args"):
        kd.sample_euler(gauss, x, sig, extra_args=[1])


def test_amed_and_dode_functions_are_the_package_samplers(gmm):
    from epd_kernels import AMEDParams, DODEParams
    from epd_kernels.solvers.amed import amed_sampler
    from epd_kernels.solvers.dode import dode_sampler

    sigmas = get_sigmas("polynomial", 3)
    x = make_noise(range(3), gmm.shape, dtype=torch.float64) * 80.0
    labels = torch.tensor([2, 0, 1])
    extra = {"class_labels": labels}
    for plugin, fn in ((False, kd.sample_amed), (True, kd.sample_amed_ipndm)):
        p = AMEDParams.init(sigmas, plugin=plugin)
        torch.testing.assert_close(fn(gmm, x, sigmas, extra_args=extra, params=p),
                                   amed_sampler(gmm, x, sigmas, params=p, class_labels=labels),
                                   rtol=0, atol=0)
    for base, fn in (("euler", kd.sample_d_euler), ("heun", kd.sample_d_heun),
                     ("ipndm", kd.sample_d_ipndm)):
        p = DODEParams.zeros(sigmas, base)
        p.lambdas = torch.tensor([0.0, 0.1, -0.05], dtype=torch.float64)
        torch.testing.assert_close(fn(gmm, x, sigmas, extra_args=extra, params=p),
                                   dode_sampler(gmm, x, sigmas, params=p, class_labels=labels),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError):   # d-euler params are not d-heun params
        kd.sample_d_heun(gmm, x, sigmas, params=DODEParams.zeros(sigmas, "euler"))
