"""Unfused PyTorch references of every fastpeft op.

These are the test oracle and the benchmark baseline. They are written for clarity,
compute in the dtype of their inputs as the layers people use today do (PEFT's
``lora_B(lora_A(dropout(x))) * scaling``), and use nothing but ``torch`` ops.

Dropout masks
-------------
The fused kernels never store a dropout mask: they regenerate it from a seed. The
mask is a pure function of ``(seed, row, col)`` so every backend draws the same one
and this module can reproduce it exactly (:func:`dropout_keep_mask`):

* ``x`` is viewed as ``(T, K)`` (leading dims flattened);
* element ``(t, k)`` uses the counter ``c = t * ceil(K / 4) + k // 4`` (64 bit) and lane
  ``k % 4`` of ``Philox4x32-10(counter=(c_lo, c_hi, 0, 0), key=(seed_lo, seed_hi))``,
  so one Philox call serves four neighbouring elements;
* the element is kept when that 32-bit word is ``>= floor(p * 2**32)``; kept values are
  scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "bottleneck_adapter",
    "dequantize_int8",
    "dropout_keep_mask",
    "dropout_threshold",
    "gated_prefix_attention",
    "int8_lora_linear",
    "lora_linear",
    "multi_lora_linear",
    "philox4x32",
    "quantize_int8",
]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b < 2**32``.

    The 64-bit product would overflow int64, so ``a`` is split into 16-bit halves:
    ``a * b = (a_hi * b) << 16 + a_lo * b`` with both partial products below 2**48.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    v, u = a_hi * b, a_lo * b
    lo = (((v & 0xFFFF) << 16) + u) & _MASK32
    hi = ((v + (u >> 16)) >> 16) & _MASK32
    return hi, lo


def philox4x32(counter: Tensor, seed: int, rounds: int = 10) -> tuple[Tensor, ...]:
    """Philox4x32 (Salmon et al., SC'11) of the 64-bit ``counter`` and ``seed``.

    ``counter`` is an int64 tensor of non-negative values; returns four int64 tensors
    holding uint32 words, the same words Triton's ``tl.random.philox`` produces for
    ``c0, c1 = counter_lo, counter_hi`` and ``c2 = c3 = 0``.
    """
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The uint32 threshold under which an element is dropped: ``floor(p * 2**32)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {p}")
    return min(math.floor(p * 2.0**32), _MASK32)


def dropout_keep_mask(
    seed: int | Tensor, rows: int, cols: int, p: float, device: torch.device | str = "cpu"
) -> Tensor:
    """The ``(rows, cols)`` bool keep-mask the fused kernels draw for ``seed`` (see module doc)."""
    if isinstance(seed, Tensor):
        seed = int(seed.reshape(-1)[0].item())
    groups = (cols + 3) // 4
    t = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    k = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    words = torch.stack(philox4x32(t * groups + k // 4, seed), dim=-1)
    word = torch.gather(words, -1, (k % 4).expand(rows, cols)[..., None]).squeeze(-1)
    return word >= dropout_threshold(p)


def _lora_dropout(x: Tensor, p: float, training: bool, seed: int | Tensor | None) -> Tensor:
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if seed is None:  # the dropout a PEFT layer applies: a fresh mask, stored for backward
        return F.dropout(x, p, training=True)
    keep = dropout_keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p, x.device)
    return x * keep.reshape(x.shape).to(x.dtype) / (1.0 - p)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | Tensor | None = None,
) -> Tensor:
    """``y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    x: (..., in), weight: (out, in) in any layout (``F.linear`` reads the transposed view
    of Conv1D's (in, out) weight in place), bias: (out,) or None, lora_A: (r, in),
    lora_B: (out, r). With ``seed`` the dropout mask is the fused kernels' Philox mask;
    without it, ``torch.nn.functional.dropout``'s.
    """
    base = F.linear(x, weight, bias)
    x_lora = _lora_dropout(x, dropout_p, training, seed)
    return base + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


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
    seed: int | Tensor | None = None,
) -> Tensor:
    """:func:`lora_linear` with a different adapter per row:
    ``y[t] = x[t] @ weight.T + bias + scaling[i] * (dropout(x)[t] @ lora_A[i].T) @ lora_B[i].T``
    with ``i = adapter_ids[t]``, and the base alone where ``i == -1``.

    x: (..., in), weight: (out, in), bias: (out,) or None, lora_A: (n, r, in),
    lora_B: (n, out, r), scaling: (n,) float32, adapter_ids: int64 of shape
    ``x.shape[:-1]``. Computed adapter by adapter on the rows that name it; the dropout
    mask is :func:`lora_linear`'s for the whole ``(T, in)`` input, so row ``t`` is dropped
    as it would be in ``lora_linear`` with the same seed.
    """
    base = F.linear(x, weight, bias)
    ids = adapter_ids.reshape(-1)
    x_lora = _lora_dropout(x, dropout_p, training, seed).reshape(ids.numel(), x.shape[-1])
    delta = torch.zeros(ids.numel(), base.shape[-1], dtype=base.dtype, device=base.device)
    for i in range(lora_A.shape[0]):  # an adapter no row names gets zero gradients
        rows = (ids == i).nonzero().reshape(-1)
        xa = F.linear(x_lora.index_select(0, rows), lora_A[i])
        delta = delta.index_add(0, rows, float(scaling[i]) * F.linear(xa, lora_B[i]))
    return base + delta.reshape(base.shape)


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
    upcast: bool = True,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """LLaMA-Adapter's zero-init attention: two separate softmaxes, the prompt one gated.

    ``out = softmax(q k^T * scale + mask) v + g[h] * softmax(q prefix_k^T * scale) prefix_v``
    with ``g = tanh(gate)`` or ``gate``. q: (B, H, M, D); k, v: (B, Hkv, N, D);
    prefix_k, prefix_v: (B or 1, Hkv, P, D); gate: (H,) or (1,). Causal masking is
    bottom-right aligned (query i sees keys j <= i + N - M); ``key_padding_mask`` (B, N)
    is True for keys to keep; ``attn_mask``, a bool mask broadcastable to (B, H, M, N), True
    to attend, further restricts the sequence part to any pattern (the block-diagonal mask
    of packed sequences, for one). Rows with no visible key get 0 from the sequence part.
    Scores and softmaxes are computed in fp32 (as PEFT does), the result is in q's dtype;
    ``upcast=False`` computes everything in q's dtype instead (the tests use it to measure
    what plain PyTorch loses in a low-precision dtype).
    """
    b, h, m, d = q.shape
    n, h_kv = k.shape[2], k.shape[1]
    scale = d**-0.5 if scale is None else scale
    group = h // h_kv
    work = torch.float32 if upcast and q.dtype != torch.float64 else q.dtype
    qf = q.to(work)

    def expand(t: Tensor) -> Tensor:  # (B', Hkv, L, D) -> (B', H, L, D) for grouped queries
        return t.to(work).repeat_interleave(group, dim=1)

    scores = qf @ expand(k).transpose(-1, -2) * scale  # (B, H, M, N)
    visible = torch.ones(m, n, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.ones_like(visible).tril(n - m)
    visible = visible.expand(b, 1, m, n)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        visible = visible & attn_mask
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # empty rows: 0, not NaN
    seq = probs @ expand(v)

    prompt_probs = torch.softmax(qf @ expand(prefix_k).transpose(-1, -2) * scale, dim=-1)
    prompt = prompt_probs @ expand(prefix_v)
    g = torch.tanh(gate.to(work)) if gate_tanh else gate.to(work)
    g = g.reshape(1, -1, 1, 1)  # (1, H or 1, 1, 1)
    return (seq + g * prompt).to(q.dtype)


def apply_activation(name: str, z: Tensor) -> Tensor:
    """The bottleneck adapter's nonlinearity: relu, gelu (erf), gelu_tanh or silu."""
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


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
    """The bottleneck adapter, unfused:

    ``y = residual + scaling * (act(LN(x) @ down_weight.T + down_bias) @ up_weight.T + up_bias)``

    x: (..., d), down_weight: (m, d), up_weight: (d, m), biases (m,) / (d,) or None.
    The layer norm applies only when ``ln_weight`` is given; ``residual`` defaults to x.
    This is the unfused composition (nn.LayerNorm -> nn.Linear -> act -> nn.Linear -> add).
    """
    h = x
    if ln_weight is not None:
        h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    u = F.linear(apply_activation(activation, F.linear(h, down_weight, down_bias)),
                 up_weight, up_bias)
    return (x if residual is None else residual) + scaling * u


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-row symmetric absmax int8: ``weight ~ qweight * weight_scale[:, None]``.

    ``weight_scale = absmax(row) / 127`` (float32) and ``qweight = round(weight / scale)``,
    bitsandbytes' row-wise format (``CB``, ``SCB = 127 * weight_scale``). A row of zeros
    gets scale 0 and zeros (so does every row of a weight with no columns).
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0 if w.shape[1] else w.new_zeros(w.shape[0])
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(qweight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``qweight * weight_scale[:, None]`` computed in float32 (float64 for float64), then
    cast to ``dtype``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (qweight.to(work) * weight_scale.to(work)[:, None]).to(dtype)


def int8_lora_linear(
    x: Tensor,
    qweight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | Tensor | None = None,
) -> Tensor:
    """:func:`lora_linear` on the dequantised weight (materialised here, never in the
    fused kernels)."""
    weight = dequantize_int8(qweight, weight_scale, x.dtype)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)


# The 16 NF4 values (QLoRA, Dettmers et al. 2023): the quantiles of a standard normal
# scaled to [-1, 1], with an exact zero; bitsandbytes' table, code i -> NF4_VALUES[i].
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_table(device: torch.device | str | None = None) -> Tensor:
    """:data:`NF4_VALUES` as a float32 tensor."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def quantize_nf4(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Blockwise NF4, bitsandbytes' format: the weight read row-major in blocks of
    ``blocksize`` elements (the last block may be short), ``absmax`` the largest magnitude
    of each block (float32), each element ``w / absmax`` rounded to the nearest NF4 value
    (a tie to the lower one), and two 4-bit codes per byte, the first element in the high
    nibble. Returns ``(qweight uint8 (out, in // 2), absmax float32 (ceil(out * in /
    blocksize),))``; a block of zeros gets absmax 0 and the code of 0.0."""
    out_features, in_features = weight.shape
    w = weight.detach().reshape(-1).float()
    n = w.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(w, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0)
    table = nf4_table(w.device)
    midpoints = (table[:-1] + table[1:]) / 2
    codes = torch.bucketize(scaled.reshape(-1)[:n], midpoints).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(out_features, in_features // 2), absmax


def dequantize_nf4(qweight: Tensor, absmax: Tensor, blocksize: int,
                   dtype: torch.dtype) -> Tensor:
    """The float weight ``(out, 2 * qweight.shape[1])`` of :func:`quantize_nf4`'s codes:
    ``NF4_VALUES[code] * absmax[block]`` in float32, then rounded to ``dtype`` once."""
    out_features = qweight.shape[0]
    codes = torch.stack((qweight >> 4, qweight & 15), dim=-1).reshape(-1).long()
    values = nf4_table(qweight.device)[codes]
    block = torch.arange(values.numel(), device=qweight.device) // blocksize
    weight = values * absmax.float()[block]
    return weight.view(out_features, 2 * qweight.shape[1]).to(dtype)


def nf4_lora_linear(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | Tensor | None = None,
    blocksize: int = 64,
) -> Tensor:
    """:func:`lora_linear` on the dequantised NF4 weight (materialised here, never in the
    fused kernels)."""
    weight = dequantize_nf4(qweight, absmax, blocksize, x.dtype)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
