"""sample(): exact NFE accounting, budget validation, schedules, noise, conditioning.

The counts are measured by an independent counter wrapped around the model here (not by
the library's own CountingDenoiser), and compared with the budget.
"""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from epd_kernels import get_sigmas, make_noise, sample
from epd_kernels.models import GaussianMixtureModel, GaussianModel
from epd_kernels.solvers.counting import CountingDenoiser, parallel_calls
from epd_kernels.solvers.registry import nfe_to_steps, solver_names, valid_budgets

BASELINES = ["euler", "ddim", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis"]
TWO_PER_STEP = {"heun", "dpm2"}
BUDGETS = [3, 4, 5, 6, 7, 9]


class Spy:
    """Independent counter: sequential calls and samples seen."""

    def __init__(self, model):
        self.model, self.calls, self.samples = model, 0, 0

    def __call__(self, x, sigma, **cond):
        assert sigma.shape == (x.shape[0],), "sigma must be one level per sample"
        self.calls += 1
        self.samples += x.shape[0]
        return self.model(x, sigma, **cond)


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureModel(torch.randn(3, 5, generator=g, dtype=torch.float64), 0.5)


def _expected_afs(name, afs):
    if afs is not None:
        return afs
    return name in TWO_PER_STEP


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("afs", [None, True, False])
def test_budget_is_spent_exactly(model, name, afs):
    noise = make_noise(range(4), (5,), dtype=torch.float64)
    a = _expected_afs(name, afs)
    for nfe in BUDGETS:
        spy = Spy(model)
        valid = (nfe + a) % 2 == 0 if name in TWO_PER_STEP else True
        if not valid:
            with pytest.raises(ValueError, match="odd budgets" if a else "even budgets"):
                sample(spy, noise, solver=name, nfe=nfe, afs=afs)
            assert spy.calls == 0
            continue
        x, stats = sample(spy, noise, solver=name, nfe=nfe, afs=afs, return_stats=True)
        assert spy.calls == nfe and spy.samples == nfe * 4
        assert stats.latency_nfe == nfe and stats.total_evals == nfe
        per = 2 if name in TWO_PER_STEP else 1
        assert stats.steps == (nfe + a) // per
        assert stats.solver == name and stats.nfe == nfe and stats.wall_time_s >= 0
        assert x.shape == noise.shape and x.dtype == noise.dtype and torch.isfinite(x).all()


def test_odd_and_even_budgets_for_two_call_solvers(model):
    noise = make_noise([1, 2], (5,), dtype=torch.float64)
    for name in TWO_PER_STEP:
        assert valid_budgets(name, up_to=9) == [1, 3, 5, 7, 9]
        assert valid_budgets(name, afs=False, up_to=9) == [2, 4, 6, 8]
        with pytest.raises(ValueError, match=r"afs=False for even budgets"):
            sample(model, noise, solver=name, nfe=4)
        with pytest.raises(ValueError, match=r"afs=True for odd budgets"):
            sample(model, noise, solver=name, nfe=5, afs=False)
    assert valid_budgets("ipndm", up_to=4) == [1, 2, 3, 4]
    assert nfe_to_steps("ipndm", 5, afs=True) == 6
    for bad in (0, -1):
        with pytest.raises(ValueError, match="can meet"):
            sample(model, noise, solver="euler", nfe=bad)
    with pytest.raises(ValueError, match="nfe must be an integer"):
        sample(model, noise, solver="euler", nfe=2.0)


def test_unknown_solver_lists_names(model):
    noise = make_noise([0], (5,))
    with pytest.raises(ValueError) as e:
        sample(model, noise, solver="rk45")
    for name in ("euler", "ddim", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis", "epd",
                 "epd-ipndm"):
        assert name in str(e.value)
    assert set(BASELINES + ["epd", "epd-ipndm"]) <= set(solver_names())


def test_noise_is_scaled_and_result_is_at_sigma_min(model):
    noise = make_noise([3, 4], (5,), dtype=torch.float64)
    seen = []
    sample(model, noise, solver="euler", nfe=3, callback=seen.append)
    assert torch.equal(seen[0]["x"], noise * 80.0)
    assert seen[0]["sigma"] == 80.0 and seen[-1]["sigma_next"] == 0.002
    # the default grid is polynomial rho = 7
    assert [d["sigma"] for d in seen] == get_sigmas("polynomial", 3)[:-1].tolist()
    # Euler's last update from the callback reproduces the returned state
    out = sample(model, noise, solver="euler", nfe=3)
    assert torch.equal(out, seen[-1]["x_next"])


def test_schedule_forms(model):
    noise = make_noise([5], (5,), dtype=torch.float64)

    def grid(**kw):
        seen = []
        sample(model, noise, callback=seen.append, **kw)
        return [d["sigma"] for d in seen] + [seen[-1]["sigma_next"]]

    assert grid(solver="ipndm", nfe=4, schedule="logsnr") == get_sigmas("logsnr", 4).tolist()
    assert grid(solver="ipndm", nfe=4, schedule="time-uniform") == get_sigmas("time-uniform", 4).tolist()
    assert grid(solver="heun", nfe=5, schedule={"kind": "logsnr", "sigma_max": 10.0}) == \
        get_sigmas("logsnr", 3, sigma_max=10.0).tolist()
    assert grid(solver="dpm2", nfe=5, schedule={"rho": 3.0}) == get_sigmas("polynomial", 3, rho=3.0).tolist()
    explicit = [20.0, 5.0, 1.0, 0.1, 0.01]
    assert grid(solver="unipc", nfe=4, schedule=explicit) == explicit
    assert grid(solver="unipc", nfe=None, schedule=torch.tensor(explicit, dtype=torch.float64)) == explicit
    assert grid(solver="heun", nfe=7, schedule=explicit) == explicit  # 4 steps, AFS
    with pytest.raises(ValueError, match="explicit schedule has 4 steps"):
        sample(model, noise, solver="unipc", nfe=5, schedule=explicit)
    with pytest.raises(ValueError, match="num_steps"):
        sample(model, noise, solver="unipc", nfe=5, schedule={"num_steps": 3})
    with pytest.raises(ValueError, match="kind"):
        sample(model, noise, solver="unipc", nfe=5, schedule="cosine")


@pytest.mark.parametrize("bad", [[1.0, 2.0, 0.5], [5.0, 5.0, 1.0], [5.0, 1.0, 0.0], [5.0, -1.0],
                                 [3.0]])
def test_bad_schedules_raise(model, bad):
    noise = make_noise([0], (5,))
    with pytest.raises(ValueError):
        sample(model, noise, solver="euler", nfe=None, schedule=bad)
    with pytest.raises(ValueError):
        get_sigmas("explicit", sigmas=bad)


def test_solvers_reject_bad_sigmas_directly(model):
    from epd_kernels.solvers import SOLVERS

    x = torch.randn(2, 5, dtype=torch.float64)
    for fn in SOLVERS.values():
        with pytest.raises(ValueError, match="strictly decreasing"):
            fn(model, x, [1.0, 2.0, 0.5])


@pytest.mark.parametrize("name", BASELINES)
def test_batch_size_invariance(model, name):
    seeds = list(range(100, 107))
    m32 = model.to(torch.float32)
    noise7 = make_noise(seeds, (5,))
    out7 = sample(m32, noise7, solver=name, nfe=5)
    out1 = torch.cat([sample(m32, make_noise([s], (5,)), solver=name, nfe=5) for s in seeds])
    torch.testing.assert_close(out7, out1, rtol=0, atol=1e-6)


def test_make_noise():
    a = make_noise([1, 2, 3], (2, 3))
    b = make_noise([3], (2, 3))
    assert a.shape == (3, 2, 3) and a.dtype == torch.float32
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[0], a[1])
    assert make_noise(7, (4,), dtype=torch.float64).dtype == torch.float64
    assert torch.equal(make_noise([9], (4,), dtype=torch.float16), make_noise([9], (4,)).half())
    with pytest.raises(ValueError):
        make_noise([], (4,))


