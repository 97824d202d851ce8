// The kernels of bottleneck_adapter on CPU: the row-block passes (the op's checks, blocking,
// GEMMs and math are in bottleneck_adapter.cpp).
//
// Every function works on one block of `rows` contiguous rows of width `d` (or `m`) that
// is hot in cache, in the accumulation type acc_t (float, or double for double inputs);
// scalar_t is the tensors' dtype, so the conversions to and from fp16 / bf16 happen in
// the same pass as the arithmetic. They are plain loops that GCC vectorises, compiled
// twice (baseline and AVX2/FMA, simd.h), and called on disjoint blocks from
// at::parallel_for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/simd.h"

namespace fastpeft::cpu::bottleneck_adapter {

// dst[0 : n] = src[0 : n] in acc_t (fp16 / bf16 blocks into fp32 scratch).
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void load_block(const scalar_t* __restrict src, int64_t n,
                                      acc_t* __restrict dst) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] = to_acc(src[e]);
}

// The statistics of a row from its sum and, over the deviations c = x - sum / d, their sum
// s1 and sum of squares sq (the corrected two-pass algorithm): the mean sum / d + s1 / d,
// which the rounded sum / d alone misses by an ulp or so (then amplified by rstd up to
// 1 / sqrt(eps): a constant row's deviations must be exactly 0), and the biased variance
// (sq - s1^2 / d) / d, with no E[x^2] - E[x]^2 cancellation for rows with a large mean.
template <typename acc_t>
FASTPEFT_INLINE void ln_row_stats(acc_t mu0, acc_t s1, acc_t sq, int64_t d, acc_t eps,
                                  acc_t& mean, acc_t& rstd) {
  const acc_t dd = static_cast<acc_t>(d);
  mean = mu0 + s1 / dd;
  rstd = acc_t(1) / std::sqrt(std::max(sq - s1 * s1 / dd, acc_t(0)) / dd + eps);
}

// Layer-norm statistics of each row: two passes over a cached row (ln_row_stats),
// rstd = 1 / sqrt(var + eps).
template <typename acc_t>
FASTPEFT_MULTIVERSION void ln_stats(const acc_t* __restrict x, int64_t rows, int64_t d,
                                    acc_t eps, acc_t* __restrict mean, acc_t* __restrict rstd) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* xr = x + i * d;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < d; ++j) sum += xr[j];
    const acc_t mu0 = sum / static_cast<acc_t>(d);
    acc_t s1 = 0, sq = 0;
#pragma omp simd reduction(+ : s1, sq)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t c = xr[j] - mu0;
      s1 += c;
      sq += c * c;
    }
    ln_row_stats(mu0, s1, sq, d, eps, mean[i], rstd[i]);
  }
}

// h = (x - mean) * rstd * w + b, row by row (b may be null: no layer-norm bias).
template <typename acc_t>
FASTPEFT_MULTIVERSION void ln_apply(const acc_t* __restrict x, int64_t rows, int64_t d,
                                    const acc_t* __restrict mean, const acc_t* __restrict rstd,
                                    const acc_t* __restrict w, const acc_t* __restrict b,
                                    acc_t* __restrict h) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* xr = x + i * d;
    acc_t* hr = h + i * d;
    const acc_t mu = mean[i], r = rstd[i];
    if (b != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) hr[j] = (xr[j] - mu) * r * w[j] + b[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) hr[j] = (xr[j] - mu) * r * w[j];
    }
  }
}

// The forward's last pass: y = res + s * (u + bu), in y's dtype; u is the block of
// act(z) @ Wu^T, bu the up bias (zeros when there is none).
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void finish_forward(const acc_t* __restrict u, const scalar_t* __restrict res,
                                          const acc_t* __restrict bu, acc_t s, int64_t rows,
                                          int64_t d, scalar_t* __restrict y) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* ur = u + i * d;
    const scalar_t* rr = res + i * d;
    scalar_t* yr = y + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j)
      yr[j] = static_cast<scalar_t>(to_acc(rr[j]) + s * (ur[j] + bu[j]));
  }
}

// out[j] = sum_i a[i, j] over a block (bias gradients): eight rows at a time, summed
// pairwise, so that each sum is a chain of rows / 8 + 3 roundings rather than rows.
template <typename acc_t>
FASTPEFT_MULTIVERSION void colsum_block(const acc_t* __restrict a, int64_t rows, int64_t cols,
                                        acc_t* __restrict out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = acc_t(0);
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    const acc_t* r = a + i * cols;
    const int64_t c = cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j)
      out[j] += ((r[j] + r[c + j]) + (r[2 * c + j] + r[3 * c + j])) +
                ((r[4 * c + j] + r[5 * c + j]) + (r[6 * c + j] + r[7 * c + j]));
  }
  for (; i < rows; ++i) {
    const acc_t* r = a + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) out[j] += r[j];
  }
}

