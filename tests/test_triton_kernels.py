"""Triton kernels vs the float64 reference, run through the Triton interpreter on CPU.

TRITON_INTERPRET=1 must be in the environment when `epd_kernels.kernels` is first
imported (the @triton.jit decorators read it then). This module sets it at the very top;
if the kernels were already imported in compiled mode by an earlier module, it skips.

Tolerances are explicit per dtype and derived from the arithmetic, not tuned: for an
output in data dtype T,

    |kernel - ref64| <= OUT_RTOL[T] * |ref64| + ACC_EPS[opmath] * mag + TINY

where `mag` is the same formula evaluated on absolute values (a bound on the sum of the
magnitudes of every term, so cancellation cannot fool the test), OUT_RTOL[T] is one
rounding to T (bf16 gets a full ulp: the Triton interpreter truncates fp32 -> bf16, while
GPUs round to nearest even), and ACC_EPS allows a few dozen roundings in opmath.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports epd_kernels.kernels

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import epd_kernels.kernels as kk  # noqa: E402
from epd_kernels import reference as ref  # noqa: E402

if not kk.HAS_TRITON:  # pragma: no cover
    pytest.skip(f"triton not importable: {kk.TRITON_IMPORT_ERROR}", allow_module_level=True)
if not kk.INTERPRET:  # pragma: no cover
    pytest.skip(
        "epd_kernels.kernels was imported before TRITON_INTERPRET=1 was set (its kernels are "
        "compiled-mode JIT functions and need a GPU); run this file in its own process or set "
        "TRITON_INTERPRET=1 in conftest.py before anything imports epd_kernels.kernels",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]

# One rounding of the result to the data dtype.
OUT_RTOL = {
    torch.float64: 0.0,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,   # round to nearest
    torch.bfloat16: 2.0 ** -7,   # one ulp: the interpreter truncates fp32 -> bf16
}
# Accumulated rounding error in the opmath dtype, relative to the sum of magnitudes.
ACC_EPS = {torch.float64: 64 * 2.0 ** -53, torch.float32: 64 * 2.0 ** -24}
# Absolute floor: half the smallest fp16 subnormal is 3e-8.
TINY = {torch.float64: 1e-300, torch.float32: 1e-30, torch.float16: 1e-7, torch.bfloat16: 1e-30}

HYP = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

dtypes_st = st.sampled_from(DTYPES)
k_st = st.integers(1, 8)
b_st = st.integers(1, 3)
# 1, odd sizes, sizes around the interpreter tile (BLOCK = 128, SUB = 64) and up to 700.
n_st = st.one_of(st.sampled_from([1, 2, 3, 17, 63, 64, 65, 127, 128, 129, 255, 257]),
                 st.integers(1, 700))
seed_st = st.integers(0, 2 ** 31 - 1)


def assert_close(got, want, mag, data_dtype, *, out_dtype=None, what=""):
    """got: kernel output; want/mag: float64 reference and magnitude bound."""
    out_dtype = data_dtype if out_dtype is None else out_dtype
    acc = ref.opmath_dtype(data_dtype)
    assert got.dtype == out_dtype, f"{what}: dtype {got.dtype} != {out_dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want).abs()
    tol = OUT_RTOL[out_dtype] * want.abs() + ACC_EPS[acc] * mag + TINY[out_dtype]
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err - tol).flatten()))
        raise AssertionError(
            f"{what} ({data_dtype}): {int(bad.sum())}/{err.numel()} elements out of tolerance; "
            f"worst at flat index {i}: got {got.double().flatten()[i].item()!r}, "
            f"want {want.flatten()[i].item()!r}, err {err.flatten()[i].item():.3e}, "
            f"tol {tol.flatten()[i].item():.3e}")


def make_inputs(seed, K, B, N, dtype):
    """Data in `dtype`, scalars in its opmath dtype; values drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    acc = ref.opmath_dtype(dtype)

    def randn(*shape, scale=1.0, to=dtype):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(to)

    return dict(
        x=randn(B, N),
        grads=randn(K, B, N),
        grad_out=randn(B, N),
        grad_out_k=randn(K, B, N),
        d=randn(B, N),
        weights=randn(B, K, to=acc),
        h=randn(B, scale=0.5, to=acc),
        o=randn(B, scale=0.1, to=acc),
        c=randn(B, K, to=acc),
    )


def f64(*ts):
    return [t.double() for t in ts]


def absf64(*ts):
    return [t.double().abs() for t in ts]


