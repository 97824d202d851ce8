"""``fastpeft.inject``: put fused adapter layers into an existing model, in place."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig
from .nn.adapted_attention import AdaptedAttention, compute_dtype
from .nn.bottleneck import BottleneckAdapter
from .nn.int8_lora import Int8LoRALinear
from .nn.lora import LoRALinear
from .nn.peft_lora import FusedPeftLora, lora_parts

__all__ = ["adapter_layers", "inject"]

AnyConfig = LoraConfig | AdaptionPromptConfig | BottleneckConfig

#: The name of the adapter attached to a block's sublayer by a ``BottleneckConfig``.
BOTTLENECK_CHILD = "bottleneck_adapter"
LORA_TYPES = (LoRALinear, Int8LoRALinear, FusedPeftLora)


def inject(model: nn.Module, config: AnyConfig) -> nn.Module:
    """Adds the adapters ``config`` describes to ``model`` in place and freezes the rest.

    - :class:`LoraConfig`: the matching ``nn.Linear`` layers become
      :class:`fastpeft.LoRALinear` (sharing their weight) or, with ``base_dtype="int8"``
      (and for bitsandbytes ``Linear8bitLt`` layers), :class:`fastpeft.Int8LoRALinear`.
    - :class:`AdaptionPromptConfig`: the ``self_attn`` modules of the top
      ``adapter_layers`` blocks are wrapped in :class:`fastpeft.nn.AdaptedAttention`.
    - :class:`BottleneckConfig`: each block (a module with ``self_attn`` and ``mlp``
      children) gets a :class:`fastpeft.BottleneckAdapter` on the output of the sublayers
      its placements name, as a child ``bottleneck_adapter`` of that sublayer applied by
      a forward hook (the base model's own state-dict keys do not change).

    New layers take the training mode of the layers they replace, and the dtype of the
    model's input embeddings (else of its first floating parameter) where they own new
    parameters that no base layer decides. Afterwards exactly the adapters' parameters (of
    this and earlier injections) require grad. Returns ``model``.
    """
    if isinstance(config, LoraConfig):
        _inject_lora(model, config)
    elif isinstance(config, AdaptionPromptConfig):
        _inject_adaption_prompt(model, config)
    elif isinstance(config, BottleneckConfig):
        _inject_bottleneck(model, config)
    else:
        raise TypeError(f"config: expected a LoraConfig, AdaptionPromptConfig or "
                        f"BottleneckConfig, got {type(config).__name__}")
    trainable = {id(p) for _, layer in adapter_layers(model) for p in _adapter_params(layer)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every fastpeft adapter layer in ``model``: LoRA
    layers (PEFT's converted by :func:`fastpeft.from_peft` included), adapted attentions
    and bottleneck adapters, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (*LORA_TYPES, AdaptedAttention, BottleneckAdapter)):
            yield name, module


def _adapter_params(layer: nn.Module) -> Iterator[Tensor]:
    if isinstance(layer, LORA_TYPES):
        parts = lora_parts(layer)
        yield from (parts.lora_A, parts.lora_B)
    elif isinstance(layer, AdaptedAttention):
        yield from (layer.adaption_prompt, layer.adaption_gate)
    else:
        yield from layer.parameters()


# --- LoRA -------------------------------------------------------------------------------

def _inject_lora(model: nn.Module, config: LoraConfig) -> None:
    inside = {n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}
    output_layer = _output_layer(model)
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[0] not in inside
        and module is not output_layer and _matches(name, config.target_modules)
    ]
    if not targets:
        raise ValueError(f"target_modules: {config.target_modules!r} matches no nn.Linear "
                         f"layer of {type(model).__name__}")
    for name, linear in targets:
        r, alpha = config.rank_and_alpha(name)
        args = (r, alpha, config.lora_dropout, config.use_rslora)
        if _is_bnb_int8(linear):
            layer = Int8LoRALinear.from_bnb(linear, *args, dtype=_model_dtype(model))
        elif type(linear).__module__.startswith("bitsandbytes"):
            raise NotImplementedError(
                f"target_modules: {name} is a bitsandbytes {type(linear).__name__}; fastpeft "
                f"takes float nn.Linear and int8 Linear8bitLt layers")
        elif config.base_dtype == "int8":
            layer = Int8LoRALinear.from_linear(linear, *args)
        else:
            layer = LoRALinear(linear, *args)
        replace(model, name, layer)


def replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Puts ``layer`` where ``name`` is, in the training mode of the layer it replaces."""
    layer.train(model.get_submodule(name).training)
    model.set_submodule(name, layer)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its input embeddings' (what the hidden states
    start in), else its first floating parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    return compute_dtype(model)


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _output_layer(model: nn.Module) -> nn.Module | None:
    """A transformers model's output layer (``lm_head``), which "all-linear" leaves out."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _is_bnb_int8(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and \
        type(module).__name__ == "Linear8bitLt"


# --- adaption prompt --------------------------------------------------------------------

def _inject_adaption_prompt(model: nn.Module, config: AdaptionPromptConfig) -> None:
    attentions = [n for n, _ in model.named_modules() if n.rpartition(".")[2] == "self_attn"]
    if len(attentions) < config.adapter_layers:
        raise ValueError(f"adapter_layers: {config.adapter_layers} layers asked for, "
                         f"{type(model).__name__} has {len(attentions)} self_attn modules")
    for name in attentions[len(attentions) - config.adapter_layers:]:
        attn = model.get_submodule(name)
        if hasattr(attn, BOTTLENECK_CHILD):  # its hook would never run inside the wrapper
            raise ValueError(f"config: {name} has a bottleneck adapter already; inject the "
                             f"AdaptionPromptConfig before the BottleneckConfig")
        replace(model, name, AdaptedAttention(
            attn, config.adapter_len, gate=config.gate, gate_tanh=config.gate_tanh,
            dtype=_model_dtype(model)))


# --- bottleneck adapters ----------------------------------------------------------------

_PLACEMENT_CHILD = {"attention": "self_attn", "feed_forward": "mlp"}


def _inject_bottleneck(model: nn.Module, config: BottleneckConfig) -> None:
    blocks = [m for m in model.modules()
              if isinstance(getattr(m, "self_attn", None), nn.Module)
              and isinstance(getattr(m, "mlp", None), nn.Module)]
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no transformer blocks "
                         f"(modules with self_attn and mlp children)")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError("model: its config has no hidden_size to size the adapters from")
    bottleneck = config.size_for(hidden)
    for block in blocks:
        for placement in config.placements:
            sublayer = getattr(block, _PLACEMENT_CHILD[placement])
            if hasattr(sublayer, BOTTLENECK_CHILD):
                raise ValueError(f"config: the {placement} of a block has a bottleneck "
                                 f"adapter already")
            param = next(sublayer.parameters())
            adapter = BottleneckAdapter(
                hidden, bottleneck, config.activation, config.layer_norm, config.scaling,
                device=param.device, dtype=_model_dtype(model))
            adapter.train(sublayer.training)
            sublayer.add_module(BOTTLENECK_CHILD, adapter)
            adapter.hook_handle = sublayer.register_forward_hook(_apply_output_adapter)


def _apply_output_adapter(module: nn.Module, args: tuple, output):
    """Forward hook: the sublayer's output (or the first element of an output tuple, as
    attention layers return) through its bottleneck adapter."""
    adapter = getattr(module, BOTTLENECK_CHILD)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)
