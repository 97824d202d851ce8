// The NF4 decoder of nf4_lora_linear's CPU kernels (nf4_lora_linear.cpp).
//
// Layout (bitsandbytes' quantize_4bit, quant_type "nf4"): W (N, K) read row-major as one
// flat sequence of N * K elements; element e has the 4-bit code
//   code(e) = q[e / 2] >> 4 (e even) or q[e / 2] & 15 (e odd)
// and belongs to block e / blocksize, whose float32 scale is absmax[e / blocksize]:
//   W[e] = kNf4[code(e)] * absmax[e / blocksize]        (in fp32, as bitsandbytes)
// Every decode here works on a run of whole bytes (K is even, so a row starts on a byte),
// split where blocks end ("segments": a block may end inside a row when K is not a
// multiple of blocksize); within a segment the scale is one float.
//
// decode_run decodes a run of bytes (a row of W, a tile's row) segment by segment, the
// block's scale folded into the 16-value table once per segment. Three versions, chosen
// at run time by cpu_isa() (cpu_path.h: FASTPEFT_CPU_ISA forces one), give the same
// floats (kNf4[code] * scale, one fp32 product each): avx512 (16 bytes a step, vpermps in
// a one-register table), avx2 (8 bytes a step, two half tables and a blend), generic (a
// 256-entry table of each byte value's two floats, 2 KiB, in L1). One call per run, not
// per block: at blocksize 64 a block is only 32 bytes.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/bf16_dx.h"
#include "cpu/cpu_path.h"
#include "cpu/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTPEFT_NF4_X86 1
#ifdef FASTPEFT_BF16_DX  // AVX512_BF16's intrinsics and target name (bf16_dx.h)
#define FASTPEFT_NF4_BF16 1
#endif
#endif

FASTPEFT_AVX512_WARNINGS_OFF
namespace fastpeft::cpu::nf4_lora_linear {

// The 16 NF4 values, bitsandbytes' table (reference.NF4_VALUES).
alignas(64) inline constexpr float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// The two values of each byte: kPairs[b] = {kNf4[b >> 4], kNf4[b & 15]}.
inline const std::array<std::array<float, 2>, 256>& byte_pairs() {
  static const auto table = [] {
    std::array<std::array<float, 2>, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = {kNf4[b >> 4], kNf4[b & 15]};
    return t;
  }();
  return table;
}

inline void decode_bytes_generic(const uint8_t* __restrict q, int64_t n, float scale,
                                 float* __restrict out) {
  const auto& pairs = byte_pairs();
  for (int64_t j = 0; j < n; ++j) {
    out[2 * j] = pairs[q[j]][0] * scale;
    out[2 * j + 1] = pairs[q[j]][1] * scale;
  }
}

// decode_run_<isa>(q, absmax, block_shift, b0, b1, out): the elements [2 b0, 2 b1) of W
// (bytes b0 .. b1 of q) into out, in element order, each segment (a block's part of the
// run; a block spans 2^block_shift = blocksize / 2 bytes) with its block's scale folded
// into the 16-value table once. One call decodes a whole run (a row, a tile's row).

inline void decode_run_generic(const uint8_t* q, const float* absmax, int block_shift,
                               int64_t b0, int64_t b1, float* out) {
  while (b0 < b1) {
    const int64_t block = b0 >> block_shift;
    const int64_t end = std::min(b1, (block + 1) << block_shift);
    decode_bytes_generic(q + b0, end - b0, absmax[block], out);
    out += 2 * (end - b0);
    b0 = end;
  }
}

#ifdef FASTPEFT_NF4_X86
// avx512: 16 bytes -> 32 floats a step: widen to 16 int32, split the nibbles, vpermps
// looks each up in the scaled table (one zmm), vpermt2ps interleaves the high- and
// low-nibble values back into element order; a segment's last < 16 bytes under masks.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void decode_run_avx512(
    const uint8_t* q, const float* absmax, int block_shift, int64_t b0, int64_t b1,
    float* out) {
  const __m512 table = _mm512_load_ps(kNf4);
  const __m512i low4 = _mm512_set1_epi32(15);
  // element order: (hi0, lo0, hi1, lo1, ...): indices into (hi, lo) for vpermt2ps
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7,
                                          23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14,
                                           30, 15, 31);
  while (b0 < b1) {
    const int64_t block = b0 >> block_shift;
    const int64_t end = std::min(b1, (block + 1) << block_shift);
    const __m512 tab = _mm512_mul_ps(table, _mm512_set1_ps(absmax[block]));
    int64_t j = b0;
    for (; j + 16 <= end; j += 16, out += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
      const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, low4), tab);
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(hi, first, lo));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(hi, second, lo));
    }
    if (j < end) {
      const int len = static_cast<int>(end - j);  // 1 .. 15 bytes, 2 .. 30 floats
      const __m512i b = _mm512_cvtepu8_epi32(
          _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << len) - 1u), q + j));
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
      const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, low4), tab);
      const auto m1 = static_cast<__mmask16>(len >= 8 ? 0xFFFFu : (1u << (2 * len)) - 1u);
      const auto m2 = static_cast<__mmask16>(len > 8 ? (1u << (2 * (len - 8))) - 1u : 0u);
      _mm512_mask_storeu_ps(out, m1, _mm512_permutex2var_ps(hi, first, lo));
      _mm512_mask_storeu_ps(out + 16, m2, _mm512_permutex2var_ps(hi, second, lo));
      out += 2 * len;
    }
    b0 = end;
  }
}