# ---------------------------------------------------------------------------------------
# epd_step
# ---------------------------------------------------------------------------------------
def check_epd_step_fwd(seed, K, B, N, dtype):
    t = make_inputs(seed, K, B, N, dtype)
    args = (t["x"], t["grads"], t["weights"], t["h"], t["o"])
    y = kk.epd_step_fwd(*args)
    want = ref.epd_step(*f64(*args))
    mag = ref.epd_step(*absf64(*args))  # |1 + o| <= 1 + |o|
    assert_close(y, want, mag, dtype, what="epd_step_fwd")


def check_epd_step_bwd(seed, K, B, N, dtype):
    t = make_inputs(seed, K, B, N, dtype)
    args = (t["grad_out"], t["grads"], t["weights"], t["h"], t["o"])
    gg, dots = kk.epd_step_bwd(*args)
    want_gg, want_dots = ref.epd_step_backward(*f64(*args))
    mag_gg, mag_dots = ref.epd_step_backward(*absf64(*args))
    assert_close(gg, want_gg, mag_gg, dtype, what="epd_step_bwd grad_grads")
    assert_close(dots, want_dots, mag_dots, dtype, out_dtype=ref.opmath_dtype(dtype),
                 what="epd_step_bwd dots")


@HYP
@given(seed=seed_st, K=k_st, B=b_st, N=n_st, dtype=dtypes_st)
def test_epd_step_fwd_matches_reference(seed, K, B, N, dtype):
    check_epd_step_fwd(seed, K, B, N, dtype)


@HYP
@given(seed=seed_st, K=k_st, B=b_st, N=n_st, dtype=dtypes_st)
def test_epd_step_bwd_matches_reference(seed, K, B, N, dtype):
    check_epd_step_bwd(seed, K, B, N, dtype)


# ---------------------------------------------------------------------------------------
# branch_states
# ---------------------------------------------------------------------------------------
def check_branch_states(seed, K, B, N, dtype):
    t = make_inputs(seed, K, B, N, dtype)
    args = (t["x"], t["d"], t["c"])
    out = kk.branch_states(*args)
    want = ref.branch_states(*f64(*args))
    mag = ref.branch_states(*absf64(*args))
    assert_close(out, want, mag, dtype, what="branch_states")
    # The out= variant writes the same bits into a caller-owned [K*B, N] buffer.
    buf = torch.full((K * B, N), float("nan"), dtype=dtype)
    assert kk.branch_states_out(*args, buf) is None
    assert torch.equal(buf.view(K, B, N), out)


def check_branch_states_bwd(seed, K, B, N, dtype):
    t = make_inputs(seed, K, B, N, dtype)
    args = (t["grad_out_k"], t["d"], t["c"])
    gx, gd, gc = kk.branch_states_bwd(*args)
    want = ref.branch_states_backward(*f64(*args))
    mag = ref.branch_states_backward(*absf64(*args))
    assert_close(gx, want[0], mag[0], dtype, what="branch_states_bwd grad_x")
    assert_close(gd, want[1], mag[1], dtype, what="branch_states_bwd grad_d")
    assert_close(gc, want[2], mag[2], dtype, out_dtype=ref.opmath_dtype(dtype),
                 what="branch_states_bwd grad_c")


@HYP
@given(seed=seed_st, K=k_st, B=b_st, N=n_st, dtype=dtypes_st)
def test_branch_states_matches_reference(seed, K, B, N, dtype):
    check_branch_states(seed, K, B, N, dtype)


@HYP
@given(seed=seed_st, K=k_st, B=b_st, N=n_st, dtype=dtypes_st)
def test_branch_states_bwd_matches_reference(seed, K, B, N, dtype):
    check_branch_states_bwd(seed, K, B, N, dtype)


# ---------------------------------------------------------------------------------------
# Fixed cases: a larger N (many programs per row and many partial slots), K = 16.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_larger_sizes_all_ops(dtype):
    K, B, N = 3, 2, 1531  # prime: 12 tiles of 128 per row, 24 partial slots of 64
    check_epd_step_fwd(1, K, B, N, dtype)
    check_epd_step_bwd(2, K, B, N, dtype)
    check_branch_states(3, K, B, N, dtype)
    check_branch_states_bwd(4, K, B, N, dtype)


@pytest.mark.parametrize("K", [1, 16])
def test_extreme_k(K):
    for dtype in (torch.float32, torch.bfloat16):
        check_epd_step_fwd(5, K, 2, 129, dtype)
        check_epd_step_bwd(6, K, 2, 129, dtype)
        check_branch_states(7, K, 2, 129, dtype)
        check_branch_states_bwd(8, K, 2, 129, dtype)


