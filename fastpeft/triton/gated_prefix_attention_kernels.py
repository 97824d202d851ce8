"""Forward jit kernel of ``gated_prefix_attention``, and the prompt-softmax helpers that the
backward preprocess replays (:mod:`.gated_prefix_attention_backward_kernels`).

Shapes (contiguous): q (B, H, M, D); k, v (B, Hkv, N, D) with H = GROUP * Hkv (query head
h reads kv head h // GROUP, never a repeated copy); prefix_k, prefix_v (PB, Hkv, P, D) with
PB in {1, B}; g (H,) = tanh(gate) or gate; key_padding_mask (B, N) bytes, 1 = keep.

    out = softmax(S + mask) v + g[h] softmax(Sp) prefix_v,  S = q k^T scale, Sp = q prefix_k^T scale

``gated_prefix_attention_forward_kernel``, grid (cdiv(M, BLOCK_M), B * H): each program
keeps its q tile on chip and runs two online softmaxes (FlashAttention-2 style, base-2
exponentials with log2(e) folded into the score scale):
  1. the sequence keys, only up to the block's causal limit (key blocks that no row of
     the tile can see are never loaded); blocks that every row sees completely run
     without the causal/bounds mask, the rest with it;
  2. the P prompt keys (never masked; one BLOCK_P tile in practice), in two short passes
     (row max and sum, then g * softmax(Sp) prefix_v accumulated straight into the
     normalised sequence output).
Sequence part first, prompt part folded into its output: one (BLOCK_M, D) accumulator
is live at a time (two would spill registers at D = 128). The (M, N) score matrix is
never materialised. Saved for backward: the sequence part ``seq_out`` (stored before the
prompt part is folded in) and the natural-log log-sum-exps ``lse`` (+inf for a row with no
visible key, so exp(S - lse) = 0 there) and ``prompt_lse``.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import triton
import triton.language as tl

from ._common import cfgs, tuned

# Hopper: BLOCK_M query rows x BLOCK_N keys per step; the (BLOCK_M, D) fp32 accumulator
# lives in registers, so 128-row tiles want 8 warps (narrow key blocks for D = 128:
# ptxas reports no spills for (128, 32) / (64, 32) there, a few for (*, 64)).
_FWD_CONFIGS = cfgs(
    {"BLOCK_M": 16, "BLOCK_N": 16},
    [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 2),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3),
    ],
)


@triton.jit
def online_softmax_loop(acc, m_i, l_i, q, k_base, v_base, kpm_base, rows, lo, hi, L, OFF,
                        qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """Online softmax over the keys [lo, hi) of one key source (L keys of (L, D) at
    k_base / v_base): acc (BLOCK_M, BLOCK_D) = sum_j 2^(s_j - m_i) v_j, m_i the running
    row max of s = q k^T * scale * log2(e), l_i the running sum of 2^(s_j - m_i).
    MASKED: apply the key bound j < L and, with CAUSAL, the bottom-right causal mask
    j <= i + OFF (OFF = N - M); lo is then a multiple of BLOCK_N below which neither
    applies. HAS_KPM: drop keys whose key_padding_mask byte is 0."""
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < L
        kv_off = cols[:, None] * HEAD_DIM + dd[None, :]  # in-head: int32
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision="tf32" if ALLOW_TF32 else "ieee")
        s = s * qk_scale
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + OFF)
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(kpm_base + cols, mask=col_ok, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; shifting by 0 there avoids
        # (-inf) - (-inf) = NaN and leaves its p = 2^-inf = 0, acc = l = 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None],
                     out_dtype=acc.dtype, input_precision="tf32" if ALLOW_TF32 else "ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prompt_scores(q, pk_base, start, P, qk_scale, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """s = q prefix_k[start:start + BLOCK_P]^T * scale * log2(e), (BLOCK_M, BLOCK_P), -inf
    past the P prompt keys (prompt keys are never masked otherwise)."""
    cols = start + tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    pk = tl.load(pk_base + cols[:, None] * HEAD_DIM + dd[None, :],
                 mask=(cols < P)[:, None] & (dd < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(pk), input_precision="tf32" if ALLOW_TF32 else "ieee")
    return tl.where((cols < P)[None, :], s * qk_scale, float("-inf"))


@triton.jit
def prompt_softmax_stats(q, pk_base, P, qk_scale, ACC_TY: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                         ALLOW_TF32: tl.constexpr):
    """Pass 1 of the prompt softmax: row max m and l_sum = sum_j 2^(s_j - m) (no values)."""
    m = tl.full((q.shape[0],), float("-inf"), dtype=ACC_TY)
    l_sum = tl.zeros((q.shape[0],), dtype=ACC_TY)
    for start in range(0, P, BLOCK_P):  # one tile in practice (P <= BLOCK_P)
        s = _prompt_scores(q, pk_base, start, P, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_P,
                           ALLOW_TF32)
        m_new = tl.maximum(m, tl.max(s, 1))  # finite from the first tile on (P >= 1)
        l_sum = l_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    return m, l_sum


@triton.jit
def prompt_accumulate(o, q, pk_base, pv_base, m, w, P, qk_scale, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """Pass 2: o += (2^(s - m) * w) prefix_v with a per-row weight w (g / l in the forward,
    1 / l in the backward preprocess). Accumulating straight into the caller's o keeps one
    (BLOCK_M, D) accumulator live instead of two (D = 128 would spill). The forward and
    the preprocess share these two helpers, so the preprocess's O_p is the forward's up to
    the rounding of w: exp(Sp - prompt_lse) would differ by ~eps * |prompt_lse|, and that
    difference would reach every dS of the row through delta_s."""
    dd = tl.arange(0, BLOCK_D)
    for start in range(0, P, BLOCK_P):
        s = _prompt_scores(q, pk_base, start, P, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_P,
                           ALLOW_TF32)
        p = tl.exp2(s - m[:, None]) * w[:, None]
        cols = start + tl.arange(0, BLOCK_P)
        pv = tl.load(pv_base + cols[:, None] * HEAD_DIM + dd[None, :],
                     mask=(cols < P)[:, None] & (dd < HEAD_DIM)[None, :], other=0.0)
        o = tl.dot(p.to(pv.dtype), pv, o, out_dtype=o.dtype,
                   input_precision="tf32" if ALLOW_TF32 else "ieee")
    return o


@tuned(_FWD_CONFIGS, key=["M_BUCKET", "N_BUCKET", "HEAD_DIM", "BLOCK_P", "CAUSAL", "HAS_KPM"])
@triton.jit
def gated_prefix_attention_forward_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, g_ptr, kpm_ptr,
                                          out_ptr, seq_ptr, lse_ptr, plse_ptr, H, HKV, M, N, P,
                                          PB_STRIDE,
                                          M_BUCKET, N_BUCKET, qk_scale, CAUSAL: tl.constexpr,
                                          HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
                                          BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                                          IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out, seq_out (the sequence part O_s), lse, prompt_lse for BLOCK_M query rows of one
    (batch, head)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hkv = (bh % H) // (H // HKV)
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    head = bh * M * HEAD_DIM  # int64 base of this (batch, head); offsets within it int32
    row_off = rows[:, None] * HEAD_DIM + dd[None, :]
    row_mask = (rows < M)[:, None] & (dd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + head + row_off, mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    # 1. Sequence keys. Row i sees keys j <= i + OFF: the tile needs keys [0, hi) and
    # every row of it sees [0, full) (whole BLOCK_N blocks, no mask needed there).
    OFF = N - M
    hi = N
    full = N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(m0 + BLOCK_M + OFF, N), 0)
        full = tl.maximum(tl.minimum(m0 + OFF + 1, hi), 0)
    full = full // BLOCK_N * BLOCK_N
    kv_base = (b * HKV + hkv) * N * HEAD_DIM
    kpm_base = kpm_ptr + b * N
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=acc_ty)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=acc_ty)
    l_i = tl.zeros((BLOCK_M,), dtype=acc_ty)
    acc, m_i, l_i = online_softmax_loop(acc, m_i, l_i, q, k_ptr + kv_base, v_ptr + kv_base,
                                        kpm_base, rows, 0, full, N, OFF, qk_scale, False,
                                        CAUSAL, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, ALLOW_TF32)
    acc, m_i, l_i = online_softmax_loop(acc, m_i, l_i, q, k_ptr + kv_base, v_ptr + kv_base,
                                        kpm_base, rows, full, hi, N, OFF, qk_scale, True,
                                        CAUSAL, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, ALLOW_TF32)
    seen = l_i > 0.0  # False: no visible key, the sequence part is 0 and lse = +inf
    l_i = tl.where(seen, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(seq_ptr + head + row_off, o.to(seq_ptr.dtype.element_ty), mask=row_mask)
    lse = tl.where(seen, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("inf"))  # * ln(2)
    tl.store(lse_ptr + bh * M + rows, lse.to(lse_ptr.dtype.element_ty), mask=rows < M)

    # 2. Prompt keys: its own softmax, never masked except the bound j < P. Two passes
    # (stats, then values) so g * O_p accumulates straight into o.
    p_base = (b * PB_STRIDE + hkv * P) * HEAD_DIM  # PB_STRIDE = 0: batch-shared prefix
    m_p, l_p = prompt_softmax_stats(q, pk_ptr + p_base, P, qk_scale, acc_ty, HEAD_DIM,
                                    BLOCK_D, BLOCK_P, ALLOW_TF32)
    o = prompt_accumulate(o, q, pk_ptr + p_base, pv_ptr + p_base, m_p,
                          tl.load(g_ptr + bh % H) / l_p, P, qk_scale, HEAD_DIM, BLOCK_D,
                          BLOCK_P, ALLOW_TF32)
    prompt_lse = (m_p + tl.log2(l_p)) * 0.6931471805599453
    tl.store(plse_ptr + bh * M + rows, prompt_lse.to(plse_ptr.dtype.element_ty), mask=rows < M)
    tl.store(out_ptr + head + row_off, o.to(out_ptr.dtype.element_ty), mask=row_mask)
