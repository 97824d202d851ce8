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
from .nn.lora import LoRALinear, is_conv1d
from .nn.peft_lora import FusedPeftLora, lora_parts
from .placement import adaption_prompt_sites, bottleneck_sites

__all__ = ["adapter_layers", "inject"]

AnyConfig = LoraConfig | AdaptionPromptConfig | BottleneckConfig

#: The name of the adapter attached to a block's sublayer by a ``BottleneckConfig``.
BOTTLENECK_CHILD = "bottleneck_adapter"
LORA_TYPES = (LoRALinear, Int8LoRALinear, FusedPeftLora)


def inject(model: nn.Module, config: AnyConfig) -> nn.Module:
    """Adds the adapters ``config`` describes to ``model`` in place and freezes the rest.

    - :class:`LoraConfig`: the matching linear layers (``nn.Linear``, GPT-2's ``Conv1D``)
      become :class:`fastpeft.LoRALinear` (sharing their weight) or, with
      ``base_dtype="int8"`` (and for bitsandbytes ``Linear8bitLt`` layers),
      :class:`fastpeft.Int8LoRALinear`. ``target_modules=None`` takes PEFT's default
      targets for the model type.
    - :class:`AdaptionPromptConfig`: the self-attention modules of the top
      ``adapter_layers`` blocks are wrapped in :class:`fastpeft.nn.AdaptedAttention`
      (Llama-style attention and GPT-2's; :mod:`fastpeft.placement`).
    - :class:`BottleneckConfig`: each block gets a :class:`fastpeft.BottleneckAdapter` on
      the output of the sublayers its placements name (where they are in each family:
      :mod:`fastpeft.placement`), as a child ``bottleneck_adapter`` of that sublayer
      applied by a forward hook (the base model's own state-dict keys do not change).

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
    target_modules = config.target_modules
    if target_modules is None:
        target_modules = default_target_modules(model)
    _refuse_moe_experts(model, target_modules)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    inside = set(adapted)
    output_layer = _output_layer(model)
    targets = [
        (name, module) for name, module in model.named_modules()
        if _is_linear(module) and name.rpartition(".")[0] not in inside
        and module is not output_layer and _matches(name, target_modules)
    ]
    if not targets:
        again = [n for n in adapted if _matches(n, target_modules)]
        if again:
            raise ValueError(f"target_modules: the layers {target_modules!r} matches carry a "
                             f"LoRA adapter already ({', '.join(again[:3])}"
                             f"{', ...' if len(again) > 3 else ''})")
        raise ValueError(f"target_modules: {target_modules!r} matches no linear layer "
                         f"(nn.Linear or Conv1D) of {type(model).__name__}")
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


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's default LoRA targets for the model's type (what ``target_modules=None``
    means in PEFT)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError as err:
        raise ValueError("target_modules: None means PEFT's default targets for the model "
                         "type, which needs peft installed; name the targets instead") from err
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        raise ValueError(f"target_modules: PEFT has no default targets for model type "
                         f"{model_type!r} ({type(model).__name__}); name them")
    return targets if isinstance(targets, str) else list(targets)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _refuse_moe_experts(model: nn.Module, target_modules: list[str] | str) -> None:
    """Mixture-of-experts layers whose experts are one 3-D parameter per projection (the
    layout of transformers 5) have no linear layer to wrap: fastpeft refuses to adapt
    them rather than skip them (PEFT adapts some through ``target_parameters``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        stacked = [p for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
        if stacked and (target_modules == "all-linear" or _matches(name, target_modules)):
            raise NotImplementedError(
                f"target_modules: {name} ({type(module).__name__}) holds its experts as 3-D "
                f"parameters ({', '.join(stacked)}), which fastpeft has no LoRA layer for; "
                f"name the linear layers to adapt (e.g. the attention projections), or "
                f"adapt the experts with PEFT and convert with fastpeft.from_peft, which "
                f"keeps PEFT's forward for them")


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
    attentions = adaption_prompt_sites(model)
    if not attentions:
        raise ValueError(f"model: found no decoder self-attention in {type(model).__name__} "
                         f"to give an adaption prompt (fastpeft.placement lists the layouts)")
    if len(attentions) < config.adapter_layers:
        raise ValueError(f"adapter_layers: {config.adapter_layers} layers asked for, "
                         f"{type(model).__name__} has {len(attentions)}")
    for name in attentions[len(attentions) - config.adapter_layers:]:
        attn = model.get_submodule(name)
        if hasattr(attn, BOTTLENECK_CHILD):  # its hook would never run inside the wrapper
            raise ValueError(f"config: {name} has a bottleneck adapter already; inject the "
                             f"AdaptionPromptConfig before the BottleneckConfig")
        try:
            adapted = AdaptedAttention(attn, config.adapter_len, gate=config.gate,
                                       gate_tanh=config.gate_tanh, dtype=_model_dtype(model))
        except (TypeError, NotImplementedError) as err:
            raise type(err)(f"{name} ({type(model).__name__}): {err}") from err
        replace(model, name, adapted)


# --- bottleneck adapters ----------------------------------------------------------------

def _inject_bottleneck(model: nn.Module, config: BottleneckConfig) -> None:
    sites = [(placement, name) for placement in config.placements
             for name in bottleneck_sites(model, placement)]
    if not sites:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"model: found no {' or '.join(config.placements)} sublayers in "
                         f"{type(model).__name__} (model type {model_type!r}) to place "
                         f"bottleneck adapters on; fastpeft.placement.BOTTLENECK_SITES lists "
                         f"the known layouts")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError("model: its config has no hidden_size to size the adapters from")
    bottleneck = config.size_for(hidden)
    dtype = _model_dtype(model)
    for placement, name in sites:
        sublayer = model.get_submodule(name)
        if hasattr(sublayer, BOTTLENECK_CHILD):
            raise ValueError(f"config: {name} (the {placement} of a block) has a bottleneck "
                             f"adapter already")
        param = next(sublayer.parameters())
        adapter = BottleneckAdapter(
            hidden, bottleneck, config.activation, config.layer_norm, config.scaling,
            device=param.device, dtype=dtype)
        adapter.placement = placement
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
