"""Installing the package: the build configuration, the loader's choices, and a plain
`pip install .` into a fresh venv that then runs the C++ kernel it compiled on first use.

The slow test is the one a new user runs: a venv with torch 2.13.0 (the pinned CPU build),
plain `pip install <repo>` (pip's isolated build), then `epd_step` on CPU tensors. Its
oracles: pip's own log and package list (no torch but 2.13.0, no nvidia wheel), the float64
closed form `x + (1 + o) h sum_k w_k g_k`, and the backend the package reports.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from epd_kernels import _extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PIN = "2.13.0"


# --------------------------------------------------------------------------------------
# the C++ standard


@pytest.mark.parametrize("version, standard", [
    ("2.4.0", "c++17"), ("2.4.1+cu121", "c++17"), ("2.12.1", "c++17"),
    ("2.13.0+cpu", "c++20"), ("2.14.1", "c++20"), ("2.14.0.dev20260301+cu128", "c++20"),
    ("2.15.0a0+git1234", "c++20"), ("3.0.0", "c++20"),
])
def test_cxx_standard_follows_torch_release(version, standard):
    # 2.13 is the first release whose cpp_extension compiles C++20 by default, 2.14 the
    # first whose ATen headers refuse C++17.
    assert _extension.cxx_standard(version) == standard
    flags = _extension.compile_flags(version)
    assert [f for f in flags if f.startswith("-std=")] == [f"-std={standard}"]


def test_cxx_standard_matches_the_running_torchs_own_default():
    # Oracle: the standard torch's cpp_extension passes when an extension names none.
    from torch.utils import cpp_extension

    defaults = set(re.findall(r"-std=(c\+\+\d\d)", inspect.getsource(cpp_extension)))
    assert len(defaults) == 1, f"cannot tell torch's default standard: {sorted(defaults)}"
    assert _extension.cxx_standard(torch.__version__) == defaults.pop()


def test_cxx_standard_rejects_a_malformed_version():
    with pytest.raises(ValueError, match="torch_version"):
        _extension.cxx_standard("nightly")


# --------------------------------------------------------------------------------------
# which build is loaded

RUNNING = {"torch": "2.13.0+cpu", "cxx11_abi": True, "python": "cp311"}


def test_mismatch_accepts_only_the_same_torch_build():
    assert _extension.mismatch(dict(RUNNING), RUNNING) is None
    assert "no record" in _extension.mismatch(None, RUNNING)
    why = _extension.mismatch(dict(RUNNING, torch="2.12.0"), RUNNING)
    assert "2.12.0" in why and "2.13.0+cpu" in why
    assert "cxx11_abi" in _extension.mismatch(dict(RUNNING, cxx11_abi=False), RUNNING)
    assert "python" in _extension.mismatch(dict(RUNNING, python="cp312"), RUNNING)
    # A local build tag is a different binary (CPU vs CUDA headers).
    assert _extension.mismatch(dict(RUNNING, torch="2.13.0+cu128"), RUNNING) is not None


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package folder holding a prebuilt `_C` and a loader that records what it loads."""
    import importlib.machinery

    prebuilt = tmp_path / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    prebuilt.write_bytes(b"not a library")
    calls = []
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(_extension, "_import_library", lambda path: calls.append(("import", path)))
    monkeypatch.setattr(_extension, "_load_jit",
                        lambda running, why: calls.append(("jit", why)) or (None, "jit"))
    return tmp_path, str(prebuilt), calls


def _write_record(folder, **changes):
    info = dict(_extension.torch_build_info(torch), **changes)
    (folder / _extension.BUILD_RECORD).write_text(json.dumps(info))


def test_prebuilt_extension_of_the_running_torch_is_loaded(fake_package):
    folder, prebuilt, calls = fake_package
    _write_record(folder)
    _extension._load_uncached()
    assert calls == [("import", prebuilt)]


def test_prebuilt_extension_of_another_torch_is_not_loaded(fake_package):
    folder, _, calls = fake_package
    _write_record(folder, torch="2.12.0")
    _extension._load_uncached()
    assert len(calls) == 1 and calls[0][0] == "jit", calls
    assert "2.12.0" in calls[0][1]


