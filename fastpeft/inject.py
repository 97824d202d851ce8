"""``fastpeft.inject``: put fused adapter layers into an existing model, in place."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig
from .nn.adapted_attention import AdaptedAttention, compute_dtype
from .nn.bottleneck_adapter import BottleneckAdapter
from .nn.int8_lora_linear import Int8LoRALinear, is_bnb, is_bnb_int8
from .nn.lora_linear import LoRALinear, linear_weight, own_forward
from .nn.multi_lora_linear import MultiLoRALinear, check_adapter_name
from .nn.nf4_lora_linear import NF4LoRALinear, bnb_nf4_problem, is_bnb_4bit
from .nn.peft_lora import lora_parts, param_wrapper_class
from .placement import adaption_prompt_sites, bottleneck_sites
from .targets import (
    is_linear,
    is_lora_layer,
    kept_float,
    lora_ancestor,
    matches_targets,
    model_embeddings,
    model_output_layer,
    model_type_of,
    name_list,
    parameter_targets,
    peft_moe_conversion,
    peft_refuses,
    unadapted_experts,
    weight_read_note,
    weight_read_refusal,
    weight_readers,
    with_peft_targets,
)

__all__ = ["adapter_layers", "inject", "is_lora_layer"]

AnyConfig = LoraConfig | AdaptionPromptConfig | BottleneckConfig

#: The name of the adapter attached to a block's sublayer by a ``BottleneckConfig``.
BOTTLENECK_CHILD = "bottleneck_adapter"


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
    config = with_peft_targets(model, config)
    target_modules = config.target_modules
    adapted = [n for n, m in model.named_modules() if is_lora_layer(m)]
    inside = set(adapted)
    params = parameter_targets(model, config.target_parameters, inside)
    output_layer = model_output_layer(model)
    targets = [
        (name, module) for name, module in model.named_modules()
        if is_linear(module) and name.rpartition(".")[0] not in inside
        and not (all_linear and module is output_layer) and matches_targets(name, target_modules)
    ]
    # nn.Linear subclasses with a forward of their own: 'all-linear' leaves them out (with
    # a note), a target naming them is refused
    custom = [name for name, module in targets if own_forward(module)]
    if custom and not all_linear:
        kinds = {name: type(module).__name__ for name, module in targets}
        one = len(custom) == 1
        raise NotImplementedError(
            f"target_modules: {name_list(f'{n} ({kinds[n]})' for n in custom)} "
            f"{'has a forward of its own' if one else 'have forwards of their own'} "
            f"({'an nn.Linear subclass' if one else 'nn.Linear subclasses'}), which "
            f"fastpeft's fused LoRA layers (computing x @ weight.T + bias) would bypass; "
            f"leave {'it' if one else 'them'} out, or adapt {'it' if one else 'them'} with PEFT")
    targets = [(name, module) for name, module in targets if name not in custom]
    # layers whose weight the model reads: "all-linear" leaves them out; named, they are
    # refused on an int8 / NF4 base (the model would read the codes) and where PEFT refuses
    # them, else adapted as PEFT adapts them, their LoRA inert (a note)
    readers = weight_readers(model)
    read = [name for name, _ in targets if name in readers]
    refused = [n for n in read if config.base_dtype is not None or peft_refuses(model, n)]
    if refused and not all_linear:
        raise ValueError(weight_read_refusal(refused, readers))
    if all_linear:
        targets = [(name, module) for name, module in targets if name not in readers]
    left_out = unadapted_experts(model, target_modules, all_linear, params, inside)
    source = "what PEFT's 'all-linear' adapts" if all_linear else "target_parameters"
    # PEFT's ParamWrapper adapts the parameters: refused before any change without it (the
    # experts "all-linear" leaves out only get a note, which needs no PEFT)
    if config.target_parameters:
        if params:
            what = f"adapting {name_list(f'{m}.{p}' for m, p in params)} ({source})"
        else:
            what = f"target_parameters {config.target_parameters!r}"
        param_wrapper_class(what)
    if not targets and not params:
        again = [n for n in adapted if matches_targets(n, target_modules)]
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
                  and not is_bnb(linear) and kept_float(model, name)]
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
        notes.append(f"base_dtype={config.base_dtype!r} leaves {name_list(keep_float)} float "
                     f"(LoRALinear), as transformers keeps them unquantised "
                     f"(_keep_in_fp32_modules: the model's forward reads their weight's dtype)")
    if params:
        notes.append(_wrapped_note(model, params, config.base_dtype))
        _wrap_parameters(model, config, params)
    if left_out:
        # PEFT's "all-linear" adapts them where its conversion for transformers 5 has the
        # model type; without that conversion (older or no PEFT) they are left out here
        how = (f"as PEFT does for model type {model_type_of(model)!r}"
               if peft_moe_conversion() is not None
               else "(the installed PEFT, if any, has no conversion of 'all-linear' to them)")
        notes.append(f"target_modules='all-linear' leaves the 3-D expert parameters of "
                     f"{name_list(_describe(e) for e in left_out)} unadapted and frozen, {how}; "
                     f"name them in target_parameters to adapt them (PEFT's ParamWrapper)")
    if read:
        notes.append(weight_read_note(read, readers, left_out=all_linear))
    if custom:
        notes.append(f"target_modules='all-linear' leaves {name_list(custom)} unadapted: "
                     f"nn.Linear subclasses with a forward of their own")
    if params and not targets and target_modules:
        notes.append(f"target_modules {target_modules!r} matched no linear layer")
    if targets and config.target_parameters and not params:
        notes.append(f"target_parameters {config.target_parameters!r} matched no parameter")
    if notes:  # one warning per call
        warnings.warn("inject: " + "; ".join(notes), UserWarning, stacklevel=3)


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
    listed = name_list(f"{m} ({', '.join(p)})" for m, p in by_module.items())
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


def replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Puts ``layer`` where ``name`` is, in the training mode of the layer it replaces."""
    layer.train(model.get_submodule(name).training)
    model.set_submodule(name, layer)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its input embeddings' (what the hidden states
    start in), else its first floating parameter's."""
    weight = getattr(model_embeddings(model, "input"), "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    return compute_dtype(model)


def _inject_multi_lora(model: nn.Module, configs: Mapping[str, LoraConfig]) -> None:
    """Several named LoRA adapters as :class:`MultiLoRALinear` layers (see :func:`inject`);
    everything is checked before anything changes."""
    if not configs:
        raise ValueError("config: an empty dict names no adapter")
    inside = {n for n, m in model.named_modules() if is_lora_layer(m)}
    output_layer = model_output_layer(model)
    readers = weight_readers(model)
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
        config = with_peft_targets(model, config)
        if config.target_parameters:  # transformers 5 MoE: PEFT adapts the experts as parameters
            raise NotImplementedError(
                f"config[{adapter!r}]: on {type(model).__name__}, PEFT adapts "
                f"{config.target_parameters[:2]} as parameters (ParamWrapper), which "
                f"MultiLoRALinear layers do not; name the linear layers in target_modules")
        unadapted_experts(model, config.target_modules, all_linear, [], inside)  # refusals
        matched = []
        for name, module in model.named_modules():
            if not matches_targets(name, config.target_modules) \
                    or (all_linear and module is output_layer) \
                    or lora_ancestor(name, inside) not in (None, name):  # an adapter's own
                continue
            if name in readers and not isinstance(module, MultiLoRALinear) \
                    and (all_linear or peft_refuses(model, name)):
                if not all_linear:
                    raise ValueError(f"config[{adapter!r}]: "
                                     + weight_read_refusal([name], readers))
                read.setdefault(name, None)
                continue
            if isinstance(module, MultiLoRALinear):
                if adapter in module.lora_A:
                    raise ValueError(f"config: {name} has an adapter {adapter!r} already")
            elif is_lora_layer(module):
                raise ValueError(f"target_modules: {name} carries a single LoRA adapter "
                                 f"already ({type(module).__name__})")
            elif not is_linear(module):
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
        warnings.warn("inject: " + weight_read_note(list(read), readers, left_out=True),
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
                         f"{type(model).__name__} (model type {model_type_of(model)!r}) to place "
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
