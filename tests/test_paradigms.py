"""ParaDiGMS (Picard iterations over a sliding window of the Euler trajectory).

Oracles: sequential Euler on the same grid (`sample_euler`) — the fixed point ParaDiGMS
converges to — and a recording denoiser that logs every call's batch, sigmas and
conditioning, for the exact cost accounting. Everything in float64 on tiny analytic
models (`GaussianModel`, `GaussianMixtureModel`), well under a few seconds.

Measured (these seeds, polynomial grids of 24 and 60 steps): the RMS distance to Euler is
0.01..0.4 x tol for tol in 1e-2..1e-8, both noise scales, window 4 or all steps; the
assertions below allow 1 x tol.
"""
import pytest
import torch

from epd_kernels.models import GaussianMixtureModel, GaussianModel
from epd_kernels.solvers.counting import CountingDenoiser
from epd_kernels.solvers import get_sigmas, sample_euler
from epd_kernels.solvers.paradigms import (paradigms_grid, paradigms_sampler, run_paradigms,
                                           sample_paradigms)

F64 = torch.float64
B, DIM, K = 8, 6, 5


@pytest.fixture(scope="module")
def models():
    g = torch.Generator().manual_seed(7)
    gmm = GaussianMixtureModel(torch.randn(K, DIM, generator=g, dtype=F64),
                               0.2 + 0.3 * torch.rand(K, generator=g, dtype=F64))
    gauss = GaussianModel(0.8 * torch.randn(DIM, generator=g, dtype=F64),
                          0.3 + 1.2 * torch.rand(DIM, generator=g, dtype=F64))
    noise = torch.randn(B, DIM, generator=g, dtype=F64)
    return {"gmm": gmm, "gauss": gauss, "noise": noise}