// kNf4[code] from the table's two halves: bit 3 of the code picks one (blendv's sign bit)
__attribute__((target("avx2,fma"))) FASTPEFT_INLINE __m256 lookup_avx2(__m256 table_lo,
                                                                      __m256 table_hi,
                                                                      __m256i code) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(table_lo, code);
  const __m256 from_hi = _mm256_permutevar8x32_ps(table_hi, code);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
}

// avx2: 8 bytes -> 16 floats a step: the scaled table is two ymm halves; vpermps looks up
// in both and a blend on bit 3 of the code picks one; unpack + lane permutes interleave;
// a segment's last < 8 bytes by the generic table.
__attribute__((target("avx2,fma"))) inline void decode_run_avx2(
    const uint8_t* q, const float* absmax, int block_shift, int64_t b0, int64_t b1,
    float* out) {
  const __m256 table_lo = _mm256_load_ps(kNf4), table_hi = _mm256_load_ps(kNf4 + 8);
  const __m256i low4 = _mm256_set1_epi32(15);
  while (b0 < b1) {
    const int64_t block = b0 >> block_shift;
    const int64_t end = std::min(b1, (block + 1) << block_shift);
    const float scale = absmax[block];
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 tab_lo = _mm256_mul_ps(table_lo, s), tab_hi = _mm256_mul_ps(table_hi, s);
    int64_t j = b0;
    for (; j + 8 <= end; j += 8, out += 16) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      const __m256 hi = lookup_avx2(tab_lo, tab_hi, _mm256_srli_epi32(b, 4));
      const __m256 lo = lookup_avx2(tab_lo, tab_hi, _mm256_and_si256(b, low4));
      const __m256 a = _mm256_unpacklo_ps(hi, lo);  // h0 l0 h1 l1 | h4 l4 h5 l5
      const __m256 c = _mm256_unpackhi_ps(hi, lo);  // h2 l2 h3 l3 | h6 l6 h7 l7
      _mm256_storeu_ps(out, _mm256_permute2f128_ps(a, c, 0x20));
      _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
    decode_bytes_generic(q + j, end - j, scale, out);
    out += 2 * (end - j);
    b0 = end;
  }
}
#endif

