// Philox4x32-10 dropout masks, bit-identical to fastpeft/reference.py (see its module
// docstring), which gives the same words as Triton's tl.random.philox:
//
//   element (t, k) of x viewed as (T, K):  G = ceil(K / 4),  c = t * G + k / 4  (uint64)
//   words = Philox4x32-10(counter = (c_lo, c_hi, 0, 0), key = (seed_lo, seed_hi))
//   keep(t, k) = words[k % 4] >= floor(p * 2^32);  kept values are scaled by 1 / (1 - p)
//
// One Philox call yields the four neighbouring elements 4g .. 4g+3 of a row, so the
// kernels always draw whole groups: a row segment starting at a multiple of 4.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

#ifdef FASTPEFT_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

FASTPEFT_AVX512_WARNINGS_OFF
namespace fastpeft::cpu {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// floor(p * 2^32) clamped to uint32, as reference.dropout_threshold.
inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

FASTPEFT_INLINE void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{kPhiloxM0} * c0, p1 = uint64_t{kPhiloxM1} * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// A tile of rows: for row r < nrows and group i < ngroups, with c = c0 + r * row_stride + i,
// out[r * out_stride + 4i + j] = on if word j of Philox(c) >= threshold, else 0.
inline void dropout_keep_rows_scalar(uint64_t seed, uint64_t c0, int64_t row_stride,
                                     int64_t nrows, int64_t ngroups, uint32_t threshold,
                                     float on, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t i = 0; i < ngroups; ++i) {
      uint32_t w[4];
      philox4x32_10(c0 + static_cast<uint64_t>(r * row_stride + i), seed, w);
      for (int j = 0; j < 4; ++j) out[r * out_stride + 4 * i + j] = w[j] >= threshold ? on : 0.0f;
    }
  }
}

#ifdef FASTPEFT_HAVE_AVX2_PATH
// Four counters per __m256i, one per 64-bit lane: _mm256_mul_epu32 multiplies the low 32
// bits of each lane into a full 64-bit product, so mulhi is a shift and mullo is the
// product itself. Only the low 32 bits of each lane are meaningful (the high halves
// carry junk that mul_epu32 ignores and the final compare drops); this avoids the
// even/odd shuffling a 32-bit-lane layout needs. The ten rounds are one serial chain
// (~6 cycles each), so NB independent batches are interleaved to fill the pipes.
template <int NB>
__attribute__((target("avx2"))) FASTPEFT_INLINE void philox_keep_avx2(
    const uint64_t* c0, const __m256i* key0, const __m256i* key1, __m256i thr, __m256 onv,
    float* const* out) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  __m256i x0[NB], x1[NB], x2[NB], x3[NB];
  for (int b = 0; b < NB; ++b) {
    x0[b] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(c0[b])),
                             _mm256_set_epi64x(3, 2, 1, 0));
    x1[b] = _mm256_srli_epi64(x0[b], 32);
    x2[b] = x3[b] = _mm256_setzero_si256();
  }
  for (int round = 0; round < 10; ++round) {
    for (int b = 0; b < NB; ++b) {
      const __m256i p0 = _mm256_mul_epu32(x0[b], m0), p1 = _mm256_mul_epu32(x2[b], m1);
      x0[b] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x1[b]), key0[round]);
      x2[b] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x3[b]), key1[round]);
      x1[b] = p1;
      x3[b] = p0;
    }
  }
  for (int b = 0; b < NB; ++b) {
    // lane l of (x0 | x1 << 32) holds words 0, 1 of group l; interleave to group order.
    const __m256i w01 = _mm256_blend_epi32(x0[b], _mm256_slli_epi64(x1[b], 32), 0xAA);
    const __m256i w23 = _mm256_blend_epi32(x2[b], _mm256_slli_epi64(x3[b], 32), 0xAA);
    const __m256i g02 = _mm256_unpacklo_epi64(w01, w23), g13 = _mm256_unpackhi_epi64(w01, w23);
    const __m256i g01 = _mm256_permute2x128_si256(g02, g13, 0x20);
    const __m256i g23 = _mm256_permute2x128_si256(g02, g13, 0x31);
    // unsigned w >= thr  <=>  !(thr > w) as signed once both sign bits are flipped
    const __m256i drop01 = _mm256_cmpgt_epi32(thr, _mm256_xor_si256(g01, sign));
    const __m256i drop23 = _mm256_cmpgt_epi32(thr, _mm256_xor_si256(g23, sign));
    _mm256_storeu_ps(out[b], _mm256_andnot_ps(_mm256_castsi256_ps(drop01), onv));
    _mm256_storeu_ps(out[b] + 8, _mm256_andnot_ps(_mm256_castsi256_ps(drop23), onv));
  }
}

