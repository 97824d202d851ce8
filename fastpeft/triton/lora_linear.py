"""Launchers of ``fastpeft::lora_linear_triton`` / ``lora_linear_backward_triton``.

    y = x @ W^T + bias + s * dropout(x) @ A^T @ B^T,   xa = dropout(x) @ A^T (saved)

Shapes (2-D; the public wrapper flattens leading dims): x (T, K), weight W (N, K) (row-major,
or the transposed view of a row-major (K, N) tensor such as GPT-2's Conv1D weight.t(), both
read in place; any other layout is made contiguous first), bias (N,), lora_A (R, K),
lora_B (N, R). Forward: two launches (xa, then y with the LoRA term in its epilogue).
Backward: dB = s * dy^T @ xa and dyB = dy @ B by torch.mm, then two launches (dA; dx).
The kernels and the backward derivation are in :mod:`.lora_linear_kernels` and
:mod:`._common_kernels`. fp32 operands use tl.dot's "ieee" precision unless torch's float32
matmul precision allows TF32 (``torch.set_float32_matmul_precision("high")``), as torch.mm
does.
"""

import torch
import triton
from torch import Tensor

from ._common import allow_tf32, dot_block, dropout_args, size_bucket
from ._common_kernels import lora_branch_backward_lora_a_kernel, lora_branch_down_kernel
from .lora_linear_kernels import lora_linear_backward_dx_kernel, lora_linear_forward_kernel

__all__ = ["backward", "forward"]


def _in_place(weight: Tensor) -> Tensor:
    """The weight as the GEMM kernels read it: itself when row-major (N, K) or the transposed
    view of a row-major (K, N) tensor, else a contiguous copy (fastpeft.ops.lora_linear's
    base_weight, repeated here for direct calls of the op)."""
    if weight.is_contiguous() or weight.t().is_contiguous():
        return weight
    return weight.contiguous()


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scaling: float, dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(y (T, N), xa (T, R)) = (x @ W^T + bias + s * xa @ B^T, dropout(x) @ A^T)."""
    x, lora_A, lora_B = (t.contiguous() for t in (x, lora_A, lora_B))
    weight = _in_place(weight)
    T, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = x.new_empty((T, N))
    xa = x.new_empty((T, R))
    if T == 0:
        return y, xa
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    common = dict(IS_FP64=x.dtype == torch.float64, ALLOW_TF32=allow_tf32(x.dtype),
                  BLOCK_R=dot_block(R))
    tb = size_bucket(T)
    lora_branch_down_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]),)](
        x, lora_A, xa, seed_arg, T, K, R, tb, threshold, keep_scale,
        HAS_DROPOUT=has_dropout, **common)
    if N > 0:
        bias_arg = bias.contiguous() if bias is not None else x  # never read without bias
        lora_linear_forward_kernel[
            lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        ](x, weight, bias_arg, xa, lora_B, y, T, N, K, R, tb, *weight.stride(), scaling,
          HAS_BIAS=bias is not None, **common)
    return y, xa


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             xa: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
             compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (T, K) or empty, dA (R, K), dB (N, R))."""
    grad_y, x, lora_A, lora_B, xa = (t.contiguous() for t in (grad_y, x, lora_A, lora_B, xa))
    weight = _in_place(weight)
    T, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dx = x.new_empty((T, K)) if compute_dx else x.new_empty(0)
    if T == 0:  # sums over no rows
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    d_b = torch.mm(grad_y.t(), xa) * scaling
    dyb = torch.mm(grad_y, lora_B)  # (T, R) in the input dtype, fp32-accumulated by the mm
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    common = dict(IS_FP64=x.dtype == torch.float64, ALLOW_TF32=allow_tf32(x.dtype),
                  BLOCK_R=dot_block(R), HAS_DROPOUT=has_dropout)
    tb = size_bucket(T)
    lora_scale = scaling * keep_scale
    d_a = torch.empty_like(lora_A)
    if K > 0:
        lora_branch_backward_lora_a_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),)](
            dyb, x, d_a, seed_arg, T, K, R, tb, threshold, lora_scale, **common)
        if compute_dx:
            lora_linear_backward_dx_kernel[
                lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            ](grad_y, weight, dyb, lora_A, dx, seed_arg, T, N, K, R, tb, *weight.stride(),
              threshold, lora_scale, **common)
    return dx, d_a, d_b
