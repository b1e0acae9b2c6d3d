"""The C++ CPU kernels (torch.ops.epd_kernels_cpp.*) against epd_kernels.reference.

The ops are called directly, below the Python op layer. Every result is compared with the
reference evaluated in float64 on the same (already rounded) inputs, with a per-dtype
relative tolerance applied to the natural error scale of each output: the same formula
evaluated on absolute values (so sums that cancel are not held to a relative error they
cannot have).

The extension and the reference are loaded by file path so that these tests do not depend
on the package's __init__ (and whatever it imports); if that fails they fall back to a
normal import.
"""
from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def _package_dir():
    spec = importlib.util.find_spec("epd_kernels")  # finds, does not execute, __init__
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    # Not importable (e.g. `pytest` run from elsewhere without an install): the source tree.
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "epd_kernels")
    return here if os.path.isdir(here) else None


def _load():
    pkg = _package_dir()
    so_files = []
    if pkg is not None:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            so_files += glob.glob(os.path.join(pkg, "_C" + suffix))
    if so_files:
        torch.ops.load_library(so_files[0])  # runs the TORCH_LIBRARY registrations
        spec = importlib.util.spec_from_file_location(
            "_epd_kernels_reference_for_cpp_tests", os.path.join(pkg, "reference.py"))
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
        return reference
    importlib.import_module("epd_kernels._C")
    return importlib.import_module("epd_kernels.reference")


try:
    R = _load()
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the build
    pytest.skip(
        f"epd_kernels._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`",
        allow_module_level=True,
    )

ops = torch.ops.epd_kernels_cpp
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance on the error scale. Data-dtype outputs are rounded once (half an
# ulp, i.e. eps/2 of the scale at most); opmath (float) accumulation adds ~K * 6e-8.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5,
        torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
OPMATH_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5,
               torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_close(out, ref, scale, rtol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    err = (out.double() - ref).abs()
    # Plus the spacing of out's subnormals: float16 results below 6e-5 are subnormal.
    fi = torch.finfo(out.dtype)
    bound = rtol * scale + fi.smallest_normal * fi.eps
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} / {out.numel()} elements off; first at flat index {i}: "
            f"got {out.flatten()[i].item()!r}, want {ref.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g} (rtol {rtol:g})")


