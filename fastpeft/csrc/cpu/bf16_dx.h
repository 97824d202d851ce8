// dx (T, K) += dy (T, N) @ W for bf16 dy on CPUs with AVX512_BF16, W decoded from a
// quantised weight (nf4_lora_linear, int8_lora_linear) into panels of bf16 pairs of rows
// and multiplied with dy by vdpbf16ps. Each op supplies how a pair of rows of W is
// decoded over a run of columns, and how the run's sums go back to dx; this header holds
// the rest:
//
// * dy_pairs: dy as 32-bit words (dy[t, n] s[n], dy[t, n + 1] s[n + 1]) in bf16, laid out
//   (N / 2 rounded up, T), with a per-row scale s folded in (int8's weight_scale) or none
//   (NF4).
// * pair_bf16: two rows' 16 values each, rounded to bf16 (cvtne2ps, to nearest even) and
//   interleaved W[n, c], W[n + 1, c]: vdpbf16ps then adds dy[t, n] W[n, c] +
//   dy[t, n + 1] W[n + 1, c] into the lane of column c. (Both instructions take values
//   below 2^-126 as 0, which the unfused layer's bf16 GEMM may not.)
// * dx_dots: TR <= 16 rows of dy against a panel of pairs, a group of 16 columns at a
//   time with its TR accumulators in registers over the panel.
// * add_dx_bf16: the threading (runs of columns, each on one thread, so a result does not
//   depend on the thread count) and the loop over panels of kPanelPairs pairs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_path.h"
#include "cpu/simd.h"

// (Apple's clang numbers its releases apart from LLVM's: its 12 is the first on LLVM 10.)
#if defined(__x86_64__) &&                                                   \
    (defined(__apple_build_version__) ? __clang_major__ >= 12                \
     : defined(__clang__)             ? __clang_major__ >= 9                 \
                                      : (defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define FASTPEFT_BF16_DX 1  // AVX512_BF16's intrinsics and target name: GCC 10, Clang 9
#endif

namespace fastpeft::cpu::bf16_dx {

// Pairs of rows of W a panel holds: 32 pairs of 128 columns (NF4's runs) are 16 KiB of
// bf16, of 256 (int8's) 32 KiB. On a Zen 4
// VM (NF4, 4096 x 4096, 2 threads, the backward alternated with and without the kernel in
// one process, from a cold cache) 32 pairs took T = 64 in 7.7-7.9 ms, against 8.3-8.6 ms for
// 16 and 8.8-9.2 ms for 8.
constexpr int kPanelPairs = 32;

// dy (T, N) bf16 as (N / 2 rounded up, T) words of two bf16: (dy[t, n] s[n], dy[t, n + 1]
// s[n + 1]), element n in the low half, 0 past N; s = scale (N floats) or 1 (null).
inline std::vector<uint32_t> dy_pairs(const at::Tensor& dy, const float* scale) {
  const at::Tensor dyc = dy.contiguous();
  const int64_t T = dyc.size(0), N = dyc.size(1), pairs = div_up(N, 2);
  const at::BFloat16* d = dyc.const_data_ptr<at::BFloat16>();
  auto value = [&](int64_t t, int64_t n) -> uint32_t {
    if (n >= N) return 0;
    if (scale == nullptr) return d[t * N + n].x;
    return at::BFloat16(static_cast<float>(d[t * N + n]) * scale[n]).x;  // to nearest even
  };
  std::vector<uint32_t> out(static_cast<size_t>(pairs * T));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t p = 0; p < pairs; ++p)
      out[p * T + t] = value(t, 2 * p) | (value(t, 2 * p + 1) << 16);
  return out;
}

#ifdef FASTPEFT_BF16_DX
// w0, w1 (16 values of rows n and n + 1) as 32 bf16: w0[0], w1[0], w0[1], w1[1], ...
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline __m512i
pair_bf16(__m512 w0, __m512 w1) {
  alignas(64) static constexpr uint16_t kIdx[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};  // lane j of w0 | w1
  const __m512bh v = _mm512_cvtne2ps_pbh(w1, w0);  // lanes 0-15 w0, 16-31 w1
  return _mm512_permutexvar_epi16(_mm512_load_si512(kIdx), (__m512i)v);
}

// acc (TR rows, row stride lda) += dy @ W over a panel of `pairs` pairs of rows of W
// (pair_bf16's layout, `groups` groups of 16 columns a pair, pair p's group g at
// (p * groups + g) * 32), dy's words (dy_pairs) of TR rows side by side, ldp words from
// one pair to the next: a group's TR accumulators stay in registers over the panel, each
// pair a vdpbf16ps per row of dy with dy's word broadcast.
template <int TR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dx_dots(
    const uint16_t* __restrict panel, int pairs, int64_t groups, const uint32_t* __restrict dy,
    int64_t ldp, float* __restrict acc, int64_t lda) {
  for (int64_t g = 0; g < groups; ++g) {
    __m512 a[TR];
    for (int t = 0; t < TR; ++t) a[t] = _mm512_loadu_ps(acc + t * lda + 16 * g);
    const uint32_t* d = dy;
    for (int p = 0; p < pairs; ++p, d += ldp) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + (p * groups + g) * 32);
      for (int t = 0; t < TR; ++t)
        a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)_mm512_set1_epi32(static_cast<int>(d[t])), w);
    }
    for (int t = 0; t < TR; ++t) _mm512_storeu_ps(acc + t * lda + 16 * g, a[t]);
  }
}

// dx_dots for rows = 1 .. 16.
inline void dx_dots_rows(int rows, const uint16_t* panel, int pairs, int64_t groups,
                         const uint32_t* dy, int64_t ldp, float* acc, int64_t lda) {
  with_rows<16>(rows, [&](auto tr) {
    dx_dots<decltype(tr)::value>(panel, pairs, groups, dy, ldp, acc, lda);
  });
}

// The driver: threads take runs of columns (tasks 0 .. tasks - 1, each of groups(task)
// groups of 16 columns, at most max_groups); for each run, decode(task, n, out) writes the
// panel entries of the pair of rows n, n + 1 (n even; n + 1 may be N: its weights 0), and
// after the last pair store(task, acc, lda) adds the run's T x 16 groups(task) sums (rows
// of stride lda) onto dx.
template <typename Groups, typename Decode, typename Store>
void add_dx_bf16(int64_t T, int64_t N, const std::vector<uint32_t>& dy, int64_t tasks,
                 int64_t max_groups, Groups&& groups_of, Decode&& decode, Store&& store) {
  const int64_t pairs = div_up(N, 2);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> panel(static_cast<size_t>(kPanelPairs * max_groups * 32));
    std::vector<float> acc(static_cast<size_t>(T * max_groups * 16));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t groups = groups_of(task), cols = 16 * groups;
      std::fill(acc.begin(), acc.begin() + T * cols, 0.0f);
      for (int64_t p0 = 0; p0 < pairs; p0 += kPanelPairs) {
        const int np = static_cast<int>(std::min<int64_t>(kPanelPairs, pairs - p0));
        for (int p = 0; p < np; ++p) decode(task, 2 * (p0 + p), panel.data() + p * groups * 32);
        for (int64_t t0 = 0; t0 < T; t0 += 16)
          dx_dots_rows(static_cast<int>(std::min<int64_t>(16, T - t0)), panel.data(), np, groups,
                       dy.data() + p0 * T + t0, T, acc.data() + t0 * cols, cols);
      }
      store(task, acc.data(), cols);
    }
  });
}
#endif

}  // namespace fastpeft::cpu::bf16_dx
