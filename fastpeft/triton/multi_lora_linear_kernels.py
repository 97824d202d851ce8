"""Jit kernels of ``multi_lora_linear``: the LoRA parts, run per adapter segment (SGMV).

Shapes (2-D, contiguous): x (T, K), lora_A (n, R, K), lora_B (n, N, R), scaling (n,) fp32,
xa (T, R), y (T, N), dy (T, N), dx (T, K), dA (n, R, K), dB (n, N, R). ``keep`` is the
seeded Philox mask of :mod:`._dropout` for the whole (T, K) input, regenerated with each
row's ORIGINAL index, never stored.

Rows are grouped by adapter in the launcher (a stable sort of the ids, no host sync):
``order`` (T,) int64 holds the row indices sorted by adapter, ``seg`` (n + 1,) int64 the
segment bounds: adapter i's rows are ``order[seg[i]:seg[i + 1]]`` (``order[:seg[0]]``:
the rows with id -1, which no kernel touches). Positions in that sorted order are "pos";
``rows = order[pos]`` are the rows of x / y / dx / xa they stand for. dyB lives in sorted
order (``dyb[pos]`` is the row ``order[pos]``), so the dA reduction reads it contiguously.

Row-tiled kernels (one program per BLOCK_M rows of one adapter, times column blocks):
  multi_lora_linear_shrink_kernel          xa[rows] = (keep * x[rows] / (1 - p)) @ A_i^T
  multi_lora_linear_expand_kernel          y[rows] += s_i * xa[rows] @ B_i^T      (in place)
  multi_lora_linear_backward_dyb_kernel    dyb[pos] = dy[rows] @ B_i
  multi_lora_linear_backward_dx_kernel     dx[rows] += s_i / (1 - p) * keep * (dyb[pos] @ A_i)
Their 1-D grid axis 0 enumerates the row tiles of all adapter segments back to back:
segment i has cdiv(count_i, BLOCK_M) tiles, and :func:`_segment_tile` maps a program to its
(adapter, first pos, segment end) by a prefix sum over those tile counts (computed in the
kernel, since BLOCK_M is the autotuner's choice). The launch has
min(cdiv(T, BLOCK_M) + n, T) programs, an upper bound on the tile count known without a
host sync; the few programs past the last tile exit at once. (A (n, cdiv(T, BLOCK_M)) grid
with early exit would start n times more programs, nearly all idle, when many adapters
share a batch.) Every row is written by one program: no atomics.

Per-adapter reductions (grid (n, column blocks), each program loops over its adapter's
segment; a segment with no rows stores zeros):
  multi_lora_linear_backward_lora_a_kernel dA[i] = s_i / (1 - p) * dyb_i^T @ (keep * x_i)
  multi_lora_linear_backward_lora_b_kernel dB[i] = s_i * dy_i^T @ xa_i
(keep / (1 - p) is replaced by 1 when p == 0.) R is one tile, zero-padded to BLOCK_R >= 16.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype.
"""

import triton
import triton.language as tl

from ._common import cfgs, tuned
from ._dropout import dropout_keep_mask


def _tiles(rows: str, cols: str, sizes: list[tuple[int, int, int, int]]) -> list:
    """``cfgs`` of tiles ``{rows: bm, cols: bn}`` (with num_warps, num_stages) on a GPU and
    the interpreter's 16 x 32; the same table serves kernels that name their axes
    differently."""
    return cfgs({rows: 16, cols: 32},
                [({rows: bm, cols: bn}, warps, stages) for bm, bn, warps, stages in sizes])


# Shrink (rows, K) @ (K, R) and dyB (rows, N) @ (N, R): memory-bound on the long operand,
# small row blocks for parallelism (the rank R is one tile). The first, small config is the
# one that fits an H100's shared memory at the largest tiles (fp64, R = 128).
_ROW_SIZES = [(16, 64, 4, 2), (16, 128, 4, 4), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
              (128, 64, 8, 3)]
_SHRINK_CONFIGS = _tiles("BLOCK_M", "BLOCK_K", _ROW_SIZES)
_DYB_CONFIGS = _tiles("BLOCK_M", "BLOCK_N", _ROW_SIZES)
# Expand / dx: one rank-R product per output tile, read-modify-write of the tile. The small
# first config is for the large ranks in fp32 "ieee" (FMA dots), where the others spill.
_EXPAND_CONFIGS = _tiles("BLOCK_M", "BLOCK_N", [
    (16, 64, 4, 2), (16, 128, 4, 2), (32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2),
    (128, 128, 8, 2)])
