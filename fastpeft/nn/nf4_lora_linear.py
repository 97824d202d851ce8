"""``NF4LoRALinear``: a frozen 4-bit NF4 base layer (QLoRA, bitsandbytes' format) with a
trainable LoRA branch."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from ..ops import _memory
from ..ops._checks import check_float_dtype, check_positive_int
from ..ops.nf4_lora_linear import (
    absmax_length,
    check_blocksize,
    dequantize_nf4,
    nf4_lora_linear,
    quantize_nf4,
)
from .int8_lora_linear import Float32Scales, is_bnb
from .lora_linear import autocast_dtype, is_conv1d, linear_weight, lora_weights

__all__ = ["NF4LoRALinear", "bnb_nf4_problem", "bnb_nf4_weight", "is_bnb_4bit"]


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit ``Linear4bit`` (or its ``LinearNF4`` /
    ``LinearFP4`` subclasses), checked without importing bitsandbytes."""
    return is_bnb(module) and any(
        c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
        for c in type(module).__mro__)


def _quant_state(layer: nn.Module):
    # bitsandbytes keeps it on the weight, and on the layer for when the weight loses it
    # (its fix_4bit_weight_quant_state_from_module)
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def bnb_nf4_problem(layer: nn.Module) -> str | None:
    """Why a bitsandbytes ``Linear4bit`` cannot be read as fastpeft's NF4 base (an error
    message naming ``layer``), or None when it can: NF4 codes, stored as uint8, quantised
    already, with an even ``in_features`` and a block size the kernels take."""
    weight = layer.weight
    state = _quant_state(layer)
    quant_type = getattr(state, "quant_type", None) or getattr(weight, "quant_type", None)
    if quant_type != "nf4":
        return (f"layer: quant_type={quant_type!r}; fastpeft's 4-bit base is NF4 only "
                f"(bitsandbytes.nn.Linear4bit(..., quant_type='nf4'), "
                f"BitsAndBytesConfig(bnb_4bit_quant_type='nf4'))")
    storage = getattr(weight, "quant_storage", None) or getattr(layer, "quant_storage", None)
    if state is not None and weight.dtype != torch.uint8:  # quantised: data in that dtype
        storage = weight.dtype
    if storage not in (None, torch.uint8):
        return (f"layer: quant_storage={storage}; fastpeft reads the NF4 codes as bytes: "
                f"quant_storage=torch.uint8 (bitsandbytes' default; "
                f"BitsAndBytesConfig(bnb_4bit_quant_storage=torch.uint8))")
    if state is None:
        return ("layer: the Linear4bit holds no 4-bit weight yet; move it to its device "
                "first (bitsandbytes quantises it there: .to(device) / .cuda())")
    in_features = state.shape[1]
    if in_features % 2:
        return (f"layer: in_features {in_features} is odd; fastpeft's NF4 base packs two "
                f"codes of a row per byte and needs an even in_features")
    try:
        check_blocksize(state.blocksize)
    except ValueError as err:
        return f"layer: its {err}"
    return None


