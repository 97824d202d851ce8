"""Triton kernels of ``fastpeft::bottleneck_adapter_triton`` and
``fastpeft::bottleneck_adapter_backward_triton``.

Shapes (2-D, contiguous; the public wrapper flattens leading dims): x, residual, y (T, d);
Wd = down_weight (m, d), bd (m,); Wu = up_weight (d, m), bu (d,); ln_w, ln_b (d,).
M_PAD = next power of two >= max(m, 16) (tl.dot's minimum); padded columns are masked to 0
(act(0) = 0 for every activation, so they stay 0).

    h = LN(x) = xhat * ln_w + ln_b,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)
    z = h @ Wd^T + bd                                              (T, m)
    y = (residual or x) + s * (act(z) @ Wu^T + bu)

With the layer norm, z is computed as q + zb, q = (xhat * ln_w) @ Wd^T and the (m,) vector
zb = bd + Wd @ ln_b formed once on the host in the accumulation dtype (the same z; ln_b
never goes through the low-precision dot). q also gives the backward its layer-norm row
reductions for free (below).

Forward, one launch (``_bottleneck_fwd``), a program per BLOCK_T rows, the (BLOCK_T, M_PAD)
bottleneck kept on chip:
  1. (LN) mean and M2 of each row in one pass over d: the chunk's own mean / M2 merged into
     the running ones (Chan et al.), stable for rows with a large mean; mean, rstd stored;
  2. z = sum over d chunks of tl.dot(h chunk, Wd^T chunk), + zb; a = act(z) in registers;
  3. per d chunk: y = res + s * (a @ Wu^T chunk + bu), stored.

Backward (dy = dL/dy, s = scaling), recomputing z from x and the saved mean / rstd:
    a = act(z),  dz = s * (dy @ Wu) * act'(z)                      (T, m)
    d Wu = s * dy^T @ a,  d bu = s * sum_t dy,  d Wd = dz^T @ h,  d bd = sum_t dz
    dh = dz @ Wd;  LN:  g = dh * ln_w,
        dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))
        d ln_w = sum_t dh * xhat,  d ln_b = sum_t dh
    dx += dy when the residual is x.
Three launches:
  ``_bottleneck_bwd_rows``, a program per BLOCK_T rows:
    1. one pass over d: q += (xhat * ln_w or x) @ Wd^T and da += dy @ Wu (two
       (BLOCK_T, M_PAD) accumulators); z = q + zb, a = act(z), dz; a and dz are stored as
       (T, m) scratch in the input dtype (the weight-gradient dots take them in that dtype,
       as the unfused composition does), the block's fp32 column sums of dz for d bd;
    2. the row reductions need no pass over d: with c1 = Wd @ ln_w (m,, host),
           sum_j g_j = dz . c1   and   sum_j g_j xhat_j = dz . q;
    3. one pass over d: dh = dz @ Wd chunk, dx chunk from the formula above, stored.
    x is read twice, dy once (twice when dx += dy).
  ``_bottleneck_bwd_up``    d Wu[cols] = dy[t, cols]^T @ a[t], d bu[cols] = sum_t dy[t, cols]
  ``_bottleneck_bwd_down``  G[:, cols] = dz[t]^T @ xhat[t, cols] (x without LN)
    programs over (d-column blocks x T splits), T split so that d = 4096, T = 16384 still
    fills an H100; each writes fp32 partials (splits, ...) that torch sums. From G:
        d Wd = G * ln_w + d_bd (x) ln_b,  d ln_w = sum_k Wd * G,  d ln_b = Wd^T @ d_bd
    (sum_t dh * xhat = sum_k Wd[k] * (dz^T @ xhat)[k] and sum_t dh = Wd^T @ sum_t dz), so no
    per-row dh is recomputed for the weight gradients; these (m, d) products are torch ops.

Accumulation is fp32 (fp64 for fp64 inputs); h and act(z) are rounded to the input dtype
before their dots, as in the unfused composition; outputs are stored in the input dtype,
mean / rstd in fp32 (fp64 for fp64 x). fp32 operands use tl.dot's "ieee" precision unless
torch's float32 matmul precision allows TF32. A float argument reaches a compiled kernel
as fp32, so ``scaling`` and ``ln_eps`` are passed as fp32 (hi, lo) pairs whose sum, formed
in fp64, restores the fp64 value for fp64 inputs.
"""

