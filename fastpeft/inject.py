"""``fastpeft.inject``: put fused adapter layers into an existing model, in place."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig
from .nn.adapted_attention import AdaptedAttention, compute_dtype
from .nn.bottleneck_adapter import BottleneckAdapter
from .nn.int8_lora_linear import Int8LoRALinear, is_bnb, is_bnb_int8
from .nn.lora_linear import LoRALinear, is_conv1d, linear_weight, own_forward
from .nn.multi_lora_linear import MultiLoRALinear, check_adapter_name
from .nn.nf4_lora_linear import NF4LoRALinear, bnb_nf4_problem, is_bnb_4bit
from .nn.peft_lora import FusedPeftLora, is_param_wrapper, lora_parts, param_wrapper_class
from .placement import adaption_prompt_sites, bottleneck_sites

__all__ = ["adapter_layers", "inject", "is_lora_layer"]

AnyConfig = LoraConfig | AdaptionPromptConfig | BottleneckConfig

#: The name of the adapter attached to a block's sublayer by a ``BottleneckConfig``.
BOTTLENECK_CHILD = "bottleneck_adapter"
LORA_TYPES = (LoRALinear, Int8LoRALinear, NF4LoRALinear, MultiLoRALinear, FusedPeftLora)


def inject(model: nn.Module, config: AnyConfig | Mapping[str, LoraConfig]) -> nn.Module:
    """Adds the adapters ``config`` describes to ``model`` in place and freezes the rest.

    - :class:`LoraConfig`: the matching linear layers (``nn.Linear``, GPT-2's ``Conv1D``)
      become :class:`fastpeft.LoRALinear` (sharing their weight) or, with
      ``base_dtype="int8"`` (and for bitsandbytes ``Linear8bitLt`` layers),
      :class:`fastpeft.Int8LoRALinear`, with ``base_dtype="nf4"`` (and for bitsandbytes
      NF4 ``Linear4bit`` layers, sharing their codes: QLoRA)
      :class:`fastpeft.NF4LoRALinear`. ``target_modules=None`` takes PEFT's default
      targets for the model type. Parameters (``target_parameters``, and what PEFT's
      ``"all-linear"`` adapts as parameters: on transformers 5, the 3-D experts and the
      router of Mixtral-style MoE layers) are wrapped with PEFT's own ``ParamWrapper``,
      nested and keyed as PEFT does, and run PEFT's unfused forward (float, also under
      ``base_dtype="int8"`` / ``"nf4"``); one warning per call names them, or the 3-D
      experts that PEFT's ``"all-linear"`` leaves out (Qwen2-MoE). Needs peft >= 0.17 for
      the parameters it adapts: an ``ImportError`` naming the module otherwise, before
      anything changes. Linear layers whose weight the model reads instead of calling them
      (``nn.MultiheadAttention``'s ``out_proj``, Mamba's ``dt_proj`` / ``x_proj`` /
      ``out_proj``), which a LoRA layer would bypass, are left out of ``"all-linear"``
      (with a note in that warning); named, they are adapted as PEFT adapts them, their
      LoRA inert (a note), but refused on an int8 / NF4 base (the model would read the
      codes) and where PEFT refuses them (a Mamba model's ``out_proj``).
    - A dict of adapter name -> :class:`LoraConfig`: several named adapters (PEFT's
      multi-adapter model), each with its own ``r``, ``lora_alpha``, targets, ...: every
      linear layer some config targets becomes a :class:`fastpeft.MultiLoRALinear` holding
      the adapters whose configs target it (layers that are ``MultiLoRALinear`` already get
      the new adapters added). :func:`fastpeft.set_adapter_names` then picks each
      sequence's adapter; :func:`fastpeft.save_adapter` writes PEFT's multi-adapter
      layout. Float ``nn.Linear`` / ``Conv1D`` layers only (no ``base_dtype``, no
      ``target_parameters``).
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(config, LoraConfig):
        _inject_lora(model, config)
    elif isinstance(config, AdaptionPromptConfig):
        _inject_adaption_prompt(model, config)
    elif isinstance(config, BottleneckConfig):
        _inject_bottleneck(model, config)
    elif isinstance(config, Mapping):
        _inject_multi_lora(model, config)
    else:
        what = type(config)
        raise TypeError(f"config: expected a fastpeft LoraConfig, AdaptionPromptConfig, "
                        f"BottleneckConfig or a dict of adapter name -> LoraConfig, got "
                        f"{what.__module__}.{what.__qualname__}"
                        + (" (a PEFT config: build the model with peft.get_peft_model, then "
                           "fastpeft.from_peft, or use fastpeft.LoraConfig)"
                           if what.__module__.startswith("peft.") else ""))
    trainable = {id(p) for _, layer in adapter_layers(model) for p in _adapter_params(layer)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every fastpeft adapter layer in ``model``: LoRA
    layers (PEFT's converted by :func:`fastpeft.from_peft` and PEFT's ``ParamWrapper``
    included: :func:`is_lora_layer`), adapted attentions and bottleneck adapters, in module
    order (an outer ``ParamWrapper`` before the one it wraps)."""
    for name, module in model.named_modules():
        if is_lora_layer(module) or isinstance(module, (AdaptedAttention, BottleneckAdapter)):
            yield name, module


def _adapter_params(layer: nn.Module) -> Iterator[Tensor]:
    if isinstance(layer, MultiLoRALinear):
        yield from (*layer.lora_A.parameters(), *layer.lora_B.parameters())
    elif is_lora_layer(layer):
        parts = lora_parts(layer)
        yield from (parts.lora_A, parts.lora_B)
    elif isinstance(layer, AdaptedAttention):
        yield from (layer.adaption_prompt, layer.adaption_gate)
    else:
        yield from layer.parameters()


# --- LoRA -------------------------------------------------------------------------------

def _inject_lora(model: nn.Module, config: LoraConfig) -> None:
    all_linear = config.target_modules == "all-linear"
    config = _with_peft_targets(model, config)
    target_modules = config.target_modules
    adapted = [n for n, m in model.named_modules() if is_lora_layer(m)]
    inside = set(adapted)
    params = _parameter_targets(model, config.target_parameters, inside)
    output_layer = _output_layer(model)
    targets = [
        (name, module) for name, module in model.named_modules()
        if _is_linear(module) and name.rpartition(".")[0] not in inside
        and not (all_linear and module is output_layer) and _matches(name, target_modules)
    ]
    # nn.Linear subclasses with a forward of their own: 'all-linear' leaves them out (with
    # a note), a target naming them is refused
    custom = [name for name, module in targets if own_forward(module)]
    if custom and not all_linear:
        kinds = {name: type(module).__name__ for name, module in targets}
        one = len(custom) == 1
        raise NotImplementedError(
            f"target_modules: {_names(f'{n} ({kinds[n]})' for n in custom)} "
            f"{'has a forward of its own' if one else 'have forwards of their own'} "
            f"({'an nn.Linear subclass' if one else 'nn.Linear subclasses'}), which "
            f"fastpeft's fused LoRA layers (computing x @ weight.T + bias) would bypass; "
            f"leave {'it' if one else 'them'} out, or adapt {'it' if one else 'them'} with PEFT")
    targets = [(name, module) for name, module in targets if name not in custom]
    # layers whose weight the model reads: "all-linear" leaves them out; named, they are
    # refused on an int8 / NF4 base (the model would read the codes) and where PEFT refuses
    # them, else adapted as PEFT adapts them, their LoRA inert (a note)
    readers = _weight_readers(model)
    read = [name for name, _ in targets if name in readers]
    refused = [n for n in read if config.base_dtype is not None or _peft_refuses(model, n)]
    if refused and not all_linear:
        raise ValueError(_weight_read_refusal(refused, readers))
    if all_linear:
        targets = [(name, module) for name, module in targets if name not in readers]
    left_out = _unadapted_experts(model, target_modules, all_linear, params, inside)
    source = "what PEFT's 'all-linear' adapts" if all_linear else "target_parameters"
    # PEFT's ParamWrapper adapts the parameters: refused before any change without it (the
    # experts "all-linear" leaves out only get a note, which needs no PEFT)
    if config.target_parameters:
        if params:
            what = f"adapting {_names(f'{m}.{p}' for m, p in params)} ({source})"
        else:
            what = f"target_parameters {config.target_parameters!r}"
        param_wrapper_class(what)
    if not targets and not params:
        again = [n for n in adapted if _matches(n, target_modules)]
        if again:
            raise ValueError(f"target_modules: the layers {target_modules!r} matches carry a "
                             f"LoRA adapter already ({', '.join(again[:3])}"
                             f"{', ...' if len(again) > 3 else ''})")
        what = f"target_modules: {target_modules!r} matches no linear layer (nn.Linear or Conv1D)"
        if config.target_parameters:
            what += f" and target_parameters {config.target_parameters!r} no parameter"
        raise ValueError(f"{what} of {type(model).__name__}")
    linear_names = {name for name, _ in targets}
    for owner, param in params:
        if owner in linear_names:
            raise ValueError(f"target_parameters: {owner}.{param} belongs to {owner}, which "
                             f"target_modules adapts as a linear layer already (PEFT refuses "
                             f"this too); name it in one of the two")
        shape = tuple(getattr(model.get_submodule(owner), param).shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"target_parameters: {owner}.{param} has shape {shape}; PEFT's "
                             f"ParamWrapper adapts 2-D (out, in) and 3-D (experts, ...) ones")
    for name, linear in targets:  # refused before anything changes
        if hasattr(linear, BOTTLENECK_CHILD):  # the fused layer would bypass its hook
            raise ValueError(f"config: {name} has a bottleneck adapter already; inject the "
                             f"LoraConfig before the BottleneckConfig")
        if is_bnb_4bit(linear) and bnb_nf4_problem(linear) is not None:
            raise ValueError(f"target_modules: {name}: "
                             f"{bnb_nf4_problem(linear).removeprefix('layer: ')}")
        if is_bnb(linear) and not (is_bnb_int8(linear) or is_bnb_4bit(linear)):
            raise NotImplementedError(
                f"target_modules: {name} is a bitsandbytes {type(linear).__name__}; fastpeft "
                f"takes float nn.Linear, int8 Linear8bitLt and NF4 Linear4bit layers")
        if config.base_dtype == "nf4" and not is_bnb(linear) \
                and tuple(linear_weight(linear).shape)[1] % 2:
            raise ValueError(f"target_modules: {name} has an odd in_features "
                             f"({tuple(linear_weight(linear).shape)[1]}), which "
                             f"base_dtype='nf4' cannot pack (two codes per byte)")
    if params and config.lora_dropout:
        raise ValueError(f"lora_dropout: PEFT's ParamWrapper, which adapts {params[0][0]}."
                         f"{params[0][1]} ({source}), does not work with lora_dropout != 0 "
                         f"({config.lora_dropout}), in PEFT either; set lora_dropout=0.0 or "
                         f"name only linear layers")
    keep_float = [name for name, linear in targets if config.base_dtype is not None
                  and not is_bnb(linear) and _kept_float(model, name)]
    for name, linear in targets:
        r, alpha = config.rank_and_alpha(name)
        args = (r, alpha, config.lora_dropout, config.use_rslora)
        if is_bnb_int8(linear):
            layer = Int8LoRALinear.from_bnb(linear, *args, dtype=_model_dtype(model))
        elif is_bnb_4bit(linear):
            layer = NF4LoRALinear.from_bnb(linear, *args, dtype=_model_dtype(model))
        elif config.base_dtype == "int8" and name not in keep_float:
            layer = Int8LoRALinear.from_linear(linear, *args)
        elif config.base_dtype == "nf4" and name not in keep_float:
            layer = NF4LoRALinear.from_linear(linear, *args)
        else:
            layer = LoRALinear(linear, *args)
        replace(model, name, layer)
    notes = []
    if keep_float:
        notes.append(f"base_dtype={config.base_dtype!r} leaves {_names(keep_float)} float "
                     f"(LoRALinear), as transformers keeps them unquantised "
                     f"(_keep_in_fp32_modules: the model's forward reads their weight's dtype)")
    if params:
        notes.append(_wrapped_note(model, params, config.base_dtype))
        _wrap_parameters(model, config, params)
    if left_out:
        # PEFT's "all-linear" adapts them where its conversion for transformers 5 has the
        # model type; without that conversion (older or no PEFT) they are left out here
        how = (f"as PEFT does for model type {_model_type(model)!r}"
               if _peft_moe_conversion() is not None
               else "(the installed PEFT, if any, has no conversion of 'all-linear' to them)")
        notes.append(f"target_modules='all-linear' leaves the 3-D expert parameters of "
                     f"{_names(_describe(e) for e in left_out)} unadapted and frozen, {how}; "
                     f"name them in target_parameters to adapt them (PEFT's ParamWrapper)")
    if read:
        notes.append(_weight_read_note(read, readers, left_out=all_linear))
    if custom:
        notes.append(f"target_modules='all-linear' leaves {_names(custom)} unadapted: "
                     f"nn.Linear subclasses with a forward of their own")
    if params and not targets and target_modules:
        notes.append(f"target_modules {target_modules!r} matched no linear layer")
    if targets and config.target_parameters and not params:
        notes.append(f"target_parameters {config.target_parameters!r} matched no parameter")
    if notes:  # one warning per call
        warnings.warn("inject: " + "; ".join(notes), UserWarning, stacklevel=3)


#: PEFT's Mamba-based model types, whose out_proj its LoRA refuses (the mamba-ssm kernels
#: read out_proj.weight): peft.tuners.tuners_utils._check_lora_target_modules_mamba
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
#: the Mamba (1) mixers whose forward passes x_proj / out_proj weights to mamba_inner_fn
_MAMBA_INNER_MIXERS = frozenset({"MambaMixer", "FalconMambaMixer"})


def _weight_readers(model: nn.Module) -> dict[str, str]:
    """The linear layers of ``model`` whose weight the model's code reads instead of
    calling the layer -> why. A LoRA layer there never contributes (a float base: its
    ``weight`` is the base weight; PEFT's does the same, silently), and an int8 / NF4 one
    hands the model its codes (the forward then fails with unrelated dtype errors):
    ``nn.MultiheadAttention``'s ``out_proj`` (SigLIP's pooling head), a Mamba mixer's
    ``dt_proj`` (its forward multiplies by the weight) and, in Mamba / FalconMamba, its
    ``x_proj`` / ``out_proj`` (the mamba-ssm kernels), and every ``out_proj`` of the
    Mamba-based model types PEFT refuses it on (:data:`MAMBA_MODEL_TYPES`)."""
    readers: dict[str, str] = {}
    model_type = _model_type(model)
    for name, module in model.named_modules():
        prefix, kind = f"{name}." if name else "", type(module).__name__
        if isinstance(module, nn.MultiheadAttention):
            readers[prefix + "out_proj"] = (f"{name or 'the model'} (nn.MultiheadAttention) "
                                            f"passes out_proj.weight to "
                                            f"F.multi_head_attention_forward")
        elif hasattr(module, "A_log") and _is_linear(getattr(module, "dt_proj", None)):
            readers[prefix + "dt_proj"] = f"{name} ({kind}) multiplies by dt_proj.weight"
            if kind in _MAMBA_INNER_MIXERS:
                for child in ("x_proj", "out_proj"):
                    readers[prefix + child] = (f"{name} ({kind}) passes {child}.weight to the "
                                               f"mamba-ssm kernels (mamba_inner_fn)")
        elif model_type in MAMBA_MODEL_TYPES and name.rpartition(".")[2] == "out_proj" \
                and name not in readers:
            readers[name] = (f"the mamba-ssm kernels of model type {model_type!r} read "
                             f"out_proj.weight (PEFT refuses LoRA on it there too)")
    return {name: why for name, why in readers.items()
            if _is_linear(_submodule(model, name))}


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _peft_refuses(model: nn.Module, name: str) -> bool:
    """Whether PEFT refuses LoRA on the weight-read layer ``name``: ``out_proj`` of its
    Mamba-based model types (:data:`MAMBA_MODEL_TYPES`)."""
    return _model_type(model) in MAMBA_MODEL_TYPES and name.rpartition(".")[2] == "out_proj"


def _weight_read_refusal(read: list[str], readers: dict[str, str]) -> str:
    one = len(read) == 1
    return (f"target_modules: {_names(read)} {'is' if one else 'are'} not called by the "
            f"model, which reads {'its' if one else 'their'} weight ({readers[read[0]]}): "
            f"with base_dtype 'int8' / 'nf4' the model would read the quantised codes, and "
            f"PEFT refuses LoRA on a Mamba model's out_proj; leave {'it' if one else 'them'} "
            f"out")


def _weight_read_note(read: list[str], readers: dict[str, str], left_out: bool) -> str:
    one = len(read) == 1
    why = (f"the model reads {'its' if one else 'their'} weight instead of calling "
           f"{'it' if one else 'them'} ({readers[read[0]]})")
    if left_out:
        return f"target_modules='all-linear' leaves {_names(read)} unadapted: {why}"
    return (f"{_names(read)} {'is' if one else 'are'} adapted as named, but {why}: "
            f"{'its' if one else 'their'} LoRA never contributes, as with PEFT")


def is_lora_layer(module: nn.Module) -> bool:
    """A LoRA layer: fastpeft's (:class:`fastpeft.LoRALinear`,
    :class:`fastpeft.Int8LoRALinear`, :class:`fastpeft.NF4LoRALinear`,
    :class:`fastpeft.MultiLoRALinear`), PEFT's converted by
    :func:`fastpeft.from_peft`, or
    PEFT's ``ParamWrapper`` (LoRA on a parameter, with PEFT's forward)."""
    return isinstance(module, LORA_TYPES) or is_param_wrapper(module)


def param_target_key(name: str, wrapper: nn.Module) -> str:
    """The qualified name PEFT gives the parameter a ``ParamWrapper`` at ``name`` adapts
    (matched against ``target_parameters`` / ``rank_pattern``): the wrapper's name without
    the ``.base_layer`` of nested wrappers, then the parameter's, e.g.
    ``model.layers.0.mlp.experts.gate_up_proj`` for ``...experts.base_layer``."""
    return f"{_strip_base_layer(name)}.{wrapper.parameter_name}"


def _strip_base_layer(name: str) -> str:
    # PEFT's strip_base_layer_from_name (tuners_utils), to match parameters as PEFT does
    while ".base_layer" in name:
        prefix, _, suffix = name.rpartition(".base_layer")
        name = prefix + suffix
    return name


def _with_peft_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with its targets resolved as PEFT resolves them: ``None`` -> PEFT's
    default targets for the model type; then, on transformers 5, PEFT's own conversion of
    the config for models whose MoE layers changed layout (``"all-linear"`` or the
    transformers 4 expert / router names become ``target_parameters``, with doubled rank
    and alpha for fused ``gate_up_proj``), where the installed PEFT has it."""
    target_modules = config.target_modules
    if target_modules is None:
        target_modules = default_target_modules(model, optional=bool(config.target_parameters))
    config = dataclasses.replace(config, target_modules=target_modules)
    conversion = _peft_moe_conversion()
    if conversion is None or _model_type(model) is None:
        return config
    peft_lora_config, convert_peft_config_for_transformers, get_model_conversion_mapping = \
        conversion
    peft_config = peft_lora_config(
        r=config.r, lora_alpha=config.lora_alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        target_parameters=list(config.target_parameters or []) or None,
        rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern))
    try:
        convert_peft_config_for_transformers(peft_config, model=model,
                                             conversions=get_model_conversion_mapping(model))
    except ValueError as err:  # e.g. w1 named without w3, which are one parameter now
        raise ValueError(f"target_modules: {err}") from err
    modules, params = peft_config.target_modules, peft_config.target_parameters
    modules = modules if isinstance(modules, str) else sorted(modules or [])
    params = sorted(params) if params else None
    if not modules and not params:
        return config
    return dataclasses.replace(config, target_modules=modules, target_parameters=params,
                               rank_pattern=dict(peft_config.rank_pattern or {}),
                               alpha_pattern=dict(peft_config.alpha_pattern or {}))


