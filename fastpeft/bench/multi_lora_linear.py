"""Benchmark case: many LoRA adapters on one base, one per row (``MultiLoRALinear``) — fastpeft
vs the per-adapter reference vs PEFT's mixed batch (``adapter_names``) vs a floor.

Two kinds of shape:

* serving: a few rows, each with its own adapter, no dropout, nothing requiring a gradient
  (the adapters are frozen, as a server holds them), so forward only. The floor is the
  frozen base ``nn.Linear`` on the same rows (the layer without any adapter).
* training: many rows across a few adapters (each sequence one adapter), dropout on. The
  floor is fastpeft's ``LoRALinear`` with a single adapter on the same rows: what the mixed
  batch costs over training one adapter at a time on the same rows.

PEFT refuses ``adapter_names`` in training mode at the model level; its layer still takes
them (its loop over sub-batches), which is what is timed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..nn import LoRALinear, MultiLoRALinear
from .peers import peft_lora_linear
from .runner import MODES, Case


@dataclass(frozen=True)
class MultiLoRAShape:
    tokens: int
    d_in: int
    d_out: int
    adapters: int
    r: int = 16
    dropout: float = 0.0
    sequences: int = 0  # 0: every row its own sample (serving); else rows per adapter grouped

    def __str__(self) -> str:
        kind = "serving" if self.training is False else f"training, {self.sequences} sequences"
        return (f"T={self.tokens} in={self.d_in} out={self.d_out} adapters={self.adapters} "
                f"r={self.r} p={self.dropout} ({kind})")

    @property
    def training(self) -> bool:
        return self.sequences > 0

    @property
    def size(self) -> int:
        """Elements of x."""
        return self.tokens * self.d_in


CPU_SHAPES = [
    MultiLoRAShape(16, 4096, 4096, 16),
    MultiLoRAShape(16, 1024, 1024, 16),
    MultiLoRAShape(512, 2048, 2048, 4, dropout=0.1, sequences=4),
]
CUDA_SHAPES = [
    MultiLoRAShape(64, 4096, 4096, 16),
    MultiLoRAShape(8192, 4096, 4096, 8, dropout=0.1, sequences=8),
]
TINY_SHAPES = [MultiLoRAShape(6, 64, 48, 3, r=4), MultiLoRAShape(8, 64, 48, 2, r=4, dropout=0.1,
                                                                  sequences=2)]

# the peer libraries (imported quietly by the CLI before its header)
PEER_LIBRARIES: tuple[str, ...] = ("peft",)


def _names(shape: MultiLoRAShape) -> list[str]:
    return [f"adapter{i}" for i in range(shape.adapters)]


def build(shape: MultiLoRAShape, dtype: torch.dtype, device: torch.device) -> Case:
    factory = {"dtype": dtype, "device": device}
    base = nn.Linear(shape.d_in, shape.d_out, **factory).requires_grad_(False)
    names = _names(shape)
    fused = MultiLoRALinear(base)
    for name in names:
        fused.add_adapter(name, shape.r, 2 * shape.r, shape.dropout)
        nn.init.normal_(fused.lora_B[name].weight, std=0.02)  # trained adapters, not zero
    fused.train(shape.training)
    if not shape.training:
        fused.requires_grad_(False)
    if shape.training:  # sequences of equal length, adapters in turn
        samples = shape.sequences
        per_sample = [names[i % shape.adapters] for i in range(samples)]
    else:  # every row its own sample, adapters in turn
        samples = shape.tokens
        per_sample = [names[i % shape.adapters] for i in range(samples)]
    rows_per_sample = shape.tokens // samples
    ids = fused.ids_of(per_sample, torch.empty(samples, rows_per_sample, 1, device=device))
    ids = ids.reshape(-1)
    weights_a = [fused.lora_A[n].weight for n in names]
    weights_b = [fused.lora_B[n].weight for n in names]
    scaling = torch.tensor([fused.scaling[n] for n in names], device=device)

    def fastpeft_call(x):
        return fused(x, adapter_ids=ids)

    if shape.training:  # adapters that train: stacked on every call, as fastpeft does
        def stacks():
            return torch.stack(weights_a), torch.stack(weights_b)
    else:  # serving: stacked once, as fastpeft keeps its stack between calls
        stacked = torch.stack(weights_a), torch.stack(weights_b)

        def stacks():
            return stacked

    def unfused(x):
        lora_A, lora_B = stacks()
        return reference.multi_lora_linear(x, base.weight, base.bias, lora_A, lora_B, scaling,
                                           ids, shape.dropout, shape.training)

    providers = {"fastpeft": fastpeft_call, "reference": unfused}
    params = [base.weight, base.bias, *weights_a, *weights_b]
    if shape.training:
        single = LoRALinear(base, shape.r, 2 * shape.r, shape.dropout).train()
        single.lora_A.weight.data.copy_(weights_a[0])
        single.lora_B.weight.data.copy_(weights_b[0])
        providers["lora_linear"] = single
        floor = "lora_linear"
        params += [single.lora_A.weight, single.lora_B.weight]
    else:
        providers["base"] = base
        floor = "base"
    peer = peft_lora_linear(base, shape.r, 2 * shape.r, shape.dropout, names=tuple(names))
    missing = "peft (not installed)" if peer is None else None
    if peer is not None:
        peer.train(shape.training)
        if not shape.training:
            peer.requires_grad_(False)
        with torch.no_grad():
            for name, a, b in zip(names, weights_a, weights_b, strict=True):
                peer.lora_A[name].weight.copy_(a)
                peer.lora_B[name].weight.copy_(b)
        per_row = [names[i] if i >= 0 else "__base__" for i in ids.tolist()]

        def peft_call(x):
            return peer(x, adapter_names=per_row)

        providers["peft"] = peft_call
        params += [p for n, p in peer.named_parameters() if "lora_" in n]

    def make_inputs():
        return (torch.randn(shape.tokens, shape.d_in, **factory,
                            requires_grad=shape.training),)

    return Case(providers, make_inputs, floor=floor, peer="peft", missing_peer=missing,
                params=params, modes=MODES if shape.training else ("forward",))
