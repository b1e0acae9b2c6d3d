"""D-ODE solvers (d-euler, d-heun, d-ipndm), closed-form fitting, DODEParams files.

Oracles:
- lambda = 0 must be bit-for-bit the baseline solver (`sample_euler`, `sample_heun`,
  `sample_ipndm`), and nonzero lambdas must match a direct transcription of
  ``x_{n+1} = x_n + h_n [v_n + lambda_n (v_n - v_{n-1})]`` written here independently.
- the closed form: perturbing a fitted lambda_n by +-eps must raise that step's loss
  (to the teacher target, recomputed through the sampler) symmetrically, as a parabola
  with its vertex at lambda_n* does.
- accuracy: RMSE to scipy's DOP853 reference solution of a Gaussian mixture, on noise that
  the fit never saw (make_noise seeds 0..N-1; the fit uses FIT_SEED_BASE + ...).
- cost: sequential denoiser calls counted by a spy, equal to the base solver's.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from epd_kernels.distill.dode_fit import (FIT_SEED_BASE, fit_dode, refine_sigmas, solve_lambda,
                                  teacher_targets)
from epd_kernels import make_noise
from epd_kernels.models import GaussianMixtureModel, GaussianModel
from epd_kernels.params import DODEParams
from epd_kernels.params.dode import dode_latency_nfe
from epd_kernels.params.file import checksum as _checksum
from epd_kernels.solvers import get_sigmas, sample_euler, sample_heun, sample_ipndm
from epd_kernels.solvers.dode import dode_sampler, sample_d_euler, sample_d_heun, sample_d_ipndm
from epd_kernels.solvers.ipndm import AB_COEFFS

F64 = torch.float64
BASE = {"euler": sample_euler, "heun": sample_heun, "ipndm": sample_ipndm}
DODE = {"euler": sample_d_euler, "heun": sample_d_heun, "ipndm": sample_d_ipndm}


class Spy:
    """Independent counter of sequential denoiser calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **cond):
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        return self.model(x, sigma, **cond)


@pytest.fixture(scope="module")
def gauss():
    g = torch.Generator().manual_seed(1234)
    return GaussianModel(0.8 * torch.randn(8, generator=g, dtype=F64),
                         0.3 + 1.2 * torch.rand(8, generator=g, dtype=F64))


@pytest.fixture(scope="module")
def gmm():
    """8-D mixture of 6 overlapping isotropic components (curved, multimodal flow)."""
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureModel(torch.randn(6, 8, generator=g, dtype=F64),
                                0.5 + 0.5 * torch.rand(6, generator=g, dtype=F64))


@pytest.fixture(scope="module")
def heldout(gmm):
    """Held-out noise (seeds 0..255) and the DOP853 reference solution at sigma_min."""
    noise = make_noise(range(256), (8,), dtype=F64)
    ref = gmm.reference_solution(noise * 80.0, 80.0, 0.002, rtol=1e-10, atol=1e-10)
    return noise, ref


def _steps(base, nfe, afs):
    per = 2 if base == "heun" else 1
    return (nfe + int(afs)) // per


