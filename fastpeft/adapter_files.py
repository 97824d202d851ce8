"""Adapters saved and loaded in Hugging Face PEFT's format.

PEFT's on-disk format is a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are the adapter tensors' qualified names under
``base_model.model.`` (PEFT's wrapper prefix) without the adapter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Several adapters
(:class:`fastpeft.MultiLoRALinear` layers) take PEFT's multi-adapter layout: the adapter
named ``"default"`` in the directory itself, every other one in a subdirectory named
after it, each in that format. fastpeft's layers
use PEFT's attribute names, so a model converted with :func:`fastpeft.from_peft` (still
inside its ``PeftModel``) or injected with :func:`fastpeft.inject` (plain) maps onto those
keys directly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from .config import AdaptionPromptConfig, BottleneckConfig, LoraConfig
from .inject import BOTTLENECK_CHILD, adapter_layers, inject
from .interop import inner_model, is_peft_model
from .nn.adapted_attention import AdaptedAttention
from .nn.bottleneck_adapter import BottleneckAdapter
from .nn.int8_lora_linear import Int8LoRALinear
from .nn.lora_linear import LoRALinear
from .nn.multi_lora_linear import BASE, MultiLoRALinear, check_adapter_name
from .nn.nf4_lora_linear import NF4LoRALinear
from .nn.peft_lora import FusedPeftLora, is_param_wrapper, lora_parts
from .targets import is_lora_layer, param_target_key

__all__ = ["adapter_state_dict", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BOTTLENECK_TYPE = "FASTPEFT_BOTTLENECK"

def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """The adapter tensors of ``model`` under PEFT's keys (see the module docstring). Of
    :class:`fastpeft.MultiLoRALinear` layers: with ``adapter``, that adapter's under the
    keys PEFT saves it with (``...lora_A.weight``), else every adapter's under the keys of
    the state dict (``...lora_A.<adapter>.weight``)."""
    prefix = "" if is_peft_model(model) else PEFT_PREFIX
    state = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, MultiLoRALinear):
            held = layer.adapter_names if adapter is None else \
                [adapter] if adapter in layer.lora_A else []
            tensors = {f"{k}{'' if adapter else '.' + a}.weight": getattr(layer, k)[a].weight
                       for a in held for k in ("lora_A", "lora_B")}
        elif is_lora_layer(layer):  # a nested ParamWrapper's keys have its `.base_layer` too
            parts = lora_parts(layer)
            tensors = {"lora_A.weight": parts.lora_A, "lora_B.weight": parts.lora_B}
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
    (an adaption prompt only with PEFT's convention: scalar gate, no tanh). LoRA on
    parameters (PEFT's ``ParamWrapper``: MoE experts and routers, see
    :class:`fastpeft.LoraConfig`'s ``target_parameters``) is saved as PEFT saves it: the
    tensors under PEFT's keys (``...experts.base_layer.lora_A.weight`` for the inner of two
    nested wrappers) and the parameters' qualified names as ``target_parameters``.
    Bottleneck adapters, which PEFT lacks, use the same layout with ``peft_type``
    ``"FASTPEFT_BOTTLENECK"``. A model with adapters of more than one method is refused:
    PEFT's format holds one method per directory.

    A model with :class:`fastpeft.MultiLoRALinear` layers (:func:`fastpeft.inject` with
    several LoRA configs) is saved in PEFT's multi-adapter layout, as
    ``PeftModel.save_pretrained`` saves a model with several adapters: the adapter named
    ``"default"`` in ``directory``, each other adapter in ``directory/<name>``, each with
    its own ``adapter_config.json`` (its ``r``, ``lora_alpha``, targets, ...). PEFT loads
    them with ``PeftModel.from_pretrained(base, directory)`` (or ``directory/<name>``,
    ``adapter_name=<name>``), then ``load_adapter(directory/<name>, adapter_name=<name>)``.

    A PEFT model (:func:`from_peft`, :func:`fastpeft.patch_peft`) is written by its own
    ``save_pretrained``, whatever it holds: every tensor PEFT saves (``modules_to_save``,
    a classifier head, trained biases, ...) and PEFT's config with its task type; as PEFT
    does, an adapter not named ``"default"`` goes to ``directory/<name>``.
    """
    from safetensors.torch import save_file

    _check_directory(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"directory: {directory} is a file, not a directory")
    if is_peft_model(model):
        # from_peft keeps a PEFT model's layers PEFT's: PEFT's own writer, which knows each
        # adapter's config and every tensor it trains (modules_to_save, a classifier head,
        # biases, embeddings, DoRA), and its task type
        model.save_pretrained(os.fspath(directory))
        return
    multi = _multi_adapters(model)
    if multi:  # PEFT's multi-adapter layout: "default" at the root, the others below it
        for adapter in multi:  # (a name with a path separator would write elsewhere)
            check_adapter_name("model", adapter)
        for adapter in multi:
            out = directory if adapter == "default" else os.path.join(directory, adapter)
            config = _adapter_config(model, adapter)
            state = {k: t.detach().contiguous()
                     for k, t in adapter_state_dict(model, adapter).items()}
            os.makedirs(out, exist_ok=True)
            save_file(state, os.path.join(out, WEIGHTS_NAME), metadata={"format": "pt"})
            with open(os.path.join(out, CONFIG_NAME), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
        return
    config = _adapter_config(model)
    state = {k: t.detach().contiguous() for k, t in adapter_state_dict(model).items()}
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_adapter(model: nn.Module, directory: str | os.PathLike,
                 adapter_name: str | None = None) -> nn.Module:
    """Loads adapters saved by :func:`save_adapter` or by PEFT's ``save_pretrained``
    (LoRA, ``target_parameters`` included, and adaption prompt) into ``model`` and
    returns it.

    A model without adapters of that method gets them first (:func:`fastpeft.inject`
    with the saved configuration). Every adapter tensor of that method must be in the file
    and every tensor of the file must have a place, with the same shape; then the saved
    configuration's hyperparameters (LoRA scaling, rsLoRA, dropout; gate tanh; bottleneck
    activation and scaling) are set on existing layers, and the tensors copied.

    Several named LoRA adapters (:class:`fastpeft.MultiLoRALinear` layers) load from PEFT's
    multi-adapter layout (what ``PeftModel.save_pretrained`` and :func:`save_adapter`
    write for several adapters): the adapter in ``directory`` itself, if any, as
    ``"default"``, and each subdirectory holding an ``adapter_config.json`` as the adapter
    of its name (but not a Trainer checkpoint, one holding ``trainer_state.json``, nor a
    name that cannot be an adapter's, with a ``.``). With no names set
    (:func:`fastpeft.set_adapter_names`), such a model runs ``"default"``, as PEFT runs its
    active adapter. A directory of one adapter loaded into a model holding ``"default"``
    and others needs ``adapter_name`` (``"default"`` to replace it). That
    happens when ``directory`` has such subdirectories, when ``model``
    has ``MultiLoRALinear`` layers already (a single adapter joins them as ``"default"``),
    or with ``adapter_name``: the adapter in ``directory`` itself joins them under that name
    (one adapter saved on its own, served next to others). Adapters the model lacks are
    injected (:func:`fastpeft.inject` with a dict of configs); those it has take the saved
    hyperparameters and tensors.

    A PEFT model (:func:`from_peft`, :func:`fastpeft.patch_peft`) loads LoRA adapters
    through PEFT's own ``load_adapter``, each under its name in the layout (the directory's
    own adapter as ``"default"`` whichever adapter is active, into the active adapter of a
    model without ``"default"``, or as ``adapter_name``), with
    all that only PEFT's layers hold (``modules_to_save``, DoRA, biases, LoRA variants): a
    new adapter joins trainable, its new layers fused; one it holds takes the file's tensors
    and hyperparameters. A file whose tensors are not those the model saves for that adapter
    is refused (PEFT's own load skips such a tensor). A plain model refuses a file that sets
    an option only PEFT's layers implement, naming it.
    """
    from safetensors.torch import load_file

    _check_directory(directory)
    adapters = _saved_adapters(directory, adapter_name)
    if is_peft_model(model) and (adapter_name is not None or set(adapters) - {"default"}
                                  or _saved_config(adapters["default"]).get("peft_type")
                                  == "LORA"):
        # PEFT's own load, each adapter under its name: the root one is "default", whatever
        # adapter the model has active; a model without "default" (one made or loaded under
        # another name) takes a lone root adapter into its active adapter
        if adapter_name is None and set(adapters) == {"default"} \
                and "default" not in model.peft_config:
            adapters = {model.active_adapter: adapters["default"]}
        for adapter, path in adapters.items():
            _load_with_peft(model, path, adapter)
        return model
    if adapter_name is not None or set(adapters) - {"default"} \
            or any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        held = set(_multi_adapters(model))
        if adapter_name is None and set(adapters) == {"default"} and held - {"default"}:
            raise ValueError(
                f"adapter_name: {directory} holds one adapter, which would replace the "
                f"model's 'default' next to {sorted(held - {'default'})}; name it "
                f"(adapter_name='...'; adapter_name='default' to replace 'default')")
        return _load_multi(model, adapters)
    saved = _saved_config(directory)
    config = _config_from_saved(saved)
    kind = _kind_of_config(config)
    present = kind in {_kind(layer) for _, layer in adapter_layers(model)}
    if not present:
        inject(model, config)
    weights = load_file(os.path.join(directory, WEIGHTS_NAME))
    own = {k: t for k, t in adapter_state_dict(model).items() if _key_kind(k) == kind}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"directory: {directory} does not fit the model: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for key, target in own.items():
        if weights[key].shape != target.shape:
            raise ValueError(f"directory: {key} has shape {tuple(weights[key].shape)}, the "
                             f"model's is {tuple(target.shape)}")
    if present:  # the saved configuration decides the existing layers' hyperparameters
        _configure(model, config)
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(weights[key])
    return model


def _check_directory(directory: object) -> None:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path (str or os.PathLike), got "
                        f"{type(directory).__name__}")


