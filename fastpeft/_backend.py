"""Which implementation runs an op: the compiled C++ kernels, the Triton kernels, or
the unfused PyTorch reference.

``auto`` (the default) picks Triton for CUDA tensors and the compiled kernels for CPU
tensors, and the reference where neither is available. ``FASTPEFT_BACKEND`` (read once,
at import) or the :func:`use_backend` context manager forces one, for tests and
benchmarks. Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1``, which
must be set before Triton is first imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_ENV_BACKEND = _validate(os.environ.get("FASTPEFT_BACKEND", "auto") or "auto", "FASTPEFT_BACKEND")
_forced: str | None = None
_native_loaded = False

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_native() -> bool:
    """Import ``fastpeft._C`` (whose import registers the C++ kernels); warn once if absent."""
    global _native_loaded
    try:
        from fastpeft import _C  # noqa: F401
    except ImportError as err:
        warnings.warn(
            f"fastpeft: the compiled kernels (fastpeft._C) are not available ({err}); CPU "
            "tensors use the unfused reference path. Rebuild with "
            "`pip install --no-build-isolation -e .` to get the fused CPU kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        _native_loaded = False
    else:
        _native_loaded = True
    return _native_loaded


_kernels: frozenset[tuple[str, str]] = frozenset()


def index_kernels(op_names: list[str]) -> None:
    """Record which ops have a compiled CPU kernel and a Triton variant (called once at
    import, after ``load_native``, so the hot path only does a set lookup)."""
    global _kernels
    _resolved.clear()
    found = set()
    for name in op_names:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft::{name}", "CPU"):
            found.add((name, "cpu"))
        if hasattr(torch.ops.fastpeft, f"{name}_triton"):
            found.add((name, "triton"))
    _kernels = frozenset(found)


_resolved: dict[tuple[str, str, str], object] = {}


def resolve(op: str, device: torch.device):
    """The registered op that runs ``op`` for tensors on ``device`` (native C++ or Triton
    variant), or ``None`` for the reference path. Memoised per (op, device type, backend
    in force): it is on every call's path, and a decode step calls the linear ops once
    per projection."""
    key = (op, device.type, current())
    try:
        return _resolved[key]
    except KeyError:
        pass
    backend = select(device)
    if backend == "reference":
        found = None
    elif (op, backend) in _kernels:
        found = getattr(torch.ops.fastpeft, op + ("" if backend == "cpu" else "_triton"))
    elif key[2] == "auto":
        found = None  # e.g. a compiled library older than this op: the reference runs
    else:
        raise RuntimeError(f"fastpeft backend {backend!r} was forced but has no {op} kernel")
    _resolved[key] = found
    return found


def native_available() -> bool:
    """True when the compiled C++ kernels were imported."""
    return _native_loaded


def current() -> str:
    """The backend name in force: ``use_backend`` beats ``FASTPEFT_BACKEND``."""
    return _forced if _forced is not None else _ENV_BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"``) in a block.

    >>> with fastpeft.use_backend("reference"):
    ...     y = fastpeft.lora_linear(x, w, None, a, b, 2.0)
    """
    global _forced
    previous = _forced
    _forced = _validate(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


def select(device: torch.device) -> str:
    """The implementation that runs for tensors on ``device``: reference, cpu or triton."""
    name = current()
    if name == "auto":
        if device.type == "cuda" and TRITON_AVAILABLE:
            return "triton"
        if device.type == "cpu" and _native_loaded:
            return "cpu"
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"fastpeft backend 'cpu' runs CPU tensors only, got {device}")
        if not _native_loaded:
            raise RuntimeError(
                "fastpeft backend 'cpu' was forced but fastpeft._C is not built; "
                "reinstall with `pip install --no-build-isolation -e .`"
            )
    if name == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("fastpeft backend 'triton' was forced but triton is not installed")
        if device.type == "cpu" and not TRITON_INTERPRET:
            raise RuntimeError(
                "fastpeft backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the "
                "environment before triton is imported"
            )
    return name
