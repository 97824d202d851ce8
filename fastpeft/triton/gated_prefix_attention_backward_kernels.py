"""Backward jit kernels of ``gated_prefix_attention``.

Shapes as in :mod:`.gated_prefix_attention_kernels`; dO = dL/dout (B, H, M, D). With
S = q k^T scale (+ mask), Sp = q prefix_k^T scale, and the saved natural-log lse /
prompt_lse, the probabilities are recomputed tile by tile, never stored:
    P = exp(S - lse)  (0 where masked; lse = +inf makes a whole row 0),  Pp = exp(Sp - lse_p)
    O_p = softmax(Sp) prefix_v       (the forward's prompt pass replayed per row, P is small)
    delta_p = rowsum(dO * O_p),  delta_s = rowsum(dO * O_s)  (O_s: the forward's seq_out;
        taken as rowsum(dO * out) - g delta_p, it would carry out's rounding of g O_p)
    dv = P^T dO,                  dS  = P * (dO v^T - delta_s)
    dprefix_v = g Pp^T dO,        dSp = g Pp * (dO prefix_v^T - delta_p)
    dq = scale (dS k + dSp prefix_k),  dk = scale dS^T q,  dprefix_k = scale dSp^T q
    d g[h] = sum_{b, m} delta_p[b, h, m]     (a torch reduction in the launcher)
Both softmax backward steps use the identity rowsum(dP * P) = rowsum(dO * O_part).
Precision: P is recomputed from an fp32 lse, so its relative error is ~eps * |lse| (as in
every FlashAttention backward); fp64 inputs get lse recomputed in fp64 by the launcher.

Three launches (FlashAttention-2 layout: no atomics, every output written once):
  gated_prefix_attention_backward_preprocess_kernel, grid (cdiv(M, BM), B*H): delta_s,
      delta_p per row.
  gated_prefix_attention_backward_dq_kernel, grid (cdiv(M, BM), B*H): dq of a query tile,
      looping over the sequence keys up to its causal limit, then the prompt keys.
  gated_prefix_attention_backward_dkdv_kernel, grid (cdiv(P, BLOCK_P) + cdiv(N, BN), B*Hkv):
      a program owns one block of keys of one (batch, kv head) and loops over the query
      tiles of all H/Hkv grouped heads, so grouped heads sum in registers. The first
      programs own a block of prompt keys instead (same loop, g-scaled, unmasked) and write
      a (B, Hkv, P, D) partial that the launcher sums over B when the prefix is
      batch-shared (P is small: no atomics needed either).
"""

import triton
import triton.language as tl

from ._common import cfgs, tuned
from .gated_prefix_attention_kernels import prompt_accumulate, prompt_softmax_stats

# preprocess: memory-bound row reductions; dO, out and O_p tiles live at once.
_PRE_CONFIGS = cfgs({"BLOCK_M": 16}, [({"BLOCK_M": 32}, 4, 2), ({"BLOCK_M": 64}, 8, 2)])
# dq: a tall query tile that streams narrow key blocks (dq stays in registers).
_DQ_CONFIGS = cfgs(
    {"BLOCK_M": 16, "BLOCK_N": 16},
    [
        ({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),
        ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 3),
    ],
)
# dk/dv: a wide key block (dk, dv accumulate in registers) that streams narrow query
# tiles. At D = 128 two fp32 (BLOCK_N, 128) accumulators fill most of the register file
# (ptxas reports some spills for every config; the autotuner picks the cheapest).
_DKDV_CONFIGS = cfgs(
    {"BLOCK_M": 16, "BLOCK_N": 16},
    [
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 2),
        ({"BLOCK_M": 16, "BLOCK_N": 128}, 8, 3),
    ],
)


