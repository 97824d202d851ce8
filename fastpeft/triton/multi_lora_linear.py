"""Launchers of ``fastpeft::multi_lora_linear_triton`` / ``multi_lora_linear_backward_triton``.

    y[t] = x[t] @ W^T + bias + s_i * xa[t] @ B_i^T,  xa[t] = dropout(x)[t] @ A_i^T (saved),
    i = adapter_ids[t]  (-1: the base alone, xa[t] = 0)

Shapes (2-D; the public wrapper flattens leading dims): x (T, K), weight W (N, K) (any
layout: torch reads it in place, row-major or the transposed view of a row-major (K, N)
tensor), bias (N,), lora_A (n, R, K), lora_B (n, N, R), scaling (n,) fp32, adapter_ids (T,)
int64.

The base GEMM runs once for the whole batch (torch.addmm / torch.mm); the LoRA kernels add
onto its result in place. The rows are grouped by adapter on the device, with no host sync
and no Python loop over adapters (:func:`_segments`: a stable sort of the ids, and the
segment bounds by a binary search of the sorted ids), so the launch sequence is fixed and
capturable in a CUDA graph. Forward: base GEMM, shrink (xa), expand (y += s_i xa B_i^T).
Backward: dx = dy @ W by torch.mm, then four launches: dyB, dB, dA, and the dx LoRA term.
The kernels, the tile map and the backward derivation are in
:mod:`.multi_lora_linear_kernels`. fp32 operands use tl.dot's "ieee" precision unless
torch's float32 matmul precision allows TF32, as torch.mm does.
"""

import torch
import triton
from torch import Tensor

from ._common import allow_tf32, dot_block, dropout_args, size_bucket
from .multi_lora_linear_kernels import (
    multi_lora_linear_backward_dx_kernel,
    multi_lora_linear_backward_dyb_kernel,
    multi_lora_linear_backward_lora_a_kernel,
    multi_lora_linear_backward_lora_b_kernel,
    multi_lora_linear_expand_kernel,
    multi_lora_linear_shrink_kernel,
)

__all__ = ["backward", "forward"]


def _segments(adapter_ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(order (T,) int64, seg (n + 1,) int64): the row indices sorted by adapter id (stable,
    so each segment keeps its rows ascending), and the segment bounds, adapter i's rows
    being ``order[seg[i]:seg[i + 1]]`` (rows with id -1 come first, before seg[0]).
    All on the device; no host sync (unlike torch.bincount on CUDA, which reads the max)."""
    sorted_ids, order = torch.sort(adapter_ids, stable=True)
    bounds = torch.arange(-1, n, dtype=sorted_ids.dtype, device=sorted_ids.device)
    return order, torch.searchsorted(sorted_ids, bounds, right=True)


def _row_tiles(T: int, n: int, block_m: int) -> int:
    """Programs of a row-tiled launch: an upper bound on the row tiles of n segments that
    hold at most T rows (each tile holds a row; each segment adds at most one partial one)."""
    return min(triton.cdiv(T, block_m) + n, T)


def _adapter_block(n: int) -> int:
    """How many segments the tile map scans at a time (power of two, 16 .. 256)."""
    return min(max(16, triton.next_power_of_2(n)), 256)


def _common(x: Tensor, R: int) -> dict:
    """Constexprs every kernel of the op takes."""
    return dict(IS_FP64=x.dtype == torch.float64, ALLOW_TF32=allow_tf32(x.dtype),
                BLOCK_R=dot_block(R))


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scaling: Tensor, adapter_ids: Tensor, dropout_p: float,
            seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(y (T, N), xa (T, R)), xa zero on the rows with id -1."""
    x, lora_A, lora_B = (t.contiguous() for t in (x, lora_A, lora_B))
    scaling = scaling.to(torch.float32).contiguous()
    ids = adapter_ids.reshape(-1).to(torch.int64)
    T, K = x.shape
    N = weight.shape[0]
    n, R = lora_A.shape[:2]
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    xa = x.new_zeros((T, R))
    if T == 0 or K == 0 or n == 0 or R == 0:  # no LoRA term
        return y, xa
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    order, seg = _segments(ids, n)
    common = dict(_common(x, R), BLOCK_A=_adapter_block(n))
    tb = size_bucket(T)
    multi_lora_linear_shrink_kernel[lambda meta: (_row_tiles(T, n, meta["BLOCK_M"]),)](
        x, lora_A, xa, order, seg, seed_arg, T, K, R, n, tb, threshold, keep_scale,
        HAS_DROPOUT=has_dropout, **common)
    if N > 0:
        multi_lora_linear_expand_kernel[lambda meta: (
            _row_tiles(T, n, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            xa, lora_B, scaling, y, order, seg, T, N, R, n, tb, **common)
    return y, xa


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             xa: Tensor, scaling: Tensor, adapter_ids: Tensor, dropout_p: float,
             seed: Tensor | None, compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (T, K) or an empty tensor, dA (n, R, K), dB (n, N, R)); adapters no row names
    get zero dA and dB."""
    grad_y, x, lora_A, lora_B, xa = (t.contiguous() for t in (grad_y, x, lora_A, lora_B, xa))
    scaling = scaling.to(torch.float32).contiguous()
    ids = adapter_ids.reshape(-1).to(torch.int64)
    T, K = x.shape
    N = weight.shape[0]
    n, R = lora_A.shape[:2]
    dx = torch.mm(grad_y, weight).contiguous() if compute_dx else x.new_empty(0)
    if T == 0 or n == 0 or R == 0:  # sums over no rows
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    order, seg = _segments(ids, n)
    common = _common(x, R)
    tb = size_bucket(T)
    d_a = torch.empty_like(lora_A)
    d_b = torch.empty_like(lora_B)
    if N > 0:
        multi_lora_linear_backward_lora_b_kernel[
            lambda meta: (n, triton.cdiv(N, meta["BLOCK_N"]))
        ](grad_y, xa, scaling, d_b, order, seg, T, N, R, tb, **common)
    if K == 0:
        return dx, d_a, d_b
    # dyB[pos] = dy[order[pos]] @ B_i in sorted order (zero when N == 0: an empty sum).
    dyb = x.new_empty((T, R))
    multi_lora_linear_backward_dyb_kernel[lambda meta: (_row_tiles(T, n, meta["BLOCK_M"]),)](
        grad_y, lora_B, dyb, order, seg, T, N, R, n, tb, BLOCK_A=_adapter_block(n), **common)
    multi_lora_linear_backward_lora_a_kernel[lambda meta: (n, triton.cdiv(K, meta["BLOCK_K"]))](
        dyb, x, scaling, d_a, order, seg, seed_arg, T, K, R, tb, threshold, keep_scale,
        HAS_DROPOUT=has_dropout, **common)
    if compute_dx:
        multi_lora_linear_backward_dx_kernel[lambda meta: (
            _row_tiles(T, n, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]))](
            dyb, lora_A, scaling, dx, order, seg, seed_arg, T, K, R, n, tb, threshold,
            keep_scale, HAS_DROPOUT=has_dropout, BLOCK_A=_adapter_block(n), **common)
    return dx, d_a, d_b
