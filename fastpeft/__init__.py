"""fastpeft: fused CPU (C++) and GPU (Triton) kernels for parameter-efficient fine-tuning.

Importing registers the ``torch.ops.fastpeft`` operators and loads the compiled CPU
kernels when they were built (a single ``RuntimeWarning`` says so when they were not);
it changes no other global state.
"""

from . import _backend
from ._backend import use_backend
from .ops import (  # schemas, then _C, then the Python registrations
    _library,
    bottleneck_adapter,
    gated_prefix_attention,
    int8_lora_linear,
    lora_linear,
    quantize_int8,
)

_backend.index_kernels(list(_library.SCHEMAS))

from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig  # noqa: E402
from .inject import inject  # noqa: E402
from .interop import from_peft, load_adapter, merge_and_unload, save_adapter  # noqa: E402
from .nn import (  # noqa: E402
    ADAPTER_PRESETS,
    AdapterPreset,
    AdaptionPrompt,
    BottleneckAdapter,
    Int8LoRALinear,
    LoRALinear,
)

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
    "__version__",
    "bottleneck_adapter",
    "from_peft",
    "gated_prefix_attention",
    "inject",
    "int8_lora_linear",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "quantize_int8",
    "save_adapter",
    "use_backend",
]
