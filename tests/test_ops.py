"""The public fused ops on every backend against the float64 reference.

Oracle: `epd_kernels.reference` evaluated in float64 on the same (already rounded) inputs.
Tolerances are per dtype and scale with an error bound computed from absolute values, so
a sum of large terms that cancels is judged against the size of its terms, as rounding is.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epd_kernels
from epd_kernels import backends, epd_step
from epd_kernels.ops import branch_states, branch_states_into
from epd_kernels import reference as ref

from conftest import require_cpp
from epd_kernels.kernels import INTERPRET

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative to the magnitude bound: the output rounding (half an ulp) plus fp32 accumulation.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Reductions (grad_weights, grad_h, grad_o) come back in float32 (float64): their error is
# accumulation only, judged against the sum of |terms|.
RTOL_REDUCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def _tiny(dtype):
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps  # the smallest subnormal


# Absolute floors, in subnormal ulps: float32/float64 accumulate up to K + 2 roundings in
# their subnormal range; float16/bfloat16 accumulate in float32 (where their subnormals
# are normal) and round once. Reductions sum up to N subnormal products in opmath.
ATOL = {torch.float64: 20 * _tiny(torch.float64), torch.float32: 20 * _tiny(torch.float32),
        torch.float16: _tiny(torch.float16), torch.bfloat16: _tiny(torch.bfloat16)}
ATOL_REDUCE = {torch.float64: 1e4 * _tiny(torch.float64), torch.float32: 1e4 * _tiny(torch.float32),
               torch.float16: 1e4 * _tiny(torch.float32), torch.bfloat16: 1e4 * _tiny(torch.float32)}

BACKENDS = ["cpp", "triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    _use_backend(name)
    return name


# --------------------------------------------------------------------------------------
# input generation

# Data magnitudes: around 1, large (1e4; 1e2 for float16, whose results must stay
# finite), and subnormal (below the smallest normal of the data dtype). ATOL above is
# far below any normal value of its dtype and covers the rounding of subnormals.
MAGNITUDES = ("unit", "large", "subnormal")


def _magnitude(name, dtype):
    return {"unit": 1.0, "large": 1e2 if dtype == torch.float16 else 1e4,
            "subnormal": torch.finfo(dtype).smallest_normal / 4}[name]


def _values(shape, gen, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _with_layout(values, layout, dtype):
    """The same values as a tensor of the requested memory layout."""
    if layout == "contiguous":
        return values.to(dtype)
    if layout == "strided":
        # Interleave with junk along the last dim and take every other element.
        big = torch.full(values.shape[:-1] + (2 * values.shape[-1],), float("nan"),
                         dtype=torch.float64)
        big[..., ::2] = values
        out = big.to(dtype)[..., ::2]
        assert not out.is_contiguous() or values.shape[-1] <= 1 or values.numel() == 0
        return out
    if layout == "transposed":
        return values.transpose(0, -1).contiguous().to(dtype).transpose(0, -1)
    raise AssertionError(layout)


def _expanded(values_one, batch, dtype, batch_dim):
    """A tensor whose batch dimension has stride 0 (broadcast of one sample)."""
    shape = list(values_one.shape)
    shape[batch_dim] = batch
    return values_one.to(dtype).expand(shape)


@st.composite
def step_cases(draw, small=False):
    K = draw(st.integers(1, 16))
    B = draw(st.integers(0, 4 if small else 6))
    ndim = draw(st.integers(0, 3))
    dims = [draw(st.integers(0, 5 if small else 9)) for _ in range(ndim)]
    if not small and draw(st.integers(0, 9)) == 0:
        dims = [draw(st.integers(4000, 20000))]  # occasionally a larger sample
    dtype = draw(st.sampled_from(DTYPES))
    x_layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "expanded"]))
    g_layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "expanded", "list"]))
    w_form = draw(st.sampled_from(["K", "BK", "BK_expanded"]))
    h_form = draw(st.sampled_from(["float", "0d", "B"]))
    o_form = draw(st.sampled_from(["default", "float", "0d", "B"]))
    # The Triton interpreter (small=True) converts bfloat16 subnormals wrongly; see
    # test_triton_kernels.INTERPRETER_EXCLUDES.
    allowed = MAGNITUDES[:2] if small and dtype == torch.bfloat16 else MAGNITUDES
    magnitude = draw(st.sampled_from(allowed))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(K=K, B=B, dims=dims, dtype=dtype, x_layout=x_layout, g_layout=g_layout,
                w_form=w_form, h_form=h_form, o_form=o_form, magnitude=magnitude, seed=seed)


def build_step_inputs(case, requires_grad=False):
    """User-facing inputs (in the case's layouts) and float64 canonical copies for the oracle."""
    gen = torch.Generator().manual_seed(case["seed"])
    K, B, dims, dtype = case["K"], case["B"], case["dims"], case["dtype"]
    xshape = [B] + dims
    mag = _magnitude(case.get("magnitude", "unit"), dtype)

    def _values(shape, gen):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * mag

    def _unit(shape, gen):  # coefficients keep their size
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    if case["x_layout"] == "expanded":
        x = _expanded(_values([1] + dims, gen), B, dtype, 0)
    else:
        x = _with_layout(_values(xshape, gen), case["x_layout"], dtype)
    gl = case["g_layout"]
    if gl == "expanded":
        g = _expanded(_values([K, 1] + dims, gen), B, dtype, 1)
    elif gl == "list":
        g = [_with_layout(_values(xshape, gen), "strided", dtype) for _ in range(K)]
    else:
        g = _with_layout(_values([K] + xshape, gen), gl, dtype)
    acc = ref.opmath_dtype(dtype)
    wf = case["w_form"]
    if wf == "K":
        w = _unit([K], gen).to(acc)
    elif wf == "BK":
        w = _unit([B, K], gen).to(acc)
    else:
        w = _unit([1, K], gen).to(acc).expand(B, K)

    def scalar(form, lo, hi):
        u = torch.rand([B + 1], generator=gen, dtype=torch.float64) * (hi - lo) + lo
        if form == "float":
            return float(u[0])
        if form == "0d":
            return u[0].to(acc)
        if form == "B":
            return u[:B].to(acc)
        return None

    h = scalar(case["h_form"], -1.0, 1.0)
    o = scalar(case["o_form"], -0.3, 0.3)
    if requires_grad:
        x = x.detach().requires_grad_(True)
        if isinstance(g, list):
            g = [t.detach().requires_grad_(True) for t in g]
        else:
            g = g.detach().requires_grad_(True)
        w = w.detach().requires_grad_(True)
        if isinstance(h, torch.Tensor):
            h = h.detach().requires_grad_(True)
        if isinstance(o, torch.Tensor):
            o = o.detach().requires_grad_(True)
    return x, g, w, h, o


def _step64(x, g, w, h, o):
    """The EPD step on [B, N] float64 tensors with [B, K] w and [B] h, o (the oracle)."""
    return x + ((1 + o) * h)[:, None] * torch.einsum("bk,kbn->bn", w, g)


def _branches64(x, d, c):
    """out[k] = x + c[:, k] * d on [B, N] float64 tensors with [B, K] c (the oracle)."""
    return x[None] + c.t()[:, :, None] * d[None]


def _f64(t):
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64)
    if isinstance(t, list):
        return torch.stack([_f64(v) for v in t])
    return t


