"""Graphs that capture once and count true (epd_kernels/branches.py, solvers/graphs.py,
solvers/solve_graph.py).

The CPU stand-in (``EPD_KERNELS_GRAPH=simulate``) replays a traced graph and runs no
Python of the captured function, like a CUDA graph. So a counter *inside* the user's
denoiser (`Spy`, written here, independent of the library's CountingDenoiser) sees the
warm-up calls and the capture, and nothing of the replays; the reported counts must still
follow the NFE rules (the oracle: latency ``evals_per_step * N - afs``, EPD total
``(K + 1) N - afs``), and the results must equal the graph-free path.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from epd_kernels import EPDParams, get_sigmas, make_noise, sample
from epd_kernels.params import AMEDParams
from epd_kernels.branches import BranchRunner, capture_failed
from epd_kernels.params import DODEParams
from epd_kernels.models import GaussianMixtureModel
from epd_kernels.sampling import clear_graph_cache
from epd_kernels.solvers.registry import nfe_to_steps, valid_budgets
from epd_kernels.solvers.graphs import SimulatedGraphStrategy

F64 = torch.float64
WARMUP_AND_CAPTURE = 3          # two warm-up calls and the capture call
BASELINES = ["euler", "ddim", "heun", "dpm2", "dpmpp3m", "unipc", "ipndm", "deis"]
TWO_PER_STEP = {"heun", "dpm2", "epd", "epd-ipndm", "amed", "amed-ipndm", "d-heun"}


class Spy:
    """The user's denoiser with a Python counter inside (what a graph replay skips)."""

    def __init__(self, model):
        self.model, self.calls, self.samples = model, 0, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.samples += x.shape[0]
        return self.model(x, sigma, **cond)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("EPD_KERNELS_NO_CUDA_GRAPH", raising=False)
    clear_graph_cache()
    yield
    clear_graph_cache()


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureModel(torch.randn(3, 5, generator=g, dtype=F64), 0.5)


def _params(solver, nfe, K=2):
    """Params for `solver` at budget `nfe` (None for the solvers without params)."""
    if solver in ("epd", "epd-ipndm"):
        S = nfe_to_steps(solver, nfe)
        p = EPDParams.init(get_sigmas("polynomial", S), K, plugin=solver == "epd-ipndm")
        g = torch.Generator().manual_seed(nfe)   # off-centre values: a real test of the inputs
        return dataclasses.replace(p, o=0.05 * torch.randn(p.o.shape, generator=g, dtype=F64),
                         delta=0.02 * torch.randn(p.delta.shape, generator=g, dtype=F64))
    if solver in ("amed", "amed-ipndm"):
        return AMEDParams.init(get_sigmas("polynomial", nfe_to_steps(solver, nfe)),
                               plugin=solver == "amed-ipndm", shape=(5,))
    if solver.startswith("d-"):
        base = {"d-euler": "euler", "d-ddim": "euler", "d-heun": "heun", "d-ipndm": "ipndm"}[solver]
        S = nfe_to_steps(solver, nfe)
        lam = torch.linspace(0.0, 0.1, S, dtype=F64)
        return DODEParams(lambdas=lam, sigmas=get_sigmas("polynomial", S), base=base)
    return None


def _rule(solver, nfe, params):
    """(latency, total evaluations, steps) by the NFE rules."""
    steps = nfe_to_steps(solver, nfe)
    afs = int(solver in TWO_PER_STEP)
    total = nfe
    if solver in ("epd", "epd-ipndm"):
        total = (params.num_points + 1) * steps - afs
    return nfe, total, steps


SOLVERS = BASELINES + ["epd", "epd-ipndm", "amed", "amed-ipndm", "d-euler", "d-heun",
                       "d-ipndm"]
CASES = [(s, n) for s in SOLVERS for n in range(3, 10) if n in valid_budgets(s, up_to=9)]


def _run(model, solver, nfe, params, noise, monkeypatch, mode, **kw):
    monkeypatch.setenv("EPD_KERNELS_GRAPH", mode)
    spy = Spy(model)
    x, stats = sample(spy, noise, solver=solver, nfe=nfe, params=params, return_stats=True, **kw)
    return spy, x, stats