import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import allow_tf32 as _allow_tf32
from ._common import cfgs as _cfgs
from ._common import register_opaque
from ._common import size_bucket as _t_bucket
from ._common import skip_launch as _skip_launch
from ._common import tuned as _tuned

__all__ = ["bottleneck_adapter_backward_triton", "bottleneck_adapter_triton"]

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}

# ---------------------------------------------------------------------------------------
# Configs, per kernel, operand class and M_PAD (one autotuner each, built on first use).
# The (BLOCK_T, M_PAD) fp32 bottleneck and the (BLOCK_D, M_PAD) weight tiles live on chip,
# so the blocks shrink as m grows. "half": fp16 / bf16 operands (tensor cores); "full":
# fp32 and fp64 operands (fp32 dots without TF32 run on the FMA units, with operands in
# registers: small tiles). Compiled for sm_90 with Triton 3.9 (ptxas -v): no register
# spills for bf16 / fp16 / fp32, except "full" bwd_rows at M_PAD 512 (32 bytes; 12 with
# TF32); fp64 (gradcheck only) spills in a few configs, and its fwd (32, 32) config at
# M_PAD 512 needs more shared memory than an H100 has (the autotuner skips it).
# ---------------------------------------------------------------------------------------

_INTERPRETED = {"BLOCK_T": 16, "BLOCK_D": 32}

# (BLOCK_T, BLOCK_D, num_warps, num_stages)
_CONFIGS = {
    "fwd": {
        "half": {
            64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3),
                 (128, 128, 8, 2)],
            128: [(64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 3),
                  (32, 64, 8, 2)],
            256: [(32, 64, 4, 3), (32, 32, 8, 3), (32, 64, 8, 2), (64, 32, 8, 3),
                  (16, 32, 4, 3)],
            512: [(16, 32, 4, 3), (32, 32, 8, 3), (32, 64, 8, 2), (16, 64, 8, 2),
                  (16, 32, 8, 3)],
        },
        "full": {
            64: [(32, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
            128: [(32, 32, 8, 2), (64, 16, 8, 2), (16, 32, 4, 2), (32, 32, 4, 2)],
            256: [(32, 32, 8, 2), (64, 16, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
            512: [(16, 16, 4, 2), (16, 16, 8, 2), (32, 32, 8, 2)],
        },
    },
    # Two (BLOCK_T, M_PAD) accumulators and two weight tiles per d step.
    "bwd_rows": {
        "half": {
            64: [(32, 64, 4, 3), (64, 64, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3),
                 (16, 64, 4, 3)],
            128: [(32, 32, 4, 3), (32, 64, 8, 3), (16, 64, 4, 3), (32, 32, 8, 3),
                  (16, 32, 8, 3)],
            256: [(16, 32, 8, 3), (32, 32, 8, 3), (16, 16, 8, 3), (16, 64, 8, 2)],
            512: [(16, 16, 8, 3), (16, 16, 8, 2)],
        },
        "full": {
            64: [(32, 32, 8, 2), (64, 16, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)],
            128: [(16, 16, 8, 2), (32, 16, 4, 2)],
            256: [(16, 16, 8, 2)],
            512: [(16, 16, 8, 2)],
        },
    },
    # One (BLOCK_D, M_PAD) accumulator, T streamed in BLOCK_T steps.
    "bwd_up": {
        "half": {
            64: [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 2),
                 (32, 128, 4, 3)],
            128: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 3), (64, 32, 4, 3),
                  (32, 64, 4, 3)],
            256: [(32, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 3), (32, 32, 8, 2),
                  (64, 32, 4, 3)],
            512: [(32, 16, 4, 3), (32, 32, 8, 2), (16, 32, 8, 3)],
        },
        "full": {
            64: [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
            128: [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
            256: [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 16, 4, 2)],
            512: [(32, 32, 8, 2), (32, 16, 4, 2)],
        },
    },
}
_CONFIGS["bwd_down"] = {
    "half": {**_CONFIGS["bwd_up"]["half"],
             256: [(32, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 3), (32, 32, 8, 2)]},
    "full": _CONFIGS["bwd_up"]["full"],
}
_M_TIERS = (64, 128, 256, 512)
_KEY = ["T_BUCKET", "D", "M_PAD"]

# ---------------------------------------------------------------------------------------
# Activations, in the accumulation dtype
# ---------------------------------------------------------------------------------------


