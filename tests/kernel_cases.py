"""Shared cases for the kernel tests (C++ and Triton): inputs on the canonical op
arguments, hypothesis strategies, per-dtype tolerances, and checks against the float64
reference.

Oracle: `epd_kernels.reference` evaluated in float64 on the same (already rounded)
inputs. The error allowed for an output is

    RTOL[dtype] * mag + (terms + 1) * tiny(dtype)

where `mag` is the same formula evaluated on absolute values (a bound on the sum of the
magnitudes of every term, so sums that cancel are not held to a relative error they
cannot have), RTOL is one rounding to the output dtype plus opmath accumulation, and
tiny is the spacing of the dtype's subnormals (an error of one subnormal ulp per term
is all that rounding in the subnormal range can give).

Magnitudes: "unit" (normal values around 1), "large" (up to about 1e4, 1e2 for float16,
whose results must stay finite), "subnormal" (data below the smallest normal of its
dtype).
"""
import torch
from hypothesis import strategies as st

from epd_kernels import reference as R

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Data-dtype outputs: one rounding (half an ulp; bf16 a full ulp, since the Triton
# interpreter truncates fp32 -> bf16) plus a few dozen opmath roundings.
RTOL = {torch.float64: 1e-13, torch.float32: 4e-6, torch.bfloat16: 2.0 ** -7,
        torch.float16: 2.0 ** -10}
# Opmath outputs (reductions): accumulation only.
RTOL_ACC = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-5,
            torch.float16: 1e-5}
LARGE = {torch.float64: 1e4, torch.float32: 1e4, torch.bfloat16: 1e4, torch.float16: 1e2}
MAGNITUDES = ("unit", "large", "subnormal")