def _call(x, g, w, h, o):
    return epd_step(x, g, w, h) if o is None else epd_step(x, g, w, h, o)


def _oracle_forward(x, g, w, h, o):
    """float64 reference on canonical shapes plus a magnitude bound of the same shape."""
    B = x.shape[0]
    x64, g64 = _f64(x).reshape(B, math.prod(x.shape[1:])), _f64(g).reshape(g.shape[0] if not isinstance(g, list) else len(g), B, math.prod(x.shape[1:]))
    K = g64.shape[0]
    w64 = _f64(w).expand(B, K) if _f64(w).dim() == 2 else _f64(w)[None].expand(B, K)

    def vec(v):
        if v is None:
            return torch.zeros(B, dtype=torch.float64)
        if isinstance(v, torch.Tensor):
            return _f64(v).expand(B)
        return torch.full((B,), float(v), dtype=torch.float64)

    h64, o64 = vec(h), vec(o)
    y = _step64(x64, g64, w64, h64, o64)
    bound = _step64(x64.abs(), g64.abs(), w64.abs(), h64.abs(), (1 + o64).abs() - 1)
    return y.reshape(x.shape), bound.reshape(x.shape)


def _assert_close(actual, expected, bound, rtol, atol, what):
    err = (actual.to(torch.float64) - expected).abs()
    tol = rtol * bound + atol
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off; first at {i}: got "
            f"{actual[tuple(i)].item()!r}, want {expected[tuple(i)].item()!r}, tol {tol[tuple(i)].item():.3g}")