// ---------------------------------------------------------------------------------------
// The decode forward's dot products: out[t] = x[t, :] . W[n, :] for TR <= 4 rows of x and
// one row n of W, whose codes are the bytes [b0, b0 + K / 2) of q. x is passed split into
// its even and odd columns (xe[t][j] = x[t, 2j], xo[t][j] = x[t, 2j + 1], row stride ld),
// so a byte's two codes meet their two x values without interleaving, and the block scale
// is folded into the table once per block (16 products) instead of into every weight: per
// 16 bytes the avx512 loop is a load, a widening, two nibble extractions, two vpermps and
// 2 * TR FMAs, all in registers.

// Byte ranges of a row that share one block: f(j0, j1, scale) for [j0, j1) relative to the
// row start b0 (a row of nb bytes).
template <typename F>
FASTPEFT_INLINE void for_each_segment(const float* absmax, int block_shift, int64_t b0,
                                      int64_t nb, F&& f) {
  for (int64_t j = 0; j < nb;) {
    const int64_t block = (b0 + j) >> block_shift;
    const int64_t end = std::min(nb, ((block + 1) << block_shift) - b0);
    f(j, end, absmax[block]);
    j = end;
  }
}

template <int TR, typename acc_t>
void row_dots_generic(const uint8_t* __restrict q, const float* __restrict absmax,
                      int block_shift, int64_t b0, int64_t nb, const acc_t* __restrict xe,
                      const acc_t* __restrict xo, int64_t ld, acc_t* out) {
  const auto& pairs = byte_pairs();
  acc_t total[TR] = {};
  for_each_segment(absmax, block_shift, b0, nb, [&](int64_t j0, int64_t j1, float scale) {
    acc_t part[TR] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const auto& v = pairs[q[b0 + j]];
      for (int t = 0; t < TR; ++t)
        part[t] += static_cast<acc_t>(v[0] * scale) * xe[t * ld + j] +
                   static_cast<acc_t>(v[1] * scale) * xo[t * ld + j];
    }
    for (int t = 0; t < TR; ++t) total[t] += part[t];
  });
  for (int t = 0; t < TR; ++t) out[t] = total[t];
}

#ifdef FASTPEFT_NF4_X86
// (The ISA kernels walk the segments with loops of their own: a lambda does not inherit
// its enclosing function's target attribute, so intrinsics cannot be inlined into one.)

// The bytes q[0 .. 16) under mask m (the rest read as 0): both nibbles looked up in tab
// and multiplied into the TR rows' accumulators (x loaded under the same mask: zero past
// it, so the masked-off codes add nothing).
template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) FASTPEFT_INLINE void dots_step_avx512(
    const uint8_t* q, __mmask16 m, __m512 tab, const float* xe, const float* xo, int64_t ld,
    __m512 (&acc_hi)[TR], __m512 (&acc_lo)[TR]) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q));
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
  const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), tab);
  for (int t = 0; t < TR; ++t) {
    acc_hi[t] = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(m, xe + t * ld), acc_hi[t]);
    acc_lo[t] = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(m, xo + t * ld), acc_lo[t]);
  }
}

template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void row_dots_avx512(
    const uint8_t* __restrict q, const float* __restrict absmax, int block_shift, int64_t b0,
    int64_t nb, const float* __restrict xe, const float* __restrict xo, int64_t ld, float* out) {
  const __m512 table = _mm512_load_ps(kNf4);
  __m512 acc_hi[TR], acc_lo[TR];
  for (int t = 0; t < TR; ++t) acc_hi[t] = acc_lo[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb;) {
    const int64_t block = (b0 + j) >> block_shift;
    const int64_t j1 = std::min(nb, ((block + 1) << block_shift) - b0);
    const __m512 tab = _mm512_mul_ps(table, _mm512_set1_ps(absmax[block]));
    for (; j + 16 <= j1; j += 16)
      dots_step_avx512<TR>(q + b0 + j, 0xFFFF, tab, xe + j, xo + j, ld, acc_hi, acc_lo);
    if (j < j1) {
      const auto m = static_cast<__mmask16>((1u << (j1 - j)) - 1u);
      dots_step_avx512<TR>(q + b0 + j, m, tab, xe + j, xo + j, ld, acc_hi, acc_lo);
    }
    j = j1;
  }
  for (int t = 0; t < TR; ++t)
    out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[t], acc_lo[t]));
}

