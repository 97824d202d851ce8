"""PEFT's own LoRA layers with fastpeft's fused forward (what :func:`fastpeft.from_peft`
turns them into), PEFT's ``ParamWrapper`` (LoRA on a parameter, which keeps PEFT's
forward), and one view of the LoRA hyperparameters of any of these layers."""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._warn import warn_once
from ..ops.int8_lora_linear import int8_lora_linear
from ..ops.lora_linear import lora_linear
from ..ops.multi_lora_linear import multi_lora_linear
from ..ops.nf4_lora_linear import nf4_lora_linear
from .int8_lora_linear import Int8LoRALinear, bnb_int8_weight, is_bnb, is_bnb_int8
from .lora_linear import LoRALinear, autocast_dtype, is_conv1d, own_forward
from .multi_lora_linear import MultiLoRALinear, per_row_ids, stack_adapters_cached, without_caches
from .nf4_lora_linear import NF4LoRALinear, bnb_nf4_problem, bnb_nf4_weight, is_bnb_4bit

__all__ = ["FusedPeftLora", "LoraParts", "MixedBatchTraining", "all_plain_lora",
           "fuse_lora_model", "fuse_peft_lora", "fused_base", "is_param_wrapper", "lora_parts",
           "mixed_batch_problem", "param_wrapper_class", "plain_lora", "weights_readable"]

#: Where PEFT keeps ``ParamWrapper`` (PEFT >= 0.17), LoRA on an ``nn.Parameter``.
_PARAM_WRAPPER = ("peft.tuners.lora.layer", "ParamWrapper")
#: The oldest PEFT with ``ParamWrapper``, for the error that asks to install it.
PARAM_WRAPPER_PEFT = "peft>=0.17"

# PEFT layer classes that get a fused forward: name of the fused class -> (module, class)
_PEFT_CLASSES = {
    "FusedLinear": ("peft.tuners.lora.layer", "Linear"),
    "FusedLinear8bitLt": ("peft.tuners.lora.bnb", "Linear8bitLt"),
    "FusedLinear4bit": ("peft.tuners.lora.bnb", "Linear4bit"),
}
# and PEFT's LoRA model (a PEFT model's base_model), for mixed batches in training
_LORA_MODEL = {"FusedLoraModel": ("peft.tuners.lora.model", "LoraModel")}


