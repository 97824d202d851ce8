// The rank-R kernels of the LoRA branch on CPU (lora_branch.h: its math; lora_branch.cpp:
// the orchestration that runs these), shared by lora_linear and int8_lora_linear.
//
// The forward and the two backward passes are register-blocked micro-kernels, and the
// branch of a few rows (lora_down_kernel, lora_up_kernel) dot products along the weights'
// rows; all on 32-byte vectors (simd.h) with fp32 accumulation (fp64 for double),
// multi-versioned for AVX2/FMA, called on disjoint work ranges from at::parallel_for.
// Shapes: x (T, K), A (R, K), B (N, R), dy (T, N).
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/philox.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::lora_branch {

// dst[0 : n] = src[0 : n] in acc_t, times keep if kDropout; dst[n : n_pad] = 0. keep holds
// c = 1/(1-p) for kept elements (float kernels) or 1 (double kernels, which multiply by
// the double c here so that the scale is not rounded to float).
template <typename scalar_t, typename acc_t, bool kDropout>
FASTPEFT_INLINE void load_dropped(const scalar_t* __restrict src, int64_t n, int64_t n_pad,
                                  const float* __restrict keep, acc_t keep_scale,
                                  acc_t* __restrict dst) {
  if constexpr (!kDropout) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = to_acc(src[k]);
  } else if constexpr (std::is_same_v<acc_t, float>) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = to_acc(src[k]) * keep[k];
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = to_acc(src[k]) * (keep[k] * keep_scale);
  }
  for (int64_t k = n; k < n_pad; ++k) dst[k] = acc_t(0);
}

// dst[0 : n] = v[0 : n] in scalar_t, n <= lanes. A whole vector of the accumulation type
// is one store; the rest go through a stack copy (a plain copy loop here would become
// memcpy or rep movs, both slow at this size).
template <typename scalar_t, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void store_vec(scalar_t* __restrict dst, V v, int64_t n) {
  constexpr int L = VecT<acc_t>::lanes;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == L) return vstore(dst, v);
  }
  acc_t tmp[L];
  vstore(tmp, v);
  for (int64_t l = 0; l < n; ++l) dst[l] = static_cast<scalar_t>(tmp[l]);
}

// ---------------------------------------------------------------------------------------
// Forward: xa = xd @ A^T (T, R), xd = c * m ⊙ x, and y_lora = b + s * xa @ B^T (T, N).
// Parallel over tiles of kFwdRows rows. A tile of xd is built in a per-thread buffer xs
// (kFwdRows, K); xa's tile takes rank-1 updates over k, acc[i][:] += xs[i][k] * At[k][:],
// with At = A^T packed (K, Rp), Rp = R rounded up to whole vectors (R is vectorised);
// then, while the xa tile is at hand, y's tile takes rank-1 updates over r,
// acc[i][n] += s * xa[i][r] * Bt[r][n] with Bt = B^T packed (Rp, N) (N is vectorised),
// starting from the bias; y is written once, like the bias copy of a plain addmm.
constexpr int kFwdRows = 6;

// The reduction over K runs in chunks of kDownChunk, each summed in registers from zero
// and then added to out: in one chain of fp32 adds over K = 16384, xa was 23 ulps off
// where torch's blocked GEMM is 2-4 (tests/test_int8_lora_linear.py::test_blocked_tiles),
// and too few registers are left to keep the totals there.
constexpr int64_t kDownChunk = 256;