def tiny(dtype):
    """The smallest positive subnormal of `dtype`."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def assert_close(out, want, mag, rtol, terms, what):
    assert out.shape == want.shape, f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    if out.numel() == 0:
        return
    err = (out.double() - want).abs()
    bound = rtol * mag + (terms + 1) * tiny(out.dtype)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} / {out.numel()} elements off; first at flat index {i}: "
            f"got {out.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g}")


def f64(t):
    return None if t is None else t.to(torch.float64)


def absf(t):
    return None if t is None else t.to(torch.float64).abs()


class Case:
    """Canonical inputs of every op for one (K, B, N, dtype, magnitude, forms, seed)."""

    def __init__(self, K, B, N, dtype, magnitude="unit", w_form="BK", s_form="B", seed=0):
        self.K, self.B, self.N, self.dtype = K, B, N, dtype
        self.what = (f"K={K} B={B} N={N} {dtype} {magnitude} weights {w_form} "
                     f"scale {s_form} seed {seed}")
        gen = torch.Generator().manual_seed(seed)
        acc = R.opmath_dtype(dtype)
        scale = {"unit": 1.0, "large": LARGE[dtype],
                 "subnormal": torch.finfo(dtype).smallest_normal / 4}[magnitude]

        def data(*shape):
            return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype)

        def coef(*shape):
            return (torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * 2 - 1).to(acc)

        self.x, self.d, self.grad_out = data(B, N), data(B, N), data(B, N)
        self.grads, self.grad_out_k = data(K, B, N), data(K, B, N)
        self.weights = coef(K) if w_form == "K" else coef(B, K)
        self.c = coef(K) if w_form == "K" else coef(B, K)
        self.scale = {"none": None, "0d": coef(), "B": coef(B)}[s_form]
        self.alpha = float(coef()) * 1.5

    def step_args(self, lead):
        return (lead, self.grads, self.weights, self.scale, self.alpha)

    def _rows(self, t):
        return t.expand(self.B, self.K) if t.dim() == 1 else t

    def _factor_abs(self):
        s = torch.ones(self.B, dtype=torch.float64) if self.scale is None else absf(self.scale)
        return abs(self.alpha) * s.expand(self.B)


def check_step(ops, case):
    """ops.epd_step and ops.epd_step_out against the reference."""
    t = case
    y = ops.epd_step(*t.step_args(t.x))
    assert y.dtype == t.dtype
    want = R.epd_step(f64(t.x), f64(t.grads), f64(t.weights), f64(t.scale), t.alpha)
    mag = t.x.double().abs() + t._factor_abs()[:, None] * torch.einsum(
        "bk,kbn->bn", absf(t._rows(t.weights)), absf(t.grads))
    assert_close(y, want, mag, RTOL[t.dtype], t.K, "epd_step " + t.what)
    out = torch.full_like(t.x, float("nan"))
    ops.epd_step_out(*t.step_args(t.x), out)
    assert torch.equal(out, y) or (out.isnan() == y.isnan()).all(), "epd_step_out differs"
    inplace = t.x.clone()
    ops.epd_step_out(*t.step_args(inplace), inplace)  # out is x itself
    torch.testing.assert_close(inplace, y, rtol=0, atol=0, equal_nan=True)


def check_step_backward(ops, case):
    t = case
    gg, dots = ops.epd_step_backward(*t.step_args(t.grad_out))
    assert gg.dtype == t.dtype and dots.dtype == R.opmath_dtype(t.dtype)
    want_gg, want_dots = R.epd_step_backward(f64(t.grad_out), f64(t.grads), f64(t.weights),
                                             f64(t.scale), t.alpha)
    assert_close(gg, want_gg, want_gg.abs(), RTOL[t.dtype], 1, "grad_grads " + t.what)
    mag = torch.einsum("bn,kbn->bk", absf(t.grad_out), absf(t.grads))
    assert_close(dots, want_dots, mag, RTOL_ACC[t.dtype], t.N, "dots " + t.what)


def check_branch(ops, case):
    t = case
    out = ops.branch_states(t.x, t.d, t.c)
    assert out.dtype == t.dtype
    want = R.branch_states(f64(t.x), f64(t.d), f64(t.c))
    mag = R.branch_states(absf(t.x), absf(t.d), absf(t.c))
    assert_close(out, want, mag, RTOL[t.dtype], 2, "branch_states " + t.what)
    buf = torch.full((t.K * t.B * t.N,), float("nan"), dtype=t.dtype)
    ops.branch_states_out(t.x, t.d, t.c, buf)
    torch.testing.assert_close(buf.view(out.shape), out, rtol=0, atol=0, equal_nan=True)


def check_branch_backward(ops, case):
    t = case
    gx, gd, gc = ops.branch_states_backward(t.grad_out_k, t.d, t.c)
    acc = R.opmath_dtype(t.dtype)
    assert gx.dtype == t.dtype and gd.dtype == t.dtype and gc.dtype == acc
    assert gc.shape == (t.B, t.K)
    wx, wd, wc = R.branch_states_backward(f64(t.grad_out_k), f64(t.d), f64(t.c))
    ax, ad, ac = R.branch_states_backward(absf(t.grad_out_k), absf(t.d), absf(t.c))
    assert_close(gx, wx, ax, RTOL[t.dtype], t.K, "grad_x " + t.what)
    assert_close(gd, wd, ad, RTOL[t.dtype], t.K, "grad_d " + t.what)
    assert_close(gc, wc, ac, RTOL_ACC[t.dtype], t.N, "grad_c " + t.what)


CHECKS = [check_step, check_step_backward, check_branch, check_branch_backward]


@st.composite
def cases(draw, max_b=5, n_values=None, max_n=70, exclude=()):
    """Cases with K in 1..16, B and N from 0, every dtype, magnitude and form, except
    the (dtype, magnitude) pairs in `exclude`."""
    n_st = st.integers(0, max_n)
    if n_values:
        n_st = st.one_of(n_st, st.sampled_from(n_values))
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([m for m in MAGNITUDES if (dtype, m) not in exclude]))
    return Case(K=draw(st.integers(1, 16)), B=draw(st.integers(0, max_b)), N=draw(n_st),
                dtype=dtype, magnitude=magnitude,
                w_form=draw(st.sampled_from(["K", "BK"])),
                s_form=draw(st.sampled_from(["none", "0d", "B"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))