// Batches of 4 groups are enumerated over the whole tile (rows x groups), so short row
// segments still fill NB-wide steps and the key schedule is set up once per tile.
__attribute__((target("avx2"))) inline void dropout_keep_rows_avx2(
    uint64_t seed, uint64_t c0, int64_t row_stride, int64_t nrows, int64_t ngroups,
    uint32_t threshold, float on, float* out, int64_t out_stride) {
  __m256i key0[10], key1[10];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    key0[round] = _mm256_set1_epi64x(k0);
    key1[round] = _mm256_set1_epi64x(k1);
  }
  const __m256i thr = _mm256_set1_epi32(static_cast<int32_t>(threshold ^ 0x80000000u));
  const __m256 onv = _mm256_set1_ps(on);
  const int64_t per_row = ngroups / 4, batches = nrows * per_row;
  constexpr int NB = 3;
  uint64_t ctr[NB];
  float* dst[NB];
  int64_t b = 0;
  for (; b < batches; b += NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, batches - b));
    for (int u = 0; u < nb; ++u) {
      const int64_t r = (b + u) / per_row, i = 4 * ((b + u) % per_row);
      ctr[u] = c0 + static_cast<uint64_t>(r * row_stride + i);
      dst[u] = out + r * out_stride + 4 * i;
    }
    if (nb == NB)
      philox_keep_avx2<NB>(ctr, key0, key1, thr, onv, dst);
    else
      for (int u = 0; u < nb; ++u) philox_keep_avx2<1>(ctr + u, key0, key1, thr, onv, dst + u);
  }
  if (const int64_t done = 4 * per_row; done < ngroups)  // ragged ends of the rows
    dropout_keep_rows_scalar(seed, c0 + static_cast<uint64_t>(done), row_stride, nrows,
                             ngroups - done, threshold, on, out + 4 * done, out_stride);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// The same on AVX-512F: eight groups per __m512i (one counter per 64-bit lane), twice
// the AVX2 version's throughput; an unsigned compare into a mask register replaces the
// sign-flip trick.
template <int NB>
__attribute__((target("avx512f"))) FASTPEFT_INLINE void philox_keep_avx512(
    const uint64_t* c0, const __m512i* key0, const __m512i* key1, __m512i thr, __m512 onv,
    float* const* out) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  __m512i x0[NB], x1[NB], x2[NB], x3[NB];
  for (int b = 0; b < NB; ++b) {
    x0[b] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(c0[b])),
                             _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    x1[b] = _mm512_srli_epi64(x0[b], 32);
    x2[b] = x3[b] = _mm512_setzero_si512();
  }
  for (int round = 0; round < 10; ++round) {
    for (int b = 0; b < NB; ++b) {
      const __m512i p0 = _mm512_mul_epu32(x0[b], m0), p1 = _mm512_mul_epu32(x2[b], m1);
      x0[b] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), x1[b]), key0[round]);
      x2[b] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), x3[b]), key1[round]);
      x1[b] = p1;
      x3[b] = p0;
    }
  }
  // 128-bit lane j of even / odd: all four words of group 2j / 2j + 1
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);   // groups 0-3
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);  // groups 4-7
  for (int b = 0; b < NB; ++b) {
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, x0[b], _mm512_slli_epi64(x1[b], 32));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, x2[b], _mm512_slli_epi64(x3[b], 32));
    const __m512i even = _mm512_unpacklo_epi64(w01, w23), odd = _mm512_unpackhi_epi64(w01, w23);
    const __m512i g03 = _mm512_permutex2var_epi64(even, first, odd);
    const __m512i g47 = _mm512_permutex2var_epi64(even, second, odd);
    _mm512_storeu_ps(out[b], _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(g03, thr), onv));
    _mm512_storeu_ps(out[b] + 16, _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(g47, thr), onv));
  }
}

__attribute__((target("avx512f"))) inline void dropout_keep_rows_avx512(
    uint64_t seed, uint64_t c0, int64_t row_stride, int64_t nrows, int64_t ngroups,
    uint32_t threshold, float on, float* out, int64_t out_stride) {
  __m512i key0[10], key1[10];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    key0[round] = _mm512_set1_epi64(k0);
    key1[round] = _mm512_set1_epi64(k1);
  }
  const __m512i thr = _mm512_set1_epi32(static_cast<int32_t>(threshold));
  const __m512 onv = _mm512_set1_ps(on);
  const int64_t per_row = ngroups / 8, batches = nrows * per_row;
  constexpr int NB = 3;
  uint64_t ctr[NB];
  float* dst[NB];
  for (int64_t b = 0; b < batches; b += NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, batches - b));
    for (int u = 0; u < nb; ++u) {
      const int64_t r = (b + u) / per_row, i = 8 * ((b + u) % per_row);
      ctr[u] = c0 + static_cast<uint64_t>(r * row_stride + i);
      dst[u] = out + r * out_stride + 4 * i;
    }
    if (nb == NB)
      philox_keep_avx512<NB>(ctr, key0, key1, thr, onv, dst);
    else
      for (int u = 0; u < nb; ++u) philox_keep_avx512<1>(ctr + u, key0, key1, thr, onv, dst + u);
  }
  if (const int64_t done = 8 * per_row; done < ngroups)  // ragged ends of the rows
    dropout_keep_rows_avx2(seed, c0 + static_cast<uint64_t>(done), row_stride, nrows,
                           ngroups - done, threshold, on, out + 4 * done, out_stride);
}

inline bool cpu_has_avx512f_philox() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

// The scaled keep mask of a tile of row segments, each starting at a multiple of 4:
// row r's groups are c0 + r * row_stride + [0, ngroups), written to out + r * out_stride
// (4 * ngroups floats, `on` where kept, 0 where dropped).
inline void dropout_keep_rows(uint64_t seed, uint64_t c0, int64_t row_stride, int64_t nrows,
                              int64_t ngroups, uint32_t threshold, float on, float* out,
                              int64_t out_stride) {
#ifdef FASTPEFT_HAVE_AVX2_PATH
  if (cpu_has_avx512f_philox())
    return dropout_keep_rows_avx512(seed, c0, row_stride, nrows, ngroups, threshold, on, out,
                                    out_stride);
  if (cpu_has_avx2())
    return dropout_keep_rows_avx2(seed, c0, row_stride, nrows, ngroups, threshold, on, out,
                                  out_stride);
#endif
  dropout_keep_rows_scalar(seed, c0, row_stride, nrows, ngroups, threshold, on, out, out_stride);
}

}  // namespace fastpeft::cpu
FASTPEFT_AVX512_WARNINGS_ON
