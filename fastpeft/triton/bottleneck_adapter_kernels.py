"""Jit kernels of ``bottleneck_adapter``.

Shapes (2-D, contiguous): x, residual, y (T, d);
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

Forward, one launch (``bottleneck_adapter_forward_kernel``), a program per BLOCK_T rows,
the (BLOCK_T, M_PAD) bottleneck kept on chip:
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
  ``bottleneck_adapter_backward_rows_kernel``, a program per BLOCK_T rows:
    1. one pass over d: q += (xhat * ln_w or x) @ Wd^T and da += dy @ Wu (two
       (BLOCK_T, M_PAD) accumulators); z = q + zb, a = act(z), dz; a and dz are stored as
       (T, m) scratch in the input dtype (the weight-gradient dots take them in that dtype,
       as the unfused composition does), the block's fp32 column sums of dz for d bd;
    2. the row reductions need no pass over d: with c1 = Wd @ ln_w (m,, host),
           sum_j g_j = dz . c1   and   sum_j g_j xhat_j = dz . q;
    3. one pass over d: dh = dz @ Wd chunk, dx chunk from the formula above, stored.
    x is read twice, dy once (twice when dx += dy).
  ``bottleneck_adapter_backward_up_kernel``
      d Wu[cols] = dy[t, cols]^T @ a[t], d bu[cols] = sum_t dy[t, cols]
  ``bottleneck_adapter_backward_down_kernel``
      G[:, cols] = dz[t]^T @ xhat[t, cols] (x without LN)
    programs over (d-column blocks x T splits), T split so that d = 4096, T = 16384 still
    fills an H100; each writes fp32 partials (splits, ...) that torch sums. From G:
        d Wd = G * ln_w + d_bd (x) ln_b,  d ln_w = sum_k Wd * G,  d ln_b = Wd^T @ d_bd
    (sum_t dh * xhat = sum_k Wd[k] * (dz^T @ xhat)[k] and sum_t dh = Wd^T @ sum_t dz), so no
    per-row dh is recomputed for the weight gradients; these (m, d) products are torch ops
    in the launcher.

Accumulation is fp32 (fp64 for fp64 inputs); h and act(z) are rounded to the input dtype
before their dots, as in the unfused composition; outputs are stored in the input dtype,
mean / rstd in fp32 (fp64 for fp64 x). fp32 operands use tl.dot's "ieee" precision unless
torch's float32 matmul precision allows TF32. A float argument reaches a compiled kernel
as fp32, so ``scaling`` and ``ln_eps`` are passed as fp32 (hi, lo) pairs whose sum, formed
in fp64, restores the fp64 value for fp64 inputs.
"""

import functools

import triton
import triton.language as tl

from ._common import cfgs, tuned

# The ACT constexpr of the kernels (see _act_and_grad).
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
M_TIERS = (64, 128, 256, 512)  # the M_PAD tiers of _CONFIGS
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
def bottleneck_adapter_forward_kernel(x_ptr, wd_ptr, zb_ptr, wu_ptr, bu_ptr, res_ptr, lnw_ptr,
                                      y_ptr, mean_ptr, rstd_ptr, T, D, M, T_BUCKET, s_hi, s_lo,
                                      eps_hi, eps_lo, HAS_LN: tl.constexpr, HAS_ZB: tl.constexpr,
                                      HAS_BU: tl.constexpr, ACT: tl.constexpr,
                                      IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                      M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                                      BLOCK_D: tl.constexpr):
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
        z = tl.dot(xt, wdt, z, out_dtype=z.dtype, input_precision="tf32" if ALLOW_TF32 else "ieee")
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
def bottleneck_adapter_backward_rows_kernel(dy_ptr, x_ptr, wd_ptr, zb_ptr, wu_ptr, lnw_ptr, c1_ptr,
                                            mean_ptr, rstd_ptr, a_ptr, dz_ptr, dbd_ptr, dx_ptr, T,
                                            D, M, T_BUCKET, s_hi, s_lo, HAS_LN: tl.constexpr,
                                            HAS_ZB: tl.constexpr, ADD_DY: tl.constexpr,
                                            ACT: tl.constexpr, IS_FP64: tl.constexpr,
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
        q = tl.dot(xt, wdt, q, out_dtype=q.dtype, input_precision="tf32" if ALLOW_TF32 else "ieee")
        dyt = tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0)
        # Wu chunk (BLOCK_D, M_PAD): rows cols of row-major Wu (d, m).
        wuc = tl.load(wu_ptr + cols[:, None] * M + mm[None, :],
                      mask=col_ok[:, None] & m_ok[None, :], other=0.0)
        da = tl.dot(dyt, wuc, da, out_dtype=da.dtype,
                    input_precision="tf32" if ALLOW_TF32 else "ieee")

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
def bottleneck_adapter_backward_up_kernel(dy_ptr, a_ptr, dwu_ptr, dbu_ptr, T, D, M, T_BUCKET,
                                          rows_per_split, IS_FP64: tl.constexpr,
                                          ALLOW_TF32: tl.constexpr, M_PAD: tl.constexpr,
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
        acc = tl.dot(dyt, at, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        bsum += tl.sum(dyt.to(acc_ty), axis=1)
    out = dwu_ptr + split.to(tl.int64) * D * M
    tl.store(out + cols[:, None] * M + mm[None, :], acc, mask=col_ok[:, None] & m_ok[None, :])
    tl.store(dbu_ptr + split.to(tl.int64) * D + cols, bsum, mask=col_ok)


@triton.jit
def bottleneck_adapter_backward_down_kernel(x_ptr, dz_ptr, mean_ptr, rstd_ptr, g_ptr, T, D, M,
                                            T_BUCKET, rows_per_split, HAS_LN: tl.constexpr,
                                            IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                            M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                                            BLOCK_D: tl.constexpr):
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
        acc = tl.dot(src, dzt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    out = g_ptr + split.to(tl.int64) * M * D
    tl.store(out + mm[None, :] * D + cols[:, None], acc, mask=col_ok[:, None] & m_ok[None, :])


_KERNEL_FNS = {"fwd": bottleneck_adapter_forward_kernel,
               "bwd_rows": bottleneck_adapter_backward_rows_kernel,
               "bwd_up": bottleneck_adapter_backward_up_kernel,
               "bwd_down": bottleneck_adapter_backward_down_kernel}


@functools.cache
def tuned_kernel(kind: str, operands: str, tier: int):
    """The autotuned kernel ``kind`` for an operand class ("half" / "full") and M_PAD tier."""
    configs = cfgs(_INTERPRETED, [({"BLOCK_T": bt, "BLOCK_D": bd}, w, st)
                                  for bt, bd, w, st in _CONFIGS[kind][operands][tier]])
    return tuned(configs, key=_KEY)(_KERNEL_FNS[kind])
