"""Jit code shared by more than one op: the grouped tile order of the GEMM kernels, the
rank-R product of the quantised ops' GEMM epilogues (:func:`rank_product`), and the two
kernels of the LoRA branch common to ``lora_linear``, ``int8_lora_linear`` and
``nf4_lora_linear``.

Shapes (2-D, contiguous): x (T, K), lora_A (R, K), xa (T, R), dyB = dy @ lora_B (T, R);
``keep`` is the seeded Philox mask of :mod:`._dropout`, regenerated, never stored:
  lora_branch_down_kernel            xa = (keep * x / (1 - p)) @ A^T           (T, R)
  lora_branch_backward_lora_a_kernel dA = s / (1 - p) * dyB^T @ (keep * x)     (R, K)
(keep / (1 - p) is replaced by 1 when p == 0.) R is one tile, zero-padded to BLOCK_R >= 16.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import triton
import triton.language as tl

from ._common import cfgs, tuned
from ._dropout import dropout_keep_mask

# Down-projection (T, K) @ (K, R): memory-bound on x, so small row blocks for parallelism.
_DOWN_CONFIGS = cfgs(
    {"BLOCK_M": 16, "BLOCK_K": 32},
    [
        ({"BLOCK_M": 16, "BLOCK_K": 128}, 4, 4),
        ({"BLOCK_M": 32, "BLOCK_K": 128}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_M": 64, "BLOCK_K": 128}, 4, 3),
        ({"BLOCK_M": 128, "BLOCK_K": 64}, 8, 3),
    ],
)
# dA: one program per K-column block, looping over T in BLOCK_T steps.
_DA_CONFIGS = cfgs(
    {"BLOCK_T": 16, "BLOCK_K": 32},
    [
        ({"BLOCK_T": 64, "BLOCK_K": 32}, 4, 4),
        ({"BLOCK_T": 128, "BLOCK_K": 32}, 4, 3),
        ({"BLOCK_T": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_T": 128, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_T": 64, "BLOCK_K": 128}, 8, 3),
    ],
)


@triton.jit
def grouped_tile(pid, M, NCOL, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D launch, GROUP_M row blocks at a time so the column tiles
    of the right-hand operand are reused from L2 across neighbouring programs."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NCOL, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def rank_product(acc, l_ptrs, l_stride, r_ptrs, r_stride, R, ALLOW_TF32: tl.constexpr,
                 MULTI_R: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + L @ Rt over the rank dimension R (the LoRA term of a GEMM epilogue): L element
    (i, r) at ``l_ptrs[i] + r * l_stride``, Rt element (r, j) at ``r_ptrs[j] + r * r_stride``;
    ``l_ptrs`` is (BI, 1), ``r_ptrs`` (1, BJ). All of R in one tl.dot (BLOCK_R >= R, zero
    padded), or BLOCK_R ranks at a time when MULTI_R (one dot over many ranks spills)."""
    rr = tl.arange(0, BLOCK_R)
    if MULTI_R:
        # Not pipelined: staged rank tiles would only cost shared memory and registers.
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            r_ok = rr < R - r0
            lt = tl.load(l_ptrs + (r0 + rr)[None, :] * l_stride, mask=r_ok[None, :], other=0.0)
            rt = tl.load(r_ptrs + (r0 + rr)[:, None] * r_stride, mask=r_ok[:, None], other=0.0)
            acc = tl.dot(lt, rt, acc, out_dtype=acc.dtype,
                         input_precision="tf32" if ALLOW_TF32 else "ieee")
    else:
        r_ok = rr < R
        lt = tl.load(l_ptrs + rr[None, :] * l_stride, mask=r_ok[None, :], other=0.0)
        rt = tl.load(r_ptrs + rr[:, None] * r_stride, mask=r_ok[:, None], other=0.0)
        acc = tl.dot(lt, rt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    return acc


@tuned(_DOWN_CONFIGS, key=["T_BUCKET", "K", "BLOCK_R"])
@triton.jit
def lora_branch_down_kernel(x_ptr, a_ptr, xa_ptr, seed_ptr, T, K, R, T_BUCKET, threshold,
                            keep_scale, HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
                            ALLOW_TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """xa[rows] = (keep * x[rows] / (1 - p)) @ A^T for one block of BLOCK_M rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < T
    x_row = x_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64 if IS_FP64 else tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        xt = tl.load(x_row + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(dropout_keep_mask(seed, rows, cols, K, threshold), xt, 0.0)
        # A^T tile (BLOCK_K, BLOCK_R) read straight from row-major A (R, K).
        at = tl.load(a_ptr + rr[None, :] * K + cols[:, None],
                     mask=col_ok[:, None] & (rr < R)[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    if HAS_DROPOUT:
        acc = acc * keep_scale  # 1 / (1 - p), once per output instead of per x element
    tl.store(xa_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :],
             acc.to(xa_ptr.dtype.element_ty), mask=row_ok[:, None] & (rr < R)[None, :])


@tuned(_DA_CONFIGS, key=["T_BUCKET", "K", "BLOCK_R"])
@triton.jit
def lora_branch_backward_lora_a_kernel(dyb_ptr, x_ptr, da_ptr, seed_ptr, T, K, R, T_BUCKET,
                                       threshold, lora_scale, HAS_DROPOUT: tl.constexpr,
                                       IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                       BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                                       BLOCK_K: tl.constexpr):
    """dA[:, cols] = lora_scale * dyB^T @ (keep * x[:, cols]) for one block of BLOCK_K
    columns, looping over all T rows (no atomics; lora_scale = s / (1 - p))."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float64 if IS_FP64 else tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        # dyB^T tile (BLOCK_R, BLOCK_T) from row-major dyB (T, R).
        dybt = tl.load(dyb_ptr + rows.to(tl.int64)[None, :] * R + rr[:, None],
                       mask=r_ok[:, None] & row_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(dropout_keep_mask(seed, rows, cols, K, threshold), xt, 0.0)
        acc = tl.dot(dybt, xt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    tl.store(da_ptr + rr[:, None] * K + cols[None, :],
             (acc * lora_scale).to(da_ptr.dtype.element_ty),
             mask=r_ok[:, None] & col_ok[None, :])
