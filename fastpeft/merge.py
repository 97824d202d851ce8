"""Merging LoRA into the base weights: :func:`merge_and_unload`."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from .inject import adapter_layers
from .interop import inner_model, is_peft_model
from .nn.int8_lora_linear import Int8LoRALinear, is_bnb
from .nn.lora_linear import LoRALinear
from .nn.multi_lora_linear import MultiLoRALinear
from .nn.nf4_lora_linear import NF4LoRALinear
from .nn.peft_lora import is_param_wrapper
from .targets import is_lora_layer, model_embeddings

__all__ = ["merge_and_unload"]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds every LoRA layer into its base weight and puts plain layers back: a
    :class:`fastpeft.LoRALinear` becomes its (merged) ``nn.Linear``, an
    :class:`fastpeft.Int8LoRALinear` or :class:`fastpeft.NF4LoRALinear` a float
    ``nn.Linear`` holding the dequantised weight plus the LoRA product (their ``merge``
    re-quantises into int8 / NF4 instead), a PEFT layer
    converted by :func:`from_peft` its base layer after PEFT's own merge (a PEFT model
    is merged and unwrapped by its own ``merge_and_unload``: its ``modules_to_save`` and
    the layers left to PEFT's forward too), PEFT's
    ``ParamWrapper`` (LoRA on MoE experts / routers, nested ones included) the module it
    wraps after PEFT's merge into the parameters. Returns the model without PEFT's
    wrapper, like PEFT's ``merge_and_unload``.

    Adaption prompts and bottleneck adapters cannot be folded into weights: a model with
    them is refused before anything changes.
    """
    layers = list(adapter_layers(model))
    multi = [n for n, layer in layers if isinstance(layer, MultiLoRALinear)]
    if multi:
        raise ValueError(f"model: {', '.join(multi[:3])} hold several adapters "
                         f"(MultiLoRALinear), which one base weight cannot take in all")
    unmergeable = [n for n, layer in layers if not is_lora_layer(layer)]
    if unmergeable:
        raise ValueError(f"model: {', '.join(unmergeable[:3])} cannot be merged into the "
                         f"base weights (only LoRA can)")
    if is_peft_model(model):
        # PEFT's layers (from_peft keeps them PEFT's): PEFT's merge, which also unwraps its
        # modules_to_save and the layers from_peft left to PEFT (embeddings, DoRA, ...)
        return model.merge_and_unload()
    _untie_output_layer(model, layers)
    unwrapped: list[str] = []
    for name, layer in layers:
        if any(name.startswith(outer + ".") for outer in unwrapped):
            continue  # inside a nested ParamWrapper merged with its outer one
        if is_param_wrapper(layer):  # PEFT's merge, into each wrapped parameter
            plain = layer
            while is_param_wrapper(plain):
                plain.merge()
                plain = plain.base_layer
            unwrapped.append(name)
        elif isinstance(layer, LoRALinear):
            if not layer.merged:
                layer.merge()
            plain = layer.base_layer
        elif isinstance(layer, (Int8LoRALinear, NF4LoRALinear)):
            plain = layer.to_linear(merge_lora=True)
        else:  # PEFT's layer: PEFT's merge (re-quantising a bitsandbytes base)
            layer.merge()
            plain = layer.get_base_layer()
        model.set_submodule(name, plain)
    dequantised = [n for n, layer in layers if isinstance(layer, (Int8LoRALinear, NF4LoRALinear))]
    if dequantised:
        _after_dequantising(model, dequantised)
    return inner_model(model)


def _after_dequantising(model: nn.Module, names: list[str]) -> None:
    """merge_and_unload made the int8 / NF4 layers ``names`` float ``nn.Linear``: a model
    transformers loaded quantised (bitsandbytes) that has no quantised layer left is a float
    model now, and loses the quantisation config (else ``save_pretrained`` would write float
    weights under it, which ``from_pretrained`` cannot read); one that keeps some is warned
    about that."""
    if getattr(model, "hf_quantizer", None) is None \
            and getattr(getattr(model, "config", None), "quantization_config", None) is None:
        return
    left = [n for n, m in model.named_modules() if is_bnb(m) and not list(m.children())]
    if left:
        warnings.warn(
            f"merge_and_unload: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} are "
            f"float nn.Linear now, next to {len(left)} layers bitsandbytes quantised "
            f"({left[0]}, ...): transformers' save_pretrained would write them under the "
            f"model's quantisation config, which from_pretrained cannot read; call "
            f"model.dequantize() first for a float model, or merge into a float base",
            stacklevel=3)
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:  # what transformers' own dequantize() removes
        for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"),
                            (model, "quantization_method")):
            if hasattr(owner, attr):
                delattr(owner, attr)
        model.is_quantized = False
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)


def _untie_output_layer(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Before merge_and_unload folds LoRA into an output layer (``lm_head``) whose weight
    is tied to the input embeddings, which the merge would change as well: the layer's
    weight becomes a copy of its own, and the model's config says
    ``tie_word_embeddings=False`` (so ``save_pretrained`` / ``from_pretrained`` keep them
    apart), with a warning. (PEFT merges into the shared weight, with a warning.)"""
    # a model without input or output embeddings (transformers' dual encoders, CLIPModel /
    # SiglipModel, implement neither) has nothing tied to untie
    shared = getattr(model_embeddings(model, "input"), "weight", None)
    output = model_embeddings(model, "output")
    name = next((n for n, layer in layers if layer is output), None)
    if name is None or not isinstance(shared, Tensor):
        return
    base = output.base_layer if isinstance(output, LoRALinear) else None
    copied = base is not None and base.weight is shared
    if copied:
        base.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    tied = [c for c in (config, text) if getattr(c, "tie_word_embeddings", False)]
    for c in tied:
        c.tie_word_embeddings = False
    if copied or tied:
        warnings.warn(f"merge_and_unload: {name} was tied to the input embeddings; its "
                      f"merged weight is its own now (the embeddings keep theirs), and "
                      f"the config says tie_word_embeddings=False", stacklevel=3)