def bnb_nf4_weight(layer: nn.Module) -> tuple[Tensor, Tensor, int]:
    """A quantised bitsandbytes NF4 ``Linear4bit``'s base as fastpeft's op takes it:
    ``(qweight, absmax, blocksize)``.

    ``qweight`` is a ``(out, in // 2)`` uint8 view of ``layer.weight``'s own storage (the
    ``Params4bit`` data, ``(out * in // 2, 1)``: the same bytes). ``absmax`` is
    ``quant_state.absmax`` itself when it is float32, else (double quantisation,
    ``compress_statistics=True``) its float32 dequantisation, computed as bitsandbytes'
    ``dequantize_4bit`` does: ``dequantize_blockwise(absmax, state2) + offset``.

    bitsandbytes (>= 0.49) repacks a layer's codes in place for its own CPU kernel (on a
    CPU with AVX512-BF16, at the first eval-mode forward without gradients), in another
    byte order with bf16 absmax; such a layer is put back in place into the standard
    layout first, as bitsandbytes itself does before saving it (the absmax keeps the bf16
    rounding), and its repacking is switched off (``layer.support_avx512bf16_for_cpu =
    False``), so the view stays valid and shared. Raises ``ValueError`` (naming ``layer``)
    for what :func:`bnb_nf4_problem` refuses.
    """
    problem = bnb_nf4_problem(layer)
    if problem is not None:
        raise ValueError(problem)
    if getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False
    state = _standard_layout(layer, _quant_state(layer))
    out_features, in_features = state.shape
    qweight = layer.weight.data.view(out_features, in_features // 2)
    if state.nested:
        from bitsandbytes.functional import dequantize_blockwise

        with torch.no_grad():
            absmax = dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
    else:
        absmax = state.absmax
    absmax = absmax.reshape(-1)
    if absmax.dtype != torch.float32:
        absmax = absmax.float()
    length = absmax_length(out_features, in_features, state.blocksize)
    if absmax.numel() != length:
        raise ValueError(f"layer: its quant_state holds {absmax.numel()} absmax values, "
                         f"{length} expected for a {out_features} x {in_features} weight in "
                         f"blocks of {state.blocksize}")
    return qweight, absmax, int(state.blocksize)


def _standard_layout(layer: nn.Module, state):
    """``layer``'s quant state after undoing bitsandbytes' CPU repacking, in place (see
    :func:`bnb_nf4_weight`); ``state`` itself when it is not repacked."""
    if not getattr(state, "packing_format_for_cpu", False):
        return state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not state.nested and state.absmax.dim() == 2:
        # bitsandbytes leaves a plain absmax as its kernel's (blocks per row, out) bf16
        # transpose; back to one float32 per block, in block order
        state.absmax = state.absmax.t().reshape(-1).float()
    weight.data = data
    weight.quant_state = state
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = state
    return state


class NF4LoRALinear(Float32Scales):
    """``x @ W.T + bias + scaling * lora_B(lora_A(dropout(x)))`` with ``W`` a frozen 4-bit
    NF4 weight (QLoRA): ``W[n, k] = NF4[code] * absmax[block]``, in blocks of
    ``blocksize`` elements of the weight read row-major.

    The base is stored at half a byte per parameter, in bitsandbytes' own format
    (``quantize_4bit(..., quant_type="nf4")``: its bytes and float32 absmax), and is never
    dequantised in full: the fused op dequantises tile by tile. ``qweight``, ``absmax`` and
    ``bias`` are buffers (the base is frozen); ``lora_A`` / ``lora_B`` are bias-free
    ``nn.Linear`` layers with PEFT's names and initialisation, so a fresh layer computes
    exactly the quantised base.

    Build one with :meth:`from_linear` (quantises an ``nn.Linear`` or a ``transformers``
    ``Conv1D``) or :meth:`from_bnb` (reuses a bitsandbytes NF4 ``Linear4bit``'s codes in
    place, double-quantised or not).

    To model code it looks like a linear layer: ``in_features``, ``out_features`` and
    ``weight``, which is ``qweight`` itself (uint8, ``(out, in // 2)``; bitsandbytes'
    ``Linear4bit.weight`` is uint8 too): reading it dequantises nothing;
    :meth:`dequantized_weight` gives the float values.

    Args:
        in_features, out_features: the layer's sizes (``in_features`` even).
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``.
        lora_dropout: dropout probability on the LoRA branch input.
        bias: whether the base layer has a bias.
        blocksize: elements per absmax block (bitsandbytes' 64 by default; a power of two
            from 16 to 4096).
        device, dtype: of the LoRA weights and the bias; ``qweight`` is uint8 and
            ``absmax`` float32 on ``device``. The layer computes in its input's dtype,
            casting the (small) LoRA weights and bias to it when they differ.
    """

    _float32_scales = ("absmax",)

    qweight: Tensor
    absmax: Tensor
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
        blocksize: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("r", r)):
            check_positive_int(name, value)
        if in_features % 2:
            raise ValueError(f"in_features: NF4 packs two codes of a row per byte, so it must "
                             f"be even, got {in_features}")
        self.blocksize = check_blocksize(blocksize)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {lora_dropout}")
        factory = {"device": device, "dtype": check_float_dtype("dtype", dtype)}
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        # (codes and scales of 2 MiB or more in huge pages on a Linux CPU: ops/_memory.py)
        self.register_buffer("qweight", _memory.zeros((out_features, in_features // 2),
                                                      torch.uint8, device))
        self.register_buffer("absmax", _memory.zeros(
            (absmax_length(out_features, in_features, self.blocksize),), torch.float32,
            device))
        self.register_buffer("bias", torch.zeros(out_features, **factory) if bias else None)
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.merged = False
        self.fan_in_fan_out = False  # made from a Conv1D: to_linear gives one back
        self.reset_parameters()

    @property
    def weight(self) -> Tensor:
        """The uint8 ``qweight (out, in // 2)`` (see the class docstring)."""
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
        *,
        blocksize: int = 64,
    ) -> NF4LoRALinear:
        """Quantise ``linear``'s weight to NF4 exactly as bitsandbytes'
        ``quantize_4bit(..., quant_type="nf4", blocksize=blocksize)`` does; the LoRA weights
        and the bias keep ``linear``'s dtype and device. ``linear`` is an ``nn.Linear`` or a
        ``transformers`` ``Conv1D`` (whose ``(in, out)`` weight is quantised as ``(out,
        in)``), with an even ``in_features``."""
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear: expected an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        if is_bnb(linear):
            raise TypeError(f"linear: got a bitsandbytes {type(linear).__name__}, whose weight "
                            f"is quantised already; use NF4LoRALinear.from_bnb for a NF4 "
                            f"Linear4bit")
        w = linear_weight(linear)
        out_features, in_features = w.shape
        if in_features % 2:
            raise ValueError(f"linear: in_features {in_features} is odd; NF4 packs two codes "
                             f"of a row per byte and needs an even in_features")
        layer = cls(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                    bias=linear.bias is not None, blocksize=blocksize, device=w.device,
                    dtype=w.dtype)
        layer.fan_in_fan_out = is_conv1d(linear)
        q, absmax = quantize_nf4(w, layer.blocksize)
        with torch.no_grad():
            layer.qweight.copy_(q)
            layer.absmax.copy_(absmax)
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
    ) -> NF4LoRALinear:
        """Wrap a quantised bitsandbytes NF4 ``Linear4bit`` without re-quantising: its codes
        become ``qweight``, a view sharing ``layer.weight``'s storage (no copy), its block
        size ``blocksize`` and its absmax ``absmax`` (shared too when float32; with double
        quantisation, ``compress_statistics=True``, dequantised once to float32 as
        bitsandbytes does). The bias is copied. See :func:`bnb_nf4_weight` for a layer
        bitsandbytes had repacked for its CPU kernel.

        FP4 layers, codes stored in another dtype than uint8 (``quant_storage``) and
        layers not quantised yet are refused (``ValueError`` naming ``layer``).

        ``dtype`` (the compute dtype of the LoRA weights and bias) defaults to the dtype
        of the weight bitsandbytes quantised (``quant_state.dtype``, what its
        ``dequantize_4bit`` returns).
        """
        if "bitsandbytes" not in sys.modules:  # no bnb layer then (and no import's noise)
            raise TypeError(f"layer: expected a bitsandbytes.nn.Linear4bit, got "
                            f"{type(layer).__name__}")
        import bitsandbytes as bnb

        if not isinstance(layer, bnb.nn.Linear4bit):
            raise TypeError(
                f"layer: expected a bitsandbytes.nn.Linear4bit, got {type(layer).__name__}"
            )
        qweight, absmax, blocksize = bnb_nf4_weight(layer)
        state = _quant_state(layer)
        bias = layer.bias
        if dtype is None:
            dtype = state.dtype if isinstance(state.dtype, torch.dtype) \
                and state.dtype.is_floating_point else torch.get_default_dtype()
        out_features, in_features = state.shape
        new = cls(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                  bias=bias is not None, blocksize=blocksize, device=qweight.device,
                  dtype=dtype)
        new.qweight = qweight  # the very bytes of layer.weight (buffers keep their names)
        new.absmax = absmax
        _memory.advise(qweight)  # in huge pages where they lie (ops/_memory.py)
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias)
        return new

    def reset_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # --- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        # As Int8LoRALinear: the activations' dtype is the compute dtype; the LoRA weights
        # and the bias are cast to it, absmax stays float32 (Float32Scales). Merged: the
        # LoRA product is inside the codes; scaling 0 drops it.
        dtype = autocast_dtype(x)
        if dtype is not None:  # under autocast: the activations in autocast's dtype
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.to(dtype))
        if x.dtype == torch.float64 and self.lora_A.weight.dtype != torch.float64:
            raise TypeError(f"x: expected {self.lora_A.weight.dtype} or a 16-bit float dtype "
                            "(this layer's LoRA weights are not float64; call .double() on "
                            "it for float64), got torch.float64")
        a, b = lora_weights(self, x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype \
            else self.bias.to(x.dtype)
        return nf4_lora_linear(
            x, self.qweight, self._absmax_fp32(), bias, a, b,
            0.0 if self.merged else self.scaling, self.lora_dropout, self.training,
            self.blocksize,
        )

    def _absmax_fp32(self) -> Tensor:
        absmax = self.absmax
        return absmax if absmax.dtype == torch.float32 else absmax.float()

    # --- float views and merging ----------------------------------------------------------

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``NF4[code] * absmax[block]`` as a float ``(out, in)`` tensor (in the LoRA dtype
        unless ``dtype`` is given), as bitsandbytes' ``dequantize_4bit`` gives it: a
        full-size copy, for export and inspection."""
        return dequantize_nf4(self.qweight, self._absmax_fp32(), self.blocksize,
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
        """Fold the LoRA product into the NF4 weight by re-quantising
        ``dequant(qweight) + delta`` (same block size); forward then runs the NF4 base alone.

        The new codes and absmax are new tensors: a layer made by :meth:`from_bnb` stops
        sharing the bitsandbytes layer's storage, which keeps its old weight.

        Returns:
            The error the re-quantisation adds: ``||W' - (W + delta)|| / ||W + delta||``
            (Frobenius norms; W' is the new dequantised weight). 4-bit steps are coarse: a
            small LoRA product mostly rounds away, and the merge cannot be undone; keep
            :meth:`to_linear` (a float layer with the product merged exactly) or the LoRA
            weights if you need them.

        ``merged`` is not part of the state dict (nor is it in PEFT's layers): the state of
        a merged layer, loaded into an unmerged one, would apply the LoRA product twice.
        Save a merged layer's quantised weight without its LoRA weights (or the state
        before merging).
        """
        if self.merged:
            raise RuntimeError("merge: this NF4LoRALinear is already merged")
        target = self.dequantized_weight(torch.float32) + self.delta_weight()
        q, absmax = quantize_nf4(target, self.blocksize)
        self.qweight, self.absmax = q, absmax
        self.merged = True
        err = dequantize_nf4(q, absmax, self.blocksize, torch.float32) - target
        return (err.norm() / target.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, blocksize={self.blocksize}, merged={self.merged}"
        )
