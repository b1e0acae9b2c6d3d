"""The distill benchmark section (benchmarks/bench_distill.py): the equal-quality
interpolation against closed forms, and the section's plumbing on a tiny in-process run
checked against independent samples and the Gaussian's closed-form solution."""
import importlib
import json
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("benchmarks.bench_distill")


@pytest.mark.parametrize("budgets", [range(1, 41), range(1, 41, 2)])  # every / odd budgets
@pytest.mark.parametrize("target", [0.3, 0.0123, 2e-4])
def test_match_nfe_exact_on_exponential_curves(bench, budgets, target):
    """error = c exp(-a n) is a straight line in log error vs NFE: the interpolated
    crossing is exactly n* = log(c / target) / a, wherever the budgets fall."""
    c, a = 2.0, 0.25
    m = bench.match_nfe({n: c * math.exp(-a * n) for n in budgets}, target)
    want = math.log(c / target) / a
    assert m["status"] == "crossed" and m["monotone"] and m["crossings"] == 1
    assert m["nfe"] == pytest.approx(want, rel=1e-12)
    assert bench.speedup_text(m, 5) == f"{want / 5:.2f}x"


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_match_nfe_on_power_laws(bench, p):
    """error = c NFE^-p crosses the target at n* = (c / target)^(1/p): exact at a budget;
    between budgets log error is convex in NFE, so the chord's answer is at or after n*,
    before the next budget."""
    c = 3.0
    curve = {n: c * n ** -p for n in range(1, 41)}
    for n in (4, 9, 17):
        assert bench.match_nfe(curve, c * n ** -p)["nfe"] == pytest.approx(n, rel=1e-12)
    for n_star in (4.5, 9.25, 17.8):
        m = bench.match_nfe(curve, c * n_star ** -p)
        assert n_star <= m["nfe"] < math.floor(n_star) + 1
        assert m["nfe"] - n_star < 0.5 * p / n_star + 1e-9


def test_match_nfe_bounds_and_non_monotone_curves(bench):
    curve = {n: 1.0 / n for n in range(1, 41)}          # reaches 0.025 at NFE 40
    m = bench.match_nfe(curve, 0.02)
    assert m == dict(nfe=None, status="not reached", monotone=True, crossings=0)
    assert bench.speedup_text(m, 3) == "> 13.33x"
    assert bench.match_nfe(curve, 0.025)["nfe"] == pytest.approx(40.0)
    m = bench.match_nfe(curve, 2.0)                     # NFE 1 already reaches it
    assert m["status"] == "at first budget" and bench.speedup_text(m, 5) == "<= 0.20x"
    with pytest.raises(ValueError, match="target"):
        bench.match_nfe(curve, 0.0)
    # rises 2 -> 3 before crossing 0.4 between 3 and 4, rises above it again at 5
    m = bench.match_nfe({1: 1.0, 2: 0.5, 3: 0.8, 4: 0.3, 5: 0.6, 6: 0.2, 7: math.nan}, 0.4)
    want = 3 + math.log(0.4 / 0.8) / math.log(0.3 / 0.8)
    assert m["nfe"] == pytest.approx(want, rel=1e-12) and m["crossings"] == 2
    assert bench.speedup_text(m, 3) == f"{want / 3:.2f}x*"
    m = bench.match_nfe({1: math.inf, 2: 0.1}, 0.4)     # from a non-finite error: next budget
    assert m["nfe"] == 2.0 and m["status"] == "crossed"


