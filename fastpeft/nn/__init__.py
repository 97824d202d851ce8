"""Drop-in modules that replace layers of an existing model."""

from .adaption_prompt import AdaptionPrompt
from .bottleneck import ADAPTER_PRESETS, AdapterPreset, BottleneckAdapter
from .lora import LoRALinear

__all__ = [
    "ADAPTER_PRESETS",
    "AdapterPreset",
    "AdaptionPrompt",
    "BottleneckAdapter",
    "LoRALinear",
]
