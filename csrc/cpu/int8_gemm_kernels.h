// int8 weight-only GEMM kernels of int8_lora_linear on CPU (the op glue is in
// int8_lora_linear.cpp).
//
// The weight is W = Q ⊙ scale[:, None], Q int8 (N, K), scale float32 (N,). The scale is
// constant along a row of Q, so it factors out of the forward reduction over k and into
// the columns of dy in the backward one:
//   forward   y[t, n]  += scale[n] * Σ_k x[t, k] * Q[n, k]
//   backward  dx[t, k] += Σ_n (dy[t, n] * scale[n]) * Q[n, k]
// Both small-T kernels stream Q once and widen it to floats in registers (sign extension
// and int -> float conversion are exact), so the only memory traffic that grows with the
// layer is one byte per weight. They are register-blocked on 32-byte vectors (simd.h) with
// fp32 accumulation (fp64 for double) and multi-versioned for AVX2/FMA; the callers run
// them on disjoint ranges from at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/simd.h"

namespace fastpeft::cpu {

// The accumulation type: double for double, float for float / half / bfloat16.
template <typename scalar_t>
using I8AccOf = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Widening int8 in registers. GCC 12 lowers __builtin_convertvector from an int8 vector
// to a float vector element by element (scalar movsx + cvtsi2ss), so the kernels widen by
// shifts instead: a group of 4 * lanes bytes of Q is loaded as `lanes` 32-bit lanes, and
// byte j of every lane is sign-extended by (lane << (24 - 8j)) >> 24 (arithmetic), then
// converted int32 -> acc_t (exact), e.g. vpslld + vpsrad + vcvtdq2ps with AVX2. Part j of
// the group is the vector of its columns j, 4 + j, 8 + j, ...: the kernels work in this
// lane-interleaved column order within a group (kI8Perm) and map back at the edges.
template <typename acc_t>
struct QGroup;
template <>
struct QGroup<float> {
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct QGroup<double> {
  typedef uint32_t U __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};

// Bytes of Q per group: 32 (fp32, 8 lanes) or 16 (fp64, 4 lanes).
template <typename acc_t>
constexpr int64_t kI8GroupBytes = 4 * VecT<acc_t>::lanes;

template <typename acc_t>
FASTPEFT_INLINE typename QGroup<acc_t>::U load_group(const int8_t* p) {
  typename QGroup<acc_t>::U u;
  std::memcpy(&u, p, sizeof(u));
  return u;
}

template <int J, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE V group_part(typename QGroup<acc_t>::U u) {
  using I = typename QGroup<acc_t>::I;
  if constexpr (J == 3)
    return __builtin_convertvector((I)u >> 24, V);
  else  // the left shift on unsigned lanes, so that it is defined for any byte
    return __builtin_convertvector((I)(u << (24 - 8 * J)) >> 24, V);
}

// Position in the lane-interleaved order of column c of a group: part c % 4, lane c / 4.
template <typename acc_t>
constexpr int64_t kI8Perm(int64_t c) {
  return (c % 4) * VecT<acc_t>::lanes + c / 4;
}

template <typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE acc_t hsum(V v) {
  constexpr int L = VecT<acc_t>::lanes;
  acc_t lanes[L];
  vstore(lanes, v);
  acc_t s = 0;
  for (int l = 0; l < L; ++l) s += lanes[l];
  return s;
}

// ---------------------------------------------------------------------------------------
// Forward, small T: y[t, n] += scale[n] * x[t, :] . Q[n, :] for all T rows and the rows n
// of [n_begin, n_end). Rows of Q go in groups of kI8Rows; for each, K goes in chunks of
// kI8Chunk and every (t, n) pair of the group takes the chunk's dot product into a vector
// accumulator kept in `acc` (T, kI8Rows vectors) between chunks, so the chunk of x
// (T x kI8Chunk) and of Q (kI8Rows x kI8Chunk) stay in L1 while all pairs use them, and
// Q is read from memory once. x comes lane-interleaved (i8_permute_rows) to match the
// widened parts of Q. The register tile is TR rows of x by NR rows of Q: TR x vectors and
// one widened Q vector feed TR * NR accumulators (at most 15 of the 16 ymm registers).
constexpr int64_t kI8Rows = 8, kI8Chunk = 256;

template <int J, int TR, int NR, typename acc_t, typename V>
FASTPEFT_INLINE void i8_fwd_part(const acc_t* __restrict x, int64_t K,
                                 const int8_t* __restrict q, V (&a)[TR][NR]) {
  constexpr int L = VecT<acc_t>::lanes;
  V xv[TR];
#pragma GCC unroll 4
  for (int i = 0; i < TR; ++i) xv[i] = vload(x + i * K + J * L);
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    // the group is reloaded per part (an L1 hit) rather than held in NR registers
    const V w = group_part<J, acc_t>(load_group<acc_t>(q + j * K));
#pragma GCC unroll 4
    for (int i = 0; i < TR; ++i) a[i][j] += xv[i] * w;
  }
}

template <int TR, int NR, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void i8_fwd_tile(const acc_t* __restrict x, int64_t K,
                                 const int8_t* __restrict q, int64_t kc,
                                 acc_t* __restrict acc /* [TR][kI8Rows] vectors */) {
  constexpr int L = VecT<acc_t>::lanes;
  constexpr int64_t G = kI8GroupBytes<acc_t>;
  V a[TR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) a[i][j] = vload(acc + (i * kI8Rows + j) * L);
  for (int64_t k = 0; k < kc; k += G) {
    i8_fwd_part<0>(x + k, K, q + k, a);
    i8_fwd_part<1>(x + k, K, q + k, a);
    i8_fwd_part<2>(x + k, K, q + k, a);
    i8_fwd_part<3>(x + k, K, q + k, a);
  }
#pragma GCC unroll 4
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) vstore(acc + (i * kI8Rows + j) * L, a[i][j]);
}

