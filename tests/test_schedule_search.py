"""Automatic grid choice for distilled EPD (epd_kernels/distill/schedule_search.py): the
winner is the candidate with the lowest validation RMSE (checked against the closed-form
ODE solution), validation noise never overlaps the training noise, ties go to the first
candidate, and bad arguments are refused by name."""
from __future__ import annotations

import math

import pytest
import torch

from distill_helpers.problems import F64, gaussian
from epd_kernels import get_sigmas, make_noise, sample
from epd_kernels.distill import batches as batches_mod
from epd_kernels.distill import distill
from epd_kernels.distill import row_seed, schedule_search
from epd_kernels.distill.schedule_search import (DEFAULT_CANDIDATES, training_seeds,
                                                 validation_seeds)

pytestmark = [pytest.mark.filterwarnings("ignore:epd_kernels. using the plain-PyTorch reference"),
              pytest.mark.usefixtures("one_thread")]

#: A tiny, fast search: 8-dim Gaussian, float64, a few iterations.
TINY = dict(nfe=5, shape=(8,), iterations=6, M=3, batch_size=8, pool=64, lr=0.05, seed=1,
            dtype=F64, val_size=48, reference_steps=24)
#: A grid that wastes two of its three steps above sigma = 70: clearly the worst.
BAD_GRID = [80.0, 79.0, 78.0, 0.002]
CANDS = {"poly7": DEFAULT_CANDIDATES["poly7"], "bad": BAD_GRID, "time-uniform": "time-uniform"}


def search(model, **kw):
    """``distill(schedule="auto")`` with the fixed defaults and no comparison, and the
    search's full report (every candidate's params, ``score``): ``(params, report)``."""
    reports = []
    real = schedule_search._auto

    def spy(*args):
        out = real(*args)
        reports.append(out[1])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schedule_search, "_auto", spy)
        params = distill(model, **{"schedule": "auto", "time_budget_s": None, "compare": False,
                                   "progress": False, **kw})
    return params, reports[0]


def choose(model, **kw):
    """The search alone: full-length candidate runs, the winner is the result."""
    return search(model, **{"search_iterations": None, **kw})


def exact_val_rmse(model, params, report):
    """Validation RMSE of `params` against the closed-form ODE solution (the oracle)."""
    lo, hi = report["validation"]["seeds"]
    noise = make_noise(range(lo, hi + 1), model.shape, dtype=F64)
    x = sample(model, noise, solver=params.solver, nfe=None, params=params)
    ref = model.exact_solution(noise * 80.0, 80.0, 0.002)
    return (x - ref).pow(2).mean().sqrt().item()


def test_choice_is_the_lowest_validation_rmse():
    model = gaussian()
    params, report = choose(model, candidates=CANDS, **TINY)
    cands = report["candidates"]
    assert set(cands) == set(CANDS)
    vals = {n: c["val_rmse"] for n, c in cands.items()}
    assert report["chosen"] == min(vals, key=vals.get)
    assert params is report["params"] is cands[report["chosen"]]["params"]
    assert report["chosen"] != "bad"
    # the grid travels inside the params
    torch.testing.assert_close(report["params"].sigmas,
                               torch.as_tensor(cands[report["chosen"]]["sigmas"], dtype=F64))
    # Oracle: the reported validation RMSE (against the UniPC reference) is the RMSE
    # against the exact solution up to the reference's own error (triangle inequality:
    # | |a - ref| - |a - exact| | <= |ref - exact|), and ranks the same.
    exact = {n: exact_val_rmse(model, c["params"], report) for n, c in cands.items()}
    lo, hi = report["validation"]["seeds"]
    noise = make_noise(range(lo, hi + 1), model.shape, dtype=F64)
    ref_err = (sample(model, noise, solver="unipc", nfe=TINY["reference_steps"])
               - model.exact_solution(noise * 80.0, 80.0, 0.002)).pow(2).mean().sqrt().item()
    assert ref_err < 0.01
    for n in cands:
        assert abs(vals[n] - exact[n]) <= ref_err * (1 + 1e-6) + 1e-12, (n, vals[n], exact[n])
    assert min(exact, key=exact.get) == report["chosen"]
    assert exact["bad"] > 2 * exact[report["chosen"]]


