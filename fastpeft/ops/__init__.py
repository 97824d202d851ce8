"""Registered operators: schemas (``_library``), then one module per op that adds fake
and autograd implementations and the public function."""

from . import _library  # noqa: F401  (defines the schemas first)
from .bottleneck_adapter import bottleneck_adapter
from .gated_prefix_attention import gated_prefix_attention
from .int8_lora_linear import int8_lora_linear, quantize_int8
from .lora_linear import lora_linear

__all__ = [
    "bottleneck_adapter",
    "gated_prefix_attention",
    "int8_lora_linear",
    "lora_linear",
    "quantize_int8",
]