# --------------------------------------------------------------------------------------
# forward and backward against the oracle


def _run_forward_case(case):
    x, g, w, h, o = build_step_inputs(case)
    y = _call(x, g, w, h, o)
    assert y.shape == x.shape and y.dtype == x.dtype
    want, bound = _oracle_forward(x, g, w, h, o)
    _assert_close(y, want, bound, RTOL[case["dtype"]], ATOL[case["dtype"]], f"forward {case}")


def _run_backward_case(case):
    x, g, w, h, o = build_step_inputs(case, requires_grad=True)
    y = _call(x, g, w, h, o)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    leaves = [x] + (g if isinstance(g, list) else [g]) + [w] + [v for v in (h, o) if isinstance(v, torch.Tensor)]
    got = torch.autograd.grad(y, leaves, gy)

    # Oracle: autograd of the float64 reference, from the same rounded values.
    leaves64 = [v.detach().to(torch.float64).requires_grad_(True) for v in leaves]
    it = iter(leaves64)
    x64 = next(it)
    g64 = [next(it) for _ in g] if isinstance(g, list) else next(it)
    w64 = next(it)
    h64 = next(it) if isinstance(h, torch.Tensor) else h
    o64 = next(it) if isinstance(o, torch.Tensor) else o
    B = x.shape[0]
    gs = torch.stack(g64) if isinstance(g64, list) else g64

    def expand_b(v):
        if v is None:
            return torch.zeros(B, dtype=torch.float64)
        if isinstance(v, torch.Tensor):
            return v.expand(B)
        return torch.full((B,), float(v), dtype=torch.float64)

    wk = w64 if w64.dim() == 2 else w64[None].expand(B, -1)
    y64 = _step64(x64.reshape(B, math.prod(x.shape[1:])), gs.reshape(gs.shape[0], B, math.prod(x.shape[1:])), wk, expand_b(h64), expand_b(o64))
    want = torch.autograd.grad(y64, leaves64, gy.to(torch.float64).reshape(B, math.prod(x.shape[1:])))
    # Bounds: the same gradients of the reference with every term made non-negative:
    # |x|, |g|, |w|, |h| and (1 + o) -> |1 + o| (o itself stays a signed leaf so that the
    # derivative of |1 + o| has the magnitude |h| * sum |w||g.gy|).
    o_leaf_index = len(leaves) - 1 if isinstance(o, torch.Tensor) else -1
    bound_leaves = [v.detach().clone() if i == o_leaf_index else v.detach().abs()
                    for i, v in enumerate(leaves64)]
    bound_leaves = [v.requires_grad_(True) for v in bound_leaves]
    it = iter(bound_leaves)
    ax = next(it)
    ag = [next(it) for _ in g] if isinstance(g, list) else next(it)
    aw = next(it)
    ah = next(it) if isinstance(h, torch.Tensor) else abs(h)
    ao = next(it) if isinstance(o, torch.Tensor) else (0.0 if o is None else o)
    ags = torch.stack(ag) if isinstance(ag, list) else ag
    awk = aw if aw.dim() == 2 else aw[None].expand(B, -1)
    o_mag = (1 + expand_b(ao)).abs() - 1
    yb = _step64(ax.reshape(B, math.prod(x.shape[1:])), ags.reshape(ags.shape[0], B, math.prod(x.shape[1:])), awk, expand_b(ah), o_mag)
    bounds = torch.autograd.grad(yb, bound_leaves, gy.abs().to(torch.float64).reshape(B, math.prod(x.shape[1:])))
    dtype = case["dtype"]
    n_data = 1 + (len(g) if isinstance(g, list) else 1)
    for i, (a, e, b) in enumerate(zip(got, want, bounds)):
        rtol, atol = (RTOL[dtype], ATOL[dtype]) if i < n_data else (RTOL_REDUCE[dtype], ATOL_REDUCE[dtype])
        _assert_close(a, e, b.abs(), rtol, atol, f"grad #{i} {case}")