# The keys of a saved LoRA config that fastpeft's layers follow (_config_from_saved), and
# those that change nothing in a loaded adapter's forward (metadata; how PEFT initialised
# the weights, which the file holds; options that only qualify another one set). Any other
# key that is set (not None, False, "none" or empty) is an option of PEFT's own layers
# (DoRA, LoRA variants, biases, modules_to_save, layer selection, ...): refused for a plain
# model, loaded by PEFT into a PEFT model.
_LORA_FOLLOWED = frozenset({
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern",
    "alpha_pattern", "target_parameters", "fan_in_fan_out", "fastpeft"})
_LORA_NO_EFFECT = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "init_lora_weights", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
    "qalora_group_size", "ensure_weight_tying"})


def _saved_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``directory``; its absence or bad JSON named."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {directory}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"directory: {path} is not a JSON adapter config: {e}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"directory: {path} holds a JSON {type(saved).__name__}, not an "
                         f"adapter config")
    return saved


def _peft_only(saved: dict[str, Any]) -> list[str]:
    """The options set in a saved LoRA config that only PEFT's layers implement."""
    if saved.get("peft_type") != "LORA":
        return []
    return [k for k, v in saved.items() if k not in _LORA_FOLLOWED | _LORA_NO_EFFECT
            and v and v != "none"]


