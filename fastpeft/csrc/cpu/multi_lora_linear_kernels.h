// The kernels of multi_lora_linear on CPU (multi_lora_linear.cpp: the math and the
// orchestration), no ATen: grouping the rows by adapter, copying rows between the batch's
// order and the grouped order, and the rank-R products of segments of at most kSmallRows
// rows (a serving batch's one-row segments, a training batch of many short sequences),
// where a GEMM call's fixed cost (tens of microseconds for oneDNN's bf16 GEMMs, and a
// segment's backward takes four) would exceed the products' own.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/lora_branch_kernels.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::multi_lora_linear {

// The rows of a batch grouped by adapter: a stable counting sort of adapter_ids (T,) with
// values in [-1, n), O(T + n). Adapter i's rows are order[offset[i] : offset[i + 1]],
// ascending; the rows with id -1 (the base alone) are in `base`, ascending.
struct Grouping {
  std::vector<int64_t> order;   // the active rows, by adapter
  std::vector<int64_t> offset;  // n + 1
  std::vector<int64_t> base;    // rows with id -1
  int64_t bad_row = -1;         // the first row whose id is out of range, -1 if none

  int64_t rows(int64_t i) const { return offset[i + 1] - offset[i]; }
  // whether adapter i's rows are consecutive rows of the batch (then its blocks are
  // views of the batch's tensors, read and written in place)
  bool consecutive(int64_t i) const {
    const int64_t m = rows(i);
    return m > 0 && order[offset[i] + m - 1] - order[offset[i]] == m - 1;
  }
};

inline Grouping group_rows(const int64_t* ids, int64_t T, int64_t n) {
  Grouping g;
  g.offset.assign(static_cast<size_t>(n + 1), 0);
  std::vector<int64_t>& count = g.offset;  // count[i + 1]: rows of adapter i
  int64_t base_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id == -1) {
      ++base_rows;
    } else if (id >= 0 && id < n) {
      ++count[id + 1];
    } else {
      g.bad_row = t;
      return g;
    }
  }
  for (int64_t i = 0; i < n; ++i) count[i + 1] += count[i];  // now the offsets
  g.order.resize(static_cast<size_t>(T - base_rows));
  g.base.reserve(static_cast<size_t>(base_rows));
  std::vector<int64_t> next(g.offset.begin(), g.offset.end() - 1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id < 0)
      g.base.push_back(t);
    else
      g.order[next[id]++] = t;
  }
  return g;
}

// Rows of `width` elements of `elem` bytes, row strides ld_* in elements.
// gather:  dst[j] = src[rows[j]];  scatter: dst[rows[j]] = src[j]   (j < n)
inline void gather_rows(const void* src, int64_t ld_src, const int64_t* rows, int64_t n,
                        void* dst, int64_t ld_dst, int64_t width, size_t elem) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  for (int64_t j = 0; j < n; ++j)
    std::memcpy(d + j * ld_dst * elem, s + rows[j] * ld_src * elem, width * elem);
}

inline void scatter_rows(const void* src, int64_t ld_src, const int64_t* rows, int64_t n,
                         void* dst, int64_t ld_dst, int64_t width, size_t elem) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  for (int64_t j = 0; j < n; ++j)
    std::memcpy(d + rows[j] * ld_dst * elem, s + j * ld_src * elem, width * elem);
}

// dst[rows[j]] = value (one row of `width` elements), or zeros when value is null
inline void fill_rows(const void* value, const int64_t* rows, int64_t n, void* dst,
                      int64_t ld_dst, int64_t width, size_t elem) {
  char* d = static_cast<char*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    if (value != nullptr)
      std::memcpy(d + rows[j] * ld_dst * elem, value, width * elem);
    else
      std::memset(d + rows[j] * ld_dst * elem, 0, width * elem);  // 0.0 in every float type
  }
}

// dst[j] = value for j < m (one row of `width` elements)
inline void fill_block(const void* value, int64_t m, void* dst, int64_t ld_dst, int64_t width,
                       size_t elem) {
  char* d = static_cast<char*>(dst);
  for (int64_t j = 0; j < m; ++j) std::memcpy(d + j * ld_dst * elem, value, width * elem);
}