@tuned(_PRE_CONFIGS, key=["M_BUCKET", "HEAD_DIM", "BLOCK_P"])
@triton.jit
def gated_prefix_attention_backward_preprocess_kernel(do_ptr, seq_ptr, q_ptr, pk_ptr, pv_ptr, g_ptr,
                                                      ds_ptr, dp_ptr, H, HKV, M, P, PB_STRIDE,
                                                      M_BUCKET, qk_scale, HEAD_DIM: tl.constexpr,
                                                      BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                                                      IS_FP64: tl.constexpr,
                                                      ALLOW_TF32: tl.constexpr,
                                                      BLOCK_M: tl.constexpr):
    """delta_p = rowsum(dO * O_p) and delta_s = rowsum(dO * O_s) for BLOCK_M rows of one
    (batch, head); O_s is the forward's seq_out, O_p is recomputed as the forward computed
    it (see prompt_accumulate)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hkv = (bh % H) // (H // HKV)
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dd = tl.arange(0, BLOCK_D)
    head = bh * M * HEAD_DIM  # int64 base of this (batch, head); offsets within it int32
    row_off = rows[:, None] * HEAD_DIM + dd[None, :]
    row_mask = row_ok[:, None] & (dd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + head + row_off, mask=row_mask, other=0.0)
    do = tl.load(do_ptr + head + row_off, mask=row_mask, other=0.0).to(acc_ty)
    seq = tl.load(seq_ptr + head + row_off, mask=row_mask, other=0.0).to(acc_ty)
    delta_s = tl.sum(do * seq, 1)
    p_base = (b * PB_STRIDE + hkv * P) * HEAD_DIM
    m_p, l_p = prompt_softmax_stats(q, pk_ptr + p_base, P, qk_scale, acc_ty, HEAD_DIM,
                                    BLOCK_D, BLOCK_P, ALLOW_TF32)
    o_p = prompt_accumulate(tl.zeros((BLOCK_M, BLOCK_D), dtype=acc_ty), q, pk_ptr + p_base,
                            pv_ptr + p_base, m_p, 1.0 / l_p, P, qk_scale, HEAD_DIM, BLOCK_D,
                            BLOCK_P, ALLOW_TF32)
    delta_p = tl.sum(do * o_p, 1)
    tl.store(dp_ptr + bh * M + rows, delta_p, mask=row_ok)
    tl.store(ds_ptr + bh * M + rows, delta_s, mask=row_ok)


@triton.jit
def _dq_key_loop(dq, q, do, lse2, delta, G, k_base, v_base, kpm_base, rows, lo, hi, L, OFF,
                 qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 ALLOW_TF32: tl.constexpr):
    """dq (BLOCK_M, BLOCK_D) += dS k over the keys [lo, hi) of one key source (L keys):
    dS = G * P * (dO v^T - delta), P = 2^(s - lse2) (G = 1 for the sequence, g[h] for
    the prompt; the final scale is applied by the caller). MASKED / CAUSAL / HAS_KPM as
    in the forward's key loop."""
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < L
        kv_off = cols[:, None] * HEAD_DIM + dd[None, :]  # in-head: int32
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="tf32" if ALLOW_TF32 else "ieee")
        s = s * qk_scale
        # Masked scores become -inf before the exp (a masked score may exceed lse, and
        # 2^(s - lse) would overflow); -inf - lse2 stays -inf even for lse2 = +inf.
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + OFF)
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(kpm_base + cols, mask=col_ok, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="tf32" if ALLOW_TF32 else "ieee")
        ds = G * p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, out_dtype=dq.dtype,
                    input_precision="tf32" if ALLOW_TF32 else "ieee")
    return dq