def _load_with_peft(model: nn.Module, directory: str, adapter: str) -> None:
    """LoRA adapter ``adapter`` from ``directory`` into PEFT model ``model`` by PEFT's own
    ``load_adapter`` (every tensor PEFT saves: ``modules_to_save``, DoRA, biases). A new
    adapter is added trainable (its new layers fused, as ``from_peft`` fuses them:
    :class:`~fastpeft.nn.peft_lora.MixedBatchTraining`); one the model holds takes the
    file's tensors and its LoRA hyperparameters (scaling, rsLoRA, dropout), as
    :func:`load_adapter` sets them. A file whose tensors are not those the model saves for
    that adapter is refused (:func:`_check_peft_keys`), the model left as it was."""
    import inspect

    from peft.tuners.lora import LoraLayer

    saved = _saved_config(directory)
    if saved.get("peft_type") != "LORA":
        raise NotImplementedError(
            f"directory: {directory} holds a {saved.get('peft_type')} adapter; into a PEFT "
            f"model, fastpeft.load_adapter loads named LoRA adapters (PEFT's own "
            f"load_adapter loads the others)")
    present = adapter in model.peft_config
    if present:  # checked before anything changes
        _check_peft_keys(model, directory, adapter)
    quiet = {"strict_adapter_check": "ignore"} if "strict_adapter_check" in \
        inspect.signature(model.load_adapter).parameters else {}
    model.load_adapter(os.fspath(directory), adapter_name=adapter, is_trainable=True, **quiet)
    if not present:
        try:
            _check_peft_keys(model, directory, adapter)
        except ValueError:
            model.delete_adapter(adapter)
            raise
        _train_new_adapter(model, adapter)
        return
    peft_only = _peft_only(saved)
    config = _config_from_saved({k: v for k, v in saved.items() if k not in peft_only})
    for name, layer in inner_model(model).named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            _configure_peft_layer(model, name, layer, config, [adapter])


def _train_new_adapter(model: nn.Module, adapter: str) -> None:
    """Makes the tensors of ``adapter``, just added by PEFT's ``load_adapter(...,
    is_trainable=True)``, trainable where this PEFT (< 0.18, without
    ``PeftModel.set_requires_grad``) leaves an adapter that is not the active one frozen."""
    if hasattr(model, "set_requires_grad"):
        return  # PEFT's load_adapter did it
    from peft.utils.other import ModulesToSaveWrapper

    for m in model.modules():
        attrs = ("modules_to_save",) if isinstance(m, ModulesToSaveWrapper) else \
            getattr(m, "adapter_layer_names", ())
        for attr in attrs:
            holder = getattr(m, attr, None)
            part = holder[adapter] if holder is not None and adapter in holder else None
            for p in part.parameters() if isinstance(part, nn.Module) else \
                    [part] if part is not None else []:
                p.requires_grad_(True)


def _check_peft_keys(model: nn.Module, directory: str, adapter: str) -> None:
    """Refuses a PEFT adapter file whose tensors are not those PEFT model ``model`` saves for
    ``adapter`` (PEFT's own load skips a ``modules_to_save`` tensor the model has no place
    for, without a word)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    # (PEFT < 0.16 also returns other adapters' tensors, under keys that keep their names,
    # where the adapter's name is a substring of the keys: "a" of "base_model")
    others = "|".join(re.escape(a) for a in model.peft_config if a != adapter)
    theirs = re.compile(rf"\.(lora_\w+|modules_to_save)\.({others})(\.|$)") if others else None
    own = {k for k in get_peft_model_state_dict(model, adapter_name=adapter)
           if theirs is None or not theirs.search(k)}
    saved = set(load_peft_weights(directory, device="cpu"))
    missing, unexpected = sorted(own - saved), sorted(saved - own)
    if missing or unexpected:
        raise ValueError(f"directory: {directory} does not fit the model's adapter "
                         f"{adapter!r}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                         f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")


def _multi_adapters(model: nn.Module) -> list[str]:
    """The adapters of ``model``'s :class:`fastpeft.MultiLoRALinear` layers, in the order
    they first appear; ``[]`` where it has none. Refuses other adapters next to them."""
    layers = list(adapter_layers(model))
    multi = [layer for _, layer in layers if isinstance(layer, MultiLoRALinear)]
    if not multi:
        return []
    others = [n for n, layer in layers if not isinstance(layer, MultiLoRALinear)]
    if others:
        raise ValueError(f"model: has MultiLoRALinear layers and other adapter layers "
                         f"({', '.join(others[:3])}); PEFT's multi-adapter layout holds "
                         f"named LoRA adapters only")
    return list(dict.fromkeys(a for layer in multi for a in layer.lora_A))


def _saved_adapters(directory: str | os.PathLike,
                    adapter_name: str | None) -> dict[str, str]:
    """adapter name -> its directory, in PEFT's multi-adapter layout (see
    :func:`load_adapter`); with ``adapter_name``, the adapter in ``directory`` alone."""
    root = os.path.isfile(os.path.join(directory, CONFIG_NAME))
    if adapter_name is not None:
        check_adapter_name("adapter_name", adapter_name)
        if not root:
            raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {directory}")
        return {adapter_name: os.fspath(directory)}
    adapters = {"default": os.fspath(directory)} if root else {}
    if os.path.isdir(directory):
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            # (a Trainer's checkpoint-<step> subdirectories hold an adapter too: not ours;
            # nor is a name that cannot be an adapter's, such as "v1.bak")
            if entry != "default" and "." not in entry and entry != BASE \
                    and os.path.isfile(os.path.join(path, CONFIG_NAME)) \
                    and not os.path.isfile(os.path.join(path, "trainer_state.json")):
                adapters[entry] = path
    if not adapters:  # the error of a single directory, as before
        adapters["default"] = os.fspath(directory)
    return adapters


def _load_multi(model: nn.Module, adapters: dict[str, str]) -> nn.Module:
    """:func:`load_adapter` of named LoRA adapters into :class:`fastpeft.MultiLoRALinear`
    layers."""
    from safetensors.torch import load_file

    if is_peft_model(model):
        raise ValueError("model: a PEFT model loads more adapters with its own "
                         "load_adapter(directory, adapter_name=...); fastpeft.load_adapter "
                         "loads several into a plain model")
    configs = {}
    for adapter, path in adapters.items():
        config = _config_from_saved(_saved_config(path))
        if not isinstance(config, LoraConfig):
            raise NotImplementedError(f"directory: {path} holds a {_kind_of_config(config)} "
                                      f"adapter; several named adapters are LoRA only")
        configs[adapter] = config
    present = set(_multi_adapters(model))
    new = {a: c for a, c in configs.items() if a not in present}
    if new:
        inject(model, new)
    weights = {a: load_file(os.path.join(path, WEIGHTS_NAME)) for a, path in adapters.items()}
    owns = {a: adapter_state_dict(model, a) for a in adapters}
    for adapter, own in owns.items():
        missing = sorted(set(own) - set(weights[adapter]))
        unexpected = sorted(set(weights[adapter]) - set(own))
        if missing or unexpected:
            raise ValueError(f"directory: {adapters[adapter]} (adapter {adapter!r}) does not "
                             f"fit the model: missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unexpected "
                             f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for key, target in own.items():
            if weights[adapter][key].shape != target.shape:
                raise ValueError(f"directory: {key} of adapter {adapter!r} has shape "
                                 f"{tuple(weights[adapter][key].shape)}, the model's is "
                                 f"{tuple(target.shape)}")
    for name, layer in inner_model(model).named_modules():
        if isinstance(layer, MultiLoRALinear):  # the saved hyperparameters
            for adapter in present & set(configs) & set(layer.lora_A):
                config = configs[adapter]
                r, alpha = config.rank_and_alpha(name)  # r == layer.r[adapter]: shapes fit
                layer.lora_alpha[adapter], layer.use_rslora[adapter] = alpha, config.use_rslora
                layer.scaling[adapter] = alpha / (math.sqrt(r) if config.use_rslora else r)
                layer.lora_dropout[adapter] = float(config.lora_dropout)
    with torch.no_grad():
        for adapter, own in owns.items():
            for key, target in own.items():
                target.copy_(weights[adapter][key])
    return model


def _configure(model: nn.Module, config: Any) -> None:
    names = {id(m): n for n, m in inner_model(model).named_modules()}
    for _, layer in adapter_layers(model):
        name = names[id(layer)]
        if isinstance(layer, (LoRALinear, Int8LoRALinear, NF4LoRALinear)) \
                and isinstance(config, LoraConfig):
            r, alpha = config.rank_and_alpha(name)  # r == layer.r: the shapes fit
            layer.lora_alpha, layer.use_rslora = alpha, config.use_rslora
            layer.scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
            layer.lora_dropout = float(config.lora_dropout)
        elif isinstance(layer, FusedPeftLora) and isinstance(config, LoraConfig):
            _configure_peft_layer(model, name, layer, config)
        elif is_param_wrapper(layer) and isinstance(config, LoraConfig):
            # PEFT's per-adapter dicts (its dropout is always 0: PEFT refuses any other)
            r, alpha = config.rank_and_alpha(param_target_key(name, layer))
            for a in [a for a in layer.active_adapters if a in layer.lora_A]:
                layer.lora_alpha[a] = alpha
                layer.scaling[a] = alpha / (math.sqrt(r) if config.use_rslora else r)
                if isinstance(getattr(layer, "use_rslora", None), dict):
                    layer.use_rslora[a] = config.use_rslora
        elif isinstance(layer, AdaptedAttention) and isinstance(config, AdaptionPromptConfig):
            layer.gate_tanh = config.gate_tanh
        elif isinstance(layer, BottleneckAdapter) and isinstance(config, BottleneckConfig):
            layer.activation, layer.scaling = config.activation, float(config.scaling)


def _configure_peft_layer(model: nn.Module, name: str, layer: nn.Module,
                          config: LoraConfig, adapters: list[str] | None = None) -> None:
    """The saved LoRA hyperparameters on a PEFT layer's ``adapters`` (default: its active
    ones): their scaling, rsLoRA, dropout, and in the PEFT model's config of each, which its
    saving writes."""
    r, alpha = config.rank_and_alpha(name)  # r == the layer's: the shapes fit
    for a in [a for a in (adapters or layer.active_adapters) if a in layer.lora_A]:
        layer.lora_alpha[a] = alpha
        layer.scaling[a] = alpha / (math.sqrt(r) if config.use_rslora else r)
        if isinstance(getattr(layer, "use_rslora", None), dict):
            layer.use_rslora[a] = config.use_rslora
        p = float(config.lora_dropout)
        layer.lora_dropout[a] = (nn.Dropout(p) if p > 0 else nn.Identity()).train(layer.training)
        peft_config = getattr(model, "peft_config", {}).get(a)
        if peft_config is not None:
            peft_config.lora_alpha, peft_config.use_rslora = config.lora_alpha, config.use_rslora
            peft_config.lora_dropout = p
            peft_config.alpha_pattern = dict(config.alpha_pattern)


def _kind(layer: nn.Module) -> str:
    if is_lora_layer(layer):
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


def _adapter_config(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``model``'s adapters; of its ``MultiLoRALinear``
    layers, that of the one named ``adapter`` (the layers holding it)."""
    layers = list(adapter_layers(model))
    if adapter is not None:
        layers = [(n, layer) for n, layer in layers
                  if isinstance(layer, MultiLoRALinear) and adapter in layer.lora_A]
    kinds = {_kind(layer) for _, layer in layers}
    if not layers:
        raise ValueError("model: has no fastpeft adapters to save")
    if len(kinds) > 1:
        raise ValueError(f"model: has adapters of several methods ({sorted(kinds)}); "
                         f"PEFT's format holds one method per directory")
    base = inner_model(model)
    names = {id(m): n for n, m in base.named_modules()}
    common = {
        "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path",
                                           None) or None,
        "inference_mode": True,
        "revision": None,
        "task_type": _task_type(base),
    }
    (kind,) = kinds
    if kind == "LORA":
        return {**common, **_lora_config(layers, names, adapter)}
    if kind == "ADAPTION_PROMPT":
        first = layers[0][1]
        config = {**common, "peft_type": "ADAPTION_PROMPT", "adapter_len": first.adapter_len,
                  "adapter_layers": len(layers),
                  "target_modules": names[id(first)].rpartition(".")[2]}
        if first.adaption_gate.numel() > 1 or first.gate_tanh:  # not PEFT's convention
            config["fastpeft"] = {"gate": "per_head" if first.adaption_gate.numel() > 1
                                  else "scalar", "gate_tanh": first.gate_tanh}
        return config
    return {**common, "peft_type": BOTTLENECK_TYPE, "fastpeft": _bottleneck_config(layers)}


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers generative model (which picks the PeftModel
    class, with its ``generate``, on loading): ``"CAUSAL_LM"`` (GPT-2's
    ``GPT2LMHeadModel`` included) or ``"SEQ_2_SEQ_LM"``; else None."""
    name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover - transformers is there for any such model
        return "CAUSAL_LM" if name.endswith("ForCausalLM") else None
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
        return "SEQ_2_SEQ_LM"
    return None


def _lora_config(layers: list[tuple[str, nn.Module]], names: dict[int, str],
                 adapter: str | None = None) -> dict:
    # names in the base; a ParamWrapper's is its parameter's qualified name, as PEFT's
    # target_parameters and rank_pattern name it
    full = {param_target_key(names[id(layer)], layer) if is_param_wrapper(layer)
            else names[id(layer)]: lora_parts(layer, adapter) for _, layer in layers}
    wrapped = {param_target_key(names[id(layer)], layer)
               for _, layer in layers if is_param_wrapper(layer)}
    r = Counter(p.r for p in full.values()).most_common(1)[0][0]
    alpha = Counter(p.lora_alpha for p in full.values()).most_common(1)[0][0]
    dropouts = {p.lora_dropout for p in full.values()}
    rslora = {p.use_rslora for p in full.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError("model: its LoRA layers differ in lora_dropout or use_rslora, which "
                         "PEFT's config cannot express")
    # a ParamWrapper keeps its float parameter under a quantised base (fastpeft.LoraConfig)
    base_dtypes = {_base_dtype(layer) for _, layer in layers if not is_param_wrapper(layer)}
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(), "target_modules": sorted(set(full) - wrapped),
        "bias": "none",
        # PEFT sets it per layer from the layer type (with a warning where it disagrees)
        "fan_in_fan_out": any(p.fan_in_fan_out for p in full.values()),
        "init_lora_weights": True, "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {n: p.r for n, p in full.items() if p.r != r},
        "alpha_pattern": {n: p.lora_alpha for n, p in full.items() if p.lora_alpha != alpha},
    }
    if wrapped:  # PEFT before 0.17 knows no such key: only where there are some
        config["target_parameters"] = sorted(wrapped)
    if len(base_dtypes) == 1 and None not in base_dtypes:
        # extra keys make PEFT warn: only when there is something to say
        config["fastpeft"] = {"base_dtype": base_dtypes.pop()}
    return config


def _base_dtype(layer: nn.Module) -> str | None:
    """The :class:`LoraConfig` ``base_dtype`` a LoRA layer's base has."""
    if isinstance(layer, Int8LoRALinear):
        return "int8"
    if isinstance(layer, NF4LoRALinear):
        return "nf4"
    return None


