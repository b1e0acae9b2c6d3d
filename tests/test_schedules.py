"""Schedules: ends, monotonicity, rho behaviour, VP time-uniform grid, validation.

Oracles are independent re-derivations: the VP sigma(t) is re-implemented here from the
SDE (sigma^2 = exp(int_0^t beta) - 1 with beta(t) = beta_min + beta_d t) and inverted by
bisection, and the polynomial grid is checked through its defining property (uniform in
sigma^(1/rho)).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from epd_kernels import get_sigmas
from epd_kernels.solvers.schedules import check_sigmas, vp_sigma, vp_sigma_inv

KINDS = ["polynomial", "logsnr", "time-uniform"]


def _vp_sigma_oracle(t, beta_d=19.9, beta_min=0.1):
    # integral of beta(s) = beta_min + beta_d s from 0 to t
    return math.sqrt(math.exp(beta_min * t + 0.5 * beta_d * t * t) - 1.0)


def _vp_t_bisect(sigma):
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _vp_sigma_oracle(mid) < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 5, 18, 100])
def test_ends_length_and_monotone(kind, n):
    s = get_sigmas(kind, n)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002  # exact, no appended zero
    assert bool((s[1:] < s[:-1]).all())


def test_polynomial_formula_and_rho():
    n = 10
    for rho in [1.0, 3.0, 7.0]:
        s = get_sigmas("polynomial", n, rho=rho)
        u = s ** (1.0 / rho)
        # uniform in sigma^(1/rho)
        assert torch.allclose(u[1:] - u[:-1], (u[-1] - u[0]) / n * torch.ones(n, dtype=torch.float64),
                              rtol=1e-10)
    # rho = 1 is uniform in sigma
    s1 = get_sigmas("polynomial", 4, sigma_min=1.0, sigma_max=5.0, rho=1.0)
    assert torch.allclose(s1, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    # larger rho -> smaller intermediate sigmas (more steps at low noise)
    a = get_sigmas("polynomial", 8, rho=3.0)
    b = get_sigmas("polynomial", 8, rho=7.0)
    assert bool((b[1:-1] < a[1:-1]).all())
    # rho -> inf tends to the logSNR grid
    c = get_sigmas("polynomial", 8, rho=1e6)
    assert torch.allclose(c, get_sigmas("logsnr", 8), rtol=1e-4)


def test_logsnr_is_uniform_in_log_sigma():
    s = get_sigmas("logsnr", 7, sigma_min=0.01, sigma_max=10.0)
    steps = torch.diff(torch.log(s))
    assert torch.allclose(steps, torch.full_like(steps, math.log(0.01 / 10.0) / 7), rtol=1e-12)


def test_time_uniform_vp():
    n = 6
    s = get_sigmas("time-uniform", n)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002
    t = [_vp_t_bisect(v) for v in s.tolist()]
    dt = np.diff(t)
    np.testing.assert_allclose(dt, np.full(n, dt.mean()), rtol=1e-9)
    # the closed-form inverse agrees with bisection, and the forward map with the oracle
    for v in [0.002, 0.1, 1.0, 80.0]:
        assert vp_sigma_inv(v) == pytest.approx(_vp_t_bisect(v), rel=1e-12)
        assert vp_sigma(vp_sigma_inv(v)) == pytest.approx(v, rel=1e-13)
    assert vp_sigma(0.5) == pytest.approx(_vp_sigma_oracle(0.5), rel=1e-14)
    # it differs from the other grids
    assert not torch.allclose(s, get_sigmas("logsnr", n), rtol=1e-3)
    assert not torch.allclose(s, get_sigmas("polynomial", n), rtol=1e-3)


def test_aliases_device_dtype():
    assert torch.equal(get_sigmas("karras", 5), get_sigmas("polynomial", 5))
    assert torch.equal(get_sigmas("vp", 5), get_sigmas("time-uniform", 5))
    s = get_sigmas("logsnr", 5, dtype=torch.float32, device="cpu")
    assert s.dtype == torch.float32


def test_explicit():
    s = get_sigmas("explicit", sigmas=[10.0, 1.0, 0.1])
    assert s.tolist() == [10.0, 1.0, 0.1] and s.dtype == torch.float64
    assert get_sigmas("explicit", 2, sigmas=torch.tensor([3.0, 2.0, 1.0])).shape == (3,)
    with pytest.raises(ValueError, match="num_steps"):
        get_sigmas("explicit", 3, sigmas=[3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        get_sigmas("explicit", sigmas=[3.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        get_sigmas("explicit", sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        get_sigmas("explicit", sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="> 0"):
        get_sigmas("explicit", sigmas=[2.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        get_sigmas("explicit", sigmas=[2.0])
    with pytest.raises(ValueError, match="1-D"):
        get_sigmas("explicit", sigmas=[[2.0, 1.0]])
    with pytest.raises(ValueError, match="finite"):
        get_sigmas("explicit", sigmas=[float("inf"), 1.0])
    with pytest.raises(ValueError, match="sigmas must be given"):
        get_sigmas("explicit", 3)
    with pytest.raises(ValueError, match="only used with kind='explicit'"):
        get_sigmas("logsnr", 2, sigmas=[3.0, 2.0, 1.0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="polynomial", num_steps=0), "num_steps"),
    (dict(kind="polynomial", num_steps=-2), "num_steps"),
    (dict(kind="polynomial", num_steps=2.5), "num_steps"),
    (dict(kind="polynomial", num_steps=True), "num_steps"),
    (dict(kind="logsnr", num_steps=None), "num_steps"),
    (dict(kind="polynomial", num_steps=4, sigma_min=0.0), "sigma_min"),
    (dict(kind="polynomial", num_steps=4, sigma_min=-1.0), "sigma_min"),
    (dict(kind="logsnr", num_steps=4, sigma_max=float("nan")), "sigma_max"),
    (dict(kind="logsnr", num_steps=4, sigma_min=5.0, sigma_max=5.0), "sigma_min < sigma_max"),
    (dict(kind="logsnr", num_steps=4, sigma_min=10.0, sigma_max=5.0), "sigma_min < sigma_max"),
    (dict(kind="polynomial", num_steps=4, rho=0.0), "rho"),
    (dict(kind="cosine", num_steps=4), "kind"),
    (dict(kind=3, num_steps=4), "kind"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_sigmas(**kwargs)


def test_check_sigmas_returns_float64_cpu():
    s = check_sigmas(torch.tensor([2.0, 1.0], dtype=torch.float32))
    assert s.dtype == torch.float64 and s.device.type == "cpu"


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 300),
       lo=st.floats(1e-4, 1.0), ratio=st.floats(1.5, 1e5), rho=st.floats(0.5, 12.0))
def test_hypothesis_grids(kind, n, lo, ratio, rho):
    hi = lo * ratio
    s = get_sigmas(kind, n, sigma_min=lo, sigma_max=hi, rho=rho)
    assert s.shape == (n + 1,)
    assert s[0].item() == hi and s[-1].item() == lo
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert bool((s[1:] < s[:-1]).all())
    # every grid is accepted back as an explicit schedule
    assert torch.equal(get_sigmas("explicit", n, sigmas=s), s)