def make_inputs(K, B, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    acc = R.opmath_dtype(dtype)

    def data(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def coef(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(acc)

    return dict(x=data(B, N), grads=data(K, B, N), weights=coef(B, K), h=coef(B), o=coef(B),
                c=coef(B, K), d=data(B, N), gk=data(K, B, N))


def f64(t):
    return t.to(torch.float64)


def check_step_fwd(K, B, N, dtype, seed):
    t = make_inputs(K, B, N, dtype, seed)
    x, g, w, h, o = t["x"], t["grads"], t["weights"], t["h"], t["o"]
    y = ops.epd_step_fwd(x, g, w, h, o)
    assert y.dtype == dtype
    ref = R.epd_step(f64(x), f64(g), f64(w), f64(h), f64(o))
    s = ((1 + f64(o)).abs() * f64(h).abs())[:, None]
    scale = f64(x).abs() + s * torch.einsum("bk,kbn->bn", f64(w).abs(), f64(g).abs())
    assert_close(y, ref, scale, RTOL[dtype], f"epd_step_fwd {dtype} K={K} B={B} N={N}")


def check_step_bwd(K, B, N, dtype, seed):
    t = make_inputs(K, B, N, dtype, seed)
    go, g, w, h, o = t["x"], t["grads"], t["weights"], t["h"], t["o"]
    gg, dots = ops.epd_step_bwd(go, g, w, h, o)
    assert gg.dtype == dtype and dots.dtype == R.opmath_dtype(dtype)
    ref_gg, ref_dots = R.epd_step_backward(f64(go), f64(g), f64(w), f64(h), f64(o))
    what = f"epd_step_bwd {dtype} K={K} B={B} N={N}"
    assert_close(gg, ref_gg, ref_gg.abs(), RTOL[dtype], what + " grad_grads")
    dots_scale = torch.einsum("bn,kbn->bk", f64(go).abs(), f64(g).abs())
    assert_close(dots, ref_dots, dots_scale, OPMATH_RTOL[dtype], what + " dots")


def check_branch(K, B, N, dtype, seed):
    t = make_inputs(K, B, N, dtype, seed)
    x, d, c = t["x"], t["d"], t["c"]
    out = ops.branch_states(x, d, c)
    assert out.dtype == dtype
    ref = R.branch_states(f64(x), f64(d), f64(c))
    scale = f64(x).abs()[None] + f64(c).abs().t()[:, :, None] * f64(d).abs()[None]
    what = f"branch_states {dtype} K={K} B={B} N={N}"
    assert_close(out, ref, scale, RTOL[dtype], what)
    # The out= variant writes the same values into a flat static buffer.
    buf = torch.full((K * B * N,), float("nan"), dtype=dtype)
    ops.branch_states_out(x, d, c, buf)
    assert torch.equal(buf.view(K, B, N), out), what + " (out= variant differs)"


def check_branch_bwd(K, B, N, dtype, seed):
    t = make_inputs(K, B, N, dtype, seed)
    go, d, c = t["gk"], t["d"], t["c"]
    gx, gd, gc = ops.branch_states_bwd(go, d, c)
    assert gx.dtype == dtype and gd.dtype == dtype and gc.dtype == R.opmath_dtype(dtype)
    ref_gx, ref_gd, ref_gc = R.branch_states_backward(f64(go), f64(d), f64(c))
    what = f"branch_states_bwd {dtype} K={K} B={B} N={N}"
    assert_close(gx, ref_gx, f64(go).abs().sum(0), RTOL[dtype], what + " grad_x")
    gd_scale = torch.einsum("bk,kbn->bn", f64(c).abs(), f64(go).abs())
    assert_close(gd, ref_gd, gd_scale, RTOL[dtype], what + " grad_d")
    gc_scale = torch.einsum("kbn,bn->bk", f64(go).abs(), f64(d).abs())
    assert_close(gc, ref_gc, gc_scale, OPMATH_RTOL[dtype], what + " grad_c")


CHECKS = [check_step_fwd, check_step_bwd, check_branch, check_branch_bwd]
SIZES = dict(
    K=st.integers(1, 8),
    B=st.integers(1, 5),
    # 1, odd sizes, sizes around the vector widths and past one 1024-element block.
    N=st.one_of(st.integers(1, 70), st.sampled_from([127, 255, 1023, 1025, 2049, 4099])),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[len("check_"):])
@settings(max_examples=40, deadline=None)
@given(**SIZES)
def test_random_shapes(check, K, B, N, dtype, seed):
    check(K, B, N, dtype, seed)


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
    check(K, B, N, dtype, seed=K * 1000 + B * 10 + N)


def test_large_fp32_reduction_is_accurate():
    # A naive float running sum over 2^20 products is typically off by ~1e-5 of the
    # scale; the blocked float + double combination must do two orders better.
    t = make_inputs(2, 1, 1 << 20, torch.float32, seed=7)
    go, g, w, h, o = t["x"], t["grads"], t["weights"], t["h"], t["o"]
    _, dots = ops.epd_step_bwd(go, g, w, h, o)
    ref = torch.einsum("bn,kbn->bk", f64(go), f64(g))
    scale = torch.einsum("bn,kbn->bk", f64(go).abs(), f64(g).abs())
    assert_close(dots, ref, scale, 1e-7, "dots over 2^20 fp32 elements")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows(dtype):
    K, B, N = 3, 2, 0
    t = make_inputs(K, B, N, dtype, seed=0)
    x, g, w, h, o, c = t["x"], t["grads"], t["weights"], t["h"], t["o"], t["c"]
    assert ops.epd_step_fwd(x, g, w, h, o).shape == (B, 0)
    gg, dots = ops.epd_step_bwd(x, g, w, h, o)
    assert gg.shape == (K, B, 0) and torch.equal(dots, torch.zeros(B, K, dtype=w.dtype))
    assert ops.branch_states(x, x, c).shape == (K, B, 0)
    ops.branch_states_out(x, x, c, torch.empty(0, dtype=dtype))
    gx, gd, gc = ops.branch_states_bwd(g, x, c)
    assert gx.shape == (B, 0) and gd.shape == (B, 0)
    assert torch.equal(gc, torch.zeros(B, K, dtype=c.dtype))


def test_reductions_do_not_depend_on_thread_count():
    t = make_inputs(3, 2, 300001, torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((ops.epd_step_bwd(t["x"], t["grads"], t["weights"], t["h"], t["o"])[1],
                            ops.branch_states_bwd(t["gk"], t["d"], t["c"])[2]))
    finally:
        torch.set_num_threads(before)
    for dots, gc in results[1:]:
        assert torch.equal(dots, results[0][0]) and torch.equal(gc, results[0][1])


def test_branch_states_out_into_image_batch():
    K, B, C, H, W = 3, 2, 3, 5, 7
    t = make_inputs(K, B, C * H * W, torch.float32, seed=1)
    buf = torch.empty(K * B, C, H, W)
    ops.branch_states_out(t["x"], t["d"], t["c"], buf)
    ref = R.branch_states(t["x"], t["d"], t["c"]).reshape(K * B, C, H, W)
    torch.testing.assert_close(buf, ref)


@pytest.mark.parametrize("dtype,K,N,offset", [
    (torch.float32, 2, (8 << 20) + 3, 1),   # misaligned buffer: a peeled head
    (torch.bfloat16, 4, (8 << 20) + 5, 0),
])
def test_branch_states_out_streaming(dtype, K, N, offset):
    # Outputs of 64 MiB and more go through streaming stores; they must match the
    # freshly allocated variant (which never streams) bit for bit.
    g = torch.Generator().manual_seed(5)
    x, d = (torch.rand(1, N, generator=g).to(dtype) for _ in range(2))
    c = torch.rand(1, K, generator=g)
    buf = torch.full((K * N + offset,), float("nan"), dtype=dtype)
    ops.branch_states_out(x, d, c, buf[offset:])
    assert torch.equal(buf[offset:].view(K, 1, N), ops.branch_states(x, d, c))


def test_schemas():
    t = make_inputs(2, 2, 9, torch.float32, seed=2)
    x, g, w, h, o, c = t["x"], t["grads"], t["weights"], t["h"], t["o"], t["c"]
    cases = [
        (ops.epd_step_fwd.default, (x, g, w, h, o)),
        (ops.epd_step_bwd.default, (x, g, w, h, o)),
        (ops.branch_states.default, (x, x, c)),
        (ops.branch_states_out.default, (x, x, c, torch.empty(2 * 2 * 9))),
        (ops.branch_states_bwd.default, (g, x, c)),
    ]
    for op, args in cases:
        # Fake and autograd kernels belong to the Python op layer; here only the schema
        # (in particular the mutation annotation of branch_states_out) is checked.
        torch.library.opcheck(op, args, test_utils=("test_schema",))


def test_bad_inputs_name_the_argument():
    t = make_inputs(2, 3, 5, torch.float32, seed=4)
    x, g, w, h, o, c = t["x"], t["grads"], t["weights"], t["h"], t["o"], t["c"]
    with pytest.raises(RuntimeError, match="weights must have dtype"):
        ops.epd_step_fwd(x, g, w.double(), h, o)
    with pytest.raises(RuntimeError, match="grads must have shape"):
        ops.epd_step_fwd(x, g[:, :2], w, h, o)
    with pytest.raises(RuntimeError, match="h must have shape"):
        ops.epd_step_bwd(x, g, w, h[:2], o)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.epd_step_fwd(x.t().contiguous().t(), g, w, h, o)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        ops.branch_states(x.int(), x, c)
    with pytest.raises(RuntimeError, match="out must have K\\*B\\*N"):
        ops.branch_states_out(x, x, c, torch.empty(2 * 3 * 5 + 1))
    with pytest.raises(RuntimeError, match="out must have dtype"):
        ops.branch_states_out(x, x, c, torch.empty(2 * 3 * 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.branch_states_bwd(g[:1], x, c)


_SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {test_dir!r})
    import test_cpp_kernels as T
    assert torch.backends.cpu.get_cpu_capability() == {isa!r}
    # Even N gives vector-aligned branches (streaming when forced), odd N does not.
    for K, B, N in [(1, 1, 1), (3, 2, 2048), (3, 2, 2049), (9, 2, 77), (2, 1, 20001)]:
        for dtype in T.DTYPES:
            for check in T.CHECKS:
                check(K, B, N, dtype, seed=K + B + N)
    print("ok")
""")


def test_instruction_set_copies_and_streaming_stores():
    # The kernels are compiled once per instruction set and chosen from torch's CPU
    # capability at first use; ATEN_CPU_CAPABILITY forces a lower one in a subprocess.
    # Streaming stores normally start at 64 MiB; EPD_KERNELS_STREAMING=always forces
    # them (where the outputs are suitably aligned) on these small shapes.
    order = ["DEFAULT", "AVX2", "AVX512"]
    have = torch.backends.cpu.get_cpu_capability()
    if have not in order:
        pytest.skip(f"torch runs {have} here; the x86 instruction-set copies are not built")
    runs = [("DEFAULT", "auto")] + [(isa, "always") for isa in order[1:order.index(have) + 1]]
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
