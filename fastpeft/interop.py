"""Hugging Face PEFT models: :func:`from_peft` converts a PEFT model's LoRA layers (and
LLaMA-Adapter attention) to fastpeft's fused ones in place, and ``patch_peft`` uses the
same conversions for the layers PEFT creates. Saving and loading adapters in PEFT's format
is in :mod:`fastpeft.adapter_files`, merging in :mod:`fastpeft.merge`.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .nn.adapted_attention import AdaptedAttention
from .nn.peft_lora import all_plain_lora, fuse_lora_model, fuse_peft_lora

__all__ = ["from_peft"]


# --- from_peft --------------------------------------------------------------------------

def from_peft(peft_model: nn.Module) -> nn.Module:
    """Converts a PEFT model in place to fastpeft's fused kernels and returns it.

    PEFT's LoRA layers on ``nn.Linear`` and on bitsandbytes ``Linear8bitLt`` and NF4
    ``Linear4bit`` (QLoRA) keep their identity, parameters, adapters and state-dict keys,
    and get fastpeft's fused forward (``fastpeft.lora_linear`` /
    ``fastpeft.int8_lora_linear`` / ``fastpeft.nf4_lora_linear``, which reads
    bitsandbytes' NF4 codes in place: the layer's class becomes a
    subclass of its PEFT class, see :class:`fastpeft.nn.peft_lora.FusedPeftLora`), so
    everything PEFT does with them keeps working: ``save_pretrained`` (HF Trainer
    checkpoints), ``load_adapter``, ``merge_and_unload``, disabling or switching adapters
    (PEFT's own forward runs where the fused one does not apply); LoRA layers PEFT makes
    later in it (``add_adapter``, ``load_adapter`` of a new adapter) are fused as well.
    PEFT's adaption-prompt
    attentions become :class:`fastpeft.nn.AdaptedAttention`, which holds the same
    ``adaption_prompt`` / ``adaption_gate`` under the same keys: those of every adapter,
    the ones PEFT keeps aside while another is active included.

    An optimizer built before the conversion keeps working (the parameters are the very
    same objects), and outputs and gradients are unchanged up to floating-point rounding
    (for bitsandbytes int8 layers: up to the difference between bitsandbytes' int8 matmul
    and fastpeft's weight-only dequantisation; NF4 layers dequantise as bitsandbytes does).
    LoRA layers the fused kernels do not cover (DoRA, LoRA biases, PEFT's other LoRA
    variants such as aLoRA, embeddings, convolutions, MoE expert parameters, FP4 bases) keep
    PEFT's forward, with one warning.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - exercised without peft
        raise ImportError("from_peft needs peft (pip install fastpeft[hf])") from err
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model: expected a PEFT model (an nn.Module), got "
                        f"{type(peft_model).__name__}")
    peft_adapted = peft_adapted_attention_classes()
    skipped = []
    found = False  # a layer of a method fastpeft fuses (LoRA, adaption prompt)
    configs = getattr(peft_model, "peft_config", {})
    for name, module in list(peft_model.named_modules()):
        found = found or isinstance(module, (LoraLayer, peft_adapted, AdaptedAttention))
        if isinstance(module, LoraLayer):
            if not fuse_lora_layer(module, configs):
                skipped.append(name)
        elif isinstance(module, peft_adapted):
            # in the wrapped attention's mode, not in that of PEFT's wrapper (see below)
            peft_model.set_submodule(name, convert_adapted_attention(name, module))
    base_model = getattr(peft_model, "base_model", None)
    if isinstance(base_model, nn.Module):
        fuse_lora_model(base_model)  # mixed-adapter batches in training too
        # adaption prompts of the adapters not active: PEFT keeps their attentions outside
        # the model, to put them in place on set_adapter
        cached = getattr(base_model, "_cached_adapters", None)
        for adapter, layers in (cached.items() if isinstance(cached, dict) else ()):
            if isinstance(layers, list):
                found = True
                cached[adapter] = [
                    convert_adapted_attention(f"{adapter!r}'s attention {i}", layer)
                    if isinstance(layer, peft_adapted) else layer
                    for i, layer in enumerate(layers)]
    if skipped:
        warnings.warn(f"from_peft: {len(skipped)} PEFT LoRA layers keep PEFT's forward "
                      f"(a layer type, or an adapter other than plain LoRA, not fused): "
                      f"{', '.join(skipped[:5])}" + (", ..." if len(skipped) > 5 else ""),
                      stacklevel=2)
    if not found:
        methods = sorted({str(getattr(getattr(c, "peft_type", None), "value", None))
                          for c in configs.values()}) if isinstance(configs, dict) else []
        warnings.warn(f"from_peft: {type(peft_model).__name__} has no PEFT LoRA layer or "
                      f"adaption-prompt attention (the methods fastpeft fuses"
                      + (f"; its adapters: {', '.join(methods)}" if methods else
                         "; a PEFT model is expected, from peft.get_peft_model")
                      + "): nothing was converted", stacklevel=2)
    return peft_model


def peft_adapted_attention_classes() -> tuple[type, ...]:
    """PEFT's adaption-prompt attention wrappers: the Llama-style one, and GPT-2's
    (PEFT >= 0.17)."""
    from peft.tuners.adaption_prompt import layer as peft_adaption

    return tuple(getattr(peft_adaption, n) for n in ("AdaptedAttention", "AdaptedAttentionGPT")
                 if hasattr(peft_adaption, n))


def fuse_lora_layer(layer: nn.Module, configs: dict[str, Any]) -> bool:
    """Gives one PEFT LoRA layer the fused forward (see :func:`from_peft`); False where it
    keeps PEFT's: a layer type the fused ops do not cover, or an adapter that is not plain
    LoRA (DoRA, a LoRA bias, another LoRA variant: :func:`~fastpeft.nn.peft_lora.plain_lora`).
    ``configs``: the PEFT model's ``peft_config`` (read for rsLoRA where PEFT < 0.16 does not
    keep it on the layer)."""
    rslora = getattr(layer, "use_rslora", None)
    if not isinstance(rslora, dict):  # PEFT < 0.16
        rslora = layer.use_rslora = {}
    for a, c in configs.items():
        if a in layer.lora_A and a not in rslora:
            rslora[a] = bool(getattr(c, "use_rslora", False))
    return all_plain_lora(layer) and fuse_peft_lora(layer)


def convert_adapted_attention(name: str, layer: nn.Module) -> nn.Module:
    """fastpeft's :class:`~fastpeft.nn.AdaptedAttention` holding PEFT's adaption-prompt
    ``layer``'s parameters (the very same objects), in the training mode of the attention it
    wraps (PEFT leaves its own wrapper in training mode whatever the model's, which would
    switch GPT-2's attention dropout on). ``name`` is the layer's, for errors."""
    training = layer.model.training
    adapted = _convert_adaption_prompt(name, layer)
    adapted.train(training)
    return adapted


def _convert_adaption_prompt(name: str, layer: nn.Module) -> nn.Module:
    attn = layer.model
    if getattr(getattr(attn, "o_proj", None), "bias", None) is not None:
        raise NotImplementedError(
            f"peft_model: {name}.o_proj has a bias, which PEFT's adaption prompt adds twice "
            f"(once per o_proj call) and the fused attention once")
    return AdaptedAttention(attn, gate="scalar", gate_tanh=False,
                            adaption_prompt=layer.adaption_prompt,
                            adaption_gate=layer.adaption_gate)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel``, else ``model``."""
    return model.base_model.model if is_peft_model(model) else model