template <int NV, typename acc_t>
FASTPEFT_INLINE void down_tile(const acc_t* __restrict xs, int64_t K,
                               const acc_t* __restrict At, int64_t Rp,
                               acc_t* __restrict out /* (kFwdRows, ldo) */, int64_t ldo) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kDownChunk) {  // once for K = 0: zeros
    const int64_t k1 = std::min(K, k0 + kDownChunk);
    V acc[kFwdRows][NV];
#pragma GCC unroll 8
    for (int i = 0; i < kFwdRows; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    for (int64_t k = k0; k < k1; ++k) {
      V a[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) a[v] = vload(At + k * Rp + v * L);
#pragma GCC unroll 8
      for (int i = 0; i < kFwdRows; ++i) {
        const V xb = vbroadcast(xs[i * K + k]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] += xb * a[v];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kFwdRows; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        acc_t* o = out + i * ldo + v * L;
        vstore(o, k0 == 0 ? acc[i][v] : vload(o) + acc[i][v]);
      }
  }
}

template <int NV, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void up_tile(const acc_t* __restrict sxa, int64_t Rp,
                             const acc_t* __restrict Bt /* (Rp, 2 * lanes) panel */,
                             const acc_t* __restrict bias, scalar_t* __restrict y,
                             int64_t N, int64_t rows, int64_t cols) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  V acc[kFwdRows][NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const V b = vload(bias + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < kFwdRows; ++i) acc[i][v] = b;
  }
  for (int64_t r = 0; r < Rp; ++r) {
    V b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = vload(Bt + (r * 2 + v) * L);
#pragma GCC unroll 8
    for (int i = 0; i < kFwdRows; ++i) {
      const V xb = vbroadcast(sxa[i * Rp + r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] += xb * b[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kFwdRows; ++i) {
    if (i >= rows) break;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      store_vec<scalar_t, acc_t>(y + i * N + v * L, acc[i][v], std::min<int64_t>(L, cols - v * L));
  }
}

// At (K, Rp), Bt and bias (Np) are packed in acc_t and zero-padded by the caller, Bt as
// panels of 2 * lanes columns of B^T, panel p = Bt[p * Rp * 2 * lanes :] (Rp, 2 * lanes),
// so that a tile of y reads its B^T slice contiguously. xs is per-thread scratch of
// kFwdRows * (K + Rp); xa and y are written, not accumulated.
template <typename scalar_t, bool kDropout, typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void forward_kernel(
    const scalar_t* __restrict x, const acc_t* __restrict At, const acc_t* __restrict Bt,
    const acc_t* __restrict bias, scalar_t* __restrict xa, scalar_t* __restrict y, int64_t T,
    int64_t K, int64_t R, int64_t N, acc_t s, int64_t tile_begin, int64_t tile_end,
    uint64_t seed, uint32_t threshold, acc_t keep_scale, acc_t* __restrict xs,
    float* __restrict keep) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Rp = round_up(R, L), Np = round_up(N, L), groups = div_up(K, 4);
  const float keep_on = std::is_same_v<acc_t, float> ? static_cast<float>(keep_scale) : 1.0f;
  acc_t* sxa = xs + kFwdRows * K;  // (kFwdRows, Rp)  xa, then s * xa, of the tile
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * kFwdRows, rows = std::min<int64_t>(kFwdRows, T - t0);
    if constexpr (kDropout)
      dropout_keep_rows(seed, static_cast<uint64_t>(t0 * groups), groups, rows, groups,
                        threshold, keep_on, keep, 4 * groups);
    for (int64_t i = 0; i < kFwdRows; ++i) {
      if (i >= rows) {  // rows past T: zeros, results dropped
        std::fill(xs + i * K, xs + (i + 1) * K, acc_t(0));
        continue;
      }
      load_dropped<scalar_t, acc_t, kDropout>(x + (t0 + i) * K, K, K,
                                              kDropout ? keep + i * 4 * groups : nullptr,
                                              keep_scale, xs + i * K);
    }
    for (int64_t r0 = 0; r0 < Rp; r0 += 2 * L) {
      if (r0 + 2 * L <= Rp)
        down_tile<2>(xs, K, At + r0, Rp, sxa + r0, Rp);
      else
        down_tile<1>(xs, K, At + r0, Rp, sxa + r0, Rp);
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t r = 0; r < R; ++r) xa[(t0 + i) * R + r] = static_cast<scalar_t>(sxa[i * Rp + r]);
    for (int64_t e = 0; e < kFwdRows * Rp; ++e) sxa[e] *= s;
    for (int64_t n0 = 0; n0 < Np; n0 += 2 * L) {
      scalar_t* y_tile = y + t0 * N + n0;
      const acc_t* panel = Bt + (n0 / (2 * L)) * Rp * 2 * L;
      if (n0 + 2 * L <= Np)
        up_tile<2>(sxa, Rp, panel, bias + n0, y_tile, N, rows, N - n0);
      else
        up_tile<1>(sxa, Rp, panel, bias + n0, y_tile, N, rows, N - n0);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The branch for a few rows (T <= kFewRows: decode steps), on A and B as they lie, without
// forward_kernel's packing of A^T and B^T (R x (K + N) values laid out afresh each call,
// which at T = 1 took longer than the products) or its tiles of kFwdRows rows (five of six
// empty at T = 1): dot products along the rows of each weight,
//   xa[t][r] = xd[t] . A[r]  (length K)       y[t][n] = b[n] + sxa[t] . B[n]  (length R)
// with sxa = s * xa. Used by lora_branch.cpp's forward_few_rows and by int8_lora_linear's
// decode forward, which adds the up products in its own epilogue.
constexpr int64_t kFewRows = 8;

// xd (T, K) in acc_t: x's rows, times forward_kernel's dropout mask for rows 0 .. T - 1
// (the same Philox words and products, so the mask is lora_linear's) where dropout_p > 0.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>>
std::vector<acc_t> dropped_rows(const scalar_t* __restrict x, int64_t T, int64_t K,
                                double dropout_p, uint64_t seed) {
  std::vector<acc_t> xd(static_cast<size_t>(T * K));
  if (dropout_p <= 0.0) {
    for (int64_t t = 0; t < T; ++t)
      load_dropped<scalar_t, acc_t, false>(x + t * K, K, K, nullptr, acc_t(1), xd.data() + t * K);
    return xd;
  }
  // keep holds c (float kernels) or 1 (double), as in forward_kernel
  const int64_t groups = div_up(K, 4);
  const acc_t keep_scale = acc_t(1.0 / (1.0 - dropout_p));
  const float keep_on = std::is_same_v<acc_t, float> ? static_cast<float>(keep_scale) : 1.0f;
  std::vector<float> keep(static_cast<size_t>(T * 4 * groups));
  dropout_keep_rows(seed, 0, groups, T, groups, dropout_threshold(dropout_p), keep_on,
                    keep.data(), 4 * groups);
  for (int64_t t = 0; t < T; ++t)
    load_dropped<scalar_t, acc_t, true>(x + t * K, K, K, keep.data() + t * 4 * groups,
                                        keep_scale, xd.data() + t * K);
  return xd;
}

// out[j] = xd . A[j] for j < NR, xd (K) and A (NR, K) in acc_t: NR rows of A at a time
// sharing each vector of xd.
template <int NR, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void lora_dots(const acc_t* __restrict xd, const acc_t* __restrict A,
                               int64_t K, acc_t* __restrict out) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Kv = K / L * L;
  V a[NR] = {};
  for (int64_t k = 0; k < Kv; k += L) {
    const V xv = vload(xd + k);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) a[j] += xv * vload(A + j * K + k);
  }
  for (int j = 0; j < NR; ++j) {
    acc_t sum = hsum<acc_t>(a[j]);
    for (int64_t k = Kv; k < K; ++k) sum += xd[k] * A[j * K + k];
    out[j] = sum;
  }
}

// xa[:, r_begin : r_end) of xa (T, R) = xd @ A^T, xd (T, K) and A (R, K) in acc_t. Each
// dot product is computed alike whatever the range (lora_dots' rows are independent), so
// splitting R over threads changes no bits.
template <typename acc_t>
FASTPEFT_MULTIVERSION void lora_down_kernel(const acc_t* __restrict xd,
                                            const acc_t* __restrict A, int64_t T, int64_t K,
                                            int64_t R, int64_t r_begin, int64_t r_end,
                                            acc_t* __restrict xa) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t r = r_begin;
    for (; r + 4 <= r_end; r += 4) lora_dots<4>(xd + t * K, A + r * K, K, xa + t * R + r);
    for (; r < r_end; ++r) lora_dots<1>(xd + t * K, A + r * K, K, xa + t * R + r);
  }
}