class Recorder:
    """Denoiser wrapper that records (batch size, sigma, conditioning) of every call."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __call__(self, x, sigma, **cond):
        self.calls.append({"n": x.shape[0], "sigma": sigma.clone(),
                           "cond": {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                    for k, v in cond.items()}})
        return self.model(x, sigma, **cond)


def _rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


# --------------------------------------------------------------------------------------
# convergence to sequential Euler


@pytest.mark.parametrize("name", ["gauss", "gmm"])
@pytest.mark.parametrize("window", [4, None])
@pytest.mark.parametrize("noise_scale", ["step", "sigma"])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_converges_to_euler_within_tolerance(models, name, window, noise_scale, tol):
    model, x0 = models[name], models["noise"] * 80.0
    s = get_sigmas("polynomial", 24)
    euler = sample_euler(model, x0, s)
    x, st = run_paradigms(model, x0, s, window=window, tol=tol, noise_scale=noise_scale)
    assert st.converged and sum(st.strides) >= 24
    assert 1 <= st.rounds <= 24
    # data scale ~1: the RMS distance to Euler is a fraction of tol (measured <= 0.4 tol)
    assert _rms(x, euler) <= tol, (_rms(x, euler), st)


@pytest.mark.parametrize("name", ["gauss", "gmm"])
def test_tight_tolerance_is_euler_and_parallel(models, name):
    """tol 1e-10: equal to Euler to ~1e-10, in far fewer sequential rounds than steps."""
    model, x0 = models[name], models["noise"] * 80.0
    s = get_sigmas("polynomial", 60)
    euler = sample_euler(model, x0, s)
    x, st = run_paradigms(model, x0, s, window=None, tol=1e-10)
    assert st.converged
    assert (x - euler).abs().max().item() < 1e-8
    assert st.rounds <= 30, st.rounds           # measured 9 (gauss) / 15 (gmm) of 60


def test_error_decreases_with_tolerance(models):
    model, x0 = models["gmm"], models["noise"] * 80.0
    s = get_sigmas("polynomial", 24)
    euler = sample_euler(model, x0, s)
    errs = [_rms(sample_paradigms(model, x0, s, window=6, tol=t), euler)
            for t in (1e-2, 1e-5, 1e-9)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-9


# --------------------------------------------------------------------------------------
# window = 1 is sequential Euler


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["gauss", "gmm"])
def test_window_one_is_euler_exactly(models, name, dtype):
    model = models[name].to(dtype=dtype)
    x0 = (models["noise"] * 80.0).to(dtype)
    s = get_sigmas("polynomial", 12)
    rec = Recorder(model)
    x, st = run_paradigms(rec, x0, s, window=1, tol=1e-3)
    assert torch.equal(x, sample_euler(model, x0, s))
    assert st.rounds == 12 and st.evaluations == 12 and st.strides == (1,) * 12
    assert [c["n"] for c in rec.calls] == [B] * 12
    for i, c in enumerate(rec.calls):
        assert torch.equal(c["sigma"], torch.full((B,), s[i].item(), dtype=c["sigma"].dtype))


# --------------------------------------------------------------------------------------
# cost accounting


@pytest.mark.parametrize("window", [1, 3, 8, None])
def test_counts_batched_calls_and_evaluations(models, window):
    model, x0 = models["gmm"], models["noise"] * 80.0
    S = 20
    s = get_sigmas("polynomial", S)
    rec = Recorder(model)
    counter = CountingDenoiser(rec, B)
    x, st = run_paradigms(counter, x0, s, window=window, tol=1e-4)
    W = S if window is None else window
    # one call per round, each of batch n * B with n = min(W, S - i), i the window start
    starts = [0]
    for stride in st.strides[:-1]:
        starts.append(starts[-1] + stride)
    sizes = [min(W, S - i) for i in starts]
    assert [c["n"] for c in rec.calls] == [n * B for n in sizes]
    assert st.rounds == len(rec.calls) == counter.calls
    assert st.evaluations == sum(sizes) == counter.evaluations
    assert st.steps == S and st.window == W and st.converged
    # per-sample sigmas: position-major, window position j -> s[i + j] for B rows
    for i, n, c in zip(starts, sizes, rec.calls):
        want = s[i:i + n].repeat_interleave(B).to(c["sigma"].dtype)
        assert torch.equal(c["sigma"], want)
    # the window never moves backwards and ends exactly at S
    assert all(1 <= k <= W for k in st.strides) and sum(st.strides) >= S


@pytest.mark.parametrize("max_rounds", [1, 2, 3, 5])
@pytest.mark.parametrize("window", [4, None])
def test_max_rounds_is_exact_latency(models, max_rounds, window):
    model, x0 = models["gmm"], models["noise"] * 80.0
    s = get_sigmas("polynomial", 24)          # needs >= 6 rounds with window 4
    counter = CountingDenoiser(model, B)
    x, st = run_paradigms(counter, x0, s, window=window, tol=1e-6, max_rounds=max_rounds)
    assert counter.calls == st.rounds == max_rounds
    assert not st.converged
    assert torch.isfinite(x).all()


def test_budget_stop_extrapolates_without_calls(models):
    """window=1, R rounds: R Euler steps, then x_S = x_R + (t_S - t_R) d(x_{R-1}, t_{R-1})."""
    model, x0 = models["gmm"], models["noise"] * 80.0
    s = get_sigmas("polynomial", 10)
    R = 4
    counter = CountingDenoiser(model, B)
    x, st = run_paradigms(counter, x0, s, window=1, tol=1e-3, max_rounds=R)
    x_prev = sample_euler(model, x0, s[:R])                  # x_{R-1}
    t_prev = s[R - 1].item()
    d = (x_prev - model(x_prev, torch.full((B,), t_prev, dtype=F64))) / t_prev
    x_R = x_prev + (s[R].item() - t_prev) * d
    want = x_R + (s[-1].item() - s[R].item()) * d
    assert counter.calls == R
    torch.testing.assert_close(x, want, rtol=1e-13, atol=1e-13)


def test_budget_stop_at_the_last_window_returns_its_end_state(models):
    """If the last window already reaches t_S, the result is its newest end state."""
    model, x0 = models["gmm"], models["noise"] * 80.0
    s = get_sigmas("polynomial", 12)
    seen = []
    x, st = run_paradigms(model, x0, s, window=None, tol=1e-12, max_rounds=2,
                          callback=seen.append)
    assert not st.converged and st.rounds == 2 and len(seen) == 2
    assert torch.equal(x, seen[-1]["x_next"]) and seen[-1]["sigma_next"] == s[-1].item()


@pytest.mark.parametrize("nfe", [1, 3, 5])
def test_paradigms_sampler_budget(models, nfe):
    """sample()'s entry: nfe-step grid -> 4 nfe fine steps, exactly nfe batched calls."""
    model, x0 = models["gmm"], models["noise"] * 80.0
    s = get_sigmas("polynomial", nfe)
    for window in (None, 4):
        counter = CountingDenoiser(model, B)
        out = paradigms_sampler(counter, x0, s, callback=None, progress=False, afs=False,
                                window=window)
        assert counter.calls == nfe                      # window <= substeps: guaranteed
        fine = paradigms_grid(s, 4)
        x, st = run_paradigms(model, x0, fine, window=window, max_rounds=nfe)
        assert torch.equal(out, x) and counter.evaluations == st.evaluations
    # more rounds -> closer to Euler on the fine grid
    if nfe == 5:
        euler = sample_euler(model, x0, paradigms_grid(s, 4))
        far = _rms(paradigms_sampler(model, x0, s), euler)
        near = _rms(run_paradigms(model, x0, paradigms_grid(s, 4), max_rounds=20)[0], euler)
        assert near < far


