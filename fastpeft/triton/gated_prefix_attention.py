"""Triton kernels of ``fastpeft::gated_prefix_attention_triton`` and its backward.

Shapes (contiguous): q (B, H, M, D); k, v (B, Hkv, N, D) with H = GROUP * Hkv (query head
h reads kv head h // GROUP, never a repeated copy); prefix_k, prefix_v (PB, Hkv, P, D) with
PB in {1, B}; g (H,) = tanh(gate) or gate, expanded on the host; key_padding_mask (B, N)
bool, True = keep.

    out = softmax(S + mask) v + g[h] softmax(Sp) prefix_v,  S = q k^T scale, Sp = q prefix_k^T scale

Forward, one launch (``gpa_fwd_kernel``), grid (cdiv(M, BLOCK_M), B * H): each program
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
never materialised. Saved for backward:
``out`` and the natural-log log-sum-exps ``lse`` (+inf for a row with no visible key, so
exp(S - lse) = 0 there) and ``prompt_lse``, both fp32 (B, H, M).

The backward kernels and their math are in :mod:`.gated_prefix_attention_bwd`.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import allow_tf32, cfgs, register_opaque, size_bucket, skip_launch, tuned
from .gated_prefix_attention_bwd import (
    gpa_bwd_dkdv_kernel,
    gpa_bwd_dq_kernel,
    gpa_bwd_preprocess_kernel,
    prompt_accumulate,
    prompt_softmax_stats,
)

__all__ = ["gated_prefix_attention_backward_triton", "gated_prefix_attention_triton"]

LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) so exp2 replaces exp

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
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        m_i = m_new
    return acc, m_i, l_i


@tuned(_FWD_CONFIGS, key=["M_BUCKET", "N_BUCKET", "HEAD_DIM", "BLOCK_P", "CAUSAL", "HAS_KPM"])
@triton.jit
def gpa_fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, g_ptr, kpm_ptr, out_ptr, lse_ptr,
                   plse_ptr, H, HKV, M, N, P, PB_STRIDE, M_BUCKET, N_BUCKET, qk_scale,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, IS_FP64: tl.constexpr,
                   ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out, lse, prompt_lse for BLOCK_M query rows of one (batch, head)."""
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


# ---------------------------------------------------------------------------------------
# Launchers / registered ops
# ---------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_p(p: int) -> int:
    """Prompt keys per tile: P padded to a power of two >= 16 (tl.dot's minimum), at most
    64 (larger P loops over tiles)."""
    return min(64, max(16, triton.next_power_of_2(p)))


def _gate_per_head(gate: Tensor, heads: int, gate_tanh: bool, acc: torch.dtype) -> Tensor:
    """g (H,) in the accumulation dtype: tanh(gate) or gate, a (1,) gate broadcast."""
    g = gate.to(acc)
    g = torch.tanh(g) if gate_tanh else g
    return g.expand(heads).contiguous()


def _common_meta(q: Tensor, k: Tensor, prefix_k: Tensor, key_padding_mask: Tensor | None,
                 causal: bool) -> dict:
    d = q.shape[3]
    return dict(CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, HEAD_DIM=d,
                BLOCK_D=_block_d(d), BLOCK_P=_block_p(prefix_k.shape[2]),
                IS_FP64=q.dtype == torch.float64, ALLOW_TF32=allow_tf32(q.dtype))


def _kpm_arg(key_padding_mask: Tensor | None, like: Tensor) -> Tensor:
    """The mask as bytes (1 = keep), or a placeholder the kernels never read."""
    if key_padding_mask is None:
        return like
    return key_padding_mask.contiguous().view(torch.uint8)


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                    g: Tensor, key_padding_mask: Tensor | None, causal: bool, scale: float,
                    out: Tensor, lse: Tensor, prompt_lse: Tensor) -> None:
    """Fill out, lse, prompt_lse (lse dtype: fp32, or fp64 for the backward's recompute)."""
    B, H, M = q.shape[:3]
    HKV, N, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    pb_stride = HKV * P if prefix_k.shape[0] > 1 else 0
    wrap_triton(gpa_fwd_kernel)[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H)](
        q, k, v, prefix_k, prefix_v, g, _kpm_arg(key_padding_mask, q), out, lse, prompt_lse,
        H, HKV, M, N, P, pb_stride, size_bucket(M), size_bucket(N), scale * LOG2E,
        **_common_meta(q, k, prefix_k, key_padding_mask, causal))