def test_prebuilt_extension_without_record_is_not_loaded(fake_package):
    _, _, calls = fake_package
    _extension._load_uncached()
    assert [c[0] for c in calls] == ["jit"]


def test_this_installation_loads_its_prebuilt_extension():
    # The Makefile (and so CI) builds with --no-build-isolation: that build must be the one
    # loaded, not a silent first-use compile into the user's cache.
    from conftest import require_cpp

    prebuilt = _extension._prebuilt_library()
    if prebuilt is None:
        assert not require_cpp(), "CI installs with --no-build-isolation: no epd_kernels/_C*.so"
        return
    module = _extension.load()
    assert module is not None, _extension.load_error()
    assert os.path.samefile(module.__file__, prebuilt)


def test_library_without_python_module_init_is_loaded(tmp_path, monkeypatch):
    # A library registering ops in C++ only (no PyInit__C) still loads, as ops-only module.
    import importlib.machinery

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    assert compiler is not None, "no C++ compiler: the package cannot be built here either"
    source = tmp_path / "probe.cpp"
    source.write_text('extern "C" int epd_kernels_probe() { return 7; }\n')
    library = tmp_path / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True,
                   stdin=subprocess.DEVNULL)
    monkeypatch.setitem(sys.modules, "epd_kernels._C", sys.modules.get("epd_kernels._C"))
    module = _extension._import_library(str(library))
    assert module.__file__ == str(library)
    assert sys.modules["epd_kernels._C"] is module
    import ctypes

    assert ctypes.CDLL(str(library)).epd_kernels_probe() == 7


def test_missing_toolchain_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "/opt/none/g++-13")
    problem = _extension.toolchain_problem(which=lambda name, path=None: None)
    assert "/opt/none/g++-13" in problem and "ninja" in problem
    monkeypatch.delenv("CXX")
    assert "'c++'" in _extension.toolchain_problem(which=lambda name, path=None: None)
    assert _extension.toolchain_problem(which=lambda name, path=None: "/usr/bin/" + name) is None


def test_cache_dir_per_torch_build_and_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path))
    folder = _extension.cache_dir(RUNNING)
    assert folder == str(tmp_path / "torch-2.13.0+cpu-cp311-cxx11abi")
    assert _extension.cache_dir(dict(RUNNING, torch="2.14.1")) != folder


# --------------------------------------------------------------------------------------
# plain `pip install .` in a fresh venv

# Runs in the fresh venv: epd_step on CPU, the float64 closed form, and what was loaded.
_CHECK_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import epd_kernels
        from epd_kernels import _extension, backends
        gen = torch.Generator().manual_seed(0)
        B, K, N = 3, 4, 257
        x = torch.randn(B, N, generator=gen, dtype=torch.float64)
        grads = torch.randn(K, B, N, generator=gen, dtype=torch.float64)
        weights = torch.rand(K, generator=gen, dtype=torch.float64)
        weights = weights / weights.sum()
        h, o = -0.37, 0.11
        expected = x + (1 + o) * h * (weights[:, None, None] * grads).sum(0)
        errors = {}
        for dtype in (torch.float64, torch.float32):
            y = epd_kernels.epd_step(x.to(dtype), grads.to(dtype), weights.to(dtype), h, o)
            scale = (x.abs() + abs((1 + o) * h) * (weights[:, None, None] * grads).abs().sum(0))
            errors[str(dtype)] = ((y.double() - expected).abs() / scale).max().item()
        module = _extension.load()
    print(json.dumps({
        "torch": torch.__version__,
        "backend": backends.for_device(torch.device("cpu")).name,
        "library": getattr(module, "__file__", None),
        "load_error": _extension.load_error(),
        "warnings": [str(w.message) for w in caught if "epd_kernels" in str(w.message)],
        "errors": errors,
    }))