template <int TR>
__attribute__((target("avx2,fma"))) void row_dots_avx2(
    const uint8_t* __restrict q, const float* __restrict absmax, int block_shift, int64_t b0,
    int64_t nb, const float* __restrict xe, const float* __restrict xo, int64_t ld, float* out) {
  const __m256 table_lo = _mm256_load_ps(kNf4), table_hi = _mm256_load_ps(kNf4 + 8);
  const __m256i low4 = _mm256_set1_epi32(15);
  const auto& pairs = byte_pairs();
  __m256 acc_hi[TR], acc_lo[TR];
  float tail[TR] = {};
  for (int t = 0; t < TR; ++t) acc_hi[t] = acc_lo[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb;) {
    const int64_t block = (b0 + j) >> block_shift;
    const int64_t j1 = std::min(nb, ((block + 1) << block_shift) - b0);
    const float scale = absmax[block];
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 tab_lo = _mm256_mul_ps(table_lo, s), tab_hi = _mm256_mul_ps(table_hi, s);
    for (; j + 8 <= j1; j += 8) {
      const __m256i b = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + b0 + j)));
      const __m256 hi = lookup_avx2(tab_lo, tab_hi, _mm256_srli_epi32(b, 4));
      const __m256 lo = lookup_avx2(tab_lo, tab_hi, _mm256_and_si256(b, low4));
      for (int t = 0; t < TR; ++t) {
        acc_hi[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xe + t * ld + j), acc_hi[t]);
        acc_lo[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xo + t * ld + j), acc_lo[t]);
      }
    }
    for (; j < j1; ++j) {  // tail bytes: the generic table, scaled alike
      const auto& v = pairs[q[b0 + j]];
      for (int t = 0; t < TR; ++t)
        tail[t] += v[0] * scale * xe[t * ld + j] + v[1] * scale * xo[t * ld + j];
    }
  }
  for (int t = 0; t < TR; ++t) {
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(acc_hi[t], acc_lo[t]));
    float sum = 0.0f;
    for (float v : lanes) sum += v;
    out[t] = sum + tail[t];
  }
}
#endif

// ---------------------------------------------------------------------------------------
// The decode forward's dot products in chunks, for AVX-512 and rows that start on a block
// (K a multiple of blocksize, the usual case): 64 bytes of codes (128 weights) a step, as
// sixteen 32-bit lanes of 8 codes each. vpermps reads only the low 4 bits of its index,
// so nibble k of every lane is looked up in the unscaled table after one shift (k > 0) and
// no widening: per 128 weights a load, 7 shifts and 8 vpermps, against 4 widenings and 16
// more masks and shifts in row_dots_avx512. x comes rearranged to meet the lanes
// (chunk_column): chunk c, nibble k, lane i is column 128 c + chunk_column(k, i), zero past
// K. The block scales multiply the chunk's sums (each lane's block: lane_blocks), so the
// table is never rescaled: out[t] = sum over chunks of sum_lanes s[lane] * (sum_k
// kNf4[code] * x). In fp32, as the other kernels; only the order of the additions differs.

// The column of x that nibble k (0 .. 7, from the lowest bits) of lane i (0 .. 15) of a
// 64-byte chunk multiplies: lane i holds bytes 4i .. 4i + 3, a byte's high nibble is the
// even element and its low nibble the odd one.
constexpr int64_t chunk_column(int k, int i) { return 8 * i + 2 * (k >> 1) + ((k & 1) ? 0 : 1); }

