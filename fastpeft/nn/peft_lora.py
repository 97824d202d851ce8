"""PEFT's own LoRA layers with fastpeft's fused forward (what :func:`fastpeft.from_peft`
turns them into), PEFT's ``ParamWrapper`` (LoRA on a parameter, which keeps PEFT's
forward), and one view of the LoRA hyperparameters of any of these layers."""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass

from torch import Tensor, nn

from ..ops.int8_lora_linear import int8_lora_linear
from ..ops.lora_linear import lora_linear
from .int8_lora_linear import Int8LoRALinear, bnb_int8_weight, is_bnb
from .lora_linear import LoRALinear, is_conv1d

__all__ = ["FusedPeftLora", "LoraParts", "fuse_peft_lora", "is_param_wrapper", "lora_parts",
           "param_wrapper_class"]

#: Where PEFT keeps ``ParamWrapper`` (PEFT >= 0.17), LoRA on an ``nn.Parameter``.
_PARAM_WRAPPER = ("peft.tuners.lora.layer", "ParamWrapper")
#: The oldest PEFT with ``ParamWrapper``, for the error that asks to install it.
PARAM_WRAPPER_PEFT = "peft>=0.17"

# PEFT layer classes that get a fused forward: name of the fused class -> (module, class)
_PEFT_CLASSES = {
    "FusedLinear": ("peft.tuners.lora.layer", "Linear"),
    "FusedLinear8bitLt": ("peft.tuners.lora.bnb", "Linear8bitLt"),
}


class FusedPeftLora:
    """Mixed into a PEFT LoRA layer's class by :func:`fastpeft.from_peft`: the layer stays
    PEFT's (its parameters, adapters, ``merge``, state-dict keys and saving are untouched)
    and its forward runs fastpeft's fused op for the one active adapter. PEFT's own forward
    runs wherever the fused one does not apply: adapters disabled or merged, several
    active, DoRA or a LoRA bias, per-sample ``adapter_names``."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        a = self._fused_adapter(args, kwargs)
        if a is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        lora_A, lora_B = self.lora_A[a].weight, self.lora_B[a].weight
        p = _dropout_p(self.lora_dropout[a])
        if is_bnb(base):
            # bitsandbytes int8, computed as weight-only int8 in the activations' dtype (its
            # threshold / outlier decomposition is not reproduced)
            qweight, scb = bnb_int8_weight(base)
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return int8_lora_linear(x, qweight, scb.float() / 127.0, bias, lora_A.to(x.dtype),
                                    lora_B.to(x.dtype), self.scaling[a], p, self.training)
        if is_conv1d(base):  # PEFT's fan_in_fan_out: the (in, out) weight, read in place
            weight = base.weight.t()
        elif isinstance(base, nn.Linear):
            weight = base.weight
        else:  # a layer type PEFT wraps in its Linear that the fused op does not know
            return super().forward(x, *args, **kwargs)
        dtype = weight.dtype
        return lora_linear(x, weight, base.bias, lora_A.to(dtype), lora_B.to(dtype),
                           self.scaling[a], p, self.training)

    def _fused_adapter(self, args: tuple, kwargs: dict) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        (a,) = active
        if self.use_dora.get(a) or getattr(self, "lora_bias", {}).get(a):
            return None
        return a


def fuse_peft_lora(layer: nn.Module) -> bool:
    """Gives a PEFT LoRA layer (on ``nn.Linear`` or bitsandbytes ``Linear8bitLt``) the fused
    forward by switching its class to a subclass of its own; False for other layers."""
    for name, (module, cls_name) in _PEFT_CLASSES.items():
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        if type(layer) is cls:
            layer.__class__ = _fused_class(name)
            return True
    return isinstance(layer, FusedPeftLora)


_FUSED: dict[str, type] = {}


def _fused_class(name: str) -> type:
    if name not in _FUSED:
        module, cls_name = _PEFT_CLASSES[name]
        base = getattr(importlib.import_module(module), cls_name)
        _FUSED[name] = type(name, (FusedPeftLora, base), {"__module__": __name__,
                                                          "__qualname__": name})
    return _FUSED[name]


def __getattr__(name: str) -> type:
    """The fused classes are made on first use (PEFT is optional): this lets pickle find
    them by name too (``torch.save`` of a converted model)."""
    if name in _PEFT_CLASSES:
        return _fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def lora_parts(layer: nn.Module) -> LoraParts:
    """:class:`LoraParts` of a :class:`fastpeft.LoRALinear` / :class:`fastpeft.Int8LoRALinear`,
    or of a PEFT LoRA layer's active adapter (a ``ParamWrapper``'s included)."""
    if isinstance(layer, (LoRALinear, Int8LoRALinear)):
        return LoraParts(layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora,
                         layer.scaling, layer.lora_A.weight, layer.lora_B.weight,
                         layer.fan_in_fan_out)
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