// partial[j] += v[j] in double: the per-chunk sums of the vector gradients over blocks.
template <typename acc_t>
FASTPEFT_MULTIVERSION void add_wide(const acc_t* __restrict v, int64_t n,
                                    double* __restrict partial) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) partial[j] += static_cast<double>(v[j]);
}

// dx = dh (+ dy when the residual is x), in dx's dtype: the no-layer-norm backward of
// fp16 / bf16 (fp32 and fp64 write dx straight from the GEMM).
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void store_dx(const acc_t* __restrict dh, const acc_t* __restrict dy,
                                    int64_t n, scalar_t* __restrict dx) {
  if (dy != nullptr) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dx[e] = static_cast<scalar_t>(dh[e] + dy[e]);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dx[e] = static_cast<scalar_t>(dh[e]);
  }
}

// Layer-norm backward of a block, with xhat = (x - mean) * rstd recomputed from x and
// g = dh * w:
//   dx     = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))  (+ dy when the residual is x)
//   dlnw  += dh * xhat,   dlnb += dh                           (block sums, zeroed by the caller)
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void ln_backward(const acc_t* __restrict dh, const acc_t* __restrict x,
                                       int64_t rows, int64_t d, const acc_t* __restrict mean,
                                       const acc_t* __restrict rstd, const acc_t* __restrict w,
                                       const acc_t* __restrict dy, scalar_t* __restrict dx,
                                       acc_t* __restrict dlnw, acc_t* __restrict dlnb) {
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t *dhr = dh + i * d, *xr = x + i * d;
    const acc_t mu = mean[i], r = rstd[i];
    acc_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t xh = (xr[j] - mu) * r, g = dhr[j] * w[j];
      sg += g;
      sgx += g * xh;
      dlnw[j] += dhr[j] * xh;
      dlnb[j] += dhr[j];
    }
    const acc_t mg = sg * inv_d, mgx = sgx * inv_d;
    scalar_t* dxr = dx + i * d;
    if (dy != nullptr) {
      const acc_t* dyr = dy + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const acc_t xh = (xr[j] - mu) * r;
        dxr[j] = static_cast<scalar_t>(r * (dhr[j] * w[j] - mg - xh * mgx) + dyr[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const acc_t xh = (xr[j] - mu) * r;
        dxr[j] = static_cast<scalar_t>(r * (dhr[j] * w[j] - mg - xh * mgx));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The passes of the kAten path's fp16 / bf16 version (bottleneck_adapter.cpp, namespace
// aten_path). They read and write the tensors in their own dtype scalar_t (what the GEMMs
// take and give) and compute in acc_t (float); like the passes above, each works on one
// block of `rows` contiguous rows, hot in cache, owned by the calling thread.

// The fp16 / bf16 passes convert every element in and out, and on AVX2 that costs more
// instructions than the arithmetic (no 16-bit float conversions for bf16, a shuffle to pack
// 32-bit lanes into 16-bit ones): they get a third clone for x86-64-v4 (AVX-512), where
// the conversions take a few instructions per 16 elements. Same conditions as
// FASTPEFT_MULTIVERSION (simd.h).
#if defined(FASTPEFT_X86_MULTIVERSION) && defined(__x86_64__) && defined(__GNUC__) && \
    !defined(__clang__) && __GNUC__ >= 12
#define FASTPEFT_LOWP_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTPEFT_LOWP_MULTIVERSION
#endif

// acc_t to scalar_t, rounding to nearest even. For bfloat16 the rounding is written out
// on the bits (c10's conversion has a NaN branch that keeps GCC from vectorising the loop
// it is in); a NaN stays a (quiet) NaN.
template <typename scalar_t, typename acc_t>
FASTPEFT_INLINE scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded),
                         c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Layer norm of a block of x into h, both in x's dtype. kStats (forward): each row's mean
// and rstd are computed first (as ln_stats: the mean, then the mean of the squared
// deviations) and stored; otherwise (backward) the stored ones are applied, so that h is
// exactly the forward's. b may be null (no layer-norm bias).
template <bool kStats, typename scalar_t, typename acc_t>
FASTPEFT_LOWP_MULTIVERSION void lowp_ln_rows(
    const scalar_t* __restrict x, int64_t rows, int64_t d, acc_t eps,
    std::conditional_t<kStats, acc_t*, const acc_t*> __restrict mean,
    std::conditional_t<kStats, acc_t*, const acc_t*> __restrict rstd, const acc_t* __restrict w,
    const acc_t* __restrict b, scalar_t* __restrict h) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* xr = x + i * d;
    scalar_t* hr = h + i * d;
    if constexpr (kStats) {
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < d; ++j) sum += to_acc(xr[j]);
      const acc_t mu0 = sum / static_cast<acc_t>(d);
      acc_t s1 = 0, sq = 0;
#pragma omp simd reduction(+ : s1, sq)
      for (int64_t j = 0; j < d; ++j) {
        const acc_t c = to_acc(xr[j]) - mu0;
        s1 += c;
        sq += c * c;
      }
      ln_row_stats(mu0, s1, sq, d, eps, mean[i], rstd[i]);
    }
    const acc_t mu = mean[i], r = rstd[i];
    if (b != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j)
        hr[j] = from_acc<scalar_t>((to_acc(xr[j]) - mu) * r * w[j] + b[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) hr[j] = from_acc<scalar_t>((to_acc(xr[j]) - mu) * r * w[j]);
    }
  }
}

