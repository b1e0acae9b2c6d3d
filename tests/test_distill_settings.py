"""distill's settings, budget, held-out comparison and checkpoint hygiene
(epd_kernels/distill/settings.py, budget.py, verdict.py, checkpoint.py), and the CI check
that the defaults beat every baseline on a model they were not chosen on."""
from __future__ import annotations

import importlib
import math
import os
import warnings

import pytest
import torch

from distill_helpers.problems import F64, gaussian, skewed_mixture
from epd_kernels import EPDParams, make_noise, sample
from epd_kernels.distill import DistillSettings, distill
from epd_kernels.distill.checkpoint import remove_stale_temporaries, save_checkpoint
from epd_kernels.distill.verdict import BASELINES, _verdict, draw_errors, outlier_draws
from epd_kernels.fileio import temp_prefix

pytestmark = [pytest.mark.filterwarnings("ignore:epd_kernels. using the plain-PyTorch reference"),
              pytest.mark.usefixtures("one_thread")]

TINY = dict(nfe=5, shape=(8,), iterations=8, batch_size=8, pool=32, M=2, progress=False,
            dtype=F64)


def test_package_is_a_module_and_callable():
    import epd_kernels
    import epd_kernels.distill as m

    assert type(m).__name__ == "_CallableModule" and m.distill.__module__.endswith(".api")
    assert epd_kernels.distill is m
    p = epd_kernels.distill(gaussian(), compare=False, **TINY)   # the README's call
    assert isinstance(p, EPDParams)
    assert importlib.import_module("epd_kernels.distill.loop").train is m.train


@pytest.mark.parametrize("bad, match", [
    (dict(iterations=0), "iterations must be an integer >= 1"),
    (dict(pool=0), "pool must be an integer"),
    (dict(lr=-1.0), "lr must be a finite number > 0"),
    (dict(time_budget_s=0), "time_budget_s must be"),
    (dict(teacher="rk4"), "teacher must be one of"),
    (dict(method="ddim"), "method must be one of"),
    (dict(compare=1), "compare must be True or False"),
    (dict(shape=(0, 3)), "shape must be"),
    (dict(dtype=torch.int32), "dtype must be a floating"),
    (dict(val_size=16), r"\['val_size'\] only apply with schedule='auto'"),
    (dict(iteration=5), r"iteration=.*did you mean iterations="),
    (dict(batchsize=5), r"did you mean batch_size="),
    (dict(teacher_factor=3), "teacher_factor"),
])
def test_bad_settings_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        distill(gaussian(), **dict(TINY, **bad))