@pytest.mark.parametrize("solver,nfe", CASES)
def test_branch_graphs_count_true_and_capture_once(model, solver, nfe, monkeypatch):
    params = _params(solver, nfe)
    noise = make_noise(range(3), (5,), dtype=F64)
    _, ref, _ = _run(model, solver, nfe, params, noise, monkeypatch, "off")
    latency, total, steps = _rule(solver, nfe, params)
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    spy = Spy(model)
    epd = solver.startswith("epd")
    for call in range(2):
        before = spy.calls
        x, st = sample(spy, noise, solver=solver, nfe=nfe, params=params, return_stats=True)
        assert (st.latency_nfe, st.total_evals, st.steps) == (latency, total, steps)
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
        python_calls = spy.calls - before
        if epd:   # main points run in Python; the branch calls are replays after a capture
            main = steps - 1
            assert st.graph_replays == steps
            assert st.graph_captures == (1 if call == 0 else 0)
            assert python_calls == main + (WARMUP_AND_CAPTURE if call == 0 else 0)
        else:     # nothing to capture: every call runs in Python
            assert st.graph_captures == st.graph_replays == 0
            assert python_calls == latency


@pytest.mark.parametrize("nfe", range(3, 10))
def test_paradigms_counts_under_the_stand_in(model, nfe, monkeypatch):
    """ParaDiGMS has no graph path: under simulate every batched round runs in Python,
    latency = nfe rounds (window <= substeps forces all of them) and the total is the sum
    of the window sizes that `run_paradigms` reports for the same grid."""
    from epd_kernels.solvers.paradigms import paradigms_grid, run_paradigms

    noise = make_noise(range(2), (5,), dtype=F64)
    opts = {"window": 4, "substeps": 4}
    spy, x, st = _run(model, "paradigms", nfe, None, noise, monkeypatch, "simulate",
                      options=opts)
    fine = paradigms_grid(get_sigmas("polynomial", nfe), 4)
    ref, ps = run_paradigms(model, noise * 80.0, fine, window=4, max_rounds=nfe)
    assert (st.latency_nfe, st.total_evals) == (nfe, ps.evaluations) == (ps.rounds, spy.samples // 2)
    assert spy.calls == nfe and st.graph_captures == st.graph_replays == 0
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


SOLVE_CASES = [(s, n) for s, n in CASES if n in (3, 4, 5, 9) and s not in ("amed", "amed-ipndm")]
SOLVE_CASES += [("amed", 5), ("amed-ipndm", 7)]


@pytest.mark.parametrize("solver,nfe", SOLVE_CASES)
def test_solve_graph_counts_and_replays(model, solver, nfe, monkeypatch):
    params = _params(solver, nfe)
    noise = make_noise(range(2), (5,), dtype=F64)
    other = make_noise(range(5, 7), (5,), dtype=F64)
    _, ref, _ = _run(model, solver, nfe, params, noise, monkeypatch, "off")
    _, ref_other, _ = _run(model, solver, nfe, params, other, monkeypatch, "off")
    latency, total, steps = _rule(solver, nfe, params)
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    spy = Spy(model)
    x, st = sample(spy, noise, solver=solver, nfe=nfe, params=params, return_stats=True,
                   graph="solve")
    assert (st.latency_nfe, st.total_evals, st.graph_captures, st.graph_replays) == (
        latency, total, 1, 1)
    # the capture ran the solver in Python 3 times (2 warm-ups, the capture)
    assert spy.calls == WARMUP_AND_CAPTURE * latency
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    before = spy.calls
    y, st2 = sample(spy, other, solver=solver, nfe=nfe, params=params, return_stats=True,
                    graph="solve")
    assert spy.calls == before        # a replay: no Python of the denoiser at all
    assert (st2.latency_nfe, st2.total_evals, st2.graph_captures, st2.graph_replays) == (
        latency, total, 0, 1)
    torch.testing.assert_close(y, ref_other, rtol=1e-12, atol=1e-12)   # new noise read in


def test_solve_graph_reads_new_params_values(model, monkeypatch):
    noise = make_noise(range(2), (5,), dtype=F64)
    p1 = _params("epd", 5)
    p2 = dataclasses.replace(p1, o=p1.o + 0.1, weights=torch.tensor([[0.3, 0.7]] * 3, dtype=F64))
    _, ref2, _ = _run(model, "epd", 5, p2, noise, monkeypatch, "off")
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    spy = Spy(model)
    sample(spy, noise, solver="epd", params=p1, graph="solve")
    calls = spy.calls
    x, st = sample(spy, noise, solver="epd", params=p2, graph="solve", return_stats=True)
    assert spy.calls == calls and st.graph_captures == 0
    torch.testing.assert_close(x, ref2, rtol=1e-12, atol=1e-12)


def test_solve_graph_refusals(model):
    noise = make_noise(range(2), (5,), dtype=F64)
    with pytest.raises(ValueError, match="ParaDiGMS"):
        sample(model, noise, solver="paradigms", nfe=3, graph="solve")
    with pytest.raises(ValueError, match="callback"):
        sample(model, noise, solver="euler", nfe=3, graph="solve", callback=print)
    with pytest.raises(ValueError, match="graph must be None or 'solve'"):
        sample(model, noise, solver="euler", nfe=3, graph="branches")


def test_graph_off_and_auto_on_cpu_capture_nothing(model, monkeypatch):
    noise = make_noise(range(2), (5,), dtype=F64)
    p = _params("epd", 5)
    for mode in ("off", "auto"):
        spy, _, st = _run(model, "epd", 5, p, noise, monkeypatch, mode, graph="solve")
        assert st.graph_captures == st.graph_replays == 0 and spy.calls == st.latency_nfe


def test_bad_env_value_names_the_valid_ones(model, monkeypatch):
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "yes")
    with pytest.raises(ValueError, match="EPD_KERNELS_GRAPH must be one of auto, off, simulate"):
        sample(model, make_noise([0], (5,), dtype=F64), solver="euler", nfe=3)