def test_section_smoke(bench, tmp_path, run_mod_readme):
    """The section at its smallest (the Gaussian, NFE 3, 16 noises, a tiny distillation):
    the reference against the closed form, one curve point against an independent sample,
    the headline cell against the stored figures, the README block."""
    from epd_kernels import make_noise, sample
    from epd_kernels.models.registry import load_model

    threads = torch.get_num_threads()
    res = bench.run(True, tmp_path, models=["gaussian"], nfes=[3], samples=16, verbose=False)
    assert torch.get_num_threads() == threads                     # restored
    data = json.loads((tmp_path / "distill.json").read_text())
    assert data["complete"] and data["config"]["distill_kw"] == bench.QUICK_DISTILL
    curves, epd = data["curves"]["gaussian"], data["epd"]["gaussian"]["3"]
    assert list(curves) == list(bench.BASELINES)
    assert [int(n) for n in curves["heun"]] == list(range(1, 13, 2))   # AFS: odd budgets
    assert data["references"]["gaussian"]["rmse_to_closed_form"] < 1e-3 * epd["rmse"]

    model = load_model("gaussian")
    noise = make_noise(range(bench.TEST_SEED, bench.TEST_SEED + 16), model.shape,
                       dtype=torch.float64)
    exact = model.exact_solution(noise * 80.0, 80.0, 0.002)
    rmse = float((sample(model, noise, solver="ipndm", nfe=7) - exact).pow(2).mean().sqrt())
    assert curves["ipndm"]["7"] == pytest.approx(rmse, rel=1e-3)

    head = res["tables"][0]
    assert head["columns"] == ["model", "NFE 3"] and "NOT the defaults" in head["title"]
    best = min(c["3"] for c in curves.values() if "3" in c)
    ratio, speed, secs = head["rows"][0][1].split(" · ")
    assert float(ratio) == pytest.approx(epd["rmse"] / best, abs=0.006)
    fastest = min((bench.match_nfe({int(n): e for n, e in c.items()}, epd["rmse"], 12)
                   for c in curves.values()), key=lambda m: m["nfe"] or math.inf)
    assert speed == bench.speedup_text(fastest, 3, 12)
    assert secs == f"{epd['distill_s']:.0f} s"
    assert any(n.startswith(("PASS: gaussian NFE 3", "MISS: gaussian NFE 3"))
               for n in res["notes"])
    lo, hi = epd["ratio_interval"]                      # the paired bootstrap's interval
    assert lo <= epd["rmse"] / best <= hi
    assert any(n.startswith(("PASS: gaussian", "MISS: gaussian")) and f"interval {lo:.2f}-{hi:.2f}"
               in n for n in res["notes"])
    for t in res["tables"]:
        assert all(len(r) == len(t["columns"]) for r in t["rows"]), t["title"]

    readme = tmp_path / "README.md"
    readme.write_text("# P\n\n<!-- headline:start -->\nold\n<!-- headline:end -->\n\ntail\n")
    msg = run_mod_readme.write_readme(readme, "distill", res, dict(
        command="python benchmarks/run.py --sections distill", cpu_model="cpu"))
    text = readme.read_text()
    assert "replaced" in msg and text.startswith("# P") and text.endswith("tail\n")
    assert "old" not in text and f"| {head['rows'][0][0]} | {head['rows'][0][1]} |" in text


def test_section_keeps_what_it_measured_when_a_model_fails(bench, tmp_path, monkeypatch):
    """A model that raises mid-run: the error propagates (run.py fails the section) and
    distill.json holds the models measured before it, marked incomplete."""
    def broken():
        raise RuntimeError("model file damaged")

    monkeypatch.setitem(bench.MODELS, "gmm", ("broken", broken, 60))
    with pytest.raises(RuntimeError, match="damaged"):
        bench.run(True, tmp_path, models=["gaussian", "gmm"], nfes=[3], samples=8,
                  verbose=False)
    data = json.loads((tmp_path / "distill.json").read_text())
    assert not data["complete"] and list(data["epd"]) == ["gaussian"]


