"""``fastpeft.gated_prefix_attention``: LLaMA-Adapter's zero-init attention, fused.

    out = softmax(q k^T * scale + mask) v  +  g[h] * softmax(q prefix_k^T * scale) prefix_v

Two separate softmaxes, one over the N sequence keys and one over the P prompt keys,
computed in one pass over the keys with two online-softmax accumulators; the (M, N)
score matrix never exists. Forward saves ``out`` and one fp32 log-sum-exp per row for
each softmax.

Backward (dO = dL/dout; O_p = softmax(S_p) prefix_v is recomputed, P is small):
    D_p  = rowsum(dO * O_p)                      D_s = rowsum(dO * out) - g * D_p
    seq:    P = exp(S - lse),      dv = P^T dO,          dS = P * (dO v^T - D_s)
    prompt: Pp = exp(Sp - lse_p),  dprefix_v = g Pp^T dO, dSp = Pp * (g dO prefix_v^T - g D_p)
    dq = scale (dS k + dSp prefix_k),  dk = scale dS^T q,  dprefix_k = scale dSp^T q
    d g[h] = sum_{b, m} D_p;  d gate = d g * (1 - tanh(gate)^2) with gate_tanh
(grouped-query heads sum into their shared k/v head; a batch-shared prefix sums over B.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, reference
from ._checks import check_bool, check_float_input, check_same_dtype, check_scalar, check_tensor
from ._library import OpSpec, declare

if _backend.TRITON_AVAILABLE:
    from ..triton import gated_prefix_attention as triton_kernels
else:
    triton_kernels = None

__all__ = ["gated_prefix_attention"]

# out (B, H, M, D); lse, prompt_lse (B, H, M) fp32 log-sum-exps of the two softmaxes
# (lse = +inf for a row with no visible sequence key, so its probabilities are 0); seq_out
# (B, H, M, D), the sequence part softmax(S) v of out, for the backward's rowsum(dO ⊙ O_s)
# (taken from out minus the gated prompt part, it would carry out's rounding of g O_p)
SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor gate, "
          "Tensor? key_padding_mask, bool causal, float scale, bool gate_tanh) "
          "-> (Tensor, Tensor, Tensor, Tensor)")
# (dq, dk, dv, dprefix_k, dprefix_v, dgate)
BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
                   "Tensor prefix_v, Tensor gate, Tensor? key_padding_mask, Tensor seq_out, "
                   "Tensor lse, Tensor prompt_lse, bool causal, float scale, bool gate_tanh) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _fake(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, gate_tanh):
    stats = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q), stats, torch.empty_like(stats), torch.empty_like(q)


def _backward_fake(grad_out, q, k, v, prefix_k, prefix_v, gate, key_padding_mask, seq_out,
                   lse, prompt_lse, causal, scale, gate_tanh):
    return tuple(torch.empty_like(t) for t in (q, k, v, prefix_k, prefix_v, gate))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, gate_tanh = inputs
    _out, lse, prompt_lse, seq_out = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, seq_out, lse,
                          prompt_lse)
    ctx.causal, ctx.scale, ctx.gate_tanh = causal, scale, gate_tanh
    ctx.mark_non_differentiable(lse, prompt_lse, seq_out)


def _backward(backward_op, ctx, grad_out: Tensor, _grad_lse, _grad_prompt_lse, _grad_seq):
    q, k, v, prefix_k, prefix_v, gate, kpm, seq_out, lse, prompt_lse = ctx.saved_tensors
    grads = backward_op(grad_out.contiguous(), q, k, v, prefix_k, prefix_v, gate, kpm, seq_out,
                        lse, prompt_lse, ctx.causal, ctx.scale, ctx.gate_tanh)
    return (*grads, None, None, None, None)


declare(OpSpec("gated_prefix_attention", SCHEMA, BACKWARD_SCHEMA, _fake, _backward_fake,
               _setup_context, _backward, triton_kernels))


def _check_args(q, k, v, prefix_k, prefix_v, gate, key_padding_mask) -> None:
    check_float_input("q", q)
    check_tensor("q", q, ndim=4)
    tensors = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v,
               "gate": gate}
    if all(isinstance(t, Tensor) for t in tensors.values()):
        check_same_dtype(tensors)  # the odd one out named, not whichever follows q
    b, h, _m, d = q.shape
    check_tensor("k", k, shape=(b, None, None, d), like=q)
    h_kv, n = k.shape[1], k.shape[2]
    if h_kv < 1 or h % h_kv != 0:
        raise ValueError(
            f"k: the number of query heads H={h} must be a multiple of the key/value heads "
            f"Hkv={h_kv} (grouped-query attention), got k of shape {tuple(k.shape)}"
        )
    check_tensor("v", v, shape=(b, h_kv, n, d), like=q)
    check_tensor("prefix_k", prefix_k, shape=(None, h_kv, None, d), like=q)
    pb, p = prefix_k.shape[0], prefix_k.shape[2]
    if pb != 1 and pb != b:  # (not "in (1, b)", which torch.compile misreads for a symbolic b)
        raise ValueError(f"prefix_k: expected a leading dim of 1 or B={b}, got "
                         f"shape {tuple(prefix_k.shape)}")
    if p < 1:
        raise ValueError(f"prefix_k: expected at least one prompt key, got shape "
                         f"{tuple(prefix_k.shape)}")
    check_tensor("prefix_v", prefix_v, shape=tuple(prefix_k.shape), like=q)
    check_tensor("gate", gate, ndim=1, like=q)
    if gate.shape[0] != 1 and gate.shape[0] != h:
        raise ValueError(f"gate: expected shape ({h},) (per head) or (1,) (shared), got "
                         f"{tuple(gate.shape)}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, shape=(b, n), dtype=torch.bool)
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected a tensor on {q.device}, got one on "
                             f"{key_padding_mask.device}")


def gated_prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    gate: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    gate_tanh: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention over the sequence plus a gated, separately normalised attention over
    prompt keys (LLaMA-Adapter).

    Args:
        q: ``(B, H, M, D)`` queries; k, v: ``(B, Hkv, N, D)`` with ``H % Hkv == 0``.
        prefix_k, prefix_v: ``(B or 1, Hkv, P, D)`` prompt keys/values (never masked).
        gate: ``(H,)`` per head or ``(1,)`` shared; ``g = tanh(gate)`` if ``gate_tanh``.
        causal: bottom-right aligned mask: query ``i`` sees keys ``j <= i + N - M``.
        scale: score scale, default ``1 / sqrt(D)``.
        key_padding_mask: ``(B, N)`` bool, True for keys to keep.

    Returns:
        ``(B, H, M, D)`` in q's dtype. A row with no visible sequence key gets only the
        prompt part (never NaN). Gradients flow to q, k, v, prefix_k, prefix_v and gate.
    """
    _check_args(q, k, v, prefix_k, prefix_v, gate, key_padding_mask)
    causal, gate_tanh = check_bool("causal", causal), check_bool("gate_tanh", gate_tanh)
    if scale is None:  # 1/sqrt(D); with D = 0 the output is empty and the scale moot
        scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0
    else:
        scale = check_scalar("scale", scale)
    op = _backend.resolve("gated_prefix_attention", q)
    if op is None or q.numel() == 0:  # an empty output: the reference gives it
        return reference.gated_prefix_attention(
            q, k, v, prefix_k, prefix_v, gate, causal=causal, scale=scale,
            gate_tanh=gate_tanh, key_padding_mask=key_padding_mask)
    args = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v, gate))
    out = op(*args, key_padding_mask, bool(causal), float(scale), bool(gate_tanh))[0]
    return out