# dA / dB: one program per (adapter, column block), looping over the segment's rows (the
# first config, again, for the large ranks in fp32 "ieee").
_REDUCE_SIZES = [(32, 32, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3), (64, 64, 4, 4),
                 (128, 64, 4, 3), (64, 128, 8, 3)]
_DA_CONFIGS = _tiles("BLOCK_T", "BLOCK_K", _REDUCE_SIZES)
_DB_CONFIGS = _tiles("BLOCK_T", "BLOCK_N", _REDUCE_SIZES)


@triton.jit
def _segment_tile(pid, seg_ptr, n, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr):
    """(adapter, first pos, segment end) of row tile ``pid``, the tiles of segments 0 .. n-1
    numbered back to back (cdiv(seg[i + 1] - seg[i], BLOCK_M) tiles for adapter i);
    adapter -1 when ``pid`` is past the last tile. Scans the n segments BLOCK_A at a time."""
    zero = tl.load(seg_ptr) * 0  # an int64 scalar 0 (the loop-carried values are int64)
    found = tl.program_id(0) * 0  # 1 + the adapter, once found (int32)
    start = zero
    end = zero
    tiles_before = zero
    for a0 in range(0, n, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        a_ok = a < n
        lo = tl.load(seg_ptr + a, mask=a_ok, other=0)
        hi = tl.load(seg_ptr + a + 1, mask=a_ok, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        first = tl.cumsum(tiles, 0) - tiles + tiles_before  # first tile of each segment
        hit = (pid >= first) & (pid < first + tiles)  # at most one segment holds pid
        found += tl.sum(tl.where(hit, a + 1, 0), 0)
        start += tl.sum(tl.where(hit, lo + (pid - first) * BLOCK_M, 0), 0)
        end += tl.sum(tl.where(hit, hi, 0), 0)
        tiles_before += tl.sum(tiles, 0)
    return found - 1, start, end


@tuned(_SHRINK_CONFIGS, key=["T_BUCKET", "K", "BLOCK_R"])
@triton.jit
def multi_lora_linear_shrink_kernel(x_ptr, a_ptr, xa_ptr, order_ptr, seg_ptr, seed_ptr, T, K,
                                    R, n, T_BUCKET, threshold, keep_scale,
                                    HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
                                    ALLOW_TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                                    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_K: tl.constexpr):
    """xa[rows] = (keep * x[rows] / (1 - p)) @ A_i^T for one tile of adapter i's rows."""
    adapter, start, end = _segment_tile(tl.program_id(0), seg_ptr, n, BLOCK_M, BLOCK_A)
    if adapter < 0:
        return
    pos = start + tl.arange(0, BLOCK_M)
    valid = pos < end
    rows = tl.load(order_ptr + pos, mask=valid, other=0)  # past the segment: row 0, unused
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    x_row = x_ptr + rows[:, None] * K
    a_base = a_ptr + adapter.to(tl.int64) * R * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64 if IS_FP64 else tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        xt = tl.load(x_row + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(dropout_keep_mask(seed, rows, cols, K, threshold), xt, 0.0)
        # A_i^T tile (BLOCK_K, BLOCK_R) read straight from row-major A_i (R, K).
        at = tl.load(a_base + rr[None, :] * K + cols[:, None],
                     mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    if HAS_DROPOUT:
        acc = acc * keep_scale  # 1 / (1 - p), once per output instead of per x element
    tl.store(xa_ptr + rows[:, None] * R + rr[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=valid[:, None] & r_ok[None, :])


@tuned(_EXPAND_CONFIGS, key=["T_BUCKET", "N", "BLOCK_R"], restore_value=["y_ptr"])
@triton.jit
def multi_lora_linear_expand_kernel(xa_ptr, b_ptr, scaling_ptr, y_ptr, order_ptr, seg_ptr, T,
                                    N, R, n, T_BUCKET, IS_FP64: tl.constexpr,
                                    ALLOW_TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                                    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr):
    """y[rows, cols] += s_i * xa[rows] @ B_i[cols]^T for one tile of adapter i's rows and
    one block of BLOCK_N output columns (y holds the base GEMM already)."""
    adapter, start, end = _segment_tile(tl.program_id(0), seg_ptr, n, BLOCK_M, BLOCK_A)
    if adapter < 0:
        return
    pos = start + tl.arange(0, BLOCK_M)
    valid = pos < end
    rows = tl.load(order_ptr + pos, mask=valid, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    xa = tl.load(xa_ptr + rows[:, None] * R + rr[None, :], mask=valid[:, None] & r_ok[None, :],
                 other=0.0)
    # B_i^T tile (BLOCK_R, BLOCK_N) from row-major B_i (N, R).
    bt = tl.load(b_ptr + adapter.to(tl.int64) * N * R + cols[None, :].to(tl.int64) * R
                 + rr[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    lora = tl.dot(xa, bt, out_dtype=tl.float64 if IS_FP64 else tl.float32,
                  input_precision="tf32" if ALLOW_TF32 else "ieee")
    lora = lora * tl.load(scaling_ptr + adapter)
    y_ptrs = y_ptr + rows[:, None] * N + cols[None, :]
    out_ok = valid[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=out_ok, other=0.0)
    tl.store(y_ptrs, (y.to(lora.dtype) + lora).to(y_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------
# Backward: lora_linear's formulas (see lora_linear_kernels) applied per adapter segment.
# For the rows t of adapter i, with u = keep * x / (1 - p), xa = u @ A_i^T and
# y = x @ W^T + bias + s_i * xa @ B_i^T:
#   dyB[t] = dy[t] @ B_i                                     multi_lora_linear_backward_dyb
#   dB_i   = s_i * sum_t dy[t]^T xa[t]                        ..._backward_lora_b
#   dA_i   = s_i / (1 - p) * sum_t dyB[t]^T (keep * x)[t]     ..._backward_lora_a
#   dx[t]  = dy[t] @ W  (torch.mm, in the launcher)
#          + s_i / (1 - p) * keep[t] * (dyB[t] @ A_i)          ..._backward_dx (in place)
# ---------------------------------------------------------------------------------------


@tuned(_DYB_CONFIGS, key=["T_BUCKET", "N", "BLOCK_R"])
@triton.jit
def multi_lora_linear_backward_dyb_kernel(dy_ptr, b_ptr, dyb_ptr, order_ptr, seg_ptr, T, N, R,
                                          n, T_BUCKET, IS_FP64: tl.constexpr,
                                          ALLOW_TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                                          BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
                                          BLOCK_N: tl.constexpr):
    """dyb[pos] = dy[rows] @ B_i for one tile of adapter i's rows (stored in sorted order)."""
    adapter, start, end = _segment_tile(tl.program_id(0), seg_ptr, n, BLOCK_M, BLOCK_A)
    if adapter < 0:
        return
    pos = start + tl.arange(0, BLOCK_M)
    valid = pos < end
    rows = tl.load(order_ptr + pos, mask=valid, other=0)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dy_row = dy_ptr + rows[:, None] * N
    b_base = b_ptr + adapter.to(tl.int64) * N * R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64 if IS_FP64 else tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cn = n0 + tl.arange(0, BLOCK_N)
        n_ok = cn < N
        dyt = tl.load(dy_row + cn[None, :], mask=valid[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b_base + cn[:, None].to(tl.int64) * R + rr[None, :],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # B_i tile (BN, BR)
        acc = tl.dot(dyt, bt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    tl.store(dyb_ptr + pos[:, None] * R + rr[None, :], acc.to(dyb_ptr.dtype.element_ty),
             mask=valid[:, None] & r_ok[None, :])


@tuned(_EXPAND_CONFIGS, key=["T_BUCKET", "K", "BLOCK_R"], restore_value=["dx_ptr"])
@triton.jit
def multi_lora_linear_backward_dx_kernel(dyb_ptr, a_ptr, scaling_ptr, dx_ptr, order_ptr,
                                         seg_ptr, seed_ptr, T, K, R, n, T_BUCKET, threshold,
                                         keep_scale, HAS_DROPOUT: tl.constexpr,
                                         IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                         BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr,
                                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx[rows, cols] += s_i / (1 - p) * keep * (dyb[pos] @ A_i[:, cols]) for one tile of
    adapter i's rows and one block of BLOCK_N columns of x (dx holds dy @ W already)."""
    adapter, start, end = _segment_tile(tl.program_id(0), seg_ptr, n, BLOCK_M, BLOCK_A)
    if adapter < 0:
        return
    pos = start + tl.arange(0, BLOCK_M)
    valid = pos < end
    rows = tl.load(order_ptr + pos, mask=valid, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # start % 4 == 0
    col_ok = cols < K
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dyb = tl.load(dyb_ptr + pos[:, None] * R + rr[None, :], mask=valid[:, None] & r_ok[None, :],
                  other=0.0)
    at = tl.load(a_ptr + adapter.to(tl.int64) * R * K + rr[:, None] * K + cols[None, :],
                 mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    lora = tl.dot(dyb, at, out_dtype=tl.float64 if IS_FP64 else tl.float32,
                  input_precision="tf32" if ALLOW_TF32 else "ieee")
    # (the fp32 scaling widened first: fp64 inputs keep fp64 precision)
    lora = lora * (tl.load(scaling_ptr + adapter).to(lora.dtype) * keep_scale)
    if HAS_DROPOUT:
        lora = tl.where(dropout_keep_mask(tl.load(seed_ptr), rows, cols, K, threshold), lora,
                        0.0)
    dx_ptrs = dx_ptr + rows[:, None] * K + cols[None, :]
    out_ok = valid[:, None] & col_ok[None, :]
    dx = tl.load(dx_ptrs, mask=out_ok, other=0.0)
    tl.store(dx_ptrs, (dx.to(lora.dtype) + lora).to(dx_ptr.dtype.element_ty), mask=out_ok)


@tuned(_DA_CONFIGS, key=["T_BUCKET", "K", "BLOCK_R"])
@triton.jit
def multi_lora_linear_backward_lora_a_kernel(dyb_ptr, x_ptr, scaling_ptr, da_ptr, order_ptr,
                                             seg_ptr, seed_ptr, T, K, R, T_BUCKET, threshold,
                                             keep_scale, HAS_DROPOUT: tl.constexpr,
                                             IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
                                             BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                                             BLOCK_K: tl.constexpr):
    """dA[i][:, cols] = s_i / (1 - p) * dyb_i^T @ (keep * x_i[:, cols]) for adapter
    i = program_id(0) and one block of BLOCK_K columns, looping over the segment's rows."""
    adapter = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lo = tl.load(seg_ptr + adapter)
    hi = tl.load(seg_ptr + adapter + 1)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float64 if IS_FP64 else tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for p0 in range(lo, hi, BLOCK_T):
        pos = p0 + tl.arange(0, BLOCK_T)
        valid = pos < hi
        rows = tl.load(order_ptr + pos, mask=valid, other=0)
        # dyB^T tile (BLOCK_R, BLOCK_T) from dyb (T, R), contiguous rows in sorted order.
        dybt = tl.load(dyb_ptr + pos[None, :] * R + rr[:, None],
                       mask=r_ok[:, None] & valid[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * K + cols[None, :],
                     mask=valid[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(dropout_keep_mask(seed, rows, cols, K, threshold), xt, 0.0)
        acc = tl.dot(dybt, xt, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    # an adapter no row uses gets zeros, whatever its scaling (0 * inf would be NaN)
    acc = acc * tl.where(hi > lo, tl.load(scaling_ptr + adapter).to(acc.dtype) * keep_scale, 0.0)
    tl.store(da_ptr + adapter.to(tl.int64) * R * K + rr[:, None] * K + cols[None, :],
             acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & col_ok[None, :])


@tuned(_DB_CONFIGS, key=["T_BUCKET", "N", "BLOCK_R"])
@triton.jit
def multi_lora_linear_backward_lora_b_kernel(dy_ptr, xa_ptr, scaling_ptr, db_ptr, order_ptr,
                                             seg_ptr, T, N, R, T_BUCKET, IS_FP64: tl.constexpr,
                                             ALLOW_TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """dB[i][cols] = s_i * dy_i[:, cols]^T @ xa_i for adapter i = program_id(0) and one
    block of BLOCK_N output columns, looping over the segment's rows."""
    adapter = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lo = tl.load(seg_ptr + adapter)
    hi = tl.load(seg_ptr + adapter + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float64 if IS_FP64 else tl.float32)
    for p0 in range(lo, hi, BLOCK_T):
        pos = p0 + tl.arange(0, BLOCK_T)
        valid = pos < hi
        rows = tl.load(order_ptr + pos, mask=valid, other=0)
        dyt = tl.load(dy_ptr + rows[None, :] * N + cols[:, None],
                      mask=col_ok[:, None] & valid[None, :], other=0.0)  # dy^T (BN, BT)
        xat = tl.load(xa_ptr + rows[:, None] * R + rr[None, :],
                      mask=valid[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dyt, xat, acc, out_dtype=acc.dtype,
                     input_precision="tf32" if ALLOW_TF32 else "ieee")
    acc = acc * tl.where(hi > lo, tl.load(scaling_ptr + adapter), 0.0)  # (as for dA)
    tl.store(db_ptr + adapter.to(tl.int64) * N * R + cols[:, None].to(tl.int64) * R
             + rr[None, :], acc.to(db_ptr.dtype.element_ty),
             mask=col_ok[:, None] & r_ok[None, :])