# The interpreter runs Triton programs in Python, one launch costing ~0.1 s: it gets
# fewer and smaller examples than the compiled backends.
EXAMPLES = {"cpp": 60, "reference": 30, "triton": 12}
_HYPO = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])


def _use_backend(name):
    if name not in backends.available():
        if require_cpp():
            pytest.fail(f"backend {name} is not available but CI requires it")
        pytest.skip(f"backend {name} not available here ({backends.available()})")
    if name == "triton" and not INTERPRET:
        pytest.skip("these tests use CPU tensors; compiled Triton is covered by the "
                    "gpu-marked tests of test_triton_kernels.py")
    backends.set_backend(name)


def _forward_property(name):
    @settings(max_examples=EXAMPLES[name], **_HYPO)
    @given(case=step_cases(small=name == "triton"))
    def test(case):
        _use_backend(name)
        _run_forward_case(case)
    test.__name__ = f"test_forward_matches_float64_reference_{name}"
    return test


def _backward_property(name):
    @settings(max_examples=EXAMPLES[name], **_HYPO)
    @given(case=step_cases(small=name == "triton"))
    def test(case):
        _use_backend(name)
        _run_backward_case(case)
    test.__name__ = f"test_backward_matches_float64_reference_{name}"
    return test


for _name in BACKENDS:
    globals()[f"test_forward_matches_float64_reference_{_name}"] = _forward_property(_name)
    globals()[f"test_backward_matches_float64_reference_{_name}"] = _backward_property(_name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_forward_and_backward(backend, dtype):
    """One large case per dtype (more than a block/thread chunk, odd length)."""
    n = 1_000_003 if backend != "triton" else 20_001
    case = dict(K=3, B=2, dims=[n // 2], dtype=dtype, x_layout="contiguous",
                g_layout="contiguous", w_form="BK", h_form="B", o_form="B", seed=7)
    _run_forward_case(case)
    _run_backward_case(case)


# --------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(0)
    # Numerical Jacobians call the op twice per input element: tiny shapes for the interpreter.
    tail = (2,) if backend == "triton" else (4, 5)
    x = torch.randn(3, *tail, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, *tail, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.rand(3, generator=gen, dtype=torch.float64, requires_grad=True)
    o = torch.rand(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(epd_step, (x, g, w, h, o))
    wk = torch.rand(2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, w: epd_step(x, g, w, -0.3, 0.05), (x, g, wk))
    d = torch.randn(3, *tail, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(branch_states, (x, d, c))


def test_opcheck(backend):
    gen = torch.Generator().manual_seed(1)
    E = torch.ops.epd_kernels
    for dtype in (torch.float32, torch.float64):
        acc = ref.opmath_dtype(dtype)
        x = torch.randn(3, 10, generator=gen).to(dtype)
        g = torch.randn(2, 3, 10, generator=gen).to(dtype)
        for w, s in [(torch.rand(3, 2).to(acc), torch.rand(3).to(acc)),
                     (torch.rand(2).to(acc), None), (torch.rand(2).to(acc), torch.rand(()).to(acc))]:
            torch.library.opcheck(E.epd_step.default, (x, g, w, s, 0.7))
            torch.library.opcheck(
                E.epd_step.default,
                (x.clone().requires_grad_(), g.clone().requires_grad_(), w.clone().requires_grad_(),
                 None if s is None else s.clone().requires_grad_(), 0.7))
            torch.library.opcheck(E.epd_step_out.default, (x, g, w, s, 0.7, torch.empty_like(x)))
        d, c = torch.randn(3, 10).to(dtype), torch.rand(3, 4).to(acc)
        for cc in (c, c[0].contiguous()):
            torch.library.opcheck(E.branch_states.default, (x, d, cc))
            torch.library.opcheck(E.branch_states.default,
                                  (x.clone().requires_grad_(), d, cc.clone().requires_grad_()))
            out = torch.empty(4, 3, 10, dtype=dtype)
            torch.library.opcheck(E.branch_states_out.default, (x, d, cc, out))


def test_torch_compile_fullgraph(backend):
    def f(x, g, w, h):
        return epd_step(x, g, w, h, 0.1) * 2

    cf = torch.compile(f, fullgraph=True)
    x, g, w = torch.randn(4, 8, 8), torch.randn(3, 4, 8, 8), torch.softmax(torch.randn(3), 0)
    h = torch.rand(4)
    torch.testing.assert_close(cf(x, g, w, h), f(x, g, w, h))
    xr = x.clone().requires_grad_()
    cf(xr, g, w, h).sum().backward()
    torch.testing.assert_close(xr.grad, torch.full_like(x, 2.0))


def test_second_order_gradients_refused():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    y = epd_step(x, g, w, 0.5)
    (gw,) = torch.autograd.grad(y.pow(2).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        gw.sum().backward()


# --------------------------------------------------------------------------------------
# branch states


@st.composite
def branch_cases(draw):
    return dict(K=draw(st.integers(1, 8)), B=draw(st.integers(1, 5)),
                dims=draw(st.lists(st.integers(1, 9), max_size=3)),
                dtype=draw(st.sampled_from(DTYPES)), c_form=draw(st.sampled_from(["K", "BK"])),
                layout=draw(st.sampled_from(["contiguous", "strided"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _branch_property(name):
    @settings(max_examples=EXAMPLES[name], **_HYPO)
    @given(case=branch_cases())
    def test(case):
        _use_backend(name)
        _run_branch_case(**case)
    test.__name__ = f"test_branch_states_match_reference_{name}"
    return test


def _run_branch_case(K, B, dims, dtype, c_form, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = [B] + dims
    x = _with_layout(_values(shape, gen), layout if dims else "contiguous", dtype)
    d = _with_layout(_values(shape, gen), layout if dims else "contiguous", dtype)
    acc = ref.opmath_dtype(dtype)
    c = (_values([K], gen) if c_form == "K" else _values([B, K], gen)).to(acc)
    out = branch_states(x, d, c)
    assert out.shape == (K, *shape) and out.dtype == dtype
    c64 = c.to(torch.float64)
    c64 = c64[None].expand(B, K) if c64.dim() == 1 else c64
    x64, d64 = x.to(torch.float64).reshape(B, math.prod(dims)), d.to(torch.float64).reshape(B, math.prod(dims))
    want = _branches64(x64, d64, c64).reshape(out.shape)
    bound = _branches64(x64.abs(), d64.abs(), c64.abs()).reshape(out.shape)
    _assert_close(out, want, bound, RTOL[dtype], ATOL[dtype], "branch_states")
    buf = torch.full((K * B, *dims), float("nan"), dtype=dtype)
    branch_states_into(x, d, c, buf)
    _assert_close(buf.reshape(out.shape), want, bound, RTOL[dtype], ATOL[dtype], "branch_states_into")
    # backward
    xr, dr, cr = (t.detach().clone().requires_grad_(True) for t in (x, d, c))
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)
    got = torch.autograd.grad(branch_states(xr, dr, cr), (xr, dr, cr), gout.to(dtype))
    l64 = [t.detach().to(torch.float64).requires_grad_(True) for t in (x, d, c)]
    cc = l64[2][None].expand(B, K) if l64[2].dim() == 1 else l64[2]
    want_g = torch.autograd.grad(_branches64(l64[0].reshape(B, math.prod(dims)), l64[1].reshape(B, math.prod(dims)), cc),
                                 l64, gout.reshape(K, B, math.prod(dims)))
    a64 = [t.detach().abs().requires_grad_(True) for t in l64]
    ca = a64[2][None].expand(B, K) if a64[2].dim() == 1 else a64[2]
    bnd = torch.autograd.grad(_branches64(a64[0].reshape(B, math.prod(dims)), a64[1].reshape(B, math.prod(dims)), ca),
                              a64, gout.abs().reshape(K, B, math.prod(dims)))
    for i, (a, e, b) in enumerate(zip(got, want_g, bnd)):
        rtol, atol = (RTOL[dtype], ATOL[dtype]) if i < 2 else (RTOL_REDUCE[dtype], ATOL_REDUCE[dtype])
        _assert_close(a, e, b, rtol, atol, f"branch_states grad #{i}")


for _name in BACKENDS:
    globals()[f"test_branch_states_match_reference_{_name}"] = _branch_property(_name)


# --------------------------------------------------------------------------------------
# bad input


def _good():
    return torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4)


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: (torch.randn(2, 3), torch.randn(4, 3, 3), torch.rand(4), 0.1), ValueError, "batch mismatch"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 5), torch.rand(4), 0.1), ValueError, "trailing shape"),
    (lambda: (torch.randn(2, 3), torch.randn(0, 2, 3), torch.rand(0), 0.1), ValueError, "K = 0"),
    (lambda: (torch.randn(2, 3), [], torch.rand(0), 0.1), ValueError, "K >= 1"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(3), 0.1), ValueError, "weights must have shape"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(3, 4), 0.1), ValueError, "weights must have shape"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4), torch.rand(3)), ValueError, "h must be"),
    (lambda: (torch.randint(0, 3, (2, 3)), torch.randn(4, 2, 3), torch.rand(4), 0.1), TypeError, "x must be float"),
    (lambda: (torch.randn(2, 3), torch.randint(0, 3, (4, 2, 3)), torch.rand(4), 0.1), TypeError, "grads must be float"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.randint(0, 2, (4,)), 0.1), TypeError, "weights must be float"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3, dtype=torch.float64), torch.rand(4), 0.1), TypeError, "grads has dtype"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4), "0.1"), TypeError, "h must be a float"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4), 0.1, torch.rand(5)), ValueError, "o must be"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4), torch.tensor([1, 2])), TypeError, "h must be a floating"),
    (lambda: (torch.randn(2, 3), torch.randn(2, 3), torch.rand(4), 0.1), ValueError, "grads must have shape"),
    (lambda: (torch.randn(2, 3), [torch.randn(2, 3), torch.randn(2, 4)], torch.rand(2), 0.1), ValueError, r"grads\[1\]"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3, device="meta"), torch.rand(4), 0.1), ValueError, "grads is on meta"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4, device="meta"), 0.1), ValueError, "weights is on meta"),
    (lambda: (torch.randn(2, 3), torch.randn(4, 2, 3), torch.rand(4), torch.rand(2, device="meta")), ValueError, "h is on meta"),
])
def test_bad_input_is_named(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        epd_step(*make())


def test_bad_branch_state_inputs():
    x, d = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="d has shape"):
        branch_states(x, torch.randn(2, 4), torch.rand(3))
    with pytest.raises(ValueError, match="c must have shape"):
        branch_states(x, d, torch.rand(3, 3))
    with pytest.raises(ValueError, match="K = 0"):
        branch_states(x, d, torch.rand(0))
    with pytest.raises(ValueError, match="out must be contiguous with K\\*B\\*N = 18"):
        branch_states_into(x, d, torch.rand(3), torch.empty(3, 2, 4))
    with pytest.raises(ValueError, match="non-contiguous"):
        branch_states_into(x, d, torch.rand(3), torch.empty(3, 2, 6)[..., ::2])
    with pytest.raises(TypeError, match="out has dtype"):
        branch_states_into(x, d, torch.rand(3), torch.empty(3, 2, 3, dtype=torch.float64))