""")


def _run(cmd, log, timeout, env=None, cwd=None, what=None):
    start = time.monotonic()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, env=env, cwd=cwd)
    seconds = time.monotonic() - start
    log.append(f"{seconds:6.1f} s  {what or ' '.join(map(str, cmd[-3:]))}")
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
        f"stderr:\n{proc.stderr[-4000:]}")
    return proc, seconds


def _copy_source_tree(target):
    # A copy without build products, so the install builds from sources alone and leaves
    # nothing in the repository (setuptools builds in the source tree).
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
        _extension.BUILD_RECORD, ".hypothesis", ".pytest_cache", "benchmarks", "docs"))


def _venv_env(cache, **env_changes):
    """This environment without Python paths or package settings, the JIT cache in `cache`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EPD_KERNELS_"))}
    env.update({_extension.CACHE_ENV: str(cache)}, **env_changes)
    return env


@pytest.mark.slow
def test_plain_pip_install_compiles_and_runs_the_cpp_kernel(tmp_path):
    log = []
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--no-input"]
    _run([sys.executable, "-m", "venv", str(venv)], log, 300)
    # The pinned CPU torch, alone first (as the Makefile installs it).
    _run(pip + ["install", "-q", f"torch=={TORCH_PIN}"], log, 900)
    source = tmp_path / "src"
    _copy_source_tree(source)

    proc, _ = _run(pip + ["install", "-v", str(source)], log, 900)
    pip_log = proc.stdout + proc.stderr
    assert "Installing build dependencies" in pip_log, "pip did not use an isolated build"
    fetched = [line.strip() for line in pip_log.splitlines()
               if re.match(r"\s*(Collecting|Downloading|Processing|Using cached)\b", line)]
    assert fetched, "pip's log shows no package being fetched: cannot judge what it fetched"
    assert not [f for f in fetched if re.search(r"torch|nvidia", f, re.I)], fetched
    listed, _ = _run(pip + ["list", "--format=json"], log, 120)
    packages = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert packages.get("torch", "").split("+")[0] == TORCH_PIN, packages
    assert not [n for n in packages if n.startswith("nvidia")], packages
    installed = subprocess.run(
        [python, "-c", "import epd_kernels, os; print(os.path.dirname(epd_kernels.__file__))"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
    assert os.path.isdir(os.path.join(installed, "_csrc")), "the C++ sources were not installed"
    assert not [f for f in os.listdir(installed) if f.startswith("_C.")], \
        "the isolated build must not ship a compiled extension"

    # No compiler: one warning naming it, and the reference computes the right result.
    env = _venv_env(tmp_path / "cache-nocxx", CXX="/nonexistent/c++")
    proc, _ = _run([python, "-c", _CHECK_SCRIPT], log, 600, env=env, cwd=tmp_path,
                   what="epd_step without a compiler")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == "reference" and report["library"] is None, report
    assert "/nonexistent/c++" in report["load_error"], report
    assert len(report["warnings"]) == 1 and "/nonexistent/c++" in report["warnings"][0], report
    assert report["errors"]["torch.float64"] < 1e-12, report

    # With the compiler: compiled once into the cache, then the C++ kernel runs.
    cache = tmp_path / "cache"
    env = _venv_env(cache)
    proc, first = _run([python, "-c", _CHECK_SCRIPT], log, 3600, env=env, cwd=tmp_path,
                       what="epd_step, compiling on first use")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "compiling the C++ kernels" in proc.stderr, proc.stderr
    assert report["torch"].split("+")[0] == TORCH_PIN
    assert report["backend"] == "cpp" and report["load_error"] is None, report
    assert report["library"].startswith(str(cache)), report
    assert report["warnings"] == [], report
    assert report["errors"]["torch.float64"] < 1e-12, report
    assert report["errors"]["torch.float32"] < 1e-6, report

    proc, second = _run([python, "-c", _CHECK_SCRIPT], log, 600, env=env, cwd=tmp_path,
                        what="epd_step, from the cache")
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "compiling" not in proc.stderr, proc.stderr
    assert again["backend"] == "cpp" and again["library"] == report["library"], again
    print("\n".join(["", "plain pip install, step by step:"] + log))
    # The venv holds a torch (about 1 GB): gone on success, kept for a look on failure.
    shutil.rmtree(tmp_path)