// The forward's epilogue: y = res + s * (u + bu), with u = act(z) @ Wu^T as the GEMM gave
// it and bu the up bias in acc_t (zeros when there is none).
template <typename scalar_t, typename acc_t>
FASTPEFT_LOWP_MULTIVERSION void lowp_finish_rows(const scalar_t* __restrict u,
                                                 const scalar_t* __restrict res,
                                                 const acc_t* __restrict bu, acc_t s,
                                                 int64_t rows, int64_t d,
                                                 scalar_t* __restrict y) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t *ur = u + i * d, *rr = res + i * d;
    scalar_t* yr = y + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j)
      yr[j] = from_acc<scalar_t>(to_acc(rr[j]) + s * (to_acc(ur[j]) + bu[j]));
  }
}

// out[j] += sum_i a[i, j] over a block: eight rows at a time, added pairwise, then onto
// out (a chain of rows / 8 + 3 roundings per column, as colsum_block).
template <typename scalar_t, typename acc_t>
FASTPEFT_LOWP_MULTIVERSION void lowp_colsum_rows(const scalar_t* __restrict a, int64_t rows,
                                                 int64_t cols, acc_t* __restrict out) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    const scalar_t* r = a + i * cols;
    const int64_t c = cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j)
      out[j] += ((to_acc(r[j]) + to_acc(r[c + j])) +
                 (to_acc(r[2 * c + j]) + to_acc(r[3 * c + j]))) +
                ((to_acc(r[4 * c + j]) + to_acc(r[5 * c + j])) +
                 (to_acc(r[6 * c + j]) + to_acc(r[7 * c + j])));
  }
  for (; i < rows; ++i) {
    const scalar_t* r = a + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) out[j] += to_acc(r[j]);
  }
}

// Layer-norm backward of a block, as ln_backward but on x's dtype, and adding up dy too:
//   dx    = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))  (+ dy when dy_joins)
//   dlnw += dh * xhat,   dlnb += dh,   dbu += dy              (block sums, onto the caller's)
// with xhat = (x - mean) * rstd and g = dh * w; dy is read either way (for dbu).
template <typename scalar_t, typename acc_t>
FASTPEFT_LOWP_MULTIVERSION void lowp_ln_backward_rows(
    const scalar_t* __restrict dh, const scalar_t* __restrict x, const scalar_t* __restrict dy,
    bool dy_joins, const acc_t* __restrict mean, const acc_t* __restrict rstd,
    const acc_t* __restrict w, int64_t rows, int64_t d, scalar_t* __restrict dx,
    acc_t* __restrict dlnw, acc_t* __restrict dlnb, acc_t* __restrict dbu) {
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t *dhr = dh + i * d, *xr = x + i * d, *dyr = dy + i * d;
    scalar_t* dxr = dx + i * d;
    const acc_t mu = mean[i], r = rstd[i];
    acc_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t g = to_acc(dhr[j]), xh = (to_acc(xr[j]) - mu) * r;
      sg += g * w[j];
      sgx += g * w[j] * xh;
      dlnw[j] += g * xh;
      dlnb[j] += g;
    }
    const acc_t mg = sg * inv_d, mgx = sgx * inv_d;
    if (dy_joins) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const acc_t xh = (to_acc(xr[j]) - mu) * r, dyv = to_acc(dyr[j]);
        dxr[j] = from_acc<scalar_t>(r * (to_acc(dhr[j]) * w[j] - mg - xh * mgx) + dyv);
        dbu[j] += dyv;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const acc_t xh = (to_acc(xr[j]) - mu) * r;
        dxr[j] = from_acc<scalar_t>(r * (to_acc(dhr[j]) * w[j] - mg - xh * mgx));
        dbu[j] += to_acc(dyr[j]);
      }
    }
  }
}

}  // namespace fastpeft::cpu::bottleneck_adapter