def test_cache_is_per_shape_and_clearable(model, monkeypatch):
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    p = _params("epd", 5)
    spy = Spy(model)
    n2, n3 = make_noise(range(2), (5,), dtype=F64), make_noise(range(3), (5,), dtype=F64)
    caps = [sample(spy, n, solver="epd", params=p, return_stats=True)[1].graph_captures
            for n in (n2, n3, n2, n3)]
    assert caps == [1, 1, 0, 0]            # one capture per batch shape, then replays only
    clear_graph_cache()
    assert sample(spy, n2, solver="epd", params=p, return_stats=True)[1].graph_captures == 1


class Uncapturable:
    """A model that cannot be captured (it refuses to run under a trace)."""

    def __init__(self, model):
        self.model, self.attempts = model, 0

    def __call__(self, x, sigma, **cond):
        if torch.jit.is_tracing():
            self.attempts += 1
            raise RuntimeError("host synchronisation inside the model")
        return self.model(x, sigma, **cond)


def test_failed_capture_is_remembered(model, monkeypatch):
    noise = make_noise(range(2), (5,), dtype=F64)
    p = _params("epd", 5)
    _, ref, _ = _run(model, "epd", 5, p, noise, monkeypatch, "off")
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    den = Uncapturable(model)
    with pytest.warns(RuntimeWarning, match="capture of the denoiser failed"):
        x, st = sample(den, noise, solver="epd", params=p, return_stats=True)
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    assert st.graph_captures == 0 and (st.latency_nfe, st.total_evals) == (5, 8)
    assert capture_failed(den) and den.attempts == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")     # no second attempt, so no second warning
        y = sample(den, noise, solver="epd", params=p)
        y2 = sample(den, make_noise(range(4), (5,), dtype=F64), solver="epd", params=p)
    assert den.attempts == 1 and y2.shape[0] == 4
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


