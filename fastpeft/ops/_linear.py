"""What the LoRA linear ops (``lora_linear``, ``int8_lora_linear``, ``nf4_lora_linear``)
share: their LoRA-argument checks, the one-pass check of a usual call, the layout the
kernels read the base weight in, the dropout seed, and the backward's shape function.

The LoRA branch and its backward formulas are the same for all of them (see
:mod:`fastpeft.ops.lora_linear`); only the base term differs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor


def linear_backward_fake(x: Tensor, lora_A: Tensor, lora_B: Tensor,
                         compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of ``(dx or an empty tensor when not compute_dx, d lora_A, d lora_B)``."""
    dx = torch.empty_like(x) if compute_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def check_lora_args(x, weight, bias, lora_A, lora_B, weight_name: str = "weight",
                    in_features: int | None = None) -> None:
    """Shape, dtype and device checks shared by the LoRA linear ops (``weight`` is the
    float, int8 or packed NF4 base weight, already checked to be 2-D; ``in_features``
    given where it is not ``weight.shape[1]``: two NF4 codes per byte)."""
    out_features = weight.shape[0]
    if in_features is None:
        in_features = weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension {in_features} ({weight_name} is "
            f"{tuple(weight.shape)} = (out, in)), got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(out_features,))
    check_tensor("lora_A", lora_A, shape=(None, in_features))
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, shape=(out_features, rank))
    floats = {"x": x, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    if weight.is_floating_point():
        floats = {"x": x, weight_name: weight} | floats
    check_same_dtype(floats)
    check_same_device(floats | {weight_name: weight})


def linear_args_ok(x, weight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p) -> bool:
    """Whether the arguments of ``lora_linear`` (``weight_scale`` None) or
    ``int8_lora_linear`` are ones the full checks accept, tested in one pass.

    Only a shortcut for the usual call, which a decode step makes once per projection and
    token: the checks that name a bad argument take a dozen Python calls. Anything unusual
    (a bad argument, but also an int ``scaling``) returns False, and the full checks then
    run; a True here never lets through what they would refuse (tensor-like objects that
    are no ``Tensor`` included: they are refused here first).
    """
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)
            and (weight_scale is None or isinstance(weight_scale, Tensor))):
        return False
    try:
        dt, dev = x.dtype, x.device
        out_features, in_features = weight.shape
        if weight_scale is None:
            base_ok = weight.dtype == dt and weight.device == dev
        else:
            base_ok = (weight.dtype == torch.int8 and weight.device == dev
                       and weight_scale.shape == (out_features,)
                       and weight_scale.dtype == torch.float32 and weight_scale.device == dev
                       and not weight_scale.requires_grad)
    except ValueError:  # weight not 2-D
        return False
    return base_ok and lora_args_ok(x, in_features, out_features, bias, lora_A, lora_B,
                                    scaling, dropout_p)


def lora_args_ok(x, in_features: int, out_features: int, bias, lora_A, lora_B, scaling,
                 dropout_p) -> bool:
    """The LoRA part of :func:`linear_args_ok` (x a Tensor, the base already accepted):
    x's dtype and last dimension, bias, lora_A, lora_B, and the two scalars."""
    if not (isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor)
            and (bias is None or isinstance(bias, Tensor))):
        return False
    try:
        dt, dev = x.dtype, x.device
        rank = lora_A.shape[0]
        return (
            dt in FLOAT_DTYPES and x.shape[-1] == in_features and rank >= 1
            and lora_A.shape == (rank, in_features) and lora_A.dtype == dt
            and lora_A.device == dev and lora_B.shape == (out_features, rank)
            and lora_B.dtype == dt and lora_B.device == dev
            and (bias is None or (bias.shape == (out_features,) and bias.dtype == dt
                                  and bias.device == dev))
            and type(scaling) is float and -math.inf < scaling < math.inf  # (not NaN)
            and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
        )
    except IndexError:  # lora_A or x 0-D
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
