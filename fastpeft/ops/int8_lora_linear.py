"""``fastpeft.int8_lora_linear`` / ``quantize_int8``: a weight-only int8 base layer with a
trainable LoRA branch, fused.

    weight = qweight * weight_scale[:, None]          (never materialised in full)
    y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T

The kernels dequantise tile by tile inside the GEMMs (the per-row scale factors out of
the reduction: ``y[:, n] = weight_scale[n] * (x @ qweight[n])``), and a small-batch path
streams the int8 weight once, reading one byte per weight. The LoRA branch, its seeded
dropout mask and the backward formulas are those of :mod:`fastpeft.ops.lora_linear`,
with ``dx = dy @ weight`` taken through the dequantised weight; the frozen base gets no
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, reference
from . import _memory
from ._checks import check_bool, check_float_input, check_scalar, check_tensor, rows_of
from ._library import OpSpec, declare
from ._linear import check_lora_args, draw_seed, linear_args_ok, linear_backward_fake

if _backend.TRITON_AVAILABLE:
    from ..triton import int8_lora_linear as triton_kernels
else:
    triton_kernels = None

__all__ = ["int8_lora_linear", "quantize_int8"]

# int8 weight-only base: weight = qweight (out, in) int8 * weight_scale (out,) fp32 per row.
# y (T, out) and xa (T, r) as in lora_linear; the float weight is never built.
SCHEMA = ("(Tensor x, Tensor qweight, Tensor weight_scale, Tensor? bias, Tensor lora_A, "
          "Tensor lora_B, float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)")
# (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor qweight, Tensor weight_scale, "
                   "Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, float dropout_p, "
                   "Tensor? seed, bool compute_dx) -> (Tensor, Tensor, Tensor)")


def _fake(x, qweight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], qweight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def _backward_fake(grad_y, x, qweight, weight_scale, lora_A, lora_B, xa, scaling, dropout_p,
                   seed, compute_dx):
    return linear_backward_fake(x, lora_A, lora_B, compute_dx)


# autograd: the LoRA linear ops' C++ one (csrc/linear_autograd.cpp)
declare(OpSpec("int8_lora_linear", SCHEMA, BACKWARD_SCHEMA, _fake, _backward_fake, None, None,
               triton_kernels))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Quantise a float weight to per-output-row symmetric int8.

    Args:
        weight: ``(out, in)`` float weight (any float dtype, any device).

    Returns:
        ``(qweight, weight_scale)``: ``qweight`` int8 ``(out, in)`` in ``[-127, 127]`` and
        ``weight_scale`` float32 ``(out,)`` with ``weight ~ qweight * weight_scale[:, None]``;
        bitsandbytes' row-wise format is ``CB = qweight``, ``SCB = 127 * weight_scale``.
        On a Linux CPU, a ``qweight`` of 2 MiB or more lies in transparent huge pages, in
        a storage that cannot be resized (:mod:`fastpeft.ops._memory`).
    """
    check_float_input("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    finite = torch.isfinite(weight).all(dim=1)
    if not weight.is_meta and not bool(finite.all()):  # (meta: shapes only, no values)
        rows = (~finite).nonzero().flatten()
        raise ValueError(f"weight: expected finite values, got inf or NaN in {rows.numel()} "
                         f"row(s) (first: row {int(rows[0])}); a row's int8 scale would be "
                         "inf or NaN and every output of that row NaN")
    qweight, weight_scale = reference.quantize_int8(weight)
    return _memory.in_huge_pages(qweight), weight_scale


def check_int8_weight(x: Tensor, qweight: Tensor, weight_scale: Tensor) -> None:
    """The quantised base: int8 codes and float32 per-row scales, frozen, on x's device."""
    check_tensor("qweight", qweight, ndim=2, dtype=torch.int8, like=x)
    check_tensor("weight_scale", weight_scale, shape=(qweight.shape[0],), dtype=torch.float32,
                 like=x)
    if weight_scale.requires_grad:
        raise ValueError("weight_scale: the quantised base is frozen and gets no gradient, but "
                         "weight_scale requires grad; pass weight_scale.detach() (or train a "
                         "float base with fastpeft.lora_linear)")


# fastpeft._C.int8_lora_linear_call (csrc/calls.cpp), or a stand-in that declines every call
_NATIVE_CALL = _backend.native_call("int8_lora_linear")


def int8_lora_linear(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """``x @ (qweight * weight_scale[:, None]).T + bias + scaling * (dropout(x) @ lora_A.T) @
    lora_B.T``, fused, with the int8 weight dequantised tile by tile.

    Args:
        x: ``(..., in)`` activations, fp32 / fp16 / bf16 (fp64 for gradcheck).
        qweight: ``(out, in)`` int8 frozen weight (from :func:`quantize_int8`).
        weight_scale: ``(out,)`` float32 per-row scales.
        bias: ``(out,)`` in x's dtype, or ``None``.
        lora_A: ``(r, in)``; lora_B: ``(out, r)``, in x's dtype.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch input, ``0 <= p < 1``.
        training: dropout applies only when true.

    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to ``x``, ``bias``, ``lora_A`` and
        ``lora_B``; the quantised weight is frozen.
    """
    if _backend.eager_native():  # the usual eager CPU call, in C++ (None: not that)
        y = _NATIVE_CALL(x, qweight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p,
                          training)
        if y is not None:
            return y
    if not linear_args_ok(x, qweight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p):
        check_float_input("x", x)
        check_int8_weight(x, qweight, weight_scale)
        check_lora_args(x, qweight, bias, lora_A, lora_B, weight_name="qweight")
        scaling = check_scalar("scaling", scaling)
        dropout_p = check_scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_inclusive=False)
    if training is not True and training is not False:
        training = check_bool("training", training)
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None

    # A 2-D x (a decode step) skips the reshapes: on a tensor that requires grad each is an
    # autograd view, and at T = 1 the Python around the kernel is a sizeable part of a call.
    flat = x.dim() == 2
    lead = x.shape[:-1]
    x2 = x.contiguous() if flat else rows_of(x).contiguous()
    op = _backend.resolve("int8_lora_linear", x)
    if op is None or x2.numel() == 0 or qweight.numel() == 0:  # empty: reference
        y = reference.int8_lora_linear(x2, qweight, weight_scale, bias, lora_A, lora_B, scaling,
                                       p, True, seed)
    else:
        y, _ = op(x2, qweight.contiguous(), weight_scale.contiguous(), bias,
                  lora_A.contiguous(), lora_B.contiguous(), scaling, p, seed)
    return y if flat else y.reshape(*lead, qweight.shape[0])