def test_non_finite_values_pass_through(backend):
    x = torch.tensor([[1.0, float("nan"), 3.0]])
    g = torch.tensor([[[float("inf"), 1.0, 1.0]], [[1.0, 1.0, -2.0]]])
    y = epd_step(x, g, torch.tensor([0.5, 0.5]), 1.0)
    assert math.isinf(y[0, 0].item()) and math.isnan(y[0, 1].item())
    assert y[0, 2].item() == pytest.approx(2.5)


def test_empty_trailing_dims(backend):
    x, g = torch.randn(3, 0), torch.randn(2, 3, 0)
    assert epd_step(x, g, torch.rand(2), 0.5).shape == (3, 0)


def test_fallback_warns_once_when_extension_missing(monkeypatch):
    """Without the compiled library the ops run the reference and say so once."""
    import epd_kernels.ops as ops_module

    monkeypatch.setattr(backends, "LIBRARY_LOADED", False)
    monkeypatch.setattr(backends, "_LIBRARY_ERROR", "ImportError: simulated")
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.setattr(ops_module, "_OPS", ref)
    x, g, w = _good()
    with pytest.warns(RuntimeWarning, match="compiled extension did not load"):
        y = epd_step(x, g, w, 0.5)
    torch.testing.assert_close(y, x + 0.5 * torch.einsum("k,kbn->bn", w, g))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epd_step(x, g, w, 0.5)  # second call: silent
        xr = x.clone().requires_grad_()
        epd_step(xr, g, w, 0.5).sum().backward()  # the reference is differentiable
    torch.testing.assert_close(xr.grad, torch.ones_like(x))