def test_paradigms_grid_nests_polynomial():
    for n, m in [(3, 4), (5, 2), (1, 8)]:
        fine = paradigms_grid(get_sigmas("polynomial", n), m)
        torch.testing.assert_close(fine, get_sigmas("polynomial", n * m), rtol=1e-13, atol=0)
        assert torch.equal(fine[::m], get_sigmas("polynomial", n))   # exact knots
    explicit = torch.tensor([10.0, 1.0, 0.1], dtype=F64)
    assert torch.equal(paradigms_grid(explicit, 1), explicit)


# --------------------------------------------------------------------------------------
# conditioning


def test_class_labels_repeated_across_window(models):
    model, x0 = models["gmm"], models["noise"] * 80.0
    labels = torch.arange(B) % K
    s = get_sigmas("polynomial", 16)
    rec = Recorder(model)
    run_paradigms(rec, x0, s, window=5, tol=1e-4, class_labels=labels)
    for c in rec.calls:
        n = c["n"] // B
        assert torch.equal(c["cond"]["class_labels"], labels.repeat(n))   # position-major


@pytest.mark.parametrize("kind", ["int", "onehot"])
def test_conditioning_matches_per_sample_runs(models, kind):
    """A batched run equals B single-sample runs. With a huge tolerance every round slides a
    full window, so the schedule does not depend on the batch and the runs must agree to
    rounding; with a tight one both are the conditional Euler solution."""
    model, x0 = models["gmm"], models["noise"] * 80.0
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    cond = labels if kind == "int" else torch.nn.functional.one_hot(labels, K).to(F64)
    s = get_sigmas("polynomial", 18)
    for tol, atol in [(1e6, 1e-12), (1e-9, 1e-9)]:
        x, st = run_paradigms(model, x0, s, window=4, tol=tol, class_labels=cond)
        if tol > 1:
            assert st.strides == (4, 4, 4, 4, 2)
        singles = torch.cat([sample_paradigms(model, x0[b:b + 1], s, window=4, tol=tol,
                                              class_labels=cond[b:b + 1]) for b in range(B)])
        torch.testing.assert_close(x, singles, rtol=0, atol=atol)
        if tol < 1:
            torch.testing.assert_close(x, sample_euler(model, x0, s, class_labels=cond),
                                       rtol=0, atol=1e-8)
    # and the labels matter: unconditional differs
    assert _rms(x, sample_paradigms(model, x0, s, window=4, tol=1e-9)) > 1e-3


# --------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize("kwargs, name", [
    ({"window": 0}, "window"),
    ({"window": -2}, "window"),
    ({"window": 2.5}, "window"),
    ({"window": True}, "window"),
    ({"tol": 0.0}, "tol"),
    ({"tol": -1e-3}, "tol"),
    ({"tol": float("nan")}, "tol"),
    ({"tol": float("inf")}, "tol"),
    ({"tol": "1e-3"}, "tol"),
    ({"max_rounds": 0}, "max_rounds"),
    ({"max_rounds": -1}, "max_rounds"),
    ({"max_rounds": 1.0}, "max_rounds"),
    ({"noise_scale": "variance"}, "noise_scale"),
])
def test_bad_arguments(models, kwargs, name):
    model, x0 = models["gauss"], models["noise"] * 80.0
    s = get_sigmas("polynomial", 6)
    counter = CountingDenoiser(model, B)
    with pytest.raises(ValueError, match=name):
        sample_paradigms(counter, x0, s, **kwargs)
    assert counter.calls == 0


@pytest.mark.parametrize("kwargs, name", [
    ({"substeps": 0}, "substeps"),
    ({"afs": True}, "afs"),
    ({"window": 0}, "window"),
    ({"tol": 0}, "tol"),
    ({"rho": -1.0}, "rho"),
])
def test_bad_sampler_arguments(models, kwargs, name):
    model, x0 = models["gauss"], models["noise"] * 80.0
    with pytest.raises(ValueError, match=name):
        paradigms_sampler(model, x0, get_sigmas("polynomial", 3), **kwargs)


def test_bad_sigmas_and_denoiser_output(models):
    model, x0 = models["gauss"], models["noise"] * 80.0
    with pytest.raises(ValueError, match="sigmas"):
        sample_paradigms(model, x0, [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        sample_paradigms(lambda x, s, **c: x[:, :2], x0, get_sigmas("polynomial", 4))


def test_callback_and_progress(models):
    model, x0 = models["gmm"], models["noise"] * 80.0
    s = get_sigmas("polynomial", 10)
    seen = []
    x, st = run_paradigms(model, x0, s, window=3, tol=1e-4, callback=seen.append,
                          progress=True)
    assert [e["round"] for e in seen] == list(range(st.rounds))
    assert [e["stride"] for e in seen] == list(st.strides)
    assert seen[-1]["converged"] and torch.equal(seen[-1]["x_next"], x)
    for e in seen:
        n = e["window"]
        assert e["error"].shape == (n, B) and e["threshold"].shape == (n,)
        assert e["sigma"] == s[e["i"]].item() and e["denoised"].shape == x0.shape