// ---------------------------------------------------------------------------------------
// Small segments: m <= kSmallRows rows, each given by its own pointers (rows of x, dy, or
// of a gathered buffer; rows of y, xa, dx in place, wherever they are in the batch), in
// blocks of kBlockRows rows whose accumulators stay in registers. Every product streams
// its adapter's matrix in its stored layout, once per block; accumulation in acc_t.
constexpr int64_t kSmallRows = 8;
constexpr int kBlockRows = 4;

// A small segment's products stream the adapter's matrices from memory with little
// arithmetic per byte, so the kernels fetch kPrefetchBytes ahead of their reads, across
// rows and pages (where the hardware prefetchers stop), to keep the stream going while
// they compute. Past the end of a matrix this touches nothing (prefetches do not fault).
constexpr int64_t kPrefetchBytes = 1024;

template <typename T>
FASTPEFT_INLINE void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// L consecutive elements as a vector of the accumulation type.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>,
          typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE V vload_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return vload(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // a widening shift
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    V v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
  } else {
    constexpr int L = VecT<acc_t>::lanes;
    acc_t t[L];
    for (int l = 0; l < L; ++l) t[l] = to_acc(p[l]);
    return vload(t);
  }
}

// dst[0 : n] = v[0 : n] in scalar_t, n <= lanes. bfloat16 rounds to nearest even on the
// bits of a whole vector (NaN kept a quiet NaN), as c10's conversion does lane by lane,
// which does not vectorise; the other types go through lora_branch::store_vec.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>,
          typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void store_acc(scalar_t* dst, V v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    typedef int32_t i32x8 __attribute__((vector_size(32)));
    u32x8 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const i32x8 nan = v != v;  // all ones where NaN
    rounded = (rounded & ~u32x8(nan)) | (u32x8(nan) & 0x7FC0u);
    const u16x8 h = __builtin_convertvector(rounded, u16x8);
    if (n == 8) {
      std::memcpy(dst, &h, sizeof(h));
    } else {
      uint16_t t[8];
      std::memcpy(t, &h, sizeof(h));
      std::memcpy(dst, t, static_cast<size_t>(n) * sizeof(uint16_t));
    }
  } else {
    lora_branch::store_vec<scalar_t, acc_t>(dst, v, n);
  }
}

// Lane l of the result = the sum of the lanes of p[l] (L vectors in, one out): the
// horizontal sums of L dot products at once, in a shuffle-and-add tree.
template <typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE V transpose_sum(const V* p) {
  if constexpr (VecT<acc_t>::lanes == 8) {
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
    auto hadd = [](V a, V b) {
      return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
             __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    const V u0 = hadd(hadd(p[0], p[1]), hadd(p[2], p[3]));  // [p0..p3 low | p0..p3 high]
    const V u1 = hadd(hadd(p[4], p[5]), hadd(p[6], p[7]));
    return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
  } else {
    // hadd(a, b) = [a0+a1, b0+b1, a2+a3, b2+b3]
    auto hadd = [](V a, V b) {
      return __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
    };
    const V t0 = hadd(p[0], p[1]), t1 = hadd(p[2], p[3]);
    return __builtin_shufflevector(t0, t1, 0, 1, 4, 5) +
           __builtin_shufflevector(t0, t1, 2, 3, 6, 7);
  }
}

// xa[j][r] = xd[j] . A[r], two accumulator chains per row. xd rows that are not acc_t
// are converted once into xs (MR, K) rather than at every r.
template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_down(const scalar_t* const* xd, const scalar_t* __restrict A,
                                int64_t R, int64_t K, scalar_t* const* xa,
                                acc_t* __restrict xs) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Kv = K / (2 * L) * (2 * L);
  const acc_t* x[MR];
  for (int j = 0; j < MR; ++j) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      x[j] = xd[j];
    } else {
      acc_t* o = xs + j * K;
      int64_t k = 0;
      for (; k + L <= K; k += L) vstore(o + k, vload_acc(xd[j] + k));
      for (; k < K; ++k) o[k] = to_acc(xd[j][k]);
      x[j] = o;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* a = A + r * K;
    V acc[MR][2];
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) acc[j][0] = acc[j][1] = V{};
    for (int64_t k = 0; k < Kv; k += 2 * L) {
      prefetch_ahead(a + k);
      const V a0 = vload_acc(a + k), a1 = vload_acc(a + k + L);
#pragma GCC unroll 4
      for (int j = 0; j < MR; ++j) {
        acc[j][0] += vload(x[j] + k) * a0;
        acc[j][1] += vload(x[j] + k + L) * a1;
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) {
      acc_t sum = hsum<acc_t>(acc[j][0] + acc[j][1]);
      for (int64_t k = Kv; k < K; ++k) sum += x[j][k] * to_acc(a[k]);
      xa[j][r] = static_cast<scalar_t>(sum);
    }
  }
}

