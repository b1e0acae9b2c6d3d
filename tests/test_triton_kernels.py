"""The Triton kernels against the float64 reference (`kernel_cases.py` holds inputs,
tolerances and checks).

Without a GPU they run through the Triton interpreter on CPU tensors: TRITON_INTERPRET=1
must be in the environment when `epd_kernels.kernels` is first imported (conftest.py sets
it). Tests marked `gpu` run the compiled kernels on a CUDA device (`make gpu-check` runs
them with TRITON_INTERPRET=0) and skip here with the reason "needs a CUDA GPU".
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="needs the optional package triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402

import epd_kernels.kernels as kk  # noqa: E402
from epd_kernels import backends, epd_step  # noqa: E402
from epd_kernels import reference as ref  # noqa: E402
from kernel_cases import CHECKS, DTYPES, Case, cases, check_branch, check_step  # noqa: E402

if not kk.HAS_TRITON:  # pragma: no cover - importorskip above found triton
    pytest.fail(f"triton is installed but does not import: {kk.TRITON_IMPORT_ERROR}",
                pytrace=False)
if not kk.INTERPRET and not torch.cuda.is_available():  # pragma: no cover
    pytest.fail("epd_kernels.kernels was imported in compiled mode on a machine without a "
                "CUDA device: set TRITON_INTERPRET=1 before anything imports it "
                "(tests/conftest.py does)", pytrace=False)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = [pytest.mark.gpu, needs_gpu]

# The interpreter runs each program in Python: few and small examples.
HYP = settings(max_examples=20, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _interpreted(case):
    if not kk.INTERPRET:
        pytest.skip("the interpreter tests run on CPU tensors; compiled Triton is tested "
                    "by the gpu-marked tests")
    return case


# The interpreter emulates bfloat16 in software and converts its subnormals wrongly (a
# bfloat16 4.68e-39 loads as 2.2e-39), so bfloat16 subnormals are checked on a GPU only
# (test_gpu_kernels_match_reference).
INTERPRETER_EXCLUDES = {(torch.bfloat16, "subnormal")}


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[len("check_"):])
@HYP
@given(case=cases(max_b=3, max_n=300, n_values=[63, 64, 65, 127, 128, 129, 257],
                  exclude=INTERPRETER_EXCLUDES))
def test_random_cases(check, case):
    check(kk, _interpreted(case))


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_programs_per_row(dtype):
    _interpreted(None)
    # Prime N: 12 tiles of 128 per row, 24 partial slots of 64.
    for i, check in enumerate(CHECKS):
        check(kk, Case(3, 2, 1531, dtype, w_form="BK", s_form="B", seed=i))
        check(kk, Case(3, 2, 1531, dtype, w_form="K", s_form="none", seed=i))


@pytest.mark.parametrize("K", [1, 16])
def test_extreme_k(K):
    _interpreted(None)
    for dtype in (torch.float32, torch.bfloat16):
        for check in CHECKS:
            check(kk, Case(K, 2, 129, dtype, magnitude="large", seed=K))


def test_branch_states_out_into_static_nchw_batch():
    _interpreted(None)
    K, B, C, H, W = 3, 2, 3, 5, 7
    t = Case(K, B, C * H * W, torch.float32, seed=11)
    static = torch.full((K * B, C, H, W), float("nan"))
    ptr = static.data_ptr()
    kk.branch_states_out(t.x, t.d, t.c, static)
    assert static.data_ptr() == ptr  # written in place
    # Sample k*B + b of the batch is branch k of sample b.
    torch.testing.assert_close(static.view(K, B, -1), ref.branch_states(t.x, t.d, t.c),
                               rtol=1e-6, atol=1e-6)


def test_coefficient_tensors_are_read_at_launch():
    """Updating weights/scale/c in place changes the next launch (CUDA-graph safety)."""
    _interpreted(None)
    t = Case(2, 2, 33, torch.float32, s_form="B", seed=12)
    y1 = kk.epd_step(*t.step_args(t.x))
    t.scale.mul_(2.0)
    t.weights.neg_()
    y2 = kk.epd_step(*t.step_args(t.x))
    torch.testing.assert_close(y2, ref.epd_step(*t.step_args(t.x)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y2)
    buf = torch.empty(2 * 2 * 33)
    kk.branch_states_out(t.x, t.d, t.c, buf)
    t.c.add_(1.0)
    kk.branch_states_out(t.x, t.d, t.c, buf)
    torch.testing.assert_close(buf.view(2, 2, 33), ref.branch_states(t.x, t.d, t.c),
                               rtol=1e-6, atol=1e-6)


def test_float64_alpha_is_not_rounded_to_float32():
    _interpreted(None)
    x = torch.zeros(1, 4, dtype=torch.float64)
    g = torch.ones(1, 1, 4, dtype=torch.float64)
    alpha = 1.0 + 2.0 ** -40  # not a float32
    y = kk.epd_step(x, g, torch.ones(1, dtype=torch.float64), None, alpha)
    assert y.tolist() == [[alpha] * 4]


def test_input_validation():
    _interpreted(None)
    t = Case(2, 2, 10, torch.float16, seed=13)
    x, g, w, s, c, d = t.x, t.grads, t.weights, t.scale, t.c, t.d
    with pytest.raises(TypeError, match="weights must be a contiguous torch.float32"):
        kk.epd_step(x, g, w.half(), s, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        kk.epd_step(x, g.float(), w, s, 1.0)
    with pytest.raises(ValueError, match="grads \\[K, B, N\\]"):
        kk.epd_step_backward(x, g[:, :1], w, s, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kk.epd_step(x, g.transpose(1, 2).contiguous().transpose(1, 2), w, s, 1.0)
    with pytest.raises(ValueError, match="K\\*B\\*N"):
        kk.branch_states_out(x, d, c, torch.empty(2 * 2 * 10 + 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="grad_out \\[K, B, N\\]"):
        kk.branch_states_backward(g[:1], d, c)


def test_import_without_triton_gives_clear_error():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, epd_kernels.kernels as kk\n"
        "assert kk.HAS_TRITON is False and kk.INTERPRET is False\n"
        "try:\n"
        "    kk.epd_step(torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.zeros(1), None, 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs Triton' in str(e), e\n"
        "    print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=root, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


# ---------------------------------------------------------------------------------------
# On a CUDA GPU (`make gpu-check`): the kernels as registered for the ops.


class _GpuOps:
    """Op namespace for the shared checks: runs each op of the library on CUDA copies of
    its CPU arguments (aliasing kept: one copy per tensor), copies buffers the op wrote
    back, and returns CPU results, which the checks compare with the CPU reference."""

    def __getattr__(self, name):
        fn = getattr(torch.ops.epd_kernels, name)

        def call(*args):
            copies = {}
            moved = [copies.setdefault(id(a), a.cuda()) if isinstance(a, torch.Tensor) else a
                     for a in args]
            res = fn(*moved)
            for a in args:
                if isinstance(a, torch.Tensor):
                    a.copy_(copies[id(a)].cpu())
            if isinstance(res, tuple):
                return tuple(r.cpu() for r in res)
            return None if res is None else res.cpu()
        return call


_FORMS = [("K", "none"), ("BK", "B"), ("K", "0d")]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("forms", _FORMS, ids=["-".join(f) for f in _FORMS])
def test_gpu_kernels_match_reference(dtype, K, forms):
    backends.set_backend("auto")
    for i, magnitude in enumerate(("unit", "large", "subnormal")):
        for check in CHECKS:
            check(_GpuOps(), Case(K, 3, 4099, dtype, magnitude, forms[0], forms[1], seed=K + i))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_long_row(dtype):
    """One row of 2^22 elements: many programs, int64 tile starts, the [K] fast path."""
    backends.set_backend("auto")
    check_step(_GpuOps(), Case(3, 1, 1 << 22, dtype, w_form="K", s_form="none", seed=1))
    check_branch(_GpuOps(), Case(3, 1, 1 << 22, dtype, w_form="K", seed=2))


@pytest.mark.gpu
@needs_gpu
def test_gpu_autograd_matches_float64_gradcheck():
    backends.set_backend("auto")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    g = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    w = torch.rand(3, 2, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    h = torch.rand(3, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    o = torch.rand(3, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(epd_step, (x, g, w, h, o))
    wk = w[0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, g, w: epd_step(x, g, w, 0.3, 0.1), (x, g, wk))


@pytest.mark.gpu
@needs_gpu
def test_gpu_torch_compile_fullgraph():
    backends.set_backend("auto")

    def f(x, g, w, h):
        return epd_step(x, g, w, h, 0.1) * 2

    cf = torch.compile(f, fullgraph=True)
    x, g = torch.randn(4, 8, 8, device="cuda"), torch.randn(3, 4, 8, 8, device="cuda")
    w, h = torch.softmax(torch.randn(3, device="cuda"), 0), torch.rand(4, device="cuda")
    torch.testing.assert_close(cf(x, g, w, h), f(x, g, w, h))
    xr = x.clone().requires_grad_()
    cf(xr, g, w, h).sum().backward()
    torch.testing.assert_close(xr.grad, torch.full_like(x, 2.0))


@pytest.mark.gpu
@needs_gpu
def test_gpu_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA GPU")
    backends.set_backend("auto")
    x, g = torch.randn(2, 1000, device="cuda:1"), torch.randn(3, 2, 1000, device="cuda:1")
    w = torch.rand(3, device="cuda:1")
    with torch.cuda.device(0):
        y = epd_step(x, g, w, 0.5)
    want = x + 0.5 * torch.einsum("k,kbn->bn", w, g)
    assert y.device == x.device
    torch.testing.assert_close(y, want)
