"""Launchers of ``fastpeft::gated_prefix_attention_triton`` and its backward.

    g   = tanh(gate) if gate_tanh else gate,  expanded to (H,) here
    out = softmax(q k^T scale + mask) v + g[h] softmax(q prefix_k^T scale) prefix_v

Shapes: q (B, H, M, D); k, v (B, Hkv, N, D), H % Hkv == 0; prefix_k, prefix_v (B or 1, Hkv,
P, D); gate (H,) or (1,); key_padding_mask (B, N) bool, True = keep. Forward: one launch
(out, lse, prompt_lse, seq_out: the sequence part of out, for the backward). Backward:
three launches (row deltas; dq; dk, dv and the prompt-key partials), then torch reductions
for the batch-shared prefix and the gate. The kernels and
the math are in :mod:`.gated_prefix_attention_kernels` (forward) and
:mod:`.gated_prefix_attention_backward_kernels`.
"""

import torch
import triton
from torch import Tensor

from ._common import (
    acc_dtype,
    allow_tf32,
    check_fp64_register_dots,
    dot_block,
    size_bucket,
)
from .gated_prefix_attention_backward_kernels import (
    gated_prefix_attention_backward_dkdv_kernel,
    gated_prefix_attention_backward_dq_kernel,
    gated_prefix_attention_backward_preprocess_kernel,
)
from .gated_prefix_attention_kernels import gated_prefix_attention_forward_kernel

__all__ = ["backward", "forward"]

LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) so exp2 replaces exp


def _block_p(p: int) -> int:
    """Prompt keys per tile: P padded to a power of two >= 16 (tl.dot's minimum), at most
    64 (larger P loops over tiles)."""
    return min(64, dot_block(p))


def _gate_per_head(gate: Tensor, heads: int, gate_tanh: bool, acc: torch.dtype) -> Tensor:
    """g (H,) in the accumulation dtype: tanh(gate) or gate, a (1,) gate broadcast."""
    g = gate.to(acc)
    g = torch.tanh(g) if gate_tanh else g
    return g.expand(heads).contiguous()


def _common_meta(q: Tensor, k: Tensor, prefix_k: Tensor, key_padding_mask: Tensor | None,
                 causal: bool) -> dict:
    d = q.shape[3]
    return dict(CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, HEAD_DIM=d,
                BLOCK_D=dot_block(d), BLOCK_P=_block_p(prefix_k.shape[2]),
                IS_FP64=q.dtype == torch.float64, ALLOW_TF32=allow_tf32(q.dtype))


def _kpm_arg(key_padding_mask: Tensor | None, like: Tensor) -> Tensor:
    """The mask as bytes (1 = keep), or a placeholder the kernels never read."""
    if key_padding_mask is None:
        return like
    return key_padding_mask.contiguous().view(torch.uint8)


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                    g: Tensor, key_padding_mask: Tensor | None, causal: bool, scale: float,
                    out: Tensor, seq_out: Tensor, lse: Tensor, prompt_lse: Tensor) -> None:
    """Fill out, seq_out, lse, prompt_lse (lse dtype: fp32, or fp64 for the backward's
    recompute)."""
    B, H, M = q.shape[:3]
    HKV, N, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    pb_stride = HKV * P if prefix_k.shape[0] > 1 else 0
    gated_prefix_attention_forward_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H)](
        q, k, v, prefix_k, prefix_v, g, _kpm_arg(key_padding_mask, q), out, seq_out, lse,
        prompt_lse,
        H, HKV, M, N, P, pb_stride, size_bucket(M), size_bucket(N), scale * LOG2E,
        **_common_meta(q, k, prefix_k, key_padding_mask, causal))


def forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Tensor,
            key_padding_mask: Tensor | None, causal: bool, scale: float,
            gate_tanh: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (B, H, M, D), lse (B, H, M) fp32, prompt_lse (B, H, M) fp32, seq_out (B, H, M,
    D))."""
    check_fp64_register_dots("gated_prefix_attention", q)
    q, k, v, prefix_k, prefix_v = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    B, H, M = q.shape[:3]
    out, seq_out = torch.empty_like(q), torch.empty_like(q)
    lse = q.new_empty((B, H, M), dtype=torch.float32)
    prompt_lse = torch.empty_like(lse)
    if B * H * M == 0:
        return out, lse, prompt_lse, seq_out
    g = _gate_per_head(gate, H, gate_tanh, acc_dtype(q.dtype))
    _launch_forward(q, k, v, prefix_k, prefix_v, g, key_padding_mask, causal, scale, out,
                    seq_out, lse, prompt_lse)
    return out, lse, prompt_lse, seq_out


def backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    gate: Tensor, key_padding_mask: Tensor | None, seq_out: Tensor, lse: Tensor,
    prompt_lse: Tensor, causal: bool, scale: float, gate_tanh: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dgate); the math is in the backward kernels' module."""
    check_fp64_register_dots("gated_prefix_attention", q)
    grad_out, q, k, v, prefix_k, prefix_v, seq_out, lse, prompt_lse = (
        t.contiguous() for t in (grad_out, q, k, v, prefix_k, prefix_v, seq_out, lse,
                                 prompt_lse))
    B, H, M, D = q.shape
    HKV, N, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    if B * H * M == 0:  # every gradient is a sum over no query rows
        return (torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(prefix_k), torch.zeros_like(prefix_v), torch.zeros_like(gate))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    acc = acc_dtype(q.dtype)
    g = _gate_per_head(gate, H, gate_tanh, acc)
    meta = _common_meta(q, k, prefix_k, key_padding_mask, causal)
    kpm = _kpm_arg(key_padding_mask, q)
    if q.dtype == torch.float64:
        # The saved lse are fp32 by the schema, which would cap fp64 gradients (gradcheck)
        # at ~1e-7 relative; fp64 pays one more forward pass to recompute them in fp64.
        lse = q.new_empty((B, H, M))
        prompt_lse = torch.empty_like(lse)
        _launch_forward(q, k, v, prefix_k, prefix_v, g, key_padding_mask, causal, scale,
                        torch.empty_like(q), torch.empty_like(q), lse, prompt_lse)
    pb_stride = HKV * P if prefix_k.shape[0] > 1 else 0
    m_bucket, n_bucket = size_bucket(M), size_bucket(N)
    # Per row: delta_p = rowsum(dO * O_p), delta_s = rowsum(dO * O_s).
    delta_s = q.new_empty((B, H, M), dtype=acc)
    delta_p = torch.empty_like(delta_s)
    gated_prefix_attention_backward_preprocess_kernel[
        lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * H)
    ](grad_out, seq_out, q, prefix_k, prefix_v, g, delta_s, delta_p, H, HKV, M, P,
      pb_stride, m_bucket, scale * LOG2E,
      **{k_: meta[k_] for k_ in ("HEAD_DIM", "BLOCK_D", "BLOCK_P", "IS_FP64", "ALLOW_TF32")})
    gated_prefix_attention_backward_dq_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * H)](
        grad_out, q, k, v, prefix_k, prefix_v, g, kpm, lse, prompt_lse, delta_s, delta_p, dq,
        H, HKV, M, N, P, pb_stride, m_bucket, n_bucket, scale * LOG2E, scale, **meta)
    # dk/dv of each kv head, plus the prompt-key gradients of each (batch, kv head) in a
    # (B, Hkv, P, D) buffer that is summed over the batch for a batch-shared prefix.
    dpk = q.new_empty((B, HKV, P, D), dtype=acc)
    dpv = torch.empty_like(dpk)
    n_prompt_blocks = triton.cdiv(P, meta["BLOCK_P"])
    gated_prefix_attention_backward_dkdv_kernel[
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