# ---------------------------------------------------------------------------------------
# Contract details
# ---------------------------------------------------------------------------------------
def test_branch_states_out_into_static_nchw_batch():
    K, B, C, H, W = 3, 2, 3, 5, 7
    t = make_inputs(11, K, B, C * H * W, torch.float32)
    static = torch.full((K * B, C, H, W), float("nan"))
    ptr = static.data_ptr()
    kk.branch_states_out(t["x"], t["d"], t["c"], static)
    assert static.data_ptr() == ptr  # written in place
    want = ref.branch_states(t["x"], t["d"], t["c"])  # [K, B, N]
    # Sample k*B + b of the batch is branch k of sample b.
    torch.testing.assert_close(static.view(K, B, -1), want, rtol=1e-6, atol=1e-6)
    assert not torch.isnan(static).any()


def test_scalars_are_read_from_tensors_at_launch():
    """Updating weights/h/o/c in place changes the next launch (CUDA-graph safety)."""
    t = make_inputs(12, 2, 2, 33, torch.float32)
    x, g, w, h, o, c, d = (t[k] for k in ("x", "grads", "weights", "h", "o", "c", "d"))
    y1 = kk.epd_step_fwd(x, g, w, h, o)
    h.mul_(2.0)
    o.add_(0.25)
    w.neg_()
    y2 = kk.epd_step_fwd(x, g, w, h, o)
    torch.testing.assert_close(y2, ref.epd_step(x, g, w, h, o), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y2)
    buf = torch.empty(2 * 2 * 33)
    kk.branch_states_out(x, d, c, buf)
    c.add_(1.0)
    kk.branch_states_out(x, d, c, buf)
    torch.testing.assert_close(buf.view(2, 2, 33), ref.branch_states(x, d, c), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_inputs(dtype):
    acc = ref.opmath_dtype(dtype)
    K, B = 3, 2
    x = torch.empty(B, 0, dtype=dtype)
    g = torch.empty(K, B, 0, dtype=dtype)
    w, c = torch.ones(B, K, dtype=acc), torch.ones(B, K, dtype=acc)
    h, o = torch.ones(B, dtype=acc), torch.zeros(B, dtype=acc)
    assert kk.epd_step_fwd(x, g, w, h, o).shape == (B, 0)
    gg, dots = kk.epd_step_bwd(x, g, w, h, o)
    assert gg.shape == (K, B, 0) and torch.equal(dots, torch.zeros(B, K, dtype=acc))
    assert kk.branch_states(x, x, c).shape == (K, B, 0)
    gx, gd, gc = kk.branch_states_bwd(g, x, c)
    assert gx.shape == (B, 0) and gd.shape == (B, 0)
    assert torch.equal(gc, torch.zeros(B, K, dtype=acc))


def test_input_validation():
    t = make_inputs(13, 2, 2, 10, torch.float16)
    x, g, w, h, o, c, d = (t[k] for k in ("x", "grads", "weights", "h", "o", "c", "d"))
    with pytest.raises(TypeError, match="weights must have dtype torch.float32"):
        kk.epd_step_fwd(x, g, w.half(), h, o)
    with pytest.raises(TypeError, match="grads must have dtype"):
        kk.epd_step_fwd(x, g.float(), w, h, o)
    with pytest.raises(ValueError, match="grads must have shape"):
        kk.epd_step_bwd(x, g[:, :1], w, h, o)
    with pytest.raises(ValueError, match="must be contiguous"):
        kk.epd_step_fwd(x, g.transpose(1, 2).contiguous().transpose(1, 2), w, h, o)
    with pytest.raises(ValueError, match="K\\*B\\*N"):
        kk.branch_states_out(x, d, c, torch.empty(2 * 2 * 10 + 1, dtype=torch.float16))
    with pytest.raises(TypeError, match="out must have dtype"):
        kk.branch_states_out(x, d, c, torch.empty(2 * 2 * 10))
    with pytest.raises(ValueError, match="out must be contiguous"):
        kk.branch_states_out(x, d, c, torch.empty(2 * 10, 2, dtype=torch.float16).t())
    with pytest.raises(ValueError, match="grad_out must have shape"):
        kk.branch_states_bwd(g[:1], d, c)


def test_import_without_triton_gives_clear_error():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, epd_kernels.kernels as kk\n"
        "assert kk.HAS_TRITON is False and kk.INTERPRET is False\n"
        "try:\n"
        "    kk.epd_step_fwd(torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1),\n"
        "                   torch.zeros(1), torch.zeros(1))\n"
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