@triton_op("fastpeft::gated_prefix_attention_triton", mutates_args=())
def gated_prefix_attention_triton(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
                                  prefix_v: Tensor, gate: Tensor,
                                  key_padding_mask: Tensor | None, causal: bool, scale: float,
                                  gate_tanh: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, H, M, D), lse (B, H, M) fp32, prompt_lse (B, H, M) fp32)."""
    q, k, v, prefix_k, prefix_v = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    B, H, M = q.shape[:3]
    out = torch.empty_like(q)
    lse = q.new_empty((B, H, M), dtype=torch.float32)
    prompt_lse = torch.empty_like(lse)
    if B * H * M == 0 or skip_launch(q):
        return out, lse, prompt_lse
    g = _gate_per_head(gate, H, gate_tanh, _acc_dtype(q.dtype))
    _launch_forward(q, k, v, prefix_k, prefix_v, g, key_padding_mask, causal, scale, out, lse,
                    prompt_lse)
    return out, lse, prompt_lse


@triton_op("fastpeft::gated_prefix_attention_backward_triton", mutates_args=())
def gated_prefix_attention_backward_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    gate: Tensor, key_padding_mask: Tensor | None, out: Tensor, lse: Tensor,
    prompt_lse: Tensor, causal: bool, scale: float, gate_tanh: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dgate); the math is in the backward module."""
    grad_out, q, k, v, prefix_k, prefix_v, out, lse, prompt_lse = (
        t.contiguous() for t in (grad_out, q, k, v, prefix_k, prefix_v, out, lse, prompt_lse))
    B, H, M, D = q.shape
    HKV, N, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    if B * H * M == 0:  # every gradient is a sum over no query rows
        return (torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(prefix_k), torch.zeros_like(prefix_v), torch.zeros_like(gate))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if skip_launch(q):
        return (dq, dk, dv, torch.empty_like(prefix_k), torch.empty_like(prefix_v),
                torch.empty_like(gate))
    acc = _acc_dtype(q.dtype)
    g = _gate_per_head(gate, H, gate_tanh, acc)
    meta = _common_meta(q, k, prefix_k, key_padding_mask, causal)
    kpm = _kpm_arg(key_padding_mask, q)
    if q.dtype == torch.float64:
        # The saved lse are fp32 by the schema, which would cap fp64 gradients (gradcheck)
        # at ~1e-7 relative; fp64 pays one more forward pass to recompute them in fp64.
        lse = q.new_empty((B, H, M))
        prompt_lse = torch.empty_like(lse)
        _launch_forward(q, k, v, prefix_k, prefix_v, g, key_padding_mask, causal, scale,
                        torch.empty_like(q), lse, prompt_lse)
    pb_stride = HKV * P if prefix_k.shape[0] > 1 else 0
    m_bucket, n_bucket = size_bucket(M), size_bucket(N)
    # Per row: delta_p = rowsum(dO * O_p), delta_s = rowsum(dO * out) - g * delta_p.
    delta_s = q.new_empty((B, H, M), dtype=acc)
    delta_p = torch.empty_like(delta_s)
    wrap_triton(gpa_bwd_preprocess_kernel)[
        lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * H)
    ](grad_out, out, q, prefix_k, prefix_v, g, delta_s, delta_p, H, HKV, M, P,
      pb_stride, m_bucket, scale * LOG2E,
      **{k_: meta[k_] for k_ in ("HEAD_DIM", "BLOCK_D", "BLOCK_P", "IS_FP64", "ALLOW_TF32")})
    wrap_triton(gpa_bwd_dq_kernel)[lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * H)](
        grad_out, q, k, v, prefix_k, prefix_v, g, kpm, lse, prompt_lse, delta_s, delta_p, dq,
        H, HKV, M, N, P, pb_stride, m_bucket, n_bucket, scale * LOG2E, scale, **meta)
    # dk/dv of each kv head, plus the prompt-key gradients of each (batch, kv head) in a
    # (B, Hkv, P, D) buffer that is summed over the batch for a batch-shared prefix.
    dpk = q.new_empty((B, HKV, P, D), dtype=acc)
    dpv = torch.empty_like(dpk)
    n_prompt_blocks = triton.cdiv(P, meta["BLOCK_P"])
    wrap_triton(gpa_bwd_dkdv_kernel)[
        lambda m: (triton.cdiv(N, m["BLOCK_N"]) + n_prompt_blocks, B * HKV)
    ](grad_out, q, k, v, prefix_k, prefix_v, g, kpm, lse, prompt_lse, delta_s, delta_p, dk,
      dv, dpk, dpv, H, HKV, M, N, P, pb_stride, m_bucket, n_bucket, scale * LOG2E, scale,
      **meta)
    if prefix_k.shape[0] == 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    # A softmax over one key is constantly 1, so its score gradient vanishes identically;
    # the kernels' P * (dP - delta) leaves round-off there (exp(s - lse) is not exactly 1).
    if P == 1:
        dpk = torch.zeros_like(dpk)
    if N == 1:
        dk = torch.zeros_like(dk)
    # d g[h] = sum_{b, m} delta_p; through tanh and, for a shared (1,) gate, over heads.
    d_g = delta_p.sum(dim=(0, 2))
    if gate_tanh:
        d_g = d_g * (1.0 - torch.tanh(gate.to(acc)) ** 2)
    if gate.shape[0] == 1:
        d_g = d_g.sum(0, keepdim=True)
    return (dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), d_g.to(gate.dtype))


register_opaque(gated_prefix_attention_triton, gated_prefix_attention_backward_triton)