class Nested:
    """diffusers-style nested conditioning: ``added_cond_kwargs`` (a dict of tensors) and a
    list of tensors; D(x) = m(x) + a . text + b . (sum of the list)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, added_cond_kwargs=None, extras=(), scale=1.0):
        self.calls += 1
        out = self.model(x, sigma)
        out = out + 0.1 * added_cond_kwargs["text_embeds"].mean(1, keepdim=True)
        out = out + 0.05 * added_cond_kwargs["time_ids"][:, :1] * scale
        for e in extras:
            out = out + 0.01 * e
        return out


def test_nested_conditioning_repeated_per_branch_and_captured_once(model, monkeypatch):
    B = 3
    g = torch.Generator().manual_seed(1)
    noise = make_noise(range(B), (5,), dtype=F64)
    cond = dict(added_cond_kwargs={"text_embeds": torch.randn(B, 4, generator=g, dtype=F64),
                                   "time_ids": torch.randn(B, 2, generator=g, dtype=F64)},
                extras=[torch.randn(B, 5, generator=g, dtype=F64)], scale=2.0)
    p = _params("epd", 7)
    # oracle: each sample alone, graph-free (a per-sample model call with batch 1)
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "off")
    alone = torch.cat([sample(Nested(model), noise[b:b + 1], solver="epd", params=p,
                              added_cond_kwargs={k: v[b:b + 1] for k, v in
                                                 cond["added_cond_kwargs"].items()},
                              extras=[cond["extras"][0][b:b + 1]], scale=2.0)
                       for b in range(B)])
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    den = Nested(model)
    x, st = sample(den, noise, solver="epd", params=p, return_stats=True, **cond)
    torch.testing.assert_close(x, alone, rtol=1e-12, atol=1e-12)
    assert st.graph_captures == 1 and st.graph_replays == 4      # not re-captured per step
    # new values in the same structure: replays only, and the new values are used
    cond2 = dict(cond, added_cond_kwargs={k: v + 1 for k, v in cond["added_cond_kwargs"].items()})
    y, st2 = sample(den, noise, solver="epd", params=p, return_stats=True, **cond2)
    assert st2.graph_captures == 0
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "off")
    torch.testing.assert_close(y, sample(Nested(model), noise, solver="epd", params=p, **cond2),
                               rtol=1e-12, atol=1e-12)


def test_conditioning_on_another_device_is_refused_before_capture(model, monkeypatch):
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "simulate")
    spy = Spy(model)
    noise = make_noise(range(2), (5,), dtype=F64)
    labels = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="'added_cond_kwargs'.*meta.*x's device"):
        sample(spy, noise, solver="epd", params=_params("epd", 5),
               added_cond_kwargs={"labels": labels})
    with pytest.raises(ValueError, match="'class_labels'.*meta"):
        BranchRunner(spy, 2, graph_strategy=SimulatedGraphStrategy()).run(
            noise, noise, 1.0, torch.tensor([0.5, 0.2], dtype=F64), class_labels=labels)
    with pytest.raises(ValueError, match="'extras'.*meta"):
        sample(spy, noise, solver="euler", nfe=3, graph="solve", extras=[labels])
    assert spy.calls == 0


def test_eager_paths_leave_the_conditioning_device_to_the_model(model, monkeypatch):
    """Without a graph nothing is copied into static buffers: a model that moves its
    conditioning itself keeps working."""
    def D(x, sigma, class_labels=None):
        return model(x, sigma, class_labels=class_labels.to(x.device))

    noise = make_noise(range(2), (5,), dtype=F64)
    labels = torch.tensor([0, 2], device="meta")
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "off")
    with pytest.raises(NotImplementedError):   # reached the model: meta cannot go to the CPU
        sample(D, noise, solver="epd", params=_params("epd", 5), class_labels=labels)


# --------------------------------------------------------------------------------------
# real CUDA graphs (tests marked gpu)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("nfe", [3, 5, 9])
def test_cuda_graph_counts_and_capture_once(model, nfe, monkeypatch):
    dev = torch.device("cuda")
    m = GaussianMixtureModel(model.means.to(dev), 0.5)
    params = _params("epd", nfe).to(dev)
    noise = make_noise(range(3), (5,), dtype=F64, device=dev)
    _, ref, _ = _run(m, "epd", nfe, params, noise, monkeypatch, "off")
    latency, total, steps = _rule("epd", nfe, params)
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "auto")
    spy = Spy(m)
    for call in range(2):
        before = spy.calls
        x, st = sample(spy, noise, solver="epd", params=params, return_stats=True)
        assert (st.latency_nfe, st.total_evals) == (latency, total)
        assert st.graph_captures == (1 if call == 0 else 0) and st.graph_replays == steps
        assert spy.calls - before == steps - 1 + (WARMUP_AND_CAPTURE if call == 0 else 0)
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    y, st = sample(spy, noise, solver="epd", params=params, return_stats=True, graph="solve")
    assert (st.latency_nfe, st.total_evals, st.graph_captures) == (latency, total, 1)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@needs_two_gpus
def test_cuda_graph_runs_on_the_tensors_device(model, monkeypatch):
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "auto")
    dev = torch.device("cuda", 1)
    m = GaussianMixtureModel(model.means.to(dev), 0.5)
    params = _params("epd", 5).to(dev)
    noise = make_noise(range(2), (5,), dtype=F64, device=dev)
    with torch.cuda.device(0):
        x, st = sample(m, noise, solver="epd", params=params, return_stats=True)
    assert x.device == dev and st.graph_captures == 1
    with pytest.raises(ValueError, match="class_labels.*cuda:0"):
        sample(m, noise, solver="epd", params=params,
               class_labels=torch.zeros(2, device="cuda:0"))
