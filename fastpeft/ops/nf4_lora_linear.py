"""``fastpeft.nf4_lora_linear`` / ``quantize_nf4``: a 4-bit NF4 base layer (QLoRA,
bitsandbytes' format) with a trainable LoRA branch, fused.

    W[n, k] = NF4_VALUES[code(n, k)] * absmax[(n * in + k) // blocksize]   (never in full)
    y = x @ W.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T

``qweight`` holds two codes per byte, the earlier element of a row in the high nibble:
bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` bytes in their own order, viewed as
``(out, in // 2)``. Blocks run over the weight read row-major, so a block may cross into
the next row when ``in`` is not a multiple of ``blocksize``.

The kernels dequantise the weight tile by tile inside the GEMMs (the forward, and the
backward's ``dx = dy @ W``), and a small-batch path streams the codes once, half a byte
per weight. The LoRA branch, its seeded dropout mask and the backward formulas are those
of :mod:`fastpeft.ops.lora_linear`; the frozen base gets no gradient.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import _backend, reference
from . import _memory
from ._checks import (
    check_bool,
    check_float_dtype,
    check_float_input,
    check_scalar,
    check_tensor,
    rows_of,
)
from ._library import OpSpec, declare
from ._linear import check_lora_args, draw_seed, linear_backward_fake, lora_args_ok

if _backend.TRITON_AVAILABLE:
    from ..triton import nf4_lora_linear as triton_kernels
else:
    triton_kernels = None

__all__ = ["nf4_lora_linear", "quantize_nf4"]

# NF4 base: qweight (out, in // 2) uint8, absmax (ceil(out * in / blocksize),) fp32.
# y (T, out) and xa (T, r) as in lora_linear; the float weight is never built.
SCHEMA = ("(Tensor x, Tensor qweight, Tensor absmax, Tensor? bias, Tensor lora_A, "
          "Tensor lora_B, float scaling, float dropout_p, Tensor? seed, int blocksize) "
          "-> (Tensor, Tensor)")
# (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor qweight, Tensor absmax, Tensor lora_A, "
                   "Tensor lora_B, Tensor xa, float scaling, float dropout_p, Tensor? seed, "
                   "int blocksize, bool compute_dx) -> (Tensor, Tensor, Tensor)")

# bitsandbytes' block sizes (64 its default); the kernels need a power of two
BLOCKSIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _fake(x, qweight, absmax, bias, lora_A, lora_B, scaling, dropout_p, seed, blocksize):
    return x.new_empty(x.shape[0], qweight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


def _backward_fake(grad_y, x, qweight, absmax, lora_A, lora_B, xa, scaling, dropout_p, seed,
                   blocksize, compute_dx):
    return linear_backward_fake(x, lora_A, lora_B, compute_dx)


# autograd: the LoRA linear ops' C++ one (csrc/linear_autograd.cpp)
declare(OpSpec("nf4_lora_linear", SCHEMA, BACKWARD_SCHEMA, _fake, _backward_fake, None, None,
               triton_kernels))


def check_blocksize(blocksize: object) -> int:
    """One of :data:`BLOCKSIZES`."""
    if (isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral)
            or int(blocksize) not in BLOCKSIZES):
        raise ValueError(f"blocksize: expected one of {BLOCKSIZES} (a power of two; "
                         f"bitsandbytes' default is 64), got {blocksize!r}")
    return int(blocksize)


def absmax_length(out_features: int, in_features: int, blocksize: int) -> int:
    """How many blocks (absmax entries) an ``(out, in)`` weight has: the last may be short."""
    return -(-out_features * in_features // blocksize)


def quantize_nf4(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Quantise a float weight to NF4, exactly as bitsandbytes does.

    The codes and absmax are those of ``bitsandbytes.functional.quantize_4bit(weight,
    blocksize=blocksize, quant_type="nf4")``: its packed bytes, in the same order, viewed
    as ``(out, in // 2)``, and its float32 absmax.

    Args:
        weight: ``(out, in)`` float weight, ``in`` even (any float dtype, any device).
        blocksize: elements per absmax block, one of :data:`BLOCKSIZES`.

    Returns:
        ``(qweight, absmax)``: ``qweight`` uint8 ``(out, in // 2)``, two codes per byte
        (the earlier element in the high nibble), and ``absmax`` float32
        ``(ceil(out * in / blocksize),)``, the largest magnitude of each block. On a Linux
        CPU, tensors of 2 MiB or more lie in transparent huge pages, in a storage that
        cannot be resized (:mod:`fastpeft.ops._memory`).
    """
    check_float_input("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    blocksize = check_blocksize(blocksize)
    if weight.shape[1] % 2:
        raise ValueError(f"weight: NF4 packs two codes of a row per byte, so in_features must "
                         f"be even, got shape {tuple(weight.shape)}")
    finite = torch.isfinite(weight).all(dim=1)
    if not weight.is_meta and not bool(finite.all()):  # (meta: shapes only, no values)
        rows = (~finite).nonzero().flatten()
        raise ValueError(f"weight: expected finite values, got inf or NaN in {rows.numel()} "
                         f"row(s) (first: row {int(rows[0])}); a block's absmax would be inf "
                         "or NaN and every output that reads it NaN")
    qweight, absmax = reference.quantize_nf4(weight, blocksize)
    return _memory.in_huge_pages(qweight), _memory.in_huge_pages(absmax)


def dequantize_nf4(qweight: Tensor, absmax: Tensor, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight ``(out, 2 * qweight.shape[1])`` that ``(qweight, absmax)`` hold,
    materialised (for export and checks; the fused op never builds it), as
    bitsandbytes' ``dequantize_4bit`` gives it: float32 products rounded to ``dtype``."""
    blocksize = check_blocksize(blocksize)
    check_float_dtype("dtype", dtype)
    check_tensor("qweight", qweight, ndim=2, dtype=torch.uint8)
    length = absmax_length(qweight.shape[0], 2 * qweight.shape[1], blocksize)
    check_tensor("absmax", absmax, shape=(length,), dtype=torch.float32, like=qweight)
    return reference.dequantize_nf4(qweight, absmax, blocksize, dtype)


def check_nf4_weight(x: Tensor, qweight: Tensor, absmax: Tensor, blocksize: int) -> None:
    """The quantised base: uint8 codes ``(out, in // 2)`` and float32 absmax of the right
    length, frozen, on x's device."""
    check_tensor("qweight", qweight, ndim=2, like=x, dtype=torch.uint8)
    out_features, in_features = qweight.shape[0], 2 * qweight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features} (qweight is "
                         f"{tuple(qweight.shape)} = (out, in // 2): two codes per byte), "
                         f"got shape {tuple(x.shape)}" + (
                             "; NF4 needs an even in_features" if x.shape[-1] % 2 else ""))
    length = absmax_length(out_features, in_features, blocksize)
    check_tensor("absmax", absmax, ndim=1, dtype=torch.float32, like=x)
    if absmax.shape[0] != length:
        raise ValueError(f"absmax: expected shape ({length},) (one float32 per block of "
                         f"{blocksize} of the {out_features} x {in_features} weight), got "
                         f"{tuple(absmax.shape)}; a double-quantised absmax must be "
                         "dequantised first (NF4LoRALinear.from_bnb does it)")
    for name, t in (("qweight", qweight), ("absmax", absmax)):
        if t.requires_grad:
            raise ValueError(f"{name}: the quantised base is frozen and gets no gradient, but "
                             f"{name} requires grad; pass {name}.detach() (or train a float "
                             "base with fastpeft.lora_linear)")


def _usual_args(x, qweight, absmax, bias, lora_A, lora_B, scaling, dropout_p,
                blocksize) -> bool:
    """Whether the arguments are ones the full checks accept, tested in one pass: a
    shortcut for the usual call, as ``linear_args_ok`` is for lora_linear and
    int8_lora_linear. Anything unusual returns False, and the full checks, which name the
    argument, run."""
    if not (isinstance(x, Tensor) and isinstance(qweight, Tensor)
            and isinstance(absmax, Tensor) and type(blocksize) is int
            and blocksize in BLOCKSIZES):
        return False
    try:
        dev = x.device
        out_features, half = qweight.shape
        base_ok = (qweight.dtype == torch.uint8 and qweight.device == dev
                   and not qweight.requires_grad and absmax.dtype == torch.float32
                   and absmax.device == dev and not absmax.requires_grad
                   and absmax.shape == (absmax_length(out_features, 2 * half, blocksize),))
    except ValueError:  # qweight not 2-D
        return False
    return base_ok and lora_args_ok(x, 2 * half, out_features, bias, lora_A, lora_B, scaling,
                                    dropout_p)


# fastpeft._C.nf4_lora_linear_call (csrc/calls.cpp), or a stand-in that declines every call
_NATIVE_CALL = _backend.native_call("nf4_lora_linear")


def nf4_lora_linear(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    blocksize: int = 64,
) -> Tensor:
    """``x @ W.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T`` with ``W`` the
    NF4 weight ``(qweight, absmax)``, fused, dequantised tile by tile.

    Args:
        x: ``(..., in)`` activations, fp32 / fp16 / bf16 (fp64 for gradcheck).
        qweight: ``(out, in // 2)`` uint8 frozen codes (from :func:`quantize_nf4`, or a
            bitsandbytes ``Params4bit``'s data viewed so).
        absmax: ``(ceil(out * in / blocksize),)`` float32 block scales.
        bias: ``(out,)`` in x's dtype, or ``None``.
        lora_A: ``(r, in)``; lora_B: ``(out, r)``, in x's dtype.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch input, ``0 <= p < 1``.
        training: dropout applies only when true.
        blocksize: elements per absmax block, one of :data:`BLOCKSIZES` (64 by default,
            as in bitsandbytes).

    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to ``x``, ``bias``, ``lora_A`` and
        ``lora_B``; the quantised weight is frozen.
    """
    if _backend.eager_native():  # the usual eager CPU call, in C++ (None: not that)
        y = _NATIVE_CALL(x, qweight, absmax, bias, lora_A, lora_B, scaling, dropout_p, training,
                         blocksize)
        if y is not None:
            return y
    if not _usual_args(x, qweight, absmax, bias, lora_A, lora_B, scaling, dropout_p,
                       blocksize):
        check_float_input("x", x)
        blocksize = check_blocksize(blocksize)
        check_nf4_weight(x, qweight, absmax, blocksize)
        check_lora_args(x, qweight, bias, lora_A, lora_B, weight_name="qweight",
                        in_features=2 * qweight.shape[1])
        scaling = check_scalar("scaling", scaling)
        dropout_p = check_scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_inclusive=False)
    if training is not True and training is not False:
        training = check_bool("training", training)
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None

    flat = x.dim() == 2
    lead = x.shape[:-1]
    x2 = x.contiguous() if flat else rows_of(x).contiguous()
    op = _backend.resolve("nf4_lora_linear", x)
    if op is None or x2.numel() == 0 or qweight.numel() == 0:  # empty: reference
        y = reference.nf4_lora_linear(x2, qweight, absmax, bias, lora_A, lora_B, scaling, p,
                                      True, seed, blocksize)
    else:
        y, _ = op(x2, qweight.contiguous(), absmax.contiguous(), bias, lora_A.contiguous(),
                  lora_B.contiguous(), scaling, p, seed, blocksize)
    return y if flat else y.reshape(*lead, qweight.shape[0])
