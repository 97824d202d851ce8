"""The build of the C++ kernels on first use (fastpeft/_build.py), in fresh processes
that cannot see the prebuilt ``fastpeft._C`` and import a copy of the package (sources
edited meanwhile in the checkout would change the build key mid-test).

Slow: this compiles the C++ sources once, into an empty cache (about 90 s on 2 cores).
It is skipped where the build on first use is turned off (``FASTPEFT_NO_JIT=1``) or
cannot run (no C++ compiler, no ninja).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension

import fastpeft
from fastpeft import _build

# Import fastpeft with the prebuilt fastpeft._C hidden (as tests/test_op_layer.py does:
# an editable install's finder would still find the checkout's), then say where from, how
# the kernels were loaded, whether lora_linear has the C++ backend, and whether the
# loaded C++ kernel computes what the reference does, and that the build's Python module
# has its helpers and its C++ entry points of the usual calls.
_FIRST_USE = """
import importlib.util
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "fastpeft._C" else find(name, *a)
import torch
import fastpeft
from fastpeft import _backend, reference
print(fastpeft.__file__)
print(_backend.native_origin)
print("cpu" in fastpeft.available_backends("lora_linear"))
x, w, bias = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
a, b = torch.randn(4, 16), torch.randn(12, 4)
with fastpeft.use_backend("cpu"):
    y = fastpeft.lora_linear(x, w, bias, a, b, 2.0)
want = reference.lora_linear(x, w, bias, a, b, 2.0, 0.0, False)
print("same" if torch.allclose(y, want, atol=1e-4, rtol=1e-4) else "DIFFERENT")
print(type(_backend.native_module.weights_key([x, w])).__name__)  # the module's helpers
print(_backend.native_call("lora_linear")(x, w, bias, a, b, 2.0, 0.0, False).shape)
"""

BUILD_TIMEOUT_S = 900  # one compile, on a loaded 2-core machine


def _start(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _FIRST_USE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def _finish(process: subprocess.Popen) -> tuple[list[str], str]:
    """(stdout lines, stderr) of ``process``, which must exit with status 0."""
    out, err = process.communicate(timeout=BUILD_TIMEOUT_S)
    assert process.returncode == 0, err
    return out.splitlines(), err


@pytest.mark.skipif(os.environ.get("FASTPEFT_NO_JIT") == "1",
                    reason="FASTPEFT_NO_JIT=1: no build on first use")
@pytest.mark.skipif(_build.compiler() is None or not cpp_extension.is_ninja_available(),
                    reason="the build on first use needs a C++ compiler and ninja")
def test_concurrent_first_imports_share_one_build(tmp_path):
    """Two processes importing fastpeft at once into an empty cache (two workers of one
    job) both end with working kernels, and leave one build that a third process loads
    without compiling."""
    src, cache = tmp_path / "src", tmp_path / "cache"
    shutil.copytree(Path(fastpeft.__file__).parent, src / "fastpeft",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    env = dict(os.environ, FASTPEFT_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    first, second = _start(env, src), _start(env, src)  # at once: both find the cache empty
    results = [_finish(first), _finish(second)]
    (build_dir,) = cache.iterdir()  # one build key, one build
    library = build_dir / "fastpeft_cpu_kernels.so"
    assert library.is_file()
    loaded = [str(src / "fastpeft" / "__init__.py"), f"built on first use ({library})",
              "True", "same", "bytes", "torch.Size([5, 12])"]
    for out, err in results:
        assert out == loaded, err
        assert "unavailable" not in err and "Traceback" not in err
    assert any("fastpeft: compiling the C++ CPU kernels" in err for _, err in results)

    start = time.perf_counter()
    out, err = _finish(_start(env, src))
    seconds = time.perf_counter() - start
    assert out == loaded, err
    assert "compiling" not in err and "compiled" not in err, err
    assert seconds < 60, f"the third process took {seconds:.0f} s: did it build again?"


def test_every_source_file_is_package_data():
    """Each file of fastpeft/csrc matches a package-data pattern of pyproject.toml, so that
    a wheel carries what the build on first use compiles (a header missing there fails
    only on a user's machine); so does the py.typed marker."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["fastpeft"]
    package = root / "fastpeft"
    files = {p for p in (package / "csrc").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert files
    packaged = {p for pattern in patterns for p in package.glob(pattern)}
    missing = sorted(p.relative_to(package).as_posix() for p in files - packaged)
    assert not missing, f"not in pyproject.toml's package-data: {missing}"
    # the typed API reaches type checkers (PEP 561), and the license ships beside it
    assert (package / "py.typed").is_file() and "py.typed" in patterns
    assert (root / "LICENSE").is_file()
