"""Test-session setup.

TRITON_INTERPRET must be set before triton is first imported: it makes @triton.jit return
interpreted kernels that run on CPU tensors, which is how the Triton backend is tested on a
machine without a GPU. Tests that compile for real GPU targets run in a subprocess without it.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require_cpp() -> bool:
    """In CI (or when asked) the C++ backend must be present: missing it is a failure, not a skip."""
    return os.environ.get("CI", "") not in ("", "0", "false") or os.environ.get(
        "EPD_KERNELS_REQUIRE_CPP", "0") == "1"


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (``pytest.mark.usefixtures("one_thread")``): the
    distillation problems are tiny, and extra threads only add synchronisation (10x slower
    on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _reset_backend():
    from epd_kernels import backends

    yield
    backends.set_backend("auto")


def pytest_configure(config):
    # Registered here as well as in pyproject.toml so that `pytest -m gpu` works from any
    # checkout of the tests.
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU (compiled Triton kernels); run by `make gpu-check`")
