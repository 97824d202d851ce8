"""How a fastpeft op is declared, and the boot of the ``fastpeft`` operator namespace.

An op is declared once, by an :class:`OpSpec` in ``fastpeft/ops/<op>.py``: its schema,
its fake (shape) functions, what it saves for backward and its backward formulas, and its
Triton kernels. :func:`declare` turns the spec into registered operators, all with the
same schema, the same fake and the same autograd:

========================================  ===============================================
``fastpeft::<op>``, ``<op>_backward``     native: the C++ CPU kernels (``csrc/cpu/<op>.cpp``
                                          in the package, registered when they load)
``fastpeft::<op>_triton``,                Triton: ``fastpeft/triton/<op>.py`` (CUDA tensors;
``<op>_backward_triton``                  CPU tensors under ``TRITON_INTERPRET=1``)
========================================  ===============================================

Autograd is Python (``torch.library.register_autograd``) for every variant: one
``setup_context`` and one ``backward``, which receives the variant's own backward op.
Forward ops return the output plus the small tensors that backward needs (marked
non-differentiable). The backward ops have no derivative: differentiating them (double
backward) raises. :func:`declare` then tells :mod:`fastpeft._backend` which variants have
kernels, and the public function (``fastpeft.<op>``) asks :func:`fastpeft._backend.resolve`
which one to call.

Booting is this module's import: it creates the namespace and loads ``fastpeft._C``
(whose C++ kernels register under the op names before the names are declared, which the
dispatcher allows); each ``fastpeft/ops/<op>.py`` then declares its op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from .. import _backend

lib = torch.library.Library("fastpeft", "DEF")

_backend.load_native()


@dataclass(frozen=True)
class OpSpec:
    """Everything that defines one fused op (apart from its kernels and public function).

    Attributes:
        name: the op's name, ``fastpeft::<name>``.
        schema: the forward's signature without its name, ``"(Tensor x, ...) -> (...)"``.
        backward_schema: the backward op's signature; it takes the saved tensors and the
            output gradient and returns the input gradients.
        fake: the forward's shape function (``torch.library.register_fake``).
        backward_fake: the backward op's shape function.
        setup_context: ``(ctx, inputs, output)``: saves what ``backward`` needs.
        backward: ``(backward_op, ctx, *grad_outputs)`` -> one gradient per input;
            ``backward_op`` is the backward op of the variant that ran the forward.
        triton: the module with the Triton kernels' ``forward`` and ``backward`` (taking
            the schemas' arguments), or ``None`` when Triton is not installed.
    """

    name: str
    schema: str
    backward_schema: str
    fake: Callable[..., Any]
    backward_fake: Callable[..., Any]
    setup_context: Callable[[Any, tuple, Any], None]
    backward: Callable[..., tuple]
    triton: ModuleType | None


def declare(spec: OpSpec) -> None:
    """Register ``spec``'s operators (native, and Triton when its module is given) with
    their fakes and autograd, the Triton kernels, and the variants in :mod:`_backend`."""
    suffixes = {"cpu": ""} | ({"triton": "_triton"} if spec.triton is not None else {})
    for backend, suffix in suffixes.items():
        forward, backward = f"{spec.name}{suffix}", f"{spec.name}_backward{suffix}"
        lib.define(forward + spec.schema)
        lib.define(backward + spec.backward_schema)
        torch.library.register_fake(f"fastpeft::{forward}", spec.fake, lib=lib)
        torch.library.register_fake(f"fastpeft::{backward}", spec.backward_fake, lib=lib)
        backward_op = getattr(torch.ops.fastpeft, backward).default
        torch.library.register_autograd(
            f"fastpeft::{forward}", functools.partial(spec.backward, backward_op),
            setup_context=spec.setup_context, lib=lib)
        torch.library.register_autograd(
            f"fastpeft::{backward}", functools.partial(_no_double_backward, spec.name), lib=lib)
        if spec.triton is not None and backend == "triton":
            torch.library.register_kernel(f"fastpeft::{forward}", ("cpu", "cuda"),
                                          spec.triton.forward, lib=lib)
            torch.library.register_kernel(f"fastpeft::{backward}", ("cpu", "cuda"),
                                          spec.triton.backward, lib=lib)
        op = getattr(torch.ops.fastpeft, forward).default
        if backend == "triton" or torch._C._dispatch_has_kernel_for_dispatch_key(
                op.name(), "CPU"):
            _backend.add_variant(spec.name, backend, op)


def _no_double_backward(name: str, ctx: Any, *grads: Any) -> tuple:
    raise RuntimeError(f"fastpeft.{name}: its backward has no derivative; double backward "
                       "(create_graph=True, then differentiating a gradient) is not supported")
