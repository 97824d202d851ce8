"""Which implementation runs an op: the compiled C++ kernels, the Triton kernels, or
the unfused PyTorch reference.

``auto`` (the default) picks Triton for CUDA tensors and the compiled kernels for CPU
tensors, and the reference where neither is available. ``FASTPEFT_BACKEND`` (read once,
at import) or the :func:`use_backend` context manager forces one, for tests and
benchmarks; ``use_backend`` holds in the thread that entered it only. Triton
kernels run on CPU tensors only under ``TRITON_INTERPRET=1``, which must be set before
Triton is first imported.

The ops' variants are recorded here by :func:`fastpeft.ops._library.declare`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_ENV_BACKEND = _validate(os.environ.get("FASTPEFT_BACKEND", "auto") or "auto", "FASTPEFT_BACKEND")


class _Forced(threading.local):
    """use_backend's choice, per thread (a threading.local, which torch.compile reads and
    guards on, where it cannot read a contextvars.ContextVar). Every thread starts with
    ``name = None`` in its own dict (__init__ runs per thread): reading it raises no
    AttributeError to catch, which from cold caches cost a call tens of microseconds. Not
    a class attribute: torch.compile guarded that through the class and missed a later
    ``use_backend``."""

    def __init__(self) -> None:
        self.name: str | None = None


_forced = _Forced()
_native_loaded = False

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BUILD_HINT = ("install a C++ compiler and ninja (pip install ninja) and import fastpeft "
              "again, or build them ahead of time with `pip install --no-build-isolation .`")

# How the C++ kernels were loaded (or why not), for `python -m fastpeft.info`.
native_origin = "not loaded"
# The loaded kernels' Python module (fastpeft._C or its build on first use), or None: its
# helpers weights_key and adapters_key serve the caches of stacked adapters
# (fastpeft.nn.multi_lora_linear), and its <op>_call functions the LoRA linear ops' usual
# eager CPU calls (native_call).
native_module = None


def load_native() -> bool:
    """Load the C++ CPU kernels (their loading registers them with the dispatcher): the
    prebuilt ``fastpeft._C`` when it loads with this torch, else a build of the shipped
    sources on first use, cached (:mod:`fastpeft._build`; ``FASTPEFT_NO_JIT=1`` skips it).
    Warns once when neither works: CPU tensors then run the reference."""
    global _native_loaded, native_origin, native_module
    prebuilt = "no prebuilt fastpeft._C is installed"
    if importlib.util.find_spec("fastpeft._C") is not None:
        try:
            from fastpeft import _C
        except ImportError as err:  # e.g. built for another torch: undefined symbols
            prebuilt = f"the prebuilt fastpeft._C does not load ({err})"
        else:
            _native_loaded, native_origin = True, f"prebuilt ({_C.__file__})"
            native_module = _C
            return True
    if os.environ.get("FASTPEFT_NO_JIT", "0") == "1":
        reason = f"{prebuilt}, and FASTPEFT_NO_JIT=1 turns off the build on first use"
    else:
        from . import _build

        try:
            module = _build.jit_load()
        except RuntimeError as err:
            reason = f"{prebuilt}, and building them failed: {err}"
        else:
            _native_loaded, native_origin = True, f"built on first use ({module.__file__})"
            native_module = module
            return True
    native_origin = f"unavailable: {reason}"
    warnings.warn(f"fastpeft: the fused CPU kernels are unavailable ({reason}); CPU tensors "
                  f"use the unfused reference path. To get them, {BUILD_HINT}.",
                  RuntimeWarning, stacklevel=3)
    return False


_variants: dict[str, dict[str, object]] = {}
_resolved: dict[tuple[str, str, str], object] = {}


def add_op(op: str) -> None:
    """Record that ``op`` is declared (the reference runs it until a variant is added)."""
    _variants.setdefault(op, {})


def add_variant(op: str, backend: str, overload: object) -> None:
    """Record that ``backend`` ("cpu" or "triton") has kernels for ``op``."""
    _variants.setdefault(op, {})[backend] = overload
    _resolved.clear()


def declared_ops() -> tuple[str, ...]:
    """The fused ops declared so far (all of them once ``fastpeft`` is imported), in the
    order they were declared."""
    return tuple(_variants)


def available_backends(op: str) -> tuple[str, ...]:
    """The backends that can run ``op`` here: ``"reference"`` always, ``"cpu"`` when the
    compiled kernels have it, ``"triton"`` when Triton is installed and a GPU is present
    or ``TRITON_INTERPRET=1`` is set."""
    if op not in _variants:
        raise ValueError(f"op: unknown fastpeft op {op!r}; expected one of {sorted(_variants)}")
    found = ["reference"]
    if "cpu" in _variants[op]:
        found.append("cpu")
    if "triton" in _variants[op] and (TRITON_INTERPRET or torch.cuda.is_available()):
        found.append("triton")
    return tuple(found)


def resolve(op: str, x: torch.Tensor):
    """The registered op that runs ``op`` for ``x``'s device (native C++ or Triton
    variant), or ``None`` for the reference path (also under ``torch.func`` transforms,
    which cannot transform a custom op's autograd). Memoised per (op, device type, backend
    in force): it is on every call's path, and a decode step calls the linear ops once
    per projection, so it reads ``x.is_cpu`` / ``x.is_cuda`` rather than making a
    ``torch.device`` and its type's string (which took a cold call tens of
    microseconds)."""
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack():
        _warn_functorch(op)
        return None
    kind = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
    key = (op, kind, current())
    compiling = torch.compiler.is_compiling()  # (no memo: a guard on it would recompile
    if not compiling:                          # once it fills)
        try:
            return _resolved[key]
        except KeyError:
            pass
    backend = select(x.device)
    if backend == "reference":
        found = None
    elif backend in _variants[op]:
        found = _variants[op][backend]
    elif key[2] == "auto":
        found = None  # e.g. a compiled library older than this op: the reference runs
    else:
        raise RuntimeError(f"fastpeft backend {backend!r} was forced but has no {op} kernel")
    if not compiling:
        _resolved[key] = found
    return found


def _warn_functorch(op: str) -> None:
    from ._warn import warn_once

    warn_once(
        f"functorch:{op}",
        f"fastpeft.{op}: called under a torch.func transform (grad, vmap, jacrev, ...), "
        "which cannot transform the fused kernels' autograd; the unfused PyTorch reference "
        "runs instead (same results).", stacklevel=3)


def native_available() -> bool:
    """True when the compiled C++ kernels were imported."""
    return _native_loaded


def current() -> str:
    """The backend name in force in this thread: ``use_backend`` beats
    ``FASTPEFT_BACKEND``."""
    forced = _forced.name
    return forced if forced is not None else _ENV_BACKEND


def eager_native() -> bool:
    """Whether a public function may hand its call to its C++ entry point
    (:func:`native_call`): not while torch.compile traces it (the entry point is opaque to
    Dynamo), and only where the backend in force (``"auto"`` or ``"cpu"``) runs CPU
    tensors on the native ops. Two reads, no device: it is on every call's path."""
    return not torch.compiler.is_compiling() and current() in ("auto", "cpu")


