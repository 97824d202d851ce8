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

import math

import torch
from torch import Tensor

from .. import _backend, reference
from ._checks import FLOAT_DTYPES, check_float_input, check_scalar, check_tensor
from ._library import register_autograd

__all__ = ["lora_linear"]


@torch.library.register_fake("fastpeft::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.register_fake("fastpeft::lora_linear_backward")
def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p,
                               seed, compute_dx):
    dx = torch.empty_like(x) if compute_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.mark_non_differentiable(output[1])


def _autograd_backward(backward_op):
    def backward(ctx, grad_y: Tensor, _grad_xa: Tensor | None):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        dx, d_a, d_b = backward_op(
            grad_y, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed, need_x
        )
        # The frozen base is the common case; a trainable base gets the plain formulas,
        # d weight laid out as weight is (a transposed view's gradient is then a contiguous
        # (in, out) tensor, which autograd accumulates into its storage without a copy).
        d_w = None
        if need_w:
            d_w = grad_y.t().mm(x) if weight.is_contiguous() else x.t().mm(grad_y).t()
        d_bias = grad_y.sum(0) if need_b else None
        return dx if need_x else None, d_w, d_bias, d_a, d_b, None, None, None

    return backward


register_autograd("lora_linear", _autograd_backward, _setup_context)


def check_lora_args(x, weight, bias, lora_A, lora_B, weight_name: str = "weight") -> None:
    """Shape/dtype/device checks shared by ``lora_linear`` and ``int8_lora_linear``."""
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension {in_features} ({weight_name} is "
            f"{tuple(weight.shape)} = "
            f"(out, in)), got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(out_features,), like=x)
    check_tensor("lora_A", lora_A, shape=(None, in_features), like=x)
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, shape=(out_features, rank), like=x)


def linear_args_ok(x, weight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p) -> bool:
    """Whether the arguments of ``lora_linear`` (``weight_scale`` None) or
    ``int8_lora_linear`` are ones the full checks accept, tested in one pass.

    Only a shortcut for the usual call, which a decode step makes once per projection and
    token: the checks that name a bad argument take a dozen Python calls. Anything unusual
    (a bad argument, but also an int ``scaling``) returns False, and the full checks then
    run; a True here never lets through what they would refuse (tensor-like objects that
    are no ``Tensor`` included: they are refused here first).
    """
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and (bias is None or isinstance(bias, Tensor))
            and (weight_scale is None or isinstance(weight_scale, Tensor))):
        return False
    try:
        dt, dev = x.dtype, x.device
        out_features, in_features = weight.shape
        rank = lora_A.shape[0]
        if weight_scale is None:
            base_ok = weight.dtype == dt and weight.device == dev
        else:
            base_ok = (weight.dtype == torch.int8 and weight.device == dev
                       and weight_scale.shape == (out_features,)
                       and weight_scale.dtype == torch.float32 and weight_scale.device == dev)
        return (
            base_ok and dt in FLOAT_DTYPES and x.shape[-1] == in_features and rank >= 1
            and lora_A.shape == (rank, in_features) and lora_A.dtype == dt
            and lora_A.device == dev and lora_B.shape == (out_features, rank)
            and lora_B.dtype == dt and lora_B.device == dev
            and (bias is None or (bias.shape == (out_features,) and bias.dtype == dt
                                  and bias.device == dev))
            and type(scaling) is float and math.isfinite(scaling)
            and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
        )
    except (ValueError, IndexError):  # weight not 2-D, lora_A or x 0-D
        return False


def base_weight(weight: Tensor) -> Tensor:
    """``weight`` itself when the kernels read it in place: a contiguous ``(out, in)``
    tensor or the transposed view of a contiguous ``(in, out)`` one (``Conv1D.weight.t()``);
    any other layout as a contiguous copy (the native CPU op refuses other layouts)."""
    if weight.is_contiguous() or weight.t().is_contiguous():
        return weight
    return weight.contiguous()


def draw_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed from torch's generator for ``device`` (so ``torch.manual_seed``
    makes runs reproducible); kept on the device so no kernel waits on the host."""
    return torch.randint(-(2**62), 2**62, (1,), dtype=torch.int64, device=device)


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
    if not linear_args_ok(x, weight, None, bias, lora_A, lora_B, scaling, dropout_p):
        check_float_input("x", x)
        check_tensor("weight", weight, ndim=2, like=x)
        check_lora_args(x, weight, bias, lora_A, lora_B)
        scaling = check_scalar("scaling", scaling)
        dropout_p = check_scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_inclusive=False)
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    op = _backend.resolve("lora_linear", x.device)
    if op is None:
        y = reference.lora_linear(x2, weight, bias, lora_A, lora_B, scaling, p, True, seed)
    else:
        y, _ = op(x2, base_weight(weight), bias, lora_A.contiguous(), lora_B.contiguous(),
                  scaling, p, seed)
    return y.reshape(*lead, weight.shape[0])
