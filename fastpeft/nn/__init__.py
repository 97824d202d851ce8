"""Drop-in modules that replace layers of an existing model."""

from .adapted_attention import AdaptedAttention
from .adaption_prompt import AdaptionPrompt
from .bottleneck_adapter import ADAPTER_PRESETS, AdapterPreset, BottleneckAdapter
from .int8_lora_linear import Int8LoRALinear
from .lora_linear import LoRALinear
from .multi_lora_linear import MultiLoRALinear
from .nf4_lora_linear import NF4LoRALinear

__all__ = [
    "ADAPTER_PRESETS",
    "AdaptedAttention",
    "AdapterPreset",
    "AdaptionPrompt",
    "BottleneckAdapter",
    "Int8LoRALinear",
    "LoRALinear",
    "MultiLoRALinear",
    "NF4LoRALinear",
]
