"""Build script: the C++ CPU extension `epd_kernels._C`, ahead of time or on first use
(the GPU path is Triton, compiled at run time: no CUDA C++ is built).

With torch importable (`pip install --no-build-isolation .`, as the Makefile does) the
extension is compiled against it and that torch is recorded in `epd_kernels/_C.build.json`,
so that a later torch upgrade compiles anew. Without (plain `pip install .`: the isolated
build environment never holds torch, so pip cannot fetch another one) nothing is compiled
here and `epd_kernels._extension` compiles on first use. Either way the sources are
installed as `epd_kernels/_csrc/`; the flags of both builds come from `_extension.py`.
"""
import glob
import importlib.util
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "epd_kernels"


def _load_extension_helpers():
    # By path: importing the package would import torch and everything else.
    path = os.path.join(HERE, PACKAGE, "_extension.py")
    spec = importlib.util.spec_from_file_location("_epd_kernels_extension_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ext_helpers = _load_extension_helpers()

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    torch = None


class build_py_with_sources(build_py):
    """Also installs csrc/ as epd_kernels/_csrc/ (the sources of the first-use build)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install finds the repository's csrc/
            return
        package_dir = os.path.join(self.build_lib, PACKAGE)
        if torch is None:
            # No extension is built now; one left in build/ by an earlier build must not
            # reach the wheel.
            for stale in glob.glob(os.path.join(package_dir, ext_helpers.EXTENSION_NAME + ".*")):
                os.remove(stale)
        target = os.path.join(package_dir, "_csrc")
        shutil.rmtree(target, ignore_errors=True)  # a source deleted from csrc/ goes too
        os.makedirs(target)
        for source in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
            if source.endswith((".cpp", ".h")):
                self.copy_file(source, os.path.join(target, os.path.basename(source)))


def _build_ext_class():
    base = BuildExtension.with_options(use_ninja=True)

    class build_ext_with_record(base):
        """Builds the extension, then records beside it the torch it was compiled against."""

        def run(self):
            super().run()
            record = json.dumps(ext_helpers.torch_build_info(torch), indent=1) + "\n"
            folders = {os.path.join(self.build_lib, PACKAGE)}
            if self.inplace or getattr(self, "editable_mode", False):
                build_py_cmd = self.get_finalized_command("build_py")
                folders.add(build_py_cmd.get_package_dir(PACKAGE))
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, ext_helpers.BUILD_RECORD), "w") as f:
                    f.write(record)

    return build_ext_with_record


def _setup_args():
    cmdclass = {"build_py": build_py_with_sources}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if torch is None or not sources:
        return {"cmdclass": cmdclass}
    cmdclass["build_ext"] = _build_ext_class()
    extension = CppExtension(
        name=f"{PACKAGE}.{ext_helpers.EXTENSION_NAME}",
        sources=sources,
        extra_compile_args={"cxx": ext_helpers.compile_flags(torch.__version__)},
        extra_link_args=list(ext_helpers.LINK_FLAGS),
    )
    return {"cmdclass": cmdclass, "ext_modules": [extension]}


setup(**_setup_args())