@pytest.fixture
def run_mod_readme():
    """benchmarks/run.py as a module."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("benchmarks.run")


def test_tail_counts_outlier_draws_and_their_share(bench):
    """Draw errors 1 (97 draws), 5 and 20, 40 (three draws): with the factor 10 the two
    largest are outliers; shares and the remaining RMSE follow by hand."""
    errs = torch.tensor([1.0] * 97 + [5.0, 20.0, 40.0], dtype=torch.float64)
    ref = torch.zeros(100, 3, 2, dtype=torch.float64)
    x = errs[:, None, None] * torch.ones_like(ref)      # per-draw RMSE = errs
    t = bench.tail(x, ref)
    total = 97 + 25 + 400 + 1600
    assert t["outliers"] == 2 and t["draws"] == 100
    assert t["share"] == pytest.approx(2000 / total, rel=1e-12)
    assert t["rmse_without"] == pytest.approx(math.sqrt((97 + 25) / 98), rel=1e-12)
    clean = bench.tail(torch.ones_like(ref), ref)        # equal errors: no outlier
    assert clean["outliers"] == 0 and clean["share"] == 0.0 and clean["rmse_without"] == 1.0
    x[3] = math.nan                                      # a non-finite draw is an outlier
    assert bench.tail(x, ref)["outliers"] == 3


def test_ratio_interval_closed_forms(bench):
    """Proportional per-draw errors give the same ratio on every resample: the interval is
    the point sqrt(c); identical errors give exactly 1; mismatched draws are refused."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(257, generator=g, dtype=torch.float64) ** 4
    lo, hi = bench.ratio_interval(4.0 * a, a, resamples=200)
    assert lo == pytest.approx(2.0, rel=1e-12) and hi == pytest.approx(2.0, rel=1e-12)
    assert bench.ratio_interval(a, a, resamples=50) == (1.0, 1.0)
    b = a.clone()
    b[5] = math.inf
    assert all(math.isnan(v) for v in bench.ratio_interval(a, b, resamples=50))
    with pytest.raises(ValueError, match="sq_a and sq_b"):
        bench.ratio_interval(a, a[:-1])


def test_ratio_interval_covers_the_population_ratio(bench):
    """Heavy-tailed paired draws (a rare large error, as for draws that end in another
    component) with a known population ratio sqrt(E a / E b): the 90 % interval of 300
    draws covers it in 80-97 % of 200 independent samples, and it narrows about as
    1/sqrt(n) (four times the draws: roughly half the width)."""
    def draws(n, g):
        base = torch.rand(n, generator=g, dtype=torch.float64)        # E = 1/2
        rare = (torch.rand(n, generator=g, dtype=torch.float64) < 0.02).double() * 50.0
        return base + rare, 0.5 * base + rare * (torch.rand(n, generator=g) < 0.5).double()
    # E a = 0.5 + 1.0; E b = 0.25 + 0.5
    truth = math.sqrt(1.5 / 0.75)
    g = torch.Generator().manual_seed(11)
    hits, widths = 0, {300: [], 1200: []}
    for i in range(200):
        a, b = draws(300, g)
        lo, hi = bench.ratio_interval(a, b, resamples=400, level=0.9, seed=i)
        hits += lo <= truth <= hi
        widths[300].append(hi - lo)
    for i in range(20):
        a, b = draws(1200, g)
        lo, hi = bench.ratio_interval(a, b, resamples=400, level=0.9, seed=i)
        widths[1200].append(hi - lo)
    assert 0.80 <= hits / 200 <= 0.97
    w300, w1200 = (sum(w) / len(w) for w in (widths[300], widths[1200]))
    assert 0.35 < w1200 / w300 < 0.7


@pytest.mark.parametrize("iv, bar, says", [
    ((0.73, 1.73), 1.0, "bar 1.0; 95 % interval 0.73-1.73, which contains the bar"),
    ((0.31, 0.37), 0.6, "bar 0.6; 95 % interval 0.31-0.37"),
    ((0.5, 0.6), 0.6, "bar 0.6; 95 % interval 0.50-0.60, which contains the bar"),  # closed
    ((math.nan, math.nan), 1.0, "bar 1.0"),
    (None, 1.0, "bar 1.0"),
])
def test_bar_text_says_whether_the_interval_contains_the_bar(bench, iv, bar, says):
    """The PASS / MISS line's clause: the bar, then the interval where there is one, and
    whether the bar lies inside it (the cell is then decided by the draws)."""
    assert bench._bar_text({"ratio_interval": iv}, bar) == says