def test_validation_noise_is_disjoint_from_training_noise(monkeypatch):
    """Spy on every training-noise draw of the candidate runs and on the validation draw."""
    drawn_train, drawn_val = set(), []
    real_training_noise = batches_mod.training_noise
    real_make_noise = schedule_search.make_noise

    def spy_training_noise(seed, iteration, rows, *a, **k):
        drawn_train.update(row_seed(seed, iteration, j) for j in rows)
        return real_training_noise(seed, iteration, rows, *a, **k)

    def spy_make_noise(seeds, *a, **k):
        drawn_val.append(list(seeds))
        return real_make_noise(seeds, *a, **k)

    monkeypatch.setattr(batches_mod, "training_noise", spy_training_noise)
    monkeypatch.setattr(schedule_search, "make_noise", spy_make_noise)
    kw = dict(TINY, pool=None, iterations=4)   # fresh noise every iteration
    _, report = choose(gaussian(), candidates=["poly7", "logsnr"], **kw)
    assert len(drawn_val) == 1 and len(drawn_val[0]) == kw["val_size"]
    assert drawn_train and not (drawn_train & set(drawn_val[0]))
    assert drawn_train == training_seeds(kw["seed"], kw["iterations"], kw["batch_size"], None)
    lo, hi = report["validation"]["seeds"]
    assert list(range(lo, hi + 1)) == drawn_val[0] == list(validation_seeds(kw["val_size"]))
    # and with the default pool: the pool's seeds
    pool_seeds = training_seeds(0, 300, 32, 1024)
    assert pool_seeds == {row_seed(0, -1, j) for j in range(1024)}
    assert not pool_seeds & set(validation_seeds(4096))


def test_a_validation_training_clash_is_refused(monkeypatch):
    train = sorted(training_seeds(TINY["seed"], TINY["iterations"], TINY["batch_size"],
                                  TINY["pool"]))
    monkeypatch.setattr(schedule_search, "validation_seeds", lambda n, s=0: train[:n])
    with pytest.raises(ValueError, match="also training seeds"):
        choose(gaussian(), candidates=["poly7"], **TINY)


def test_tie_goes_to_the_first_candidate():
    same = {"first": "time-uniform", "second": "time-uniform"}
    params, report = choose(gaussian(), candidates=same, **TINY)
    c = report["candidates"]
    assert c["first"]["val_rmse"] == c["second"]["val_rmse"]  # deterministic runs
    assert report["chosen"] == "first" and params is c["first"]["params"]


def test_schedule_auto_continues_the_winner_from_its_search_params(monkeypatch):
    model = gaussian()
    starts = []
    real = schedule_search.train

    def spy(denoiser, s, cond):
        starts.append(s.init)
        return real(denoiser, s, cond)

    monkeypatch.setattr(schedule_search, "train", spy)
    kw = dict(TINY, iterations=10, learn_grid=False)
    params, report = search(model, candidates=CANDS, search_iterations=4, **kw)
    assert report["continued"] and report["search_iterations"] == 4
    final = report["final"]
    assert final["learn_grid"] is False and final["kept"] in ("search", "fixed")
    chosen = report["candidates"][report["chosen"]]
    assert chosen["params"].meta["iterations"] == 4
    # the final run starts from the winner's search parameters and runs `iterations`; the
    # better of the two on validation is returned
    assert starts[:3] == [None] * 3 and starts[3] is chosen["params"] and len(starts) == 4
    assert final["search_val_rmse"] == chosen["val_rmse"]
    torch.testing.assert_close(params.sigmas, torch.as_tensor(chosen["sigmas"], dtype=F64))
    if final["kept"] == "fixed":
        assert params.meta["iterations"] == 10 and final["fixed_val_rmse"] < chosen["val_rmse"]
        assert not torch.equal(params.weights, chosen["params"].weights)  # trained further
    else:
        assert params is chosen["params"] and final["fixed_val_rmse"] >= chosen["val_rmse"]
    assert params.meta["schedule_search"]["chosen"] == report["chosen"]
    # full-length search: the winner's run is the result, nothing is re-run
    p2, r2 = search(model, candidates=["poly7"], search_iterations=None, **TINY)
    assert not r2["continued"] and p2 is r2["candidates"]["poly7"]["params"]
    assert p2.meta["iterations"] == TINY["iterations"]