def _peft_moe_conversion():
    """PEFT's ``LoraConfig`` and its conversion of LoRA configs for the MoE layers
    transformers 5 changed (``convert_peft_config_for_transformers``,
    ``get_model_conversion_mapping``), None where there is nothing to convert (transformers
    4) or the installed PEFT has none (or there is no PEFT)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft.import_utils import is_transformers_ge_v5
    except ImportError:
        return None
    if not is_transformers_ge_v5:
        return None
    try:  # PEFT >= 0.18 with transformers 5
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:
        return None
    return PeftLoraConfig, convert_peft_config_for_transformers, get_model_conversion_mapping


def _parameter_targets(model: nn.Module, names: list[str] | None,
                       inside: set[str]) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` of every parameter ``target_parameters`` matches,
    by PEFT's rule (the qualified name equals a name or ends with ``"." + name``), in PEFT's
    order."""
    if not names:
        return []
    wanted = set(names)
    found = []
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{_strip_base_layer(module_name)}.{param_name}"
            if key not in wanted and not any(key.endswith("." + n) for n in wanted):
                continue
            if not module_name:
                raise ValueError(f"target_parameters: {param_name} is a parameter of the "
                                 f"top-level module, which PEFT cannot wrap either")
            carrier = _lora_ancestor(module_name, inside)
            if carrier is not None or is_lora_layer(module):
                raise ValueError(f"target_parameters: {key} belongs to "
                                 f"{carrier or module_name}, which carries a LoRA adapter "
                                 f"already")
            found.append((module_name, param_name))
    return found


