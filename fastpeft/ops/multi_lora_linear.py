"""``fastpeft.multi_lora_linear``: one frozen base layer, many LoRA adapters, a batch whose
rows each name their adapter.

    y[t] = x[t] @ weight.T + bias + scaling[i] * (dropout(x)[t] @ lora_A[i].T) @ lora_B[i].T,
    i = adapter_ids[t]  (i = -1: the base alone)

The base GEMM runs once for the whole batch; the LoRA parts run per adapter segment: the
kernels group the rows by adapter (a stable counting sort of ``adapter_ids``, no Python
loop over adapters) and run each adapter's rank-r products on its own rows. The dropout
mask is :func:`fastpeft.lora_linear`'s for the whole ``(T, in)`` input, regenerated from
a seed and never stored, so a row is dropped as it would be in ``lora_linear`` with the
same seed.

Forward saves ``x`` and ``xa[t] = dropout(x)[t] @ lora_A[i].T`` (T, r; zero where i = -1).

Backward, per row t with i = adapter_ids[t] >= 0 (dy = dL/dy; keep = mask / (1 - p)):
    dyB[t]      = dy[t] @ lora_B[i]                                  (r,)
    d lora_B[i] = scaling[i] * sum over its rows of dy[t]^T xa[t]    (out, r)
    d lora_A[i] = scaling[i] * sum over its rows of dyB[t]^T (keep * x)[t]   (r, in)
    dx[t]       = dy[t] @ weight + scaling[i] * keep[t] * (dyB[t] @ lora_A[i])
    d weight = dy.T @ x,  d bias = dy.sum(0)    (only when they require grad)
An adapter no row names gets a zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, reference
from ._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_float_input,
    check_same_device,
    check_same_dtype,
    check_scalar,
    check_tensor,
    rows_of,
)
from ._library import OpSpec, declare
from ._linear import base_weight, draw_seed

if _backend.TRITON_AVAILABLE:
    from ..triton import multi_lora_linear as triton_kernels
else:
    triton_kernels = None

__all__ = ["multi_lora_linear"]

# y (T, out) and xa (T, r), saved for backward
SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
          "Tensor scaling, Tensor adapter_ids, float dropout_p, Tensor? seed) "
          "-> (Tensor, Tensor)")
# (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
                   "Tensor xa, Tensor scaling, Tensor adapter_ids, float dropout_p, "
                   "Tensor? seed, bool compute_dx) -> (Tensor, Tensor, Tensor)")


def _fake(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[1])


def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, adapter_ids, dropout_p,
                   seed, compute_dx):
    dx = torch.empty_like(x) if compute_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# autograd: the LoRA linear ops' C++ one (csrc/linear_autograd.cpp)
declare(OpSpec("multi_lora_linear", SCHEMA, BACKWARD_SCHEMA, _fake, _backward_fake, None, None,
               triton_kernels))
_NATIVE = torch.ops.fastpeft.multi_lora_linear.default


def _usual_args(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p) -> bool:
    """Whether the arguments are ones :func:`check_multi_lora_args` and the check of
    ``dropout_p`` accept (the ids' values aside), tested in one pass: a shortcut for the
    usual call, which a serving step makes once per layer (as ``linear_args_ok`` for
    lora_linear). Anything unusual returns False and the full checks, which name the
    argument, run."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and isinstance(scaling, Tensor)
            and isinstance(adapter_ids, Tensor) and (bias is None or isinstance(bias, Tensor))):
        return False
    try:
        dt, dev = x.dtype, x.device
        out_features, in_features = weight.shape
        n, rank, a_in = lora_A.shape
    except ValueError:  # weight not 2-D, lora_A not 3-D
        return False
    return (
        dt in FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] == in_features
        and a_in == in_features and n >= 1 and rank >= 1
        and weight.dtype == dt and weight.device == dev
        and lora_A.dtype == dt and lora_A.device == dev
        and lora_B.shape == (n, out_features, rank) and lora_B.dtype == dt
        and lora_B.device == dev
        and (bias is None or (bias.shape == (out_features,) and bias.dtype == dt
                              and bias.device == dev))
        and scaling.shape == (n,) and scaling.dtype == torch.float32
        and scaling.device == dev and not scaling.requires_grad
        and adapter_ids.shape == x.shape[:-1] and adapter_ids.dtype == torch.int64
        and adapter_ids.device == dev
        and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
    )


def _check_ids(adapter_ids: Tensor, n: int) -> None:
    """The values of adapter_ids, in [-1, n). They need a device-to-host read, which
    torch.compile cannot trace: compiled, the C++ kernels still refuse a bad id; the Triton
    kernels skip the rows of one."""
    if adapter_ids.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(adapter_ids)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_ids: expected values in [-1, {n}) (-1 = the base "
                             f"alone; lora_A holds {n} adapters), got {bad}")


def check_multi_lora_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                          lora_B: Tensor, scaling: Tensor, adapter_ids: Tensor) -> None:
    """Every argument of :func:`multi_lora_linear` but the scalars; errors name the
    argument. Checks values of ``adapter_ids`` too (one reduction over T integers)."""
    check_float_input("x", x)
    check_tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features} (weight is "
                         f"{tuple(weight.shape)} = (out, in)), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(out_features,))
    check_tensor("lora_A", lora_A, shape=(None, None, in_features))
    n, rank = lora_A.shape[:2]
    if n < 1 or rank < 1:
        raise ValueError("lora_A: expected (n, r, in) with n >= 1 adapters and rank r >= 1, "
                         f"got shape {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, shape=(n, out_features, rank))
    check_same_dtype({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A,
                      "lora_B": lora_B})
    check_tensor("scaling", scaling, shape=(n,), dtype=torch.float32)
    if scaling.requires_grad:
        raise ValueError("scaling: expected a constant per adapter, got a tensor that "
                         "requires grad (no gradient is computed for it); pass "
                         "scaling.detach()")
    check_tensor("adapter_ids", adapter_ids, dtype=torch.int64)
    if adapter_ids.shape != x.shape[:-1]:
        raise ValueError(f"adapter_ids: expected shape {tuple(x.shape[:-1])} (x.shape[:-1], "
                         f"one id per row of x), got {tuple(adapter_ids.shape)}")
    check_same_device({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A,
                       "lora_B": lora_B, "scaling": scaling, "adapter_ids": adapter_ids})
    _check_ids(adapter_ids, n)


# fastpeft._C.multi_lora_linear_call (csrc/calls.cpp), or a stand-in that declines every call
_NATIVE_CALL = _backend.native_call("multi_lora_linear")


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """A linear layer plus one of ``n`` LoRA adapters per row, fused:
    ``y[t] = x[t] @ weight.T + bias + scaling[i] * (dropout(x[t]) @ lora_A[i].T) @
    lora_B[i].T`` with ``i = adapter_ids[t]`` (``-1``: the base alone).

    Args:
        x: ``(..., in)`` activations, fp32 / fp16 / bf16 (fp64 for gradcheck).
        weight: ``(out, in)`` frozen base weight, same dtype and device as ``x``; row-major
            or the transposed view of a row-major ``(in, out)`` tensor, as in
            :func:`fastpeft.lora_linear`.
        bias: ``(out,)`` or ``None``.
        lora_A: ``(n, r, in)``; lora_B: ``(n, out, r)``: the adapters stacked, those of a
            smaller rank zero-padded to ``r``.
        scaling: ``(n,)`` float32, each adapter's ``lora_alpha / r``.
        adapter_ids: int64 of shape ``x.shape[:-1]``, values in ``[-1, n)``.
        dropout_p: dropout probability on the LoRA branch input, ``0 <= p < 1``.
        training: dropout applies only when true.

    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to ``x``, ``lora_A`` and ``lora_B``
        (zero for adapters no row names), and to ``weight`` and ``bias`` when they require
        grad.
    """
    if _backend.eager_native():  # the usual eager CPU call, in C++ (None: not that)
        y = _NATIVE_CALL(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p,
                           training)
        if y is not None:
            return y
    op = _backend.resolve("multi_lora_linear", x) if isinstance(x, Tensor) else None
    if _usual_args(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p):
        # (the C++ op checks the ids' values itself, as this would, where it runs)
        if op is not _NATIVE or weight.numel() == 0:
            _check_ids(adapter_ids, lora_A.shape[0])
    else:
        check_multi_lora_args(x, weight, bias, lora_A, lora_B, scaling, adapter_ids)
        dropout_p = check_scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_inclusive=False)
    if training is not True and training is not False:
        training = check_bool("training", training)
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None

    flat = x.dim() == 2  # (rows, in): no reshapes (a serving call's usual input)
    lead = x.shape[:-1]
    x2 = x.contiguous() if flat else rows_of(x).contiguous()
    ids = adapter_ids.contiguous() if flat else adapter_ids.reshape(-1).contiguous()
    if op is None or x2.numel() == 0 or weight.numel() == 0:  # empty: reference
        y = reference.multi_lora_linear(x2, weight, bias, lora_A, lora_B, scaling, ids, p,
                                        True, seed)
    else:
        y, _ = op(x2, base_weight(weight), bias, lora_A.contiguous(), lora_B.contiguous(),
                  scaling.contiguous(), ids, p, seed)
    return y if flat else y.reshape(*lead, weight.shape[0])
