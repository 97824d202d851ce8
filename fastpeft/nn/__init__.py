"""Drop-in modules that replace layers of an existing model."""

from .adaption_prompt import AdaptionPrompt
from .lora import LoRALinear

__all__ = ["AdaptionPrompt", "LoRALinear"]