def test_settings_object_and_keywords_agree():
    s = DistillSettings(**TINY, compare=False)
    a = distill(gaussian(), settings=s)
    b = distill(gaussian(), compare=False, **TINY)
    for n in ("r", "weights", "delta", "o"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
    c = distill(gaussian(), settings=s, iterations=2)     # keywords override the object
    assert c.meta["iterations"] == 2 and s.iterations == 8


def test_conditioning_named_by_the_denoiser_is_not_mistaken_for_a_setting():
    model = gaussian()

    def denoiser(x, sigma, *, iteration=0):   # a parameter one edit away from a setting
        return model(x, sigma)

    p = distill(denoiser, iteration=3, compare=False, **TINY)
    assert p.meta["iterations"] == TINY["iterations"]


def test_budget_sizes_the_run_and_records_it():
    """Left at "auto", M, pool, iterations and batch follow the budget: a tiny budget
    gives a smaller run than a large one, both recorded, and the fixed defaults apply
    without a budget."""
    kw = dict(nfe=5, shape=(8,), progress=False, compare=False, schedule="polynomial")
    small = distill(gaussian(), time_budget_s=0.2, **kw).meta["budget"]
    big = distill(gaussian(), time_budget_s=600, iterations=5, **kw).meta["budget"]
    assert set(small["chosen"]) == {"iterations", "pool", "M", "batch_size"}
    assert small["measured"]["iteration"] > 0 and small["estimated_s"] > 0
    assert big["chosen"]["pool"] == 4096 and big["chosen"]["M"] == 15   # the caps
    assert small["chosen"]["pool"] * (small["chosen"]["M"] + 1) < 4096 * 16
    fixed = distill(gaussian(), time_budget_s=None, iterations=5, **kw)
    assert "budget" not in fixed.meta and fixed.meta["pool"] == 4096 and fixed.meta["M"] == 15


def test_comparison_is_recorded_checked_against_an_oracle_and_saved(tmp_path):
    """meta["comparison"] holds the held-out RMSE of the result and of every baseline
    that meets the NFE; recomputed here against the closed-form ODE solution on the
    same seeds, they agree to the reference's accuracy; the params file keeps it."""
    model = gaussian()
    p = distill(model, **dict(TINY, iterations=40))
    c = p.meta["comparison"]
    assert set(c["baselines"]) == set(BASELINES)          # NFE 5: heun and dpm2 too
    assert c["best_baseline"] == min(c["baselines"], key=c["baselines"].get)
    assert c["ratio"] == pytest.approx(c["rmse"] / c["baselines"][c["best_baseline"]])
    lo, hi = c["seeds"]
    noise = make_noise(range(lo, hi + 1), (8,), dtype=F64)
    exact = model.exact_solution(noise * 80.0, 80.0, 0.002)
    rmse = lambda x: (x - exact).pow(2).mean().sqrt().item()   # noqa: E731
    assert rmse(sample(model, noise, solver="epd", params=p)) == pytest.approx(c["rmse"], abs=2e-4)
    for name in ("euler", "ipndm", "heun"):
        assert rmse(sample(model, noise, solver=name, nfe=5)) == pytest.approx(
            c["baselines"][name], rel=1e-3, abs=2e-4)
    p.save(tmp_path / "p.safetensors")
    assert EPDParams.load(tmp_path / "p.safetensors").meta["comparison"] == c
    assert distill(model, **dict(TINY, nfe=4, afs=False))  # even NFE: heun/dpm2 valid


def test_a_lost_comparison_warns_and_the_better_start_is_kept():
    """A learning rate that wrecks the parameters: the trained params lose to their start,
    which is returned (kept = "init"), and a UserWarning names the winning baseline."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = distill(gaussian(), **dict(TINY, nfe=3, iterations=3, lr=50.0))
    c = p.meta["comparison"]
    assert c["kept"] == "init" and c["rmse"] == c["init_rmse"] <= c["trained_rmse"]
    start = EPDParams.init(p.sigmas, 2)
    for n in ("r", "weights", "delta", "o"):
        torch.testing.assert_close(getattr(p, n), getattr(start, n).to(getattr(p, n)))
    text = " ".join(str(w.message) for w in caught if w.category is UserWarning)
    assert "returning the start" in text
    if c["ratio"] >= 1:
        assert f"baseline {c['best_baseline']!r}" in text


def test_comparison_records_outlier_draws_and_a_loss_they_carry_is_named():
    """`_verdict` on hand-made per-draw errors: the result is exact on 97 of 100 draws and
    far off on 3 (a draw ending in another mode), the baseline is uniformly 0.1 off. The
    result loses on RMSE; the record counts the 3 outliers with their share worked out by
    hand, and the warning names them; a loss spread over every draw does not."""
    from types import SimpleNamespace

    params = EPDParams.init(torch.tensor([80.0, 2.0, 0.002], dtype=F64), 2)
    errs = torch.tensor([1e-6] * 97 + [4.0, 9.0, 16.0], dtype=F64)    # squared, per draw
    base = torch.full((100,), 0.01, dtype=F64)
    s = SimpleNamespace(nfe=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rec = _verdict(params, None, s, {"euler": base, "trained": errs}, ["euler"], 100, "")
    t = rec["outlier_draws"]["result"]
    assert t["outliers"] == 3 and t["draws"] == 100
    assert t["share"] == pytest.approx(29 / (29 + 97e-6), rel=1e-12)
    assert t["rmse_without"] == pytest.approx(1e-3, rel=1e-12)
    assert rec["outlier_draws"]["best_baseline"]["outliers"] == 0
    assert rec["rmse"] == pytest.approx(math.sqrt((29 + 97e-6) / 100), rel=1e-12)
    text = " ".join(str(w.message) for w in caught)
    assert "lost to the baseline 'euler'" in text and "3 of 100 draws carry 100%" in text
    spread = torch.full((100,), 0.04, dtype=F64)                     # loses on every draw
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _verdict(params, None, s, {"euler": base, "trained": spread}, ["euler"], 100, "")
    text = " ".join(str(w.message) for w in caught)
    assert "lost to the baseline" in text and "draws carry" not in text
    x = torch.zeros(3, 2, 2, dtype=F64)
    x[1] = 2.0
    x[2, 0, 0] = math.inf
    torch.testing.assert_close(draw_errors(x, torch.zeros_like(x)),
                               torch.tensor([0.0, 4.0, math.inf], dtype=F64))
    assert outlier_draws(torch.zeros(4, dtype=F64))["outliers"] == 0


def test_stale_temporaries_only_the_checkpoints_own(tmp_path):
    ck = tmp_path / "run.ckpt"
    prefix = temp_prefix(ck)
    own = tmp_path / (prefix + "abc_12xy")
    others = [tmp_path / ".tmp-other", tmp_path / (prefix + "short"),
              tmp_path / (prefix + "abcdefgh.keep"), tmp_path / ".tmp-run.ckpt"]
    for f in [own] + others:
        f.write_bytes(b"x")
    folder = tmp_path / (prefix + "dir_0000")
    folder.mkdir()
    assert remove_stale_temporaries(ck) == 1
    assert not own.exists() and all(f.exists() for f in others) and folder.is_dir()
    before = set(os.listdir(tmp_path))
    save_checkpoint(ck, {"settings": {}, "iteration": 0})   # leaves no temporary behind
    assert ck.is_file() and set(os.listdir(tmp_path)) == before | {ck.name}


#: `budget.measure_cost` of `skewed_mixture` (float32) on the 2-core development CPU with
#: one thread, unloaded. The CI test plans with these figures so that its settings do not
#: depend on how busy the CI machine is (measured costs under load vary 4-15x).
SKEWED_COST = {"call_chunk": 1.8e-4, "chunk": 256, "overhead": 1.9e-4, "batch": 64,
               "iteration": 6e-3, "measure_s": 0.1}


def test_defaults_beat_every_baseline_on_an_unseen_mixture(monkeypatch):
    """CI: default distill (a budget of 30 s) at NFE 5 on a mixture with unequal weights and
    per-dimension scales beats every baseline on held-out noise, against the DOP853 ODE
    solution (an independent oracle) on seeds neither training nor the comparison used."""
    from epd_kernels.distill import budget

    monkeypatch.setattr(budget, "measure_cost", lambda *a: dict(SKEWED_COST))
    model = skewed_mixture()
    p = distill(model.to(torch.float32), nfe=5, shape=model.shape, time_budget_s=30,
                progress=False)
    assert p.meta["budget"]["schedule"].startswith("auto")   # the search fits 30 s here
    model.to(F64)
    noise = make_noise(range(10 ** 7, 10 ** 7 + 256), model.shape, dtype=F64)
    ref = model.reference_solution(noise * 80.0, 80.0, 0.002, rtol=1e-9, atol=1e-9)
    rmse = lambda x: (x - ref).pow(2).mean().sqrt().item()   # noqa: E731
    epd = rmse(sample(model, noise, solver="epd", params=p))
    base = {n: rmse(sample(model, noise, solver=n, nfe=5)) for n in BASELINES}
    assert all(math.isfinite(v) for v in base.values())
    assert epd < min(base.values()), (epd, base, p.meta.get("budget"))
    assert p.meta["comparison"]["ratio"] < 1


def test_budget_chosen_settings_resume_from_the_checkpoint(tmp_path, monkeypatch):
    """With a checkpoint, the settings the budget chose are those of the checkpoint when
    it exists: a resumed call continues the same run even if the budget (the machine's
    speed) would now choose otherwise."""
    from epd_kernels.distill import budget

    ck = tmp_path / "run.ckpt"
    kw = dict(nfe=3, shape=(8,), progress=False, compare=False, checkpoint=ck, time_budget_s=5)
    first = distill(gaussian(), **kw)
    chosen = first.meta["budget"]["chosen"]
    monkeypatch.setattr(budget, "measure_cost", lambda *a: pytest.fail("measured again"))
    again = distill(gaussian(), **kw)
    assert again.meta["budget"]["from_checkpoint"] and again.meta["budget"]["chosen"] == chosen
    for n in ("r", "weights", "delta", "o"):
        assert torch.equal(getattr(again, n), getattr(first, n)), n


def test_budget_counts_the_search_final_runs():
    """With ``schedule="auto"`` the plan divides training among C / 3 + 3 runs for EPD
    with a learned grid (fixed grid, grid learned from it, grid learned from the neutral
    start) and C / 3 + 2 otherwise: on a budget that binds, iterations in that ratio."""
    from epd_kernels.distill import budget
    from epd_kernels.distill.settings import DistillSettings

    cost = {"call_chunk": 1e-3, "chunk": 256, "overhead": 0.0, "batch": 64, "iteration": 0.2,
            "small_batch": 16, "iteration_small": 0.05, "measure_s": 0.0}
    its = {}
    for name, kw in (("epd", {}), ("fixed", {"learn_grid": False}),
                     ("amed", {"method": "amed", "num_points": None})):
        s = DistillSettings(nfe=5, shape=(4,), schedule="auto", time_budget_s=60,
                            compare=False, **kw)
        its[name] = budget.plan(s, cost, 5)[0].iterations
    assert 40 < its["epd"] < its["fixed"] == its["amed"] < 300   # the budget binds
    assert its["epd"] / its["fixed"] == pytest.approx((5 / 3 + 2) / (5 / 3 + 3), abs=0.01)
