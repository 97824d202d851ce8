"""Building the C++ CPU kernels: the flags ``setup.py`` uses ahead of time, and the
just-in-time build that runs on first import when no usable prebuilt ``fastpeft._C``
was installed (an isolated ``pip install``, a wheel built for another torch).

The JIT build compiles ``fastpeft/csrc`` (shipped with the package) with ninja through
``torch.utils.cpp_extension.load`` into a cache directory keyed by the torch version, its
C++ ABI, the Python version, the CPU architecture and a hash of the sources, so a second
process loads the library at once and a torch upgrade builds a new one. Concurrent first
imports are safe: ``cpp_extension`` builds under a file lock in that directory, and a
process that finds the lock taken waits for the other's build.

This module imports nothing from torch at import time: ``setup.py`` loads it by path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import time
import types
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"


def sources(root: Path = SOURCE_DIR) -> list[Path]:
    """The translation units of the extension, in a stable order."""
    return sorted(root.glob("*.cpp")) + sorted(root.glob("cpu/*.cpp"))


def cxx_flags() -> list[str]:
    """Compiler flags (no ``-std``: torch's build helpers add the standard its headers
    need)."""
    flags = ["-O3", "-Wall", "-Wno-unknown-pragmas"]
    # at::parallel_for is inline OpenMP code: without -fopenmp it runs serially. The
    # libgomp it links resolves to the copy torch has already loaded.
    flags.append("-fopenmp" if sys.platform.startswith("linux") else "-fopenmp-simd")
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-DFASTPEFT_X86_MULTIVERSION")  # per-ISA kernels chosen at run time
    return flags


def link_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def compiler() -> str | None:
    """The C++ compiler torch's build helpers would use, if one is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") \
        or shutil.which("clang++")


def cache_dir() -> Path:
    """Where JIT builds go: ``$FASTPEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastpeft``
    (``~/.cache/fastpeft``), one subdirectory per build key."""
    root = os.environ.get("FASTPEFT_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                            os.path.join(os.path.expanduser("~"), ".cache"), "fastpeft")
    return Path(root) / build_key()


def build_key() -> str:
    """torch version, C++ ABI, Python, machine, and a hash of the sources and flags."""
    import torch

    digest = hashlib.sha256()
    for path in sources() + sorted(SOURCE_DIR.glob("**/*.h")):
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(cxx_flags() + link_flags()).encode())
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tag = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    return (f"torch{torch.__version__.replace('+', '_')}-abi{abi}-{tag}-{platform.machine()}"
            f"-{digest.hexdigest()[:12]}")


def jit_load() -> types.ModuleType:
    """Build (or find in the cache) the kernels' shared library and import it, which
    registers the C++ kernels; returns the module (``fastpeft._C``'s twin: its
    ``__file__`` is the library). Raises ``RuntimeError`` with
    the reason when there are no sources, no compiler, no ninja, or the build fails."""
    from torch.utils import cpp_extension

    if not sources():
        raise RuntimeError(f"the C++ sources are not installed ({SOURCE_DIR} is missing)")
    if compiler() is None:
        raise RuntimeError("no C++ compiler found (install g++ or clang, or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    name = "fastpeft_cpu_kernels"
    library = build_dir / f"{name}.so"
    fresh = not library.exists()
    if fresh:
        sys.stderr.write(f"fastpeft: compiling the C++ CPU kernels for this torch "
                         f"(first use only; about a minute on 2 cores) into {build_dir} ...\n")
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name, sources=[str(p) for p in sources()], build_directory=str(build_dir),
            extra_include_paths=[str(SOURCE_DIR)], extra_cflags=cxx_flags(),
            extra_ldflags=link_flags(), is_python_module=True, verbose=False)
    except Exception as err:  # a compiler error, a broken toolchain
        raise RuntimeError(f"the build in {build_dir} failed: {err}") from err
    if fresh:
        sys.stderr.write(f"fastpeft: compiled in {time.perf_counter() - start:.0f} s\n")
    return module
