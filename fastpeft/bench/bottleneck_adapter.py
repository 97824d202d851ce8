"""Benchmark case: bottleneck adapter — fastpeft vs the unfused composition
(``[nn.LayerNorm ->] nn.Linear -> act -> nn.Linear``, scaled, plus the residual) vs a
copy of x (the floor: an adapter has to read x and write y at least once)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..nn import BottleneckAdapter
from .runner import Case


@dataclass(frozen=True)
class BottleneckShape:
    tokens: int
    hidden: int
    bottleneck: int = 64
    activation: str = "relu"
    layer_norm: bool = False

    def __str__(self) -> str:
        ln = " +LN" if self.layer_norm else ""
        return f"T={self.tokens} d={self.hidden} m={self.bottleneck} {self.activation}{ln}"

    @property
    def size(self) -> int:
        """Elements of x."""
        return self.tokens * self.hidden


# (the last two: a decode step and a short sequence at a 7B width, m = d / 16)
CPU_SHAPES = [BottleneckShape(2048, 2048), BottleneckShape(2048, 2048, 64, "silu", True),
              BottleneckShape(1, 4096, 256), BottleneckShape(100, 4096, 256, "silu", True)]
CUDA_SHAPES = [BottleneckShape(16384, 4096), BottleneckShape(16384, 4096, 64, "silu", True)]
TINY_SHAPES = [BottleneckShape(16, 64, 8, "silu", True)]

# no peer library: PEFT has no bottleneck adapter
PEER_LIBRARIES: tuple[str, ...] = ()


def build(shape: BottleneckShape, dtype: torch.dtype, device: torch.device) -> Case:
    factory = {"dtype": dtype, "device": device}
    fused = BottleneckAdapter(shape.hidden, shape.bottleneck, shape.activation,
                              shape.layer_norm, scaling=0.5, **factory)
    nn.init.normal_(fused.up_weight, std=0.02)  # a trained adapter, not the zero init
    params = list(fused.parameters())

    def unfused(x):
        return reference.bottleneck_adapter(
            x, fused.down_weight, fused.down_bias, fused.up_weight, fused.up_bias,
            activation=shape.activation, scaling=fused.scaling, ln_weight=fused.ln_weight,
            ln_bias=fused.ln_bias,
        )

    providers = {"fastpeft": fused, "reference": unfused, "copy": torch.clone}

    def make_inputs():
        return (torch.randn(shape.tokens, shape.hidden, **factory, requires_grad=True),)

    return Case(providers, make_inputs, floor="copy", params=params)
