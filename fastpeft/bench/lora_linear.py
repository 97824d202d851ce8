"""Benchmark case: LoRA linear — fastpeft vs the unfused reference vs PEFT vs the frozen
base ``nn.Linear`` (the floor: what the layer costs without any adapter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..nn import LoRALinear
from .peers import peft_lora_linear
from .runner import Case


@dataclass(frozen=True)
class LoRALinearShape:
    tokens: int
    d_in: int
    d_out: int
    r: int = 16
    dropout: float = 0.1

    def __str__(self) -> str:
        return f"T={self.tokens} in={self.d_in} out={self.d_out} r={self.r} p={self.dropout}"

    @property
    def size(self) -> int:
        """Elements of x."""
        return self.tokens * self.d_in


# (the last: a high rank, where the C++ branch takes ATen's rank-R GEMMs)
CPU_SHAPES = [LoRALinearShape(512, 2048, 2048), LoRALinearShape(128, 1024, 1024),
              LoRALinearShape(100, 2048, 5632, r=256)]
CUDA_SHAPES = [LoRALinearShape(4096, 4096, 4096), LoRALinearShape(8192, 4096, 11008)]
TINY_SHAPES = [LoRALinearShape(8, 64, 48, r=4)]

# the peer libraries (imported quietly by the CLI before its header)
PEER_LIBRARIES: tuple[str, ...] = ("peft",)


def build(shape: LoRALinearShape, dtype: torch.dtype, device: torch.device) -> Case:
    factory = {"dtype": dtype, "device": device}
    base = nn.Linear(shape.d_in, shape.d_out, **factory).requires_grad_(False)
    alpha = 2 * shape.r
    fused = LoRALinear(base, shape.r, alpha, shape.dropout).train()
    nn.init.normal_(fused.lora_B.weight, std=0.02)  # a trained adapter, not the zero init
    a, b = fused.lora_A.weight, fused.lora_B.weight

    def unfused(x):
        return reference.lora_linear(x, base.weight, base.bias, a, b, fused.scaling,
                                     shape.dropout, True)

    providers = {"fastpeft": fused, "reference": unfused, "base": base}
    params = [base.weight, base.bias, a, b]
    peer = peft_lora_linear(base, shape.r, alpha, shape.dropout)
    missing = "peft (not installed)" if peer is None else None
    if peer is not None:
        peer.train()
        with torch.no_grad():
            peer.lora_A["default"].weight.copy_(a)
            peer.lora_B["default"].weight.copy_(b)
        providers["peft"] = peer
        params += [peer.lora_A["default"].weight, peer.lora_B["default"].weight]

    def make_inputs():
        return (torch.randn(shape.tokens, shape.d_in, **factory, requires_grad=True),)

    return Case(providers, make_inputs, floor="base", peer="peft", missing_peer=missing,
                params=params)
