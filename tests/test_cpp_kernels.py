"""The C++ CPU kernels of the op library (torch.ops.epd_kernels.*, CPU dispatch)
against the float64 reference (`kernel_cases.py` holds inputs, tolerances and checks).

The ops are called directly, below the Python argument handling of `epd_kernels.ops`.
Without the compiled library this module is skipped locally, with the reason, and FAILS
in CI (CI=true) or with EPD_KERNELS_REQUIRE_CPP=1: a missing build must not pass.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from conftest import require_cpp
from epd_kernels import backends
from kernel_cases import (CHECKS, DTYPES, RTOL_ACC, Case, assert_close, cases,
                          check_branch, check_step)

if not backends.LIBRARY_LOADED:
    _why = (f"the compiled op library did not load ({backends.library_error()}); build it "
            "with `pip install --no-build-isolation -e .`")
    if require_cpp():
        pytest.fail("CI requires the C++ kernels: " + _why, pytrace=False)
    pytest.skip(_why, allow_module_level=True)

ops = torch.ops.epd_kernels


@pytest.fixture(autouse=True)
def _cpu_kernels():
    backends.set_backend("auto")  # the C++ kernels are the CPU default


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[len("check_"):])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(n_values=[127, 255, 1023, 1025, 2049, 4099]))
def test_random_cases(check, case):
    check(ops, case)


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[len("check_"):])
@pytest.mark.parametrize("K,B,N", [
    (3, 1, 1 << 20),   # one long row: the reduction spans many chunks and threads
    (2, 3, 40001),     # rows cut by chunk boundaries at odd offsets
    (3, 3000, 7),      # many tiny rows per chunk
    (16, 2, 3001),     # K beyond the compile-time specialisations
    (11, 1, 1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_shapes(check, K, B, N, dtype):
    check(ops, Case(K, B, N, dtype, seed=K * 1000 + B * 10 + N))


@pytest.mark.parametrize("w_form,s_form", [("K", "none"), ("K", "0d"), ("BK", "B")])
def test_coefficient_forms_on_long_rows(w_form, s_form):
    check_step(ops, Case(4, 2, 70001, torch.float32, w_form=w_form, s_form=s_form, seed=3))
    check_branch(ops, Case(4, 2, 70001, torch.float32, w_form=w_form, seed=4))


def test_large_fp32_reduction_is_accurate():
    # A naive float running sum over 2^20 products is typically off by ~1e-5 of the
    # scale; the blocked float + double combination must do two orders better.
    t = Case(2, 1, 1 << 20, torch.float32, seed=7)
    _, dots = ops.epd_step_backward(*t.step_args(t.grad_out))
    want = torch.einsum("bn,kbn->bk", t.grad_out.double(), t.grads.double())
    mag = torch.einsum("bn,kbn->bk", t.grad_out.double().abs(), t.grads.double().abs())
    assert_close(dots, want, mag, 1e-7, 0, "dots over 2^20 fp32 elements")
    assert RTOL_ACC[torch.float32] > 1e-7


def test_reductions_do_not_depend_on_thread_count():
    t = Case(3, 2, 300001, torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((ops.epd_step_backward(*t.step_args(t.grad_out))[1],
                            ops.branch_states_backward(t.grad_out_k, t.d, t.c)[2]))
    finally:
        torch.set_num_threads(before)
    for dots, gc in results[1:]:
        assert torch.equal(dots, results[0][0]) and torch.equal(gc, results[0][1])


def test_branch_states_out_into_image_batch():
    K, B, C, H, W = 3, 2, 3, 5, 7
    t = Case(K, B, C * H * W, torch.float32, seed=1)
    buf = torch.empty(K * B, C, H, W)
    ops.branch_states_out(t.x, t.d, t.c, buf)
    torch.testing.assert_close(buf, ops.branch_states(t.x, t.d, t.c).reshape(K * B, C, H, W))


@pytest.mark.parametrize("dtype,K,N,offset", [
    (torch.float32, 2, (8 << 20) + 3, 1),   # misaligned buffer: a peeled head
    (torch.bfloat16, 4, (8 << 20) + 5, 0),
])
def test_branch_states_out_streaming(dtype, K, N, offset):
    # Outputs of 64 MiB and more go through streaming stores; they must match the
    # freshly allocated variant (which never streams) bit for bit.
    g = torch.Generator().manual_seed(5)
    x, d = (torch.rand(1, N, generator=g).to(dtype) for _ in range(2))
    c = torch.rand(K, generator=g)
    buf = torch.full((K * N + offset,), float("nan"), dtype=dtype)
    ops.branch_states_out(x, d, c, buf[offset:])
    assert torch.equal(buf[offset:].view(K, 1, N), ops.branch_states(x, d, c))


def test_schemas():
    t = Case(2, 2, 9, torch.float32, seed=2)
    cases = [
        (ops.epd_step.default, t.step_args(t.x)),
        (ops.epd_step_out.default, t.step_args(t.x) + (torch.empty(2, 9),)),
        (ops.epd_step_backward.default, t.step_args(t.x)),
        (ops.branch_states.default, (t.x, t.d, t.c)),
        (ops.branch_states_out.default, (t.x, t.d, t.c, torch.empty(2 * 2 * 9))),
        (ops.branch_states_backward.default, (t.grads, t.d, t.c)),
    ]
    for op, args in cases:
        # The schema (in particular the mutation annotations of the _out ops) against
        # what the kernels do.
        torch.library.opcheck(op, args, test_utils=("test_schema",))


def test_bad_inputs_name_the_argument():
    t = Case(2, 3, 5, torch.float32, seed=4)
    x, g, w, s, c = t.x, t.grads, t.weights, t.scale, t.c
    with pytest.raises(RuntimeError, match="weights must have dtype"):
        ops.epd_step(x, g, w.double(), s, 1.0)
    with pytest.raises(RuntimeError, match="grads must have shape"):
        ops.epd_step(x, g[:, :2], w, s, 1.0)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.epd_step_backward(x, g, w, s[:2], 1.0)
    with pytest.raises(RuntimeError, match="weights must be \\[K\\] or \\[B, K\\]"):
        ops.epd_step(x, g, w[None], s, 1.0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.epd_step(x.t().contiguous().t(), g, w, s, 1.0)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        ops.branch_states(x.int(), x, c)
    with pytest.raises(RuntimeError, match="out must have K\\*B\\*N"):
        ops.branch_states_out(x, x, c, torch.empty(2 * 3 * 5 + 1))
    with pytest.raises(RuntimeError, match="out must have dtype"):
        ops.branch_states_out(x, x, c, torch.empty(2 * 3 * 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.branch_states_backward(g[:1], x, c)
    with pytest.raises(RuntimeError, match="partially overlaps x"):
        big = torch.randn(3 * 5 + 1)
        ops.epd_step_out(big[:15].view(3, 5), g, w, s, 1.0, big[1:].view(3, 5))
    with pytest.raises(RuntimeError, match="unsupported operation"):
        ops.epd_step_out(x, g, w, s, 1.0, g[0])


_SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {test_dir!r})
    import kernel_cases as T
    ops = torch.ops.epd_kernels
    import epd_kernels  # loads the op library
    assert torch.backends.cpu.get_cpu_capability() == {isa!r}
    # Even N gives vector-aligned branches (streaming when forced), odd N does not.
    for K, B, N in [(1, 1, 1), (3, 2, 2048), (3, 2, 2049), (9, 2, 77), (2, 1, 20001)]:
        for dtype in T.DTYPES:
            for forms in [("K", "none"), ("BK", "B")]:
                for check in T.CHECKS:
                    check(ops, T.Case(K, B, N, dtype, w_form=forms[0], s_form=forms[1],
                                      seed=K + B + N))
    print("ok")
""")


def test_instruction_set_copies_and_streaming_stores():
    # The kernels are compiled once per instruction set and chosen from torch's CPU
    # capability at first use; ATEN_CPU_CAPABILITY forces a lower one in a subprocess.
    # Streaming stores normally start at 64 MiB; EPD_KERNELS_STREAMING=always forces
    # them (where the outputs are suitably aligned) on these small shapes.
    order = ["DEFAULT", "AVX2", "AVX512"]
    have = torch.backends.cpu.get_cpu_capability()
    # Off x86 only the portable copy exists.
    top = order.index(have) if have in order else 0
    runs = [("DEFAULT", "auto")] + [(isa, "always") for isa in order[1:top + 1]]
    test_dir = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for isa, streaming in runs:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower(), EPD_KERNELS_STREAMING=streaming)
        script = _SUBPROCESS_SCRIPT.format(test_dir=test_dir, isa=isa)
        procs.append((isa, streaming, subprocess.Popen(
            [sys.executable, "-c", script], env=env, cwd=test_dir,  # not the source tree:
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for isa, streaming, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "ok" in out, f"{isa}, streaming={streaming}:\n{out}{err}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_float16_overflow_and_cancellation(dtype):
    """Accumulation is in opmath: terms beyond the data range that cancel give a finite
    result; a result beyond it rounds to inf (float16: above 65504)."""
    big = 1.5 * 2.0 ** 15  # exact in every dtype; 2 * big is beyond float16's range
    x = torch.zeros(1, 2, dtype=dtype)
    g = torch.tensor([[[big, big]], [[big, -big]]], dtype=dtype)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    y = ops.epd_step(x, g, w, None, 0.25)  # (2 big, 0) / 4: finite in every dtype
    assert y.tolist() == [[2 * big / 4, 0.0]]
    y = ops.epd_step(x, g, w, None, 1.0)
    if dtype == torch.float16:
        assert y[0, 0].item() == float("inf") and y[0, 1].item() == 0.0
    else:
        assert y[0, 0].item() == 2 * big
