"""``Int8LoRALinear``: a frozen int8 weight-only base layer with a trainable LoRA branch."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from .. import reference
from ..ops import _memory
from ..ops._checks import check_float_dtype, check_positive_int
from ..ops.int8_lora_linear import int8_lora_linear, quantize_int8
from .lora_linear import autocast_dtype, is_conv1d, linear_weight, lora_weights

__all__ = ["Float32Scales", "Int8LoRALinear", "bnb_int8_weight", "is_bnb", "is_bnb_int8"]


def is_bnb(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes")


def is_bnb_int8(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes int8 ``Linear8bitLt``."""
    return is_bnb(module) and type(module).__name__ == "Linear8bitLt"


def bnb_int8_weight(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """A quantised bitsandbytes ``Linear8bitLt``'s int8 weight ``CB (out, in)`` and row
    scales ``SCB (out,)`` (``weight ~ CB * SCB[:, None] / 127``)."""
    cb = getattr(layer.weight, "CB", None)
    scb = getattr(layer.weight, "SCB", None)
    if cb is None:  # after its first forward the layer keeps them in its state
        cb = getattr(getattr(layer, "state", None), "CB", None)
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if layer.weight.dtype != torch.int8 or cb is None or scb is None:
        raise ValueError(
            "layer: the Linear8bitLt holds no int8 weight; build it with "
            "has_fp16_weights=False and move it to its device (which quantises it) first"
        )
    return cb, scb


class Float32Scales(nn.Module):
    """A quantised layer whose scale buffers (named in ``_float32_scales``) stay float32
    through ``Module.to(dtype)``, ``.half()``, ``.bfloat16()`` and ``.double()``, which cast
    every float buffer: the ops take them in float32 (as bitsandbytes keeps its scales),
    and a bf16 copy would move each by up to 2^-9 of itself, a weight's whole block or row.
    Device moves apply to them as to the rest."""

    _float32_scales: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._float32_scales
                if self._buffers.get(n) is not None}
        for n in kept:
            self._buffers[n] = None  # out of the conversion
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)
            raise
        for n, t in kept.items():
            moved = fn(t)
            if moved.dtype != t.dtype:  # a dtype conversion: the device move alone
                moved = moved.to(t.dtype) if t.is_meta else t.to(moved.device)
            self._buffers[n] = moved
        return self


