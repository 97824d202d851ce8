"""Launchers of ``fastpeft::nf4_lora_linear_triton`` / ``nf4_lora_linear_backward_triton``.

    W[n, k] = (NF4_VALUES[code(n, k)] * absmax[(n * K + k) // blocksize]).to(x.dtype)
    y = x @ W^T + bias + s * dropout(x) @ A^T @ B^T,   xa = dropout(x) @ A^T

Shapes (2-D; the public wrapper flattens leading dims): x (T, K), qweight (N, K // 2) uint8
(two codes per byte, the even column in the high nibble), absmax (ceil(N * K / blocksize),)
fp32, bias (N,), lora_A (R, K), lora_B (N, R). Forward, two launches: T > 16, xa then the
tiled GEMM dequantising W tile by tile, the LoRA term and bias in its epilogue;
1 <= T <= 16 (decode), the split-K GEMV (weight and LoRA down-projection partials, the
codes read once: half a byte per weight) then its epilogue. Backward: dB = s * dy^T @ xa and
dyB = dy @ B by torch.mm, then two launches (dA; dx). The kernels, the dequantisation and
the GEMV modes are in :mod:`.nf4_lora_linear_kernels`. fp32 operands use tl.dot's "ieee"
precision unless torch's float32 matmul precision allows TF32, as torch.mm does.
"""

import functools

import torch
import triton
from torch import Tensor

from .. import reference
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
from .nf4_lora_linear_kernels import (
    nf4_lora_linear_backward_dx_kernel_half,
    nf4_lora_linear_backward_dx_kernel_wide,
    nf4_lora_linear_forward_kernel_half,
    nf4_lora_linear_forward_kernel_wide,
    nf4_lora_linear_gemv_epilogue_kernel,
    nf4_lora_linear_gemv_kernel_bcast,
    nf4_lora_linear_gemv_kernel_dot,
    nf4_lora_linear_gemv_kernel_dot_fma,
)

__all__ = ["backward", "forward"]

# Token counts up to _GEMV_MAX_T take the split-K GEMV. Its K chunks are whole multiples of
# every config's BLOCK_K (so a chunk starts at a multiple of 4 for the dropout mask, and a
# tile never straddles two chunks).
_GEMV_MAX_T = 16
_GEMV_K_MULTIPLE = 32 if INTERPRET else 128


@functools.cache
def _table(device: torch.device) -> Tensor:
    """The 16 NF4 values, fp32, on ``device``: the kernels' look-up table (made once per
    device, so a warmed-up call allocates nothing)."""
    return reference.nf4_table(device)


def _log2_blocksize(blocksize: int) -> int:
    """log2 of a power-of-two block size of at least 16 (the ops' checks allow 16 .. 4096;
    the registered op may be called without them)."""
    if blocksize < 16 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize: expected a power of two >= 16, got {blocksize}")
    return blocksize.bit_length() - 1


def _rank_blocks(R: int, dtype: torch.dtype, allow_tf32: bool) -> dict:
    """BLOCK_R / MULTI_R of the GEMM epilogues (as int8_lora_linear's): all of R in one
    tl.dot up to 64 ranks (fp16 / bf16), 32 (fp32 with TF32) or 16 (FMA dots: fp32 "ieee",
    fp64); beyond, in place, 32 / 32 / 16 ranks at a time."""
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
    multiple of _GEMV_K_MULTIPLE (the last one shorter), as int8_lora_linear's GEMV."""
    m = _GEMV_K_MULTIPLE
    splits_wanted = triton.cdiv(4 * _num_sms(device), triton.cdiv(N, 64) + 1)
    chunk = max(m, triton.cdiv(triton.cdiv(K, splits_wanted), m) * m)
    return max(1, triton.cdiv(K, chunk)), chunk


def _gemv_kernel(T: int, dtype: torch.dtype, allow_tf32: bool):
    """The split-K GEMV's autotuned kernel: MODE 2 (tl.dot) for fp16 / bf16 at every T and
    for fp32 / fp64 from T = 2 (tensor cores with TF32, else the FMA dot), MODE 0 for fp32 /
    fp64 at T = 1 (see :mod:`.nf4_lora_linear_kernels`)."""
    if dtype in (torch.float16, torch.bfloat16) or (T > 1 and allow_tf32):
        return nf4_lora_linear_gemv_kernel_dot
    return nf4_lora_linear_gemv_kernel_bcast if T == 1 else nf4_lora_linear_gemv_kernel_dot_fma


def _weight_args(x: Tensor, K: int, blocksize: int) -> dict:
    """The constexprs that describe the quantised weight to every kernel."""
    return {"LOG2_BLOCKSIZE": _log2_blocksize(blocksize), "ROW_ALIGNED": K % blocksize == 0,
            "IS_FP64": x.dtype == torch.float64, "ALLOW_TF32": allow_tf32(x.dtype)}


