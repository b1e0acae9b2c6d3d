"""Loading the C++ extension built against exactly the torch that runs: `load()` gives it
(its ops registered with torch) or None, `load_error()` says why not.

`pip install --no-build-isolation .` compiles `epd_kernels/_C*.so` ahead of time and records
its torch in `_C.build.json`; a plain `pip install .` installs the sources as
`epd_kernels/_csrc/`, which the first `load()` compiles with ninja into a cache folder per
torch build (`$EPD_KERNELS_CACHE_DIR` or `${XDG_CACHE_HOME:-~/.cache}/epd_kernels`). A
prebuilt library loads only when its record names the running torch: one compiled against
other headers may load and then corrupt memory. Only the standard library is imported at
module level: setup.py loads this file by path, before torch can be imported.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.machinery
import json
import os
import re
import shutil
import sys
import threading
import time
import types
from typing import Optional

EXTENSION_NAME = "_C"
BUILD_RECORD = "_C.build.json"
CACHE_ENV = "EPD_KERNELS_CACHE_DIR"
# torch's cpp_extension builds C++20 from 2.13 on and ATen's headers require it from 2.14;
# older releases (2.4 to 2.12) are built and tested as C++17, as they ship.
CXX20_FROM = (2, 13)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_state: dict = {}


# --------------------------------------------------------------------------------------
# build configuration (shared with setup.py)


def torch_release(version: str) -> tuple:
    """(major, minor) of a torch version string such as "2.13.0+cpu" or "2.14.0.dev20260301"."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"torch_version must look like 'MAJOR.MINOR...', got {version!r}")
    return int(match.group(1)), int(match.group(2))


def cxx_standard(torch_version: str) -> str:
    """The `-std=` value to compile the extension with against torch `torch_version`."""
    return "c++20" if torch_release(torch_version) >= CXX20_FROM else "c++17"