@triton.jit
def _sigmoid_pair(v):
    """(sigmoid(v), 1 - sigmoid(v)) = (sigmoid(v), sigmoid(-v)), both without cancellation
    (e = exp(-|v|) <= 1 never overflows)."""
    e = tl.exp(-tl.abs(v))
    p = 1.0 / (1.0 + e)  # sigmoid(|v|)
    q = e * p  # sigmoid(-|v|)
    pos = v >= 0
    return tl.where(pos, p, q), tl.where(pos, q, p)


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)); act(0) = 0 for every activation, so padded columns stay 0.
    gelu_tanh uses 1 + tanh(u) = 2 sigmoid(2u): z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715
    z^3), with no tanh and no cancellation near 0."""
    if ACT == 0:
        pos = z > 0
        a = tl.where(pos, z, 0.0)
        g = tl.where(pos, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        a = z * cdf
        g = cdf + z * (0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACT == 2:
        zz = z * z
        sg, sm = _sigmoid_pair(z * (1.5957691216057308 + (1.5957691216057308 * 0.044715) * zz))
        a = z * sg
        g = sg + z * (sg * sm) * (1.5957691216057308 + (1.5957691216057308 * 3.0 * 0.044715)
                                  * zz)
    else:
        sg, sm = _sigmoid_pair(z)
        a = z * sg
        g = sg * (1.0 + z * sm)
    return a, g


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _bottleneck_fwd(x_ptr, wd_ptr, zb_ptr, wu_ptr, bu_ptr, res_ptr, lnw_ptr, y_ptr, mean_ptr,
                    rstd_ptr, T, D, M, T_BUCKET, s_hi, s_lo, eps_hi, eps_lo,
                    HAS_LN: tl.constexpr, HAS_ZB: tl.constexpr, HAS_BU: tl.constexpr,
                    ACT: tl.constexpr, IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                    M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[rows] for one block of BLOCK_T rows (see the module docstring, forward 1-3)."""
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    in_ty = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    row_off = rows.to(tl.int64)[:, None] * D
    mm = tl.arange(0, M_PAD)
    m_ok = mm < M
    dd = tl.arange(0, BLOCK_D)

    if HAS_LN:
        # 1. Row statistics, chunk by chunk: merge (n_a, mean, m2) with the chunk's own.
        mean = tl.zeros((BLOCK_T,), dtype=acc_ty)
        m2 = tl.zeros((BLOCK_T,), dtype=acc_ty)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dd
            col_ok = cols < D
            xt = tl.load(x_ptr + row_off + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(acc_ty)
            n_b = tl.sum(col_ok.to(acc_ty), axis=0)
            n_a = d0 * 1.0
            c_mean = tl.sum(xt, axis=1) / n_b
            diff = tl.where(col_ok[None, :], xt - c_mean[:, None], 0.0)
            delta = c_mean - mean
            mean += delta * (n_b / (n_a + n_b))
            m2 += tl.sum(diff * diff, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
        var = m2 / D
        if IS_FP64:
            var = var + eps_hi + eps_lo
        else:
            var = var + eps_hi
        rstd = 1.0 / tl.sqrt(var)
        tl.store(mean_ptr + rows, mean.to(mean_ptr.dtype.element_ty), mask=row_ok)
        tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=row_ok)

    # 2. z = (xhat * ln_w or x) @ Wd^T + zb, on chip.
    z = tl.zeros((BLOCK_T, M_PAD), dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        col_ok = cols < D
        xt = tl.load(x_ptr + row_off + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)
        if HAS_LN:
            lnw = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
            xt = ((xt.to(acc_ty) - mean[:, None]) * rstd[:, None] * lnw[None, :]).to(in_ty)
        # Wd^T tile (BLOCK_D, M_PAD) read straight from row-major Wd (m, d).
        wdt = tl.load(wd_ptr + mm[None, :] * D + cols[:, None],
                      mask=col_ok[:, None] & m_ok[None, :], other=0.0)
        z = tl.dot(xt, wdt, z, input_precision="tf32" if ALLOW_TF32 else "ieee")
    if HAS_ZB:
        z += tl.load(zb_ptr + mm, mask=m_ok, other=0.0)[None, :]
    a, _ = _act_and_grad(z, ACT)  # the backward's formula; the unused act' is dropped
    a = a.to(in_ty)

    # 3. y = res + s * (a @ Wu^T + bu), chunk by chunk.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        col_ok = cols < D
        # Wu^T tile (M_PAD, BLOCK_D) from row-major Wu (d, m).
        wut = tl.load(wu_ptr + cols[None, :] * M + mm[:, None],
                      mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(a, wut, input_precision="tf32" if ALLOW_TF32 else "ieee")
        if HAS_BU:
            u += tl.load(bu_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        out = tl.load(res_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        out += u * s_hi
        if IS_FP64:
            out += u * s_lo
        tl.store(y_ptr + row_off + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _bottleneck_bwd_rows(dy_ptr, x_ptr, wd_ptr, zb_ptr, wu_ptr, lnw_ptr, c1_ptr, mean_ptr,
                         rstd_ptr, a_ptr, dz_ptr, dbd_ptr, dx_ptr, T, D, M, T_BUCKET, s_hi,
                         s_lo, HAS_LN: tl.constexpr, HAS_ZB: tl.constexpr,
                         ADD_DY: tl.constexpr, ACT: tl.constexpr, IS_FP64: tl.constexpr,
                         ALLOW_TF32: tl.constexpr, M_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of BLOCK_T rows: a, dz (scratch, input dtype), the block's column sums of
    dz (row pid * BLOCK_T / 16 of dbd, zeros in its other BLOCK_T / 16 - 1 rows, so that
    every config fills the (cdiv(T, 16), m) buffer) and dx."""
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    in_ty = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    row_off = rows.to(tl.int64)[:, None] * D
    mm = tl.arange(0, M_PAD)
    m_ok = mm < M
    dd = tl.arange(0, BLOCK_D)
    if HAS_LN:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)

    # 1. q = (xhat * ln_w or x) @ Wd^T and da = dy @ Wu in one pass over d.
    q = tl.zeros((BLOCK_T, M_PAD), dtype=acc_ty)
    da = tl.zeros((BLOCK_T, M_PAD), dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0)
        if HAS_LN:
            lnw = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
            xt = ((xt.to(acc_ty) - mean[:, None]) * rstd[:, None] * lnw[None, :]).to(in_ty)
        wdt = tl.load(wd_ptr + mm[None, :] * D + cols[:, None],
                      mask=col_ok[:, None] & m_ok[None, :], other=0.0)
        q = tl.dot(xt, wdt, q, input_precision="tf32" if ALLOW_TF32 else "ieee")
        dyt = tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0)
        # Wu chunk (BLOCK_D, M_PAD): rows cols of row-major Wu (d, m).
        wuc = tl.load(wu_ptr + cols[:, None] * M + mm[None, :],
                      mask=col_ok[:, None] & m_ok[None, :], other=0.0)
        da = tl.dot(dyt, wuc, da, input_precision="tf32" if ALLOW_TF32 else "ieee")

    z = q
    if HAS_ZB:
        z = q + tl.load(zb_ptr + mm, mask=m_ok, other=0.0)[None, :]
    a, g = _act_and_grad(z, ACT)
    dz = da * g * s_hi  # rows past T have dy = 0, padded columns Wu = 0: dz = 0 there
    if IS_FP64:
        dz += da * g * s_lo
    mt_mask = row_ok[:, None] & m_ok[None, :]
    mt_off = rows.to(tl.int64)[:, None] * M + mm[None, :]
    tl.store(a_ptr + mt_off, a.to(a_ptr.dtype.element_ty), mask=mt_mask)
    dzq = dz.to(in_ty)
    tl.store(dz_ptr + mt_off, dzq, mask=mt_mask)
    # d bd partials, fp32 (fp64) sums of the unrounded dz.
    GROUPS: tl.constexpr = BLOCK_T // 16
    grp = tl.arange(0, GROUPS)
    part = tl.where(grp[:, None] == 0, tl.sum(dz, axis=0)[None, :], 0.0)
    grow = pid * GROUPS + grp
    tl.store(dbd_ptr + grow[:, None] * M + mm[None, :], part,
             mask=(grow < tl.cdiv(T, 16))[:, None] & m_ok[None, :])

    if HAS_LN:
        # Row means of g = dh * ln_w and g * xhat from dz alone (module docstring).
        dzf = dzq.to(acc_ty)
        c1 = tl.load(c1_ptr + mm, mask=m_ok, other=0.0)
        mean_g = tl.sum(dzf * c1[None, :], axis=1) / D
        mean_gx = tl.sum(dzf * q, axis=1) / D

    # 2. dx = LN backward of dh = dz @ Wd (or dh), + dy.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        wdc = tl.load(wd_ptr + mm[:, None] * D + cols[None, :],
                      mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        dh = tl.dot(dzq, wdc, input_precision="tf32" if ALLOW_TF32 else "ieee")
        if HAS_LN:
            xt = tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(acc_ty)
            xhat = (xt - mean[:, None]) * rstd[:, None]
            lnw = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
            dh = rstd[:, None] * (dh * lnw[None, :] - mean_g[:, None] - xhat * mean_gx[:, None])
        if ADD_DY:
            dh += tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        tl.store(dx_ptr + row_off + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bottleneck_bwd_up(dy_ptr, a_ptr, dwu_ptr, dbu_ptr, T, D, M, T_BUCKET, rows_per_split,
                       IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr, M_PAD: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials of d Wu[cols] = dy[t, cols]^T @ a[t] and d bu[cols] = sum_t dy[t, cols] over
    the rows t of split program_id(1) (unscaled: s is applied after the sum)."""
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    split = tl.program_id(1)
    t_lo = split * rows_per_split
    t_hi = tl.minimum(T, t_lo + rows_per_split)
    mm = tl.arange(0, M_PAD)
    m_ok = mm < M
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_D, M_PAD), dtype=acc_ty)
    bsum = tl.zeros((BLOCK_D,), dtype=acc_ty)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + tt
        row_ok = rows < t_hi
        # dy^T tile (BLOCK_D, BLOCK_T) from row-major dy (T, d).
        dyt = tl.load(dy_ptr + rows.to(tl.int64)[None, :] * D + cols[:, None],
                      mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        at = tl.load(a_ptr + rows.to(tl.int64)[:, None] * M + mm[None, :],
                     mask=row_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(dyt, at, acc, input_precision="tf32" if ALLOW_TF32 else "ieee")
        bsum += tl.sum(dyt.to(acc_ty), axis=1)
    out = dwu_ptr + split.to(tl.int64) * D * M
    tl.store(out + cols[:, None] * M + mm[None, :], acc, mask=col_ok[:, None] & m_ok[None, :])
    tl.store(dbu_ptr + split.to(tl.int64) * D + cols, bsum, mask=col_ok)


@triton.jit
def _bottleneck_bwd_down(x_ptr, dz_ptr, mean_ptr, rstd_ptr, g_ptr, T, D, M, T_BUCKET,
                         rows_per_split, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr,
                         ALLOW_TF32: tl.constexpr, M_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials of G[:, cols] = dz[t]^T @ src[t, cols] over the rows t of split
    program_id(1), src = xhat with the layer norm (see the launcher), else x."""
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    in_ty = x_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    split = tl.program_id(1)
    t_lo = split * rows_per_split
    t_hi = tl.minimum(T, t_lo + rows_per_split)
    mm = tl.arange(0, M_PAD)
    m_ok = mm < M
    tt = tl.arange(0, BLOCK_T)
    # Computed transposed, G^T[cols] = src[t, cols]^T @ dz[t] (BLOCK_D, M_PAD), like the
    # d Wu kernel: the FMA path (fp32 without TF32) spills far less in this orientation.
    acc = tl.zeros((BLOCK_D, M_PAD), dtype=acc_ty)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + tt
        row_ok = rows < t_hi
        # src^T tile (BLOCK_D, BLOCK_T) from row-major x (T, d).
        src = tl.load(x_ptr + rows.to(tl.int64)[None, :] * D + cols[:, None],
                      mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        if HAS_LN:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
            src = ((src.to(acc_ty) - mean[None, :]) * rstd[None, :]).to(in_ty)
        dzt = tl.load(dz_ptr + rows.to(tl.int64)[:, None] * M + mm[None, :],
                      mask=row_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(src, dzt, acc, input_precision="tf32" if ALLOW_TF32 else "ieee")
    out = g_ptr + split.to(tl.int64) * M * D
    tl.store(out + mm[None, :] * D + cols[:, None], acc, mask=col_ok[:, None] & m_ok[None, :])


_KERNEL_FNS = {"fwd": _bottleneck_fwd, "bwd_rows": _bottleneck_bwd_rows,
               "bwd_up": _bottleneck_bwd_up, "bwd_down": _bottleneck_bwd_down}


@functools.cache
def tuned_kernel(kind: str, operands: str, tier: int):
    """The autotuned kernel ``kind`` for an operand class ("half" / "full") and M_PAD tier."""
    configs = _cfgs(_INTERPRETED, [({"BLOCK_T": bt, "BLOCK_D": bd}, w, st)
                                   for bt, bd, w, st in _CONFIGS[kind][operands][tier]])
    return _tuned(configs, key=_KEY)(_KERNEL_FNS[kind])


# ---------------------------------------------------------------------------------------
# Launchers / registered ops
# ---------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _m_pad(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _kernel(kind: str, x: Tensor, m_pad: int):
    """The autotuned kernel for x's dtype and M_PAD (M_PAD > 512 uses the 512 configs)."""
    operands = "half" if x.dtype in (torch.float16, torch.bfloat16) else "full"
    tier = next((t for t in _M_TIERS if m_pad <= t), _M_TIERS[-1])
    return wrap_triton(tuned_kernel(kind, operands, tier))


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
    return zb


def _t_splits(T, D: int, m_pad: int):
    """(splits, rows per split) of the weight-gradient T reduction: about 512 programs of
    64 columns, at most T / (16 * M_PAD) splits (the fp32 partials then stay within ~1/8 of
    the kernels' dy / x traffic), rows per split a multiple of 128 (every BLOCK_T)."""
    want = triton.cdiv(512, max(1, triton.cdiv(D, 64)))
    splits = torch.sym_max(1, torch.sym_min(torch.sym_min(want, T // (16 * m_pad)),
                                            triton.cdiv(T, 128)))
    rows = triton.cdiv(triton.cdiv(T, splits), 128) * 128
    return triton.cdiv(T, rows), rows


@triton_op("fastpeft::bottleneck_adapter_triton", mutates_args=())
def bottleneck_adapter_triton(x: Tensor, down_weight: Tensor, down_bias: Tensor | None,
                              up_weight: Tensor, up_bias: Tensor | None,
                              residual: Tensor | None, ln_weight: Tensor | None,
                              ln_bias: Tensor | None, activation: str, scaling: float,
                              ln_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y (T, d), mean (T,), rstd (T,)); mean / rstd are empty without the layer norm."""
    x, down_weight, up_weight = (t.contiguous() for t in (x, down_weight, up_weight))
    T, D = x.shape
    M = down_weight.shape[0]
    acc = _acc_dtype(x.dtype)
    has_ln = ln_weight is not None
    y = torch.empty_like(x)
    mean = x.new_empty((T if has_ln else 0,), dtype=acc)
    rstd = torch.empty_like(mean)
    act = _act_code(activation)
    if T == 0 or _skip_launch(x):
        return y, mean, rstd
    zb = _z_bias(down_weight, down_bias, ln_bias if has_ln else None, acc)
    m_pad = _m_pad(M)
    s_hi, s_lo = _hi_lo(scaling)
    e_hi, e_lo = _hi_lo(ln_eps)
    res = x if residual is None else residual.contiguous()
    _kernel("fwd", x, m_pad)[
        lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)
    ](x, down_weight, x if zb is None else zb, up_weight,
      x if up_bias is None else up_bias.contiguous(), res,
      x if ln_weight is None else ln_weight.contiguous(), y, mean if has_ln else x,
      rstd if has_ln else x, T, D, M, _t_bucket(T), s_hi, s_lo, e_hi, e_lo,
      HAS_LN=has_ln, HAS_ZB=zb is not None, HAS_BU=up_bias is not None, ACT=act,
      IS_FP64=x.dtype == torch.float64, ALLOW_TF32=_allow_tf32(x.dtype), M_PAD=m_pad)
    return y, mean, rstd


@triton_op("fastpeft::bottleneck_adapter_backward_triton", mutates_args=())
def bottleneck_adapter_backward_triton(
    grad_y: Tensor, x: Tensor, down_weight: Tensor, down_bias: Tensor | None,
    up_weight: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, mean: Tensor,
    rstd: Tensor, activation: str, scaling: float, residual_is_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d down_weight, d down_bias (m,), d up_weight, d up_bias (d,), d ln_weight,
    d ln_bias); the last two are (d,) with the layer norm, else empty. Math: module
    docstring."""
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
    if _skip_launch(x):
        return (dx, torch.empty_like(down_weight), x.new_empty(M), torch.empty_like(up_weight),
                x.new_empty(D), x.new_empty(d_ln), x.new_empty(d_ln))
    acc = _acc_dtype(x.dtype)
    m_pad = _m_pad(M)
    s_hi, s_lo = _hi_lo(scaling)
    tb = _t_bucket(T)
    common = dict(IS_FP64=x.dtype == torch.float64, ALLOW_TF32=_allow_tf32(x.dtype),
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


# Under the interpreter, keep the ops opaque to AOTDispatcher (see register_opaque).
register_opaque(bottleneck_adapter_triton, bottleneck_adapter_backward_triton)