// TR rows of x against the ng rows of the group: NR rows at a time, then one at a time.
template <int TR, int NR, typename acc_t>
FASTPEFT_INLINE void i8_fwd_sweep(const acc_t* __restrict x, int64_t K,
                                  const int8_t* __restrict q, int64_t ng, int64_t kc,
                                  acc_t* __restrict acc) {
  constexpr int L = VecT<acc_t>::lanes;
  int64_t j = 0;
  for (; j + NR <= ng; j += NR) i8_fwd_tile<TR, NR>(x, K, q + j * K, kc, acc + j * L);
  for (; j < ng; ++j) i8_fwd_tile<TR, 1>(x, K, q + j * K, kc, acc + j * L);
}

// xp (T, K) = x in acc_t with each whole group of columns lane-interleaved
// (xp[t, g + kI8Perm(c)] = x[t, g + c]) and the tail columns as they are.
template <typename scalar_t, typename acc_t>
void i8_permute_rows(const scalar_t* __restrict x, int64_t T, int64_t K, acc_t* __restrict xp) {
  constexpr int64_t G = kI8GroupBytes<acc_t>;
  const int64_t Kg = K / G * G;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < Kg; g += G)
      for (int64_t c = 0; c < G; ++c)
        xp[t * K + g + kI8Perm<acc_t>(c)] = static_cast<acc_t>(x[t * K + g + c]);
    for (int64_t k = Kg; k < K; ++k) xp[t * K + k] = static_cast<acc_t>(x[t * K + k]);
  }
}

