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

Each op has one autograd, which serves all its variants:

* The LoRA linear ops (``lora_linear``, ``int8_lora_linear``, ``nf4_lora_linear``,
  ``multi_lora_linear``) share one C++ autograd, ``csrc/linear_autograd.cpp``, registered
  at the ``Autograd`` dispatch key of both variants when the compiled library loads. A
  decode step calls them once per projection and token, and a Python
  ``autograd.Function`` cost about 10 us a call more forward and 25 us more
  forward+backward. Their specs give no ``setup_context``/``backward``; their schemas
  follow the convention that file states (and checks). Without the compiled library
  (a machine that could not build it), :func:`_linear_fallback` states the same
  convention in Python, so that their Triton variants still train there.
* The bottleneck adapter's autograd is C++ too, ``csrc/bottleneck_autograd.cpp``, for the
  same reason (a Houlsby model calls it twice per block and token). Its spec also gives
  the same formulas in Python (``setup_context`` and ``backward``), which serve where the
  compiled library is missing.
* The gated prefix attention gives a Python ``setup_context`` and ``backward`` only.

  Python formulas receive the variant's own backward op, and are registered at the
  ``Autograd`` key by :func:`_autograd_kernel` (``torch.library.register_autograd`` minus
  its per-call argument rebinding) where no C++ autograd is.

