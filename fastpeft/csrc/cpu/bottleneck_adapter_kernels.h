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

#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

namespace fastpeft::cpu::bottleneck_adapter {

// dst[0 : n] = src[0 : n] in acc_t (fp16 / bf16 blocks into fp32 scratch).
template <typename scalar_t, typename acc_t>
FASTPEFT_MULTIVERSION void load_block(const scalar_t* __restrict src, int64_t n,
                                      acc_t* __restrict dst) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] = to_acc(src[e]);
}

// Layer-norm statistics of each row: mean, then the biased variance as the mean of the
// squared deviations (two passes over a cached row, so no E[x^2] - E[x]^2 cancellation
// for rows with a large mean), rstd = 1 / sqrt(var + eps).
template <typename acc_t>
FASTPEFT_MULTIVERSION void ln_stats(const acc_t* __restrict x, int64_t rows, int64_t d,
                                    acc_t eps, acc_t* __restrict mean, acc_t* __restrict rstd) {
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* xr = x + i * d;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < d; ++j) sum += xr[j];
    const acc_t mu = sum * inv_d;
    acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < d; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
    mean[i] = mu;
    rstd[i] = acc_t(1) / std::sqrt(sq * inv_d + eps);
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

}  // namespace fastpeft::cpu::bottleneck_adapter
