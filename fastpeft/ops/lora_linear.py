"""``fastpeft.lora_linear``: a linear layer plus its LoRA branch, fused.

    y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T

Forward saves ``x`` and ``xa = dropout(x) @ lora_A.T`` (T, r) only; the dropout mask is
regenerated from a seed in backward (see :mod:`fastpeft.reference` for the mask).

Backward (dy = dL/dy, T rows; keep = mask / (1 - p)):
    dyB      = dy @ lora_B                                   (T, r)
    d lora_B = scaling * dy.T @ xa                           (out, r)
    d lora_A = scaling * dyB.T @ (keep * x)                  (r, in)
    dx       = dy @ weight + scaling * keep * (dyB @ lora_A) (T, in)
    d weight = dy.T @ x,  d bias = dy.sum(0)    (only when they require grad)

``weight`` is ``(out, in)``, laid out either row-major or as the transposed view of a
row-major ``(in, out)`` tensor (GPT-2's ``Conv1D`` stores its weight that way, PEFT's
``fan_in_fan_out``: pass ``conv1d.weight.t()``). Every backend reads both layouts in place,
never copying the base weight; ``d weight`` of a trainable transposed view reaches its
``(in, out)`` storage through autograd's transpose. Any other layout (a strided slice, an
expanded tensor) is copied to a contiguous ``(out, in)`` tensor first (see
:func:`base_weight`).
"""

from __future__ import annotations

from torch import Tensor

from .. import _backend, reference
from ._checks import check_bool, check_float_input, check_scalar, check_tensor, rows_of
from ._library import OpSpec, declare
from ._linear import (
    base_weight,
    check_lora_args,
    draw_seed,
    linear_args_ok,
    linear_backward_fake,
)

if _backend.TRITON_AVAILABLE:
    from ..triton import lora_linear as triton_kernels
else:
    triton_kernels = None

__all__ = ["lora_linear"]

# y (T, out) and xa = dropout(x) @ lora_A.T (T, r), saved for backward
SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
          "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)")
# (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
                   "Tensor xa, float scaling, float dropout_p, Tensor? seed, "
                   "bool compute_dx) -> (Tensor, Tensor, Tensor)")


def _fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed,
                   compute_dx):
    return linear_backward_fake(x, lora_A, lora_B, compute_dx)


# autograd: the LoRA linear ops' C++ one (csrc/linear_autograd.cpp)
declare(OpSpec("lora_linear", SCHEMA, BACKWARD_SCHEMA, _fake, _backward_fake, None, None,
               triton_kernels))


# fastpeft._C.lora_linear_call (csrc/calls.cpp), or a stand-in that declines every call
_NATIVE_CALL = _backend.native_call("lora_linear")


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """``x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``, fused.

    Args:
        x: ``(..., in)`` activations, fp32 / fp16 / bf16 (fp64 for gradcheck).
        weight: ``(out, in)`` frozen base weight, same dtype and device as ``x``: row-major,
            or the transposed view of a row-major ``(in, out)`` tensor (``Conv1D.weight.t()``),
            both read in place; any other layout is copied to row-major first.
        bias: ``(out,)`` or ``None``.
        lora_A: ``(r, in)``; lora_B: ``(out, r)``.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch input, ``0 <= p < 1``.
        training: dropout applies only when true.

    Returns:
        ``(..., out)``. Gradients flow to ``x``, ``lora_A``, ``lora_B`` (and to ``weight``,
        ``bias`` when they require grad).
    """
    if _backend.eager_native():  # the usual eager CPU call, in C++ (None: not that)
        y = _NATIVE_CALL(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
        if y is not None:
            return y
    if not linear_args_ok(x, weight, None, bias, lora_A, lora_B, scaling, dropout_p):
        check_float_input("x", x)
        check_tensor("weight", weight, ndim=2)
        check_lora_args(x, weight, bias, lora_A, lora_B)
        scaling = check_scalar("scaling", scaling)
        dropout_p = check_scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_inclusive=False)
    if training is not True and training is not False:
        training = check_bool("training", training)
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None

    flat = x.dim() == 2  # (rows, in): no reshapes
    lead = x.shape[:-1]
    x2 = x.contiguous() if flat else rows_of(x).contiguous()
    op = _backend.resolve("lora_linear", x)
    if op is None or x2.numel() == 0 or weight.numel() == 0:  # empty: reference
        y = reference.lora_linear(x2, weight, bias, lora_A, lora_B, scaling, p, True, seed)
    else:
        y, _ = op(x2, base_weight(weight), bias, lora_A.contiguous(), lora_B.contiguous(),
                  scaling, p, seed)
    return y if flat else y.reshape(*lead, weight.shape[0])
