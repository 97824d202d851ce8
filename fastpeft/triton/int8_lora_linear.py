"""Launchers of ``fastpeft::int8_lora_linear_triton`` / ``int8_lora_linear_backward_triton``.

    y = x @ (Q * sc[:, None])^T + bias + s * dropout(x) @ A^T @ B^T,   xa = dropout(x) @ A^T

Shapes (2-D; the public wrapper flattens leading dims): x (T, K), qweight Q (N, K) int8,
weight_scale sc (N,) fp32, bias (N,), lora_A (R, K), lora_B (N, R). Forward, two launches:
T > 16, xa then the tiled GEMM with sc, the LoRA term and bias in its epilogue; 1 <= T <= 16
(decode), the split-K GEMV (weight and LoRA down-projection partials) then its epilogue.
Backward: dB = s * dy^T @ xa and dyB = dy @ B by torch.mm, then two launches (dA; dx).
The kernels, their math and the GEMV modes are in :mod:`.int8_lora_linear_kernels`.
fp32 operands use tl.dot's "ieee" precision unless torch's float32 matmul precision allows
TF32 (``torch.set_float32_matmul_precision("high")``), as torch.mm does.
"""

import functools

import torch
import triton
from torch import Tensor

from ._common import (
    INTERPRET,
    acc_dtype,
    allow_tf32,
    check_fp64_register_dots,
    dot_block,
    dropout_args,
    in_place_epilogue_args,
    size_bucket,
)
from ._common_kernels import lora_branch_backward_lora_a_kernel, lora_branch_down_kernel
from .int8_lora_linear_kernels import (
    int8_lora_linear_backward_dx_kernel_half,
    int8_lora_linear_backward_dx_kernel_wide,
    int8_lora_linear_forward_kernel_half,
    int8_lora_linear_forward_kernel_wide,
    int8_lora_linear_gemv_epilogue_kernel,
    int8_lora_linear_gemv_kernel_bcast,
    int8_lora_linear_gemv_kernel_dot,
    int8_lora_linear_gemv_kernel_dot_fma,
    int8_lora_linear_gemv_kernel_dot_tf32,
    int8_lora_linear_gemv_kernel_t1,
)

__all__ = ["backward", "forward"]

# Token counts up to _GEMV_MAX_T take the split-K GEMV. Its K chunks are whole multiples of
# every config's BLOCK_K (so a chunk starts at a multiple of 4 for the dropout mask, and of
# 16 for aligned int8 vector loads).
_GEMV_MAX_T = 16
_GEMV_K_MULTIPLE = 32 if INTERPRET else 256


def _rank_blocks(R: int, dtype: torch.dtype, allow_tf32: bool) -> dict:
    """BLOCK_R / MULTI_R of the GEMM epilogues (the LoRA branch kernels take R whole:
    dot_block). All of R in one tl.dot up to 64 ranks (fp16 / bf16), 32 (fp32 with TF32)
    or 16 (FMA dots: fp32 "ieee", fp64); beyond, in place, 32 / 32 / 16 ranks at a time:
    the largest blocks that compile without register spills for sm_90 in every config."""
    if dtype in (torch.float16, torch.bfloat16):
        whole, step = 64, 32
    elif dtype == torch.float32 and allow_tf32:
        whole, step = 32, 32
    else:
        whole, step = 16, 16
    if R <= whole:
        return {"BLOCK_R": dot_block(R), "MULTI_R": False}
    return {"BLOCK_R": step, "MULTI_R": True}


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, but still several K splits in the tests