// y[j][n] = bias[n] + s * xa[j] . B[n], L outputs at a time: each of the block's L rows of
// B gives a vector of products (summed over R / L vectors) p[l], and transpose_sum turns
// the L vectors into the L outputs. Rows of B are read in place when R is a multiple of L,
// else converted into bs (L, Rp), zero-padded. work: (MR + L) * Rp acc_t.
template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_up(scalar_t* const* xa, const scalar_t* __restrict B,
                              const scalar_t* __restrict bias, acc_t s, int64_t R, int64_t N,
                              scalar_t* const* y, acc_t* __restrict work) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Rp = round_up(R, L);
  acc_t* xs = work;           // (MR, Rp)  xa rows
  acc_t* bs = xs + MR * Rp;   // (L, Rp)   rows n0 .. n0 + L - 1 of B, if R % L != 0
  for (int j = 0; j < MR; ++j)
    for (int64_t r = 0; r < Rp; ++r) xs[j * Rp + r] = r < R ? to_acc(xa[j][r]) : acc_t(0);
  const bool whole = R % L == 0;
  const V sv = vbroadcast(s);
  const int64_t Nv = N / L * L;
  for (int64_t n0 = 0; n0 < N; n0 += L) {
    const int64_t nb = std::min<int64_t>(L, N - n0);
    const bool full = n0 < Nv;
    if (!whole || !full) {  // rows through bs: a ragged R, or the last block of N
      std::fill(bs, bs + L * Rp, acc_t(0));
      for (int64_t l = 0; l < nb; ++l)
        for (int64_t r = 0; r < R; ++r) bs[l * Rp + r] = to_acc(B[(n0 + l) * R + r]);
    }
    V bv = V{};
    if (bias != nullptr) {
      if (full) {
        bv = vload_acc(bias + n0);
      } else {
        acc_t t[L] = {};
        for (int64_t l = 0; l < nb; ++l) t[l] = to_acc(bias[n0 + l]);
        bv = vload(t);
      }
    }
    for (int j = 0; j < MR; ++j) {
      const acc_t* xj = xs + j * Rp;
      V p[L];
      if (whole && full) {
        const scalar_t* b = B + n0 * R;
        if (j == 0)
          for (int64_t e = 0; e < L * R; e += 64 / static_cast<int64_t>(sizeof(scalar_t)))
            prefetch_ahead(b + e);
#pragma GCC unroll 8
        for (int l = 0; l < L; ++l) {
          V acc = V{};
          for (int64_t r = 0; r < R; r += L) acc += vload_acc(b + l * R + r) * vload(xj + r);
          p[l] = acc;
        }
      } else {
#pragma GCC unroll 8
        for (int l = 0; l < L; ++l) {
          V acc = V{};
          for (int64_t r = 0; r < Rp; r += L) acc += vload(bs + l * Rp + r) * vload(xj + r);
          p[l] = acc;
        }
      }
      store_acc<scalar_t, acc_t>(y[j] + n0, bv + sv * transpose_sum<acc_t>(p), nb);
    }
  }
}