class FusedPeftLora:
    """Mixed into a PEFT LoRA layer's class by :func:`fastpeft.from_peft` (and
    :func:`fastpeft.patch_peft`): the layer stays PEFT's (its parameters, adapters,
    ``merge``, state-dict keys and saving are untouched) and its forward runs fastpeft's
    fused op for the one active adapter. PEFT's own forward runs wherever the fused one does
    not apply: adapters disabled or merged, several active, DoRA, a LoRA bias or another
    LoRA variant (:func:`plain_lora`); and, with one warning per process, wherever reading
    the weights without calling their modules would bypass what a distributed engine or
    offloading put on them (:func:`weights_readable`: DeepSpeed ZeRO-3's gathering hooks,
    accelerate's offloading, a base layer sharded by itself). Per-sample ``adapter_names``
    (PEFT's mixed batch) run :func:`fastpeft.multi_lora_linear` where they can
    (:meth:`_mixed_batch`)."""

    def __getstate__(self) -> dict:
        return without_caches(super().__getstate__())

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not args and kwargs.keys() == {"adapter_names"}:
            y = self._mixed_batch(x, kwargs["adapter_names"])
            if y is not None:
                return y
        elif self.training and self.__dict__.get("_fastpeft_mixed_training"):
            self._check_not_recomputed()
        base = self.get_base_layer()
        a = self._fused_adapter(args, kwargs, base)
        if a is None or not fused_base(base):
            return super().forward(x, *args, **kwargs)
        if not (weights_readable(base) and weights_readable(self.lora_A[a])
                and weights_readable(self.lora_B[a])):
            _warn_hooked_once()
            return super().forward(x, *args, **kwargs)
        dtype = autocast_dtype(x)
        if dtype is None:
            return self._fused_forward(x, a, base, None)
        # under autocast, as PEFT's layers run there: every matmul in autocast's dtype
        with torch.autocast(x.device.type, enabled=False):
            return self._fused_forward(x.to(dtype), a, base, dtype)

    def _fused_forward(self, x: Tensor, a: str, base: nn.Module,
                       dtype: torch.dtype | None) -> Tensor:
        """The fused op on ``base`` and adapter ``a``; ``dtype``: autocast's, else None (the
        base weight's dtype)."""
        lora_A, lora_B = self.lora_A[a].weight, self.lora_B[a].weight
        p = _dropout_p(self.lora_dropout[a])
        if is_bnb_4bit(base):
            # bitsandbytes NF4 (QLoRA), in the activations' dtype: the codes read in place, a
            # double-quantised absmax dequantised each call (as bitsandbytes' forward does)
            qweight, absmax, blocksize = bnb_nf4_weight(base)
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return nf4_lora_linear(x, qweight, absmax, bias, lora_A.to(x.dtype),
                                   lora_B.to(x.dtype), self.scaling[a], p, self.training,
                                   blocksize)
        if is_bnb(base):
            # bitsandbytes int8, computed as weight-only int8 in the activations' dtype (its
            # threshold / outlier decomposition is not reproduced)
            qweight, scb = bnb_int8_weight(base)
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return int8_lora_linear(x, qweight, scb.float() / 127.0, bias, lora_A.to(x.dtype),
                                    lora_B.to(x.dtype), self.scaling[a], p, self.training)
        weight, bias, dtype = _base_operands(base, dtype)
        return lora_linear(x, weight, bias, lora_A.to(dtype), lora_B.to(dtype),
                           self.scaling[a], p, self.training)

    def _mixed_batch(self, x: Tensor, adapter_names: list[str]) -> Tensor | None:
        """PEFT's mixed batch (``adapter_names``: one adapter name per sample, ``"__base__"``
        for none) as one :func:`fastpeft.multi_lora_linear` call: the base GEMM once, each
        adapter on its own rows, in training as in inference. ``None`` where PEFT's own
        forward must run (its checks and refusals included): adapters disabled or merged, a
        bitsandbytes base, another tuner's layer as ``base_layer``, an adapter named that
        is not plain LoRA (:func:`plain_lora`), hooked weights."""
        base = self.get_base_layer()
        if (self.disable_adapters or self.merged or is_bnb(base) or x.dim() < 2
                or len(adapter_names) != x.shape[0] or self.base_layer is not base
                or not fused_base(base)):
            return None
        names = [a for a in dict.fromkeys(adapter_names) if a in self.lora_A]
        if not all(plain_lora(self, a) for a in names):
            return None
        modules = [base, *(self.lora_A[a] for a in names), *(self.lora_B[a] for a in names)]
        if not all(weights_readable(m) for m in modules):
            _warn_hooked_once()
            return None
        dropouts = {a: _dropout_p(self.lora_dropout[a]) for a in names}
        if self.training and len(set(dropouts.values())) > 1:
            raise ValueError(
                "adapter_names: one fused mixed batch applies one dropout probability, but the "
                f"adapters named have different lora_dropout {dropouts}; train them in "
                "separate batches, or give them the same lora_dropout")
        if self.training and not torch.compiler.is_compiling():
            self.__dict__["_fastpeft_mixed_training"] = True  # (see _check_not_recomputed)
        dtype = autocast_dtype(x)
        if dtype is None:
            return self._mixed_forward(x, adapter_names, names, dropouts, base, None)
        with torch.autocast(x.device.type, enabled=False):
            return self._mixed_forward(x.to(dtype), adapter_names, names, dropouts, base, dtype)

    def _check_not_recomputed(self) -> None:
        """After a mixed training batch, a training forward without ``adapter_names`` that
        runs inside backward is activation checkpointing's recomputation of that batch
        (``torch.utils.checkpoint``, a ``checkpoint_wrapper`` as FSDP applies it), which PEFT
        runs without the batch's names: every row would get the active adapter, and the
        gradients would be wrong. Refused; a plain training forward ends the watch."""
        if torch.compiler.is_compiling():
            return
        if torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                "adapter_names: this layer ran a mixed training batch whose forward runs "
                "again in backward (activation checkpointing) without its adapter_names, "
                "which would give every row the active adapter; disable activation "
                "checkpointing for mixed batches, or use fastpeft.inject with "
                "fastpeft.set_adapter_names, whose names stay set")
        self.__dict__["_fastpeft_mixed_training"] = False

    def _mixed_forward(self, x: Tensor, adapter_names: list[str], names: list[str],
                       dropouts: dict[str, float], base: nn.Module,
                       dtype: torch.dtype | None) -> Tensor:
        weight, bias, dtype = _base_operands(base, dtype)
        if not names:  # no adapter of this layer named: the base alone
            return nn.functional.linear(x, weight, bias)
        ids = per_row_ids(adapter_names, names, x)
        lora_A, lora_B, scaling = stack_adapters_cached(
            self, [self.lora_A[a].weight for a in names], [self.lora_B[a].weight for a in names],
            [self.scaling[a] for a in names], dtype)
        p = dropouts[names[0]]
        return multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, ids, p, self.training)

    def _fused_adapter(self, args: tuple, kwargs: dict, base: nn.Module) -> str | None:
        """The one active adapter the fused op computes on ``base`` (the innermost base
        layer), or None: also where ``base_layer`` is another tuner's layer (a PEFT mixed
        model's LoRA on a LoHa, LoKr, AdaLoRA, ... layer), whose forward the fused op,
        reading ``base``, would skip (as :meth:`_mixed_batch` does)."""
        if args or kwargs or self.disable_adapters or self.merged or self.base_layer is not base:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        (a,) = active
        return a if plain_lora(self, a) else None


