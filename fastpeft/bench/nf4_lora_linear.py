"""Benchmark case: NF4 base + LoRA (QLoRA) — fastpeft vs the float LoRA reference (F.linear
on the float weight + LoRA) vs bitsandbytes ``Linear4bit`` + PEFT LoRA (the peer) vs the
frozen float ``nn.Linear`` (the floor), with fastpeft's int8 op on the same weight as a
further column (``int8``). Weight bytes are reported next to the timings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..nn import Int8LoRALinear
from ..ops.nf4_lora_linear import nf4_lora_linear, quantize_nf4
from .peers import bnb_nf4_lora_linear
from .runner import Case


@dataclass(frozen=True)
class Nf4Shape:
    tokens: int
    d_in: int = 4096
    d_out: int = 4096
    r: int = 16
    dropout: float = 0.1
    blocksize: int = 64

    def __str__(self) -> str:
        return f"T={self.tokens} in={self.d_in} out={self.d_out} r={self.r} p={self.dropout}"

    @property
    def size(self) -> int:
        """Elements of x."""
        return self.tokens * self.d_in


# issue 18's shapes: a decode step (T = 1), a small batch (T = 16: the Triton GEMV's last
# row count; the C++ decode forward runs up to 8 rows, tiles past them) and a training
# step (T = 512, 2048 x 2048, p = 0.1)
CPU_SHAPES = [Nf4Shape(1), Nf4Shape(16), Nf4Shape(512, 2048, 2048)]
CUDA_SHAPES = [Nf4Shape(1), Nf4Shape(16), Nf4Shape(4096)]
TINY_SHAPES = [Nf4Shape(4, 64, 48, r=4)]

# the peer libraries (imported quietly by the CLI before its header)
PEER_LIBRARIES: tuple[str, ...] = ("bitsandbytes", "peft")


def build(shape: Nf4Shape, dtype: torch.dtype, device: torch.device) -> Case:
    factory = {"dtype": dtype, "device": device}
    base = nn.Linear(shape.d_in, shape.d_out, **factory).requires_grad_(False)
    alpha = 2 * shape.r
    scaling = alpha / shape.r
    qweight, absmax = quantize_nf4(base.weight, shape.blocksize)
    a = torch.empty(shape.r, shape.d_in, **factory)
    nn.init.kaiming_uniform_(a, a=5**0.5)
    b = torch.randn(shape.d_out, shape.r, **factory) * 0.02  # a trained adapter, not zeros
    a.requires_grad_(True)
    b.requires_grad_(True)

    def fused(x):
        return nf4_lora_linear(x, qweight, absmax, base.bias, a, b, scaling, shape.dropout,
                               True, shape.blocksize)

    def unfused(x):
        return reference.lora_linear(x, base.weight, base.bias, a, b, scaling, shape.dropout,
                                     True)

    int8 = Int8LoRALinear.from_linear(base, shape.r, alpha, shape.dropout).train()
    with torch.no_grad():
        int8.lora_A.weight.copy_(a)
        int8.lora_B.weight.copy_(b)
    providers = {"fastpeft": fused, "reference": unfused, "base": base, "int8": int8}
    # frozen weights and buffers are not activations: keep them out of the saved bytes
    params = [base.weight, base.bias, a, b, qweight, absmax, int8.qweight, int8.weight_scale,
              int8.lora_A.weight, int8.lora_B.weight]
    weight_bytes = {
        "fastpeft": qweight.nbytes + absmax.nbytes,
        "reference": base.weight.nbytes,
        "base": base.weight.nbytes,
        "int8": int8.qweight.nbytes + int8.weight_scale.nbytes,
    }
    peer = bnb_nf4_lora_linear(base, shape.r, alpha, shape.dropout)
    missing = "bnb+peft (bitsandbytes or peft not installed)" if peer is None else None
    if peer is not None:
        peer.train()
        with torch.no_grad():
            peer.lora_A["default"].weight.copy_(a)
            peer.lora_B["default"].weight.copy_(b)
        providers["bnb+peft"] = peer
        params += [peer.lora_A["default"].weight, peer.lora_B["default"].weight,
                   peer.base_layer.weight]
        w4 = peer.base_layer.weight
        state = w4.quant_state
        weight_bytes["bnb+peft"] = w4.nbytes + state.absmax.nbytes + (
            state.state2.absmax.nbytes if state.nested else 0)

    def make_inputs():
        return (torch.randn(shape.tokens, shape.d_in, **factory, requires_grad=True),)

    return Case(providers, make_inputs, floor="base", peer="bnb+peft", missing_peer=missing,
                params=params, weight_bytes=weight_bytes)