def compile_flags(torch_version: str) -> list:
    """Compiler flags of the extension for torch `torch_version` (ahead-of-time and JIT)."""
    flags = ["-O3", f"-std={cxx_standard(torch_version)}", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
    # Optimise for the build machine only when asked: a wheel built with -march=native
    # would crash on an older CPU.
    if os.environ.get("EPD_KERNELS_NATIVE", "0") == "1":
        flags.append("-march=native")
    return flags


LINK_FLAGS = ["-fopenmp"]


def torch_build_info(torch_module) -> dict:
    """What an extension binary depends on in the running torch and Python."""
    return {
        "torch": str(torch_module.__version__),
        "cxx11_abi": bool(getattr(torch_module._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": f"cp{sys.version_info[0]}{sys.version_info[1]}",
    }


def mismatch(recorded: Optional[dict], running: dict) -> Optional[str]:
    """Why an extension built as `recorded` must not be loaded into `running`, or None."""
    if not recorded:
        return "it has no record of the torch it was compiled against"
    for key in ("torch", "cxx11_abi", "python"):
        if recorded.get(key) != running[key]:
            return f"it was compiled for {key} {recorded.get(key)!r}, this is {running[key]!r}"
    return None


def cache_dir(info: dict) -> str:
    """The JIT build folder for the torch/Python build described by `info`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "epd_kernels")
    abi = "cxx11abi" if info["cxx11_abi"] else "precxx11abi"
    return os.path.join(root, f"torch-{info['torch']}-{info['python']}-{abi}")


def source_dir() -> Optional[str]:
    """The C++ sources: installed with the package, or the repository's csrc/ (editable)."""
    for candidate in (os.path.join(_PACKAGE_DIR, "_csrc"),
                      os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if glob.glob(os.path.join(candidate, "*.cpp")):
            return candidate
    return None


def toolchain_problem(which=shutil.which) -> Optional[str]:
    """What is missing to compile the extension here (a sentence), or None: the C++
    compiler torch will call (`$CXX`, else `c++`) and ninja (on PATH or the `ninja` package)."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if which(cxx) is None:
        missing.append(f"no C++ compiler (looked for {cxx!r} on PATH; install g++ or "
                       "clang++, or set CXX)")
    if which("ninja") is None and _ninja_dir(which) is None:
        missing.append("no ninja (`pip install ninja`)")
    return "; ".join(missing) or None


def _ninja_dir(which=shutil.which) -> Optional[str]:
    """The folder of the `ninja` package's binary when it is not on PATH (an unactivated venv)."""
    try:
        import ninja  # the PyPI package: a binary in its BIN_DIR
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and which("ninja", path=folder):
        return folder
    return None


# --------------------------------------------------------------------------------------
# loading


def load() -> Optional[types.ModuleType]:
    """The C++ extension, loaded (and compiled first if needed), or None; cached for the
    process (a failure is not retried) and placed in `sys.modules["epd_kernels._C"]`."""
    with _lock:
        if "module" not in _state:
            module, error = _load_uncached()
            _state["module"], _state["error"] = module, error
        return _state["module"]


def load_error() -> Optional[str]:
    """Why `load()` gave None (naming a missing compiler or ninja), or None if it loaded."""
    load()
    return _state.get("error")


def _load_uncached():
    try:
        import torch
    except ImportError as exc:
        return None, f"torch is not importable ({exc})"
    running = torch_build_info(torch)
    prebuilt = _prebuilt_library()
    why_not_prebuilt = "it is not built"
    if prebuilt is not None:
        why_not_prebuilt = mismatch(_read_record(), running)
        if why_not_prebuilt is None:
            try:
                return _import_library(prebuilt), None
            except (ImportError, OSError) as exc:
                why_not_prebuilt = f"it does not load ({exc})"
    return _load_jit(running, why_not_prebuilt)


def _prebuilt_library() -> Optional[str]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_PACKAGE_DIR, EXTENSION_NAME + suffix)
        if os.path.exists(path):
            return path
    return None


def _read_record() -> Optional[dict]:
    try:
        with open(os.path.join(_PACKAGE_DIR, BUILD_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _import_library(path: str) -> types.ModuleType:
    """Loads the library at `path` (running its op registrations; it has no Python module
    init) and puts a module holding its path in sys.modules as `epd_kernels._C`."""
    import torch

    torch.ops.load_library(path)
    name = f"{__package__ or 'epd_kernels'}.{EXTENSION_NAME}"
    module = types.ModuleType(name, "C++ library of epd_kernels (ops only)")
    module.__file__ = path
    sys.modules[name] = module
    return module


def _load_jit(running: dict, why_not_prebuilt: str):
    sources_at = source_dir()
    if sources_at is None:
        return None, (f"the prebuilt C++ extension is unusable ({why_not_prebuilt}) and the "
                      "C++ sources are not installed, so it cannot be compiled here")
    problem = toolchain_problem()
    if problem is not None:
        return None, (f"the C++ kernels need compiling for torch {running['torch']} "
                      f"(the prebuilt extension: {why_not_prebuilt}), but there is {problem}")
    build_dir = cache_dir(running)
    try:
        path = _compile(sorted(glob.glob(os.path.join(sources_at, "*.cpp"))), build_dir,
                        running["torch"])
        return _import_library(path), None
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
        detail = str(exc).strip().splitlines()
        tail = "\n".join(detail[-20:])
        return None, (f"compiling the C++ kernels for torch {running['torch']} in {build_dir} "
                      f"failed: {tail}")


def _compile(sources: list, build_dir: str, torch_version: str) -> str:
    """Compile `sources` into `build_dir`; the path of the library. Serialised across processes."""
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    library = os.path.join(build_dir, EXTENSION_NAME + ".so")
    inputs = sources + glob.glob(os.path.join(os.path.dirname(sources[0]), "*.h"))
    with _build_lock(build_dir), _ninja_on_path():
        # ninja decides what to rebuild; this only decides what to tell the user.
        stale = not os.path.exists(library) or any(
            os.path.getmtime(s) > os.path.getmtime(library) for s in inputs)
        if stale:
            _say(f"compiling the C++ kernels for torch {torch_version} into {build_dir} "
                 "(once per torch version; a minute or two)")
        start = time.monotonic()
        with _heartbeat("still compiling", enabled=stale):
            path = cpp_extension.load(
                name=EXTENSION_NAME, sources=sources, extra_cflags=compile_flags(torch_version),
                extra_ldflags=LINK_FLAGS, build_directory=build_dir, is_python_module=False,
                verbose=False)
        if stale:
            _say(f"compiled in {time.monotonic() - start:.0f} s")
    return path


def _say(message: str) -> None:
    print(f"epd_kernels: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _heartbeat(message: str, enabled: bool = True, every: float = 15.0):
    """Prints `message` with the elapsed time every `every` seconds until the block ends."""
    done = threading.Event()
    if enabled:
        start = time.monotonic()

        def beat():
            while not done.wait(every):
                _say(f"{message} ({time.monotonic() - start:.0f} s)")

        threading.Thread(target=beat, daemon=True).start()
    try:
        yield
    finally:
        done.set()


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """An exclusive lock on `build_dir`, released by the OS if its holder dies. torch's own
    `lock` file stays behind when a build is killed, and later builds would wait for it
    forever; every builder takes this lock first, so its holder may delete that file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        yield
        return
    fd = os.open(os.path.join(build_dir, "epd_kernels.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"waiting for another process compiling in {build_dir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(build_dir, "lock")):
            os.remove(os.path.join(build_dir, "lock"))
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _ninja_on_path():
    """Puts the `ninja` package's binary on PATH for the build when PATH has no ninja."""
    folder = _ninja_dir() if shutil.which("ninja") is None else None
    if folder is None:
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved
