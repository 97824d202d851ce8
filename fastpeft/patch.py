"""``patch_peft()`` / ``unpatch_peft()``: every PEFT LoRA and adaption-prompt layer created
afterwards is fastpeft's fused layer, wherever it is created (``get_peft_model``,
``PeftModel.from_pretrained``, ``add_adapter`` / ``load_adapter``, and so the Hugging Face
``Trainer`` and TRL's ``SFTTrainer`` given a ``peft_config``).

Two methods of PEFT's own classes are wrapped, nothing else (no torch or transformers
state):

- ``peft.tuners.lora.LoraModel._create_and_replace``, which every LoRA layer PEFT makes goes
  through (and every adapter added to an existing one): where it put a new layer in place,
  that layer gets the fused forward as :func:`fastpeft.from_peft` gives it
  (:func:`fastpeft.interop.fuse_lora_layer`: the layer keeps its class's PEFT behaviour,
  parameters and state-dict keys; DoRA, LoRA biases and other LoRA variants, embeddings
  and other layer types keep PEFT's forward, with one warning per kind). An adapter added
  to an existing layer leaves that layer as it was: fused if it was made under the patch,
  PEFT's if not. The ``LoraModel`` itself then takes mixed-adapter batches in training
  too, as :func:`fastpeft.from_peft` makes it
  (:class:`fastpeft.nn.peft_lora.MixedBatchTraining`);
- ``peft.tuners.adaption_prompt.model.AdaptionPromptModel._create_adapted_attentions``,
  which makes the adaption-prompt attentions of each new adapter: after it, each becomes
  :class:`fastpeft.nn.AdaptedAttention` holding PEFT's very parameters (PEFT's swapping of
  adapters in and out works on it unchanged: it wraps the attention as ``.model`` too).

Each wrapper carries the method it wraps (``__wrapped__``), so the patch lives on PEFT's
classes only: applying it twice finds it there and does nothing, and unpatching puts the
wrapped methods back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ._warn import warn_once

__all__ = ["patch_peft", "peft_patched", "unpatch_peft"]

# (module, class, method): the PEFT methods the patch wraps
_TARGETS = (
    ("peft.tuners.lora.model", "LoraModel", "_create_and_replace"),
    ("peft.tuners.adaption_prompt.model", "AdaptionPromptModel", "_create_adapted_attentions"),
)
_MARK = "__fastpeft_patch__"


def patch_peft() -> None:
    """Makes PEFT build fastpeft's fused layers: every LoRA layer (on ``nn.Linear``, GPT-2's
    ``Conv1D``, bnb ``Linear8bitLt`` / NF4 ``Linear4bit``) and adaption-prompt attention made
    from now on is the one :func:`fastpeft.from_peft` would make of it, so models built
    inside a trainer (``Trainer``, TRL's ``SFTTrainer`` with a ``peft_config``) train with
    the fused kernels, and save, load and merge as PEFT's do (the adapter files are PEFT's,
    unchanged). Models built before are left as they are (:func:`fastpeft.from_peft`
    converts one). What the fused layers do not cover keeps PEFT's layer, with one warning
    per kind, where :func:`fastpeft.from_peft` would refuse or warn: DoRA, LoRA biases,
    embeddings and other layer types; an adaption prompt on an attention fastpeft does not
    wrap.

    Calling it again does nothing; :func:`unpatch_peft` undoes it. It changes PEFT's
    ``LoraModel`` and ``AdaptionPromptModel`` classes only (see the module docstring), so it
    composes with patches of other modules, e.g. Liger-Kernel's (norms, RoPE, MLP, loss).
    Raises ``ImportError`` where PEFT is not installed or lacks a method it wraps.
    """
    wrapped = [(cls, method, _WRAPPERS[method](cls.__dict__[method]))
               for cls, method in _methods() if not getattr(cls.__dict__[method], _MARK, False)]
    for cls, method, wrapper in wrapped:  # all wrappers made first: nothing changes on error
        setattr(cls, method, wrapper)


def unpatch_peft() -> None:
    """Undoes :func:`patch_peft`: models PEFT creates afterwards get PEFT's own layers again
    (layers already fused stay fused). Does nothing where PEFT is not patched."""
    for cls, method in _methods():
        current = cls.__dict__[method]
        if getattr(current, _MARK, False):
            setattr(cls, method, current.__wrapped__)


def peft_patched() -> bool:
    """Whether :func:`patch_peft` is in effect."""
    return all(getattr(cls.__dict__[method], _MARK, False) for cls, method in _methods())


def _methods() -> list[tuple[type, str]]:
    try:
        import peft
    except ImportError as err:
        raise ImportError("patch_peft needs peft (pip install fastpeft[hf])") from err
    found = []
    for module, cls_name, method in _TARGETS:
        cls = getattr(importlib.import_module(module), cls_name, None)
        if cls is None or method not in cls.__dict__:
            raise ImportError(f"patch_peft: peft {peft.__version__} has no "
                              f"{cls_name}.{method} to patch (fastpeft supports peft>=0.15.2)")
        found.append((cls, method))
    return found


def _mark(wrapper: Callable, original: Callable) -> Callable:
    functools.update_wrapper(wrapper, original)  # also sets __wrapped__ = original
    setattr(wrapper, _MARK, True)
    return wrapper


def _wrap_create_and_replace(original: Callable) -> Callable:
    if not {"parent", "target_name"} <= inspect.signature(original).parameters.keys():
        raise ImportError("patch_peft: this peft's LoraModel._create_and_replace takes no "
                          "(parent, target_name): a version fastpeft does not know")

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> Any:
        from .nn.peft_lora import fuse_lora_model

        result = create_and_fuse(functools.partial(original, self), self.peft_config,
                                 "patch_peft", *args, **kwargs)
        fuse_lora_model(self)  # mixed-adapter batches in training too, as from_peft's
        return result

    return _mark(_create_and_replace, original)


def create_and_fuse(create: Callable, configs: dict[str, Any], who: str,
                    *args: Any, **kwargs: Any) -> Any:
    """Calls ``create``, PEFT's ``LoraModel._create_and_replace`` bound to its model, with
    ``args`` and ``kwargs``; where it put a new layer in place (not one more adapter on an
    existing layer), that layer gets the fused forward (:func:`fastpeft.interop.fuse_lora_layer`;
    ``configs``: the model's ``peft_config``), or keeps PEFT's with one warning per kind,
    which names ``who`` (the caller: ``patch_peft``, ``add_adapter``)."""
    bound = inspect.signature(create).bind(*args, **kwargs).arguments
    parent, child = bound["parent"], bound["target_name"]
    before = getattr(parent, child, None)
    result = create(*args, **kwargs)
    layer = getattr(parent, child, None)
    if layer is not before:
        _fuse_created_lora(layer, configs, who)
    return result


def _wrap_create_adapted_attentions(original: Callable) -> Callable:
    def _create_adapted_attentions(self, config: Any, parents: list[nn.Module]) -> Any:
        result = original(self, config, parents)
        for parent in parents:
            _convert_created_attention(parent, config.target_modules)
        return result

    return _mark(_create_adapted_attentions, original)


_WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "_create_and_replace": _wrap_create_and_replace,
    "_create_adapted_attentions": _wrap_create_adapted_attentions,
}


def _fuse_created_lora(layer: nn.Module | None, configs: dict[str, Any], who: str) -> None:
    from peft.tuners.lora import LoraLayer

    from .interop import fuse_lora_layer
    from .nn.peft_lora import all_plain_lora

    if isinstance(layer, LoraLayer) and not fuse_lora_layer(layer, configs):
        base = type(layer.get_base_layer()).__name__
        kind = f"{type(layer).__name__} on {base}" if all_plain_lora(layer) else \
            "DoRA / LoRA bias / LoRA variant / tensor scaling"
        warn_once(f"created:{kind}", f"{who}: PEFT LoRA layers ({kind}) keep PEFT's "
                  f"forward: the fused kernels do not cover them", stacklevel=4)


def _convert_created_attention(parent: nn.Module, child: str) -> None:
    from .interop import convert_adapted_attention, peft_adapted_attention_classes

    layer = getattr(parent, child)
    if not isinstance(layer, peft_adapted_attention_classes()):
        return
    try:
        adapted = convert_adapted_attention(child, layer)
    except (NotImplementedError, ValueError) as err:  # what from_peft refuses
        warn_once(f"patch:attention:{type(layer.model).__name__}",
                  f"patch_peft: PEFT's adaption prompt on {type(layer.model).__name__} keeps "
                  f"PEFT's attention: {err}", stacklevel=3)
        return
    setattr(parent, child, adapted)