@tuned(_DQ_CONFIGS, key=["M_BUCKET", "N_BUCKET", "HEAD_DIM", "BLOCK_P", "CAUSAL", "HAS_KPM"])
@triton.jit
def gated_prefix_attention_backward_dq_kernel(do_ptr, q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, g_ptr,
                                              kpm_ptr, lse_ptr, plse_ptr, ds_ptr, dp_ptr, dq_ptr, H,
                                              HKV, M, N, P, PB_STRIDE, M_BUCKET, N_BUCKET, qk_scale,
                                              scale, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                              BLOCK_P: tl.constexpr, IS_FP64: tl.constexpr,
                                              ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                                              BLOCK_N: tl.constexpr):
    """dq for BLOCK_M query rows of one (batch, head): sequence keys, then prompt keys."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hkv = (bh % H) // (H // HKV)
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dd = tl.arange(0, BLOCK_D)
    head = bh * M * HEAD_DIM  # int64 base of this (batch, head); offsets within it int32
    row_off = rows[:, None] * HEAD_DIM + dd[None, :]
    row_mask = row_ok[:, None] & (dd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + head + row_off, mask=row_mask, other=0.0)
    do = tl.load(do_ptr + head + row_off, mask=row_mask, other=0.0)
    # lse = +inf past the last row (and for rows with no visible key): P = 0 there.
    lse2 = tl.load(lse_ptr + bh * M + rows, mask=row_ok, other=float("inf")).to(acc_ty)
    lse2 = lse2 * 1.4426950408889634
    delta_s = tl.load(ds_ptr + bh * M + rows, mask=row_ok, other=0.0)

    # Same key ranges as the forward: [0, full) unmasked, [full, hi) masked.
    OFF = N - M
    hi = N
    full = N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(m0 + BLOCK_M + OFF, N), 0)
        full = tl.maximum(tl.minimum(m0 + OFF + 1, hi), 0)
    full = full // BLOCK_N * BLOCK_N
    kv_base = (b * HKV + hkv) * N * HEAD_DIM
    kpm_base = kpm_ptr + b * N
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=acc_ty)
    dq = _dq_key_loop(dq, q, do, lse2, delta_s, 1.0, k_ptr + kv_base, v_ptr + kv_base,
                      kpm_base, rows, 0, full, N, OFF, qk_scale, False, CAUSAL, HAS_KPM,
                      HEAD_DIM, BLOCK_D, BLOCK_N, ALLOW_TF32)
    dq = _dq_key_loop(dq, q, do, lse2, delta_s, 1.0, k_ptr + kv_base, v_ptr + kv_base,
                      kpm_base, rows, full, hi, N, OFF, qk_scale, True, CAUSAL, HAS_KPM,
                      HEAD_DIM, BLOCK_D, BLOCK_N, ALLOW_TF32)

    plse2 = tl.load(plse_ptr + bh * M + rows, mask=row_ok, other=float("inf")).to(acc_ty)
    plse2 = plse2 * 1.4426950408889634
    delta_p = tl.load(dp_ptr + bh * M + rows, mask=row_ok, other=0.0)
    p_base = (b * PB_STRIDE + hkv * P) * HEAD_DIM
    dq = _dq_key_loop(dq, q, do, plse2, delta_p, tl.load(g_ptr + bh % H), pk_ptr + p_base,
                      pv_ptr + p_base, kpm_base, rows, 0, P, P, 0, qk_scale, True, False,
                      False, HEAD_DIM, BLOCK_D, BLOCK_P, ALLOW_TF32)
    tl.store(dq_ptr + head + row_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, keep_col, cols, G, q_base, do_base, lse_base, delta_base,
                     lo, hi, M, OFF, qk_scale, MASKED: tl.constexpr, SCALE_G: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     ALLOW_TF32: tl.constexpr):
    """dv += P^T dO and dk += dS^T q for one key block (k, v: (BLOCK_KEYS, BLOCK_D)) over
    the query rows [lo, hi) of one head, computed transposed: P^T = 2^(k q^T - lse2),
    dS^T = P^T * (v dO^T - delta). MASKED: the causal mask j <= i + OFF. SCALE_G: the
    prompt's P^T is scaled by G = g[h] (fp32, before the cast for the dot)."""
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        off = rows[:, None] * HEAD_DIM + dd[None, :]
        msk = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + off, mask=msk, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_base + off, mask=msk, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision="tf32" if ALLOW_TF32 else "ieee")
        keep = keep_col[:, None]
        if MASKED:
            keep = keep & (cols[:, None] <= rows[None, :] + OFF)
        st = tl.where(keep, st * qk_scale, float("-inf"))  # masked: -inf before the exp
        pt = tl.exp2(st - lse2[None, :].to(st.dtype))  # (BLOCK_KEYS, BLOCK_M)
        if SCALE_G:
            pt = pt * G
        dv = tl.dot(pt.to(do.dtype), do, dv, out_dtype=dv.dtype,
                    input_precision="tf32" if ALLOW_TF32 else "ieee")
        dpt = tl.dot(v, tl.trans(do), input_precision="tf32" if ALLOW_TF32 else "ieee")
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, out_dtype=dk.dtype,
                    input_precision="tf32" if ALLOW_TF32 else "ieee")
    return dk, dv


