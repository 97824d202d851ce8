"""Hugging Face PEFT interop: convert PEFT models, save and load adapters in PEFT's format,
merge LoRA into the base weights.

PEFT's on-disk format is a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are the adapter tensors' qualified names under
``base_model.model.`` (PEFT's wrapper prefix) without the adapter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. fastpeft's layers
use PEFT's attribute names, so a model converted with :func:`from_peft` (still inside its
``PeftModel``) or injected with :func:`fastpeft.inject` (plain) maps onto those keys
directly.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig
from .inject import BOTTLENECK_CHILD, LORA_TYPES, adapter_layers, inject
from .nn.adapted_attention import AdaptedAttention
from .nn.int8_lora import Int8LoRALinear
from .nn.lora import LoRALinear

__all__ = ["from_peft", "load_adapter", "merge_and_unload", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BOTTLENECK_TYPE = "FASTPEFT_BOTTLENECK"


# --- from_peft --------------------------------------------------------------------------

def from_peft(peft_model: nn.Module) -> nn.Module:
    """Converts a PEFT model in place to fastpeft's fused layers and returns it.

    PEFT LoRA layers on ``nn.Linear`` become :class:`fastpeft.LoRALinear`, those on
    bitsandbytes ``Linear8bitLt`` :class:`fastpeft.Int8LoRALinear`, and PEFT's adaption
    prompt attentions :class:`fastpeft.nn.AdaptedAttention`. The new layers adopt the very
    same ``Parameter`` objects (an optimizer built before the conversion keeps working)
    and the same scaling and dropout, so outputs and gradients are unchanged up to
    floating-point rounding (for bitsandbytes layers: up to the difference between
    bitsandbytes' int8 matmul and fastpeft's weight-only dequantisation).

    Refused, naming the layer: DoRA, LoRA biases, merged or disabled adapters, more than
    one active adapter. LoRA on other layer types (embeddings, convolutions, GPT-2's
    Conv1D) is left to PEFT, with one warning.
    """
    try:
        from peft.tuners.adaption_prompt.layer import AdaptedAttention as PeftAdapted
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - exercised without peft
        raise ImportError("from_peft needs peft (pip install fastpeft[hf])") from err
    skipped = []
    for name, module in list(peft_model.named_modules()):
        if isinstance(module, LoraLayer):
            new = _convert_lora(name, module)
            if new is None:
                skipped.append(name)
                continue
        elif isinstance(module, PeftAdapted):
            new = _convert_adaption_prompt(name, module)
        else:
            continue
        peft_model.set_submodule(name, new)
    if skipped:
        warnings.warn(f"from_peft: left {len(skipped)} PEFT LoRA layers on other layer "
                      f"types as they are: {', '.join(skipped[:5])}"
                      + (", ..." if len(skipped) > 5 else ""), stacklevel=2)
    return peft_model


def _convert_lora(name: str, layer: nn.Module) -> nn.Module | None:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        raise ValueError(f"peft_model: {name} has {len(adapters)} active LoRA adapters "
                         f"{adapters}; activate exactly one (set_adapter) to convert")
    (a,) = adapters
    if layer.merged:
        raise ValueError(f"peft_model: {name} is merged; unmerge_adapter() first")
    if getattr(layer, "disable_adapters", False):
        raise ValueError(f"peft_model: {name} has its adapters disabled")
    if getattr(layer, "use_dora", {}).get(a, False):
        raise NotImplementedError(f"peft_model: {name} uses DoRA, which fastpeft lacks")
    if getattr(layer, "lora_bias", {}).get(a, False):
        raise NotImplementedError(f"peft_model: {name} has a LoRA bias, which fastpeft "
                                  f"lacks")
    base = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False) or not isinstance(base, nn.Linear):
        return None
    dropout = layer.lora_dropout[a]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    r, alpha, scaling = layer.r[a], layer.lora_alpha[a], layer.scaling[a]
    rslora = r > 1 and math.isclose(scaling, alpha / math.sqrt(r))
    pair = {"lora_A": layer.lora_A[a], "lora_B": layer.lora_B[a]}
    if type(base).__module__.startswith("bitsandbytes"):
        new = Int8LoRALinear.from_bnb(base, r, alpha, p, rslora,
                                      dtype=pair["lora_A"].weight.dtype, **pair)
    else:
        new = LoRALinear(base, r, alpha, p, rslora, **pair)
    new.scaling = float(scaling)  # PEFT's own value (set_scale, patterns) wins
    return new


def _convert_adaption_prompt(name: str, layer: nn.Module) -> nn.Module:
    attn = layer.model
    if getattr(attn.o_proj, "bias", None) is not None:
        raise NotImplementedError(
            f"peft_model: {name}.o_proj has a bias, which PEFT's adaption prompt adds twice "
            f"(once per o_proj call) and the fused attention once")
    return AdaptedAttention(attn, gate="scalar", gate_tanh=False,
                            adaption_prompt=layer.adaption_prompt,
                            adaption_gate=layer.adaption_gate)


# --- save / load ------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of ``model`` under PEFT's keys (see the module docstring)."""
    prefix = "" if _is_peft_model(model) else PEFT_PREFIX
    state = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, LORA_TYPES):
            tensors = {"lora_A.weight": layer.lora_A.weight,
                       "lora_B.weight": layer.lora_B.weight}
        elif isinstance(layer, AdaptedAttention):
            tensors = {"adaption_prompt": layer.adaption_prompt,
                       "adaption_gate": layer.adaption_gate}
        else:
            tensors = dict(layer.named_parameters())
        state.update({f"{prefix}{name}.{key}": t for key, t in tensors.items()})
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Writes ``model``'s adapters to ``directory`` in PEFT's format.

    LoRA and adaption-prompt adapters load into PEFT with ``PeftModel.from_pretrained``
    (an adaption prompt only with PEFT's convention: scalar gate, no tanh). Bottleneck
    adapters, which PEFT lacks, use the same layout with ``peft_type``
    ``"FASTPEFT_BOTTLENECK"``. A model with adapters of more than one method is refused:
    PEFT's format holds one method per directory.
    """
    from safetensors.torch import save_file

    config = _adapter_config(model)
    state = {k: t.detach().contiguous() for k, t in adapter_state_dict(model).items()}
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads adapters saved by :func:`save_adapter` or by PEFT's ``save_pretrained``
    (LoRA, adaption prompt) into ``model`` and returns it.

    A model without adapters of that method gets them first (:func:`fastpeft.inject`
    with the saved configuration); then every adapter tensor must be in the file and
    every tensor of the file must have a place, with the same shape.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        saved = json.load(f)
    config = _config_from_saved(saved)
    if _kind_of_config(config) not in {_kind(layer) for _, layer in adapter_layers(model)}:
        inject(model, config)
    weights = load_file(os.path.join(directory, WEIGHTS_NAME))
    kind = _kind_of_config(config)
    own = {k: t for k, t in adapter_state_dict(model).items() if _key_kind(k) == kind}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"directory: {directory} does not fit the model: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for key, target in own.items():
            source = weights[key]
            if source.shape != target.shape:
                raise ValueError(f"directory: {key} has shape {tuple(source.shape)}, the "
                                 f"model's is {tuple(target.shape)}")
            target.copy_(source)
    return model


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, LORA_TYPES):
        return "LORA"
    if isinstance(layer, AdaptedAttention):
        return "ADAPTION_PROMPT"
    return BOTTLENECK_TYPE


def _kind_of_config(config: Any) -> str:
    return {LoraConfig: "LORA", AdaptionPromptConfig: "ADAPTION_PROMPT",
            BottleneckConfig: BOTTLENECK_TYPE}[type(config)]


def _key_kind(key: str) -> str | None:
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        return "LORA"
    if key.endswith((".adaption_prompt", ".adaption_gate")):
        return "ADAPTION_PROMPT"
    if f".{BOTTLENECK_CHILD}." in key:
        return BOTTLENECK_TYPE
    return None


def _adapter_config(model: nn.Module) -> dict[str, Any]:
    layers = list(adapter_layers(model))
    kinds = {_kind(layer) for _, layer in layers}
    if not layers:
        raise ValueError("model: has no fastpeft adapters to save")
    if len(kinds) > 1:
        raise ValueError(f"model: has adapters of several methods ({sorted(kinds)}); "
                         f"PEFT's format holds one method per directory")
    base = _base_model(model)
    names = {id(m): n for n, m in base.named_modules()}
    common = {
        "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path",
                                           None) or None,
        "inference_mode": True,
        "revision": None,
        "task_type": "CAUSAL_LM" if type(base).__name__.endswith("ForCausalLM") else None,
    }
    (kind,) = kinds
    if kind == "LORA":
        return {**common, **_lora_config(layers, names)}
    if kind == "ADAPTION_PROMPT":
        first = layers[0][1]
        config = {**common, "peft_type": "ADAPTION_PROMPT", "adapter_len": first.adapter_len,
                  "adapter_layers": len(layers), "target_modules": "self_attn"}
        if first.adaption_gate.numel() > 1 or first.gate_tanh:  # not PEFT's convention
            config["fastpeft"] = {"gate": "per_head" if first.adaption_gate.numel() > 1
                                  else "scalar", "gate_tanh": first.gate_tanh}
        return config
    return {**common, "peft_type": BOTTLENECK_TYPE, "fastpeft": _bottleneck_config(layers)}


def _lora_config(layers: list[tuple[str, nn.Module]], names: dict[int, str]) -> dict:
    r = Counter(layer.r for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for _, layer in layers).most_common(1)[0][0]
    dropouts = {layer.lora_dropout for _, layer in layers}
    rslora = {layer.use_rslora for _, layer in layers}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError("model: its LoRA layers differ in lora_dropout or use_rslora, which "
                         "PEFT's config cannot express")
    full = {names[id(layer)]: layer for _, layer in layers}  # names in the base model
    int8 = {isinstance(layer, Int8LoRALinear) for layer in full.values()}
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(), "target_modules": sorted(full), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {n: layer.r for n, layer in full.items() if layer.r != r},
        "alpha_pattern": {n: layer.lora_alpha for n, layer in full.items()
                          if layer.lora_alpha != alpha},
    }
    if int8 == {True}:  # extra keys make PEFT warn: only when there is something to say
        config["fastpeft"] = {"base_dtype": "int8"}
    return config


def _bottleneck_config(layers: list[tuple[str, nn.Module]]) -> dict:
    first = layers[0][1]
    placements = sorted({name.split(".")[-2] for name, _ in layers})
    return {"placements": ["attention" if p == "self_attn" else "feed_forward"
                           for p in placements],
            "activation": first.activation, "layer_norm": first.ln_weight is not None,
            "bottleneck_size": first.bottleneck_size, "scaling": first.scaling}


def _config_from_saved(saved: dict[str, Any]):
    extra = saved.get("fastpeft") or {}
    kind = saved.get("peft_type")
    if kind == "LORA":
        for key in ("use_dora", "lora_bias"):
            if saved.get(key):
                raise NotImplementedError(f"directory: the adapter uses {key}, which "
                                          f"fastpeft lacks")
        return LoraConfig(
            r=saved["r"], lora_alpha=saved["lora_alpha"],
            lora_dropout=saved.get("lora_dropout", 0.0),
            target_modules=saved["target_modules"], use_rslora=saved.get("use_rslora", False),
            base_dtype=extra.get("base_dtype"), rank_pattern=saved.get("rank_pattern") or {},
            alpha_pattern=saved.get("alpha_pattern") or {})
    if kind == "ADAPTION_PROMPT":
        return AdaptionPromptConfig(
            adapter_len=saved["adapter_len"], adapter_layers=saved["adapter_layers"],
            gate=extra.get("gate", "scalar"), gate_tanh=extra.get("gate_tanh", False))
    if kind == BOTTLENECK_TYPE:
        return BottleneckConfig(
            placements=tuple(extra["placements"]), activation=extra["activation"],
            layer_norm=extra["layer_norm"], bottleneck_size=extra["bottleneck_size"],
            scaling=extra["scaling"])
    raise NotImplementedError(f"directory: peft_type {kind!r} is not one of fastpeft's "
                              f"methods (LORA, ADAPTION_PROMPT, {BOTTLENECK_TYPE})")


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel``, else ``model``."""
    return model.base_model.model if _is_peft_model(model) else model


# --- merge ------------------------------------------------------------------------------

def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds every LoRA layer into its base weight and puts plain layers back: a
    :class:`fastpeft.LoRALinear` becomes its (merged) ``nn.Linear``, an
    :class:`fastpeft.Int8LoRALinear` a float ``nn.Linear`` holding the dequantised weight
    plus the LoRA product (:meth:`Int8LoRALinear.merge` keeps int8 instead). Returns the
    model without PEFT's wrapper, like PEFT's ``merge_and_unload``.

    Adaption prompts and bottleneck adapters cannot be folded into weights: a model with
    them is refused before anything changes.
    """
    layers = list(adapter_layers(model))
    unmergeable = [n for n, layer in layers if not isinstance(layer, LORA_TYPES)]
    if unmergeable:
        raise ValueError(f"model: {', '.join(unmergeable[:3])} cannot be merged into the "
                         f"base weights (only LoRA can)")
    for name, layer in layers:
        if isinstance(layer, LoRALinear):
            if not layer.merged:
                layer.merge()
            plain = layer.base_layer
        else:
            plain = layer.to_linear(merge_lora=True)
        model.set_submodule(name, plain)
    return _base_model(model)
