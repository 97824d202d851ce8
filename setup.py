"""Builds ``fastpeft._C``, the compiled kernels, from ``csrc/``.

* The C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``, see ``csrc/README.md``) are
  always built; the GPU kernels are Triton (``fastpeft/triton``), compiled at run time.
* ``FASTPEFT_NO_NATIVE=1`` (or no torch at build time) skips native code: the
  package then installs as pure Python and runs on the reference path.

Build against the installed torch with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _warn(msg: str) -> None:
    sys.stderr.write(f"fastpeft setup: {msg}\n")


def native_extensions():
    if os.environ.get("FASTPEFT_NO_NATIVE", "0") == "1":
        _warn("FASTPEFT_NO_NATIVE=1: skipping the compiled kernels")
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _warn(
            "torch is not importable at build time, so the compiled kernels are skipped "
            "(install torch first and use `pip install --no-build-isolation`)"
        )
        return [], {}

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # No -std: BuildExtension adds the standard the installed torch's headers need
    # (C++20 for torch >= 2.10, C++17 before).
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code: without -fopenmp it runs serially. The
        # resulting libgomp dependency resolves to the copy torch has already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    else:
        cxx.append("-fopenmp-simd")
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-DFASTPEFT_X86_MULTIVERSION")
    ext = cpp_extension.CppExtension(
        "fastpeft._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
