"""Benchmark case: gated prefix attention — fastpeft vs the unfused reference vs the
PEFT-style computation (the model's causal SDPA, then the prompt attention in matmuls with
an fp32 softmax and the gate, as PEFT's adaption prompt adds it) vs one causal SDPA alone
(the floor: attention without the adapter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.gated_prefix_attention import gated_prefix_attention
from .peers import peft_style_prompt_attention
from .runner import Case


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    prompt: int = 10

    def __str__(self) -> str:
        return (f"B={self.batch} H={self.heads} Hkv={self.kv_heads} M=N={self.seq} "
                f"D={self.head_dim} P={self.prompt}")

    @property
    def size(self) -> int:
        """Elements of q."""
        return self.batch * self.heads * self.seq * self.head_dim


CPU_SHAPES = [AttentionShape(1, 16, 16, 1024, 64), AttentionShape(1, 8, 8, 512, 64)]
CUDA_SHAPES = [AttentionShape(4, 32, 32, 2048, 128), AttentionShape(4, 32, 8, 4096, 128)]
TINY_SHAPES = [AttentionShape(1, 4, 2, 16, 16, prompt=4)]

# no peer library: the PEFT-style peer replays its steps in torch
PEER_LIBRARIES: tuple[str, ...] = ()


def build(shape: AttentionShape, dtype: torch.dtype, device: torch.device) -> Case:
    factory = {"dtype": dtype, "device": device}
    group = shape.heads // shape.kv_heads
    # the adapter trains: every provider computes the prompt's and the gate's gradients
    gate = torch.full((shape.heads,), 0.1, **factory, requires_grad=True)
    prefix_k = torch.randn(1, shape.kv_heads, shape.prompt, shape.head_dim, **factory,
                           requires_grad=True)
    prefix_v = torch.randn_like(prefix_k, requires_grad=True)

    def fused(q, k, v):
        return gated_prefix_attention(q, k, v, prefix_k, prefix_v, gate)

    def unfused(q, k, v):
        return reference.gated_prefix_attention(q, k, v, prefix_k, prefix_v, gate)

    def expand(t):  # SDPA's enable_gqa needs torch >= 2.5 and not every backend takes it
        return t if group == 1 else t.repeat_interleave(group, dim=1)

    def peft_style(q, k, v):
        return peft_style_prompt_attention(q, k, v, prefix_k, prefix_v, gate)

    def sdpa_causal(q, k, v):
        return F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)

    def make_inputs():
        b, s, d = shape.batch, shape.seq, shape.head_dim
        q = torch.randn(b, shape.heads, s, d, **factory, requires_grad=True)
        k = torch.randn(b, shape.kv_heads, s, d, **factory, requires_grad=True)
        v = torch.randn(b, shape.kv_heads, s, d, **factory, requires_grad=True)
        return q, k, v

    providers = {"fastpeft": fused, "reference": unfused, "peft_style": peft_style,
                 "sdpa_causal": sdpa_causal}
    return Case(providers, make_inputs, floor="sdpa_causal", peer="peft_style",
                params=[gate, prefix_k, prefix_v])