def test_counting_denoiser_and_parallel_marking():
    def den(x, sigma):
        return x * 0

    c = CountingDenoiser(den, batch_size=4)
    x4, s4 = torch.zeros(4, 2), torch.ones(4)
    c(x4, s4)
    c(torch.zeros(12, 2), torch.ones(12))  # K = 3 branches batched: 1 call, 3 evaluations
    assert c.calls == 2 and c.evaluations == 4
    with parallel_calls(c):  # branches evaluated in chunks, marked as parallel
        c(x4, s4)
        c(torch.zeros(8, 2), torch.ones(8))
    assert c.calls == 3 and c.evaluations == 7
    c(torch.zeros(2, 2), torch.ones(2))
    assert c.evaluations == 7.5
    with parallel_calls(den):  # a plain denoiser: no-op
        pass
    with pytest.raises(ValueError):
        CountingDenoiser(den, 0)


def test_conditioning_is_forwarded(model):
    """Sampling the mixture conditioned on a component = sampling that component alone."""
    noise = make_noise(range(4), (5,), dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    out = sample(model, noise, solver="dpmpp3m", nfe=6, class_labels=labels)
    for b, k in enumerate(labels.tolist()):
        comp = GaussianModel(model.means[k], model.stds[k])
        ref = sample(comp, noise[b:b + 1], solver="dpmpp3m", nfe=6)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-12, atol=1e-12)