def test_public_names():
    # The top level is what a user needs; the branch-state ops are the samplers' internals.
    for name in ("epd_step", "set_backend", "sample", "distill", "EPDParams", "get_sigmas",
                 "make_noise"):
        assert hasattr(epd_kernels, name) and name in epd_kernels.__all__
    for name in ("branch_states", "branch_states_into", "CountingDenoiser", "parallel_calls"):
        assert not hasattr(epd_kernels, name)
    assert all(hasattr(epd_kernels, n) for n in epd_kernels.__all__)


# --------------------------------------------------------------------------------------
# out=, canonical shapes, backends


def test_out_writes_into_the_callers_buffer(backend):
    x, g, w = torch.randn(4, 6), torch.randn(3, 4, 6), torch.rand(3)
    want = epd_step(x, g, w, 0.3, 0.1)
    out = torch.full_like(x, float("nan"))
    assert epd_step(x, g, w, 0.3, 0.1, out=out) is out
    torch.testing.assert_close(out, want)
    strided = torch.full((4, 12), float("nan"))[:, ::2]  # non-contiguous buffer
    epd_step(x, g, w, torch.full((4,), 0.3), 0.1, out=strided)
    torch.testing.assert_close(strided, want)
    xi = x.clone()
    epd_step(xi, g, w, 0.3, 0.1, out=xi)  # in place: out is x itself
    torch.testing.assert_close(xi, want)
    xt = x.t().contiguous().t()  # in place on a non-contiguous x
    epd_step(xt, g, w, 0.3, 0.1, out=xt)
    torch.testing.assert_close(xt, want)
    buf = torch.full((3, 4, 6), float("nan"))
    assert branch_states(x, g[0], w, out=buf) is buf
    torch.testing.assert_close(buf, branch_states(x, g[0], w))


