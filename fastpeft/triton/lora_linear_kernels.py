"""Jit kernels of ``lora_linear`` (the LoRA branch's own kernels are in
:mod:`._common_kernels`).

Shapes (2-D): x (T, K), weight W (N, K), bias (N,), lora_A (R, K), lora_B (N, R), xa (T, R),
all contiguous except W, read through its two strides (W[n, k] at
w_ptr + n * stride_wn + k * stride_wk: row-major, or the transposed view of a row-major
(K, N) tensor). Triton specialises a stride of 1 to a constant, so the row-major weight
compiles to the same code as with a hard-coded unit stride. ``keep`` is the seeded Philox
mask of :mod:`._dropout`.

  lora_linear_forward_kernel      y  = x @ W^T + s * xa @ B^T + bias              (T, N)
      (the LoRA term is one extra tl.dot in the GEMM epilogue, K-dim = R padded to >= 16)
  lora_linear_backward_dx_kernel  dx = dy @ W + s/(1-p) * keep * (dyB @ A)         (T, K)

Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import triton
import triton.language as tl

from ._common import GEMM_INTERPRETED, cfgs, mnk, tuned
from ._common_kernels import grouped_tile
from ._dropout import dropout_keep_mask

# Output-tiled GEMMs (forward y, backward dx): BM/BN 64-128, BK 32-64.
_GEMM_CONFIGS = cfgs(
    GEMM_INTERPRETED,
    [
        (mnk(128, 128, 64), 8, 3),
        (mnk(128, 128, 64), 8, 4),
        (mnk(128, 128, 32), 8, 4),
        (mnk(128, 64, 64), 4, 4),
        (mnk(64, 128, 64), 4, 4),
        (mnk(64, 64, 64), 4, 4),
    ],
)


# stride_wk (1 for a row-major weight, N for a transposed view) keys the tuning: the two
# layouts may want different tiles.
@tuned(_GEMM_CONFIGS, key=["T_BUCKET", "N", "K", "BLOCK_R", "stride_wk"])
@triton.jit
def lora_linear_forward_kernel(x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, T, N, K, R,
                               T_BUCKET, stride_wn, stride_wk, scaling, HAS_BIAS: tl.constexpr,
                               IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr):
    """y tile (BLOCK_M, BLOCK_N) = x @ W^T over K, then + s * xa @ B^T + bias; W[n, k] is at
    w_ptr + n * stride_wn + k * stride_wk."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep the mainloop loads in bounds without row/column masks; the
    # duplicated rows/columns are discarded by the masked store.
    rows_in = rows % T
    cols_in = cols % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_in.to(tl.int64)[:, None] * K + rk[None, :]
    w_ptrs = (w_ptr + cols_in.to(tl.int64)[None, :] * stride_wn
              + rk[:, None] * stride_wk)  # W^T tile (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    # LoRA epilogue: (BLOCK_M, R) @ (R, BLOCK_N), R zero-padded to BLOCK_R >= 16.
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    xa = tl.load(xa_ptr + rows_in.to(tl.int64)[:, None] * R + rr[None, :],
                 mask=r_ok[None, :], other=0.0)
    bt = tl.load(b_ptr + cols_in.to(tl.int64)[None, :] * R + rr[:, None],
                 mask=r_ok[:, None], other=0.0)
    acc += scaling * tl.dot(xa, bt, input_precision="tf32" if ALLOW_TF32 else "ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in)[None, :].to(acc.dtype)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=(rows < T)[:, None] & (cols < N)[None, :])


# ---------------------------------------------------------------------------------------
# Backward. With u = keep * x / (1 - p) (T, K), xa = u @ A^T, z = xa @ B^T and
# y = x @ W^T + bias + s * z, for dy = dL/dy (T, N):
#   dL/dz  = s * dy                                   (T, N)
#   dB     = (dL/dz)^T @ xa = s * dy^T @ xa           (N, R)   torch.mm
#   dL/dxa = s * dy @ B = s * dyB,  dyB = dy @ B      (T, R)   torch.mm
#   dA     = (dL/dxa)^T @ u = s/(1-p) * dyB^T @ (keep * x)   (R, K)
#            lora_branch_backward_lora_a_kernel (in _common_kernels)
#   dL/du  = s * dyB @ A                              (T, K)
#   dx     = dy @ W + keep/(1-p) * dL/du
#          = dy @ W + s/(1-p) * keep * (dyB @ A)             (T, K)
#            lora_linear_backward_dx_kernel
# (keep/(1-p) is replaced by 1 when p == 0.) dx is one GEMM over N with the rank-R
# product and the regenerated mask in its epilogue; dA reads x once, regenerating the
# mask tile by tile.
# ---------------------------------------------------------------------------------------


@tuned(_GEMM_CONFIGS, key=["T_BUCKET", "N", "K", "BLOCK_R", "stride_wk"])
@triton.jit
def lora_linear_backward_dx_kernel(dy_ptr, w_ptr, dyb_ptr, a_ptr, dx_ptr, seed_ptr, T, N, K, R,
                                   T_BUCKET, stride_wn, stride_wk, threshold, lora_scale,
                                   HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
                                   ALLOW_TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx tile (BLOCK_M rows of T, BLOCK_N columns of K) = dy @ W over N (BLOCK_K steps),
    then + lora_scale * keep * (dyB @ A), lora_scale = s / (1 - p); W[n, k] is at
    w_ptr + n * stride_wn + k * stride_wk."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of x, start % 4 == 0
    rows_in = rows % T
    cols_in = cols % K
    rn = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + rows_in.to(tl.int64)[:, None] * N + rn[None, :]
    w_ptrs = (w_ptr + rn.to(tl.int64)[:, None] * stride_wn
              + cols_in.to(tl.int64)[None, :] * stride_wk)  # W tile (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    for n0 in range(0, N, BLOCK_K):
        n_ok = rn < N - n0
        dyt = tl.load(dy_ptrs, mask=n_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(dyt, wt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wn
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dyb = tl.load(dyb_ptr + rows_in.to(tl.int64)[:, None] * R + rr[None, :],
                  mask=r_ok[None, :], other=0.0)
    at = tl.load(a_ptr + rr[:, None] * K + cols_in[None, :], mask=r_ok[:, None], other=0.0)
    lora = lora_scale * tl.dot(dyb, at, input_precision="tf32" if ALLOW_TF32 else "ieee")
    if HAS_DROPOUT:
        keep = dropout_keep_mask(tl.load(seed_ptr), rows, cols, K, threshold)
        lora = tl.where(keep, lora, 0.0)
    acc += lora
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=(rows < T)[:, None] & (cols < K)[None, :])