// x (rows, K) into the chunked order, in groups of `group` rows (the rows of one pass of
// the dot kernels): group g (rows t0 = g * group .. t0 + m - 1) takes out[t0 * Kp :
// (t0 + m) * Kp), Kp = K rounded up to 128, as (Kp / 128, m, 128): chunk c of its row r at
// (c * m + r) * 128. A kernel step then finds the m rows' parts of x at fixed offsets from
// one pointer (per-row pointers had filled the registers and gone to the stack).
template <typename in_t, typename out_t>
void chunk_columns(const in_t* x, int64_t rows, int64_t K, int64_t group, out_t* out) {
  const int64_t Kp = (K + 127) / 128 * 128;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t t0 = t / group * group, m = std::min(group, rows - t0);
    out_t* dst = out + t0 * Kp + (t - t0) * 128;
    for (int64_t c = 0; c < Kp; c += 128, dst += m * 128)
      for (int k = 0; k < 8; ++k)
        for (int i = 0; i < 16; ++i) {
          const int64_t col = c + chunk_column(k, i);
          dst[16 * k + i] = col < K ? static_cast<out_t>(x[t * K + col]) : out_t(0);
        }
  }
}

#ifdef FASTPEFT_NF4_X86
// Step j (a multiple of 64) of the chunked dot kernels over a row's nb bytes q: its 64
// bytes of codes (zeros past nb) and each lane's block scale (lane_block: the lanes'
// chunk-relative blocks; zero past the row's blocks); asks for next's line of the step
// into L2 ahead (next or null).
struct ChunkStep {
  __m512i codes;
  __m512 scales;
};

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline ChunkStep chunk_step(
    const uint8_t* q, int64_t nb, int64_t j, const float* absmax, int64_t blocks,
    int block_shift, __m512i lane_block, const uint8_t* next) {
  const int64_t left = nb - j;
  if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T1);
  const __m512i codes = left >= 64 ? _mm512_loadu_si512(q + j)
                                   : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - left), q + j);
  const int64_t b0 = j >> block_shift;
  const int64_t nblk = std::min<int64_t>(16, blocks - b0);
  const __m512 scales = _mm512_permutexvar_ps(
      lane_block,
      _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << nblk) - 1u), absmax + b0));
  return {codes, scales};
}

// out[t] = x[t] . W[n] for TR <= 8 rows: q the row's nb bytes, absmax its first block's
// scale (the row starts on a block), blocks its number of blocks, lane_blocks[i] the
// chunk-relative block of lane i ((4 i) >> block_shift, block_shift the log2 of a block's
// bytes), xp the group's chunked rows from the first chunk of q (chunk_columns: TR * 128
// elements a chunk). next (or null): bytes to ask for into L2 as the row goes, a line per
// step (the codes of a row decoded later).
template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void chunk_dots_avx512(
    const uint8_t* __restrict q, int64_t nb, const float* __restrict absmax, int64_t blocks,
    int block_shift, const int32_t* lane_blocks, const float* __restrict xp, float* out,
    const uint8_t* next) {
  const __m512 table = _mm512_load_ps(kNf4);
  const __m512i lane_block = _mm512_loadu_si512(lane_blocks);
  __m512 acc[TR];
  for (int t = 0; t < TR; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; j += 64, xp += TR * 128) {
    const ChunkStep step = chunk_step(q, nb, j, absmax, blocks, block_shift, lane_block, next);
    const __m512i v = step.codes;
    const __m512 s = step.scales;
    __m512 p0[TR], p1[TR];
    const __m512 w0 = _mm512_permutexvar_ps(v, table);
    const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    for (int t = 0; t < TR; ++t) {
      p0[t] = _mm512_mul_ps(w0, _mm512_loadu_ps(xp + t * 128));
      p1[t] = _mm512_mul_ps(w1, _mm512_loadu_ps(xp + t * 128 + 16));
    }
#define FASTPEFT_NF4_NIBBLE(k, p)                                                      \
  {                                                                                    \
    const __m512 wk = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * (k)), table);     \
    for (int t = 0; t < TR; ++t)                                                       \
      p[t] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(xp + t * 128 + 16 * (k)), p[t]);      \
  }
    FASTPEFT_NF4_NIBBLE(2, p0)
    FASTPEFT_NF4_NIBBLE(3, p1)
    FASTPEFT_NF4_NIBBLE(4, p0)
    FASTPEFT_NF4_NIBBLE(5, p1)
    FASTPEFT_NF4_NIBBLE(6, p0)
    FASTPEFT_NF4_NIBBLE(7, p1)
#undef FASTPEFT_NF4_NIBBLE
    for (int t = 0; t < TR; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_add_ps(p0[t], p1[t]), s, acc[t]);
  }
  for (int t = 0; t < TR; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

#ifdef FASTPEFT_NF4_BF16
// chunk_dots_avx512 for bf16 x on CPUs with AVX512_BF16, TR <= 8 rows: each weight is
// decoded as there and its fp32 product code * scale rounded to bf16, which is W as
// bitsandbytes' dequantize_4bit gives it in bf16 (so, as the unfused bf16 layer computes);
// vdpbf16ps then multiplies pairs of W and x in bf16 and adds the exact products in fp32:
// two steps of the fp32 kernel's multiply-adds in one. xp holds x in the chunked order
// (chunk_columns) as bf16 bits: the pair of nibbles (k, k + 1) rounded into one vector
// (cvtne2ps: lanes 0-15 nibble k, 16-31 nibble k + 1) meets x's 32 elements at
// 16 k .. 16 k + 31 of the chunk as they lie.
template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void chunk_dots_bf16(
    const uint8_t* __restrict q, int64_t nb, const float* __restrict absmax, int64_t blocks,
    int block_shift, const int32_t* lane_blocks, const uint16_t* __restrict xp, float* out,
    const uint8_t* next) {
  const __m512 table = _mm512_load_ps(kNf4);
  const __m512i lane_block = _mm512_loadu_si512(lane_blocks);
  __m512 acc[TR];
  for (int t = 0; t < TR; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; j += 64, xp += TR * 128) {
    const ChunkStep step = chunk_step(q, nb, j, absmax, blocks, block_shift, lane_block, next);
    const __m512i v = step.codes;
    const __m512 s = step.scales;
#pragma GCC unroll 4
    for (int k = 0; k < 8; k += 2) {
      const __m512 w0 = _mm512_mul_ps(
          _mm512_permutexvar_ps(k == 0 ? v : _mm512_srli_epi32(v, 4 * k), table), s);
      const __m512 w1 =
          _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * k + 4), table), s);
      const __m512bh w = _mm512_cvtne2ps_pbh(w1, w0);
      for (int t = 0; t < TR; ++t)
        acc[t] = _mm512_dpbf16_ps(
            acc[t], w, (__m512bh)_mm512_loadu_si512(xp + t * 128 + 16 * k));
    }
  }
  for (int t = 0; t < TR; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}
#endif

#ifdef FASTPEFT_NF4_BF16
// The bf16 dx's panel entries (bf16_dx.h) of rows n and n + 1 of W over `steps` 64-byte
// steps of their codes from byte j0 (chunk_step: q0, q1 and absmax0, absmax1 the rows'
// first code and scale, nb and blocks a row's bytes and blocks; q1 null for a missing row
// n + 1, whose weights are then (minus) 0): 8 groups of 16 columns a step, in the
// chunked order (group 8 s + k holds nibble k of the 16 lanes of step s). The products code * scale are
// rounded to bf16 to nearest even (pair_bf16): W as bitsandbytes' bf16 dequantisation
// gives it.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void decode_pair_bf16(
    const uint8_t* q0, const uint8_t* q1, int64_t nb, int64_t j0, int64_t steps,
    const float* absmax0, const float* absmax1, int64_t blocks, int block_shift,
    const int32_t* lane_blocks, uint16_t* __restrict out) {
  const __m512 table = _mm512_load_ps(kNf4);
  const __m512i lane_block = _mm512_loadu_si512(lane_blocks);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t j = j0 + 64 * s;
    const ChunkStep a = chunk_step(q0, nb, j, absmax0, blocks, block_shift, lane_block, nullptr);
    ChunkStep b = {_mm512_setzero_si512(), _mm512_setzero_ps()};
    if (q1 != nullptr) b = chunk_step(q1, nb, j, absmax1, blocks, block_shift, lane_block, nullptr);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const __m512 w0 = _mm512_mul_ps(
          _mm512_permutexvar_ps(k == 0 ? a.codes : _mm512_srli_epi32(a.codes, 4 * k), table),
          a.scales);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_permutexvar_ps(k == 0 ? b.codes : _mm512_srli_epi32(b.codes, 4 * k), table),
          b.scales);
      _mm512_storeu_si512(out + 32 * (8 * s + k), bf16_dx::pair_bf16(w0, w1));
    }
  }
}
#endif