def _declined(*args: object) -> None:
    return None


def native_call(op: str) -> Callable[..., torch.Tensor | None]:
    """The C++ entry point of ``op``'s usual eager CPU call, ``fastpeft._C.<op>_call``
    (``csrc/calls.cpp``), for the LoRA linear ops. It takes the public function's arguments
    and returns the output, or ``None`` for any call that is not the usual one (a bad
    argument, a tensor subclass, a non-CPU tensor, a torch.func transform, ...), which the
    public function then runs as before. Where the compiled kernels did not load, or lack
    it, a function that always returns ``None``."""
    return getattr(native_module, f"{op}_call", None) or _declined


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"auto"``, ``"reference"``, ``"cpu"`` or ``"triton"``) in a block,
    for the calling thread only.

    >>> with fastpeft.use_backend("reference"):
    ...     y = fastpeft.lora_linear(x, w, None, a, b, 2.0)
    """
    previous = _forced.name
    _forced.name = _validate(name, "use_backend")
    try:
        yield
    finally:
        _forced.name = previous


def select(device: torch.device) -> str:
    """The implementation that runs for tensors on ``device``: reference, cpu or triton."""
    name = current()
    if name == "auto":
        if device.type == "cuda" and TRITON_AVAILABLE:
            return "triton"
        if device.type == "cpu" and _native_loaded:
            return "cpu"
        if device.type == "meta":  # a registered op, whose fake gives the shapes (the
            # reference cannot run everything on meta: a dropout seed's .item(), ids' nonzero)
            return "cpu" if _native_loaded else "triton" if TRITON_AVAILABLE else "reference"
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"fastpeft backend 'cpu' runs CPU tensors only, got {device}")
        if not _native_loaded:
            raise RuntimeError(f"fastpeft backend 'cpu' was forced but the compiled kernels "
                               f"(fastpeft._C) are not loaded; {BUILD_HINT}")
    if name == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("fastpeft backend 'triton' was forced but triton is not installed")
        if device.type == "cpu" and not TRITON_INTERPRET:
            raise RuntimeError(
                "fastpeft backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the "
                "environment before triton is imported"
            )
    return name