def _gemv_split(N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, K_CHUNK): about 4 programs per SM with 64-row weight blocks, each K chunk a
    multiple of _GEMV_K_MULTIPLE (the last one shorter). N = K = 4096 on 132 SMs: K chunks
    of 512, 8 splits, 520 .. 2056 programs; the fp32 partials are SPLIT * T * (N + R) * 4
    bytes, written once and read back from L2 (128 KiB per row of x, against 16 MiB of
    weight)."""
    m = _GEMV_K_MULTIPLE
    splits_wanted = triton.cdiv(4 * _num_sms(device), triton.cdiv(N, 64) + 1)
    chunk = max(m, triton.cdiv(triton.cdiv(K, splits_wanted), m) * m)
    return max(1, triton.cdiv(K, chunk)), chunk


def _gemv_kernel(T: int, dtype: torch.dtype, allow_tf32: bool):
    """(kernel, its MODE / BLOCK_T arguments) of the split-K GEMV: the mode with the least
    ALU work per weight (see :mod:`.int8_lora_linear_kernels`). fp16 / bf16: MODE 2 (at
    T = 1 the autotuner chooses between MODE 2 and MODE 0); fp32 / fp64: MODE 0 at T = 1,
    then MODE 2 with TF32, else MODE 1 up to T = 4, MODE 2 beyond."""
    if dtype in (torch.float16, torch.bfloat16):
        return (int8_lora_linear_gemv_kernel_t1 if T == 1
                else int8_lora_linear_gemv_kernel_dot), {}
    if T == 1:
        return int8_lora_linear_gemv_kernel_bcast, {"MODE": 0, "BLOCK_T": 1}
    if allow_tf32:
        return int8_lora_linear_gemv_kernel_dot_tf32, {}
    if T > 4:
        return int8_lora_linear_gemv_kernel_dot_fma, {}
    return int8_lora_linear_gemv_kernel_bcast, {"MODE": 1,
                                                "BLOCK_T": triton.next_power_of_2(int(T))}


def forward(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None,
            lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
            seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(y (T, N), xa (T, R)) = (x @ W^T + bias + s * xa @ B^T, dropout(x) @ A^T),
    W = qweight * weight_scale[:, None]."""
    check_fp64_register_dots("int8_lora_linear", x)
    x, qweight, weight_scale, lora_A, lora_B = (
        t.contiguous() for t in (x, qweight, weight_scale, lora_A, lora_B))
    T, K = x.shape
    N, R = qweight.shape[0], lora_A.shape[0]
    y = x.new_empty((T, N))
    xa = x.new_empty((T, R))
    if T == 0:
        return y, xa
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    is_fp64 = x.dtype == torch.float64
    tf32 = allow_tf32(x.dtype)
    bias_arg = bias.contiguous() if bias is not None else x  # never read without bias
    if T <= _GEMV_MAX_T:
        split, chunk = _gemv_split(N, K, x.device)
        gemv, gemv_mode = _gemv_kernel(T, x.dtype, tf32)
        part = torch.empty((split, T, N), dtype=acc_dtype(x.dtype), device=x.device)
        part_xa = torch.empty((split, T, R), dtype=acc_dtype(x.dtype), device=x.device)
        gemv[
            lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) + triton.cdiv(R, meta["BLOCK_N"]),
                          split)
        ](x, qweight, lora_A, seed_arg, part, part_xa, T, N, K, R, chunk, threshold,
          HAS_DROPOUT=has_dropout, IS_FP64=is_fp64, ALLOW_TF32=tf32, **gemv_mode)
        # At least one program, so that xa is stored when N == 0.
        int8_lora_linear_gemv_epilogue_kernel[
            lambda meta: (max(1, triton.cdiv(N, meta["BLOCK_N"])),)
        ](part, part_xa, weight_scale, bias_arg, lora_B, y, xa, T, N, R, split, scaling,
          keep_scale, HAS_BIAS=bias is not None, ALLOW_TF32=tf32, BLOCK_T=16,
          BLOCK_R=min(dot_block(R), 64))
        return y, xa
    common = dict(IS_FP64=is_fp64, ALLOW_TF32=tf32)
    tb = size_bucket(T)
    lora_branch_down_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]),)](
        x, lora_A, xa, seed_arg, T, K, R, tb, threshold, keep_scale,
        HAS_DROPOUT=has_dropout, BLOCK_R=dot_block(R), **common)
    if N > 0:
        fwd = (int8_lora_linear_forward_kernel_half if x.element_size() == 2
               else int8_lora_linear_forward_kernel_wide)
        ranks = _rank_blocks(R, x.dtype, tf32)
        xa_arg, s_arg = in_place_epilogue_args(xa, scaling, ranks["MULTI_R"])
        fwd[
            lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        ](x, qweight, weight_scale, bias_arg, xa_arg, lora_B, y, T, N, K, R, tb, s_arg,
          HAS_BIAS=bias is not None, **ranks, **common)
    return y, xa


def backward(grad_y: Tensor, x: Tensor, qweight: Tensor, weight_scale: Tensor, lora_A: Tensor,
             lora_B: Tensor, xa: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
             compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (T, K) or empty, dA (R, K), dB (N, R))."""
    check_fp64_register_dots("int8_lora_linear", x)
    grad_y, x, qweight, weight_scale, lora_A, lora_B, xa = (
        t.contiguous() for t in (grad_y, x, qweight, weight_scale, lora_A, lora_B, xa))
    T, K = x.shape
    N, R = qweight.shape[0], lora_A.shape[0]
    dx = x.new_empty((T, K)) if compute_dx else x.new_empty(0)
    if T == 0:  # sums over no rows
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    d_b = torch.mm(grad_y.t(), xa) * scaling
    dyb = torch.mm(grad_y, lora_B)  # (T, R) in the input dtype, fp32-accumulated by the mm
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    common = dict(IS_FP64=x.dtype == torch.float64, ALLOW_TF32=allow_tf32(x.dtype),
                  HAS_DROPOUT=has_dropout)
    tb = size_bucket(T)
    lora_scale = scaling * keep_scale
    d_a = torch.empty_like(lora_A)
    if K > 0:
        lora_branch_backward_lora_a_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),)](
            dyb, x, d_a, seed_arg, T, K, R, tb, threshold, lora_scale, BLOCK_R=dot_block(R),
            **common)
        if compute_dx:
            dx_kernel = (int8_lora_linear_backward_dx_kernel_half if x.element_size() == 2
                         else int8_lora_linear_backward_dx_kernel_wide)
            dx_kernel[
                lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            ](grad_y, qweight, weight_scale, dyb, lora_A, dx, seed_arg, T, N, K, R, tb,
              threshold, lora_scale, **_rank_blocks(R, x.dtype, common["ALLOW_TF32"]),
              **common)
    return dx, d_a, d_b