def plain_lora(layer: nn.Module, adapter: str) -> bool:
    """Whether PEFT LoRA ``layer``'s ``adapter`` is plain LoRA, what the fused ops compute:
    not DoRA, a LoRA bias or another of PEFT's LoRA variants (``lora_variant``: aLoRA's
    activation from its invocation tokens on, and the like), with a float scaling (PEFT's
    ``prepare_model_for_compiled_hotswap`` makes it a tensor, which PEFT's forward takes)."""
    return not (layer.use_dora.get(adapter) or getattr(layer, "lora_bias", {}).get(adapter)
                or adapter in getattr(layer, "lora_variant", {})
                or isinstance(layer.scaling.get(adapter), torch.Tensor))


def all_plain_lora(layer: nn.Module) -> bool:
    """Whether every adapter of PEFT LoRA ``layer`` is plain LoRA (:func:`plain_lora`)."""
    return all(plain_lora(layer, a) for a in layer.lora_A)


def fused_base(base: nn.Module) -> bool:
    """Whether the fused forward computes a PEFT LoRA layer on ``base``: an ``nn.Linear``,
    GPT-2's ``Conv1D``, a bitsandbytes int8 ``Linear8bitLt`` or NF4 ``Linear4bit`` (uint8
    storage, quantised; not FP4, whose layers keep PEFT's forward); not a subclass of
    ``nn.Linear`` with a forward of its own (:func:`own_forward`), which PEFT's forward
    calls."""
    if is_bnb(base):
        return is_bnb_int8(base) or (is_bnb_4bit(base) and bnb_nf4_problem(base) is None)
    return (is_conv1d(base) or isinstance(base, nn.Linear)) and not own_forward(base)