def test_final_run_reuses_the_winners_teacher_pool(monkeypatch):
    """The teacher runs once per candidate grid, not again for the final run, and the
    final run trains on exactly the targets a fresh pool would give (same result)."""
    from epd_kernels.distill.batches import TeacherBatches

    model = gaussian()
    fills = []
    real = TeacherBatches._compute_pool

    def spy(self, cond, scale):
        fills.append(tuple(self.sigmas.tolist()))
        return real(self, cond, scale)

    monkeypatch.setattr(TeacherBatches, "_compute_pool", spy)
    kw = dict(TINY, iterations=10)
    search(model, candidates=CANDS, search_iterations=4, **kw)  # learns the grid too
    assert len(fills) == len(CANDS) and len(set(fills)) == len(CANDS)
    fills.clear()
    kw["learn_grid"] = False
    runs = []
    real_train = schedule_search.train
    monkeypatch.setattr(schedule_search, "train",
                        lambda *a: runs.append(real_train(*a)) or runs[-1])
    _, report = search(model, candidates=CANDS, search_iterations=4, **kw)
    params = runs[-1]                                  # the final run (kept or not)
    assert len(fills) == len(CANDS) and len(set(fills)) == len(CANDS)
    # the same final run from scratch (its own teacher pool) gives the same parameters
    fills.clear()
    again = distill(model, schedule=CANDS[report["chosen"]],
                    init=report["candidates"][report["chosen"]]["params"], compare=False,
                    **{k: v for k, v in kw.items()
                       if k not in ("val_size", "reference_steps", "learn_grid")})
    assert len(fills) == 1
    for n in ("r", "weights", "delta", "o"):
        torch.testing.assert_close(getattr(again, n), getattr(params, n), rtol=0, atol=0)


def test_other_methods_are_sampled_with_their_own_solver():
    """distill(method="amed") gives AMEDParams: the candidates are scored with AMED."""
    for plugin, solver in ((False, "amed"), (True, "amed-ipndm")):
        _, report = choose(gaussian(), method="amed", plugin=plugin,
                                    candidates=["poly7", "logsnr"], **TINY)
        vals = {n: c["val_rmse"] for n, c in report["candidates"].items()}
        assert report["params"].solver == solver
        assert report["chosen"] == min(vals, key=vals.get)
        for c in report["candidates"].values():
            exact = exact_val_rmse(gaussian(), c["params"], report)
            assert math.isclose(c["val_rmse"], exact, rel_tol=0.05, abs_tol=1e-3)


@pytest.mark.parametrize("pool", [None, 24])
def test_per_row_conditioning_is_cycled_for_validation(pool):
    """Without val_cond, labels per training row (per batch row with fresh noise, per pool
    entry with a pool) give validation draw i the label of row i mod rows."""
    from epd_kernels.distill.schedule_search import _split_cond

    rows = TINY["batch_size"] if pool is None else pool
    labels = torch.arange(rows) % 3
    other = torch.tensor([7.0])
    got = _split_cond({"class_labels": labels, "scale": other}, None,
                      (TINY["batch_size"], pool), 50)
    assert torch.equal(got["class_labels"], torch.arange(50) % rows % 3)
    assert got["scale"] is other
    given = {"class_labels": torch.ones(50, dtype=torch.long)}
    assert _split_cond({"class_labels": labels}, given, (rows,), 50) == given
    # and the search runs with such labels
    _, report = choose(gaussian(), candidates=["poly7"], class_labels=labels,
                                **dict(TINY, pool=pool))
    assert report["chosen"] == "poly7"


