"""fastpeft: fused CPU (C++) and GPU (Triton) kernels for parameter-efficient fine-tuning.

Importing registers the ``torch.ops.fastpeft`` operators and loads the compiled CPU
kernels when they were built (a single ``RuntimeWarning`` says so when they were not);
it changes no other global state.
"""

from ._backend import available_backends, use_backend
from .adapter_files import load_adapter, save_adapter
from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig
from .inject import inject
from .interop import from_peft
from .merge import merge_and_unload
from .nn import (
    ADAPTER_PRESETS,
    AdapterPreset,
    AdaptionPrompt,
    BottleneckAdapter,
    Int8LoRALinear,
    LoRALinear,
    MultiLoRALinear,
    NF4LoRALinear,
)
from .nn.multi_lora_linear import set_adapter_names
from .ops import (
    bottleneck_adapter,
    dequantize_nf4,
    gated_prefix_attention,
    int8_lora_linear,
    lora_linear,
    multi_lora_linear,
    nf4_lora_linear,
    quantize_int8,
    quantize_nf4,
)
from .patch import patch_peft, unpatch_peft

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_PRESETS",
    "AdapterPreset",
    "AdaptionPrompt",
    "AdaptionPromptConfig",
    "BottleneckAdapter",
    "BottleneckConfig",
    "Int8LoRALinear",
    "LoRALinear",
    "LoraConfig",
    "MultiLoRALinear",
    "NF4LoRALinear",
    "__version__",
    "available_backends",
    "bottleneck_adapter",
    "dequantize_nf4",
    "from_peft",
    "gated_prefix_attention",
    "inject",
    "int8_lora_linear",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "multi_lora_linear",
    "nf4_lora_linear",
    "patch_peft",
    "quantize_int8",
    "quantize_nf4",
    "save_adapter",
    "set_adapter_names",
    "unpatch_peft",
    "use_backend",
]