def _lambdas(S, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = 0.8 * torch.randn(S, generator=g, dtype=F64)
    lam[0] = 0.0
    return lam


# --------------------------------------------------------------------------------------
# the solvers


@pytest.mark.parametrize("base", ["euler", "heun", "ipndm"])
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("which", ["gauss", "gmm"])
def test_zero_lambdas_are_the_base_solver(base, afs, which, request):
    model = request.getfixturevalue(which)
    x = make_noise(range(5), (8,), dtype=F64) * 80.0
    for S in (1, 2, 5):
        s = get_sigmas("polynomial", S)
        want = BASE[base](model, x, s, afs=afs)
        got = DODE[base](model, x, s, lambdas=torch.zeros(S, dtype=F64), afs=afs)
        assert torch.equal(got, want), (base, afs, S)
        p = DODEParams.zeros(s, base, afs=afs) if dode_latency_nfe(S, base, afs) >= 1 else None
        if p is not None:
            assert torch.equal(dode_sampler(model, x, params=p), want)
    s = get_sigmas("logsnr", 6)
    if base == "ipndm":
        for order in (1, 2, 3):
            assert torch.equal(sample_d_ipndm(model, x, s, lambdas=[0.0] * 6, max_order=order),
                               sample_ipndm(model, x, s, max_order=order))


def _direct(base, model, x, s, lam, afs=False):
    """x_{n+1} = x_n + h [v_n + lam_n (v_n - v_{n-1})], transcribed independently."""
    S = len(s) - 1
    ds, vs = [], []
    for n in range(S):
        t, t1 = float(s[n]), float(s[n + 1])
        h = t1 - t
        sig = torch.full((x.shape[0],), t, dtype=F64)
        d = x / (1 + t * t) ** 0.5 if (afs and n == 0) else (x - model(x, sig)) / t
        ds.append(d)
        if base == "euler":
            v = d
        elif base == "heun":
            xp = x + h * d
            dp = (xp - model(xp, torch.full_like(sig, t1))) / t1
            v = (d + dp) / 2
        else:
            p = min(4, n + 1)
            v = sum(c * ds[-1 - j] for j, c in enumerate(AB_COEFFS[p - 1]))
        o = v if n == 0 else v + lam[n] * (v - vs[-1])
        vs.append(v)
        x = x + h * o
    return x


@pytest.mark.parametrize("base", ["euler", "heun", "ipndm"])
@pytest.mark.parametrize("afs", [False, True])
def test_nonzero_lambdas_match_the_formula(base, afs, gmm):
    x = make_noise(range(6), (8,), dtype=F64) * 80.0
    s = get_sigmas("polynomial", 6)
    lam = _lambdas(6, seed=3)
    got = DODE[base](gmm, x, s, lambdas=lam, afs=afs)
    torch.testing.assert_close(got, _direct(base, gmm, x, s, lam.tolist(), afs),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, BASE[base](gmm, x, s, afs=afs))
    seen = []
    p = DODEParams(lambdas=lam, sigmas=s, base=base, afs=afs)
    dode_sampler(gmm, x, params=p, callback=lambda info: seen.append(info))
    assert [i["i"] for i in seen] == list(range(6))
    assert [i["lambda"] for i in seen] == lam.tolist()
    assert torch.equal(seen[-1]["x_next"], got)
    assert all(k in seen[0] for k in ("x", "x_next", "sigma", "sigma_next", "denoised"))


def test_lambda_argument_checks(gauss):
    x = make_noise(range(2), (8,), dtype=F64) * 80.0
    s = get_sigmas("polynomial", 3)
    with pytest.raises(ValueError, match="3 steps"):
        sample_d_euler(gauss, x, s, lambdas=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"lambdas\[0\] must be 0"):
        sample_d_heun(gauss, x, s, lambdas=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        sample_d_ipndm(gauss, x, s, lambdas=[0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="max_order"):
        sample_d_ipndm(gauss, x, s, lambdas=[0.0] * 3, max_order=5)


@pytest.mark.parametrize("base", ["euler", "heun", "ipndm"])
@pytest.mark.parametrize("afs", [False, True])
def test_nfe_equals_the_base_solver(base, afs, gauss):
    x = make_noise(range(3), (8,), dtype=F64) * 80.0
    for S in (1, 2, 3, 4, 5):
        if dode_latency_nfe(S, base, afs) < 1:
            continue
        s = get_sigmas("polynomial", S)
        spy_b, spy_d = Spy(gauss), Spy(gauss)
        BASE[base](spy_b, x, s, afs=afs)
        p = DODEParams(lambdas=_lambdas(S), sigmas=s, base=base, afs=afs)
        dode_sampler(spy_d, x, params=p)
        per = 2 if base == "heun" else 1
        assert spy_d.calls == spy_b.calls == per * S - int(afs) == p.nfe


def test_dode_sampler_checks(gauss):
    x = make_noise(range(2), (8,), dtype=F64) * 80.0
    s = get_sigmas("polynomial", 3)
    p = DODEParams(lambdas=_lambdas(3), sigmas=s, base="heun")
    assert p.afs and p.nfe == 5 and p.solver == "d-heun"
    with pytest.raises(TypeError, match="DODEParams"):
        dode_sampler(gauss, x, params={"lambdas": [0, 0, 0]})
    with pytest.raises(ValueError, match="'d-heun', not 'd-euler'"):
        dode_sampler(gauss, x, params=p, solver="d-euler")
    with pytest.raises(ValueError, match="afs"):
        dode_sampler(gauss, x, params=p, afs=False)
    with pytest.raises(ValueError, match="different time grid"):
        dode_sampler(gauss, x, get_sigmas("logsnr", 3), params=p)
    with pytest.raises(ValueError, match="4 sigmas"):
        dode_sampler(gauss, x, get_sigmas("polynomial", 4), params=p)
    out = dode_sampler(gauss, x, s, params=p, solver="d-edm", afs=True)
    assert torch.equal(out, dode_sampler(gauss, x, params=p))


# --------------------------------------------------------------------------------------
# fitting


def test_refine_sigmas():
    s = get_sigmas("polynomial", 4)
    fine = refine_sigmas(s, 10)
    assert fine.numel() == 41 and torch.equal(fine[::10], s)
    torch.testing.assert_close(fine, get_sigmas("polynomial", 40), rtol=1e-12, atol=0)
    ex = torch.tensor([50.0, 3.0, 2.5, 0.01], dtype=F64)
    f = refine_sigmas(ex, 3)
    assert torch.equal(f[::3], ex) and bool((f[1:] < f[:-1]).all())
    assert torch.equal(refine_sigmas(ex, 1), ex)
    with pytest.raises(ValueError, match="teacher_factor"):
        refine_sigmas(ex, 0)


def test_solve_lambda_guards():
    t, a = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert solve_lambda(t, a, torch.zeros(4, 3)) == 0.0
    b = torch.randn(4, 3, dtype=F64)
    assert solve_lambda(a + 0.7 * b, a, b) == pytest.approx(0.7, rel=1e-12)
    assert solve_lambda(t, a, torch.full((4, 3), float("inf"))) == 0.0


@pytest.mark.parametrize("base", ["euler", "heun", "ipndm"])
def test_closed_form_is_the_minimiser(base, gauss):
    nfe, shape = 5, (8,)
    noise = make_noise(range(FIT_SEED_BASE, FIT_SEED_BASE + 64), shape, dtype=F64)
    p = fit_dode(gauss, solver="d-" + base, nfe=nfe, noise=noise, refine=False)
    assert p.nfe == nfe and p.base == base and p.lambdas[0] == 0 and p.meta["refine"] is None
    x_T = noise * float(p.sigmas[0])
    targets = teacher_targets(gauss, x_T, p.sigmas, teacher="heun", teacher_factor=10)

    def step_loss(lam, n):
        states = []
        DODE[base](gauss, x_T, p.sigmas, lambdas=lam, afs=p.afs,
                   callback=lambda info: states.append(info["x_next"]))
        return (states[n] - targets[n]).pow(2).mean().item()

    # The recorded per-step losses are those of the sampler itself.
    for n in range(p.num_steps):
        assert step_loss(p.lambdas, n) == pytest.approx(p.meta["loss"][n], rel=1e-10)
    for n in range(1, p.num_steps):
        lam_star = float(p.lambdas[n])
        eps = 1e-2 * max(1.0, abs(lam_star))
        L0 = step_loss(p.lambdas, n)
        up, down = p.lambdas.clone(), p.lambdas.clone()
        up[n] += eps
        down[n] -= eps
        Lu, Ld = step_loss(up, n), step_loss(down, n)
        assert Lu > L0 and Ld > L0, (n, L0, Lu, Ld)
        # A parabola with its vertex at lambda*: both sides rise by the same amount.
        assert abs(Lu - Ld) <= 1e-6 * (Lu - L0), (n, L0, Lu, Ld)
        assert L0 <= p.meta["loss_base"][n] * (1 + 1e-12)  # lambda = 0 is in the family


@pytest.mark.parametrize("base", ["euler", "heun", "ipndm"])
def test_refinement_lowers_the_final_loss(base, gmm):
    """The joint refinement starts from the greedy closed form (and from zeros) and only
    accepts decreases: its final-state MSE to the teacher, recomputed here through the
    sampler, is <= both, and it is a local minimum (a bump of any lambda raises it)."""
    nfe = 5 if base != "heun" else 7
    noise = make_noise(range(FIT_SEED_BASE, FIT_SEED_BASE + 64), (8,), dtype=F64)
    p = fit_dode(gmm, solver="d-" + base, nfe=nfe, noise=noise, refine_iterations=6)
    g = fit_dode(gmm, solver="d-" + base, nfe=nfe, noise=noise, refine=False)
    assert p.meta["lambdas_greedy"] == g.lambdas.tolist() and p.lambdas[0] == 0
    x_T = noise * float(p.sigmas[0])
    target = teacher_targets(gmm, x_T, p.sigmas, teacher="heun", teacher_factor=10)[-1]

    def final_mse(lam):
        x = DODE[base](gmm, x_T, p.sigmas, lambdas=lam, afs=p.afs)
        return (x - target).pow(2).mean().item()

    e, e_greedy, e_base = (final_mse(p.lambdas), final_mse(g.lambdas),
                           final_mse(torch.zeros_like(p.lambdas)))
    r = p.meta["refine"]
    assert e == pytest.approx(r["final_mse"], rel=1e-9)
    assert e_greedy == pytest.approx(r["final_mse_greedy"], rel=1e-9)
    assert e_base == pytest.approx(r["final_mse_base"], rel=1e-9)
    assert r["accepted_steps"] >= 1 and e < 0.9 * min(e_greedy, e_base), (e, e_greedy, e_base)
    for n in range(1, p.num_steps):
        for sign in (1, -1):
            bumped = p.lambdas.clone()
            bumped[n] += sign * 0.05 * max(1.0, abs(float(p.lambdas[n])))
            assert final_mse(bumped) > e * (1 - 1e-6), (n, sign)
    # meta["loss"] describes the returned lambdas (per-step MSE to the teacher states)
    states = []
    targets = teacher_targets(gmm, x_T, p.sigmas, teacher="heun", teacher_factor=10)
    DODE[base](gmm, x_T, p.sigmas, lambdas=p.lambdas, afs=p.afs,
               callback=lambda info: states.append(info["x_next"]))
    for n, (xs, t) in enumerate(zip(states, targets)):
        assert (xs - t).pow(2).mean().item() == pytest.approx(p.meta["loss"][n], rel=1e-9)


def test_refine_lambdas_solves_a_linear_problem():
    """On an affine map x(lambda) = c + A lambda the Gauss-Newton step is exact: one step
    reaches the least-squares solution (numpy's lstsq as the oracle), lambda_0 held fixed."""
    from epd_kernels.distill.dode_fit import refine_lambdas

    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 4, generator=g, dtype=F64)
    c = torch.randn(40, generator=g, dtype=F64)
    target = torch.randn(40, generator=g, dtype=F64)
    lam, info = refine_lambdas(lambda l: c + A @ l, target, [torch.zeros(4, dtype=F64)],
                               iterations=3)
    free = torch.linalg.lstsq(A[:, 1:], (target - c).unsqueeze(1)).solution.squeeze(1)
    assert lam[0] == 0
    torch.testing.assert_close(lam[1:], free, rtol=1e-6, atol=1e-8)
    assert info["accepted_steps"] >= 1 and info["loss"] < info["start_losses"][0]
    # a start already at the optimum is kept, and the best of several starts is used
    opt = torch.cat([torch.zeros(1, dtype=F64), free])
    lam2, info2 = refine_lambdas(lambda l: c + A @ l, target, [torch.ones(4, dtype=F64), opt],
                                 iterations=2)
    torch.testing.assert_close(lam2, opt, rtol=1e-6, atol=1e-8)
    assert info2["start_losses"][1] < info2["start_losses"][0]


def test_refine_arguments(gauss):
    with pytest.raises(ValueError, match="iterations"):   # a distill option, not conditioning
        fit_dode(gauss, solver="d-euler", nfe=3, shape=(8,), batch_size=4, iterations=10)
    with pytest.raises(ValueError, match="refine must be"):
        fit_dode(gauss, solver="d-euler", nfe=3, shape=(8,), batch_size=4, refine="yes")
    with pytest.raises(ValueError, match="refine_iterations"):
        fit_dode(gauss, solver="d-euler", nfe=3, shape=(8,), batch_size=4, refine_iterations=-1)
    p = fit_dode(gauss, solver="d-euler", nfe=3, shape=(8,), batch_size=4, refine_iterations=0)
    assert p.lambdas.tolist() in (p.meta["lambdas_greedy"], [0.0] * 3)


def test_fit_is_deterministic_and_reusable(gauss, tmp_path):
    a = fit_dode(gauss, solver="d-ipndm", nfe=4, shape=(8,), batch_size=32, dtype=F64)
    b = fit_dode(gauss, solver="d-ipndm", nfe=4, shape=(8,), batch_size=32, dtype=F64)
    assert torch.equal(a.lambdas, b.lambdas)
    c = fit_dode(gauss, solver="d-ipndm", nfe=4, shape=(8,), batch_size=32, dtype=F64, seed=1)
    assert not torch.equal(a.lambdas, c.lambdas)
    assert a.meta["teacher"] == "heun" and a.meta["teacher_factor"] == 10
    a.save(tmp_path / "a.safetensors")
    q = DODEParams.load(tmp_path / "a.safetensors")
    x = make_noise(range(4), (8,), dtype=F64) * 80.0
    assert torch.equal(dode_sampler(gauss, x, params=q), dode_sampler(gauss, x, params=a))
    f32 = fit_dode(gauss, solver="d-euler", nfe=3, shape=(8,), batch_size=32)
    assert f32.meta["dtype"] == "float32" and f32.lambdas.dtype == F64
    same = fit_dode(gauss, solver="d-euler", nfe=3, shape=(8,), batch_size=32, teacher="same")
    assert same.meta["teacher"] == "euler"


def test_fit_argument_errors(gauss):
    kw = dict(shape=(8,), batch_size=4)
    with pytest.raises(ValueError, match="odd budgets"):
        fit_dode(gauss, solver="d-heun", nfe=4, **kw)
    with pytest.raises(ValueError, match="even budgets"):
        fit_dode(gauss, solver="d-heun", nfe=5, afs=False, **kw)
    with pytest.raises(ValueError, match="unknown D-ODE solver"):
        fit_dode(gauss, solver="d-dpm2", nfe=5, **kw)
    with pytest.raises(ValueError, match="unknown teacher"):
        fit_dode(gauss, solver="d-euler", nfe=5, teacher="rk45", **kw)
    with pytest.raises(ValueError, match="shape"):
        fit_dode(gauss, solver="d-euler", nfe=5)
    with pytest.raises(ValueError, match="nfe must be given"):
        fit_dode(gauss, solver="d-euler", **kw)
    with pytest.raises(ValueError, match="steps"):
        fit_dode(gauss, solver="d-euler", nfe=5, schedule=[80.0, 1.0, 0.002], **kw)
    with pytest.raises(ValueError, match="nfe=0"):
        fit_dode(gauss, solver="d-euler", nfe=0, **kw)
    p = fit_dode(gauss, solver="d-euler", schedule=[80.0, 1.0, 0.002], **kw)
    assert p.nfe == 2 and p.schedule == "explicit"
    p = fit_dode(gauss, solver="d-ddim", nfe=3, schedule={"kind": "logsnr"}, **kw)
    assert p.solver == "d-euler" and p.schedule == {"kind": "logsnr"}
    torch.testing.assert_close(p.sigmas, get_sigmas("logsnr", 3))


# the budgets each test covers; D-ODE must beat its base at all of them
BUDGET_CASES = [(b, n) for b in ("euler", "heun", "ipndm") for n in (3, 5, 7)]


@pytest.mark.parametrize("base,nfe", BUDGET_CASES)
def test_dode_beats_base_on_heldout_noise(base, nfe, gmm, heldout):
    noise, ref = heldout
    afs = base == "heun"
    s = get_sigmas("polynomial", _steps(base, nfe, afs))
    rmse = lambda x: (x - ref).pow(2).mean().sqrt().item()  # noqa: E731
    e_base = rmse(BASE[base](gmm, noise * 80.0, s, afs=afs))
    p = fit_dode(gmm, solver="d-" + base, nfe=nfe, shape=(8,), batch_size=128, dtype=F64)
    e_dode = rmse(dode_sampler(gmm, noise * 80.0, params=p))
    assert e_dode < 0.9 * e_base, (base, nfe, e_base, e_dode, p.lambdas.tolist())


# --------------------------------------------------------------------------------------
# DODEParams


def _params(S=4, base="ipndm", **kw):
    kw.setdefault("meta", {"teacher": "heun", "loss": [0.1, 0.2]})
    return DODEParams(lambdas=_lambdas(S, seed=S), sigmas=get_sigmas("polynomial", S),
                      base=base, **kw).validate()


def assert_same(a: DODEParams, b: DODEParams):
    for n in ("lambdas", "sigmas"):
        ta, tb = getattr(a, n), getattr(b, n)
        assert ta.dtype == tb.dtype == F64 and torch.equal(ta, tb), n
    for n in ("base", "nfe", "afs", "max_order", "schedule", "meta"):
        assert getattr(a, n) == getattr(b, n), n


@pytest.mark.parametrize("base", ["euler", "heun", "ipndm"])
@pytest.mark.parametrize("afs", [False, True])
def test_roundtrip(tmp_path, base, afs):
    p = _params(S=3, base=base, afs=afs, max_order=3,
                schedule={"kind": "polynomial", "rho": 7.0})
    path = tmp_path / "sub" / "d.safetensors"
    p.save(path)
    q = DODEParams.load(path)
    assert_same(p, q)
    assert q.nfe == (2 if base == "heun" else 1) * 3 - int(afs)
    assert sorted(os.listdir(path.parent)) == ["d.safetensors"]


def test_defaults_zeros_and_aliases():
    s = get_sigmas("polynomial", 3)
    assert DODEParams.zeros(s, "heun").afs and DODEParams.zeros(s, "heun").nfe == 5
    assert not DODEParams.zeros(s, "d-ddim").afs and DODEParams.zeros(s, "d-ddim").base == "euler"
    assert DODEParams.zeros(s, "d-ipndm").nfe == 3
    p = _params()
    q = p.replace(afs=True)
    assert q.nfe == p.nfe - 1 and p.afs is False


@pytest.mark.parametrize("change,match", [
    (dict(lambdas=[0.0, 1.0]), r"shape \[S\] = \[3\]"),
    (dict(lambdas=[0.5, 1.0, 0.0]), r"lambdas\[0\] must be 0"),
    (dict(lambdas=[0.0, float("inf"), 0.0]), "non-finite"),
    (dict(sigmas=[80.0, 1.0, 2.0, 0.002]), "strictly decreasing"),
    (dict(sigmas=[80.0, 1.0, 0.5, -0.1]), "> 0"),
    (dict(sigmas=[80.0, float("nan"), 0.5, 0.1]), "non-finite"),
    (dict(nfe=5), "nfe = 5 does not match"),
    (dict(max_order=7), "max_order"),
    (dict(schedule=3), "schedule"),
    (dict(meta=[1]), "meta must be a dict"),
])
def test_validate_names_the_problem(change, match):
    kw = dict(lambdas=[0.0, 0.3, -0.2], sigmas=[80.0, 2.0, 0.1, 0.002], base="euler")
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        DODEParams(**kw).validate()


def test_construction_errors():
    with pytest.raises(ValueError, match="unknown D-ODE solver"):
        DODEParams(lambdas=[0.0], sigmas=[80.0, 0.002], base="dpm2")
    with pytest.raises(ValueError, match="afs"):
        DODEParams(lambdas=[0.0], sigmas=[80.0, 0.002], afs="yes")
    with pytest.raises(ValueError, match="no denoiser call"):
        DODEParams(lambdas=[0.0], sigmas=[80.0, 0.002], base="euler", afs=True).validate()


def test_check_compatible():
    p = _params(S=4, base="euler")
    p.check_compatible(nfe=4, sigmas=get_sigmas("polynomial", 4), solver="d-ddim", afs=False)
    with pytest.raises(ValueError, match="NFE 5 was asked"):
        p.check_compatible(nfe=5)
    with pytest.raises(ValueError, match="5 sigmas .* 6"):
        p.check_compatible(sigmas=get_sigmas("polynomial", 5))
    with pytest.raises(ValueError, match=r"sigma\[1\]"):
        p.check_compatible(sigmas=get_sigmas("logsnr", 4))
    with pytest.raises(ValueError, match="'d-euler', not 'd-ipndm'"):
        p.check_compatible(solver="d-ipndm")
    with pytest.raises(ValueError, match="afs=True"):
        p.check_compatible(afs=True)
    with pytest.raises(TypeError, match="DODEParams has no plugin variant"):
        p.check_compatible(plugin=False)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        DODEParams.load(tmp_path / "nope.safetensors")


def _saved(tmp_path):
    path = tmp_path / "d.safetensors"
    _params().save(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("cut", [0, 4, 8, 20, "header-1", "data-1", "data-half"])
def test_truncated_file(tmp_path, cut):
    path, data = _saved(tmp_path)
    n = int.from_bytes(data[:8], "little")
    cut = {"header-1": 8 + n - 1, "data-1": len(data) - 1,
           "data-half": 8 + n + (len(data) - 8 - n) // 2}.get(cut, cut)
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="d.safetensors"):
        DODEParams.load(path)


def test_corrupted_header_and_garbage(tmp_path):
    path, data = _saved(tmp_path)
    bad = bytearray(data)
    bad[9] = ord("#")
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="corrupted"):
        DODEParams.load(path)
    path.write_bytes(os.urandom(200))
    with pytest.raises(ValueError):
        DODEParams.load(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        DODEParams.load(path)


def test_corrupted_tensor_bytes(tmp_path):
    path, data = _saved(tmp_path)
    bad = bytearray(data)
    bad[-3] ^= 0x10
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        DODEParams.load(path)


def _good_raw(S=3):
    p = _params(S=S, base="euler")
    tensors = p._tensors_for_file()
    fields = {"format_version": 1, "kind": "d-ode", "solver": "d-euler",
              "base": "euler", "S": S, "nfe": p.nfe, "afs": False, "max_order": 4,
              "schedule": None, "package_version": "0.1.0", "meta": {},
              "checksum": _checksum(tensors)}
    return tensors, fields


def _write_raw(path, tensors, fields):
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in fields.items()})


def test_raw_writer_is_valid(tmp_path):
    tensors, fields = _good_raw()
    _write_raw(tmp_path / "d.safetensors", tensors, fields)
    assert DODEParams.load(tmp_path / "d.safetensors").nfe == 3


def test_future_format_version(tmp_path):
    tensors, fields = _good_raw()
    fields["format_version"] = DODEParams.FORMAT_VERSION + 1
    _write_raw(tmp_path / "d.safetensors", tensors, fields)
    with pytest.raises(ValueError, match="newer than this epd_kernels supports"):
        DODEParams.load(tmp_path / "d.safetensors")


@pytest.mark.parametrize("key", ["solver", "base", "S", "nfe", "afs", "checksum", "meta"])
def test_missing_metadata_key(tmp_path, key):
    tensors, fields = _good_raw()
    del fields[key]
    _write_raw(tmp_path / "d.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=f"missing the keys.*{key}"):
        DODEParams.load(tmp_path / "d.safetensors")


def test_not_a_dode_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a D-ODE params file"):
        DODEParams.load(tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "y.safetensors"), metadata={"a": "b"})
    with pytest.raises(ValueError, match="format_version"):
        DODEParams.load(tmp_path / "y.safetensors")
    from epd_kernels import EPDParams

    EPDParams.init(get_sigmas("polynomial", 3), 2).save(tmp_path / "epd.safetensors")
    with pytest.raises(ValueError, match="EPDParams.load"):
        DODEParams.load(tmp_path / "epd.safetensors")


@pytest.mark.parametrize("name", ["lambdas", "sigmas"])
def test_missing_tensor(tmp_path, name):
    tensors, fields = _good_raw()
    del tensors[name]
    fields["checksum"] = _checksum(tensors)
    _write_raw(tmp_path / "d.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=f"missing tensors \\['{name}'\\]"):
        DODEParams.load(tmp_path / "d.safetensors")


@pytest.mark.parametrize("edit,match", [
    (lambda t, f: t.update(lambdas=torch.zeros(4, dtype=F64)), "tensor 'lambdas' has shape"),
    (lambda t, f: t.update(sigmas=get_sigmas("polynomial", 4)), "tensor 'sigmas' has shape"),
    (lambda t, f: t.update(lambdas=torch.zeros(3)), "float64"),
    (lambda t, f: t["lambdas"].fill_(1.0), r"lambdas\[0\] must be 0"),
    (lambda t, f: t["sigmas"].copy_(t["sigmas"].flip(0)), "strictly decreasing"),
    (lambda t, f: f.update(nfe=5), "nfe = 5 does not match S = 3"),
    (lambda t, f: f.update(S=4), "has shape"),
    (lambda t, f: f.update(solver="d-heun"), "contradicts"),
    (lambda t, f: f.update(base="dpm2"), "base"),
    (lambda t, f: f.update(afs="yes"), "'afs' must be true/false"),
    (lambda t, f: f.update(S=2.5), "'S' must be an integer"),
    (lambda t, f: f.update(meta=[1]), "'meta' must be an object"),
    (lambda t, f: f.update(kind="epd"), "not a D-ODE params file"),
    (lambda t, f: f.update(format_version="1"), "invalid format_version"),
    (lambda t, f: t.update(extra=torch.zeros(1, dtype=F64)), "unexpected tensors"),
])
def test_bad_values_in_file(tmp_path, edit, match):
    tensors, fields = _good_raw()
    edit(tensors, fields)
    fields["checksum"] = _checksum(tensors)
    _write_raw(tmp_path / "d.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=match):
        DODEParams.load(tmp_path / "d.safetensors")


def test_bad_json_in_metadata(tmp_path):
    tensors, fields = _good_raw()
    meta = {k: json.dumps(v) for k, v in fields.items()}
    meta["nfe"] = "{not json"
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="'nfe' is not valid JSON"):
        DODEParams.load(tmp_path / "d.safetensors")


def test_atomic_save_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "d.safetensors"
    _params().save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        _params(meta={"f": object()}).save(path, overwrite=True)
    with pytest.raises(ValueError, match="JSON"):
        _params(meta={"f": float("nan")}).save(path, overwrite=True)
    bad = _params()
    bad.lambdas[0] = 1.0
    with pytest.raises(ValueError, match=r"lambdas\[0\]"):
        bad.save(path, overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _params(S=3).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"]


# --------------------------------------------------------------------------------------
# sample() wiring


@pytest.mark.parametrize("base,nfe", [("euler", 4), ("heun", 5), ("ipndm", 3)])
def test_sample_wiring(base, nfe, gauss):
    from epd_kernels import sample

    p = fit_dode(gauss, solver="d-" + base, nfe=nfe, shape=(8,), batch_size=16, dtype=F64)
    noise = make_noise(range(4), (8,), dtype=F64)
    out, stats = sample(gauss, noise, solver="d-" + base, nfe=nfe, params=p, return_stats=True)
    assert stats.latency_nfe == nfe == p.nfe
    assert torch.equal(out, dode_sampler(gauss, noise * 80.0, params=p))
    other = "d-heun" if base != "heun" else "d-euler"
    with pytest.raises(ValueError, match=p.solver):
        sample(gauss, noise, solver=other, params=p)