def _base_operands(base: nn.Module,
                   dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None, torch.dtype]:
    """A float base layer's ``(weight (out, in), bias, dtype)`` for the fused ops: PEFT's
    fan_in_fan_out (GPT-2's Conv1D) ``(in, out)`` weight as its transposed view, read in
    place; cast to ``dtype`` (autocast's) when given, else in the weight's own dtype."""
    weight = base.weight.t() if is_conv1d(base) else base.weight
    bias = base.bias
    if dtype is None:
        return weight, bias, weight.dtype
    return weight.to(dtype), None if bias is None else bias.to(dtype), dtype


def weights_readable(module: nn.Module) -> bool:
    """Whether a fused forward may read ``module``'s own parameters instead of calling it.

    Not where calling it does more than its forward: hooks (DeepSpeed ZeRO-3 gathers a
    module's parameters in its forward pre-hook and releases them in its post-hook; FSDP2
    does the same on a module sharded by itself) or a forward replaced on the instance
    (accelerate's offloading hooks); nor where a parameter is not there in full: empty
    (ZeRO-3 outside its gather, FSDP1 outside forward), on the meta device, a ZeRO-3
    parameter (``ds_id``) or a ``DTensor``. FSDP2 sharding a decoder layer (as accelerate
    and the Hugging Face Trainer do) leaves its sublayers' parameters unsharded, plain
    tensors during the layer's forward: readable."""
    if (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
            or module._backward_hooks or "forward" in module.__dict__):
        return False
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    for p in module._parameters.values():
        if p is None:
            continue
        if p.numel() == 0 or p.is_meta or hasattr(p, "ds_id") \
                or (dtensor is not None and isinstance(p, dtensor)):
            return False
    return True


def _warn_hooked_once() -> None:
    warn_once("hooked", "fastpeft: a PEFT LoRA layer's base or LoRA weights are managed by "
              "hooks or not materialised (DeepSpeed ZeRO-3, offloading, per-layer sharding): "
              "PEFT's own forward runs there instead of the fused one", stacklevel=3)


def fuse_peft_lora(layer: nn.Module) -> bool:
    """Gives a PEFT LoRA layer (on ``nn.Linear``, bitsandbytes ``Linear8bitLt`` or NF4
    ``Linear4bit``) the fused forward by switching its class to a subclass of its own; False
    for other layers, for bitsandbytes bases the fused ops do not read (FP4, codes not
    stored as uint8) and for ``nn.Linear`` subclasses with a forward of their own
    (:func:`fused_base`)."""
    for name, (module, cls_name) in _PEFT_CLASSES.items():
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        if type(layer) is cls:
            base = layer.get_base_layer()
            if (is_bnb(base) or own_forward(base)) and not fused_base(base):
                return False
            layer.__class__ = _fused_class(name)
            return True
    return isinstance(layer, FusedPeftLora)


_FUSED: dict[str, type] = {}


def _fused_class(name: str) -> type:
    """The fused subclass ``name`` of its PEFT class. Its ``__name__`` is PEFT's own
    (``Linear``, ``LoraModel``, ...), so that reprs, ``get_layer_status()``'s
    ``module_type`` ("lora.Linear") and ``get_model_status()`` read as PEFT's do; its
    ``__qualname__`` is ``name``, by which pickle finds it here (:func:`__getattr__`)."""
    if name not in _FUSED:
        module, cls_name = (_PEFT_CLASSES | _LORA_MODEL)[name]
        base = getattr(importlib.import_module(module), cls_name)
        mixin = MixedBatchTraining if name == "FusedLoraModel" else FusedPeftLora
        _FUSED[name] = type(cls_name, (mixin, base), {"__module__": __name__,
                                                      "__qualname__": name})
    return _FUSED[name]


