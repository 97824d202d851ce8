"""The fused ops: one module per op declares it (schema, fake, autograd, Triton kernels;
see :mod:`._library`) and defines its public function. Importing this package boots the
``fastpeft`` operator namespace and loads the compiled CPU kernels."""

from .bottleneck_adapter import bottleneck_adapter
from .gated_prefix_attention import gated_prefix_attention
from .int8_lora_linear import int8_lora_linear, quantize_int8
from .lora_linear import lora_linear
from .multi_lora_linear import multi_lora_linear
from .nf4_lora_linear import dequantize_nf4, nf4_lora_linear, quantize_nf4

__all__ = [
    "bottleneck_adapter",
    "dequantize_nf4",
    "gated_prefix_attention",
    "int8_lora_linear",
    "lora_linear",
    "multi_lora_linear",
    "nf4_lora_linear",
    "quantize_int8",
    "quantize_nf4",
]
