// The kernels of multi_lora_linear on CPU (multi_lora_linear.cpp: the math and the
// orchestration), no ATen: grouping the rows by adapter, copying rows between the batch's
// order and the grouped order, and the forward's rank-R products for segments of at most
// kSmallRows rows (a serving batch's one-row segments), where a GEMM call's fixed cost
// (tens of microseconds for oneDNN's bf16 GEMMs) would exceed the products' own.
#pragma once

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
// Forward of a small chunk: m <= kSmallRows rows, each given by its own pointers (rows of
// x, or of a gathered buffer; rows of y and xa in place, wherever they are in the batch).
//   xa[j] = xd[j] @ A^T        (R dot products of length K, rounded to scalar_t)
//   y[j]  = b + s * xa[j] @ B^T (N dot products of length R, rounded once)
// in acc_t, with xa rounded before the up-projection as the ATen path's GEMMs do. Both
// products stream their adapter's matrix once, row after row, in its stored layout.
constexpr int64_t kSmallRows = 4;

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
    return __builtin_shufflevector(t0, t1, 0, 1, 4, 5) + __builtin_shufflevector(t0, t1, 2, 3, 6, 7);
  }
}

// xa[j][r] = xd[j] . A[r], two accumulator chains per row.
template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_down(const scalar_t* const* xd, const scalar_t* __restrict A,
                                int64_t R, int64_t K, scalar_t* const* xa) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Kv = K / (2 * L) * (2 * L);
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* a = A + r * K;
    V acc[MR][2];
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) acc[j][0] = acc[j][1] = V{};
    for (int64_t k = 0; k < Kv; k += 2 * L) {
      const V a0 = vload_acc(a + k), a1 = vload_acc(a + k + L);
#pragma GCC unroll 4
      for (int j = 0; j < MR; ++j) {
        acc[j][0] += vload_acc(xd[j] + k) * a0;
        acc[j][1] += vload_acc(xd[j] + k + L) * a1;
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) {
      acc_t sum = hsum<acc_t>(acc[j][0] + acc[j][1]);
      for (int64_t k = Kv; k < K; ++k) sum += to_acc(xd[j][k]) * to_acc(a[k]);
      xa[j][r] = static_cast<scalar_t>(sum);
    }
  }
}

// y[j][n] = bias[n] + s * xa[j] . B[n], L outputs at a time: the block's L rows of B are
// converted into bs (L, Rp) (zero-padded), each row's products summed over Rp / L vectors
// into p[l], and transpose_sum turns the L partial vectors into the L outputs.
// work: (MR + L) * Rp acc_t.
template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_up(scalar_t* const* xa, const scalar_t* __restrict B,
                              const scalar_t* __restrict bias, acc_t s, int64_t R, int64_t N,
                              scalar_t* const* y, acc_t* __restrict work) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Rp = round_up(R, L);
  acc_t* xs = work;           // (MR, Rp)  xa rows
  acc_t* bs = xs + MR * Rp;   // (L, Rp)   rows n0 .. n0 + L - 1 of B
  for (int j = 0; j < MR; ++j)
    for (int64_t r = 0; r < Rp; ++r) xs[j * Rp + r] = r < R ? to_acc(xa[j][r]) : acc_t(0);
  std::fill(bs, bs + L * Rp, acc_t(0));
  const bool whole = R % L == 0;
  for (int64_t n0 = 0; n0 < N; n0 += L) {
    const int64_t nb = std::min<int64_t>(L, N - n0);
    for (int64_t l = 0; l < nb; ++l) {
      const scalar_t* b = B + (n0 + l) * R;
      if (whole) {
        for (int64_t r = 0; r < R; r += L) vstore(bs + l * Rp + r, vload_acc(b + r));
      } else {
        for (int64_t r = 0; r < R; ++r) bs[l * Rp + r] = to_acc(b[r]);
      }
    }
    if (nb < L) std::fill(bs + nb * Rp, bs + L * Rp, acc_t(0));
    acc_t bias_lanes[L];
    for (int l = 0; l < L; ++l)
      bias_lanes[l] = bias != nullptr && l < nb ? to_acc(bias[n0 + l]) : acc_t(0);
    const V bv = vload(bias_lanes), sv = vbroadcast(s);
    for (int j = 0; j < MR; ++j) {
      V p[L];
#pragma GCC unroll 8
      for (int l = 0; l < L; ++l) {
        V acc = V{};
        for (int64_t r = 0; r < Rp; r += L) acc += vload(bs + l * Rp + r) * vload(xs + j * Rp + r);
        p[l] = acc;
      }
      lora_branch::store_vec<scalar_t, acc_t>(y[j] + n0, bv + sv * transpose_sum<acc_t>(p), nb);
    }
  }
}

template <int MR, typename scalar_t, typename acc_t>
FASTPEFT_INLINE void small_forward_rows(const scalar_t* const* xd, const scalar_t* A,
                                        const scalar_t* B, const scalar_t* bias, acc_t s,
                                        int64_t R, int64_t K, int64_t N, scalar_t* const* xa,
                                        scalar_t* const* y, acc_t* work) {
  small_down<MR, scalar_t, acc_t>(xd, A, R, K, xa);
  small_up<MR>(xa, B, bias, s, R, N, y, work);
}

// m <= kSmallRows rows: xd[j] (K), xa[j] (R), y[j] (N) their row pointers; A (R, K) and
// B (N, R) the adapter's; bias (N) or nullptr; work: (kSmallRows + lanes) * Rp acc_t.
template <typename scalar_t, typename acc_t = acc_of<scalar_t>>
FASTPEFT_MULTIVERSION void small_forward(const scalar_t* const* xd, int64_t m,
                                         const scalar_t* A, const scalar_t* B,
                                         const scalar_t* bias, acc_t s, int64_t R, int64_t K,
                                         int64_t N, scalar_t* const* xa, scalar_t* const* y,
                                         acc_t* work) {
  switch (m) {
    case 1: return small_forward_rows<1>(xd, A, B, bias, s, R, K, N, xa, y, work);
    case 2: return small_forward_rows<2>(xd, A, B, bias, s, R, K, N, xa, y, work);
    case 3: return small_forward_rows<3>(xd, A, B, bias, s, R, K, N, xa, y, work);
    default: return small_forward_rows<4>(xd, A, B, bias, s, R, K, N, xa, y, work);
  }
}

}  // namespace fastpeft::cpu::multi_lora_linear
