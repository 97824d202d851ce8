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
