"""Launchers of ``fastpeft::bottleneck_adapter_triton`` and its backward.

    h = layer_norm(x, ln_w, ln_b, eps) if ln_w is given else x
    y = (residual or x) + s * (act(h @ Wd^T + bd) @ Wu^T + bu)

Shapes (2-D; the public wrapper flattens leading dims): x, residual, y (T, d);
down_weight Wd (m, d), bd (m,); up_weight Wu (d, m), bu (d,); ln_w, ln_b (d,). Forward: one
launch (y, and the layer norm's mean / rstd). Backward: three launches (a, dz and dx per
row block; d Wu / d bu partials; G = dz^T @ xhat partials), then torch ops that sum the
partials and form the weight, bias and layer-norm gradients from G. The kernels and the
math are in :mod:`.bottleneck_adapter_kernels`.
"""

import struct

import torch
import triton
from torch import Tensor

from ._common import acc_dtype, allow_tf32, dot_block, size_bucket
from .bottleneck_adapter_kernels import ACT_CODES, M_TIERS, tuned_kernel

__all__ = ["backward", "forward"]


def _kernel(kind: str, x: Tensor, m_pad: int):
    """The autotuned kernel for x's dtype and M_PAD (M_PAD > 512 uses the 512 configs)."""
    operands = "half" if x.dtype in (torch.float16, torch.bfloat16) else "full"
    tier = next((t for t in M_TIERS if m_pad <= t), M_TIERS[-1])
    return tuned_kernel(kind, operands, tier)


def _act_code(activation: str) -> int:
    try:
        return ACT_CODES[activation]
    except KeyError:
        raise ValueError(
            f"activation: expected one of {tuple(ACT_CODES)}, got {activation!r}") from None


def _hi_lo(v: float) -> tuple[float, float]:
    """v as fp32 hi + lo (hi = v rounded to fp32): kernels see float args as fp32, and
    hi + lo formed in fp64 is v to ~2^-48 relative."""
    v = float(v)
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return v, 0.0
    return hi, v - hi


def _z_bias(down_weight: Tensor, down_bias: Tensor | None, ln_bias: Tensor | None,
            acc: torch.dtype) -> Tensor | None:
    """zb = bd + Wd @ ln_b (m,) in the accumulation dtype, or None when both are absent."""
    zb = None
    if ln_bias is not None:
        zb = torch.mv(down_weight.to(acc), ln_bias.to(acc))
    if down_bias is not None:
        zb = down_bias.to(acc) if zb is None else zb + down_bias.to(acc)
    return None if zb is None else zb.contiguous()  # a strided down_bias stays a view