template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_forward_rows(const scalar_t* const* xd, const scalar_t* A,
                                        const scalar_t* B, const scalar_t* bias, acc_t s,
                                        int64_t R, int64_t K, int64_t N, scalar_t* const* xa,
                                        scalar_t* const* y, acc_t* work) {
  constexpr int L = VecT<acc_t>::lanes;
  small_down<MR, scalar_t, acc_t>(xd, A, R, K, xa, work + (kBlockRows + L) * round_up(R, L));
  small_up<MR>(xa, B, bias, s, R, N, y, work);
}

// Forward: xa[j] = xd[j] @ A^T (R dot products of length K, rounded to scalar_t) and
// y[j] = b + s * xa[j] @ B^T (N dot products of length R, rounded once), xa rounded before
// the up-projection as the ATen path's GEMMs do. xd[j] (K), xa[j] (R), y[j] (N) are the
// rows' pointers; A (R, K) and B (N, R) the adapter's; bias (N) or nullptr;
// work: (kBlockRows + lanes) * Rp + kBlockRows * K acc_t, Rp = R rounded up to lanes.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void small_forward(const scalar_t* const* xd, int64_t m,
                                         const scalar_t* A, const scalar_t* B,
                                         const scalar_t* bias, acc_t s, int64_t R, int64_t K,
                                         int64_t N, scalar_t* const* xa, scalar_t* const* y,
                                         acc_t* work) {
  for (int64_t j = 0; j < m; j += kBlockRows) {
    switch (std::min<int64_t>(kBlockRows, m - j)) {
      case 1: small_forward_rows<1>(xd + j, A, B, bias, s, R, K, N, xa + j, y + j, work); break;
      case 2: small_forward_rows<2>(xd + j, A, B, bias, s, R, K, N, xa + j, y + j, work); break;
      case 3: small_forward_rows<3>(xd + j, A, B, bias, s, R, K, N, xa + j, y + j, work); break;
      default: small_forward_rows<4>(xd + j, A, B, bias, s, R, K, N, xa + j, y + j, work); break;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward of a small segment (its m rows, one task), in two calls around the caller's
// dropout pass (which gathers xd and masks dx's LoRA term with one draw):
//   small_backward_dy:  sdyB[j] = s * dy[j] @ B   (m, R), kept in acc_t for the dA call
//                       dB      = Σ_j dy[j]^T (s * xa[j])            (N, R)
//                       dxl[j]  = sdyB[j] @ A                         (K), if dxl is given
//   small_backward_dA:  dA      = Σ_j sdyB[j]^T xd[j]                 (R, K)
// R is processed in slices of 2 * lanes (Rq = R rounded up to them), the rows in blocks
// of kBlockRows. Unlike the ATen path, sdyB and s * xa are not rounded to scalar_t.

// The outputs per chunk of small_dy's sum over N (see there).
constexpr int64_t kDyChunk = 256;

// One block of MR rows and one slice [r0, r0 + 2L) of R, one pass over the rows of B:
//   acc[j] += dy[j][n] * B[n, slice]   (sdyB)     g += dy[j][n] * sxa[j][slice]   (dB[n])
// dB[n, slice] is written when this is the last block; earlier blocks leave their partial
// sums in dB_acc (N, Rq), which the next block continues.
template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_dy(const scalar_t* const* dy, const acc_t* __restrict sxa,
                              const scalar_t* __restrict B, acc_t s, int64_t R, int64_t Rq,
                              int64_t r0, int64_t N, bool first, bool last,
                              acc_t* __restrict dB_acc, scalar_t* __restrict dB,
                              acc_t* __restrict sdyB) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const bool whole = r0 + 2 * L <= R;
  V acc[MR][2], xr[MR][2];
#pragma GCC unroll 4
  for (int j = 0; j < MR; ++j) {
    xr[j][0] = vload(sxa + j * Rq + r0), xr[j][1] = vload(sxa + j * Rq + r0 + L);
    vstore(sdyB + j * Rq + r0, V{}), vstore(sdyB + j * Rq + r0 + L, V{});
  }
  // The sum over N in chunks of kDyChunk, each from zero in registers, then onto sdyB: one
  // chain of fp32 adds over all N (an lm_head's 32000) had ~3x the reference's error in dx
  // and dA (as lora_branch's kDownChunk for xa).
  for (int64_t n0 = 0; n0 < N; n0 += kDyChunk) {
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) acc[j][0] = acc[j][1] = V{};
    for (int64_t n = n0; n < std::min(N, n0 + kDyChunk); ++n) {
      const scalar_t* b = B + n * R + r0;
      prefetch_ahead(b);
      V b0, b1;
      if (whole) {
        b0 = vload_acc(b), b1 = vload_acc(b + L);
      } else {  // the last slice of R, zero-padded
        acc_t t[2 * L];
        for (int l = 0; l < 2 * L; ++l) t[l] = r0 + l < R ? to_acc(b[l]) : acc_t(0);
        b0 = vload(t), b1 = vload(t + L);
      }
      V g0 = first ? V{} : vload(dB_acc + n * Rq + r0);
      V g1 = first ? V{} : vload(dB_acc + n * Rq + r0 + L);
#pragma GCC unroll 4
      for (int j = 0; j < MR; ++j) {
        const V d = vbroadcast(to_acc(dy[j][n]));
        acc[j][0] += d * b0, acc[j][1] += d * b1;
        g0 += d * xr[j][0], g1 += d * xr[j][1];
      }
      if (last) {
        scalar_t* o = dB + n * R + r0;
        store_acc<scalar_t, acc_t>(o, g0, std::min<int64_t>(L, R - r0));
        if (R - r0 > L) store_acc<scalar_t, acc_t>(o + L, g1, std::min<int64_t>(L, R - r0 - L));
      } else {
        vstore(dB_acc + n * Rq + r0, g0), vstore(dB_acc + n * Rq + r0 + L, g1);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) {
      acc_t* o = sdyB + j * Rq + r0;
      vstore(o, vload(o) + acc[j][0]), vstore(o + L, vload(o + L) + acc[j][1]);
    }
  }
  const V sv = vbroadcast(s);
#pragma GCC unroll 4
  for (int j = 0; j < MR; ++j) {
    acc_t* o = sdyB + j * Rq + r0;
    vstore(o, sv * vload(o)), vstore(o + L, sv * vload(o + L));
  }
}

// dxl[j][k] = Σ_r sdyB[j][r] * A[r][k] for a block of MR rows, 2L columns at a time.
template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_dxl(const acc_t* __restrict sdyB, int64_t Rq,
                               const scalar_t* __restrict A, int64_t R, int64_t K,
                               scalar_t* const* dxl) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Kv = K / (2 * L) * (2 * L);
  for (int64_t k0 = 0; k0 < Kv; k0 += 2 * L) {
    V acc[MR][2];
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) acc[j][0] = acc[j][1] = V{};
    for (int64_t r = 0; r < R; ++r) {
      prefetch_ahead(A + r * K + k0);
      const V a0 = vload_acc(A + r * K + k0), a1 = vload_acc(A + r * K + k0 + L);
#pragma GCC unroll 4
      for (int j = 0; j < MR; ++j) {
        const V b = vbroadcast(sdyB[j * Rq + r]);
        acc[j][0] += b * a0, acc[j][1] += b * a1;
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) {
      store_acc<scalar_t, acc_t>(dxl[j] + k0, acc[j][0], L);
      store_acc<scalar_t, acc_t>(dxl[j] + k0 + L, acc[j][1], L);
    }
  }
  for (int64_t k = Kv; k < K; ++k)
    for (int j = 0; j < MR; ++j) {
      acc_t sum = 0;
      for (int64_t r = 0; r < R; ++r) sum += sdyB[j * Rq + r] * to_acc(A[r * K + k]);
      dxl[j][k] = static_cast<scalar_t>(sum);
    }
}

// dy[j] (N), xa[j] (R) and, if dxl is not null, dxl[j] (K, written) the rows' pointers;
// A (R, K), B (N, R) and dB (N, R, written) the adapter's. sdyB: (m, Rq) acc_t, written.
// work: m * Rq + (m > kBlockRows ? N * Rq : 0) acc_t.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void small_backward_dy(const scalar_t* const* dy,
                                             const scalar_t* const* xa, int64_t m,
                                             const scalar_t* A, const scalar_t* B, acc_t s,
                                             int64_t R, int64_t K, int64_t N, scalar_t* dB,
                                             scalar_t* const* dxl, acc_t* sdyB, acc_t* work) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Rq = round_up(R, 2 * L);
  acc_t* sxa = work;           // (m, Rq)  s * xa, zero-padded
  acc_t* dB_acc = sxa + m * Rq;  // (N, Rq)  dB's partial sums between blocks
  for (int64_t j = 0; j < m; ++j)
    for (int64_t r = 0; r < Rq; ++r) sxa[j * Rq + r] = r < R ? s * to_acc(xa[j][r]) : acc_t(0);
  for (int64_t r0 = 0; r0 < Rq; r0 += 2 * L) {
    for (int64_t j = 0; j < m; j += kBlockRows) {
      const bool first = j == 0, last = j + kBlockRows >= m;
      const acc_t* x = sxa + j * Rq;
      acc_t* o = sdyB + j * Rq;
      switch (std::min<int64_t>(kBlockRows, m - j)) {
        case 1: small_dy<1>(dy + j, x, B, s, R, Rq, r0, N, first, last, dB_acc, dB, o); break;
        case 2: small_dy<2>(dy + j, x, B, s, R, Rq, r0, N, first, last, dB_acc, dB, o); break;
        case 3: small_dy<3>(dy + j, x, B, s, R, Rq, r0, N, first, last, dB_acc, dB, o); break;
        default: small_dy<4>(dy + j, x, B, s, R, Rq, r0, N, first, last, dB_acc, dB, o); break;
      }
    }
  }
  if (dxl == nullptr) return;
  for (int64_t j = 0; j < m; j += kBlockRows) {
    const acc_t* b = sdyB + j * Rq;
    switch (std::min<int64_t>(kBlockRows, m - j)) {
      case 1: small_dxl<1>(b, Rq, A, R, K, dxl + j); break;
      case 2: small_dxl<2>(b, Rq, A, R, K, dxl + j); break;
      case 3: small_dxl<3>(b, Rq, A, R, K, dxl + j); break;
      default: small_dxl<4>(b, Rq, A, R, K, dxl + j); break;
    }
  }
}

