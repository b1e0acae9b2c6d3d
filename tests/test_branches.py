"""BranchRunner: one batched call, static buffers, graph capture/replay (the traced CPU
stand-in: replays run no Python of the denoiser), copy-out, re-capture rules,
differentiable path (epd_kernels/branches.py)."""
from __future__ import annotations

import pytest
import torch

from epd_kernels.branches import BranchRunner, repeat_cond
from epd_kernels.solvers.graphs import (CudaGraphStrategy, SimulatedGraphStrategy, graph_mode,
                                        strategy_for)

pytestmark = pytest.mark.filterwarnings("ignore:epd_kernels. using the plain-PyTorch reference")

F64 = torch.float64


def _sig(s, x):
    return s.view((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


class Recorder:
    """Denoiser that records what it sees; D = tanh(x) / (1 + sigma) (+ label term)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None, **kw):
        self.calls.append(dict(x=x, x_ptr=x.data_ptr(), x_copy=x.clone(), sigma=sigma.clone(),
                               sigma_ptr=sigma.data_ptr(), labels=None if class_labels is None
                               else class_labels.clone(), kw=kw,
                               labels_ptr=None if class_labels is None else class_labels.data_ptr()))
        out = torch.tanh(x) / (1 + _sig(sigma, x))
        if class_labels is not None:
            out = out + 0.1 * class_labels.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return out


def expected_g(x, v, t, tau, delta, labels=None):
    """Oracle: K separate evaluations. tau, delta: [B, K]."""
    out = []
    for k in range(tau.shape[1]):
        tk = _sig(tau[:, k], x)
        xk = x + (tk - t) * v
        sk = (1 + delta[:, k]) * tau[:, k]
        d = torch.tanh(xk) / (1 + _sig(sk, x))
        if labels is not None:
            d = d + 0.1 * labels.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        out.append((xk - d) / tk)
    return torch.stack(out)


def inputs(B=3, shape=(2, 4), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B,) + shape, generator=g, dtype=F64).to(dtype)
    v = torch.randn((B,) + shape, generator=g, dtype=F64).to(dtype)
    return x, v


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("form", ["K", "BK"])
def test_run_matches_separate_calls(graph, form):
    K, B, t = 3, 4, 2.0
    x, v = inputs(B)
    tau = torch.tensor([1.5, 1.0, 0.5], dtype=F64)
    delta = torch.tensor([0.01, -0.02, 0.03], dtype=F64)
    if form == "BK":
        tau = tau[None].repeat(B, 1) * torch.linspace(0.9, 1.0, B, dtype=F64)[:, None]
        delta = delta[None].repeat(B, 1) + torch.linspace(0, 0.01, B, dtype=F64)[:, None]
    den = Recorder()
    runner = BranchRunner(den, K, graph_strategy=SimulatedGraphStrategy() if graph else None)
    g = runner.run(x, v, t, tau, delta)
    assert g.shape == (K, B, 2, 4)
    tau_bk = tau if tau.dim() == 2 else tau[None].expand(B, K)
    delta_bk = delta if delta.dim() == 2 else delta[None].expand(B, K)
    torch.testing.assert_close(g, expected_g(x, v, t, tau_bk, delta_bk), rtol=1e-13, atol=1e-13)
    # ONE batched call (a graph: 2 warm-up calls and the capture, all of the batched call)
    assert len(den.calls) == (3 if graph else 1)
    call = den.calls[-1]
    assert call["x"].shape == (K * B, 2, 4) and call["sigma"].shape == (K * B,)
    # k-major: rows k*B .. k*B+B-1 are branch k
    torch.testing.assert_close(call["sigma"].view(K, B), ((1 + delta_bk) * tau_bk).t())
    torch.testing.assert_close(call["x_copy"].view(K, B, 2, 4)[1],
                               x + (_sig(tau_bk[:, 1], x) - t) * v)


def test_delta_none_and_float_t_tensor_t():
    x, v = inputs(2)
    tau = torch.tensor([0.7, 0.3], dtype=F64)
    r1 = BranchRunner(Recorder(), 2).run(x, v, 1.0, tau)
    r2 = BranchRunner(Recorder(), 2).run(x, v, torch.tensor(1.0, dtype=F64), tau,
                                         torch.zeros(2, dtype=F64))
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)


def test_static_buffers_reused_and_capture_once():
    K, B = 2, 3
    den = Recorder()
    strat = SimulatedGraphStrategy()
    runner = BranchRunner(den, K, graph_strategy=strat)
    labels = torch.tensor([0, 1, 2])
    ptrs = None
    for step in range(4):
        x, v = inputs(B, seed=step)
        t = 3.0 - step * 0.5
        tau = torch.tensor([t * 0.8, t * 0.4], dtype=F64)
        g = runner.run(x, v, t, tau, torch.zeros(K, dtype=F64), class_labels=labels + step)
        now = (runner.input_buffer.data_ptr(), runner.sigma_buffer.data_ptr(),
               runner.tau_buffer.data_ptr(), runner.cond_buffers[0].data_ptr())
        ptrs = ptrs or now
        assert now == ptrs                                       # same static memory every step
        # the buffers hold this step's values (what a replay reads)
        assert runner.cond_buffers[0].tolist() == (labels + step).tolist() * K
        # a replay computes from the new values: the oracle, step by step
        torch.testing.assert_close(
            g, expected_g(x, v, t, tau[None].expand(B, K), torch.zeros(B, K, dtype=F64),
                          labels=labels + step), rtol=1e-13, atol=1e-13)
    # Python ran the denoiser only for the warm-up and the capture, on the static buffers
    assert len(den.calls) == 3
    assert all(c["x_ptr"] == ptrs[0] and c["sigma_ptr"] == ptrs[1] and c["labels_ptr"] == ptrs[3]
               for c in den.calls)
    assert strat.captures == 1 and runner.captures == 1
    assert strat.replays == 4 and runner.replays == 4 and runner.calls == 4


def test_output_is_copied_out_of_static_buffer():
    K, B = 2, 2
    strat = SimulatedGraphStrategy()
    runner = BranchRunner(Recorder(), K, graph_strategy=strat)
    tau = torch.tensor([0.9, 0.4], dtype=F64)
    x1, v1 = inputs(B, seed=1)
    g1 = runner.run(x1, v1, 1.0, tau)
    g1_saved = g1.clone()
    x2, v2 = inputs(B, seed=2)
    g2 = runner.run(x2, v2, 1.0, tau)
    torch.testing.assert_close(g1, g1_saved, rtol=0, atol=0)      # not overwritten by replay 2
    assert not torch.equal(g1, g2)
    static_out = runner._captured.output
    assert g1.data_ptr() != static_out.data_ptr() and g2.data_ptr() != static_out.data_ptr()
    assert torch.equal(static_out.view_as(g2), g2)


@pytest.mark.parametrize("change", ["shape", "batch", "dtype", "cond_keys", "cond_shape",
                                    "cond_dtype", "object_value", "K_same"])
def test_recapture_exactly_on_change(change):
    den = Recorder()
    strat = SimulatedGraphStrategy()
    runner = BranchRunner(den, 2, graph_strategy=strat)
    tau = torch.tensor([0.9, 0.4], dtype=F64)
    x, v = inputs(3)
    base_cond = dict(class_labels=torch.tensor([1, 2, 3]), mode="a")
    runner.run(x, v, 1.0, tau, **base_cond)
    runner.run(x * 2, v, 1.0, tau, **base_cond)          # new values only: no re-capture
    assert strat.captures == 1
    cond = dict(base_cond)
    if change == "shape":
        x, v = inputs(3, shape=(4, 2))
    elif change == "batch":
        x, v = inputs(5)
        cond["class_labels"] = torch.arange(5)
    elif change == "dtype":
        x, v = x.float(), v.float()
    elif change == "cond_keys":
        cond["extra"] = torch.ones(3)
    elif change == "cond_shape":
        cond["class_labels"] = torch.tensor([[1], [2], [3]])
    elif change == "cond_dtype":
        cond["class_labels"] = torch.tensor([1.0, 2.0, 3.0])
    elif change == "object_value":
        cond["mode"] = "b"
    g = runner.run(x, v, 1.0, tau, **cond)
    expect = 1 if change == "K_same" else 2
    assert strat.captures == expect
    g = runner.run(x, v, 1.0, tau, **cond)                # and it stays captured
    assert strat.captures == expect
    assert g.dtype == x.dtype and g.shape == (2,) + tuple(x.shape)


def test_non_batch_cond_passes_through():
    seen = {}

    def D(x, sigma, emb=None, scale=None, table=None):
        seen.update(emb=emb, scale=scale, table=table)
        return x * 0

    runner = BranchRunner(D, 3)
    x, v = inputs(2)
    table = torch.arange(5.0)          # leading dim 5 != B: not repeated
    scalar = torch.tensor(2.0)         # 0-d: not repeated
    runner.run(x, v, 1.0, torch.tensor([0.8, 0.5, 0.2], dtype=F64), emb=scalar, scale=1.5,
               table=table)
    assert seen["scale"] == 1.5
    assert torch.equal(seen["table"], table) and torch.equal(seen["emb"], scalar)


def test_repeat_cond_branch_major():
    c = repeat_cond({"a": torch.tensor([1, 2]), "b": 3, "c": torch.tensor(4)}, 2, 3)
    assert c["a"].tolist() == [1, 2, 1, 2, 1, 2] and c["b"] == 3 and c["c"].item() == 4


def test_differentiable_path_matches_and_gradchecks():
    K, B, t = 2, 2, 1.5
    x, v = inputs(B, shape=(3,))
    tau = torch.tensor([1.2, 0.6], dtype=F64)
    delta = torch.tensor([0.02, -0.01], dtype=F64)
    runner = BranchRunner(Recorder(), K)
    g_static = runner.run(x, v, t, tau, delta)
    g_diff = runner.run_differentiable(x, v, t, tau, delta)
    torch.testing.assert_close(g_diff, g_static, rtol=1e-13, atol=1e-13)

    def f(x_, v_, tau_, delta_):
        return runner.run_differentiable(x_, v_, t, tau_, delta_)

    ins = tuple(a.clone().requires_grad_() for a in (x, v, tau, delta))
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)
    # __call__ picks the differentiable path only when autograd needs it
    assert runner(x, v, t, ins[2], delta).requires_grad
    assert not runner(x, v, t, tau, delta).requires_grad
    with torch.no_grad():
        assert not runner(x, v, t, ins[2], delta).requires_grad


def test_counts_and_float32():
    den = Recorder()
    runner = BranchRunner(den, 4)
    x, v = inputs(3, dtype=torch.float32)
    g = runner.run(x, v, 2.0, torch.tensor([1.9, 1.5, 1.0, 0.5]))
    assert g.dtype == torch.float32 and len(den.calls) == 1 and den.calls[0]["x"].shape[0] == 12
    assert den.calls[0]["sigma"].dtype == torch.float32
    assert runner.calls == 1


def test_graph_mode_resolution(monkeypatch):
    monkeypatch.delenv("EPD_KERNELS_GRAPH", raising=False)
    monkeypatch.delenv("EPD_KERNELS_NO_CUDA_GRAPH", raising=False)
    assert graph_mode() == "auto"
    assert strategy_for("auto", torch.device("cuda", 0)) is CudaGraphStrategy
    assert strategy_for("auto", torch.device("cpu")) is None
    assert strategy_for("off", torch.device("cuda", 0)) is None
    assert strategy_for("simulate", torch.device("cpu")) is SimulatedGraphStrategy
    monkeypatch.setenv("EPD_KERNELS_NO_CUDA_GRAPH", "1")
    assert graph_mode() == "off"
    monkeypatch.setenv("EPD_KERNELS_GRAPH", " Simulate ")
    assert graph_mode() == "simulate"                    # the new variable wins
    monkeypatch.setenv("EPD_KERNELS_GRAPH", "cuda")
    with pytest.raises(ValueError, match="EPD_KERNELS_GRAPH.*auto, off, simulate"):
        graph_mode()
    with pytest.raises(ValueError, match="auto, off, simulate"):
        BranchRunner(Recorder(), 2, graph="fast")


def test_use_cuda_graph_true_on_cpu_raises():
    runner = BranchRunner(Recorder(), 2, use_cuda_graph=True)
    x, v = inputs(2)
    with pytest.raises(ValueError, match="CUDA"):
        runner.run(x, v, 1.0, torch.tensor([0.5, 0.2], dtype=F64))


def test_injected_strategy_can_be_switched_off():
    strat = SimulatedGraphStrategy()
    den = Recorder()
    runner = BranchRunner(den, 2, use_cuda_graph=False, graph_strategy=strat)
    x, v = inputs(2)
    runner.run(x, v, 1.0, torch.tensor([0.5, 0.2], dtype=F64))
    assert strat.captures == 0 and len(den.calls) == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        BranchRunner(Recorder(), 0)
    runner = BranchRunner(Recorder(), 2)
    x, v = inputs(2)
    with pytest.raises(ValueError, match="tau"):
        runner.run(x, v, 1.0, torch.tensor([0.5, 0.2, 0.1], dtype=F64))
    with pytest.raises(ValueError, match="v must"):
        runner.run(x, v[:1], 1.0, torch.tensor([0.5, 0.2], dtype=F64))


def test_counting_wrapper_is_unwrapped_and_counts_replays():
    """A CountingDenoiser given to the runner is never captured: replays run no Python,
    yet every logical call is counted (1 call, K evaluations each)."""
    from epd_kernels.solvers.counting import CountingDenoiser

    den = Recorder()
    counter = CountingDenoiser(den, batch_size=2)
    runner = BranchRunner(counter, 3, graph_strategy=SimulatedGraphStrategy())
    assert runner.denoiser is den
    x, v = inputs(2)
    for _ in range(4):
        runner.run(x, v, 1.0, torch.tensor([0.9, 0.5, 0.2], dtype=F64))
    assert (counter.calls, counter.evaluations) == (4, 12)
    assert len(den.calls) == 3 and runner.replays == 4
