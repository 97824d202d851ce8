"""``LoRALinear``: a drop-in wrapper that adds a fused LoRA branch to an ``nn.Linear``."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from ..ops._checks import check_float_dtype, check_positive_int
from ..ops.lora_linear import lora_linear

__all__ = ["LoRALinear", "is_conv1d", "linear_weight", "lora_weights"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (GPT-2's linear layer, which
    stores its weight as ``(in, out)``: PEFT's ``fan_in_fan_out``)."""
    utils = sys.modules.get("transformers.pytorch_utils")  # not imported: no Conv1D exists
    return utils is not None and isinstance(module, utils.Conv1D)


# nn.Linear subclasses whose forward computes x @ weight.T + bias all the same
_PLAIN_FORWARDS = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def own_forward(module: nn.Module) -> bool:
    """Whether ``module``, an ``nn.Linear`` or ``Conv1D``, is of a subclass with a forward
    of its own (a head that scales its logits, a router, ...): a fused LoRA layer, which
    computes the linear map from the weight, would bypass it. bitsandbytes' layers, read
    as what they are, and subclasses known to compute the plain linear map (Falcon's
    ``FalconLinear``) are not counted."""
    cls = type(module)
    if is_conv1d(module):
        base = sys.modules["transformers.pytorch_utils"].Conv1D
    elif isinstance(module, nn.Linear):
        if cls.__module__.startswith("bitsandbytes"):
            return False
        base = nn.Linear
    else:
        return False
    owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
    return owner is not base and (owner.__module__, owner.__qualname__) not in _PLAIN_FORWARDS


def check_linear_base(base: nn.Module) -> None:
    """Refuses a base layer the fused LoRA linear ops cannot compute: not an ``nn.Linear``
    or ``Conv1D``, or of a subclass with a forward of its own (:func:`own_forward`)."""
    if not isinstance(base, nn.Linear) and not is_conv1d(base):
        raise TypeError(f"base: expected an nn.Linear or a transformers Conv1D, got "
                        f"{type(base).__name__}")
    if own_forward(base):
        raise TypeError(f"base: {type(base).__name__} has a forward of its own, which the "
                        f"fused LoRA linear (computing x @ weight.T + bias) would bypass")


def linear_weight(base: nn.Module) -> Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or ``Conv1D``; for the latter a
    transposed view of its ``(in, out)`` storage, which the kernels read in place."""
    return base.weight.t() if is_conv1d(base) else base.weight


def lora_weights(layer: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``layer.lora_A.weight`` and ``layer.lora_B.weight`` in the compute ``dtype`` (a cast
    that autograd sees, for LoRA weights kept in higher precision than the base)."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if a.dtype != dtype:
        a, b = a.to(dtype), b.to(dtype)
    return a, b


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes a linear layer in for ``x``; None outside autocast (and
    for anything but a tensor, which the op then refuses, or on a device without autocast,
    such as ``meta``)."""
    if not isinstance(x, Tensor):
        return None
    # one call on every layer call's path (it covers CPU and CUDA, not every device type)
    if (x.is_cpu or x.is_cuda) and not torch._C._is_any_autocast_enabled():
        return None
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and torch.amp.is_autocast_available(x.device.type) \
            and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _merge_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a merge computes in: float32, or float64 for a float64 weight."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` computed by one fused op.

    Wraps ``base`` without copying it (``base_layer`` *is* the given module, so its
    weight stays shared and frozen). ``base`` is an ``nn.Linear`` or a ``transformers``
    ``Conv1D`` (GPT-2), whose ``(in, out)`` weight the fused op reads transposed, in
    place (PEFT's ``fan_in_fan_out``). ``lora_A`` / ``lora_B`` are bias-free ``nn.Linear``
    layers with PEFT's names and initialisation (A Kaiming-uniform, B zeros), so the
    output equals the base layer's at step 0 and the state-dict keys are
    ``lora_A.weight`` / ``lora_B.weight``.

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to adapt (its parameters are frozen).
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``.
        lora_dropout: dropout probability on the LoRA branch input.
        device, dtype: of the LoRA weights; default to the base weight's.

    LoRA weights kept in another floating dtype than the base weight (float32 on a bf16
    model, as PEFT does) are cast to the base dtype in forward.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_linear_base(base)
        check_positive_int("r", r)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {lora_dropout}")
        factory = {
            "device": device if device is not None else base.weight.device,
            "dtype": check_float_dtype("dtype", dtype) or base.weight.dtype,
        }
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.fan_in_fan_out = is_conv1d(base)
        out_features, in_features = linear_weight(base).shape
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.merged = False
        self.reset_parameters()

    @property
    def weight(self) -> Tensor:
        """The base weight as the base layer stores it (so code that reads
        ``layer.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        bias = base.bias
        dtype = autocast_dtype(x)
        if dtype is None:
            a, b = lora_weights(self, weight.dtype)
            return lora_linear(x, weight, bias, a, b, self.scaling, self.lora_dropout,
                               self.training)
        # as nn.Linear under autocast: every operand in its dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        a, b = lora_weights(self, dtype)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, bias, a, b, self.scaling, self.lora_dropout,
                               self.training)

    def delta_weight(self) -> Tensor:
        """``scaling * lora_B @ lora_A`` computed in fp32 (fp64 for a float64 base), in the
        base dtype and the base weight's layout (``(out, in)``, or ``(in, out)`` for a
        ``Conv1D``)."""
        w = self.base_layer.weight
        return self._delta(_merge_dtype(w)).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA product into the base weight (in place); forward then runs the
        plain base layer. Undo with :meth:`unmerge`."""
        if self.merged:
            raise RuntimeError("merge: this LoRALinear is already merged")
        w = self.base_layer.weight
        dtype = _merge_dtype(w)
        w.copy_((w.to(dtype) + self._delta(dtype)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the LoRA product from the base weight again."""
        if not self.merged:
            raise RuntimeError("unmerge: this LoRALinear is not merged")
        w = self.base_layer.weight
        dtype = _merge_dtype(w)
        w.copy_((w.to(dtype) - self._delta(dtype)).to(w.dtype))
        self.merged = False

    def _delta(self, dtype: torch.dtype) -> Tensor:
        delta = self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )
