// Micro-kernels of gated prefix attention on CPU (the blocked algorithm and the op glue
// are in gated_prefix_attention.cpp).
//
// Every block is kept "query-minor": a score block is S^T (keys, queries), an output block
// O^T (D, queries), so one vector holds 8 consecutive queries (4 in fp64). The row-wise
// softmax statistics (max, sum, lse, D) are then plain vectors and need no horizontal
// reductions, and K, V are only ever broadcast from, so they are read in place, unpacked.
// T is the accumulation type (float, or double for fp64 inputs); each hot leaf is
// multi-versioned for AVX2/FMA (simd.h) and inlines its helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd.h"

namespace fastpeft::cpu::gpa {

template <typename T>
using Vec = typename VecT<T>::type;

template <typename T>
FASTPEFT_INLINE Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

// 2^x for x <= 127. Round-to-nearest split x = n + f, |f| <= 1/2, by the 1.5 * 2^23 trick;
// 2^f = e^(f ln2) by its degree-7 Taylor polynomial (relative error < 6e-9 on |f| <= 1/2);
// 2^n built in the exponent bits. x <= -127 (and -inf) gives exactly 0.
FASTPEFT_INLINE f32x8 vexp2(f32x8 x) {
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  const f32x8 lo = vbroadcast(-127.0f), hi = vbroadcast(127.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x8 magic = vbroadcast(12582912.0f);
  const f32x8 r = (x + magic) - magic;
  const f32x8 f = x - r;
  f32x8 p = vbroadcast(1.525273380405984e-05f);
  p = p * f + vbroadcast(1.5403530393381606e-04f);
  p = p * f + vbroadcast(1.3333558146428443e-03f);
  p = p * f + vbroadcast(9.618129107628477e-03f);
  p = p * f + vbroadcast(5.550410866482158e-02f);
  p = p * f + vbroadcast(2.402265069591007e-01f);
  p = p * f + vbroadcast(6.931471805599453e-01f);
  p = p * f + vbroadcast(1.0f);
  const i32x8 bits = (__builtin_convertvector(r, i32x8) + 127) << 23;
  return p * (f32x8)bits;  // a vector cast reinterprets the bits
}
// fp64 is the checking path, not the fast one: exact libm per lane.
FASTPEFT_INLINE f64x4 vexp2(f64x4 x) {
  for (int i = 0; i < 4; ++i) x[i] = std::exp2(x[i]);
  return x;
}

// ---------------------------------------------------------------------------------------
// C (rows, cols) (+)= A (rows, K) B (K, cols), the one GEMM shape used everywhere.
// A is addressed as A[r * sar + k * sak], so it can be row-major (sak = 1) or transposed
// (sar = 1); its elements are broadcast. B and C are row-major, cols a multiple of the
// vector width. Register tile: kTileRows rows x 2 vectors (12 accumulators, + 2 B loads
// + 1 broadcast = 15 of the 16 ymm registers).
#ifndef GPA_TILE_ROWS
#define GPA_TILE_ROWS 6
#define GPA_TILE_VECS 2
#endif
constexpr int kTileRows = GPA_TILE_ROWS, kTileVecs = GPA_TILE_VECS;

template <int R, int NV, bool kAcc, typename T>
FASTPEFT_INLINE void mm_tile(const T* __restrict A, int64_t sar, int64_t sak,
                             const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                             int64_t K) {
  using V = Vec<T>;
  constexpr int L = VecT<T>::lanes;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = kAcc ? vload(C + r * ldc + v * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a = vbroadcast(A[r * sar + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * L, acc[r][v]);
}

template <int R, bool kAcc, typename T>
FASTPEFT_INLINE void mm_rows(const T* A, int64_t sar, int64_t sak, const T* B, int64_t ldb,
                             int64_t cols, T* C, int64_t ldc, int64_t K) {
  constexpr int L = VecT<T>::lanes;
  int64_t c = 0;
  for (; c + kTileVecs * L <= cols; c += kTileVecs * L)
    mm_tile<R, kTileVecs, kAcc>(A, sar, sak, B + c, ldb, C + c, ldc, K);
  switch ((cols - c) / L) {
    case 2: if constexpr (kTileVecs > 2) mm_tile<R, 2, kAcc>(A, sar, sak, B + c, ldb, C + c, ldc, K); break;
    case 1: if constexpr (kTileVecs > 1) mm_tile<R, 1, kAcc>(A, sar, sak, B + c, ldb, C + c, ldc, K); break;
    default: break;
  }
}

template <bool kAcc, typename T>
FASTPEFT_MULTIVERSION void mm(const T* A, int64_t sar, int64_t sak, int64_t rows, const T* B,
                              int64_t ldb, int64_t cols, T* C, int64_t ldc, int64_t K) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    mm_rows<kTileRows, kAcc>(A + r * sar, sar, sak, B, ldb, cols, C + r * ldc, ldc, K);
  const T* a = A + r * sar;
  T* c = C + r * ldc;
  switch (rows - r) {
    case 7: if constexpr (kTileRows > 7) mm_rows<7, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    case 6: if constexpr (kTileRows > 6) mm_rows<6, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    case 5: if constexpr (kTileRows > 5) mm_rows<5, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    case 4: if constexpr (kTileRows > 4) mm_rows<4, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    case 3: mm_rows<3, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    case 2: mm_rows<2, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    case 1: mm_rows<1, kAcc>(a, sar, sak, B, ldb, cols, c, ldc, K); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------
// Softmax pieces on a score block S^T (rows keys, ld, cols queries), log2 domain (the
// scores already carry scale * log2(e), so every exponential is a 2^x).

// Online softmax step (forward): with per-query running max m and sum l,
//   m' = max(m, max_j S[j]),  P[j] = 2^(S[j] - m'),  l' = 2^(m - m') l + sum_j P[j],
// and O^T (D rows, ldo) *= 2^(m - m'). S is overwritten with P. A query that has seen only
// masked (-inf) keys keeps m' = -inf and is shifted by 0 instead, so P = 0, never NaN.
template <typename T>
FASTPEFT_MULTIVERSION void softmax_online(T* S, int64_t ld, int64_t rows, int64_t cols, T* m,
                                          T* l, T* O, int64_t ldo, int64_t D) {
  using V = Vec<T>;
  constexpr int L = VecT<T>::lanes;
  const V neg_inf = vbroadcast(-std::numeric_limits<T>::infinity()), zero = V{};
  for (int64_t c = 0; c < cols; c += L) {
    V mx = neg_inf;
    for (int64_t j = 0; j < rows; ++j) mx = vmax<T>(mx, vload(S + j * ld + c));
    const V m_old = vload(m + c), m_new = vmax<T>(m_old, mx);
    const V shift = m_new == neg_inf ? zero : m_new;
    const V alpha = vexp2(m_old - shift);
    V sum = zero;
    for (int64_t j = 0; j < rows; ++j) {
      const V p = vexp2(vload(S + j * ld + c) - shift);
      vstore(S + j * ld + c, p);
      sum += p;
    }
    vstore(l + c, vload(l + c) * alpha + sum);
    vstore(m + c, m_new);
    for (int64_t d = 0; d < D; ++d) vstore(O + d * ldo + c, vload(O + d * ldo + c) * alpha);
  }
}

// Backward recomputation: P[j] = 2^(S[j] - lse2) in place (lse2 = +inf: P = 0).
template <typename T>
FASTPEFT_MULTIVERSION void softmax_recompute(T* S, int64_t ld, int64_t rows, int64_t cols,
                                             const T* lse2) {
  constexpr int L = VecT<T>::lanes;
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; c += L)
      vstore(S + j * ld + c, vexp2(vload(S + j * ld + c) - vload(lse2 + c)));
}

// dS = f * P ⊙ (dP - Dr) in place of dP (Dr per query, f a scalar).
template <typename T>
FASTPEFT_MULTIVERSION void softmax_grad(const T* P, T* dP, int64_t ld, int64_t rows, int64_t cols,
                                  const T* Dr, T f) {
  constexpr int L = VecT<T>::lanes;
  const Vec<T> fv = vbroadcast(f);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; c += L)
      vstore(dP + j * ld + c,
             fv * vload(P + j * ld + c) * (vload(dP + j * ld + c) - vload(Dr + c)));
}

// out[c] = sum_r A[r][c] * B[r][c]: the per-query row sums D = rowsum(dO ⊙ O) on
// query-minor blocks.
template <typename T>
FASTPEFT_MULTIVERSION void colsum_product(const T* A, const T* B, int64_t ld, int64_t rows,
                                    int64_t cols, T* out) {
  constexpr int L = VecT<T>::lanes;
  for (int64_t c = 0; c < cols; c += L) {
    Vec<T> s{};
    for (int64_t r = 0; r < rows; ++r) s += vload(A + r * ld + c) * vload(B + r * ld + c);
    vstore(out + c, s);
  }
}

}  // namespace fastpeft::cpu::gpa
