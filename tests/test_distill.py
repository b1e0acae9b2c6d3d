"""EPD distillation (epd_kernels/distill): loss, ranges, the non-finite guard, checkpoints
(including a run killed with SIGKILL and resumed) and a held-out quality check."""
from __future__ import annotations

import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from distill_helpers.problems import F64, SMALL, Slow, gaussian, mixture
from epd_kernels import EPDParams, distill, get_sigmas, make_noise, sample
from epd_kernels.distill import (LatentEPD, load_checkpoint, refine_sigmas, row_seed,
                                 teacher_targets, training_noise)

pytestmark = [pytest.mark.filterwarnings("ignore:epd_kernels. using the plain-PyTorch reference"),
              pytest.mark.usefixtures("one_thread")]

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def small(model, **kw):
    """The small 8-dim Gaussian run (wrappers of `gaussian()` included), without the
    held-out comparison (tested on its own)."""
    args = dict(SMALL, batch_size=8, pool=64, shape=(8,), compare=False)
    args.update(kw)
    return distill(model, **args)


def assert_same_params(a: EPDParams, b: EPDParams, **tol):
    for name in ("r", "weights", "delta", "o", "sigmas"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol, msg=name)


# --------------------------------------------------------------------------------------
# building blocks


def test_refine_sigmas():
    s = get_sigmas("polynomial", 3)
    fine = refine_sigmas(s, 3)
    # polynomial insertion on the polynomial grid is the polynomial grid of S (M+1) steps
    torch.testing.assert_close(fine, get_sigmas("polynomial", 12), rtol=1e-12, atol=0)
    assert torch.equal(fine[::4], s)
    geo = refine_sigmas(s, 1, insert="logsnr")
    assert torch.equal(geo[::2], s)
    torch.testing.assert_close(geo[1::2], torch.sqrt(s[:-1] * s[1:]), rtol=1e-12, atol=0)
    assert torch.equal(refine_sigmas(s, 0), s)
    with pytest.raises(ValueError, match="insert"):
        refine_sigmas(s, 2, insert="cubic")


def test_teacher_targets_are_accurate_states_at_student_sigmas():
    model = gaussian()
    x = make_noise(range(16), model.shape, dtype=F64) * 80.0
    s = get_sigmas("polynomial", 3)
    y = teacher_targets(model, x, s, M=15)
    assert y.shape == (3, 16) + model.shape
    exact = torch.stack([model.exact_solution(x, 80.0, float(t)) for t in s[1:]])
    assert (y - exact).pow(2).mean().sqrt() < 0.01
    coarse = teacher_targets(model, x, s, M=1, teacher="heun")
    assert (coarse - exact).pow(2).mean().sqrt() > (y - exact).pow(2).mean().sqrt()


def test_training_noise_is_a_pure_function_of_seed_iteration_row():
    a = training_noise(5, 7, range(0, 6), (4,))
    torch.testing.assert_close(a[2:5], training_noise(5, 7, range(2, 5), (4,)), rtol=0, atol=0)
    assert not torch.equal(a, training_noise(5, 8, range(0, 6), (4,)))
    assert not torch.equal(a, training_noise(6, 7, range(0, 6), (4,)))
    assert len({row_seed(0, i, j) for i in range(20) for j in range(20)}) == 400


