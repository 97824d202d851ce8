// The kernels of int8_lora_linear on CPU: the int8 weight-only base GEMMs, and the rank-R
// products of the decode forward, which fuses the LoRA branch (the op's orchestration is in
// int8_lora_linear.cpp; at larger T the LoRA branch is lora_branch's).
//
// The weight is W = Q ⊙ scale[:, None], Q int8 (N, K), scale float32 (N,). The scale is
// constant along a row of Q, so it factors out of the forward reduction over k and into
// the columns of dy in the backward one:
//   forward   y[t, n]  += scale[n] * Σ_k x[t, k] * Q[n, k]
//   backward  dx[t, k] += Σ_n (dy[t, n] * scale[n]) * Q[n, k]
// Both small-T kernels stream Q once and widen it to floats in registers (exactly), so the
// only memory traffic that grows with the layer is one byte per weight. They are
// register-blocked on 32-byte vectors (simd.h) with fp32 accumulation (fp64 for double)
// and multi-versioned for AVX2/FMA; the callers run them on disjoint ranges from
// at::parallel_for. The forward with fp32 accumulation has its own GEMV kernel in AVX2
// intrinsics (gemv_avx2, up to 4 rows a pass), the tile kernel being its fallback.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/bf16_dx.h"
#include "cpu/lora_branch_kernels.h"
#include "cpu/simd.h"

#ifdef FASTPEFT_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace fastpeft::cpu::int8_lora_linear {

// Widening int8 in registers. GCC 12 lowers __builtin_convertvector from an int8 vector
// to a float vector element by element (scalar movsx + cvtsi2ss), so the kernels widen
// with shifts and masks instead: a group of 4 * lanes bytes of Q is loaded as `lanes`
// 32-bit lanes, and part j of the group moves byte j of every lane to the top byte with
// the rest cleared, (lane << (24 - 8j)) & 0xFF000000: as int32 that is exactly
// byte * 2^24, which converts to acc_t exactly (8 significant bits). With AVX2 a part is
// vpslld + vpand + vcvtdq2ps (only the shifts compete with the FMAs for ports; a sign
// extending shift right would add one more). The factor 2^24 is taken out of the other
// operand instead (x in the forward, dy in the backward, times kUnit = 2^-24: exact, a
// power of two). Part j holds the group's columns j, 4 + j, 8 + j, ...: the kernels work
// in this lane-interleaved column order within a group (lane_order) and map back at the edges.
constexpr double kUnit = 1.0 / 16777216.0;

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
constexpr int64_t kGroupBytes = 4 * VecT<acc_t>::lanes;

template <typename acc_t>
FASTPEFT_INLINE typename QGroup<acc_t>::U load_group(const int8_t* p) {
  typename QGroup<acc_t>::U u;
  std::memcpy(&u, p, sizeof(u));
  return u;
}

// Part j (0..3) of a group, times 2^24. j is a constant wherever the kernels unroll, so
// the shift takes an immediate count (none for j = 3).
template <typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE V group_part(typename QGroup<acc_t>::U u, int j) {
  using I = typename QGroup<acc_t>::I;
  if (j == 0) return __builtin_convertvector((I)(u << 24), V);  // no mask needed
  return __builtin_convertvector((I)((u << (24 - 8 * j)) & 0xFF000000u), V);
}

// Position in the lane-interleaved order of column c of a group: part c % 4, lane c / 4.
template <typename acc_t>
constexpr int64_t lane_order(int64_t c) {
  return (c % 4) * VecT<acc_t>::lanes + c / 4;
}

// ---------------------------------------------------------------------------------------
// Forward, small T: scale[n] * x[t, :] . Q[n, :] for all T rows and the rows n of
// [n_begin, n_end). Rows of Q go in groups of kGroupRows; for each, K goes in chunks of
// forward_chunk(T) columns and every (t, n) pair of the group takes the chunk's dot product
// into a vector accumulator kept in `acc` (T, kGroupRows vectors) between chunks, so the
// chunk of x (16 KiB) and of Q (kGroupRows x chunk bytes) stay in L1 while all pairs use
// them, and Q is read from memory once. x comes lane-interleaved (permute_rows) to match the
// widened parts of Q. The register tile is TR rows of x by NR rows of Q: TR x vectors,
// one widened Q vector and TR * NR <= 9 accumulators. A widened vector serves TR rows of
// x (4 at most: 8 rows as memory operands measured slower, load-bound); with one row of
// x, 8 rows of Q give the independent FMA chains that hide the FMA latency.
constexpr int64_t kGroupRows = 8;

// Columns per chunk: x's chunk (T rows) fills 16 KiB of L1, at least 256 columns (fewer
// would spend more on the accumulators' round trips than they save).
template <typename acc_t>
inline int64_t forward_chunk(int64_t T) {
  const int64_t bytes_per_col = static_cast<int64_t>(sizeof(acc_t)) * std::max<int64_t>(T, 1);
  const int64_t cols = int64_t{16384} / bytes_per_col;
  return std::max<int64_t>(256, cols / kGroupBytes<acc_t> * kGroupBytes<acc_t>);
}

template <int TR, int NR, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void forward_tile(const acc_t* __restrict x, int64_t K,
                                  const int8_t* __restrict q, int64_t kc,
                                  acc_t* __restrict acc /* [TR][kGroupRows] vectors */) {
  constexpr int L = VecT<acc_t>::lanes;
  constexpr int64_t G = kGroupBytes<acc_t>;
  V a[TR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) a[i][j] = vload(acc + (i * kGroupRows + j) * L);
  for (int64_t k = 0; k < kc; k += G) {
#pragma GCC unroll 4
    for (int part = 0; part < 4; ++part) {
      V xv[TR];
#pragma GCC unroll 8
      for (int i = 0; i < TR; ++i) xv[i] = vload(x + i * K + k + part * L);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        // the group is reloaded per part (an L1 hit) rather than held in NR registers
        const V w = group_part<acc_t>(load_group<acc_t>(q + j * K + k), part);
#pragma GCC unroll 8
        for (int i = 0; i < TR; ++i) a[i][j] += xv[i] * w;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) vstore(acc + (i * kGroupRows + j) * L, a[i][j]);
}

// TR rows of x against the ng rows of the group: NR rows at a time, then one at a time.
template <int TR, int NR, typename acc_t>
FASTPEFT_INLINE void forward_sweep(const acc_t* __restrict x, int64_t K,
                                   const int8_t* __restrict q, int64_t ng, int64_t kc,
                                   acc_t* __restrict acc) {
  constexpr int L = VecT<acc_t>::lanes;
  int64_t j = 0;
  for (; j + NR <= ng; j += NR) forward_tile<TR, NR>(x, K, q + j * K, kc, acc + j * L);
  for (; j < ng; ++j) forward_tile<TR, 1>(x, K, q + j * K, kc, acc + j * L);
}

// xp (T, K) = x in acc_t with each whole group of columns lane-interleaved and times
// 2^-24 (xp[t, g + lane_order(c)] = x[t, g + c] * kUnit), the tail columns as they are.
template <typename scalar_t, typename acc_t>
void permute_rows(const scalar_t* __restrict x, int64_t T, int64_t K, acc_t* __restrict xp) {
  constexpr int64_t G = kGroupBytes<acc_t>;
  const int64_t Kg = K / G * G;
  const acc_t unit = static_cast<acc_t>(kUnit);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < Kg; g += G)
      for (int64_t c = 0; c < G; ++c)
        xp[t * K + g + lane_order<acc_t>(c)] = static_cast<acc_t>(x[t * K + g + c]) * unit;
    for (int64_t k = Kg; k < K; ++k) xp[t * K + k] = static_cast<acc_t>(x[t * K + k]);
  }
}

// ---------------------------------------------------------------------------------------
// The decode forward's rank-R products: lora_branch's few-rows helpers (lora_down_kernel,
// LoraUp, lora_terms), the up products fused into the epilogue below.
using lora_branch::lora_down_kernel;
using lora_branch::lora_terms;
using lora_branch::LoraUp;

// xp (T, K) from permute_rows; y (T, N) in scalar_t, written: y[t, n] = bias[n] +
// sxa[t, :] . B[n, :] + scale[n] * x[t, :] . Q[n, :], rounded once. acc is per-thread
// scratch of T * kGroupRows vectors + T * kGroupRows + R. Columns past the last whole group
// are a scalar tail.
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void decode_forward_kernel(
    const acc_t* __restrict xp, const int8_t* __restrict q, const float* __restrict scale,
    LoraUp<scalar_t, acc_t> up, scalar_t* __restrict y, int64_t T, int64_t K, int64_t N,
    int64_t n_begin, int64_t n_end, acc_t* __restrict acc) {
  constexpr int L = VecT<acc_t>::lanes;
  constexpr int64_t G = kGroupBytes<acc_t>;
  const int64_t Kg = K / G * G, chunk = forward_chunk<acc_t>(T);
  acc_t* lo = acc + T * kGroupRows * L;  // (T, kGroupRows)  the group's bias + LoRA terms
  acc_t* brow = lo + T * kGroupRows;     // (R)           a row of B
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kGroupRows) {
    const int64_t ng = std::min(kGroupRows, n_end - n0);
    std::fill(acc, acc + T * kGroupRows * L, acc_t(0));
    const int8_t* qg = q + n0 * K;
    for (int64_t k0 = 0; k0 < Kg; k0 += chunk) {
      const int64_t kc = std::min(chunk, Kg - k0);
      for (int64_t t0 = 0; t0 < T;) {
        const acc_t* xt = xp + t0 * K + k0;
        acc_t* at = acc + t0 * kGroupRows * L;
        const int64_t rows = T - t0;
        if (rows >= 4) {
          forward_sweep<4, 2>(xt, K, qg + k0, ng, kc, at);
          t0 += 4;
          continue;
        }
        switch (rows) {  // the rest in one tile
          case 1: forward_sweep<1, 8>(xt, K, qg + k0, ng, kc, at); break;
          case 2: forward_sweep<2, 4>(xt, K, qg + k0, ng, kc, at); break;
          default: forward_sweep<3, 3>(xt, K, qg + k0, ng, kc, at); break;
        }
        t0 = T;
      }
    }
    lora_terms(up, T, n0, ng, brow, lo, kGroupRows);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < ng; ++j) {
        const int64_t n = n0 + j;
        acc_t dot = hsum<acc_t>(vload(acc + (t * kGroupRows + j) * L));  // 2^24 x 2^-24
        for (int64_t k = Kg; k < K; ++k) dot += xp[t * K + k] * acc_t(q[n * K + k]);
        const acc_t base = static_cast<acc_t>(scale[n]) * dot;
        y[t * N + n] = static_cast<scalar_t>(lo[t * kGroupRows + j] + base);
      }
  }
}

// ---------------------------------------------------------------------------------------
// Forward, T <= kGemvPassRows rows with fp32 accumulation, on AVX2 + FMA (a decode step
// of generation, or of a few sequences; the caller makes passes of up to this many rows
// for more): the GEMV dots[t][i] = x[t, :] . Q[n_begin + i, :]
// over the rows [n_begin, n_end), x fp32 in natural order. At T = 1 a widened vector of Q
// serves a single FMA, so widening is most of the work, and it has to overlap the stream
// of Q from memory. Two changes over the tile kernel above:
// * Widening: vpmovsxbd from a 64-bit load + vcvtdq2ps, 2 instructions per 8 weights,
//   against vpslld / vpand + vcvtdq2ps on a reloaded group, which makes it the faster of
//   the two with Q in cache. Intrinsics, because GCC 12 scalarises
//   __builtin_convertvector from int8 vectors; chosen at run time like the AVX2 Philox
//   path.
// * Streaming: with Q from DRAM and adjacent rows, both schemes read Q well below the rate
//   of an fp32 GEMV over the same bytes: at ~4 instructions per 8 bytes the out-of-order
//   window reaches only a few cache lines ahead, so the kernel waits on the hardware
//   prefetchers, which restart at every 4 KiB page (a row of Q at K = 4096). So the
//   kStreams rows in flight come from kStreams far-apart blocks of the range, each walked
//   row after row (a long sequential stream), and each stream is prefetched
//   kPrefetchBytes ahead, across rows and pages, which brings the rate close to the fp32
//   GEMV's (1 - 2 KiB ahead being the sweet spot; `fastpeft-bench --ops int8_lora_linear`
//   measures the decode shapes).
// With T > 1 rows of x a widened vector serves T FMAs, so the same stream carries T times
// the arithmetic; up to 4 rows the kernel stays near the stream's rate, where the tile
// kernel was bound by its adjacent-row reads.
#ifdef FASTPEFT_HAVE_AVX2_PATH
constexpr int kStreams = 4;
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kGemvPassRows = 4;

inline bool have_gemv_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// 8 bytes of Q -> 8 floats, exactly.
__attribute__((target("avx2"))) FASTPEFT_INLINE __m256 widen8_avx2(const int8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// dot[t][j] = x[t, :] . row j for the TR rows of x (row stride K) and the NR rows of Q (K
// bytes each). TR * NR * NA accumulators, NA = 2 at TR = 1, so that there too 4 rows of Q
// give the 8 independent FMA chains that hide the FMA latency. TR * NR <= 12 leaves the 16
// ymm registers room for a widened vector and x (at TR = 4 some rows of x are read from
// L1 as the FMAs' memory operands).
template <int TR, int NR>
__attribute__((target("avx2,fma"))) FASTPEFT_INLINE void gemv_tile_avx2(
    const float* __restrict x, const int8_t* const (&row)[NR], int64_t K,
    float (&dot)[TR][NR]) {
  static_assert(TR * NR <= 12, "accumulators must fit the registers");
  constexpr int NA = TR == 1 ? 2 : 1;
  const int64_t K64 = K / 64 * 64, K8 = K / 8 * 8;
  __m256 a[TR][NR][NA];
  for (int t = 0; t < TR; ++t)
    for (int j = 0; j < NR; ++j)
      for (int h = 0; h < NA; ++h) a[t][j][h] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k < K64; k += 64) {  // a cache line of each row per step
    for (int j = 0; j < NR; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(row[j] + k + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      __m256 xv[TR];
#pragma GCC unroll 4
      for (int t = 0; t < TR; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k + 8 * p);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const __m256 w = widen8_avx2(row[j] + k + 8 * p);
#pragma GCC unroll 4
        for (int t = 0; t < TR; ++t) a[t][j][p % NA] = _mm256_fmadd_ps(xv[t], w, a[t][j][p % NA]);
      }
    }
  }
  for (; k < K8; k += 8) {
    for (int j = 0; j < NR; ++j) {
      const __m256 w = widen8_avx2(row[j] + k);
      for (int t = 0; t < TR; ++t)
        a[t][j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * K + k), w, a[t][j][0]);
    }
  }
  for (int t = 0; t < TR; ++t)
    for (int j = 0; j < NR; ++j) {
      __m256 v = a[t][j][0];
      for (int h = 1; h < NA; ++h) v = _mm256_add_ps(v, a[t][j][h]);
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, v);
      float sum = 0;
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      for (int64_t c = K8; c < K; ++c) sum += x[t * K + c] * static_cast<float>(row[j][c]);
      dot[t][j] = sum;
    }
}

// The TR-row GEMV over [n_begin, n_end): dots[t * ld + n - n_begin]. Stream s takes the
// rows n_begin + s * M + [0, M), M = (n_end - n_begin) / S; the few rows past S * M go
// one at a time. S = kStreams, 3 at TR = 4 (the accumulators' limit).
template <int TR>
__attribute__((target("avx2,fma"))) void gemv_avx2_rows(const float* __restrict x,
                                                        const int8_t* __restrict q, int64_t K,
                                                        int64_t n_begin, int64_t n_end,
                                                        float* __restrict dots, int64_t ld) {
  constexpr int S = TR * kStreams <= 12 ? kStreams : 12 / TR;
  const int64_t M = (n_end - n_begin) / S;
  for (int64_t i = 0; i < M; ++i) {
    const int8_t* row[S];
    float dot[TR][S];
    for (int s = 0; s < S; ++s) row[s] = q + (n_begin + s * M + i) * K;
    gemv_tile_avx2<TR, S>(x, row, K, dot);
    for (int t = 0; t < TR; ++t)
      for (int s = 0; s < S; ++s) dots[t * ld + s * M + i] = dot[t][s];
  }
  for (int64_t n = n_begin + S * M; n < n_end; ++n) {
    const int8_t* row[1] = {q + n * K};
    float dot[TR][1];
    gemv_tile_avx2<TR, 1>(x, row, K, dot);
    for (int t = 0; t < TR; ++t) dots[t * ld + n - n_begin] = dot[t][0];
  }
}

// T (1 .. kGemvPassRows) rows of x: the GEMV above, with T a compile-time constant.
inline void gemv_avx2(const float* __restrict x, int64_t T, const int8_t* __restrict q,
                      int64_t K, int64_t n_begin, int64_t n_end, float* __restrict dots,
                      int64_t ld) {
  switch (T) {
    case 1: return gemv_avx2_rows<1>(x, q, K, n_begin, n_end, dots, ld);
    case 2: return gemv_avx2_rows<2>(x, q, K, n_begin, n_end, dots, ld);
    case 3: return gemv_avx2_rows<3>(x, q, K, n_begin, n_end, dots, ld);
    default: return gemv_avx2_rows<4>(x, q, K, n_begin, n_end, dots, ld);
  }
}

#ifdef FASTPEFT_BF16_DX
// ---------------------------------------------------------------------------------------
// Forward GEMV for bf16 x on a CPU with AVX512_BF16, up to kGemvBf16PassRows rows a pass:
// the same dots[t][i] = x[t, :] . Q[n_begin + i, :] as gemv_avx2, and the same streams of
// rows with their prefetch. Each 32 bytes of Q are widened to fp32 (vpmovsxbd +
// vcvtdq2ps) and packed into 32 bf16 in column order (vcvtne2ps2bf16, exact: an int8 has 8
// significant bits), which meet x's 32 bf16 as they lie in memory: vdpbf16ps adds the
// exact products of a pair of columns into a fp32 lane. So a widened vector serves twice
// the columns of an fp32 FMA, and x needs no conversion. (vdpbf16ps takes values of x
// below 2^-126 as 0, which the unfused layer's bf16 GEMM may not.)
constexpr int64_t kGemvBf16PassRows = 8;

// 16 bytes of Q -> 16 floats, exactly. (The masked forms with every lane set: GCC 12
// warns of the unmasked ones' undefined pass-through operand where they are inlined.)
__attribute__((target("avx512f"), always_inline)) inline __m512 widen16_ps(__m128i bytes) {
  return _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepi8_epi32(0xFFFF, bytes));
}

// Q[k .. k + n) as bf16 in order, zeros past n (n <= 32).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline __m512bh
widen32_bf16(const int8_t* p, int n) {
  __m128i lo, hi;
  if (n >= 32) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  } else {
    lo = _mm_maskz_loadu_epi8(static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u), p);
    hi = _mm_maskz_loadu_epi8(static_cast<__mmask16>(n > 16 ? (1u << (n - 16)) - 1u : 0u),
                              p + 16);
  }
  return _mm512_cvtne2ps_pbh(widen16_ps(hi), widen16_ps(lo));
}

// x[t, k .. k + n) as 32 bf16, zeros past n (n <= 32).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline __m512bh
load32_bf16(const uint16_t* p, int n) {
  if (n >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1u), p);
}

// The sum of v's 16 lanes, in a fixed order. (Through memory: GCC 12 warns of the
// undefined operands of _mm512_reduce_add_ps and of the lane shuffles where they are
// inlined.)
__attribute__((target("avx512f"), always_inline)) inline float sum16(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float sum = 0;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}

// dot[t][j] = x[t, :] . row j for the TR rows of x (bf16 bits, row stride ldx) and the NR
// rows of Q: TR * NR accumulators (at most 16), each row's NR widened vectors in registers
// for the TR rows of x, which the dots read from cache (8 rows of K = 4096 are 64 KiB: L2;
// passes of 16 rows, 128 KiB of x, were slower: see kGemvBf16MinRows). An accumulator sees
// the same sequence of operations whatever NR is, so a row's dots do not depend on its
// stream.
template <int TR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void gemv_tile_bf16(
    const uint16_t* __restrict x, int64_t ldx, const int8_t* const (&row)[NR], int64_t K,
    float (&dot)[TR][NR]) {
  static_assert(TR * NR <= 16, "accumulators must fit the registers");
  __m512 a[TR][NR];
  for (int t = 0; t < TR; ++t)
    for (int j = 0; j < NR; ++j) a[t][j] = _mm512_setzero_ps();
  const int64_t K64 = K / 64 * 64;
  int64_t k = 0;
  for (; k < K64; k += 64) {  // a cache line of each row per step
    for (int j = 0; j < NR; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(row[j] + k + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int h = 0; h < 64; h += 32) {
      __m512bh w[NR];
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) w[j] = widen32_bf16(row[j] + k + h, 32);
#pragma GCC unroll 16
      for (int t = 0; t < TR; ++t) {
        const __m512bh xv = load32_bf16(x + t * ldx + k + h, 32);
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) a[t][j] = _mm512_dpbf16_ps(a[t][j], w[j], xv);
      }
    }
  }
  for (; k < K; k += 32) {
    const int n = static_cast<int>(std::min<int64_t>(32, K - k));
    __m512bh w[NR];
    for (int j = 0; j < NR; ++j) w[j] = widen32_bf16(row[j] + k, n);
    for (int t = 0; t < TR; ++t) {
      const __m512bh xv = load32_bf16(x + t * ldx + k, n);
      for (int j = 0; j < NR; ++j) a[t][j] = _mm512_dpbf16_ps(a[t][j], w[j], xv);
    }
  }
  for (int t = 0; t < TR; ++t)
    for (int j = 0; j < NR; ++j) dot[t][j] = sum16(a[t][j]);
}

// The TR-row GEMV over [n_begin, n_end), as gemv_avx2_rows: S streams of rows, 4 up to 4
// rows of x, 2 up to 8 (the accumulators' limit).
template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void gemv_bf16_rows(
    const uint16_t* __restrict x, int64_t ldx, const int8_t* __restrict q, int64_t K,
    int64_t n_begin, int64_t n_end, float* __restrict dots, int64_t ld) {
  static_assert(TR <= 8, "at most 8 rows of x a pass");
  constexpr int S = TR <= 4 ? 4 : 2;
  const int64_t M = (n_end - n_begin) / S;
  for (int64_t i = 0; i < M; ++i) {
    const int8_t* row[S];
    float dot[TR][S];
    for (int s = 0; s < S; ++s) row[s] = q + (n_begin + s * M + i) * K;
    gemv_tile_bf16<TR, S>(x, ldx, row, K, dot);
    for (int t = 0; t < TR; ++t)
      for (int s = 0; s < S; ++s) dots[t * ld + s * M + i] = dot[t][s];
  }
  for (int64_t n = n_begin + S * M; n < n_end; ++n) {
    const int8_t* row[1] = {q + n * K};
    float dot[TR][1];
    gemv_tile_bf16<TR, 1>(x, ldx, row, K, dot);
    for (int t = 0; t < TR; ++t) dots[t * ld + n - n_begin] = dot[t][0];
  }
}

// T (1 .. kGemvBf16PassRows) rows of x: the GEMV above, with T a compile-time constant.
inline void gemv_bf16(const uint16_t* x, int64_t ldx, int64_t T, const int8_t* q, int64_t K,
                      int64_t n_begin, int64_t n_end, float* dots, int64_t ld) {
  with_rows<kGemvBf16PassRows>(static_cast<int>(T), [&](auto tr) {
    gemv_bf16_rows<decltype(tr)::value>(x, ldx, q, K, n_begin, n_end, dots, ld);
  });
}
#endif

// Its epilogue: y[t, n] = bias[n] + sxa[t, :] . B[n, :] + scale[n] * dots[t * ld + n -
// n_begin] for the T rows and the rows [n_begin, n_end) of y (row stride N), rounded
// once; scratch holds T * kGroupRows + R floats.
template <typename scalar_t>
FASTPEFT_MULTIVERSION void gemv_epilogue(const float* __restrict dots, int64_t ld,
                                         const float* __restrict scale,
                                         LoraUp<scalar_t, float> up, scalar_t* __restrict y,
                                         int64_t T, int64_t N, int64_t n_begin, int64_t n_end,
                                         float* __restrict scratch) {
  float* lo = scratch;                  // (T, kGroupRows)
  float* brow = scratch + T * kGroupRows;  // (R)
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kGroupRows) {
    const int64_t ng = std::min(kGroupRows, n_end - n0);
    lora_terms(up, T, n0, ng, brow, lo, kGroupRows);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < ng; ++j)
        y[t * N + n0 + j] = static_cast<scalar_t>(
            lo[t * kGroupRows + j] + scale[n0 + j] * dots[t * ld + n0 + j - n_begin]);
  }
}
#endif

// ---------------------------------------------------------------------------------------
// Backward, small T: dx[t, k] += Σ_n dyT[n, t] * Q[n, k] for all T rows and the column
// blocks [block_begin, block_end) of kDxCols columns, with dyT = (dy ⊙ scale)^T (N, T)
// prepared by the caller (times kUnit, see group_part), so that the TR values a step
// over n broadcasts share a cache line. A thread owns its columns of dx (no reduction
// across threads) and takes them kDxSpan blocks at a time, their sums waiting in `acc`
// (T, kDxSpan * kDxCols, lane-interleaved per group). Rows of Q are K bytes apart (a page
// each for K = 4096), so a column strip of many rows would miss the TLB and defeat the
// hardware prefetchers at every row: instead N goes in chunks of kDxRowChunk rows, whose
// Q segments (kDxRowChunk x kDxSpan * kDxCols bytes: few pages, in L2) all the blocks of
// the span sweep in turn, each row read front to back, and the first sweep of a block
// prefetches the block after next. The register tile is TR rows by NV widened vectors
// (TR * NV <= 12 accumulators); a widened vector serves TR rows, up to 12.
constexpr int64_t kDxCols = 64, kDxSpan = 16, kDxRowChunk = 32;

// Vectors P0 .. P0 + NV - 1 of the widened columns from q (group v / 4, part v % 4), all
// compile-time, so a group used by several vectors is loaded once per row.
template <int TR, int NV, int P0, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void dx_tile(const acc_t* __restrict dyT, int64_t T,
                             const int8_t* __restrict q, int64_t K, int64_t nc,
                             int64_t prefetch, acc_t* __restrict acc, int64_t lda) {
  constexpr int L = VecT<acc_t>::lanes;
  constexpr int64_t G = kGroupBytes<acc_t>;
  V a[TR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[i][v] = vload(acc + i * lda + (P0 + v) * L);
  for (int64_t n = 0; n < nc; ++n) {
    if (prefetch) __builtin_prefetch(q + n * K + prefetch);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const auto u = load_group<acc_t>(q + n * K + (P0 + v) / 4 * G);
      const V w = group_part<acc_t>(u, (P0 + v) % 4);
      // broadcasts re-read per vector (L1 hits): holding TR of them would spill
#pragma GCC unroll 12
      for (int i = 0; i < TR; ++i) a[i][v] += vbroadcast(dyT[n * T + i]) * w;
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(acc + i * lda + (P0 + v) * L, a[i][v]);
}

// TR rows against the ngr groups of a block: NV / 4 whole groups at a time when NV >= 4
// (then one at a time), else NV parts of a group at a time. Only the first tile prefetches.
template <int TR, int NV, typename acc_t>
FASTPEFT_INLINE void dx_sweep(const acc_t* __restrict dyT, int64_t T,
                              const int8_t* __restrict q, int64_t K, int64_t nc, int64_t ngr,
                              int64_t prefetch, acc_t* __restrict acc, int64_t lda) {
  constexpr int64_t G = kGroupBytes<acc_t>;
  if constexpr (NV >= 4) {
    constexpr int NG = NV / 4;
    int64_t g = 0;
    for (; g + NG <= ngr; g += NG, prefetch = 0)
      dx_tile<TR, NV, 0>(dyT, T, q + g * G, K, nc, prefetch, acc + g * G, lda);
    for (; g < ngr; ++g, prefetch = 0)
      dx_tile<TR, 4, 0>(dyT, T, q + g * G, K, nc, prefetch, acc + g * G, lda);
  } else {
    for (int64_t g = 0; g < ngr; ++g, prefetch = 0) {
      const int8_t* qg = q + g * G;
      acc_t* ag = acc + g * G;
      dx_tile<TR, NV, 0>(dyT, T, qg, K, nc, prefetch, ag, lda);
      if constexpr (NV == 1) {
        dx_tile<TR, 1, 1>(dyT, T, qg, K, nc, 0, ag, lda);
        dx_tile<TR, 1, 2>(dyT, T, qg, K, nc, 0, ag, lda);
        dx_tile<TR, 1, 3>(dyT, T, qg, K, nc, 0, ag, lda);
      } else {
        static_assert(NV == 2, "a tile covers 1, 2 or a multiple of 4 parts");
        dx_tile<TR, 2, 2>(dyT, T, qg, K, nc, 0, ag, lda);
      }
    }
  }
}

// Column blocks of dx_decode_kernel over the whole groups of K (at least one block: it
// also does the scalar tail of the columns past the last whole group).
template <typename acc_t>
inline int64_t dx_blocks(int64_t K) {
  return std::max<int64_t>(1, div_up(K / kGroupBytes<acc_t> * kGroupBytes<acc_t>, kDxCols));
}

// dyT (N, T) in acc_t, times kUnit; dx (T, K) in scalar_t, accumulated; acc is
// per-thread scratch of T * kDxSpan * kDxCols acc_t.
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void dx_decode_kernel(
    const acc_t* __restrict dyT, const int8_t* __restrict q, scalar_t* __restrict dx,
    int64_t T, int64_t K, int64_t N, int64_t block_begin, int64_t block_end,
    acc_t* __restrict acc) {
  constexpr int64_t G = kGroupBytes<acc_t>, lda = kDxSpan * kDxCols;
  const int64_t Kg = K / G * G;
  for (int64_t s0 = block_begin; s0 < block_end; s0 += kDxSpan) {
    const int64_t s1 = std::min(block_end, s0 + kDxSpan);
    std::fill(acc, acc + T * lda, acc_t(0));
    for (int64_t n0 = 0; n0 < N; n0 += kDxRowChunk) {
      const int64_t nc = std::min(kDxRowChunk, N - n0);
      const acc_t* d = dyT + n0 * T;
      for (int64_t block = s0; block < s1; ++block) {
        const int64_t k0 = block * kDxCols, kb = std::min(kDxCols, Kg - k0), ngr = kb / G;
        const int64_t prefetch = block + 2 < s1 ? 2 * kDxCols : 0;
        const int8_t* qs = q + n0 * K + k0;
        acc_t* ab = acc + (block - s0) * kDxCols;
        for (int64_t t0 = 0; t0 < T;) {
          const int64_t rows = T - t0, pf = t0 == 0 ? prefetch : 0;
          const acc_t* dt = d + t0;
          acc_t* at = ab + t0 * lda;
          // row tiles: a widened vector serves TR rows; TR * NV <= 12 accumulators
          if (rows >= 12) {
            dx_sweep<12, 1>(dt, T, qs, K, nc, ngr, pf, at, lda);
            t0 += 12;
          } else if (rows >= 4) {
            dx_sweep<4, 2>(dt, T, qs, K, nc, ngr, pf, at, lda);
            t0 += 4;
          } else if (rows == 3) {
            dx_sweep<3, 4>(dt, T, qs, K, nc, ngr, pf, at, lda);
            t0 += 3;
          } else if (rows == 2) {
            dx_sweep<2, 4>(dt, T, qs, K, nc, ngr, pf, at, lda);
            t0 += 2;
          } else {
            dx_sweep<1, 8>(dt, T, qs, K, nc, ngr, pf, at, lda);
            t0 += 1;
          }
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t block = s0; block < s1; ++block) {
        const int64_t k0 = block * kDxCols, kb = std::min(kDxCols, Kg - k0);
        const acc_t* sums = acc + t * lda + (block - s0) * kDxCols;
        scalar_t* row = dx + t * K + k0;
        for (int64_t c = 0; c < kb; ++c) {
          const acc_t v = sums[c / G * G + lane_order<acc_t>(c % G)];
          row[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) + v);
        }
      }
  }
  if (block_end == dx_blocks<acc_t>(K))
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = Kg; k < K; ++k) {
        acc_t sum = 0;
        for (int64_t n = 0; n < N; ++n) sum += dyT[n * T + t] * acc_t(q[n * K + k]);
        sum /= static_cast<acc_t>(kUnit);  // exact
        dx[t * K + k] = static_cast<scalar_t>(static_cast<acc_t>(dx[t * K + k]) + sum);
      }
}

// ---------------------------------------------------------------------------------------
// Large T: a tile of the dequantised weight, out (rows, cols) = Q[tile] * scale[rows],
// for an ATen GEMM. The product is that of reference.dequantize_int8: in float32 (float64
// for double), then rounded once to out_t (fp32, or bf16 / fp16 for the 16-bit GEMMs). A
// plain loop: GCC's loop vectoriser widens int8 well (vpmovsxbw / vpmovsxwd), unlike
// __builtin_convertvector.
template <typename out_t>
FASTPEFT_MULTIVERSION void dequant_tile(const int8_t* __restrict q, int64_t K,
                                        const float* __restrict scale, int64_t rows,
                                        int64_t cols, out_t* __restrict out) {
  using work_t = std::conditional_t<std::is_same_v<out_t, double>, double, float>;
  for (int64_t r = 0; r < rows; ++r) {
    const work_t s = static_cast<work_t>(scale[r]);
    const int8_t* qr = q + r * K;
    out_t* o = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<out_t>(static_cast<work_t>(qr[c]) * s);
  }
}

}  // namespace fastpeft::cpu::int8_lora_linear
