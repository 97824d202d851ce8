"""The layers people use today, built through their public APIs; a missing library
yields ``None`` so its column is skipped rather than the run failing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def peft_lora_linear(base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float,
                     use_rslora: bool = False) -> nn.Module | None:
    """Hugging Face PEFT's LoRA ``Linear`` around ``base`` (shared, frozen), or None."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    holder = nn.Module()
    holder.proj = base
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=["proj"], use_rslora=use_rslora)
    return get_peft_model(holder, config).base_model.model.proj


def bnb_int8_lora_linear(base: nn.Linear, r: int, lora_alpha: float,
                         lora_dropout: float) -> nn.Module | None:
    """bitsandbytes' ``Linear8bitLt`` (int8 weight, ``has_fp16_weights=False``) holding
    ``base``'s weights, with PEFT's LoRA on top; None without bitsandbytes or PEFT."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=base.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(base.state_dict())
    layer = layer.to(base.weight.device)  # quantises the weight
    holder = nn.Module()
    holder.proj = layer
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=["proj"])
    return get_peft_model(holder, config).base_model.model.proj


def peft_style_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                                gate: torch.Tensor) -> torch.Tensor:
    """LLaMA-Adapter attention computed as PEFT's ``AdaptedAttention`` does it (PEFT's
    adapter only runs inside a whole LLaMA attention layer, so its steps are replayed):
    the model's own causal attention (SDPA), then the prompt attention in two matmuls
    with the softmax taken in fp32, the gate multiplying the probabilities, and the sum.

    q: (B, H, M, D); k, v: (B, Hkv, N, D); prefix_k, prefix_v: (1, Hkv, P, D); gate: (H,)
    or (1,). Key/value heads are repeated for grouped queries, as PEFT does.
    """
    group = q.shape[1] // k.shape[1]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t if group == 1 else t.repeat_interleave(group, dim=1)

    seq = F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)
    scores = q @ expand(prefix_k).transpose(2, 3) / math.sqrt(q.shape[-1])  # (B, H, M, P)
    probs = gate.view(1, -1, 1, 1) * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return seq + probs @ expand(prefix_v)