def _lora_ancestor(name: str, inside: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i + 1])
        if prefix in inside:
            return prefix
    return None


def _unadapted_experts(model: nn.Module, target_modules: list[str] | str, all_linear: bool,
                       params: list[tuple[str, str]],
                       inside: set[str]) -> list[tuple[str, nn.Module, list[str]]]:
    """Modules holding MoE experts as 3-D parameters (the MoE layout of transformers 5: see
    :func:`_expert_parameters`) that the LoRA targets leave out: ``"all-linear"`` leaves
    out what PEFT's "all-linear" does not turn into ``target_parameters`` (returned, for the
    warning); a module named in ``target_modules`` is refused (no LoRA layer for it; PEFT
    refuses it too)."""
    wrapped = set(params)
    left_out = []
    for name, module in model.named_modules():
        if _lora_ancestor(name, inside):
            continue
        stacked = _expert_parameters(module)
        if not stacked:
            continue
        if not all_linear and _matches(name, target_modules):
            raise NotImplementedError(
                f"target_modules: {name} ({type(module).__name__}) holds its experts as 3-D "
                f"parameters ({', '.join(stacked)}), which have no LoRA layer; adapt them as "
                f"PEFT does, with target_parameters="
                f"{[f'{name}.{p}' for p in stacked]!r} (PEFT's ParamWrapper)")
        rest = [p for p in stacked if (name, p) not in wrapped]
        if all_linear and rest:
            left_out.append((name, module, rest))
    return left_out


#: the names transformers gives experts held as 3-D parameters (gate_up_proj / down_proj:
#: Mixtral, Qwen2/3-MoE, Llama 4, GPT-OSS, DeepSeek-V3, ... on transformers 5)
EXPERT_PARAMETERS = frozenset({"gate_up_proj", "down_proj", "gate_proj", "up_proj",
                               "w1", "w2", "w3"})


def _expert_parameters(module: nn.Module) -> list[str]:
    """The names of ``module``'s own 3-D parameters that hold MoE experts (experts x out x
    in), which PEFT's ``"all-linear"`` / ``target_parameters`` deal in: in a module whose
    class says it holds experts (``MixtralExperts``, ``Llama4TextExperts``, ...) or under
    an expert projection's name. Other 3-D parameters are no experts, and PEFT leaves them
    alone (ViT's ``cls_token`` and ``position_embeddings``, SigLIP's pooling ``probe``, a
    conv's weight)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    experts = "expert" in type(module).__name__.lower()
    return [name for name, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and (experts or name in EXPERT_PARAMETERS)]


def _wrap_parameters(model: nn.Module, config: LoraConfig,
                     params: list[tuple[str, str]]) -> None:
    """Wraps the parameters with PEFT's ``ParamWrapper`` (nested where a module has several,
    as PEFT nests them), by PEFT's own injection: its state-dict keys and forward. Each
    parameter's ``r`` / ``lora_alpha`` is ``config.rank_and_alpha`` of its qualified name."""
    import peft

    keys = [f"{owner}.{param}" for owner, param in params]
    rank_pattern, alpha_pattern = {}, {}
    for key in keys:
        rank_pattern[re.escape(key)], alpha_pattern[re.escape(key)] = config.rank_and_alpha(key)
    peft_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        use_rslora=config.use_rslora, target_modules=[], target_parameters=keys,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True,
        bias="none")
    modes = {owner: model.get_submodule(owner).training for owner, _ in params}
    missing = object()
    previous = model.__dict__.get("peft_config", missing)
    with warnings.catch_warnings():
        # PEFT checks rank_pattern against the modules it adapted, never the parameters
        warnings.filterwarnings("ignore", message=".*did not match any targeted module",
                                category=RuntimeWarning)
        peft.inject_adapter_in_model(peft_config, model)
    if previous is missing:  # PEFT's injection leaves its config on the model
        model.__dict__.pop("peft_config", None)
    else:
        model.__dict__["peft_config"] = previous
    for owner, training in modes.items():
        model.get_submodule(owner).train(training)