// The up products' operands: y = bias + sxa @ B^T (+ the base term, added by the caller).
template <typename scalar_t, typename acc_t>
struct LoraUp {
  const acc_t* sxa;       // (T, R): s * xa in acc_t
  const scalar_t* B;      // (N, R) lora_B
  const scalar_t* bias;   // (N,), or nullptr
  int64_t R;
};

// The LoRA terms of rows n0 .. n0 + ng - 1 of y, lo[t * ldo + j] = bias[n0 + j] +
// Σ_r sxa[t, r] * B[n0 + j, r]: a row of B converted to acc_t into brow (R), then dot
// products vectorised over r. Rank-1 updates over r vectorised over j would need B^T, and
// at decode sizes transposing B costs more than the products themselves
// (`fastpeft-bench --ops int8_lora_linear` measures the decode shapes).
template <typename scalar_t, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void lora_terms(const LoraUp<scalar_t, acc_t>& up, int64_t T, int64_t n0,
                                int64_t ng, acc_t* __restrict brow, acc_t* __restrict lo,
                                int64_t ldo) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t R = up.R, Rv = R / L * L;
  for (int64_t j = 0; j < ng; ++j) {
    const scalar_t* b = up.B + (n0 + j) * R;
    for (int64_t r = 0; r < R; ++r) brow[r] = static_cast<acc_t>(b[r]);
    const acc_t bias = up.bias ? static_cast<acc_t>(up.bias[n0 + j]) : acc_t(0);
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* sx = up.sxa + t * R;
      V acc = {};
      for (int64_t r = 0; r < Rv; r += L) acc += vload(sx + r) * vload(brow + r);
      acc_t sum = hsum<acc_t>(acc);
      for (int64_t r = Rv; r < R; ++r) sum += sx[r] * brow[r];
      lo[t * ldo + j] = bias + sum;
    }
  }
}