class Int8LoRALinear(Float32Scales):
    """``x @ (qweight * weight_scale[:, None]).T + bias + scaling * lora_B(lora_A(dropout(x)))``.

    The base weight is stored at one byte per parameter (per-output-row symmetric int8,
    bitsandbytes' row-wise format) and is never dequantised in full: the fused op
    dequantises tile by tile. ``qweight``, ``weight_scale`` and ``bias`` are buffers (the
    base is frozen); ``lora_A`` / ``lora_B`` are bias-free ``nn.Linear`` layers with PEFT's
    names and initialisation, so a fresh layer computes exactly the quantised base.

    Build one with :meth:`from_linear` (quantises an ``nn.Linear`` or a ``transformers``
    ``Conv1D``) or :meth:`from_bnb` (reuses a bitsandbytes ``Linear8bitLt``'s int8 weight
    as is).

    To model code it looks like a linear layer: ``in_features``, ``out_features`` and
    ``weight``, which is ``qweight`` itself (int8, ``(out, in)``, on the layer's device;
    as bitsandbytes' ``Linear8bitLt.weight``, whose int8 dtype ``transformers`` code
    already checks for): reading it dequantises nothing; :meth:`dequantized_weight`
    gives the float values.

    Args:
        in_features, out_features: the layer's sizes.
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``.
        lora_dropout: dropout probability on the LoRA branch input.
        bias: whether the base layer has a bias.
        device, dtype: of the LoRA weights and the bias; ``qweight`` is int8 and
            ``weight_scale`` float32 on ``device``. The layer computes in its input's
            dtype, casting the (small) LoRA weights and bias to it when they differ.
    """

    _float32_scales = ("weight_scale",)

    qweight: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("r", r)):
            check_positive_int(name, value)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {lora_dropout}")
        factory = {"device": device, "dtype": check_float_dtype("dtype", dtype)}
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.register_buffer(  # in huge pages from 2 MiB on a Linux CPU (ops/_memory.py)
            "qweight", _memory.zeros((out_features, in_features), torch.int8, device)
        )
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, **factory) if bias else None)
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.merged = False
        self.fan_in_fan_out = False  # made from a Conv1D: to_linear gives one back
        self.reset_parameters()

    @property
    def weight(self) -> Tensor:
        """The int8 ``qweight (out, in)`` (see the class docstring)."""
        return self.qweight

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> Int8LoRALinear:
        """Quantise ``linear``'s weight (per-row absmax int8); the LoRA weights and the bias
        keep ``linear``'s dtype and device. ``linear`` is an ``nn.Linear`` or a
        ``transformers`` ``Conv1D`` (whose ``(in, out)`` weight is quantised per output)."""
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear: expected an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        w = linear_weight(linear)
        out_features, in_features = w.shape
        layer = cls(in_features, out_features, r, lora_alpha, lora_dropout,
                    use_rslora, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        layer.fan_in_fan_out = is_conv1d(linear)
        q, scale = quantize_int8(w)
        with torch.no_grad():
            layer.qweight.copy_(q)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @classmethod
    def from_bnb(
        cls,
        layer: nn.Module,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        dtype: torch.dtype | None = None,
    ) -> Int8LoRALinear:
        """Wrap a quantised bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``): its
        ``CB`` becomes ``qweight`` and ``SCB / 127`` ``weight_scale``, without re-quantising.

        ``dtype`` (the compute dtype of the LoRA weights and bias) defaults to the bnb
        layer's bias dtype, else ``torch.get_default_dtype()``.
        """
        if "bitsandbytes" not in sys.modules:  # no bnb layer then (and no import's noise)
            raise TypeError(f"layer: expected a bitsandbytes.nn.Linear8bitLt, got "
                            f"{type(layer).__name__}")
        import bitsandbytes as bnb

        if not isinstance(layer, bnb.nn.Linear8bitLt):
            raise TypeError(
                f"layer: expected a bitsandbytes.nn.Linear8bitLt, got {type(layer).__name__}"
            )
        cb, scb = bnb_int8_weight(layer)
        bias = layer.bias
        if dtype is None:
            dtype = bias.dtype if bias is not None else torch.get_default_dtype()
        out_features, in_features = cb.shape
        new = cls(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                  bias=bias is not None, device=cb.device, dtype=dtype)
        with torch.no_grad():
            new.qweight.copy_(cb)
            new.weight_scale.copy_(scb.float() / 127.0)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    def reset_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # --- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        # The activations' dtype is the compute dtype: the LoRA weights and the bias may be
        # kept in another (PEFT keeps them in float32 on a bf16 model) and are cast, the
        # scale stays float32 (Float32Scales; cast back should one be assigned in another
        # dtype). All are small.
        # Merged: the LoRA product is inside qweight already; scaling 0 drops the branch.
        dtype = autocast_dtype(x)
        if dtype is not None:  # under autocast: the activations in autocast's dtype
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.to(dtype))
        if x.dtype == torch.float64 and self.lora_A.weight.dtype != torch.float64:
            # as LoRALinear (and nn.Linear): float64 only in a float64 layer (.double())
            raise TypeError(f"x: expected {self.lora_A.weight.dtype} or a 16-bit float dtype "
                            "(this layer's LoRA weights are not float64; call .double() on "
                            "it for float64), got torch.float64")
        a, b = lora_weights(self, x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype \
            else self.bias.to(x.dtype)
        scale = self.weight_scale
        if scale.dtype != torch.float32:
            scale = scale.float()
        return int8_lora_linear(
            x, self.qweight, scale, bias, a, b,
            0.0 if self.merged else self.scaling, self.lora_dropout, self.training,
        )

    # --- float views and merging ----------------------------------------------------------

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``qweight * weight_scale[:, None]`` as a float ``(out, in)`` tensor (in the LoRA
        dtype unless ``dtype`` is given): a full-size copy, for export and inspection."""
        return reference.dequantize_int8(self.qweight, self.weight_scale,
                                         dtype or self.lora_A.weight.dtype)

    def delta_weight(self) -> Tensor:
        """``scaling * lora_B @ lora_A`` (out, in) in float32."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    @torch.no_grad()
    def to_linear(self, merge_lora: bool = True) -> nn.Module:
        """A float ``nn.Linear`` (LoRA dtype and device) with the dequantised weight, plus
        the LoRA product unless ``merge_lora`` is false or it was merged already; a
        ``Conv1D`` for a layer made from one."""
        w = self.dequantized_weight(torch.float32)
        if merge_lora and not self.merged:
            w = w + self.delta_weight()
        dtype = self.lora_A.weight.dtype
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            linear = Conv1D(self.out_features, self.in_features).to(w.device, dtype)
            w = w.t()
            if self.bias is None:
                linear.bias = None
        else:
            linear = nn.Linear(self.in_features, self.out_features,
                               bias=self.bias is not None, device=w.device, dtype=dtype)
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the LoRA product into the int8 weight by re-quantising
        ``dequant(qweight) + delta``; forward then runs the int8 base alone.

        Returns:
            The error the re-quantisation adds: ``||W' - (W + delta)|| / ||W + delta||``
            (Frobenius norms; W' is the new dequantised weight). The merge cannot be undone
            exactly; keep :meth:`to_linear` or the LoRA weights if you need them.

        ``merged`` is not part of the state dict (nor is it in PEFT's layers): the state of
        a merged layer, loaded into an unmerged one, would apply the LoRA product twice.
        Save a merged layer's quantised weight without its LoRA weights (or the state
        before merging).
        """
        if self.merged:
            raise RuntimeError("merge: this Int8LoRALinear is already merged")
        target = self.dequantized_weight(torch.float32) + self.delta_weight()
        q, scale = quantize_int8(target)
        self.qweight.copy_(q)
        self.weight_scale.copy_(scale)
        self.merged = True
        err = reference.dequantize_int8(q, scale, torch.float32) - target
        return (err.norm() / target.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )
