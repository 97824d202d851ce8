"""Builds ``fastpeft._C``, the compiled C++ CPU kernels, from ``fastpeft/csrc`` (see its
README) ahead of time, when torch is importable at build time
(``pip install --no-build-isolation .``). The GPU kernels are Triton, compiled at run time.

An isolated build (a plain ``pip install .``, a wheel) has no torch, so it installs the
package with its C++ sources only: the kernels are then built on first import, against
the torch that is installed (``fastpeft/_build.py``). ``FASTPEFT_NO_NATIVE=1`` skips the
ahead-of-time build too.
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """fastpeft/_build.py by path (importing the package would need torch)."""
    spec = importlib.util.spec_from_file_location(
        "_fastpeft_build", os.path.join(ROOT, "fastpeft", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_extensions():
    if os.environ.get("FASTPEFT_NO_NATIVE", "0") == "1":
        sys.stderr.write("fastpeft setup: FASTPEFT_NO_NATIVE=1: no ahead-of-time build\n")
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        # the isolated build environment: the kernels are built on first import instead
        return [], {}
    build = _load_build_module()
    ext = cpp_extension.CppExtension(
        "fastpeft._C",
        [os.path.relpath(p, ROOT) for p in build.sources()],
        include_dirs=[str(build.SOURCE_DIR)],
        extra_compile_args={"cxx": build.cxx_flags()},
        extra_link_args=build.link_flags(),
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