@pytest.mark.parametrize("bad, match", [
    (dict(nfe=4), "nfe=4"),                                  # EPD with AFS: odd budgets
    (dict(nfe=0), "nfe"),
    (dict(candidates={}), "candidates must not be empty"),
    (dict(candidates=["nope"]), r"candidates\['nope'\]"),
    (dict(candidates={"x": [1.0, 2.0, 3.0, 4.0]}), r"candidates\['x'\]"),
    (dict(candidates=[{"kind": "logsnr"}]), "list must hold names"),
    (dict(candidates=3), "candidates must be"),
    (dict(val_size=0), "val_size"),
    (dict(val_seed=-1), "val_seed"),
    (dict(reference_steps=0), "reference_steps"),
    (dict(search_iterations=0), "search_iterations"),
    (dict(chunk=0), "chunk"),
    (dict(reference_solver="nope"), "reference_solver"),
    (dict(schedule="logsnr"), "schedule"),
    (dict(init=object()), "init"),
    (dict(checkpoint="x.pt"), "checkpoint"),
    (dict(val_cond=[1]), "val_cond"),
])
def test_bad_arguments_are_refused_by_name(bad, match):
    kw = dict(TINY, candidates=["poly7"])
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        choose(gaussian(), **kw)


def test_schedule_auto_refuses_bad_final_iterations():
    with pytest.raises(ValueError, match="final_iterations"):
        search(gaussian(), candidates=["poly7"], final_iterations=0, **TINY)
    with pytest.raises(ValueError, match="needs a final run"):
        search(gaussian(), candidates=["poly7"], search_iterations=None,
                     checkpoint="x.pt", **TINY)


def test_schedule_auto_checkpoint_is_the_final_runs_and_resumes(tmp_path):
    ck = tmp_path / "auto.ckpt"
    kw = dict(TINY, iterations=8, candidates=["poly7", "time-uniform"], search_iterations=3)
    p1, _ = search(gaussian(), checkpoint=str(ck), **kw)
    assert ck.is_file()
    p2, _ = search(gaussian(), checkpoint=str(ck), **kw)  # finished: returns at once
    p3, _ = search(gaussian(), **kw)                       # no checkpoint at all
    for name in ("r", "weights", "delta", "o", "sigmas"):
        assert torch.equal(getattr(p1, name), getattr(p2, name)), name
        assert torch.equal(getattr(p1, name), getattr(p3, name)), name


def test_default_candidates_are_valid_grids():
    for steps in (1, 2, 3, 5):
        for name, spec in DEFAULT_CANDIDATES.items():
            kind = spec if isinstance(spec, str) else spec["kind"]
            extra = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "kind"}
            s = get_sigmas(kind, steps, **extra)
            assert s.numel() == steps + 1 and s[0] == 80.0 and s[-1] == 0.002, name


def test_fast_settings_are_accepted_with_and_without_the_search():
    """FAST_SETTINGS is a set of keyword arguments `distill` takes as they are, with or
    without the search (a renamed option would otherwise fail only in the benchmark), and
    the search records its iteration count."""
    from epd_kernels.distill.schedule_search import FAST_SETTINGS, SEARCH_OPTIONS

    model = gaussian()
    p = distill(model, nfe=3, shape=(8,), schedule="auto", progress=False, **FAST_SETTINGS)
    assert p.meta["schedule_search"]["validation"]["size"] == FAST_SETTINGS["val_size"]
    assert p.meta["schedule_search"]["search_iterations"] == FAST_SETTINGS["search_iterations"]
    # the search winner or the final runs (fixed grid, then learned grid), each its length
    lengths = {"search": FAST_SETTINGS["search_iterations"],
               "fixed": FAST_SETTINGS["final_iterations"],
               "learned": FAST_SETTINGS["grid_iterations"]}
    assert p.meta["iterations"] == lengths[p.meta["schedule_search"]["final"]["kept"]]
    assert p.meta["M"] == FAST_SETTINGS["M"] and p.meta["pool"] == FAST_SETTINGS["pool"]
    q = distill(model, nfe=3, shape=(8,), progress=False,
                **{k: v for k, v in FAST_SETTINGS.items() if k not in SEARCH_OPTIONS})
    assert q.meta["iterations"] == FAST_SETTINGS["iterations"]


