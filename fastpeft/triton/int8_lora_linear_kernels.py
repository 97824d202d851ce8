"""Jit kernels of ``int8_lora_linear``: ``lora_linear`` over a weight-only int8 base
``W = Q * sc[:, None]`` that is never built (the kernels read Q, one byte per weight, and
dequantise tile by tile). The LoRA branch's own kernels are in :mod:`._common_kernels`.

Shapes (2-D, contiguous): x (T, K), qweight Q (N, K) int8, weight_scale sc (N,) fp32,
bias (N,), lora_A (R, K), lora_B (N, R), xa (T, R), dyB = dy @ B (T, R); ``keep`` is the
seeded Philox mask of :mod:`._dropout`.

  int8_lora_linear_forward_kernel         y = sc * (x @ Q^T) + s * xa @ B^T + bias   (T > 16)
  int8_lora_linear_gemv_kernel            split-K partials, chunk k of K (T <= 16):
      part[k] = Q[:, chunk] @ x[:, chunk]^T,  part_xa[k] = A[:, chunk] @ (keep * x[:, chunk])^T
  int8_lora_linear_gemv_epilogue_kernel   y = sc * sum_k part[k] + s * xa @ B^T + bias,
                                          xa = sum_k part_xa[k] / (1 - p)
  int8_lora_linear_backward_dx_kernel     dx = dy @ W + s/(1-p) * keep * (dyB @ A)

Tiled forward (T > 16): the scale of output column n factors out of the K reduction, so the
mainloop is an int8 -> x.dtype conversion (exact: |q| <= 128 fits fp16/bf16/tf32; see
_convert) and a tl.dot; sc, the LoRA term (a tl.dot over R, in rank blocks for large R) and
bias are the epilogue. The tile is computed transposed, y^T = Q @ x^T, so that the converted
int8 tile is the dot's left operand, which Hopper's wgmma reads from registers
(global -> shared (cp.async) -> registers -> convert -> wgmma: no shared-memory round trip
for the converted tile), and the token count is the MMA's N side (token tiles of 32 .. 128).

Split-K GEMV (1 <= T <= 16, decode; memory-bound: the goal is to stream Q once at full
bandwidth): program (n, k) of grid (cdiv(N, BLOCK_N) + cdiv(R, BLOCK_N), SPLIT) reduces the
int8 tile Q[n-block, k-chunk] against all T rows of x[:, k-chunk] into an fp32 partial
part[k, :, n-block] (plain stores, each element written once). The last cdiv(R, BLOCK_N)
columns of programs do the LoRA down-projection of the same chunk into part_xa[k]: in
parallel with the weight stream, where lora_branch_down_kernel would be a one-program launch
reading all of A before it. The budget is the ALU work per weight: H100 streams ~0.07
clock-cycles' worth of bytes per weight per SM, i.e. ~9 SASS instructions per weight per
thread at full issue rate (counts below are from sm_90 compiles of the loop bodies):
  MODE 2  tl.dot of the converted tile with x^T padded to 16 columns (rows past T repeat
          row t % T; not stored): the multiply runs on otherwise idle tensor cores.
          fp16 / bf16 ~3.5 instructions per weight whatever T is (mma.sync tiles of 16
          weight rows per warp), fp32 with TF32 ~5.5.
  MODE 0  T = 1, broadcast multiply into a (BLOCK_N, BLOCK_K) fp32 accumulator, one tl.sum
          after the K loop: an int8 conversion and an FMA per weight (plus an x conversion
          for 16-bit x), ~4.8 (fp32) / ~5.2 (fp16, bf16).
  MODE 1  2 <= T <= 4 without tensor cores (fp32 "ieee", fp64): one tl.sum per row per
          step, ~7.6 at T = 2, ~12 at T = 4; beyond, MODE 2's FMA dot (~24, flat in T) is
          cheaper.
The epilogue reduces the partials in a fixed order rather than with fp32 atomics: bitwise
reproducible, nothing to zero first (atomics need a memset launch), no 64-bit atomics for
fp64, autotuning may rerun the kernel freely, and an epilogue launch is needed anyway
(scale, bias and the LoRA term need the complete sum).

Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import triton
import triton.language as tl

from ._common import GEMM_INTERPRETED, cfgs, mnk, tuned
from ._common_kernels import grouped_tile
from ._dropout import dropout_keep_mask

# Tiled GEMMs (forward y^T tiles (BLOCK_N weight rows, BLOCK_M tokens); backward dx^T
# tiles (BLOCK_N columns of x, BLOCK_M tokens)). BLOCK_N is the wgmma M side (64 per
# warpgroup), BLOCK_M its N side: 32-64 token tiles serve the small-T (17 .. 128) range.
# fp16/bf16:
_GEMM_CONFIGS = cfgs(
    GEMM_INTERPRETED,
    [
        (mnk(128, 128, 64), 8, 4),
        (mnk(128, 128, 128), 8, 3),
        (mnk(64, 128, 64), 4, 4),
        (mnk(128, 64, 64), 4, 4),
        (mnk(64, 128, 128), 8, 3),
        (mnk(32, 128, 128), 4, 4),
    ],
)
# fp32 (TF32 wgmma with the converted tile in registers: twice the registers of bf16; or
# the FMA dot of "ieee" precision) and fp64: BLOCK_K 32, or the tiles spill.
_GEMM_CONFIGS_WIDE = cfgs(
    GEMM_INTERPRETED,
    [
        (mnk(128, 128, 32), 8, 3),
        (mnk(64, 128, 32), 4, 4),
        (mnk(128, 64, 32), 4, 4),
        (mnk(64, 64, 32), 4, 4),
        (mnk(32, 128, 32), 4, 4),
    ],
)
_GEMM_KEY = ["T_BUCKET", "N", "K", "BLOCK_R", "MULTI_R"]
# Split-K GEMV: (BLOCK_N weight rows, BLOCK_K) int8 tiles.
# Broadcast modes (MODE 0: T = 1; MODE 1: per-row sums): the T = 1 accumulator is
# BLOCK_N * BLOCK_K / (32 * num_warps) fp32 registers per thread (32 or 64 here).
_GEMV_BCAST = [
    ({"BLOCK_N": 16, "BLOCK_K": 256}, 4, 3),
    ({"BLOCK_N": 32, "BLOCK_K": 128}, 4, 3),
    ({"BLOCK_N": 32, "BLOCK_K": 256}, 8, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 128}, 8, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 256}, 8, 3),
]
# tl.dot mode (MODE 2, x^T padded to 16 columns): BLOCK_N = 16 rows per warp, so that
# mma.sync's warps split the weight rows and none converts a replicated copy of the tile
# (with 16 columns, more warps than row tiles would split the columns instead); one
# wgmma config (64 rows, 4 warps). fp16 / bf16:
_GEMV_DOT = [
    ({"BLOCK_N": 32, "BLOCK_K": 256, "MODE": 2, "BLOCK_T": 16}, 2, 3),
    ({"BLOCK_N": 32, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 2, 4),
    ({"BLOCK_N": 16, "BLOCK_K": 256, "MODE": 2, "BLOCK_T": 16}, 1, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 4, 4),
]
# fp32 with TF32 (twice the registers per converted element):
_GEMV_DOT_TF32 = [
    ({"BLOCK_N": 32, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 2, 3),
    ({"BLOCK_N": 32, "BLOCK_K": 64, "MODE": 2, "BLOCK_T": 16}, 2, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 128, "MODE": 2, "BLOCK_T": 16}, 4, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 64, "MODE": 2, "BLOCK_T": 16}, 4, 3),
]
# fp32 "ieee" and fp64: Triton's FMA dot holds both operands in registers: short BLOCK_K.
_GEMV_DOT_FMA = [
    ({"BLOCK_N": 32, "BLOCK_K": 32, "MODE": 2, "BLOCK_T": 16}, 2, 3),
    ({"BLOCK_N": 64, "BLOCK_K": 32, "MODE": 2, "BLOCK_T": 16}, 4, 3),
    ({"BLOCK_N": 32, "BLOCK_K": 64, "MODE": 2, "BLOCK_T": 16}, 4, 3),
]
_GEMV_KEY = ["N", "K", "K_CHUNK"]
_GEMV_EPI_CONFIGS = cfgs(
    {"BLOCK_N": 16},
    [({"BLOCK_N": 64}, 4, 1), ({"BLOCK_N": 128}, 4, 1), ({"BLOCK_N": 256}, 8, 1)],
)


@triton.jit
def _convert(w, dtype: tl.constexpr):
    """``w.to(dtype)`` (exact for int8 ``w``: |q| <= 128 fits every float dtype). int8 ->
    fp32 and int8 -> fp16 avoid the quarter-rate I2F conversions that Triton emits for
    them: with b = q + 128 = (q as a byte) ^ 0x80, the fp32 bits 0x4B000000 | b are
    2**23 + b and the fp16 bits 0x6400 | b are 1024 + b, so one integer op and one
    exact subtraction per element give q. (int8 -> bf16 keeps Triton's own conversion.)"""
    if w.dtype == tl.int8 and dtype == tl.float32:
        u = w.to(tl.uint8, bitcast=True).to(tl.uint32)
        out = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    elif w.dtype == tl.int8 and dtype == tl.float16:
        u = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16)
        out = (u | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    else:
        out = w.to(dtype)
    return out


@triton.jit
def _rank_product(acc, l_ptrs, l_r_stride, rt_ptrs, R, ALLOW_TF32: tl.constexpr,
                  MULTI_R: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + L @ Rt over the rank dimension R (the LoRA terms of the GEMM epilogues): L
    element (i, r) at ``l_ptrs[i] + r * l_r_stride``, Rt element (r, j) at ``rt_ptrs[j] + r``
    (a row-major (X, R) matrix read transposed); ``l_ptrs`` is (BI, 1), ``rt_ptrs`` (1, BJ).
    One step with BLOCK_R >= R, or BLOCK_R ranks at a time when MULTI_R."""
    rr = tl.arange(0, BLOCK_R)
    if MULTI_R:
        # Not pipelined: staged rank tiles would only cost shared memory and registers.
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            r_ok = rr < R - r0
            lt = tl.load(l_ptrs + (r0 + rr)[None, :] * l_r_stride, mask=r_ok[None, :], other=0.0)
            rt = tl.load(rt_ptrs + (r0 + rr)[:, None], mask=r_ok[:, None], other=0.0)
            acc = tl.dot(lt, rt, acc, out_dtype=acc.dtype,
                         input_precision="tf32" if ALLOW_TF32 else "ieee")
    else:
        r_ok = rr < R
        lt = tl.load(l_ptrs + rr[None, :] * l_r_stride, mask=r_ok[None, :], other=0.0)
        rt = tl.load(rt_ptrs + rr[:, None], mask=r_ok[:, None], other=0.0)
        acc = tl.dot(lt, rt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    return acc


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def int8_lora_linear_forward_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, T, N,
                                    K, R, T_BUCKET, scaling, HAS_BIAS: tl.constexpr,
                                    IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                    MULTI_R: tl.constexpr, BLOCK_R: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y^T tile (BLOCK_N columns of y, BLOCK_M rows) = sc * (Q @ x^T) + s * B @ xa^T + bias."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features (rows of Q)
    # Wrapped indices keep the mainloop loads in bounds without row/column masks; the
    # duplicated rows/columns are discarded by the masked store.
    rows_in = rows % T
    cols_in = cols % N
    rk = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + cols_in.to(tl.int64)[:, None] * K + rk[None, :]  # Q tile (BN, BK)
    x_ptrs = x_ptr + rows_in.to(tl.int64)[None, :] * K + rk[:, None]  # x^T tile (BK, BM)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float64 if IS_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        qt = tl.load(q_ptrs, mask=k_ok[None, :], other=0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(_convert(qt, xt.dtype), xt, acc,
                     out_dtype=acc.dtype, input_precision="tf32" if ALLOW_TF32 else "ieee")
        q_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc *= tl.load(scale_ptr + cols_in).to(acc.dtype)[:, None]
    # LoRA epilogue: B (BLOCK_N, R) @ xa^T (R, BLOCK_M), R zero-padded to BLOCK_R >= 16.
    b_ptrs = b_ptr + cols_in.to(tl.int64)[:, None] * R
    xa_ptrs = xa_ptr + rows_in.to(tl.int64)[None, :] * R
    if MULTI_R:
        # Many ranks, BLOCK_R at a time, accumulated in place (a second (BLOCK_N, BLOCK_M)
        # accumulator spills): acc + s * B @ xa^T = s * (acc / s + B @ xa^T).
        if scaling != 0.0:
            acc = _rank_product(acc * (1.0 / scaling), b_ptrs, 1, xa_ptrs, R, ALLOW_TF32,
                                MULTI_R, BLOCK_R) * scaling
    else:
        acc += scaling * _rank_product(tl.zeros_like(acc), b_ptrs, 1, xa_ptrs, R, ALLOW_TF32,
                                       MULTI_R, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in)[:, None].to(acc.dtype)
    tl.store(y_ptr + rows.to(tl.int64)[None, :] * N + cols[:, None],
             acc.to(y_ptr.dtype.element_ty), mask=(cols < N)[:, None] & (rows < T)[None, :])


# Autotuned: fp16 / bf16 (_half), fp32 / fp64 (_wide).
int8_lora_linear_forward_kernel_half = tuned(_GEMM_CONFIGS, key=_GEMM_KEY)(
    int8_lora_linear_forward_kernel)
int8_lora_linear_forward_kernel_wide = tuned(_GEMM_CONFIGS_WIDE, key=_GEMM_KEY)(
    int8_lora_linear_forward_kernel)


@triton.jit
def _gemv_step(acc, acc2, w_rows, x_ptr, seed, T, K, ks, k_end, threshold,
               MASKED: tl.constexpr, DROPOUT: tl.constexpr, ALLOW_TF32: tl.constexpr,
               MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """One BLOCK_K step of :func:`_gemv_rows` (columns ``ks``; bounds-checked if MASKED)."""
    BW: tl.constexpr = w_rows.shape[0]
    rt = tl.arange(0, BLOCK_T)
    k_ok = ks < k_end
    if MASKED:
        w = tl.load(w_rows + ks[None, :], mask=k_ok[None, :], other=0)
    else:
        w = tl.load(w_rows + ks[None, :])
    if MODE == 2:
        # Rows past T read row t % T (in bounds, no mask); their results are not stored.
        x_ptrs = x_ptr + (rt % T).to(tl.int64)[:, None] * K + ks[None, :]
        if MASKED:
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            xt = tl.load(x_ptrs)
        if DROPOUT:
            xt = tl.where(dropout_keep_mask(seed, rt, ks, K, threshold), xt, 0.0)
        acc = tl.dot(_convert(w, xt.dtype), tl.trans(xt), acc,
                     out_dtype=acc.dtype, input_precision="tf32" if ALLOW_TF32 else "ieee")
    else:
        # A row of x is loaded as a (BW, BLOCK_K) broadcast (stride 0 over the rows; the
        # repeats hit L1) so that it gets the int8 tile's register layout: a (1, BLOCK_K)
        # load makes Triton convert the whole product tile through shared memory each step.
        bcast = tl.zeros((BW, 1), dtype=tl.int32)
        wf = _convert(w, acc.dtype)
        for t in tl.static_range(BLOCK_T):
            x_ptrs = x_ptr + (t % T) * K + bcast + ks[None, :]
            if MASKED:
                xr = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            else:
                xr = tl.load(x_ptrs)
            if DROPOUT:
                row = tl.full((1,), t, tl.int32)
                xr = tl.where(dropout_keep_mask(seed, row, ks, K, threshold), xr, 0.0)
            if MODE == 0:  # T = 1: elementwise, reduced once after the K loop
                acc2 += wf * xr.to(acc.dtype)
            else:
                part = tl.sum(wf * xr.to(acc.dtype), axis=1)  # (BW,)
                acc += tl.where(rt[None, :] == t, part[:, None], 0.0)
    return acc, acc2


@triton.jit
def _gemv_rows(w_rows, x_ptr, seed, T, K, k_begin, k_end, threshold, DROPOUT: tl.constexpr,
               IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr, MODE: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BW, BLOCK_T) = W[rows, k_begin:k_end] @ x[t % T, k_begin:k_end]^T for a (BW, 1)
    tensor of row pointers ``w_rows`` (int8 weight rows or lora_A rows), x optionally
    masked by the dropout keep-mask (not scaled). MODE 0: T = 1, elementwise (BW, BLOCK_K)
    accumulator; MODE 1: one tl.sum per row of x; MODE 2: tl.dot (BLOCK_T = 16). Full
    BLOCK_K steps run unmasked; a masked step takes the remainder."""
    acc_ty: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    BW: tl.constexpr = w_rows.shape[0]
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BW, BLOCK_T), dtype=acc_ty)
    acc2 = tl.zeros((BW, BLOCK_K) if MODE == 0 else (1, 1), dtype=acc_ty)
    k_full = k_begin + (k_end - k_begin) // BLOCK_K * BLOCK_K
    for k0 in range(k_begin, k_full, BLOCK_K):  # k0 % 4 == 0 (chunks: multiples of BLOCK_K)
        acc, acc2 = _gemv_step(acc, acc2, w_rows, x_ptr, seed, T, K, k0 + rk, k_end,
                               threshold, False, DROPOUT, ALLOW_TF32, MODE, BLOCK_T)
    if k_full < k_end:
        acc, acc2 = _gemv_step(acc, acc2, w_rows, x_ptr, seed, T, K, k_full + rk, k_end,
                               threshold, True, DROPOUT, ALLOW_TF32, MODE, BLOCK_T)
    if MODE == 0:
        acc += tl.sum(acc2, axis=1)[:, None]
    return acc


