"""Benchmark case: int8 base + LoRA — fastpeft vs the float LoRA reference (F.linear on the
float weight + LoRA) vs bitsandbytes ``Linear8bitLt`` + PEFT LoRA vs the frozen float
``nn.Linear`` (the floor). Weight bytes are reported next to the timings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..nn import Int8LoRALinear
from .peers import bnb_int8_lora_linear
from .runner import Case


@dataclass(frozen=True)
class Int8Shape:
    tokens: int
    d_in: int = 4096
    d_out: int = 4096
    r: int = 16
    dropout: float = 0.1

    def __str__(self) -> str:
        return f"T={self.tokens} in={self.d_in} out={self.d_out} r={self.r} p={self.dropout}"

    @property
    def size(self) -> int:
        """Elements of x."""
        return self.tokens * self.d_in


# T = 4: a decode step of a few sequences (one pass of the CPU GEMV; T = 16 takes four)
CPU_SHAPES = [Int8Shape(1), Int8Shape(4), Int8Shape(16), Int8Shape(512)]
CUDA_SHAPES = [Int8Shape(1), Int8Shape(16), Int8Shape(4096)]
TINY_SHAPES = [Int8Shape(4, 64, 48, r=4)]

# the peer libraries (imported quietly by the CLI before its header)
PEER_LIBRARIES: tuple[str, ...] = ("bitsandbytes", "peft")


def build(shape: Int8Shape, dtype: torch.dtype, device: torch.device) -> Case:
    factory = {"dtype": dtype, "device": device}
    base = nn.Linear(shape.d_in, shape.d_out, **factory).requires_grad_(False)
    alpha = 2 * shape.r
    fused = Int8LoRALinear.from_linear(base, shape.r, alpha, shape.dropout).train()
    nn.init.normal_(fused.lora_B.weight, std=0.02)  # a trained adapter, not the zero init
    a, b = fused.lora_A.weight, fused.lora_B.weight

    def unfused(x):
        return reference.lora_linear(x, base.weight, base.bias, a, b, fused.scaling,
                                     shape.dropout, True)

    providers = {"fastpeft": fused, "reference": unfused, "base": base}
    # frozen weights and buffers are not activations: keep them out of the saved bytes
    params = [base.weight, base.bias, a, b, fused.qweight, fused.weight_scale, fused.bias]
    weight_bytes = {
        "fastpeft": fused.qweight.nbytes + fused.weight_scale.nbytes,
        "reference": base.weight.nbytes,
        "base": base.weight.nbytes,
    }
    peer = bnb_int8_lora_linear(base, shape.r, alpha, shape.dropout)
    missing = "bnb+peft (bitsandbytes or peft not installed)" if peer is None else None
    if peer is not None:
        peer.train()
        with torch.no_grad():
            peer.lora_A["default"].weight.copy_(a)
            peer.lora_B["default"].weight.copy_(b)
        providers["bnb+peft"] = peer
        params += [peer.lora_A["default"].weight, peer.lora_B["default"].weight]
        w8 = peer.base_layer.weight
        weight_bytes["bnb+peft"] = w8.nbytes + w8.SCB.nbytes

    def make_inputs():
        return (torch.randn(shape.tokens, shape.d_in, **factory, requires_grad=True),)

    return Case(providers, make_inputs, floor="base", peer="bnb+peft", missing_peer=missing,
                params=params, weight_bytes=weight_bytes)