Forward ops return the output plus the small tensors that backward needs (not requiring
grad). The backward ops have no derivative: differentiating them (double backward) raises.
:func:`declare` then tells :mod:`fastpeft._backend` which variants have kernels, and the
public function (``fastpeft.<op>``) asks :func:`fastpeft._backend.resolve` which one to
call.

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
from torch import Tensor

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
        setup_context: ``(ctx, inputs, output)``: saves what ``backward`` needs; ``None``
            for the LoRA linear ops, whose autograd is C++ (``csrc/linear_autograd.cpp``).
        backward: ``(backward_op, ctx, *grad_outputs)`` -> one gradient per input;
            ``backward_op`` is the backward op of the variant that ran the forward;
            ``None`` with ``setup_context``.
        triton: the module with the Triton kernels' ``forward`` and ``backward`` (taking
            the schemas' arguments), or ``None`` when Triton is not installed.
    """

    name: str
    schema: str
    backward_schema: str
    fake: Callable[..., Any]
    backward_fake: Callable[..., Any]
    setup_context: Callable[[Any, tuple, Any], None] | None
    backward: Callable[..., tuple] | None
    triton: ModuleType | None


def declare(spec: OpSpec) -> None:
    """Register ``spec``'s operators (native, and Triton when its module is given) with
    their fakes and autograd, the Triton kernels, and the variants in :mod:`_backend`."""
    _backend.add_op(spec.name)
    suffixes = {"cpu": ""} | ({"triton": "_triton"} if spec.triton is not None else {})
    for backend, suffix in suffixes.items():
        forward, backward = f"{spec.name}{suffix}", f"{spec.name}_backward{suffix}"
        lib.define(forward + spec.schema)
        lib.define(backward + spec.backward_schema)
        torch.library.register_fake(f"fastpeft::{forward}", spec.fake, lib=lib)
        torch.library.register_fake(f"fastpeft::{backward}", spec.backward_fake, lib=lib)
        forward_op = getattr(torch.ops.fastpeft, forward).default
        backward_op = getattr(torch.ops.fastpeft, backward).default
        setup_context, backward_formulas = spec.setup_context, spec.backward
        if torch._C._dispatch_has_kernel_for_dispatch_key(forward_op.name(), "Autograd"):
            backward_formulas = None  # the compiled library's C++ autograd
        elif backward_formulas is None:
            # no compiled library: the LoRA linear ops' C++ autograd convention, in Python
            setup_context, backward_formulas = _linear_fallback(forward_op)
        if backward_formulas is not None:
            run_backward = functools.partial(_run_backward, backward_op)
            lib.impl(forward, _autograd_kernel(
                forward_op, setup_context, functools.partial(backward_formulas, run_backward)),
                "Autograd", with_keyset=True)
        lib.impl(backward, _autograd_kernel(
            backward_op, None, functools.partial(_no_double_backward, spec.name)),
            "Autograd", with_keyset=True)
        if spec.triton is not None and backend == "triton":
            torch.library.register_kernel(f"fastpeft::{forward}", ("cpu", "cuda"),
                                          spec.triton.forward, lib=lib)
            torch.library.register_kernel(f"fastpeft::{backward}", ("cpu", "cuda"),
                                          spec.triton.backward, lib=lib)
        if backend == "triton" or torch._C._dispatch_has_kernel_for_dispatch_key(
                forward_op.name(), "CPU"):
            _backend.add_variant(spec.name, backend, forward_op)


def _linear_fallback(op: torch._ops.OpOverload) -> tuple[Callable, Callable]:
    """The LoRA linear ops' autograd where the compiled library (and so its C++ autograd,
    ``csrc/linear_autograd.cpp``) is missing: the same convention and formulas, read off
    ``op``'s schema, in Python, so that their Triton variants still train on a machine
    that could not build the library. Slower per call; not used otherwise."""
    names = [a.name for a in op._schema.arguments]
    bias = names.index("bias")
    lora = (bias + 1, bias + 2)

    def setup_context(ctx, inputs, output) -> None:
        args = [a for i, a in enumerate(inputs) if i != bias]
        args.insert(bias + 2, output[1])  # the backward's arguments: xa after lora_B
        ctx.tensor_at = [i for i, a in enumerate(args) if a is None or isinstance(a, Tensor)]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_at))
        ctx.args = args
        for i in ctx.tensor_at:
            args[i] = None
        ctx.mark_non_differentiable(output[1])

    def backward(backward_op, ctx, grad_y, _grad_xa):
        need = ctx.needs_input_grad
        for i, wanted in enumerate(need):
            if wanted and i not in (0, 1, bias, *lora):
                raise RuntimeError(f"{op._name}: {names[i]} gets no gradient, but it requires "
                                   "grad; pass it detached")
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors, strict=True):
            args[i] = t
        grad_y = grad_y.contiguous()
        dx, d_a, d_b = backward_op(grad_y, *args, need[0])
        grads: list[Tensor | None] = [None] * len(need)
        grads[0] = dx if need[0] else None
        x, weight = args[0], args[1]
        if need[1]:  # a trainable float base, d weight laid out as weight is
            grads[1] = grad_y.t().mm(x) if weight.is_contiguous() else x.t().mm(grad_y).t()
        if need[bias]:
            grads[bias] = grad_y.sum(0)
        grads[lora[0]], grads[lora[1]] = d_a, d_b
        return tuple(grads)

    return setup_context, backward


_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


def _autograd_kernel(op: torch._ops.OpOverload,
                     setup_context: Callable[[Any, tuple, Any], None] | None,
                     backward: Callable[..., tuple]) -> Callable[..., Any]:
    """The ``Autograd`` kernel of ``op``: with grad enabled and an input that requires
    grad, one ``autograd.Function`` node whose forward runs ``op``'s kernels below autograd
    and calls ``setup_context(ctx, inputs, output)``; otherwise the kernels alone."""

    class Node(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            if setup_context is not None:
                setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Node.__name__ = Node.__qualname__ = f"{op._opname}_node"
    # autograd.Function.apply minus its Python prologue (unwrapping torch.func wrappers:
    # under a transform the public functions run the reference, see _backend.resolve)
    apply = super(torch.autograd.Function, Node).apply

    def kernel(keyset: torch._C.DispatchKeySet, *args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _BELOW_AUTOGRAD, *args)

    return kernel


def _run_backward(backward_op: torch._ops.OpOverload, *args: Any) -> Any:
    """Calls a backward op from its forward's ``backward``: straight to its kernels when
    grad is off (the usual backward pass), through its ``Autograd`` kernel under
    ``create_graph=True``, so that differentiating its result raises, and when traced
    (compiled autograd), where the dispatch guard cannot be traced and costs nothing."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return backward_op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return backward_op(*args)


def _no_double_backward(name: str, ctx: Any, *grads: Any) -> tuple:
    raise RuntimeError(f"fastpeft.{name}: its backward has no derivative; double backward "
                       "(create_graph=True, then differentiating a gradient) is not supported")