def forward(x: Tensor, qweight: Tensor, absmax: Tensor, bias: Tensor | None, lora_A: Tensor,
            lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
            blocksize: int) -> tuple[Tensor, Tensor]:
    """(y (T, N), xa (T, R)) = (x @ W^T + bias + s * xa @ B^T, dropout(x) @ A^T), W the
    NF4 weight of ``(qweight, absmax, blocksize)``."""
    check_fp64_register_dots("nf4_lora_linear", x)
    x, qweight, absmax, lora_A, lora_B = (
        t.contiguous() for t in (x, qweight, absmax, lora_A, lora_B))
    T, K = x.shape
    N, R = qweight.shape[0], lora_A.shape[0]
    y = x.new_empty((T, N))
    xa = x.new_empty((T, R))
    weight = _weight_args(x, K, blocksize)
    if T == 0:
        return y, xa
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    table = _table(x.device)
    bias_arg = bias.contiguous() if bias is not None else x  # never read without bias
    if T <= _GEMV_MAX_T:
        split, chunk = _gemv_split(N, K, x.device)
        part = torch.empty((split, T, N), dtype=acc_dtype(x.dtype), device=x.device)
        part_xa = torch.empty((split, T, R), dtype=acc_dtype(x.dtype), device=x.device)
        _gemv_kernel(T, x.dtype, weight["ALLOW_TF32"])[
            lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) + triton.cdiv(R, meta["BLOCK_N"]),
                          split)
        ](x, qweight, absmax, table, lora_A, seed_arg, part, part_xa, T, N, K, R, chunk,
          threshold, HAS_DROPOUT=has_dropout, **weight)
        # At least one program, so that xa is stored when N == 0.
        nf4_lora_linear_gemv_epilogue_kernel[
            lambda meta: (max(1, triton.cdiv(N, meta["BLOCK_N"])),)
        ](part, part_xa, bias_arg, lora_B, y, xa, T, N, R, split, scaling, keep_scale,
          HAS_BIAS=bias is not None, ALLOW_TF32=weight["ALLOW_TF32"], BLOCK_T=16,
          BLOCK_R=min(dot_block(R), 64))
        return y, xa
    tb = size_bucket(T)
    lora_branch_down_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]),)](
        x, lora_A, xa, seed_arg, T, K, R, tb, threshold, keep_scale, HAS_DROPOUT=has_dropout,
        IS_FP64=weight["IS_FP64"], ALLOW_TF32=weight["ALLOW_TF32"], BLOCK_R=dot_block(R))
    if N > 0:
        fwd = (nf4_lora_linear_forward_kernel_half if x.element_size() == 2
               else nf4_lora_linear_forward_kernel_wide)
        ranks = _rank_blocks(R, x.dtype, weight["ALLOW_TF32"])
        xa_arg, s_arg = in_place_epilogue_args(xa, scaling, ranks["MULTI_R"])
        fwd[
            lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        ](x, qweight, absmax, table, bias_arg, xa_arg, lora_B, y, T, N, K, R, tb, s_arg,
          HAS_BIAS=bias is not None, **ranks, **weight)
    return y, xa


def backward(grad_y: Tensor, x: Tensor, qweight: Tensor, absmax: Tensor, lora_A: Tensor,
             lora_B: Tensor, xa: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
             blocksize: int, compute_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (T, K) or empty, dA (R, K), dB (N, R))."""
    check_fp64_register_dots("nf4_lora_linear", x)
    grad_y, x, qweight, absmax, lora_A, lora_B, xa = (
        t.contiguous() for t in (grad_y, x, qweight, absmax, lora_A, lora_B, xa))
    T, K = x.shape
    N, R = qweight.shape[0], lora_A.shape[0]
    weight = _weight_args(x, K, blocksize)
    dx = x.new_empty((T, K)) if compute_dx else x.new_empty(0)
    if T == 0:  # sums over no rows
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    d_b = torch.mm(grad_y.t(), xa) * scaling
    dyb = torch.mm(grad_y, lora_B)  # (T, R) in the input dtype, fp32-accumulated by the mm
    has_dropout, seed_arg, threshold, keep_scale = dropout_args(dropout_p, seed, x)
    tb = size_bucket(T)
    lora_scale = scaling * keep_scale
    d_a = torch.empty_like(lora_A)
    if K > 0:
        lora_branch_backward_lora_a_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),)](
            dyb, x, d_a, seed_arg, T, K, R, tb, threshold, lora_scale, HAS_DROPOUT=has_dropout,
            IS_FP64=weight["IS_FP64"], ALLOW_TF32=weight["ALLOW_TF32"], BLOCK_R=dot_block(R))
        if compute_dx:
            dx_kernel = (nf4_lora_linear_backward_dx_kernel_half if x.element_size() == 2
                         else nf4_lora_linear_backward_dx_kernel_wide)
            dx_kernel[
                lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            ](grad_y, qweight, absmax, _table(x.device), dyb, lora_A, dx, seed_arg, T, N, K, R,
              tb, threshold, lora_scale, HAS_DROPOUT=has_dropout,
              **_rank_blocks(R, x.dtype, weight["ALLOW_TF32"]), **weight)
    return dx, d_a, d_b