// xp (T, K) from i8_permute_rows; y (T, N) in scalar_t, accumulated; acc is per-thread
// scratch of T * kI8Rows vectors. Columns past the last whole group are a scalar tail.
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void i8_linear_decode_kernel(
    const acc_t* __restrict xp, const int8_t* __restrict q, const float* __restrict scale,
    scalar_t* __restrict y, int64_t T, int64_t K, int64_t N, int64_t n_begin, int64_t n_end,
    acc_t* __restrict acc) {
  constexpr int L = VecT<acc_t>::lanes;
  constexpr int64_t G = kI8GroupBytes<acc_t>;
  const int64_t Kg = K / G * G;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kI8Rows) {
    const int64_t ng = std::min(kI8Rows, n_end - n0);
    std::fill(acc, acc + T * kI8Rows * L, acc_t(0));
    const int8_t* qg = q + n0 * K;
    for (int64_t k0 = 0; k0 < Kg; k0 += kI8Chunk) {
      const int64_t kc = std::min(kI8Chunk, Kg - k0);
      const acc_t* xc = xp + k0;
      int64_t t0 = 0;
      for (; t0 + 4 <= T; t0 += 4)
        i8_fwd_sweep<4, 2>(xc + t0 * K, K, qg + k0, ng, kc, acc + t0 * kI8Rows * L);
      acc_t* at = acc + t0 * kI8Rows * L;
      switch (T - t0) {
        case 3: i8_fwd_sweep<3, 3>(xc + t0 * K, K, qg + k0, ng, kc, at); break;
        case 2: i8_fwd_sweep<2, 4>(xc + t0 * K, K, qg + k0, ng, kc, at); break;
        case 1: i8_fwd_sweep<1, 8>(xc + t0 * K, K, qg + k0, ng, kc, at); break;
        default: break;
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < ng; ++j) {
        const int64_t n = n0 + j;
        acc_t dot = hsum<acc_t>(vload(acc + (t * kI8Rows + j) * L));
        for (int64_t k = Kg; k < K; ++k) dot += xp[t * K + k] * acc_t(q[n * K + k]);
        y[t * N + n] = static_cast<scalar_t>(static_cast<acc_t>(y[t * N + n]) +
                                             static_cast<acc_t>(scale[n]) * dot);
      }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, small T: dx[t, k] += Σ_n dyT[n, t] * Q[n, k] for all T rows and the column
// blocks [block_begin, block_end) of kI8Cols columns, with dyT = (dy ⊙ scale)^T (N, T)
// prepared by the caller, so that the TR values a step over n broadcasts share a cache
// line. A thread owns its columns of dx (no reduction across threads); for a block, N goes
// in chunks of kI8RowChunk rows whose Q strip (kI8RowChunk x kI8Cols bytes) and dyT rows
// stay in L1 while every row tile sweeps them, the block's sums waiting in `acc` (T,
// kI8Cols, lane-interleaved per group). The register tile is TR rows by NG groups: 4 * NG
// accumulator vectors per row (at most 12 in all).
constexpr int64_t kI8Cols = 64, kI8RowChunk = 128;

template <int TR, int NG, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void i8_dx_tile(const acc_t* __restrict dyT, int64_t T,
                                const int8_t* __restrict q, int64_t K, int64_t nc,
                                acc_t* __restrict acc /* [TR][kI8Cols] */) {
  constexpr int L = VecT<acc_t>::lanes;
  constexpr int64_t G = kI8GroupBytes<acc_t>;
  V a[TR][4 * NG];
#pragma GCC unroll 4
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < 4 * NG; ++v) a[i][v] = vload(acc + i * kI8Cols + v * L);
  for (int64_t n = 0; n < nc; ++n) {
#pragma GCC unroll 2
    for (int g = 0; g < NG; ++g) {
      const auto u = load_group<acc_t>(q + n * K + g * G);
      const V w[4] = {group_part<0, acc_t>(u), group_part<1, acc_t>(u),
                      group_part<2, acc_t>(u), group_part<3, acc_t>(u)};
#pragma GCC unroll 4
      for (int i = 0; i < TR; ++i) {
        const V d = vbroadcast(dyT[n * T + i]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) a[i][4 * g + j] += d * w[j];
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < 4 * NG; ++v) vstore(acc + i * kI8Cols + v * L, a[i][v]);
}

// TR rows against the ngr groups of the block: NG groups at a time, then one at a time.
template <int TR, int NG, typename acc_t>
FASTPEFT_INLINE void i8_dx_sweep(const acc_t* __restrict dyT, int64_t T,
                                 const int8_t* __restrict q, int64_t K, int64_t nc,
                                 int64_t ngr, acc_t* __restrict acc) {
  constexpr int64_t G = kI8GroupBytes<acc_t>;
  int64_t g = 0;
  for (; g + NG <= ngr; g += NG) i8_dx_tile<TR, NG>(dyT, T, q + g * G, K, nc, acc + g * G);
  for (; g < ngr; ++g) i8_dx_tile<TR, 1>(dyT, T, q + g * G, K, nc, acc + g * G);
}

// Column blocks of i8_dx_decode_kernel over the whole groups of K (at least one block: it
// also does the scalar tail of the columns past the last whole group).
template <typename acc_t>
inline int64_t i8_dx_blocks(int64_t K) {
  return std::max<int64_t>(1, div_up(K / kI8GroupBytes<acc_t> * kI8GroupBytes<acc_t>, kI8Cols));
}

// dyT (N, T) in acc_t; dx (T, K) in scalar_t, accumulated; acc is per-thread scratch of
// T * kI8Cols acc_t.
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void i8_dx_decode_kernel(
    const acc_t* __restrict dyT, const int8_t* __restrict q, scalar_t* __restrict dx,
    int64_t T, int64_t K, int64_t N, int64_t block_begin, int64_t block_end,
    acc_t* __restrict acc) {
  constexpr int64_t G = kI8GroupBytes<acc_t>;
  const int64_t Kg = K / G * G;
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t k0 = block * kI8Cols, kb = std::min(kI8Cols, Kg - k0), ngr = kb / G;
    std::fill(acc, acc + T * kI8Cols, acc_t(0));
    for (int64_t n0 = 0; n0 < N; n0 += kI8RowChunk) {
      const int64_t nc = std::min(kI8RowChunk, N - n0);
      const acc_t* d = dyT + n0 * T;
      const int8_t* qs = q + n0 * K + k0;
      int64_t t0 = 0;
      for (; t0 + 3 <= T; t0 += 3) i8_dx_sweep<3, 1>(d + t0, T, qs, K, nc, ngr, acc + t0 * kI8Cols);
      switch (T - t0) {
        case 2: i8_dx_sweep<2, 1>(d + t0, T, qs, K, nc, ngr, acc + t0 * kI8Cols); break;
        case 1: i8_dx_sweep<1, 2>(d + t0, T, qs, K, nc, ngr, acc + t0 * kI8Cols); break;
        default: break;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      scalar_t* row = dx + t * K + k0;
      const acc_t* sums = acc + t * kI8Cols;
      for (int64_t c = 0; c < kb; ++c) {
        const acc_t v = sums[c / G * G + kI8Perm<acc_t>(c % G)];
        row[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) + v);
      }
    }
  }
  if (block_end == i8_dx_blocks<acc_t>(K))
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = Kg; k < K; ++k) {
        acc_t sum = 0;
        for (int64_t n = 0; n < N; ++n) sum += dyT[n * T + t] * acc_t(q[n * K + k]);
        dx[t * K + k] = static_cast<scalar_t>(static_cast<acc_t>(dx[t * K + k]) + sum);
      }
}

// ---------------------------------------------------------------------------------------
// Large T: a tile of the dequantised weight, out (rows, cols) = Q[tile] * scale[rows],
// for an ATen GEMM. In acc_t the product is that of reference.dequantize_int8 (float32,
// float64 for double). A plain loop: GCC's loop vectoriser widens int8 well
// (vpmovsxbw / vpmovsxwd), unlike __builtin_convertvector.
template <typename acc_t>
FASTPEFT_MULTIVERSION void i8_dequant_tile(const int8_t* __restrict q, int64_t K,
                                           const float* __restrict scale, int64_t rows,
                                           int64_t cols, acc_t* __restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t s = static_cast<acc_t>(scale[r]);
    const int8_t* qr = q + r * K;
    acc_t* o = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<acc_t>(qr[c]) * s;
  }
}

}  // namespace fastpeft::cpu