def test_out_refuses_overlap_and_autograd():
    x, g, w = torch.randn(4, 6), torch.randn(3, 4, 6), torch.rand(3)
    with pytest.raises(ValueError, match="out overlaps grads"):
        epd_step(x, g, w, 0.3, out=g[1])
    big = torch.randn(25)
    with pytest.raises(ValueError, match="out overlaps x"):
        epd_step(big[:24].view(4, 6), g, w, 0.3, out=big[1:].view(4, 6))
    with pytest.raises(ValueError, match="out must have shape"):
        epd_step(x, g, w, 0.3, out=torch.empty(4, 5))
    with pytest.raises(TypeError, match="out has dtype"):
        epd_step(x, g, w, 0.3, out=torch.empty(4, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="weights requires grad"):
        epd_step(x, g, w.clone().requires_grad_(), 0.3, out=torch.empty(4, 6))
    with torch.no_grad():  # outside autograd the same call is fine
        epd_step(x, g, w.clone().requires_grad_(), 0.3, out=torch.empty(4, 6))
    shared = torch.empty(72)
    shared[:24] = x.view(-1)
    with pytest.raises(ValueError, match="out overlaps x"):
        branch_states_into(shared[:24].view(4, 6), g[0], w, shared)
    buf = torch.empty(3 * 24)
    with pytest.raises(ValueError, match="out overlaps d"):
        branch_states_into(x, buf[:24].view(4, 6), w, buf)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "epd_kernels":
            self.calls.append((func.__name__.split(".")[0],
                               [None if not isinstance(a, torch.Tensor) else tuple(a.shape)
                                for a in args]))
        return func(*args, **(kwargs or {}))


def test_uniform_coefficients_are_not_expanded():
    """[K] weights with float h/o reach the kernel as one row, a [K] tensor and a float:
    a 1-D x of N elements is the same launch as [8, N/8]."""
    N, K = 4096, 3
    x, g, w = torch.randn(N), torch.randn(K, N), torch.rand(K)
    with _RecordOps() as rec:
        y1 = epd_step(x, g, w, 0.3, 0.1)
        y8 = epd_step(x.view(8, -1), g.view(K, 8, -1), w, 0.3, 0.1)
        epd_step(x.view(8, -1), g.view(K, 8, -1), w, torch.rand(8), 0.1)  # per sample
    torch.testing.assert_close(y1, y8.view(-1), rtol=0, atol=0)
    (op1, a1), (op8, a8), (opb, ab) = rec.calls
    assert op1 == op8 == opb == "epd_step"
    assert a1 == a8 == [(1, N), (K, 1, N), (K,), None, None]
    assert ab == [(8, N // 8), (K, 8, N // 8), (K,), (8,), None]


def test_backend_env_var_and_available():
    import subprocess
    import sys

    def run(code, **env):
        full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                                 "EPD_KERNELS_BACKEND")}
        full.update(env)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=full, timeout=120)

    res = run("import epd_kernels", EPD_KERNELS_BACKEND="nonsense")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: EPD_KERNELS_BACKEND='nonsense'") and "reference" in last
    res = run("import torch, epd_kernels.backends as b; print(b.available(), torch.cuda.is_available())")
    names, cuda = res.stdout.strip().rsplit(" ", 1)
    assert ("'triton'" in names) == (cuda == "True"), res.stdout + res.stderr
    res = run("import epd_kernels.backends as b; print(b.available())", TRITON_INTERPRET="1")
    assert "'triton'" in res.stdout, res.stderr


def test_float16_overflow_behaviour(backend):
    """As the epd_step docstring states: float16 accumulates in float32, so terms beyond
    65504 that cancel give a finite result, and a result beyond it becomes inf."""
    big = 1.5 * 2.0 ** 15  # exact in float16; 2 * big is not representable
    x = torch.zeros(1, 3, dtype=torch.float16)
    g = torch.tensor([[[big, big, -big]], [[big, -big, -big]]], dtype=torch.float16)
    w = torch.tensor([1.0, 1.0])
    assert epd_step(x, g, w, 0.25).tolist() == [[big / 2, 0.0, -big / 2]]
    y = epd_step(x, g, w, 1.0)
    assert y.tolist() == [[float("inf"), 0.0, float("-inf")]]
    # Eager float16 arithmetic overflows in the sum already:
    assert torch.isinf((g[0] + g[1]))[0, 0]