def _bottleneck_config(layers: list[tuple[str, nn.Module]]) -> dict:
    first = layers[0][1]
    placements = {getattr(layer, "placement", None) for _, layer in layers}
    if None in placements:
        raise ValueError("model: a BottleneckAdapter not placed by fastpeft.inject has no "
                         "placement to save")
    return {"placements": sorted(placements),
            "activation": first.activation, "layer_norm": first.ln_weight is not None,
            "bottleneck_size": first.bottleneck_size, "scaling": first.scaling}


def _config_from_saved(saved: dict[str, Any]):
    extra = saved.get("fastpeft") or {}
    kind = saved.get("peft_type")
    # fan_in_fan_out follows from the layer type (Conv1D) here, as PEFT corrects it too
    unsupported = _peft_only(saved)
    if unsupported:
        raise NotImplementedError(f"directory: the adapter sets {', '.join(unsupported)}, "
                                  f"which fastpeft's layers do not support (a PEFT model, "
                                  f"fastpeft.from_peft, loads it)")
    if kind == "LORA":
        return LoraConfig(
            r=saved["r"], lora_alpha=saved["lora_alpha"],
            lora_dropout=saved.get("lora_dropout", 0.0),
            target_modules=saved["target_modules"], use_rslora=saved.get("use_rslora", False),
            base_dtype=extra.get("base_dtype"), rank_pattern=saved.get("rank_pattern") or {},
            alpha_pattern=saved.get("alpha_pattern") or {},
            target_parameters=saved.get("target_parameters") or None)
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

