"""Jit kernels of ``nf4_lora_linear``: ``lora_linear`` over a 4-bit NF4 base (QLoRA,
bitsandbytes' format) that is never built: the kernels read the packed codes, half a byte
per weight, and dequantise tile by tile. The LoRA branch's own kernels are in
:mod:`._common_kernels`.

Shapes (2-D, contiguous): x (T, K), qweight Q (N, K / 2) uint8, absmax (ceil(N K / BS),)
fp32, table (16,) fp32 (``reference.NF4_VALUES``), bias (N,), lora_A (R, K), lora_B (N, R),
xa (T, R), dyB = dy @ B (T, R); ``keep`` is the seeded Philox mask of :mod:`._dropout`.
The weight is the reference's: an fp32 product, rounded once to x's dtype,

    W[n, k] = (table[code(n, k)] * absmax[(n K + k) >> LOG2_BLOCKSIZE]).to(x.dtype)
    code(n, 2j) = Q[n, j] >> 4,    code(n, 2j + 1) = Q[n, j] & 15

(blocks run over the flattened weight: with K % BS != 0 a block crosses into the next row).

  nf4_lora_linear_forward_kernel        y = x @ W^T + s * xa @ B^T + bias        (T > 16)
  nf4_lora_linear_gemv_kernel           split-K partials, chunk c of K (T <= 16):
      part[c] = W[:, chunk] @ x[:, chunk]^T,  part_xa[c] = A[:, chunk] @ (keep * x[:, chunk])^T
  nf4_lora_linear_gemv_epilogue_kernel  y = sum_c part[c] + s * xa @ B^T + bias,
                                        xa = sum_c part_xa[c] / (1 - p)
  nf4_lora_linear_backward_dx_kernel    dx = dy @ W + s/(1-p) * keep * (dyB @ A)

Dequantisation (:func:`_nf4_halves`): a (rows, WIDTH) tile of W is WIDTH / 2 bytes per
row, whose high nibbles are the tile's even columns and low nibbles its odd ones.
 * The NF4 value of a code is a gather load from the 16-entry fp32 table: 64 bytes, one L1
   line, which all 32 lanes of a warp's load hit, and the values are the ones the reference
   multiplies (exact). An arithmetic select tree over the code's 4 bits costs 15
   selects per weight; a 256-entry table of byte pairs would halve the loads but spread a
   warp's gathers over the 16 lines of its 2 KiB.
 * absmax: the two codes of a byte share a block (BS >= 16 is even and a pair starts at an
   even flat index), so it is gathered once per byte; once per row when every row is whole
   blocks (K % BS == 0: ROW_ALIGNED) and the tile's columns lie in one block (WIDTH <= BS,
   the tile starting at a multiple of WIDTH).
 * The products are taken in fp32 and rounded to the dot dtype, as the reference does; the
   scale varies along K, so unlike int8's row scale it cannot be factored out of the dot.

How the two halves meet x: the GEMMs interleave them back into one (rows, WIDTH) tile
(tl.interleave: a join and a reshape, accepted by the interpreter and, for sm_90, by
Triton 3.6 and 3.9: benchmarks/compile_check.py), so that x and dy stay contiguous,
vectorised loads that the pipeliner can copy asynchronously. The GEMV keeps the halves
apart and loads x's even and odd columns instead (strided loads of at most 16 rows of x,
from L1): two dots of half the width, and no register shuffle of the streamed weight.

Tiled forward (T > 16): as int8_lora_linear's, computed transposed, y^T = W @ x^T, so that
the dequantised tile is the dot's register (left) operand on Hopper and the token count is
the MMA's N side. The LoRA term and bias are the epilogue.

Split-K GEMV (1 <= T <= 16, decode): int8_lora_linear's scheme (see its module: grid
(cdiv(N, BLOCK_N) + cdiv(R, BLOCK_N), SPLIT), the last columns of programs doing the LoRA
down-projection, fp32 partials reduced in a fixed order by the epilogue), in two modes:
  MODE 2  tl.dot with x^T padded to 16 columns (rows past T repeat row t % T; not stored):
          fp16 / bf16 at every T, fp32 (TF32 or FMA dot) and fp64 at T >= 2;
  MODE 0  T = 1 in fp32 / fp64: a broadcast multiply into a (BLOCK_N, BLOCK_K / 2)
          accumulator, one tl.sum after the K loop (an FMA dot padded to 16 columns does 16
          times the multiplies).
Dequantising (a shift or a mask, a table load, a multiply and a conversion per weight, an
absmax load per byte) is most of the work per weight: with half a byte per weight to
stream, this path is likely bound by instruction issue rather than by memory bandwidth.

Backward dx (T rows, any T): as int8's, transposed, dx^T = W^T @ dy^T over N, the
dequantised (and transposed) W tile the register operand; the LoRA term and the mask
first.

Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import triton
import triton.language as tl

from ._common import GEMM_INTERPRETED, cfgs, mnk, tuned
from ._common_kernels import grouped_tile, rank_product
from ._dropout import dropout_keep_mask

# Tiled GEMMs: forward y^T tiles (BLOCK_N weight rows, BLOCK_M tokens, BLOCK_K columns of
# W per step); backward dx tiles (BLOCK_M tokens, BLOCK_N columns of W, BLOCK_K rows of W
# per step). The dequantised tile is BLOCK_N x BLOCK_K (forward) or BLOCK_K x BLOCK_N
# (dx) values computed in fp32 registers first. fp16 / bf16:
_GEMM_CONFIGS = cfgs(
    GEMM_INTERPRETED,
    [
        (mnk(128, 128, 64), 8, 3),
        (mnk(64, 128, 64), 4, 4),
        (mnk(128, 64, 64), 4, 4),
        (mnk(64, 64, 128), 4, 3),
        (mnk(32, 128, 64), 4, 4),
    ],
)
# fp32 (TF32 or the FMA dot of "ieee" precision) and fp64: BLOCK_K 32, as int8's.
_GEMM_CONFIGS_WIDE = cfgs(
    GEMM_INTERPRETED,
    [
        (mnk(128, 128, 32), 8, 3),
        (mnk(64, 128, 32), 4, 4),
        (mnk(128, 64, 32), 4, 4),
        (mnk(64, 64, 32), 4, 4),
    ],
)
_GEMM_KEY = ["T_BUCKET", "N", "K", "BLOCK_R", "MULTI_R", "LOG2_BLOCKSIZE", "ROW_ALIGNED"]
# Split-K GEMV: (BLOCK_N weight rows, BLOCK_K columns) tiles, BLOCK_K / 2 bytes per row.
# MODE 2 (x^T padded to 16 columns), 16 rows per warp as int8's (mma.sync's warps split
# the rows, none dequantises a replicated copy); BLOCK_K up to 128 (64 bytes of codes per
# row and step): 256 spills for sm_90 with 1 or 2 warps. fp16 / bf16, fp32 with TF32:
_GEMV_DOT = [
    ({"BLOCK_N": 32, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 2, 4),
    ({"BLOCK_N": 16, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 1, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 4, 4),
    ({"BLOCK_N": 32, "BLOCK_K": 64, "MODE": 2, "BLOCK_T": 16}, 2, 4),
]
# fp32 "ieee" and fp64: Triton's FMA dot holds both operands in registers: short BLOCK_K.
_GEMV_DOT_FMA = [
    ({"BLOCK_N": 32, "BLOCK_K": 64, "MODE": 2, "BLOCK_T": 16}, 2, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 64, "MODE": 2, "BLOCK_T": 16}, 4, 3),
]
# MODE 0 (T = 1, fp32 / fp64): the accumulator is BLOCK_N * BLOCK_K / 2 / (32 * warps)
# registers per thread (32 here).
_GEMV_BCAST = [
    ({"BLOCK_N": 32, "BLOCK_K": 128, "MODE": 0, "BLOCK_T": 1}, 2, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 128, "MODE": 0, "BLOCK_T": 1}, 4, 3),
    ({"BLOCK_N": 128, "BLOCK_K": 128, "MODE": 0, "BLOCK_T": 1}, 8, 3),
]
_GEMV_KEY = ["N", "K", "K_CHUNK", "LOG2_BLOCKSIZE", "ROW_ALIGNED"]
_GEMV_EPI_CONFIGS = cfgs(
    {"BLOCK_N": 16},
    [({"BLOCK_N": 64}, 4, 1), ({"BLOCK_N": 128}, 4, 1), ({"BLOCK_N": 256}, 8, 1)],
)


@triton.jit
def _nf4_halves(q_ptr, absmax_ptr, table_ptr, n, k0, K, dtype: tl.constexpr,
                LOG2_BLOCKSIZE: tl.constexpr, ROW_ALIGNED: tl.constexpr, WIDTH: tl.constexpr):
    """(even, odd): columns k0, k0 + 2, ... and k0 + 1, k0 + 3, ... (k0 even) of the rows
    ``n`` (BR,) of W, each (BR, WIDTH // 2) in ``dtype``. ``n`` must be in bounds; columns
    at or past K read code 0 and (general path) absmax 0 or (ROW_ALIGNED path) the row's
    absmax: finite values that the callers multiply by zeros or never store."""
    BLOCKSIZE: tl.constexpr = 1 << LOG2_BLOCKSIZE
    j = tl.arange(0, WIDTH // 2)
    k_ok = (j < (K - k0) // 2)[None, :]
    rows = n.to(tl.int64)[:, None]
    byte = tl.load(q_ptr + rows * (K // 2) + (k0 // 2 + j)[None, :], mask=k_ok, other=0)
    code = byte.to(tl.int32)
    if ROW_ALIGNED and WIDTH <= BLOCKSIZE:
        # The tile's columns k0 .. k0 + WIDTH - 1 are in block k0 / BS of the row.
        am = tl.load(absmax_ptr + rows * (K >> LOG2_BLOCKSIZE) + (k0 >> LOG2_BLOCKSIZE))
    else:
        am = tl.load(absmax_ptr + ((rows * K + (k0 + 2 * j)[None, :]) >> LOG2_BLOCKSIZE),
                     mask=k_ok, other=0.0)
    even = (tl.load(table_ptr + (code >> 4)) * am).to(dtype)
    odd = (tl.load(table_ptr + (code & 15)) * am).to(dtype)
    return even, odd


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def nf4_lora_linear_forward_kernel(x_ptr, q_ptr, absmax_ptr, table_ptr, bias_ptr, xa_ptr, b_ptr,
                                   y_ptr, T, N, K, R, T_BUCKET, scaling, HAS_BIAS: tl.constexpr,
                                   IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                   LOG2_BLOCKSIZE: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                                   MULTI_R: tl.constexpr, BLOCK_R: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y^T tile (BLOCK_N columns of y, BLOCK_M rows) = W @ x^T + s * B @ xa^T + bias."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features (rows of W)
    # Wrapped indices keep the mainloop loads in bounds without row/column masks; the
    # duplicated rows/columns are discarded by the masked store.
    rows_in = rows % T
    cols_in = cols % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_in.to(tl.int64)[None, :] * K + rk[:, None]  # x^T tile (BK, BM)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float64 if IS_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        even, odd = _nf4_halves(q_ptr, absmax_ptr, table_ptr, cols_in, k0, K,
                                x_ptr.dtype.element_ty, LOG2_BLOCKSIZE, ROW_ALIGNED, BLOCK_K)
        # Columns past K: W is finite there and x is zero.
        xt = tl.load(x_ptrs, mask=(rk < K - k0)[:, None], other=0.0)
        acc = tl.dot(tl.interleave(even, odd), xt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        x_ptrs += BLOCK_K
    # LoRA epilogue: B (BLOCK_N, R) @ xa^T (R, BLOCK_M), R zero-padded to BLOCK_R >= 16.
    b_ptrs = b_ptr + cols_in.to(tl.int64)[:, None] * R
    xa_ptrs = xa_ptr + rows_in.to(tl.int64)[None, :] * R
    if MULTI_R:
        # Many ranks, BLOCK_R at a time, accumulated in place (a second (BLOCK_N, BLOCK_M)
        # accumulator spills): acc + s * B @ xa^T = s * (acc / s + B @ xa^T).
        if scaling != 0.0:
            acc = rank_product(acc * (1.0 / scaling), b_ptrs, 1, xa_ptrs, 1, R, ALLOW_TF32,
                               MULTI_R, BLOCK_R) * scaling
    else:
        acc += scaling * rank_product(tl.zeros_like(acc), b_ptrs, 1, xa_ptrs, 1, R,
                                      ALLOW_TF32, MULTI_R, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in)[:, None].to(acc.dtype)
    tl.store(y_ptr + rows.to(tl.int64)[None, :] * N + cols[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=(cols < N)[:, None] & (rows < T)[None, :])


# Autotuned: fp16 / bf16 (_half), fp32 / fp64 (_wide).
nf4_lora_linear_forward_kernel_half = tuned(_GEMM_CONFIGS, key=_GEMM_KEY)(
    nf4_lora_linear_forward_kernel)
nf4_lora_linear_forward_kernel_wide = tuned(_GEMM_CONFIGS_WIDE, key=_GEMM_KEY)(
    nf4_lora_linear_forward_kernel)


@triton.jit
def _gemv_weight_rows(q_ptr, absmax_ptr, table_ptr, x_ptr, n, T, K, k_begin, k_end,
                      IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                      LOG2_BLOCKSIZE: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                      MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BR, BLOCK_T) = W[n, k_begin:k_end] @ x[t % T, k_begin:k_end]^T for the rows ``n``
    (BR,) of W, the even and odd columns apart (see the module docstring)."""
    BR: tl.constexpr = n.shape[0]
    HALF: tl.constexpr = BLOCK_K // 2
    acc_ty: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    rt = tl.arange(0, BLOCK_T)
    j = tl.arange(0, HALF)
    acc = tl.zeros((BR, BLOCK_T), dtype=acc_ty)
    acc2 = tl.zeros((BR, HALF) if MODE == 0 else (1, 1), dtype=acc_ty)
    # Chunks are whole BLOCK_K steps, so a step leaves its chunk only at K.
    for k0 in range(k_begin, k_end, BLOCK_K):
        even, odd = _nf4_halves(q_ptr, absmax_ptr, table_ptr, n, k0, K, x_ptr.dtype.element_ty,
                                LOG2_BLOCKSIZE, ROW_ALIGNED, BLOCK_K)
        ke = k0 + 2 * j  # the even columns; K is even, so ke < K covers ke + 1 too
        k_ok = (ke < K)[None, :]
        if MODE == 2:
            # Rows past T read row t % T (in bounds, no mask); their results are not stored.
            x_ptrs = x_ptr + (rt % T).to(tl.int64)[:, None] * K + ke[None, :]
            xe = tl.load(x_ptrs, mask=k_ok, other=0.0)
            xo = tl.load(x_ptrs + 1, mask=k_ok, other=0.0)
            acc = tl.dot(even, tl.trans(xe), acc, out_dtype=acc.dtype,
                         input_precision="tf32" if ALLOW_TF32 else "ieee")
            acc = tl.dot(odd, tl.trans(xo), acc, out_dtype=acc.dtype,
                         input_precision="tf32" if ALLOW_TF32 else "ieee")
        else:
            # The row of x loaded as a (BR, HALF) broadcast (stride 0 over the rows) so that
            # it gets the weight tile's register layout, as int8's MODE 0.
            x_ptrs = x_ptr + tl.zeros((BR, 1), dtype=tl.int32) + ke[None, :]
            xe = tl.load(x_ptrs, mask=k_ok, other=0.0)
            xo = tl.load(x_ptrs + 1, mask=k_ok, other=0.0)
            acc2 += even.to(acc_ty) * xe.to(acc_ty) + odd.to(acc_ty) * xo.to(acc_ty)
    if MODE == 0:
        acc += tl.sum(acc2, axis=1)[:, None]
    return acc


@triton.jit
def _gemv_lora_rows(a_ptr, x_ptr, seed, ra, T, K, R, k_begin, k_end, threshold,
                    HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                    MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BR, BLOCK_T) = A[ra % R, k_begin:k_end] @ (keep * x[t % T, k_begin:k_end])^T
    (the mask not scaled; k_begin % 4 == 0)."""
    BR: tl.constexpr = ra.shape[0]
    acc_ty: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    rt = tl.arange(0, BLOCK_T)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (ra % R).to(tl.int64)[:, None] * K
    acc = tl.zeros((BR, BLOCK_T), dtype=acc_ty)
    acc2 = tl.zeros((BR, BLOCK_K) if MODE == 0 else (1, 1), dtype=acc_ty)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + rk
        k_ok = (ks < K)[None, :]
        a = tl.load(a_rows + ks[None, :], mask=k_ok, other=0.0)
        if MODE == 2:
            xt = tl.load(x_ptr + (rt % T).to(tl.int64)[:, None] * K + ks[None, :], mask=k_ok,
                         other=0.0)
            if HAS_DROPOUT:
                xt = tl.where(dropout_keep_mask(seed, rt, ks, K, threshold), xt, 0.0)
            acc = tl.dot(a, tl.trans(xt), acc, out_dtype=acc.dtype,
                         input_precision="tf32" if ALLOW_TF32 else "ieee")
        else:
            xr = tl.load(x_ptr + tl.zeros((BR, 1), dtype=tl.int32) + ks[None, :], mask=k_ok,
                         other=0.0)
            if HAS_DROPOUT:
                row = tl.zeros((1,), dtype=tl.int32)
                xr = tl.where(dropout_keep_mask(seed, row, ks, K, threshold), xr, 0.0)
            acc2 += a.to(acc_ty) * xr.to(acc_ty)
    if MODE == 0:
        acc += tl.sum(acc2, axis=1)[:, None]
    return acc


@triton.jit
def nf4_lora_linear_gemv_kernel(x_ptr, q_ptr, absmax_ptr, table_ptr, a_ptr, seed_ptr, part_ptr,
                                part_xa_ptr, T, N, K, R, K_CHUNK, threshold,
                                HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
                                ALLOW_TF32: tl.constexpr, LOG2_BLOCKSIZE: tl.constexpr,
                                ROW_ALIGNED: tl.constexpr, MODE: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """part[pid_k, :T, n-block] = W[n-block, chunk] @ x[:, chunk]^T (fp32); the last
    cdiv(R, BLOCK_N) columns of programs take BLOCK_N rows of lora_A instead:
    part_xa[pid_k, :T, r-block] = A[r-block, chunk] @ (keep * x[:, chunk])^T."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_begin = pid_k * K_CHUNK
    k_end = tl.minimum(k_begin + K_CHUNK, K)
    rt = tl.arange(0, BLOCK_T)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    num_n = tl.cdiv(N, BLOCK_N)
    if pid_n < num_n:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_w = _gemv_weight_rows(q_ptr, absmax_ptr, table_ptr, x_ptr, cols % N, T, K, k_begin,
                                  k_end, IS_FP64, ALLOW_TF32, LOG2_BLOCKSIZE, ROW_ALIGNED, MODE,
                                  BLOCK_T, BLOCK_K)
        tl.store(part_ptr + (pid_k * T + rt).to(tl.int64)[None, :] * N + cols[:, None], acc_w,
                 mask=(cols < N)[:, None] & (rt < T)[None, :])
    else:  # (the branches' variables must not share names: they differ in type)
        ra = (pid_n - num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_a = _gemv_lora_rows(a_ptr, x_ptr, seed, ra, T, K, R, k_begin, k_end, threshold,
                                HAS_DROPOUT, IS_FP64, ALLOW_TF32, MODE, BLOCK_T, BLOCK_K)
        tl.store(part_xa_ptr + (pid_k * T + rt)[None, :] * R + ra[:, None], acc_a,
                 mask=(ra < R)[:, None] & (rt < T)[None, :])


_GEMV_DOT_INTERP = {"BLOCK_N": 16, "BLOCK_K": 32, "MODE": 2, "BLOCK_T": 16}
# MODE 2: fp16 / bf16 (every T) and fp32 with TF32 (T >= 2); the FMA dot for fp32 "ieee"
# and fp64 (T >= 2); MODE 0 for fp32 / fp64 at T = 1.
nf4_lora_linear_gemv_kernel_dot = tuned(cfgs(_GEMV_DOT_INTERP, _GEMV_DOT), key=_GEMV_KEY)(
    nf4_lora_linear_gemv_kernel)
nf4_lora_linear_gemv_kernel_dot_fma = tuned(cfgs(_GEMV_DOT_INTERP, _GEMV_DOT_FMA),
                                            key=_GEMV_KEY)(nf4_lora_linear_gemv_kernel)
nf4_lora_linear_gemv_kernel_bcast = tuned(
    cfgs({"BLOCK_N": 16, "BLOCK_K": 32, "MODE": 0, "BLOCK_T": 1}, _GEMV_BCAST), key=_GEMV_KEY
)(nf4_lora_linear_gemv_kernel)


@tuned(_GEMV_EPI_CONFIGS, key=["N", "SPLIT", "BLOCK_R"])
@triton.jit
def nf4_lora_linear_gemv_epilogue_kernel(part_ptr, part_xa_ptr, bias_ptr, b_ptr, y_ptr, xa_ptr,
                                         T, N, R, SPLIT, scaling, keep_scale,
                                         HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                         BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                                         BLOCK_N: tl.constexpr):
    """y[:, n-block] = sum_c part[c] + s * xa @ B^T + bias; xa = sum_c part_xa[c] / (1 - p)
    (every program sums the small xa partials itself, BLOCK_R ranks at a time; program 0
    stores xa)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rt = tl.arange(0, BLOCK_T)
    t_ok = rt < T
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=part_ptr.dtype.element_ty)
    for s in range(SPLIT):  # fixed order: reproducible
        acc += tl.load(part_ptr + (s * T + rt).to(tl.int64)[:, None] * N + cols[None, :],
                       mask=t_ok[:, None] & col_ok[None, :], other=0.0)
    lora = tl.zeros((BLOCK_T, BLOCK_N), dtype=part_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        xacc = tl.zeros((BLOCK_T, BLOCK_R), dtype=part_ptr.dtype.element_ty)
        for s in range(SPLIT):
            xacc += tl.load(part_xa_ptr + (s * T + rt)[:, None] * R + rr[None, :],
                            mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        xa = (xacc * keep_scale).to(xa_ptr.dtype.element_ty)
        if pid == 0:
            tl.store(xa_ptr + rt[:, None] * R + rr[None, :], xa,
                     mask=t_ok[:, None] & r_ok[None, :])
        bt = tl.load(b_ptr + cols.to(tl.int64)[None, :] * R + rr[:, None],
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # B^T (BLOCK_R, BLOCK_N)
        lora = tl.dot(xa, bt, lora, out_dtype=lora.dtype,
                      input_precision="tf32" if ALLOW_TF32 else "ieee")
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :].to(acc.dtype)
    tl.store(y_ptr + rt[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------
# Backward (lora_linear's formulas with the NF4 W; see lora_linear_kernels.py):
#   dB  = s * dy^T @ xa,  dyB = dy @ B                                 torch.mm
#   dA  = s/(1-p) * dyB^T @ (keep * x)               lora_branch_backward_lora_a_kernel
#   dx  = dy @ W + s/(1-p) * keep * (dyB @ A)        nf4_lora_linear_backward_dx_kernel
# dx reduces over N; each W tile (BLOCK_K rows of W, BLOCK_N columns) is dequantised as in
# the forward (the same values: the reference's W) and transposed, dx^T = W^T @ dy^T, so that
# it is again the dot's register operand: as the right operand, a tile computed in
# registers fails to compile for sm_90 in TF32 (Triton 3.9), and the FMA dot of fp32 "ieee"
# spills 14 KiB per thread.
# ---------------------------------------------------------------------------------------


@triton.jit
def nf4_lora_linear_backward_dx_kernel(dy_ptr, q_ptr, absmax_ptr, table_ptr, dyb_ptr, a_ptr,
                                       dx_ptr, seed_ptr, T, N, K, R, T_BUCKET, threshold,
                                       lora_scale, HAS_DROPOUT: tl.constexpr,
                                       IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                       LOG2_BLOCKSIZE: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                                       MULTI_R: tl.constexpr, BLOCK_R: tl.constexpr,
                                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx^T tile (BLOCK_N columns of x, BLOCK_M rows) = lora_scale * keep^T * (A^T @ dyB^T)
    + W^T @ dy^T over N (BLOCK_K steps), lora_scale = s / (1 - p)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
    k0 = pid_n * BLOCK_N
    cols = k0 + tl.arange(0, BLOCK_N)  # columns of x, k0 % 4 == 0
    rows_in = rows % T
    cols_in = cols % K
    rn = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + rows_in.to(tl.int64)[None, :] * N + rn[:, None]  # dy^T tile (BK, BM)
    # The LoRA term first, A^T (BLOCK_N, R) @ dyB^T (R, BLOCK_M) scaled and masked: the main
    # accumulation starts from it (one (BLOCK_N, BLOCK_M) accumulator, not two).
    acc = rank_product(tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float64 if IS_FP64 else tl.float32),
                       a_ptr + cols_in[:, None], K, dyb_ptr + rows_in.to(tl.int64)[None, :] * R,
                       1, R, ALLOW_TF32, MULTI_R, BLOCK_R) * lora_scale
    if HAS_DROPOUT:
        keep = dropout_keep_mask(tl.load(seed_ptr), rows, cols, K, threshold)  # (BM, BN)
        acc = tl.where(tl.trans(keep), acc, 0.0)
    for n0 in range(0, N, BLOCK_K):
        # Rows of W past N wrap (in bounds, finite) and meet zeros of dy.
        even, odd = _nf4_halves(q_ptr, absmax_ptr, table_ptr, (n0 + rn) % N, k0, K,
                                dy_ptr.dtype.element_ty, LOG2_BLOCKSIZE, ROW_ALIGNED, BLOCK_N)
        dyt = tl.load(dy_ptrs, mask=(rn < N - n0)[:, None], other=0.0)
        acc = tl.dot(tl.trans(tl.interleave(even, odd)), dyt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        dy_ptrs += BLOCK_K
    tl.store(dx_ptr + rows.to(tl.int64)[None, :] * K + cols[:, None],
             acc.to(dx_ptr.dtype.element_ty), mask=(cols < K)[:, None] & (rows < T)[None, :])


nf4_lora_linear_backward_dx_kernel_half = tuned(_GEMM_CONFIGS, key=_GEMM_KEY)(
    nf4_lora_linear_backward_dx_kernel)
nf4_lora_linear_backward_dx_kernel_wide = tuned(_GEMM_CONFIGS_WIDE, key=_GEMM_KEY)(
    nf4_lora_linear_backward_dx_kernel)