def test_schedule_auto_learns_the_grid_from_the_fixed_run_and_keeps_the_better(monkeypatch):
    """Default for EPD: after the fixed-grid final run, a run from it that learns the grid
    (final-state loss, lr * LEARN_GRID_LR_SCALE) and one that learns it from neutral params
    on the rho-7 grid (lr as given); the lowest validation RMSE is kept, and the recorded
    scores are the validation RMSEs of the results."""
    model = gaussian()
    calls = []
    real = schedule_search.train

    def spy(denoiser, s, cond):
        out = real(denoiser, s, cond)
        calls.append((vars(s), out))
        return out

    monkeypatch.setattr(schedule_search, "train", spy)
    kw = dict(TINY, iterations=10)
    params, report = search(model, candidates=CANDS, search_iterations=4, **kw)
    assert len(calls) == 6
    (fixed_kw, fixed), (grid_kw, learned), (start_kw, neutral) = calls[3], calls[4], calls[5]
    assert not fixed_kw.get("learn_grid") and grid_kw["learn_grid"] is True
    assert fixed_kw["init"] is report["candidates"][report["chosen"]]["params"]
    assert grid_kw["lr"] == pytest.approx(TINY["lr"] * schedule_search.LEARN_GRID_LR_SCALE)
    assert learned.meta["match"] == "final" and learned.schedule["kind"] == "learned"
    assert start_kw["init"] is None and start_kw["learn_grid"] is True
    assert start_kw["lr"] == TINY["lr"] and start_kw["iterations"] == kw["iterations"]
    assert neutral.schedule == {"kind": "learned", "start": DEFAULT_CANDIDATES["poly7"]}
    rec = report["final"]
    assert params.meta["schedule_search"]["final"] == rec
    # the scores are the validation RMSEs: re-score both against the same reference
    _, rep = choose(model, candidates={"fixed": fixed.sigmas}, **dict(TINY, iterations=1))
    score = rep["score"]
    start = fixed_kw["init"]
    runs = {"search": start, "fixed": fixed, "learned": learned, "learned_start": neutral}
    for name, p in runs.items():
        assert rec[f"{name}_val_rmse"] == pytest.approx(score(p), rel=1e-9), name
    # the grid run starts from the better of the winner and the fixed run; the best is kept
    assert grid_kw["init"] is min((start, fixed), key=score)
    assert params is runs[rec["kept"]] and rec["kept"] == min(runs, key=lambda n: score(runs[n]))
    # AMED has no learned grid: one final run
    calls.clear()
    _, rep = search(model, candidates=["poly7"], search_iterations=2, method="amed",
                          amed_form="table", num_points=None, **kw)
    assert rep["final"]["learn_grid"] is False and set(rep["final"]) == {
        "learn_grid", "kept", "search_val_rmse", "fixed_val_rmse"} and len(calls) == 2
    # a full-length search (no final run) with learn_grid learns every candidate's grid
    # and keeps the candidate better on validation
    calls.clear()
    p, rep = search(model, candidates=["poly7", "logsnr"], search_iterations=None,
                    learn_grid=True, **TINY)
    assert len(calls) == 2 and all(c[0]["learn_grid"] is True for c in calls)
    assert "final" not in rep and p.schedule["kind"] == "learned"
    assert p is min((out for _, out in calls), key=rep["score"])


def test_default_grid_order_search_then_learned_starts_then_small_search():
    """With the grid and the run's length left to the budget, `distill` tries the full
    search, then (EPD only) the grid learned from two starts, then the small search."""
    from epd_kernels.distill import api
    from epd_kernels.distill.settings import DistillSettings

    s = DistillSettings(nfe=5, shape=(4,))
    ways = [(d, t) for d, t in api._default_grids(s)]
    assert [t.search.candidates for _, t in ways] == [
        tuple(schedule_search.DEFAULT_CANDIDATES), api.LEARNED_STARTS, api.SMALL_SEARCH]
    assert all(t.schedule == "auto" for _, t in ways)
    learned = ways[1][1]
    assert learned.learn_grid is True and learned.search.search_iterations is None
    amed = DistillSettings(nfe=5, shape=(4,), method="amed")
    assert [t.search.candidates for _, t in api._default_grids(amed)] == [
        tuple(schedule_search.DEFAULT_CANDIDATES), api.SMALL_SEARCH]
    assert list(api._default_grids(s.replace(schedule="logsnr"))) == []
