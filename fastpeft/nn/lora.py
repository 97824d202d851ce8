"""``LoRALinear``: a drop-in wrapper that adds a fused LoRA branch to an ``nn.Linear``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.lora_linear import lora_linear

__all__ = ["LoRALinear", "lora_weights"]


def lora_weights(layer: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``layer.lora_A.weight`` and ``layer.lora_B.weight`` in the compute ``dtype`` (a cast
    that autograd sees, for LoRA weights kept in higher precision than the base)."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if a.dtype != dtype:
        a, b = a.to(dtype), b.to(dtype)
    return a, b


class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` computed by one fused op.

    Wraps ``base`` without copying it (``base_layer`` *is* the given module, so its
    weight stays shared and frozen). ``lora_A`` / ``lora_B`` are bias-free ``nn.Linear``
    layers with PEFT's names and initialisation (A Kaiming-uniform, B zeros), so the
    output equals the base layer's at step 0 and the state-dict keys are
    ``lora_A.weight`` / ``lora_B.weight``.

    Args:
        base: the ``nn.Linear`` to adapt (its parameters are frozen).
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
        base: nn.Linear,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {lora_dropout}")
        factory = {
            "device": device if device is not None else base.weight.device,
            "dtype": dtype if dtype is not None else base.weight.dtype,
        }
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.merged = False
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight (so code that reads ``layer.weight`` keeps working)."""
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
        a, b = lora_weights(self, base.weight.dtype)
        return lora_linear(
            x, base.weight, base.bias, a, b, self.scaling, self.lora_dropout, self.training,
        )

    def delta_weight(self) -> Tensor:
        """``scaling * lora_B @ lora_A`` (out, in), computed in fp32, in the base dtype."""
        return self._delta_fp32().to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA product into the base weight (in place); forward then runs the
        plain base layer. Undo with :meth:`unmerge`."""
        if self.merged:
            raise RuntimeError("merge: this LoRALinear is already merged")
        w = self.base_layer.weight
        w.copy_((w.float() + self._delta_fp32()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the LoRA product from the base weight again."""
        if not self.merged:
            raise RuntimeError("unmerge: this LoRALinear is not merged")
        w = self.base_layer.weight
        w.copy_((w.float() - self._delta_fp32()).to(w.dtype))
        self.merged = False

    def _delta_fp32(self) -> Tensor:
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )
