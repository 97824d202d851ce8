"""Which layers and parameters a LoRA config adapts, chosen as PEFT chooses them: target
names matched, PEFT's default targets and its conversion for transformers 5's MoE layers,
3-D expert parameters, layers whose weight the model reads instead of calling them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from torch import nn

from .config import LoraConfig
from .nn.int8_lora_linear import Int8LoRALinear
from .nn.lora_linear import LoRALinear, is_conv1d
from .nn.multi_lora_linear import MultiLoRALinear
from .nn.nf4_lora_linear import NF4LoRALinear
from .nn.peft_lora import FusedPeftLora, is_param_wrapper

LORA_TYPES = (LoRALinear, Int8LoRALinear, NF4LoRALinear, MultiLoRALinear, FusedPeftLora)


#: PEFT's Mamba-based model types, whose out_proj its LoRA refuses (the mamba-ssm kernels
#: read out_proj.weight): peft.tuners.tuners_utils._check_lora_target_modules_mamba
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
#: the Mamba (1) mixers whose forward passes x_proj / out_proj weights to mamba_inner_fn
_MAMBA_INNER_MIXERS = frozenset({"MambaMixer", "FalconMambaMixer"})


def weight_readers(model: nn.Module) -> dict[str, str]:
    """The linear layers of ``model`` whose weight the model's code reads instead of
    calling the layer -> why. A LoRA layer there never contributes (a float base: its
    ``weight`` is the base weight; PEFT's does the same, silently), and an int8 / NF4 one
    hands the model its codes (the forward then fails with unrelated dtype errors):
    ``nn.MultiheadAttention``'s ``out_proj`` (SigLIP's pooling head), a Mamba mixer's
    ``dt_proj`` (its forward multiplies by the weight) and, in Mamba / FalconMamba, its
    ``x_proj`` / ``out_proj`` (the mamba-ssm kernels), and every ``out_proj`` of the
    Mamba-based model types PEFT refuses it on (:data:`MAMBA_MODEL_TYPES`)."""
    readers: dict[str, str] = {}
    model_type = model_type_of(model)
    for name, module in model.named_modules():
        prefix, kind = f"{name}." if name else "", type(module).__name__
        if isinstance(module, nn.MultiheadAttention):
            readers[prefix + "out_proj"] = (f"{name or 'the model'} (nn.MultiheadAttention) "
                                            f"passes out_proj.weight to "
                                            f"F.multi_head_attention_forward")
        elif hasattr(module, "A_log") and is_linear(getattr(module, "dt_proj", None)):
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
            if is_linear(_submodule(model, name))}


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def peft_refuses(model: nn.Module, name: str) -> bool:
    """Whether PEFT refuses LoRA on the weight-read layer ``name``: ``out_proj`` of its
    Mamba-based model types (:data:`MAMBA_MODEL_TYPES`)."""
    return model_type_of(model) in MAMBA_MODEL_TYPES and name.rpartition(".")[2] == "out_proj"


def weight_read_refusal(read: list[str], readers: dict[str, str]) -> str:
    one = len(read) == 1
    return (f"target_modules: {name_list(read)} {'is' if one else 'are'} not called by the "
            f"model, which reads {'its' if one else 'their'} weight ({readers[read[0]]}): "
            f"with base_dtype 'int8' / 'nf4' the model would read the quantised codes, and "
            f"PEFT refuses LoRA on a Mamba model's out_proj; leave {'it' if one else 'them'} "
            f"out")


def weight_read_note(read: list[str], readers: dict[str, str], left_out: bool) -> str:
    one = len(read) == 1
    why = (f"the model reads {'its' if one else 'their'} weight instead of calling "
           f"{'it' if one else 'them'} ({readers[read[0]]})")
    if left_out:
        return f"target_modules='all-linear' leaves {name_list(read)} unadapted: {why}"
    return (f"{name_list(read)} {'is' if one else 'are'} adapted as named, but {why}: "
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


def with_peft_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with its targets resolved as PEFT resolves them: ``None`` -> PEFT's
    default targets for the model type; then, on transformers 5, PEFT's own conversion of
    the config for models whose MoE layers changed layout (``"all-linear"`` or the
    transformers 4 expert / router names become ``target_parameters``, with doubled rank
    and alpha for fused ``gate_up_proj``), where the installed PEFT has it."""
    target_modules = config.target_modules
    if target_modules is None:
        target_modules = default_target_modules(model, optional=bool(config.target_parameters))
    config = dataclasses.replace(config, target_modules=target_modules)
    conversion = peft_moe_conversion()
    if conversion is None or model_type_of(model) is None:
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


def peft_moe_conversion():
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


def parameter_targets(model: nn.Module, names: list[str] | None,
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
            carrier = lora_ancestor(module_name, inside)
            if carrier is not None or is_lora_layer(module):
                raise ValueError(f"target_parameters: {key} belongs to "
                                 f"{carrier or module_name}, which carries a LoRA adapter "
                                 f"already")
            found.append((module_name, param_name))
    return found


def lora_ancestor(name: str, inside: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i + 1])
        if prefix in inside:
            return prefix
    return None


def unadapted_experts(model: nn.Module, target_modules: list[str] | str, all_linear: bool,
                       params: list[tuple[str, str]],
                       inside: set[str]) -> list[tuple[str, nn.Module, list[str]]]:
    """Modules holding MoE experts as 3-D parameters (the MoE layout of transformers 5: see
    :func:`expert_parameters`) that the LoRA targets leave out: ``"all-linear"`` leaves
    out what PEFT's "all-linear" does not turn into ``target_parameters`` (returned, for the
    warning); a module named in ``target_modules`` is refused (no LoRA layer for it; PEFT
    refuses it too)."""
    wrapped = set(params)
    left_out = []
    for name, module in model.named_modules():
        if lora_ancestor(name, inside):
            continue
        stacked = expert_parameters(module)
        if not stacked:
            continue
        if not all_linear and matches_targets(name, target_modules):
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


def expert_parameters(module: nn.Module) -> list[str]:
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


def name_list(items: Iterable[str], limit: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit
                                       else "")


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target_modules(model: nn.Module, optional: bool = False) -> list[str] | str:
    """PEFT's default LoRA targets for the model's type (what ``target_modules=None``
    means in PEFT); with ``optional`` (there are ``target_parameters``), ``[]`` where PEFT
    has none, as PEFT then adapts only the parameters."""
    model_type = model_type_of(model)
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


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


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


def matches_targets(name: str, target_modules: list[str] | str) -> bool:
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def kept_float(model: nn.Module, name: str) -> bool:
    """Whether transformers keeps layer ``name`` unquantised when it quantises ``model``
    (``_keep_in_fp32_modules``: T5's ``wo``, whose forward casts its input to the weight's
    dtype), as fastpeft's ``base_dtype`` quantisation then does too."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    dotted = f".{name}."
    return any(f".{k}." in dotted for k in keep if isinstance(k, str) and k)


def model_output_layer(model: nn.Module) -> nn.Module | None:
    """A transformers model's output layer (``lm_head``), which "all-linear" leaves out, as
    PEFT's does (a target naming it adapts it)."""
    return model_embeddings(model, "output")
