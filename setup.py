"""Build script: the C++ CPU extension `epd_kernels._C` is always built.

The GPU path is Triton (pure Python, compiled at run time), so no CUDA C++ is needed. A
CUDA C++ extension would only be attempted when torch is a CUDA build, a toolkit is
present AND a GPU is visible, or when EPD_KERNELS_FORCE_CUDA=1; this package currently
ships no CUDA C++ sources, so `nvcc` on the PATH of a CPU machine changes nothing.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit(
        "epd_kernels needs torch to build its C++ extension. Install torch first, then "
        "`pip install --no-build-isolation .` (see README)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _cxx_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
    # Optimise for the build machine only when asked: a wheel built with -march=native
    # would crash on an older CPU.
    if os.environ.get("EPD_KERNELS_NATIVE", "0") == "1":
        flags.append("-march=native")
    return flags


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    return [
        CppExtension(
            name="epd_kernels._C",
            sources=sources,
            extra_compile_args={"cxx": _cxx_flags()},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