def test_pool_with_per_entry_labels_keeps_each_draw_with_its_label():
    """A pool with one class label per entry: the teacher target of every batch row is the
    teacher run on that row's draw with THAT entry's label (computed here directly), and
    the batch carries the same labels (the 2-process split: test_distill_multiproc)."""
    from epd_kernels.distill.batches import TeacherBatches

    model = mixture()
    K, P = model.means.shape[0], 12
    labels = (torch.arange(P) * 3) % K
    s = get_sigmas("polynomial", 3)
    kw = dict(seed=4, M=2, teacher="dpm2", insert="polynomial", rho=7.0, device="cpu",
              dtype=F64, pool=P, pool_cond={"class_labels": labels})
    data = TeacherBatches(model, s, model.shape, **kw)
    rows = range(0, 7)
    x, y, cond = data.batch(5, rows)
    entry = torch.tensor([row_seed(4, 5, j) % P for j in rows])
    assert torch.equal(cond["class_labels"], labels[entry])
    for j in rows:
        x_j = training_noise(4, -1, [int(entry[j])], model.shape, "cpu", F64) * 80.0
        torch.testing.assert_close(x[j:j + 1], x_j, rtol=0, atol=0)
        direct = teacher_targets(model, x_j, s, M=2, teacher="dpm2",
                                 class_labels=labels[entry[j:j + 1]])
        torch.testing.assert_close(y[:, j:j + 1], direct, rtol=1e-12, atol=1e-12)
    # the labels matter: the unconditional teacher lands elsewhere
    free = teacher_targets(model, x, s, M=2)
    assert (free[-1] - y[-1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="pool_cond needs a pool"):
        TeacherBatches(model, s, model.shape, **dict(kw, pool=None))


def test_pool_refuses_labels_per_batch_row_and_takes_labels_per_entry():
    model = mixture()
    K = model.means.shape[0]
    kw = dict(nfe=3, shape=model.shape, iterations=2, batch_size=4, pool=16, M=1,
              progress=False, dtype=F64)
    with pytest.raises(ValueError, match=r"\['class_labels'\].*one row per pool entry"):
        distill(model, class_labels=torch.arange(4) % K, **kw)
    p = distill(model, class_labels=torch.arange(16) % K, **kw)
    assert p.meta["pool"] == 16 and math.isfinite(p.meta["final_loss"])


def test_latent_map_round_trip_and_bounds():
    s = get_sigmas("polynomial", 3)
    p = EPDParams.init(s, 3)
    p.delta = torch.tensor([[0.05, -0.02, 0.0]] * 3, dtype=F64)
    p.o = torch.tensor([0.01, -0.09, 0.0], dtype=F64)
    lat = LatentEPD.from_params(p)
    q = lat.natural()
    assert q.r.requires_grad and q.weights.requires_grad
    assert_same_params(p, q.detach(), rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # huge latents stay inside the ranges
        for t in lat.parameters():
            t.mul_(1e4)
    q = lat.natural().detach().validate()
    assert q.delta.abs().max() <= 0.1 and q.o.abs().max() <= 0.1
    p.delta[0, 0] = 0.5
    with pytest.raises(ValueError, match="delta"):
        LatentEPD.from_params(p)


# --------------------------------------------------------------------------------------
# the training loop


def test_loss_decreases_params_in_range_and_meta():
    model = gaussian()
    p = small(model, iterations=30, dtype=torch.float32)
    m = p.meta
    assert m["final_loss"] < 0.2 * m["initial_loss"]
    p.validate()
    for name in ("r", "weights", "delta", "o"):
        assert torch.isfinite(getattr(p, name)).all() and not getattr(p, name).requires_grad
    assert 0 < p.r.min() and p.r.max() < 1
    assert p.delta.abs().max() < m["delta_max"] and p.o.abs().max() < m["o_max"]
    start = EPDParams.init(p.sigmas, 2)
    for name in ("r", "weights", "delta", "o"):  # every parameter got gradients
        assert not torch.allclose(getattr(p, name), getattr(start, name)), name
    for key in ("teacher", "M", "iterations", "lr", "batch_size", "seed", "final_loss",
                "wall_time_s", "pool", "dtype"):
        assert key in m, key
    assert m["teacher"] == "ipndm" and m["M"] == 3 and m["iterations"] == 30
    assert p.nfe == 5 and p.num_points == 2 and not p.plugin and p.afs


def test_denoiser_weights_are_frozen_during_and_restored_after():
    class Affine(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = torch.nn.Parameter(torch.ones((), dtype=F64))
            self.flags = []

        def forward(self, x, sigma, **cond):
            self.flags.append(self.scale.requires_grad)
            return self.inner(x, sigma) * self.scale

    model = Affine(gaussian())
    small(model, iterations=3)
    assert model.scale.requires_grad and model.scale.grad is None
    assert model.flags and not any(model.flags)


def test_plugin_and_custom_loss():
    model = gaussian()
    calls = []

    def l1(student, teacher):
        calls.append(student.shape)
        return (student - teacher).abs().mean()

    p = small(model, iterations=4, plugin=True, loss=l1, pool=None)
    assert p.plugin and p.solver == "epd-ipndm" and p.meta["loss"].endswith("l1")
    assert len(calls) == 4 * 3 and calls[0] == (8,) + model.shape


def test_match_final_compares_only_the_final_state():
    """match="final": the loss sees the last student state only, and that loss is the
    distance of the initial parameters' sample to the teacher's final state."""
    model = gaussian()
    seen = []

    def recording(student, teacher):
        seen.append(teacher.clone())
        return (student - teacher).pow(2).mean()

    p = small(model, iterations=3, match="final", loss=recording, pool=None, lr=1e-12)
    assert len(seen) == 3 and p.meta["match"] == "final"
    # the teacher state it saw is the teacher's x(sigma_min) of the first batch
    x = training_noise(3, 0, range(8), (8,), dtype=F64) * p.sigmas[0]
    final = teacher_targets(model, x, p.sigmas, M=3)[-1]
    torch.testing.assert_close(seen[0], final)
    start = EPDParams.init(p.sigmas, 2)
    x0 = sample(model, x / float(p.sigmas[0]), solver="epd", params=start)
    assert p.meta["initial_loss"] == pytest.approx((x0 - final).pow(2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="match must be one of"):
        small(model, iterations=1, match="last")
    # and it trains: the final-state error falls
    q = small(model, iterations=30, match="final")
    assert q.meta["final_loss"] < 0.3 * q.meta["initial_loss"]


def test_sampler_is_differentiable_in_the_grid_and_matches_finite_differences():
    """A sigmas tensor that requires grad gives the same sample as the float grid, and
    its gradient matches central differences of the sample taken on perturbed grids."""
    from epd_kernels.solvers.epd import epd_sampler

    model = gaussian()
    g = torch.Generator().manual_seed(5)
    start = EPDParams.init(get_sigmas("polynomial", 3), 2)
    p = EPDParams(r=torch.rand(3, 2, generator=g, dtype=F64), weights=start.weights,
                  delta=0.05 * torch.rand(3, 2, generator=g, dtype=F64), o=start.o,
                  sigmas=start.sigmas, afs=True)
    x = make_noise(range(4), model.shape, dtype=F64) * 80.0
    w = make_noise([99], (4,) + model.shape, dtype=F64)[0]

    def objective(sig):
        q = EPDParams(r=p.r, weights=p.weights, delta=p.delta, o=p.o, sigmas=sig.detach())
        return (epd_sampler(model, x, sig, params=q) * w).sum()

    grid = p.sigmas.clone().requires_grad_(True)
    value = objective(grid)
    torch.testing.assert_close(value, objective(p.sigmas), rtol=1e-12, atol=1e-12)
    value.backward()
    assert grid.grad[1:-1].abs().min() > 0
    for i in (1, 2):
        eps = 1e-6 * float(p.sigmas[i])
        up, down = p.sigmas.clone(), p.sigmas.clone()
        up[i] += eps
        down[i] -= eps
        fd = (objective(up) - objective(down)) / (2 * eps)
        assert grid.grad[i].item() == pytest.approx(fd.item(), rel=1e-5), i


def test_learn_grid_moves_the_interior_sigmas_and_keeps_the_ends(tmp_path):
    model = mixture()
    start = get_sigmas("polynomial", 3)
    p = small(model, iterations=40, learn_grid=True, lr=0.1, shape=model.shape)
    assert p.meta["learn_grid"] and p.meta["match"] == "final"
    assert p.schedule["kind"] == "learned"
    assert p.sigmas[0] == start[0] and p.sigmas[-1] == start[-1]
    assert (p.sigmas[1:-1] - start[1:-1]).abs().max() > 1e-3 * start[1:-1].min()
    assert (torch.diff(p.sigmas) < 0).all()
    assert p.meta["final_loss"] < p.meta["initial_loss"]
    # the params sample on their own grid, and the file keeps it
    noise = make_noise(range(3), model.shape, dtype=F64)
    out = sample(model, noise, solver="epd", params=p)
    p.save(tmp_path / "p.safetensors")
    q = EPDParams.load(tmp_path / "p.safetensors")
    assert_same_params(p, q, rtol=0, atol=0)
    torch.testing.assert_close(sample(model, noise, solver="epd", params=q), out)
    # a fixed-grid latent has no grid parameter, and the refusals name the argument
    assert LatentEPD.from_params(p).g is None
    with pytest.raises(ValueError, match="learn_grid=True needs match='final'"):
        small(model, iterations=1, learn_grid=True, match="trajectory", shape=model.shape)
    with pytest.raises(ValueError, match="learn_grid is only available for method='epd'"):
        small(model, iterations=1, learn_grid=True, method="amed", num_points=None,
              shape=model.shape)


def test_learn_grid_resume_after_interrupt_matches(tmp_path):
    model = gaussian()
    ck = tmp_path / "grid.ckpt"
    ref = small(model, learn_grid=True)
    calls = {"n": 0}

    def interrupting(x, sigma, **cond):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 5 * 7 + 3:
                raise KeyboardInterrupt
        return model(x, sigma)

    with pytest.raises(KeyboardInterrupt):
        small(interrupting, learn_grid=True, checkpoint=ck, checkpoint_every=100)
    state = load_checkpoint(ck)
    assert state["iteration"] == 7 and state["settings"]["learn_grid"] is True
    resumed = small(model, learn_grid=True, checkpoint=ck, checkpoint_every=100)
    assert_same_params(resumed, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="learn_grid"):
        small(model, checkpoint=ck)  # a fixed-grid call refuses the learned-grid checkpoint


class NaNOnGradCalls(torch.nn.Module):
    """Returns NaN on the student's (grad-enabled) calls numbered in `bad`."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad, self.count = inner, bad, 0

    def forward(self, x, sigma, **cond):
        out = self.inner(x, sigma)
        if torch.is_grad_enabled():
            self.count += 1
            if self.count in self.bad:
                return out * float("nan")
        return out


def test_nonfinite_step_is_skipped_with_a_warning():
    model = gaussian()
    # NFE 5 with AFS: 2 main-point + 3 branch calls per iteration; break iteration 2.
    bad = NaNOnGradCalls(model, bad=set(range(11, 16)))
    with pytest.warns(RuntimeWarning, match="iteration 2: non-finite"):
        p = small(bad, iterations=20)
    assert p.meta["skipped_steps"] == 1
    p.validate()
    ok = small(model, iterations=20)
    assert not torch.allclose(p.r, ok.r)  # the skipped step changed the path ...
    assert p.meta["final_loss"] < 0.5 * p.meta["initial_loss"]  # ... but training went on


def test_persistent_nonfinite_raises_after_max_failures():
    bad = NaNOnGradCalls(gaussian(), bad=set(range(1, 10 ** 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="5 consecutive iterations"):
            small(bad, iterations=20)


# --------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_resume_finished_and_mismatch(tmp_path):
    model = gaussian()
    ck = tmp_path / "run.ckpt"
    ref = small(model)
    p = small(model, checkpoint=ck, checkpoint_every=5)
    assert_same_params(p, ref, rtol=0, atol=0)
    state = load_checkpoint(ck)
    assert state["iteration"] == SMALL["iterations"] and len(state["losses"]) == SMALL["iterations"]
    # a finished checkpoint returns at once, without calling the denoiser
    calls = NaNOnGradCalls(model, bad=set())
    again = small(calls, checkpoint=ck, checkpoint_every=5)
    assert calls.count == 0
    assert_same_params(again, ref, rtol=0, atol=0)
    assert again.meta["final_loss"] == ref.meta["final_loss"]
    with pytest.raises(ValueError, match=r"different settings[\s\S]*lr: checkpoint 0.05, this call 0.1"):
        small(model, checkpoint=ck, lr=0.1)
    with pytest.raises(ValueError, match="iterations"):
        small(model, checkpoint=ck, iterations=20)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_keyboard_interrupt_writes_checkpoint_and_resume_matches(tmp_path):
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
    ck = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        small(Interrupt(model, at=5 * 7 + 3), checkpoint=ck, checkpoint_every=100)
    assert load_checkpoint(ck)["iteration"] == 7  # the 8th iteration was interrupted
    resumed = small(Interrupt(model, at=-1), checkpoint=ck, checkpoint_every=100)
    assert_same_params(resumed, small(model), rtol=1e-12, atol=1e-12)


def _worker_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    return env


def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    """A real process killed with SIGKILL at a random moment after its first checkpoint,
    then rerun, ends where an uninterrupted run ends."""
    ck, out = tmp_path / "run.ckpt", tmp_path / "out.safetensors"
    cmd = [sys.executable, str(HERE / "distill_helpers" / "kill_worker.py"), str(ck), str(out)]
    proc = subprocess.Popen(cmd + ["0.02"], env=_worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ck.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    time.sleep(float(torch.rand(()).item()) * 0.15)  # a random moment after the first one
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(ck)["iteration"]
    assert 1 <= done < SMALL["iterations"] and not out.exists()
    # rerun the same call (in this process: a new process would only add start-up time)
    model = gaussian()
    resumed = small(Slow(model, 0.0), checkpoint=ck, checkpoint_every=1)
    assert load_checkpoint(ck)["iteration"] == SMALL["iterations"]
    assert_same_params(resumed, small(model), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# quality on held-out noise


def test_distilled_epd_beats_euler_on_mixture_heldout():
    """NFE 5 on the 64-dim Gaussian mixture: RMSE to the high-accuracy ODE solution on
    noise the distillation never saw (training rows come from other seeds)."""
    model = mixture()
    p = distill(model.to(torch.float32), nfe=5, shape=model.shape, iterations=150,
                pool=512, seed=0, progress=False)
    model.to(F64)
    noise = make_noise(range(10 ** 6, 10 ** 6 + 192), model.shape, dtype=F64)
    ref = model.reference_solution(noise * 80.0, 80.0, 0.002, rtol=1e-9, atol=1e-9)

    def rmse(x):
        return (x - ref).pow(2).mean().sqrt().item()

    epd = rmse(sample(model, noise, solver="epd", params=p))
    euler = rmse(sample(model, noise, solver="euler", nfe=5))
    assert epd < 0.85 * euler, (epd, euler)


def test_schedule_auto_is_the_schedule_search():
    """``distill(schedule="auto")`` gives the same (deterministic) params with the budget's
    M as with the fixed default, on the grid the search chose, one of the candidates."""
    from epd_kernels.distill.schedule_search import DEFAULT_CANDIDATES

    model = gaussian(8)
    kw = dict(nfe=5, shape=(8,), iterations=6, batch_size=8, pool=64, progress=False,
              val_size=16, search_iterations=3)
    p = distill(model, schedule="auto", compare=False, **kw)
    q = distill(model, schedule="auto", compare=False, time_budget_s=None, **kw)
    assert_same_params(p, q, rtol=0, atol=0)
    report = p.meta["schedule_search"]
    from epd_kernels.solvers.registry import resolve_sigmas as _resolve_sigmas

    grids = [_resolve_sigmas(c, 3) for c in DEFAULT_CANDIDATES.values()]
    chosen = _resolve_sigmas(DEFAULT_CANDIDATES[report["chosen"]], 3).to(p.sigmas)
    if report["final"]["kept"] in ("search", "fixed"):   # the searched grid, else learned
        assert torch.allclose(p.sigmas, chosen), (p.sigmas, report)
    else:   # learned from the chosen grid, or from the neutral rho-7 start
        start = "poly7" if report["final"]["kept"] == "learned_start" else report["chosen"]
        assert p.schedule == {"kind": "learned", "start": DEFAULT_CANDIDATES[start]}
        assert p.sigmas[0] == chosen[0] and p.sigmas[-1] == chosen[-1]
    q2 = distill(model, schedule="auto", learn_grid=False, compare=False, **kw)
    assert any(torch.allclose(q2.sigmas, g.to(p.sigmas)) for g in grids), (q2.sigmas, report)
    with pytest.raises(ValueError, match="init"):
        distill(model, schedule="auto", init=p, **kw)


def test_unknown_keywords_are_refused_not_passed_as_conditioning():
    """Unknown keywords of `distill` travel to the denoiser as conditioning; a keyword of a
    neighbouring function, one the denoiser cannot take, or a grid-search option without
    schedule='auto' is refused before any work, with the name in the message."""
    model = gaussian(8)

    def plain(x, sigma):   # no conditioning at all
        return model(x, sigma)

    kw = dict(nfe=3, shape=(8,), iterations=1, batch_size=4, pool=8, progress=False)
    with pytest.raises(ValueError, match="teacher_factor"):
        distill(model, teacher_factor=10, **kw)
    with pytest.raises(ValueError, match=r"\['class_lables'\].*denoiser"):
        distill(plain, class_lables=torch.zeros(4), **kw)
    with pytest.raises(ValueError, match="val_size.*only apply with schedule='auto'"):
        distill(model, val_size=16, **kw)

    seen = []

    def denoiser(x, sigma, *, scale=1.0):   # takes one conditioning keyword
        seen.append(scale)
        return model(x, sigma) * scale

    p = distill(denoiser, scale=1.0, **kw)
    assert p.nfe == 3 and seen and set(seen) == {1.0}
    with pytest.raises(ValueError, match="scael"):
        distill(denoiser, scael=1.0, **kw)