// dA[r][k] = Σ_j sdyB[j][r] * xd[j][k], 2L columns at a time: the columns' xd block is
// converted once into xs (m, 2L) and serves every r. sdyB: (m, Rq) from small_backward_dy;
// xd[j] (K) the rows' pointers; dA (R, K) written. work: m * 2 * lanes acc_t.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void small_backward_dA(const acc_t* sdyB, const scalar_t* const* xd,
                                             int64_t m, int64_t R, int64_t K, scalar_t* dA,
                                             acc_t* work) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Rq = round_up(R, 2 * L), Kv = K / (2 * L) * (2 * L);
  acc_t* xs = work;
  for (int64_t k0 = 0; k0 < Kv; k0 += 2 * L) {
    for (int64_t j = 0; j < m; ++j) {
      vstore(xs + j * 2 * L, vload_acc(xd[j] + k0));
      vstore(xs + j * 2 * L + L, vload_acc(xd[j] + k0 + L));
    }
    for (int64_t r = 0; r < R; ++r) {
      V g0 = V{}, g1 = V{};
      for (int64_t j = 0; j < m; ++j) {
        const V b = vbroadcast(sdyB[j * Rq + r]);
        g0 += b * vload(xs + j * 2 * L), g1 += b * vload(xs + j * 2 * L + L);
      }
      store_acc<scalar_t, acc_t>(dA + r * K + k0, g0, L);
      store_acc<scalar_t, acc_t>(dA + r * K + k0 + L, g1, L);
    }
  }
  for (int64_t k = Kv; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) {
      acc_t sum = 0;
      for (int64_t j = 0; j < m; ++j) sum += sdyB[j * Rq + r] * to_acc(xd[j][k]);
      dA[r * K + k] = static_cast<scalar_t>(sum);
    }
}

}  // namespace fastpeft::cpu::multi_lora_linear
