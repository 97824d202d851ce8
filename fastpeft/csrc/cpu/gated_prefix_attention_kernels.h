// Micro-kernels of gated prefix attention on CPU, and the problem description the blocked
// loops share (the algorithm and the op glue are in gated_prefix_attention.cpp).
//
// Every block is kept "query-minor": a score block is S^T (keys, queries), an output block
// O^T (D, queries), so one vector holds 8 consecutive queries (4 in fp64). The row-wise
// softmax statistics (max, sum, lse, D) are then plain vectors and need no horizontal
// reductions, and K, V are only ever broadcast from, so they are read in place, unpacked.
// T is the accumulation type (float, or double for fp64 inputs); each hot leaf is
// multi-versioned for AVX2/FMA (simd.h) and inlines its helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

namespace fastpeft::cpu::gated_prefix_attention {

template <typename T>
using Vec = typename VecT<T>::type;

template <typename T>
FASTPEFT_INLINE Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

// 2^x for x <= 127 (every caller passes x <= 0, up to rounding: a score minus a max or
// an lse, so no upper clamp is spent). Round-to-nearest split x = n + f, |f| <= 1/2, by
// the 1.5 * 2^23 trick; 2^f = e^(f ln2) by its degree-7 Taylor polynomial (relative error
// < 6e-9 on |f| <= 1/2); 2^n built in the exponent bits. x <= -127 (and -inf) gives 0,
// NaN stays NaN.
FASTPEFT_INLINE f32x8 vexp2(f32x8 x) {
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  const f32x8 lo = vbroadcast(-127.0f);
  x = x < lo ? lo : x;
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
// vector width. Register tiles of 12 accumulators (enough to cover the FMA latency) + the
// B loads + 1 broadcast fill the 16 ymm registers: 4 rows x 3 vectors where 24 divides
// cols (query-minor blocks, kBlockM = 48), else 6 rows x 2 vectors (cols = padded head
// dim: 64, 80, 128 are multiples of 16), so that few tail tiles with fewer accumulators run.
template <int R, int NV, int kAcc, typename T>
FASTPEFT_INLINE void mm_tile(const T* __restrict A, int64_t sar, int64_t sak,
                             const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                             int64_t K, const T* __restrict cs) {
  using V = Vec<T>;
  constexpr int L = VecT<T>::lanes;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (kAcc == 0) acc[r][v] = V{};
      if constexpr (kAcc == 1) acc[r][v] = vload(C + r * ldc + v * L);
      if constexpr (kAcc == 2) acc[r][v] = vload(C + r * ldc + v * L) * vload(cs + v * L);
    }
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

template <int R, int NV, int kAcc, typename T>
FASTPEFT_INLINE void mm_rows(const T* A, int64_t sar, int64_t sak, const T* B, int64_t ldb,
                             int64_t cols, T* C, int64_t ldc, int64_t K, const T* cs) {
  constexpr int L = VecT<T>::lanes;
  int64_t c = 0;
  for (; c + NV * L <= cols; c += NV * L)
    mm_tile<R, NV, kAcc>(A, sar, sak, B + c, ldb, C + c, ldc, K, kAcc == 2 ? cs + c : cs);
  const T* cs_c = kAcc == 2 ? cs + c : cs;
  if constexpr (NV > 2)
    if (cols - c == 2 * L) mm_tile<R, 2, kAcc>(A, sar, sak, B + c, ldb, C + c, ldc, K, cs_c);
  if constexpr (NV > 1)
    if (cols - c == L) mm_tile<R, 1, kAcc>(A, sar, sak, B + c, ldb, C + c, ldc, K, cs_c);
}

// The last rows - r < R rows: a tile row of height rows - r, found by recursion on R.
template <int R, int NV, int kAcc, typename T>
FASTPEFT_INLINE void mm_tail(int64_t tail, const T* A, int64_t sar, int64_t sak, const T* B,
                             int64_t ldb, int64_t cols, T* C, int64_t ldc, int64_t K,
                             const T* cs) {
  if constexpr (R > 1) {
    if (tail == R - 1)
      mm_rows<R - 1, NV, kAcc>(A, sar, sak, B, ldb, cols, C, ldc, K, cs);
    else
      mm_tail<R - 1, NV, kAcc>(tail, A, sar, sak, B, ldb, cols, C, ldc, K, cs);
  }
}

template <int R, int NV, int kAcc, typename T>
FASTPEFT_INLINE void mm_blocked(const T* A, int64_t sar, int64_t sak, int64_t rows,
                                const T* B, int64_t ldb, int64_t cols, T* C, int64_t ldc,
                                int64_t K, const T* cs) {
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    mm_rows<R, NV, kAcc>(A + r * sar, sar, sak, B, ldb, cols, C + r * ldc, ldc, K, cs);
  mm_tail<R, NV, kAcc>(rows - r, A + r * sar, sar, sak, B, ldb, cols, C + r * ldc, ldc, K, cs);
}

// kAcc: 0 C = A B, 1 C += A B, 2 C = C diag(cs) + A B (cs per column: the online-softmax
// rescale of an output block, folded into the load of its accumulators).
template <int kAcc, typename T>
FASTPEFT_MULTIVERSION void mm(const T* A, int64_t sar, int64_t sak, int64_t rows, const T* B,
                              int64_t ldb, int64_t cols, T* C, int64_t ldc, int64_t K,
                              const T* cs = nullptr) {
  if (cols % (3 * VecT<T>::lanes) == 0 || cols % (2 * VecT<T>::lanes) != 0)
    mm_blocked<4, 3, kAcc>(A, sar, sak, rows, B, ldb, cols, C, ldc, K, cs);
  else
    mm_blocked<6, 2, kAcc>(A, sar, sak, rows, B, ldb, cols, C, ldc, K, cs);
}

// ---------------------------------------------------------------------------------------
// Softmax pieces on a score block S^T (rows keys, ld, cols queries), log2 domain (the
// scores already carry scale * log2(e), so every exponential is a 2^x).

// Online softmax step (forward): with per-query running max m and sum l,
//   m' = max(m, max_j S[j]),  P[j] = 2^(S[j] - m'),  alpha = 2^(m - m'),
//   l' = alpha l + sum_j P[j];
// S is overwritten with P, and the caller rescales its output block by alpha. A query that
// has seen only masked (-inf) keys keeps m' = -inf and is shifted by 0 instead: P = 0, no NaN.
template <typename T>
FASTPEFT_MULTIVERSION void softmax_online(T* S, int64_t ld, int64_t rows, int64_t cols, T* m,
                                          T* l, T* alpha) {
  using V = Vec<T>;
  constexpr int L = VecT<T>::lanes;
  const V neg_inf = vbroadcast(-std::numeric_limits<T>::infinity()), zero = V{};
  for (int64_t c = 0; c < cols; c += L) {
    V mx = neg_inf;
    for (int64_t j = 0; j < rows; ++j) mx = vmax<T>(mx, vload(S + j * ld + c));
    const V m_old = vload(m + c), m_new = vmax<T>(m_old, mx);
    const V shift = m_new == neg_inf ? zero : m_new;
    const V a = vexp2(m_old - shift);
    V sum = zero;
    for (int64_t j = 0; j < rows; ++j) {
      const V p = vexp2(vload(S + j * ld + c) - shift);
      vstore(S + j * ld + c, p);
      sum += p;
    }
    vstore(l + c, vload(l + c) * a + sum);
    vstore(m + c, m_new);
    vstore(alpha + c, a);
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
FASTPEFT_MULTIVERSION void softmax_grad(const T* P, T* dP, int64_t ld, int64_t rows,
                                        int64_t cols, const T* Dr, T f) {
  constexpr int L = VecT<T>::lanes;
  const Vec<T> fv = vbroadcast(f);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; c += L)
      vstore(dP + j * ld + c,
             fv * vload(P + j * ld + c) * (vload(dP + j * ld + c) - vload(Dr + c)));
}

// O^T = O^T diag(a) + Op^T diag(b) (D rows): the forward's normalisation and gated sum.
template <typename T>
FASTPEFT_MULTIVERSION void combine_outputs(T* O, const T* Op, int64_t ld, int64_t D,
                                           int64_t cols, const T* a, const T* b) {
  constexpr int L = VecT<T>::lanes;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t c = 0; c < cols; c += L)
      vstore(O + d * ld + c,
             vload(O + d * ld + c) * vload(a + c) + vload(Op + d * ld + c) * vload(b + c));
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

// ---------------------------------------------------------------------------------------
// dst[c * ldd + r] = f * src[r * lds + c] for r < rows, c < cols: moving blocks between
// the row-major tensors and the query-minor layout. fp32 goes by 8x8 register transposes
// (unpack / shuffle / lane-swap stages), the edges and fp64 element by element.
FASTPEFT_INLINE void transpose8x8(const float* src, int64_t lds, float f, float* dst, int64_t ldd) {
  f32x8 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = vload(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      r[i + j + 2] = __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  // r[0..7] now hold columns {0,2,1,3} x 128-bit lanes; swap halves across the two groups.
  constexpr int order[4] = {0, 2, 1, 3};
  const f32x8 fv = vbroadcast(f);
  for (int i = 0; i < 4; ++i) {
    const f32x8 lo = r[order[i]], hi = r[order[i] + 4];
    vstore(dst + i * ldd, fv * __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(dst + (i + 4) * ldd, fv * __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

template <typename T>
FASTPEFT_MULTIVERSION void transpose_scaled(const T* src, int64_t lds, int64_t rows,
                                            int64_t cols, T f, T* dst, int64_t ldd) {
  int64_t r0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; r0 + 8 <= rows; r0 += 8) {
      int64_t c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8)
        transpose8x8(src + r0 * lds + c0, lds, f, dst + c0 * ldd + r0, ldd);
      for (; c0 < cols; ++c0)
        for (int64_t r = r0; r < r0 + 8; ++r) dst[c0 * ldd + r] = f * src[r * lds + c0];
    }
  }
  for (; r0 < rows; ++r0)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r0] = f * src[r0 * lds + c];
}

// ---------------------------------------------------------------------------------------
// The problem as the blocked loops see it, and its masking.

// Queries per block (the leading dim of every query-minor block: 2 register tiles of 24)
// and keys per block. Measured at M = N = 1024, D = 64: 24..96 x 48..128 are within 3%.
constexpr int64_t kBlockM = 48;
constexpr int64_t kBlockN = 64;

// Key padding status of each (b, key block): kept, mixed or masked entirely.
enum : uint8_t { kKept = 0, kMixed = 1, kMasked = 2 };

template <typename T>
struct Problem {
  int64_t B, H, Hkv, G, M, N, D, P, PB, Dp, nkb;
  bool causal;
  T scale, scale2;  // scale2 = scale * log2(e), folded into the packed queries
  const T *q, *k, *v, *pk, *pv;
  const bool* keep = nullptr;        // key_padding_mask (B, N), or null
  std::vector<uint8_t> kb_state;     // (B, nkb) when keep
  std::vector<T> g;                  // per head, after tanh

  const T* q_at(const T* base, int64_t b, int64_t h, int64_t i0) const {
    return base + ((b * H + h) * M + i0) * D;
  }
  const T* kv_at(const T* base, int64_t b, int64_t h) const {
    return base + (b * Hkv + h / G) * N * D;
  }
  const T* prefix_at(const T* base, int64_t b, int64_t h) const {
    return base + ((PB == 1 ? 0 : b) * Hkv + h / G) * P * D;
  }
  // Query rows [i0, i0 + rows) see keys [0, end): bottom-right causal j <= i + N - M.
  int64_t kv_end(int64_t i0, int64_t rows) const {
    return causal ? std::clamp<int64_t>(i0 + rows + N - M, 0, N) : N;
  }
  bool skip(int64_t b, int64_t j0) const {
    return keep && kb_state[b * nkb + j0 / kBlockN] == kMasked;
  }
};

// Scores of masked (query, key) pairs in the block S^T (nb keys from j0, queries from i0)
// become -inf. Only diagonal blocks and mixed padding blocks have any.
template <typename T>
void mask_block(const Problem<T>& pr, int64_t b, T* S, int64_t ld, int64_t j0, int64_t nb,
                int64_t i0, int64_t rows) {
  const int64_t off = pr.N - pr.M;
  const bool causal_cut = pr.causal && j0 + nb - 1 > i0 + off;
  const bool pad = pr.keep && pr.kb_state[b * pr.nkb + j0 / kBlockN] == kMixed;
  if (!causal_cut && !pad) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < nb; ++j) {
    T* row = S + j * ld;
    if (pad && !pr.keep[b * pr.N + j0 + j]) {
      std::fill(row, row + rows, ninf);
    } else if (causal_cut) {  // query i sees key j iff i >= j - off
      std::fill(row, row + std::clamp<int64_t>(j0 + j - off - i0, 0, rows), ninf);
    }
  }
}

// S^T (nb, cols) = k[j0 : j0 + nb] qt for a block of sequence keys, masked.
template <typename T>
void seq_scores(const Problem<T>& pr, int64_t b, const T* k, int64_t j0, int64_t nb,
                const T* qt, int64_t i0, int64_t rows, int64_t cols, T* s) {
  mm<0>(k + j0 * pr.D, pr.D, 1, nb, qt, kBlockM, cols, s, kBlockM, pr.D);
  mask_block(pr, b, s, kBlockM, j0, nb, i0, rows);
}

// Pp^T (P, cols) = 2^(Sp - m) with Sp^T = pk qt: the prompt scores in one block, with the
// column max m and sum l (P keys, never masked).
template <typename T>
void prompt_softmax(const Problem<T>& pr, const T* pk, const T* qt, int64_t cols, T* s, T* m,
                    T* l, T* alpha) {
  std::fill(m, m + kBlockM, -std::numeric_limits<T>::infinity());
  std::fill(l, l + kBlockM, T(0));
  mm<0>(pk, pr.D, 1, pr.P, qt, kBlockM, cols, s, kBlockM, pr.D);
  softmax_online(s, kBlockM, pr.P, cols, m, l, alpha);
}

}  // namespace fastpeft::cpu::gated_prefix_attention