#ifdef FASTPEFT_NF4_BF16
// chunk_dots_bf16 for rows = 1 .. 8.
inline void chunk_dots_bf16_rows(int rows, const uint8_t* q, int64_t nb, const float* absmax,
                                 int64_t blocks, int block_shift, const int32_t* lane_blocks,
                                 const uint16_t* xp, float* out, const uint8_t* next) {
  auto run = [&](auto tr) {
    chunk_dots_bf16<decltype(tr)::value>(q, nb, absmax, blocks, block_shift, lane_blocks, xp,
                                         out, next);
  };
  with_rows<8>(rows, run);
}
#endif

// chunk_dots_avx512 for rows = 1 .. 8.
inline void chunk_dots(int rows, const uint8_t* q, int64_t nb, const float* absmax,
                       int64_t blocks, int block_shift, const int32_t* lane_blocks,
                       const float* xp, float* out, const uint8_t* next) {
  auto run = [&](auto tr) {
    chunk_dots_avx512<decltype(tr)::value>(q, nb, absmax, blocks, block_shift, lane_blocks, xp,
                                           out, next);
  };
  with_rows<8>(rows, run);
}
#endif

// out[t] for TR = rows (1 .. 4) of x, by the ISA's kernel (fp64: the generic one).
template <typename acc_t>
void row_dots(CpuIsa isa, int rows, const uint8_t* q, const float* absmax, int block_shift,
              int64_t b0, int64_t nb, const acc_t* xe, const acc_t* xo, int64_t ld, acc_t* out) {
  auto run = [&](auto tr) {
    constexpr int TR = decltype(tr)::value;
#ifdef FASTPEFT_NF4_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      if (isa == CpuIsa::kAvx512)
        return row_dots_avx512<TR>(q, absmax, block_shift, b0, nb, xe, xo, ld, out);
      if (isa == CpuIsa::kAvx2)
        return row_dots_avx2<TR>(q, absmax, block_shift, b0, nb, xe, xo, ld, out);
    }
#endif
    row_dots_generic<TR, acc_t>(q, absmax, block_shift, b0, nb, xe, xo, ld, out);
  };
  with_rows<4>(rows, run);
}

// ---------------------------------------------------------------------------------------
// The decode forward past 4 rows of x: a row of W is decoded once (decode_run, into L1)
// and dotted with every row of x, TR <= 8 rows at a time: out[t] = w . x[t, :] over n
// elements (x rows ld apart). Each (t, n) is one thread's fixed-order reduction.

template <int TR, typename acc_t>
void block_dots_generic(const float* __restrict w, int64_t n, const acc_t* __restrict x,
                        int64_t ld, acc_t* out) {
  acc_t acc[TR] = {};
  for (int64_t j = 0; j < n; ++j)
    for (int t = 0; t < TR; ++t) acc[t] += static_cast<acc_t>(w[j]) * x[t * ld + j];
  for (int t = 0; t < TR; ++t) out[t] = acc[t];
}