def _t_splits(T: int, D: int, m_pad: int) -> tuple[int, int]:
    """(splits, rows per split) of the weight-gradient T reduction: about 512 programs of
    64 columns, at most T / (16 * M_PAD) splits (the fp32 partials then stay within ~1/8 of
    the kernels' dy / x traffic), rows per split a multiple of 128 (every BLOCK_T)."""
    want = triton.cdiv(512, max(1, triton.cdiv(D, 64)))
    splits = max(1, min(want, T // (16 * m_pad), triton.cdiv(T, 128)))
    rows = triton.cdiv(triton.cdiv(T, splits), 128) * 128
    return triton.cdiv(T, rows), rows


def forward(x: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
            up_bias: Tensor | None, residual: Tensor | None, ln_weight: Tensor | None,
            ln_bias: Tensor | None, activation: str, scaling: float,
            ln_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y (T, d), mean (T,), rstd (T,)); mean / rstd are empty without the layer norm."""
    x, down_weight, up_weight = (t.contiguous() for t in (x, down_weight, up_weight))
    T, D = x.shape
    M = down_weight.shape[0]
    acc = acc_dtype(x.dtype)
    has_ln = ln_weight is not None
    y = torch.empty_like(x)
    mean = x.new_empty((T if has_ln else 0,), dtype=acc)
    rstd = torch.empty_like(mean)
    act = _act_code(activation)
    if T == 0:
        return y, mean, rstd
    zb = _z_bias(down_weight, down_bias, ln_bias if has_ln else None, acc)
    m_pad = dot_block(M)
    s_hi, s_lo = _hi_lo(scaling)
    e_hi, e_lo = _hi_lo(ln_eps)
    res = x if residual is None else residual.contiguous()
    _kernel("fwd", x, m_pad)[
        lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)
    ](x, down_weight, x if zb is None else zb, up_weight,
      x if up_bias is None else up_bias.contiguous(), res,
      x if ln_weight is None else ln_weight.contiguous(), y, mean if has_ln else x,
      rstd if has_ln else x, T, D, M, size_bucket(T), s_hi, s_lo, e_hi, e_lo,
      HAS_LN=has_ln, HAS_ZB=zb is not None, HAS_BU=up_bias is not None, ACT=act,
      IS_FP64=x.dtype == torch.float64, ALLOW_TF32=allow_tf32(x.dtype), M_PAD=m_pad)
    return y, mean, rstd


def backward(
    grad_y: Tensor, x: Tensor, down_weight: Tensor, down_bias: Tensor | None,
    up_weight: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, mean: Tensor,
    rstd: Tensor, activation: str, scaling: float, residual_is_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d down_weight, d down_bias (m,), d up_weight, d up_bias (d,), d ln_weight,
    d ln_bias); the last two are (d,) with the layer norm, else empty. Math:
    :mod:`.bottleneck_adapter_kernels`."""
    grad_y, x, down_weight, up_weight = (
        t.contiguous() for t in (grad_y, x, down_weight, up_weight))
    T, D = x.shape
    M = down_weight.shape[0]
    has_ln = ln_weight is not None
    d_ln = D if has_ln else 0
    act = _act_code(activation)
    dx = torch.empty_like(x)
    if T == 0 or D == 0:  # sums over no rows, or over no columns of dy
        return (dx, torch.zeros_like(down_weight), x.new_zeros(M), torch.zeros_like(up_weight),
                x.new_zeros(D), x.new_zeros(d_ln), x.new_zeros(d_ln))
    acc = acc_dtype(x.dtype)
    m_pad = dot_block(M)
    s_hi, s_lo = _hi_lo(scaling)
    tb = size_bucket(T)
    common = dict(IS_FP64=x.dtype == torch.float64, ALLOW_TF32=allow_tf32(x.dtype),
                  M_PAD=m_pad)
    zb = _z_bias(down_weight, down_bias, ln_bias if has_ln else None, acc)
    if has_ln:
        mean, rstd = mean.contiguous(), rstd.contiguous()
        wd_acc, lnw_acc = down_weight.to(acc), ln_weight.to(acc)
        c1 = torch.mv(wd_acc, lnw_acc)
    else:
        mean = rstd = c1 = x  # placeholders, never read

    # a, dz (T, m) scratch in the input dtype; dbd partials per 16 rows; dx.
    a_scr = x.new_empty((T, M))
    dz_scr = x.new_empty((T, M))
    dbd_part = x.new_empty((triton.cdiv(T, 16), M), dtype=acc)
    _kernel("bwd_rows", x, m_pad)[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
        grad_y, x, down_weight, x if zb is None else zb, up_weight,
        ln_weight.contiguous() if has_ln else x, c1, mean, rstd, a_scr, dz_scr, dbd_part, dx,
        T, D, M, tb, s_hi, s_lo, HAS_LN=has_ln, HAS_ZB=zb is not None,
        ADD_DY=bool(residual_is_x), ACT=act, **common)
    d_bd = dbd_part.sum(0)

    # Weight gradients: per-split partials over T, summed here.
    splits, rows_per_split = _t_splits(T, D, m_pad)
    dwu_part = x.new_empty((splits, D, M), dtype=acc)
    dbu_part = x.new_empty((splits, D), dtype=acc)
    _kernel("bwd_up", x, m_pad)[lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), splits)](
        grad_y, a_scr, dwu_part, dbu_part, T, D, M, tb, rows_per_split, **common)
    # G = dz^T @ (xhat or x) (m, d). With h = xhat * ln_w + ln_b and dh = dz @ Wd:
    #   d Wd = G * ln_w + d_bd (x) ln_b,  d ln_w = sum_k Wd * G,  d ln_b = Wd^T @ d_bd
    # (sum_t dh * xhat = sum_k Wd[k] * (dz^T @ xhat)[k], sum_t dh = Wd^T @ sum_t dz): no
    # per-row dh is needed here.
    g_part = x.new_empty((splits, M, D), dtype=acc)
    _kernel("bwd_down", x, m_pad)[lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), splits)](
        x, dz_scr, mean, rstd, g_part, T, D, M, tb, rows_per_split, HAS_LN=has_ln, **common)
    g = g_part.sum(0)

    dt = x.dtype
    if has_ln:
        d_down_weight = g * lnw_acc
        if ln_bias is not None:
            d_down_weight += torch.outer(d_bd, ln_bias.to(acc))
        d_ln_weight = (wd_acc * g).sum(0).to(dt)
        d_ln_bias = torch.mv(wd_acc.t(), d_bd).to(dt)
    else:
        d_down_weight = g
        d_ln_weight, d_ln_bias = x.new_empty(0), x.new_empty(0)
    d_up_weight = (dwu_part.sum(0) * scaling).to(dt)
    d_up_bias = (dbu_part.sum(0) * scaling).to(dt)
    return (dx, d_down_weight.to(dt), d_bd.to(dt), d_up_weight, d_up_bias, d_ln_weight,
            d_ln_bias)