def _wrapped_note(model: nn.Module, params: list[tuple[str, str]],
                  base_dtype: str | None) -> str:
    """The warning's words on the parameters PEFT's ``ParamWrapper`` adapts (before they
    are wrapped)."""
    by_module: dict[str, list[str]] = {}
    for owner, param in params:
        by_module.setdefault(owner, []).append(param)
    listed = _names(f"{m} ({', '.join(p)})" for m, p in by_module.items())
    note = (f"{len(params)} parameters of {len(by_module)} modules are adapted with PEFT's "
            f"ParamWrapper and run PEFT's unfused forward (fastpeft has no fused kernel for "
            f"a LoRA on a parameter): {listed}")
    if base_dtype in ("int8", "nf4"):
        dtypes = sorted({str(getattr(model.get_submodule(owner), param).dtype)
                         for owner, param in params})
        note += (f"; base_dtype={base_dtype!r} quantises only the linear layers: these "
                 f"parameters stay {'/'.join(d.removeprefix('torch.') for d in dtypes)}")
    return note


def _describe(entry: tuple[str, nn.Module, list[str]]) -> str:
    name, module, stacked = entry
    return f"{name} ({type(module).__name__}: {', '.join(stacked)})"


def _names(items: Iterable[str], limit: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit
                                       else "")


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target_modules(model: nn.Module, optional: bool = False) -> list[str] | str:
    """PEFT's default LoRA targets for the model's type (what ``target_modules=None``
    means in PEFT); with ``optional`` (there are ``target_parameters``), ``[]`` where PEFT
    has none, as PEFT then adapts only the parameters."""
    model_type = _model_type(model)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError as err:
        raise ValueError("target_modules: None means PEFT's default targets for the model "
                         "type, which needs peft installed; name the targets instead") from err
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        if optional:
            return []
        raise ValueError(f"target_modules: PEFT has no default targets for model type "
                         f"{model_type!r} ({type(model).__name__}); name them")
    return targets if isinstance(targets, str) else list(targets)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Puts ``layer`` where ``name`` is, in the training mode of the layer it replaces."""
    layer.train(model.get_submodule(name).training)
    model.set_submodule(name, layer)


def model_embeddings(model: nn.Module, kind: str) -> nn.Module | None:
    """A transformers model's ``get_input_embeddings()`` / ``get_output_embeddings()``
    (``kind`` ``"input"`` / ``"output"``), None where it has none: not a transformers model,
    or one that does not implement it (transformers' dual encoders, ``CLIPModel`` and
    ``SiglipModel``, raise ``NotImplementedError``: two towers, two embeddings)."""
    get = getattr(model, f"get_{kind}_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except NotImplementedError:
        return None


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its input embeddings' (what the hidden states
    start in), else its first floating parameter's."""
    weight = getattr(model_embeddings(model, "input"), "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    return compute_dtype(model)


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _kept_float(model: nn.Module, name: str) -> bool:
    """Whether transformers keeps layer ``name`` unquantised when it quantises ``model``
    (``_keep_in_fp32_modules``: T5's ``wo``, whose forward casts its input to the weight's
    dtype), as fastpeft's ``base_dtype`` quantisation then does too."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    dotted = f".{name}."
    return any(f".{k}." in dotted for k in keep if isinstance(k, str) and k)


def _output_layer(model: nn.Module) -> nn.Module | None:
    """A transformers model's output layer (``lm_head``), which "all-linear" leaves out, as
    PEFT's does (a target naming it adapts it)."""
    return model_embeddings(model, "output")


def _inject_multi_lora(model: nn.Module, configs: Mapping[str, LoraConfig]) -> None:
    """Several named LoRA adapters as :class:`MultiLoRALinear` layers (see :func:`inject`);
    everything is checked before anything changes."""
    if not configs:
        raise ValueError("config: an empty dict names no adapter")
    inside = {n for n, m in model.named_modules() if is_lora_layer(m)}
    output_layer = _output_layer(model)
    readers = _weight_readers(model)
    read: dict[str, None] = {}  # left out by an "all-linear", in order
    plan: dict[str, list[tuple[str, LoraConfig]]] = {}  # layer name -> its new adapters
    for adapter, config in configs.items():
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config[{adapter!r}]: expected a LoraConfig, got "
                            f"{type(config).__name__}")
        check_adapter_name("config", adapter)
        if config.base_dtype is not None or config.target_parameters:
            raise NotImplementedError(
                f"config[{adapter!r}]: several adapters on one layer (MultiLoRALinear) take "
                f"float nn.Linear / Conv1D layers: no base_dtype, no target_parameters")
        all_linear = config.target_modules == "all-linear"
        config = _with_peft_targets(model, config)
        if config.target_parameters:  # transformers 5 MoE: PEFT adapts the experts as parameters
            raise NotImplementedError(
                f"config[{adapter!r}]: on {type(model).__name__}, PEFT adapts "
                f"{config.target_parameters[:2]} as parameters (ParamWrapper), which "
                f"MultiLoRALinear layers do not; name the linear layers in target_modules")
        _unadapted_experts(model, config.target_modules, all_linear, [], inside)  # refusals
        matched = []
        for name, module in model.named_modules():
            if not _matches(name, config.target_modules) \
                    or (all_linear and module is output_layer) \
                    or _lora_ancestor(name, inside) not in (None, name):  # an adapter's own
                continue
            if name in readers and not isinstance(module, MultiLoRALinear) \
                    and (all_linear or _peft_refuses(model, name)):
                if not all_linear:
                    raise ValueError(f"config[{adapter!r}]: "
                                     + _weight_read_refusal([name], readers))
                read.setdefault(name, None)
                continue
            if isinstance(module, MultiLoRALinear):
                if adapter in module.lora_A:
                    raise ValueError(f"config: {name} has an adapter {adapter!r} already")
            elif is_lora_layer(module):
                raise ValueError(f"target_modules: {name} carries a single LoRA adapter "
                                 f"already ({type(module).__name__})")
            elif not _is_linear(module):
                continue
            elif hasattr(module, BOTTLENECK_CHILD):
                raise ValueError(f"config: {name} has a bottleneck adapter already; inject "
                                 f"the LoRA configs before the BottleneckConfig")
            elif own_forward(module):
                raise NotImplementedError(
                    f"target_modules: {name} is a {type(module).__name__}, an nn.Linear "
                    f"subclass with a forward of its own, which MultiLoRALinear (computing "
                    f"x @ weight.T + bias) would bypass; leave it out")
            elif is_bnb(module):
                raise NotImplementedError(
                    f"target_modules: {name} is a bitsandbytes {type(module).__name__}; "
                    f"several adapters on one layer (MultiLoRALinear) take float layers")
            matched.append(name)
        if not matched:
            raise ValueError(f"config[{adapter!r}]: target_modules "
                             f"{config.target_modules!r} matches no linear layer (nn.Linear "
                             f"or Conv1D) of {type(model).__name__}")
        for name in matched:
            plan.setdefault(name, []).append((adapter, config))
    for name, adapters in plan.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, MultiLoRALinear):
            layer = MultiLoRALinear(layer)
            replace(model, name, layer)
        for adapter, config in adapters:
            r, alpha = config.rank_and_alpha(name)
            layer.add_adapter(adapter, r, alpha, config.lora_dropout, config.use_rslora)
        layer.train(layer.training)  # the new adapters' modules too
    if read:  # one warning per call
        warnings.warn("inject: " + _weight_read_note(list(read), readers, left_out=True),
                      UserWarning, stacklevel=3)
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if any("default" in m.lora_A for m in layers):
        for m in layers:  # with no names set, the model runs "default", as PEFT its active
            m.model_default = True  # adapter: the base alone where a layer lacks it


# --- adaption prompt --------------------------------------------------------------------

def _inject_adaption_prompt(model: nn.Module, config: AdaptionPromptConfig) -> None:
    attentions = adaption_prompt_sites(model)
    if not attentions:
        raise ValueError(f"model: found no decoder self-attention in {type(model).__name__} "
                         f"to give an adaption prompt (fastpeft.placement lists the layouts)")
    if len(attentions) < config.adapter_layers:
        raise ValueError(f"adapter_layers: {config.adapter_layers} layers asked for, "
                         f"{type(model).__name__} has {len(attentions)}")
    adapted = {}  # every layer checked and built before any is put in place
    for name in attentions[len(attentions) - config.adapter_layers:]:
        attn = model.get_submodule(name)
        if isinstance(attn, AdaptedAttention):
            raise ValueError(f"config: {name} has an adaption prompt already")
        if hasattr(attn, BOTTLENECK_CHILD):  # its hook would never run inside the wrapper
            raise ValueError(f"config: {name} has a bottleneck adapter already; inject the "
                             f"AdaptionPromptConfig before the BottleneckConfig")
        try:
            adapted[name] = AdaptedAttention(attn, config.adapter_len, gate=config.gate,
                                             gate_tanh=config.gate_tanh,
                                             dtype=_model_dtype(model))
        except (TypeError, NotImplementedError) as err:
            raise type(err)(f"{name} ({type(model).__name__}): {err}") from err
    for name, layer in adapted.items():
        replace(model, name, layer)