#ifdef FASTPEFT_NF4_X86
template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void block_dots_avx512(
    const float* __restrict w, int64_t n, const float* __restrict x, int64_t ld, float* out) {
  __m512 acc[TR];
  for (int t = 0; t < TR; ++t) acc[t] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 wv = _mm512_loadu_ps(w + j);
    for (int t = 0; t < TR; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ld + j), acc[t]);
  }
  if (j < n) {
    const auto m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(m, w + j);
    for (int t = 0; t < TR; ++t)
      acc[t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + t * ld + j), acc[t]);
  }
  for (int t = 0; t < TR; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

template <int TR>
__attribute__((target("avx2,fma"))) void block_dots_avx2(
    const float* __restrict w, int64_t n, const float* __restrict x, int64_t ld, float* out) {
  __m256 acc[TR];
  float tail[TR] = {};
  for (int t = 0; t < TR; ++t) acc[t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 wv = _mm256_loadu_ps(w + j);
    for (int t = 0; t < TR; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ld + j), acc[t]);
  }
  for (; j < n; ++j)
    for (int t = 0; t < TR; ++t) tail[t] += w[j] * x[t * ld + j];
  for (int t = 0; t < TR; ++t) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[t]);
    float sum = 0.0f;
    for (float v : lanes) sum += v;
    out[t] = sum + tail[t];
  }
}
#endif

// out[t] for TR = rows (1 .. 8) of x, by the ISA's kernel (fp64: the generic one).
template <typename acc_t>
void block_dots(CpuIsa isa, int rows, const float* w, int64_t n, const acc_t* x, int64_t ld,
                acc_t* out) {
  auto run = [&](auto tr) {
    constexpr int TR = decltype(tr)::value;
#ifdef FASTPEFT_NF4_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      if (isa == CpuIsa::kAvx512) return block_dots_avx512<TR>(w, n, x, ld, out);
      if (isa == CpuIsa::kAvx2) return block_dots_avx2<TR>(w, n, x, ld, out);
    }
#endif
    block_dots_generic<TR, acc_t>(w, n, x, ld, out);
  };
  with_rows<8>(rows, run);
}

// The run decoder for `isa` (a function pointer: chosen once per op call).
using DecodeRun = void (*)(const uint8_t*, const float*, int, int64_t, int64_t, float*);
inline DecodeRun decoder(CpuIsa isa) {
#ifdef FASTPEFT_NF4_X86
  if (isa == CpuIsa::kAvx512) return decode_run_avx512;
  if (isa == CpuIsa::kAvx2) return decode_run_avx2;
#endif
  (void)isa;
  return decode_run_generic;
}

// out[k] = w[k] rounded to out_t (bf16 / fp16 tiles; multi-versioned so that it
// vectorises).
template <typename out_t>
FASTPEFT_MULTIVERSION void round_into(const float* __restrict w, int64_t n,
                                      out_t* __restrict out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<out_t>(w[k]);
}

// acc[k] += a * w[k] over n elements (multi-versioned; vectorised by the compiler).
template <typename acc_t>
FASTPEFT_MULTIVERSION void axpy(acc_t a, const float* __restrict w, int64_t n,
                                acc_t* __restrict acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += a * static_cast<acc_t>(w[k]);
}

// acc[k] += a[0] * w[k] + a[1] * w[ld + k] + a[2] * w[2 ld + k] + a[3] * w[3 ld + k],
// added in that order (four rows of W per load and store of acc).
template <typename acc_t>
FASTPEFT_MULTIVERSION void axpy4(const acc_t* a, const float* __restrict w, int64_t ld,
                                 int64_t n, acc_t* __restrict acc) {
  const acc_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const float* __restrict w0 = w;
  const float* __restrict w1 = w + ld;
  const float* __restrict w2 = w + 2 * ld;
  const float* __restrict w3 = w + 3 * ld;
  for (int64_t k = 0; k < n; ++k) {
    acc_t v = acc[k] + a0 * static_cast<acc_t>(w0[k]);
    v += a1 * static_cast<acc_t>(w1[k]);
    v += a2 * static_cast<acc_t>(w2[k]);
    acc[k] = v + a3 * static_cast<acc_t>(w3[k]);
  }
}

}  // namespace fastpeft::cpu::nf4_lora_linear
FASTPEFT_AVX512_WARNINGS_ON