// y[:, n_begin : n_end) of y (T, N) in scalar_t, written: the LoRA terms alone (lora_terms
// in blocks of kUpCols columns). scratch: T * kUpCols + R values of acc_t.
constexpr int64_t kUpCols = 64;

template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void lora_up_kernel(const LoraUp<scalar_t, acc_t>& up, int64_t T,
                                          int64_t N, int64_t n_begin, int64_t n_end,
                                          scalar_t* __restrict y, acc_t* __restrict scratch) {
  acc_t* lo = scratch;                // (T, kUpCols)
  acc_t* brow = scratch + T * kUpCols;  // (R)
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kUpCols) {
    const int64_t ng = std::min(kUpCols, n_end - n0);
    lora_terms(up, T, n0, ng, brow, lo, kUpCols);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < ng; ++j) y[t * N + n0 + j] = static_cast<scalar_t>(lo[t * kUpCols + j]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward, one pass over dy: dyB = dy @ B (T, R) and dB = s * dy^T @ xa (N, R). Parallel
// over blocks of NB columns of N: a block owns dB[block, :] (accumulated in dB_acc) and
// writes its share of dyB, dy[:, block] @ B[block, :], into a partial of its own (T, Rp),
// which the caller sums over the blocks in block order: the sums do not depend on which
// thread ran which block.
// Per row tile and column n, with R vectorised:
//   dyB[i][:] += dy[i][n] * B[n][:]        dB[n][:] += dy[i][n] * s * xa[i][:]
// so one broadcast of dy[i][n] feeds both products.
constexpr int kDyRows = 4;

template <int NV, typename acc_t>
FASTPEFT_INLINE void dy_tile(const acc_t* __restrict dys, int64_t ldd, int64_t nb,
                             const acc_t* __restrict Bp, int64_t Rp,
                             const acc_t* __restrict sxa, acc_t* __restrict dB_acc,
                             acc_t* __restrict out /* (kDyRows, NV * lanes) */) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  V acc[kDyRows][NV], xr[kDyRows][NV];
#pragma GCC unroll 4
  for (int i = 0; i < kDyRows; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = V{}, xr[i][v] = vload(sxa + i * Rp + v * L);
  for (int64_t n = 0; n < nb; ++n) {
    V b[NV], g[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      b[v] = vload(Bp + n * Rp + v * L), g[v] = vload(dB_acc + n * Rp + v * L);
#pragma GCC unroll 4
    for (int i = 0; i < kDyRows; ++i) {
      const V d = vbroadcast(dys[i * ldd + n]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] += d * b[v], g[v] += d * xr[i][v];
    }
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) vstore(dB_acc + n * Rp + v * L, g[v]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < kDyRows; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) vstore(out + (i * NV + v) * L, acc[i][v]);
}

// Rows [t_begin, t_end) of dy against column blocks [block_begin, block_end). dB_acc is
// (N, Rp) in acc_t, persistent across calls; block b writes its (t_end - t_begin, Rp)
// partial of dyB[t_begin : t_end] at dyB_parts + b * part_stride.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void dy_kernel(
    const scalar_t* __restrict dy, const scalar_t* __restrict B, const scalar_t* __restrict xa,
    acc_t* __restrict dB_acc, acc_t* __restrict dyB_parts, int64_t part_stride,
    int64_t t_begin, int64_t t_end,
    int64_t N, int64_t R, int64_t NB, int64_t block_begin, int64_t block_end, acc_t s,
    acc_t* __restrict work) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Rp = round_up(R, L);
  acc_t* Bp = work;                    // (NB, Rp)       B[block, :] zero-padded
  acc_t* dys = Bp + NB * Rp;           // (kDyRows, NB)  dy rows of the tile
  acc_t* sxa = dys + kDyRows * NB;     // (kDyRows, Rp)  s * xa rows of the tile
  acc_t out[kDyRows * 2 * L];
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t n0 = block * NB, nb = std::min(NB, N - n0);
    acc_t* part = dyB_parts + block * part_stride;
    for (int64_t n = 0; n < nb; ++n)
      load_dropped<scalar_t, acc_t, false>(B + (n0 + n) * R, R, Rp, nullptr, 1, Bp + n * Rp);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kDyRows) {
      const int64_t rows = std::min<int64_t>(kDyRows, t_end - t0);
      for (int64_t i = 0; i < kDyRows; ++i) {
        if (i >= rows) {  // rows past the end: zeros, results dropped
          std::fill(dys + i * NB, dys + i * NB + nb, acc_t(0));
          std::fill(sxa + i * Rp, sxa + (i + 1) * Rp, acc_t(0));
          continue;
        }
        load_dropped<scalar_t, acc_t, false>(dy + (t0 + i) * N + n0, nb, nb, nullptr, 1,
                                             dys + i * NB);
        for (int64_t r = 0; r < Rp; ++r)
          sxa[i * Rp + r] = r < R ? s * to_acc(xa[(t0 + i) * R + r]) : acc_t(0);
      }
      for (int64_t r0 = 0; r0 < Rp;) {
        const int nv = r0 + 2 * L <= Rp ? 2 : 1;
        if (nv == 2)
          dy_tile<2>(dys, NB, nb, Bp + r0, Rp, sxa + r0, dB_acc + n0 * Rp + r0, out);
        else
          dy_tile<1>(dys, NB, nb, Bp + r0, Rp, sxa + r0, dB_acc + n0 * Rp + r0, out);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t l = 0; l < nv * L; ++l)
            part[(t0 - t_begin + i) * Rp + r0 + l] = out[i * nv * L + l];
        r0 += nv * L;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, fused: dx_lora = c * m ⊙ (s * dyB @ A) (T, K) and dA = s * dyB^T @ xd (R, K).
// Parallel over blocks of KB columns of K: a thread owns dA[:, block] (accumulated in an
// L1-sized buffer, no cross-thread reduction) and streams every row of x / dyB / dx
// through it, kBwdRows rows at a time. Per row tile and vector of columns j, for r < R:
//   dxacc[i][j] += sdyB[i][r] * A[r][j]      dAacc[r][j] += sdyB[i][r] * xd[i][j]
// so one load of A[r][j] and one load/store of dAacc[r][j] serve kBwdRows rows.
constexpr int kBwdRows = 4;

template <bool kDropout, bool kDx, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void backward_tile(const acc_t* __restrict xs, const acc_t* __restrict sdyb,
                                   const acc_t* __restrict Ab, const float* __restrict keep,
                                   acc_t keep_scale, int64_t R, int64_t KBp,
                                   acc_t* __restrict dA_acc, scalar_t* __restrict dx,
                                   int64_t K, int64_t rows, int64_t kb) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  for (int64_t j = 0; j < KBp; j += L) {
    V xv[kBwdRows], dxa[kBwdRows];
#pragma GCC unroll 4
    for (int i = 0; i < kBwdRows; ++i) xv[i] = vload(xs + i * KBp + j), dxa[i] = V{};
    for (int64_t r = 0; r < R; ++r) {
      // two partial sums for dA halve the FMA latency chain between its load and store
      V g[2] = {vload(dA_acc + r * KBp + j), V{}};
      V a;
      if constexpr (kDx) a = vload(Ab + r * KBp + j);
#pragma GCC unroll 4
      for (int i = 0; i < kBwdRows; ++i) {
        const V b = vbroadcast(sdyb[i * R + r]);
        if constexpr (kDx) dxa[i] += b * a;
        g[i % 2] += b * xv[i];
      }
      vstore(dA_acc + r * KBp + j, g[0] + g[1]);
    }
    if constexpr (kDx) {
#pragma GCC unroll 4
      for (int i = 0; i < kBwdRows; ++i) {
        if (i >= rows) break;
        V d = dxa[i];
        if constexpr (kDropout) {
          if constexpr (std::is_same_v<acc_t, float>) {
            d *= vload(keep + i * KBp + j);
          } else {  // 4 floats widened to 4 doubles
            typedef float f32x4 __attribute__((vector_size(16)));
            f32x4 m;
            std::memcpy(&m, keep + i * KBp + j, sizeof(m));
            d *= __builtin_convertvector(m, V) * keep_scale;
          }
        }
        store_vec<scalar_t, acc_t>(dx + i * K + j, d, std::min<int64_t>(L, kb - j));
      }
    }
  }
}