# --- bottleneck adapters ----------------------------------------------------------------

def _inject_bottleneck(model: nn.Module, config: BottleneckConfig) -> None:
    found = {placement: bottleneck_sites(model, placement) for placement in config.placements}
    # each placement on its own: a family whose layout matches one of them only (a
    # family missing from fastpeft.placement's table) is refused, not half adapted
    missing = [placement for placement, names in found.items() if not names]
    if missing:
        present = [p for p in config.placements if p not in missing]
        raise ValueError(f"model: found no {' or '.join(missing)} sublayers in "
                         f"{type(model).__name__} (model type {_model_type(model)!r}) to place "
                         f"bottleneck adapters on"
                         + (f" (only {' and '.join(present)} ones)" if present else "")
                         + "; fastpeft.placement.BOTTLENECK_SITES lists the known layouts")
    sites = [(placement, name) for placement, names in found.items() for name in names]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError("model: its config has no hidden_size to size the adapters from")
    bottleneck = config.size_for(hidden)
    dtype = _model_dtype(model)
    for placement, name in sites:  # refused before any adapter is added
        if hasattr(model.get_submodule(name), BOTTLENECK_CHILD):
            raise ValueError(f"config: {name} (the {placement} of a block) has a bottleneck "
                             f"adapter already")
    for placement, name in sites:
        sublayer = model.get_submodule(name)
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