def test_params_only_for_epd(model):
    with pytest.raises(ValueError, match="params"):
        sample(model, make_noise([0], (5,)), solver="ipndm", nfe=5, params=object())


SOLVER_AND_AFS = st.sampled_from([(n, a) for n in BASELINES for a in (None, True, False)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=SOLVER_AND_AFS,
       raw=st.lists(st.floats(1e-3, 200.0), min_size=2, max_size=9, unique=True),
       batch=st.integers(1, 3), shape=st.sampled_from([(5,), ]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_hypothesis_random_schedules(model, choice, raw, batch, shape, dtype):
    name, afs = choice
    sig = sorted(raw, reverse=True)
    assume(min(a - b for a, b in zip(sig[:-1], sig[1:])) > 1e-6 * sig[0])  # well separated
    a = _expected_afs(name, afs)
    steps = len(sig) - 1
    nfe = (2 if name in TWO_PER_STEP else 1) * steps - int(a)
    noise = make_noise(range(batch), shape, dtype=dtype)
    m = model.to(dtype)
    if nfe < 1:
        with pytest.raises(ValueError):
            sample(m, noise, solver=name, nfe=None, schedule=sig, afs=afs)
        return
    spy = Spy(m)
    x, stats = sample(spy, noise, solver=name, nfe=None, schedule=sig, afs=afs, return_stats=True)
    assert x.shape == noise.shape and x.dtype == dtype
    assert torch.isfinite(x).all()
    assert spy.calls == nfe == stats.latency_nfe and stats.steps == steps


@pytest.mark.parametrize("name", ["epd", "epd-ipndm"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_epd_budgets(model, name, K):
    from epd_kernels.params import EPDParams

    noise = make_noise(range(3), (5,), dtype=torch.float64)
    for nfe in BUDGETS:
        afs = nfe % 2 == 1
        steps = (nfe + afs) // 2
        params = EPDParams.init(get_sigmas("polynomial", steps), K, afs=afs,
                                plugin=(name == "epd-ipndm"))
        spy = Spy(model)
        x, stats = sample(spy, noise, solver=name, nfe=nfe, params=params, return_stats=True)
        assert spy.calls == nfe == stats.latency_nfe
        assert spy.samples == ((K + 1) * steps - afs) * 3
        assert stats.total_evals == (K + 1) * steps - afs
        assert x.shape == noise.shape and torch.isfinite(x).all()
        # the budget must agree with the params
        with pytest.raises(ValueError):
            sample(model, noise, solver=name, nfe=nfe + 2, params=params)


def test_epd_requires_matching_params(model):
    from epd_kernels.params import EPDParams

    noise = make_noise(range(2), (5,), dtype=torch.float64)
    with pytest.raises(ValueError, match="needs params"):
        sample(model, noise, solver="epd", nfe=5)
    p = EPDParams.init(get_sigmas("polynomial", 3), 2, afs=True, plugin=False)
    with pytest.raises(ValueError, match="epd"):
        sample(model, noise, solver="epd-ipndm", nfe=5, params=p)
    with pytest.raises(ValueError, match="afs"):
        sample(model, noise, solver="epd", nfe=5, params=p, afs=False)
    with pytest.raises(ValueError, match="schedule"):
        sample(model, noise, solver="epd", nfe=5, params=p, schedule="logsnr")
    x = sample(model, noise, solver="epd", nfe=5, params=p, schedule="polynomial")
    assert x.shape == noise.shape


def test_params_solvers_default_to_the_params_nfe(model):
    """Without nfe, a solver with params runs at the params' own budget (not the plain
    solvers' default 5); an explicit nfe must still match."""
    from epd_kernels.params import DODEParams
    from epd_kernels.params import EPDParams

    noise = make_noise(range(2), (5,), dtype=torch.float64)
    for nfe, steps in ((3, 2), (7, 4)):
        p = EPDParams.init(get_sigmas("polynomial", steps), 2, afs=True)
        spy = Spy(model)
        x, stats = sample(spy, noise, solver="epd", params=p, return_stats=True)
        assert stats.latency_nfe == spy.calls == nfe
        torch.testing.assert_close(x, sample(model, noise, solver="epd", nfe=nfe, params=p),
                                   rtol=0, atol=0)
        with pytest.raises(ValueError, match=f"nfe=5 was asked but the params are for nfe={nfe}"):
            sample(model, noise, solver="epd", nfe=5, params=p)
    d = DODEParams.zeros(get_sigmas("polynomial", 3), "euler")
    _, stats = sample(model, noise, solver="d-euler", params=d, return_stats=True)
    assert stats.latency_nfe == 3
    # the plain solvers keep the default budget 5
    _, stats = sample(model, noise, solver="euler", return_stats=True)
    assert stats.latency_nfe == 5


# --------------------------------------------------------------------------------------
# solver options apart from conditioning


def test_options_reach_the_solver(model):
    """options={...} gives what the solver function gives with those keywords."""
    from epd_kernels.solvers import sample_dpmpp3m, sample_unipc

    noise = make_noise(range(3), (5,), dtype=torch.float64)
    s = get_sigmas("polynomial", 6)
    for name, fn, opts in (("unipc", sample_unipc, {"variant": "bh1", "order": 2}),
                           ("dpmpp3m", sample_dpmpp3m, {"max_order": 2,
                                                        "lower_order_final": False})):
        got = sample(model, noise, solver=name, nfe=6, options=opts)
        want = fn(model, noise * 80.0, s, **opts)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, sample(model, noise, solver=name, nfe=6))


def test_unknown_option_lists_the_valid_ones(model):
    from epd_kernels.solvers.registry import solver_options

    noise = make_noise([0], (5,))
    assert solver_options("unipc") == ("lower_order_final", "max_step_ratio", "order", "variant")
    assert solver_options("euler") == ()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['varient'\] for solver 'unipc'"
                                         r".*'variant'"):
        sample(model, noise, solver="unipc", nfe=4, options={"varient": "bh1"})
    with pytest.raises(ValueError, match="'euler'; its options are none"):
        sample(model, noise, solver="euler", nfe=4, options={"order": 2})
    with pytest.raises(ValueError, match="options must be a dict"):
        sample(model, noise, solver="euler", nfe=4, options=[("order", 2)])


def test_options_given_as_conditioning_are_refused(model):
    noise = make_noise([0], (5,))

    def loose(x, sigma, **cond):    # would swallow a misplaced option silently
        return model(x, sigma)

    with pytest.raises(ValueError, match=r"\['variant'\] as conditioning.*options=\{'variant'"):
        sample(loose, noise, solver="unipc", nfe=4, variant="bh1")
    with pytest.raises(ValueError, match="solver options"):   # an option of another solver
        sample(loose, noise, solver="euler", nfe=4, max_step_ratio=2.0)

    def named(x, sigma, mode=None):   # a model whose own keyword shares an option's name
        return model(x, sigma) if mode == "on" else x * 0

    out = sample(named, noise, solver="euler", nfe=4, mode="on")
    torch.testing.assert_close(out, sample(model, noise, solver="euler", nfe=4))


def test_nfe_5_is_the_default(model):
    noise = make_noise(range(2), (5,), dtype=torch.float64)
    for name in ("ipndm", "heun"):
        torch.testing.assert_close(sample(model, noise, solver=name),
                                   sample(model, noise, solver=name, nfe=5), rtol=0, atol=0)
    from epd_kernels.params import EPDParams

    p = EPDParams.init(get_sigmas("polynomial", 3), 2)
    torch.testing.assert_close(sample(model, noise, solver="epd", params=p),
                               sample(model, noise, solver="epd", nfe=5, params=p),
                               rtol=0, atol=0)


def test_missing_class_labels_warn_once(model):
    import warnings

    class Conditional:
        num_classes = 3

        def __call__(self, x, sigma, class_labels=None):
            return model(x, sigma, class_labels=class_labels)

    den = Conditional()
    noise = make_noise([0], (5,))
    from epd_kernels.models import MissingLabelsWarning

    with pytest.warns(MissingLabelsWarning, match=r"sample\(\).*num_classes=3.*no class_labels="):
        sample(den, noise, solver="euler", nfe=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(den, noise, solver="euler", nfe=3)                       # once per denoiser
        sample(den, noise, solver="euler", nfe=3, class_labels=torch.tensor([1]))
        sample(model, noise, solver="euler", nfe=3)                     # declares none