def __getattr__(name: str) -> type:
    """The fused classes are made on first use (PEFT is optional): this lets pickle find
    them by name too (``torch.save`` of a converted model)."""
    if name in _PEFT_CLASSES or name in _LORA_MODEL:
        return _fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MixedBatchTraining:
    """Mixed into PEFT's ``LoraModel`` class by :func:`fastpeft.from_peft` (and
    :func:`fastpeft.patch_peft`):

    - a mixed batch (``model(..., adapter_names=[...])``) is also accepted in training mode
      when every LoRA layer of the model runs fastpeft's fused mixed batch
      (:func:`mixed_batch_problem`), where each adapter gets the gradient of its own rows
      (the same as training each sub-batch on its own). PEFT refuses ``adapter_names`` in
      training mode; everything else about the call is PEFT's. A call that raises leaves no
      ``adapter_names`` hook behind on the layers (PEFT's own context removes its hooks only
      after a call that returns);
    - a LoRA layer PEFT makes later in the model (``add_adapter`` / ``load_adapter`` of an
      adapter that targets other modules) gets the fused forward as ``from_peft`` gives it,
      or keeps PEFT's with one warning per kind (DoRA, embeddings, ...).
    """

    def _create_and_replace(self, *args, **kwargs):
        from ..patch import create_and_fuse

        return create_and_fuse(super()._create_and_replace, self.peft_config, "add_adapter",
                               *args, **kwargs)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        hooks = super()._enable_peft_forward_hooks
        if kwargs.get("adapter_names") is None:
            with hooks(*args, **kwargs):
                yield
            return
        try:
            with contextlib.ExitStack() as stack:
                if self.training:
                    problem = mixed_batch_problem(self)
                    if problem is not None:
                        raise ValueError(f"adapter_names: a mixed batch in training mode {problem}")
                    self.training = False  # PEFT's refusal reads this module's own flag only
                    try:
                        stack.enter_context(hooks(*args, **kwargs))
                    finally:
                        self.training = True
                else:
                    stack.enter_context(hooks(*args, **kwargs))
                yield
        except BaseException:
            _remove_adapter_names_hooks(self)
            raise


def _remove_adapter_names_hooks(model: nn.Module) -> None:
    """Removes the forward pre-hooks by which PEFT passes a call's ``adapter_names`` to its
    layers: the partials of its ``_adapter_names_pre_forward_hook``."""
    for m in model.modules():
        hooks = m._forward_pre_hooks
        for k in [k for k, h in hooks.items()
                  if getattr(getattr(h, "func", None), "__name__", None)
                  == "_adapter_names_pre_forward_hook"]:
            del hooks[k]
            m._forward_pre_hooks_with_kwargs.pop(k, None)


def mixed_batch_problem(model: nn.Module) -> str | None:
    """Why fastpeft cannot train a mixed batch (``adapter_names``) of PEFT ``model``, as
    the end of a sentence; None where it can: every LoRA layer fused, on a float base (the
    fused mixed batch has no quantised base), and no gradient checkpointing (whose
    recomputation in backward would run without the batch's ``adapter_names``)."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and len(m.lora_A) > 0:
            if not isinstance(m, FusedPeftLora):
                return (f"needs every LoRA layer fused by fastpeft, and {name} keeps PEFT's "
                        f"forward (PEFT refuses adapter_names in training)")
            if is_bnb(m.get_base_layer()):
                return (f"needs float base layers, and {name}'s is bitsandbytes-quantised; "
                        f"train each adapter's rows in a batch of their own")
        if getattr(m, "gradient_checkpointing", False) is True \
                or hasattr(m, "_checkpoint_wrapped_module"):  # torch's checkpoint_wrapper
            return (f"cannot run with gradient checkpointing ({name or 'the model'}): its "
                    f"recomputation would not see adapter_names; disable it, or use "
                    f"fastpeft.inject with fastpeft.set_adapter_names, whose names stay set")
    return None


def fuse_lora_model(model: nn.Module) -> None:
    """Gives PEFT's ``LoraModel`` (a PEFT model's ``base_model``) the mixed-batch training
    of :class:`MixedBatchTraining`; other models are left as they are."""
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:  # pragma: no cover - PEFT is there whenever a LoraModel is
        return
    if type(model) is LoraModel:
        model.__class__ = _fused_class("FusedLoraModel")


def is_param_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's ``ParamWrapper`` (LoRA on one parameter of the module it
    wraps, e.g. the 3-D experts of a transformers 5 MoE layer). Imports nothing: where
    PEFT's LoRA layers were never imported, no module can be one."""
    layer = sys.modules.get(_PARAM_WRAPPER[0])
    cls = getattr(layer, _PARAM_WRAPPER[1], None)
    return cls is not None and isinstance(module, cls)


