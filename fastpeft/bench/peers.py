"""The layers people use today, built through their public APIs; a missing library
yields ``None`` so its column is skipped rather than the run failing."""

from __future__ import annotations

import importlib.util

from torch import nn


def peft_lora_linear(base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float,
                     use_rslora: bool = False) -> nn.Module | None:
    """Hugging Face PEFT's LoRA ``Linear`` around ``base`` (shared, frozen), or None."""
    if importlib.util.find_spec("peft") is None:
        return None
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = base
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=["proj"], use_rslora=use_rslora)
    return get_peft_model(holder, config).base_model.model.proj


def bnb_int8_lora_linear(base: nn.Linear, r: int, lora_alpha: float,
                         lora_dropout: float) -> nn.Module | None:
    """bitsandbytes' ``Linear8bitLt`` (int8 weight, ``has_fp16_weights=False``) holding
    ``base``'s weights, with PEFT's LoRA on top; None without bitsandbytes or PEFT."""
    if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None:
        return None
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=base.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(base.state_dict())
    layer = layer.to(base.weight.device)  # quantises the weight
    holder = nn.Module()
    holder.proj = layer
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=["proj"])
    return get_peft_model(holder, config).base_model.model.proj