// dyB is (T, R) in acc_t (from dy_kernel); dx (if kDx) and dA are written, not
// accumulated.
template <typename scalar_t, bool kDropout, bool kDx,
          typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void backward_kernel(
    const scalar_t* __restrict x, const scalar_t* __restrict A, const acc_t* __restrict dyB,
    scalar_t* __restrict dx, scalar_t* __restrict dA, int64_t T, int64_t K, int64_t R,
    int64_t KB, int64_t block_begin, int64_t block_end, acc_t s, uint64_t seed,
    uint32_t threshold, acc_t keep_scale, acc_t* __restrict work, float* __restrict keep) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t groups = div_up(K, 4);
  const float keep_on = std::is_same_v<acc_t, float> ? static_cast<float>(keep_scale) : 1.0f;
  const int64_t KBmax = round_up(KB, L);
  acc_t* Ab = work;                      // (R, KBp)         A[:, block]
  acc_t* dA_acc = Ab + R * KBmax;        // (R, KBp)         dA[:, block]
  acc_t* xs = dA_acc + R * KBmax;        // (kBwdRows, KBp)  xd rows of the tile
  acc_t* sdyb = xs + kBwdRows * KBmax;   // (kBwdRows, R)    s * dyB rows of the tile
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t k0 = block * KB, kb = std::min(KB, K - k0), KBp = round_up(kb, L);
    for (int64_t r = 0; r < R; ++r) {
      load_dropped<scalar_t, acc_t, false>(A + r * K + k0, kb, KBp, nullptr, 1, Ab + r * KBp);
      std::fill(dA_acc + r * KBp, dA_acc + (r + 1) * KBp, acc_t(0));
    }
    for (int64_t t0 = 0; t0 < T; t0 += kBwdRows) {
      const int64_t rows = std::min<int64_t>(kBwdRows, T - t0);
      // x rows are KB-wide strips K apart, which the hardware prefetcher does not
      // anticipate: fetch the next tile's strips while this one computes.
      for (int64_t t = t0 + kBwdRows; t < std::min(T, t0 + 2 * kBwdRows); ++t)
        for (int64_t j = 0; j < kb; j += 64 / static_cast<int64_t>(sizeof(scalar_t)))
          __builtin_prefetch(x + t * K + k0 + j);
      if constexpr (kDropout)
        dropout_keep_rows(seed, static_cast<uint64_t>(t0 * groups + k0 / 4), groups, rows,
                          div_up(kb, 4), threshold, keep_on, keep, KBp);
      for (int64_t i = 0; i < kBwdRows; ++i) {
        if (i >= rows) {  // rows past T contribute nothing to dA
          std::fill(sdyb + i * R, sdyb + (i + 1) * R, acc_t(0));
          std::fill(xs + i * KBp, xs + (i + 1) * KBp, acc_t(0));
          continue;
        }
        const int64_t t = t0 + i;
        for (int64_t r = 0; r < R; ++r) sdyb[i * R + r] = s * dyB[t * R + r];
        load_dropped<scalar_t, acc_t, kDropout>(x + t * K + k0, kb, KBp, keep + i * KBp,
                                                keep_scale, xs + i * KBp);
      }
      backward_tile<kDropout, kDx>(xs, sdyb, Ab, keep, keep_scale, R, KBp, dA_acc,
                                   kDx ? dx + t0 * K + k0 : dx, K, rows, kb);
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < kb; ++j)
        dA[r * K + k0 + j] = static_cast<scalar_t>(dA_acc[r * KBp + j]);
  }
}

// Columns per backward block: the A and dA blocks (2 x R x KB x 4 bytes) stay in L1.
inline int64_t backward_block_cols(int64_t R) {
  return std::clamp<int64_t>((2048 / std::max<int64_t>(R, 1)) / 16 * 16, 16, 256);
}

}  // namespace fastpeft::cpu::lora_branch