def param_wrapper_class(what: str) -> type:
    """PEFT's ``ParamWrapper`` class; ``ImportError`` naming ``what`` needs it and what to
    install where peft is missing or older than 0.17."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"{what} needs PEFT's ParamWrapper: pip install "
                          f"'{PARAM_WRAPPER_PEFT}'") from err
    try:
        return getattr(importlib.import_module(_PARAM_WRAPPER[0]), _PARAM_WRAPPER[1])
    except (ImportError, AttributeError) as err:
        raise ImportError(f"{what} needs PEFT's ParamWrapper, which peft {peft.__version__} "
                          f"lacks: pip install '{PARAM_WRAPPER_PEFT}'") from err


@dataclass(frozen=True)
class LoraParts:
    """The LoRA hyperparameters and weights of a layer, fastpeft's or (fused) PEFT's."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    scaling: float
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    fan_in_fan_out: bool  # the base stores its weight (in, out): GPT-2's Conv1D


def lora_parts(layer: nn.Module, adapter: str | None = None) -> LoraParts:
    """:class:`LoraParts` of a :class:`fastpeft.LoRALinear` / :class:`fastpeft.Int8LoRALinear`
    / :class:`fastpeft.NF4LoRALinear`, of a PEFT LoRA layer's active adapter (a
    ``ParamWrapper``'s included), or of the adapter named ``adapter`` of a
    :class:`fastpeft.MultiLoRALinear` (which needs the name)."""
    if isinstance(layer, (LoRALinear, Int8LoRALinear, NF4LoRALinear)):
        return LoraParts(layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora,
                         layer.scaling, layer.lora_A.weight, layer.lora_B.weight,
                         layer.fan_in_fan_out)
    if isinstance(layer, MultiLoRALinear):
        if adapter not in layer.lora_A:
            raise ValueError(f"adapter: expected one of {layer.adapter_names} (a "
                             f"MultiLoRALinear's adapters), got {adapter!r}")
        a = adapter
        return LoraParts(layer.r[a], layer.lora_alpha[a], layer.lora_dropout[a],
                         layer.use_rslora[a], layer.scaling[a], layer.lora_A[a].weight,
                         layer.lora_B[a].weight, layer.fan_in_fan_out)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        raise ValueError(f"layer: {len(active)} active LoRA adapters {active}; expected one")
    (a,) = active
    r, alpha, scaling = layer.r[a], layer.lora_alpha[a], layer.scaling[a]
    rslora = getattr(layer, "use_rslora", {}).get(a)
    if rslora is None:  # older PEFT: from the scaling (ambiguous at r = 1, where it's moot)
        rslora = r > 1 and math.isclose(scaling, alpha / math.sqrt(r))
    return LoraParts(r, alpha, _dropout_p(layer.lora_dropout[a]), bool(rslora),
                     float(scaling), layer.lora_A[a].weight, layer.lora_B[a].weight,
                     is_conv1d(layer.get_base_layer()))


def _dropout_p(dropout: nn.Module) -> float:
    """PEFT's per-adapter dropout module: ``nn.Dropout(p)``, or ``nn.Identity`` for 0."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


