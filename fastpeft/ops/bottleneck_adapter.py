"""``fastpeft.bottleneck_adapter``: a bottleneck adapter with its residual, fused.

    h = layer_norm(x) if ln_weight is given else x
    z = h @ down_weight.T + down_bias           (T, m)   the bottleneck, never stored
    y = residual + scaling * (act(z) @ up_weight.T + up_bias)

Forward saves nothing but its inputs and, with the layer norm, two floats per row (mean
and 1/std). Backward recomputes z from x, then (dy = dL/dy, s = scaling):
    da         = s * dy @ up_weight                 (T, m)
    dz         = da * act'(z)
    d up_w     = s * dy.T @ act(z),   d up_b   = s * dy.sum(0)
    d down_w   = dz.T @ h,            d down_b = dz.sum(0)
    dh         = dz @ down_weight                   (T, d)
    dx         = LN backward of dh (or dh) + dy when the residual is x
    d ln_w     = (dh * xhat).sum(0),  d ln_b   = dh.sum(0)
    d residual = dy
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, reference
from ._checks import check_float_input, check_same_dtype, check_scalar, check_tensor, rows_of
from ._library import OpSpec, declare

if _backend.TRITON_AVAILABLE:
    from ..triton import bottleneck_adapter as triton_kernels
else:
    triton_kernels = None

__all__ = ["bottleneck_adapter"]

ACTIVATIONS = reference.ACTIVATIONS

# y (T, d); mean, rstd (T,) layer-norm statistics of x (empty when ln_weight is None),
# float32 (float64 for float64 x). The (T, m) bottleneck is recomputed in backward.
SCHEMA = ("(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
          "Tensor? up_bias, Tensor? residual, Tensor? ln_weight, Tensor? ln_bias, "
          "str activation, float scaling, float ln_eps) -> (Tensor, Tensor, Tensor)")
# (dx, d down_weight, d down_bias (m,), d up_weight, d up_bias (d,), d ln_weight,
# d ln_bias); the last two are empty when ln_weight is None. dx includes grad_y when the
# residual is x (residual_is_x); otherwise d residual = grad_y needs no kernel.
BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor down_weight, Tensor? down_bias, "
                   "Tensor up_weight, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, "
                   "Tensor rstd, str activation, float scaling, bool residual_is_x) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake(x, down_weight, down_bias, up_weight, up_bias, residual, ln_weight, ln_bias,
          activation, scaling, ln_eps):
    rows = x.shape[0] if ln_weight is not None else 0
    stats = x.new_empty(rows, dtype=_stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_fake(grad_y, x, down_weight, down_bias, up_weight, ln_weight, ln_bias, mean,
                   rstd, activation, scaling, residual_is_x):
    d = x.shape[1]
    d_ln = d if ln_weight is not None else 0
    return (
        torch.empty_like(x),
        torch.empty_like(down_weight),
        x.new_empty(down_weight.shape[0]),
        torch.empty_like(up_weight),
        x.new_empty(d),
        x.new_empty(d_ln),
        x.new_empty(d_ln),
    )


def _setup_context(ctx, inputs, output) -> None:
    (x, down_weight, down_bias, up_weight, _up_bias, residual, ln_weight, ln_bias,
     activation, scaling, _ln_eps) = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, ln_weight, ln_bias, mean, rstd)
    ctx.activation, ctx.scaling = activation, scaling
    ctx.residual_is_x = residual is None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(backward_op, ctx, grad_y: Tensor, _grad_mean, _grad_rstd):
    x, down_weight, down_bias, up_weight, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    dx, d_dw, d_db, d_uw, d_ub, d_lnw, d_lnb = backward_op(
        grad_y, x, down_weight, down_bias, up_weight, ln_weight, ln_bias, mean, rstd,
        ctx.activation, ctx.scaling, ctx.residual_is_x,
    )
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        d_dw if need[1] else None,
        d_db if need[2] else None,
        d_uw if need[3] else None,
        d_ub if need[4] else None,
        grad_y if need[5] else None,
        d_lnw if need[6] else None,
        d_lnb if need[7] else None,
        None,
        None,
        None,
    )



# (the compiled library's C++ autograd, csrc/bottleneck_autograd.cpp, replaces these two
# where it is built)
declare(OpSpec("bottleneck_adapter", SCHEMA, BACKWARD_SCHEMA, _fake, _backward_fake,
               _setup_context, _backward, triton_kernels))
_NATIVE_CALL = _backend.native_call("bottleneck_adapter")


def check_adapter_args(x, down_weight, down_bias, up_weight, up_bias, activation, residual,
                       ln_weight, ln_bias) -> None:
    """Shape / dtype / device checks of ``bottleneck_adapter``; each error names its
    argument."""
    d = x.shape[-1]
    # the odd dtype out named (x among weights of another dtype, or one weight), as
    # lora_linear does
    given = {"x": x, "down_weight": down_weight, "down_bias": down_bias,
             "up_weight": up_weight, "up_bias": up_bias, "ln_weight": ln_weight,
             "ln_bias": ln_bias, "residual": residual}
    check_same_dtype({n: t for n, t in given.items() if isinstance(t, Tensor)})
    check_tensor("down_weight", down_weight, ndim=2, like=x)
    if down_weight.shape[1] != d:
        raise ValueError(
            f"down_weight: expected shape (m, {d}) = (bottleneck, x.shape[-1]), got "
            f"{tuple(down_weight.shape)}"
        )
    m = down_weight.shape[0]
    if m < 1:
        raise ValueError("down_weight: expected at least one bottleneck row, got shape "
                         f"{tuple(down_weight.shape)}")
    if down_bias is not None:
        check_tensor("down_bias", down_bias, shape=(m,), like=x)
    check_tensor("up_weight", up_weight, shape=(d, m), like=x)
    if up_bias is not None:
        check_tensor("up_bias", up_bias, shape=(d,), like=x)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), like=x)
    if ln_weight is not None:
        check_tensor("ln_weight", ln_weight, shape=(d,), like=x)
    if ln_bias is not None:
        if ln_weight is None:
            raise ValueError("ln_bias: given without ln_weight (the layer norm is enabled by "
                             "ln_weight)")
        check_tensor("ln_bias", ln_bias, shape=(d,), like=x)


def bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    *,
    activation: str = "relu",
    residual: Tensor | None = None,
    scaling: float = 1.0,
    ln_weight: Tensor | None = None,
    ln_bias: Tensor | None = None,
    ln_eps: float = 1e-5,
) -> Tensor:
    """``residual + scaling * (act(LN(x) @ down_weight.T + down_bias) @ up_weight.T + up_bias)``,
    fused: the ``(..., m)`` bottleneck stays in cache / on chip and is recomputed in
    backward instead of being stored.

    Args:
        x: ``(..., d)`` activations, fp32 / fp16 / bf16 (fp64 for gradcheck).
        down_weight: ``(m, d)``; down_bias: ``(m,)`` or ``None``.
        up_weight: ``(d, m)``; up_bias: ``(d,)`` or ``None``.
        activation: ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.
        residual: added to the adapter output, shape of ``x``; ``None`` means ``x``.
        scaling: multiplies the adapter branch.
        ln_weight, ln_bias: ``(d,)``; when ``ln_weight`` is given the adapter's input is
            ``layer_norm(x, ln_weight, ln_bias, ln_eps)`` (the residual stays ``x``).
        ln_eps: the layer norm's epsilon, ``> 0``.

    Returns:
        ``(..., d)`` in ``x``'s dtype. Gradients flow to every tensor argument.
    """
    if _backend.eager_native():  # the usual eager CPU call, in C++ (None: not that)
        y = _NATIVE_CALL(x, down_weight, down_bias, up_weight, up_bias, activation, residual,
                         scaling, ln_weight, ln_bias, ln_eps)
        if y is not None:
            return y
    check_float_input("x", x)
    check_adapter_args(x, down_weight, down_bias, up_weight, up_bias, activation, residual,
                       ln_weight, ln_bias)
    scaling = check_scalar("scaling", scaling)
    ln_eps = check_scalar("ln_eps", ln_eps, lo=0.0, lo_inclusive=False)

    shape = x.shape
    op = _backend.resolve("bottleneck_adapter", x)
    if op is None or x.numel() == 0:  # an empty x: the reference gives the empty result
        return reference.bottleneck_adapter(
            x, down_weight, down_bias, up_weight, up_bias, activation=activation,
            residual=residual, scaling=scaling, ln_weight=ln_weight, ln_bias=ln_bias,
            ln_eps=ln_eps,
        )
    x2 = rows_of(x).contiguous()
    res2 = None if residual is None else rows_of(residual).contiguous()

    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    y, _, _ = op(x2, c(down_weight), down_bias, c(up_weight), up_bias, res2, ln_weight,
                 ln_bias, activation, scaling, ln_eps)
    return y.reshape(shape)