@triton.jit
def _dkdv_block(k_base, v_base, kpm_base, g_base, q_base, do_base, lse_base, delta_base,
                dk_base, dv_base, start, L, M, OFF, GROUP, qk_scale, scale,
                IS_PROMPT: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_KEYS: tl.constexpr, ACC_TY: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """dk, dv of the keys [start, start + BLOCK_KEYS) of one key source (L keys), summed
    over the GROUP query heads that share it (their rows, lse, delta are consecutive
    (M,) / (M, D) slabs from the *_base pointers). exp2 arguments use lse * log2(e)."""
    cols = start + tl.arange(0, BLOCK_KEYS)
    col_ok = cols < L
    dd = tl.arange(0, BLOCK_D)
    kv_off = cols[:, None] * HEAD_DIM + dd[None, :]  # in-head: int32
    kv_mask = col_ok[:, None] & (dd < HEAD_DIM)[None, :]
    k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
    # Padded keys and keys past L get P = 0 in every row through one per-key flag.
    keep_col = col_ok
    if HAS_KPM:
        keep_col = keep_col & (tl.load(kpm_base + cols, mask=col_ok, other=0) != 0)
    # Causal: rows i >= start - OFF see part of the block, rows i >= start + BLOCK_KEYS
    # - 1 - OFF all of it; [m_lo, m_full) runs masked, [m_full, M) unmasked.
    m_lo = 0
    m_full = 0
    if CAUSAL:
        m_lo = tl.maximum(start - OFF, 0) // BLOCK_M * BLOCK_M
        m_full = tl.maximum(start + BLOCK_KEYS - 1 - OFF, 0)
        m_full = tl.minimum((m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, M)
    dk = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=ACC_TY)
    dv = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=ACC_TY)
    for _ in range(GROUP):  # the *_base pointers step to the next grouped head
        G = 1.0
        if IS_PROMPT:
            G = tl.load(g_base)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, keep_col, cols, G, q_base, do_base, lse_base,
                                  delta_base, m_lo, m_full, M, OFF, qk_scale, True, IS_PROMPT,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, ALLOW_TF32)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, keep_col, cols, G, q_base, do_base, lse_base,
                                  delta_base, m_full, M, M, OFF, qk_scale, False, IS_PROMPT,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, ALLOW_TF32)
        q_base += M * HEAD_DIM
        do_base += M * HEAD_DIM
        lse_base += M
        delta_base += M
        g_base += 1
    tl.store(dk_base + kv_off, (dk * scale).to(dk_base.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + kv_off, dv.to(dv_base.dtype.element_ty), mask=kv_mask)


@tuned(_DKDV_CONFIGS, key=["M_BUCKET", "N_BUCKET", "HEAD_DIM", "BLOCK_P", "CAUSAL", "HAS_KPM"])
@triton.jit
def gated_prefix_attention_backward_dkdv_kernel(do_ptr, q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, g_ptr,
                                                kpm_ptr, lse_ptr, plse_ptr, ds_ptr, dp_ptr, dk_ptr,
                                                dv_ptr, dpk_ptr, dpv_ptr, H, HKV, M, N, P,
                                                PB_STRIDE, M_BUCKET, N_BUCKET, qk_scale, scale,
                                                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                                BLOCK_P: tl.constexpr, IS_FP64: tl.constexpr,
                                                ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                                                BLOCK_N: tl.constexpr):
    """Program (i, b * Hkv + hkv): the first cdiv(P, BLOCK_P) own prompt keys -> the dpk,
    dpv partials (first: like the early causal key blocks they visit every query row);
    the rest own sequence keys [(i - cdiv(P, BLOCK_P)) * BLOCK_N, ...) -> dk, dv."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // HKV
    hkv = bkv % HKV
    acc_ty: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    GROUP = H // HKV
    first = b * H + hkv * GROUP  # first query head of the group, as a (B*H) row index
    q_base = first * M * HEAD_DIM
    n_prompt = tl.cdiv(P, BLOCK_P)
    if pid_n < n_prompt:
        p_base = (b * PB_STRIDE + hkv * P) * HEAD_DIM
        part = bkv * P * HEAD_DIM  # (B, Hkv, P, D) partial of this (batch, kv head)
        _dkdv_block(pk_ptr + p_base, pv_ptr + p_base, kpm_ptr, g_ptr + hkv * GROUP,
                    q_ptr + q_base, do_ptr + q_base, plse_ptr + first * M,
                    dp_ptr + first * M, dpk_ptr + part, dpv_ptr + part, pid_n * BLOCK_P, P,
                    M, 0, GROUP, qk_scale, scale, True, False, False, HEAD_DIM, BLOCK_D,
                    BLOCK_M, BLOCK_P, acc_ty, ALLOW_TF32)
    else:
        kv_base = bkv * N * HEAD_DIM
        _dkdv_block(k_ptr + kv_base, v_ptr + kv_base, kpm_ptr + b * N, g_ptr,
                    q_ptr + q_base, do_ptr + q_base, lse_ptr + first * M, ds_ptr + first * M,
                    dk_ptr + kv_base, dv_ptr + kv_base, (pid_n - n_prompt) * BLOCK_N, N, M,
                    N - M, GROUP, qk_scale, scale, False, CAUSAL, HAS_KPM, HEAD_DIM, BLOCK_D,
                    BLOCK_M, BLOCK_N, acc_ty, ALLOW_TF32)