@triton.jit
def int8_lora_linear_gemv_kernel(x_ptr, q_ptr, a_ptr, seed_ptr, part_ptr, part_xa_ptr, T, N, K, R,
                                 K_CHUNK, threshold, HAS_DROPOUT: tl.constexpr,
                                 IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                 MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """part[pid_k, :T, n-block] = Q[n-block, chunk] @ x[:, chunk]^T (fp32, unscaled); the
    last cdiv(R, BLOCK_N) columns of programs take BLOCK_N rows of lora_A instead:
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
        q_rows = q_ptr + (cols % N).to(tl.int64)[:, None] * K
        acc_q = _gemv_rows(q_rows, x_ptr, seed, T, K, k_begin, k_end, threshold, False,
                           IS_FP64, ALLOW_TF32, MODE, BLOCK_T, BLOCK_K)
        tl.store(part_ptr + (pid_k * T + rt).to(tl.int64)[None, :] * N + cols[:, None], acc_q,
                 mask=(cols < N)[:, None] & (rt < T)[None, :])
    else:  # (the branches' variables must not share names: they differ in type)
        ra = (pid_n - num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        a_rows = a_ptr + (ra % R).to(tl.int64)[:, None] * K
        acc_a = _gemv_rows(a_rows, x_ptr, seed, T, K, k_begin, k_end, threshold, HAS_DROPOUT,
                           IS_FP64, ALLOW_TF32, MODE, BLOCK_T, BLOCK_K)
        tl.store(part_xa_ptr + (pid_k * T + rt)[None, :] * R + ra[:, None], acc_a,
                 mask=(ra < R)[:, None] & (rt < T)[None, :])


_GEMV_DOT_INTERP = {"BLOCK_N": 16, "BLOCK_K": 32, "MODE": 2, "BLOCK_T": 16}
# Broadcast modes, MODE and BLOCK_T from the launcher (fp32 / fp64 with T <= 4).
int8_lora_linear_gemv_kernel_bcast = tuned(
    cfgs({"BLOCK_N": 16, "BLOCK_K": 32}, _GEMV_BCAST), key=[*_GEMV_KEY, "MODE", "BLOCK_T"]
)(int8_lora_linear_gemv_kernel)
# tl.dot: fp16 / bf16 for 2 <= T <= 16; fp32 with TF32 for T >= 2; fp32 "ieee" and fp64
# for T >= 5.
int8_lora_linear_gemv_kernel_dot = tuned(cfgs(_GEMV_DOT_INTERP, _GEMV_DOT), key=_GEMV_KEY)(
    int8_lora_linear_gemv_kernel)
int8_lora_linear_gemv_kernel_dot_tf32 = tuned(cfgs(_GEMV_DOT_INTERP, _GEMV_DOT_TF32),
                                              key=_GEMV_KEY)(int8_lora_linear_gemv_kernel)
int8_lora_linear_gemv_kernel_dot_fma = tuned(cfgs(_GEMV_DOT_INTERP, _GEMV_DOT_FMA),
                                             key=_GEMV_KEY)(int8_lora_linear_gemv_kernel)
# fp16 / bf16 at T = 1: the tuner picks the 16-column dot (the multiply rides on idle
# tensor cores: ~3.5 SASS instructions per weight for bf16 on sm_90) or the broadcast
# multiply (an int8 and an x conversion plus an fp32 FMA per weight: ~5.2).
int8_lora_linear_gemv_kernel_t1 = tuned(
    cfgs(_GEMV_DOT_INTERP,
         _GEMV_DOT + [({**m, "MODE": 0, "BLOCK_T": 1}, w, st) for m, w, st in _GEMV_BCAST[1:4]]),
    key=_GEMV_KEY,
)(int8_lora_linear_gemv_kernel)


@tuned(_GEMV_EPI_CONFIGS, key=["N", "SPLIT", "BLOCK_R"])
@triton.jit
def int8_lora_linear_gemv_epilogue_kernel(part_ptr, part_xa_ptr, scale_ptr, bias_ptr, b_ptr, y_ptr,
                                          xa_ptr, T, N, R, SPLIT, scaling, keep_scale,
                                          HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                          BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                                          BLOCK_N: tl.constexpr):
    """y[:, n-block] = sc * sum_k part[k] + s * xa @ B^T + bias; xa = sum_k part_xa[k] / (1-p)
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
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
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
# Backward (lora_linear's formulas with W = Q * sc[:, None]; see lora_linear_kernels.py):
#   dB  = s * dy^T @ xa,  dyB = dy @ B                                 torch.mm
#   dA  = s/(1-p) * dyB^T @ (keep * x)               lora_branch_backward_lora_a_kernel
#   dx  = dy @ W + s/(1-p) * keep * (dyB @ A)        int8_lora_linear_backward_dx_kernel
# dx reduces over N, the index the scale depends on, so sc cannot be factored out: each
# Q tile is dequantised as the reference does it (fp32 q * sc, then cast to the dot
# dtype), computed transposed (dx^T = W^T @ dy^T) so the dequantised tile is again the
# register operand of the MMA.
# ---------------------------------------------------------------------------------------


@triton.jit
def int8_lora_linear_backward_dx_kernel(dy_ptr, q_ptr, scale_ptr, dyb_ptr, a_ptr, dx_ptr, seed_ptr,
                                        T, N, K, R, T_BUCKET, threshold, lora_scale,
                                        HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
                                        ALLOW_TF32: tl.constexpr, MULTI_R: tl.constexpr,
                                        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                        GROUP_M: tl.constexpr):
    """dx^T tile (BLOCK_N columns of x, BLOCK_M rows) = lora_scale * keep^T * (A^T @ dyB^T)
    + W^T @ dy^T over N (BLOCK_K steps), lora_scale = s / (1 - p)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of x, start % 4 == 0
    rows_in = rows % T
    cols_in = cols % K
    rn = tl.arange(0, BLOCK_K)
    dot_ty = tl.float64 if IS_FP64 else dy_ptr.dtype.element_ty
    work_ty = tl.float64 if IS_FP64 else tl.float32
    q_ptrs = q_ptr + rn.to(tl.int64)[None, :] * K + cols_in[:, None]  # Q^T tile (BN, BK)
    dy_ptrs = dy_ptr + rows_in.to(tl.int64)[None, :] * N + rn[:, None]  # dy^T tile (BK, BM)
    # The LoRA term first, A^T (BLOCK_N, R) @ dyB^T (R, BLOCK_M) scaled and masked: the
    # main accumulation starts from it (one (BLOCK_N, BLOCK_M) accumulator, not two).
    acc = _rank_product(tl.zeros((BLOCK_N, BLOCK_M), dtype=work_ty), a_ptr + cols_in[:, None],
                        K, dyb_ptr + rows_in.to(tl.int64)[None, :] * R, R, ALLOW_TF32,
                        MULTI_R, BLOCK_R) * lora_scale
    if HAS_DROPOUT:
        keep = dropout_keep_mask(tl.load(seed_ptr), rows, cols, K, threshold)  # (BM, BN)
        acc = tl.where(tl.trans(keep), acc, 0.0)
    for n0 in range(0, N, BLOCK_K):
        n_ok = rn < N - n0
        qt = tl.load(q_ptrs, mask=n_ok[None, :], other=0)
        sc = tl.load(scale_ptr + n0 + rn, mask=n_ok, other=0.0)
        wt = (_convert(qt, work_ty) * sc.to(work_ty)[None, :]).to(dot_ty)
        dyt = tl.load(dy_ptrs, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(wt, dyt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
        q_ptrs += BLOCK_K * K
        dy_ptrs += BLOCK_K
    tl.store(dx_ptr + rows.to(tl.int64)[None, :] * K + cols[:, None],
             acc.to(dx_ptr.dtype.element_ty), mask=(cols < K)[:, None] & (rows < T)[None, :])


int8_lora_linear_backward_dx_kernel_half = tuned(_GEMM_CONFIGS, key=_GEMM_KEY)(
    int8_lora_linear_backward_dx_kernel)
int8_lora_linear_backward_dx_kernel_wide = tuned(_GEMM_CONFIGS_WIDE, key=_GEMM_KEY)(
    int8_lora_linear_backward_dx_kernel)


# ---------------------------------------------------------------------------------------
