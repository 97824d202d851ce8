// Fused int8 weight-only LoRA linear, CPU: the ops fastpeft::int8_lora_linear and
// int8_lora_linear_backward.
//
//   x (T, K)  qweight Q (N, K) int8  weight_scale sc (N,) fp32  bias b (N,)
//   lora_A A (R, K)  lora_B B (N, R)  scaling s
//   W = Q ⊙ sc[:, None], the frozen base weight, never materialised in full
//
// This is lora_linear (see lora_linear.cpp for the LoRA math and its derivation) with W
// in place of the float weight. The LoRA branch is lora_linear's own code (lora_parts.cpp,
// lora_linear_kernels.h, philox.h), so dropout masks are bit-identical between the ops.
//
// Forward:   xa = xd @ A^T,  y = b + s * xa @ B^T + x @ W^T,
//            x @ W^T = sc[n] * Σ_k x[t, k] * Q[n, k]           (the scale factors out)
// Backward:  dx, dA, dB = LoRA part:  dB = s * dy^T @ xa,  dA = s * (dy @ B)^T @ xd,
//                                     dx = c * m ⊙ (s * (dy @ B) @ A)
//            dx += dy @ W = Σ_n (dy[t, n] * sc[n]) * Q[n, k]    (the scale folds into dy)
// W gets no gradient (frozen); d bias = Σ_t dy is taken by the autograd kernel
// (csrc/autograd.cpp).
//
// The base GEMMs have two paths, by the number of rows T:
// * T <= kDecodeMaxRows (decode): memory-bound, so the kernels of int8_gemm_kernels.h
//   stream Q once, one byte per weight, widening it in registers. The forward also fuses
//   the LoRA branch (int8_lora_decode_forward): at this size packing A and B for the
//   LoRA kernels would cost a sizeable part of the whole op. With fp32 accumulation on
//   AVX2 the base product is a GEMV kernel of its own (int8_gemv_forward), in passes of
//   4 rows, and the forward takes this path up to kGemvMaxRows. The backward accumulates
//   onto the LoRA part's dx.
// * larger T: compute-bound, so ATen's GEMM (MKL) does the arithmetic on tiles of W
//   dequantised into a per-thread fp32 (fp64) buffer sized for L2, accumulating onto the
//   LoRA part's y / dx (beta = 1); threads take disjoint tiles of the output columns, and
//   the GEMM nested inside at::parallel_for runs single-threaded. A tile is dequantised
//   once per use, 1/T of the GEMM's work. fp16 / bf16 operands are converted to fp32
//   once, and the result rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/int8_gemm_kernels.h"
#include "cpu/lora_linear.h"
#include "cpu/lora_linear_kernels.h"
#include "cpu/philox.h"
#include "cpu/simd.h"

namespace fastpeft::cpu {
namespace {

// Up to this many rows the streaming kernels beat dequantise + GEMM: the tile kernels (and
// the backward's dx kernel) up to kDecodeMaxRows (measured on a 2-core Zen 3, K = N =
// 4096: by ~1.3x at T = 16; even at T ~ 24; the GEMM path ahead at 32), the forward's
// AVX2 GEMV, in passes of 4 rows, up to kGemvMaxRows (same machine, 2 threads, forward
// with cold caches, GEMV against dequantise + GEMM at T = 32, two runs: 8.3 - 9.0 against
// 12.6 - 13.1 ms at K = N = 4096, 2.3 - 2.5 against 3.7 - 4.1 at 2048, 0.85 - 0.96
// against 1.2 - 1.4 at 1024, 0.20 - 0.25 against 0.31 - 0.32 at 256; at T = 64 about
// even, GEMM ahead on small layers with warm caches).
constexpr int64_t kDecodeMaxRows = 16;
constexpr int64_t kGemvMaxRows = 32;

// Whether the forward's AVX2 GEMV runs (fp32 accumulation, on a CPU with AVX2 + FMA).
bool gemv_applies(const at::Tensor& x) {
#ifdef FASTPEFT_HAVE_AVX2_PATH
  return x.scalar_type() != at::kDouble && i8_have_gemv_avx2();
#else
  return false;
#endif
}
// Blocked path tiles of W, (rows of W) x (columns of W): 512 KiB of fp32, half of L2,
// leaving room for the GEMM's packed panels of x / dy.
constexpr int64_t kFwdTileN = 256, kFwdTileK = 512;  // forward: y[:, n-tile] +=
constexpr int64_t kBwdTileN = 512, kBwdTileK = 256;  // backward: dx[:, k-tile] +=

void check_int8_weight(const char* op, const at::Tensor& qweight,
                       const at::Tensor& weight_scale, int64_t K) {
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be 2-D, got shape ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must have dtype torch.int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.device().is_cpu(), op, ": qweight must be a CPU tensor, got ",
              qweight.device());
  TORCH_CHECK(qweight.is_contiguous(), op, ": qweight must be contiguous");
  check_size(op, qweight, "qweight", 1, K, "in_features of x");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(weight_scale.dim() == 1 && weight_scale.size(0) == N, op,
              ": weight_scale must have shape (", N, ",) (out_features of qweight), got ",
              weight_scale.sizes());
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat, op,
              ": weight_scale must have dtype torch.float32, got ", weight_scale.scalar_type());
  TORCH_CHECK(weight_scale.device().is_cpu(), op, ": weight_scale must be a CPU tensor, got ",
              weight_scale.device());
  TORCH_CHECK(weight_scale.is_contiguous(), op, ": weight_scale must be contiguous");
}

// The accumulation dtype of x's dtype: float64 for float64, float32 otherwise.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// xa (T, R) = xd @ A^T for the decode path, xd (T, K) and A (R, K) in acc_t: T x R dot
// products, NR rows of A at a time sharing each vector of xd.
template <int NR, typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE void i8_lora_dots(const acc_t* __restrict xd, const acc_t* __restrict A,
                                  int64_t K, acc_t* __restrict out) {
  constexpr int L = VecT<acc_t>::lanes;
  const int64_t Kv = K / L * L;
  V a[NR] = {};
  for (int64_t k = 0; k < Kv; k += L) {
    const V xv = vload(xd + k);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) a[j] += xv * vload(A + j * K + k);
  }
  for (int j = 0; j < NR; ++j) {
    acc_t sum = hsum<acc_t>(a[j]);
    for (int64_t k = Kv; k < K; ++k) sum += xd[k] * A[j * K + k];
    out[j] = sum;
  }
}

template <typename acc_t>
FASTPEFT_MULTIVERSION void i8_lora_down_kernel(const acc_t* __restrict xd,
                                               const acc_t* __restrict A, int64_t T, int64_t K,
                                               int64_t R, acc_t* __restrict xa) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) i8_lora_dots<4>(xd + t * K, A + r * K, K, xa + t * R + r);
    for (; r < R; ++r) i8_lora_dots<1>(xd + t * K, A + r * K, K, xa + t * R + r);
  }
}

// The decode forward's base GEMM at T <= kGemvMaxRows with fp32 accumulation, on AVX2 +
// FMA: the GEMV kernel i8_gemv_avx2 and its epilogue, y = b + s * xa @ B^T + x @ W^T (see
// int8_gemm_kernels.h for why it beats the tile kernel there). Returns false where it does
// not apply, and the tile kernel runs instead.
template <typename scalar_t, typename acc_t>
bool int8_gemv_forward(const scalar_t* xs, const at::Tensor& q, const at::Tensor& scale,
                       const I8LoraUp<scalar_t, acc_t>& up, int64_t T, int64_t K, int64_t N,
                       scalar_t* y) {
#ifdef FASTPEFT_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (T > kGemvMaxRows || !i8_have_gemv_avx2()) return false;
    std::vector<float> x32;  // x in fp32, natural order
    const float* xf = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      xf = xs;
    } else {
      x32.assign(xs, xs + T * K);
      xf = x32.data();
    }
    // Threads take chunks of ~1 MiB of Q from a shared counter rather than fixed halves of
    // the rows: on cores shared with other processes one thread often runs slower, and the
    // op waits for the slowest (measured at load ~1.8, 2 threads, N = K = 4096: median
    // 0.60 - 0.67 ms against 0.62 - 0.82 ms with halves; chunks of 256 KiB - 4 MiB alike).
    // i8_gemv_avx2 streams a chunk as 3 or 4 sequential runs of rows. Past
    // kI8GemvPassRows rows it makes several passes over a chunk, which is then sized for
    // L2 (256 KiB of the 512 KiB) so that only the first pass reads Q from memory.
    const int64_t chunk_bytes = T <= kI8GemvPassRows ? int64_t{1} << 20 : int64_t{1} << 18;
    // A small layer is still split between the threads.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t chunk = std::max<int64_t>(
        1, std::min(div_up(N, threads),
                    std::max<int64_t>(kI8Streams, chunk_bytes / std::max<int64_t>(K, 1))));
    const int64_t chunks = div_up(N, chunk);
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(chunks, threads);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<float> dots(static_cast<size_t>(T * chunk));  // (T, chunk)
      std::vector<float> scratch(static_cast<size_t>(T * kI8Rows + up.R));
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        const int64_t begin = c * chunk, end = std::min(N, begin + chunk);
        for (int64_t t0 = 0; t0 < T; t0 += kI8GemvPassRows)
          i8_gemv_avx2(xf + t0 * K, std::min(kI8GemvPassRows, T - t0),
                       q.const_data_ptr<int8_t>(), K, begin, end, dots.data() + t0 * chunk,
                       chunk);
        i8_gemv_epilogue<scalar_t>(dots.data(), chunk, scale.const_data_ptr<float>(), up, y, T,
                                   N, begin, end, scratch.data());
      }
    });
    return true;
  }
#endif
  return false;
}

// Decode path forward (T <= kDecodeMaxRows, or kGemvMaxRows where the GEMV runs), the LoRA
// branch fused: returns (y, xa) with xa = xd @ A^T and y = b + s * xa @ B^T + x @ W^T,
// written once by the streaming kernel.
// xd is built as lora_fwd_kernel builds it (the same Philox words, dropout_keep_rows, and
// the same products, load_dropped), so the mask is bit-identical to lora_linear's; the
// rank-R products are small here (T x R x (K + N)) and need no packing of A or B.
std::tuple<at::Tensor, at::Tensor> int8_lora_decode_forward(
    const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, uint64_t seed) {
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), R = lora_A.size(0);
  at::Tensor y = at::empty({T, N}, x.options()), xa = at::empty({T, R}, x.options());
  if (T == 0) return {y, xa};
  const bool dropout = dropout_p > 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int8_decode", [&] {
    using acc_t = I8AccOf<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const int64_t groups = div_up(K, 4);
    const acc_t keep_scale = dropout ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
    std::vector<acc_t> xd(static_cast<size_t>(T * K));
    if (dropout) {  // as lora_fwd_kernel: keep holds c (float kernels) or 1 (double)
      const float keep_on = std::is_same_v<acc_t, float> ? static_cast<float>(keep_scale) : 1.0f;
      std::vector<float> keep(static_cast<size_t>(T * 4 * groups));
      dropout_keep_rows(seed, 0, groups, T, groups, dropout_threshold(dropout_p), keep_on,
                        keep.data(), 4 * groups);
      for (int64_t t = 0; t < T; ++t)
        load_dropped<scalar_t, acc_t, true>(xs + t * K, K, K, keep.data() + t * 4 * groups,
                                            keep_scale, xd.data() + t * K);
    } else {
      for (int64_t t = 0; t < T; ++t)
        load_dropped<scalar_t, acc_t, false>(xs + t * K, K, K, nullptr, 1, xd.data() + t * K);
    }
    // xa in acc_t, then s * xa for the epilogue (lora_fwd_kernel likewise uses the
    // unrounded xa for y)
    const at::Tensor A = lora_A.to(acc_type(x)).contiguous();  // no copy for fp32 / fp64
    std::vector<acc_t> sxa(static_cast<size_t>(T * R));
    i8_lora_down_kernel(xd.data(), A.const_data_ptr<acc_t>(), T, K, R, sxa.data());
    scalar_t* xa_out = xa.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < T * R; ++e) {
      xa_out[e] = static_cast<scalar_t>(sxa[e]);
      sxa[e] *= static_cast<acc_t>(scaling);
    }
    const I8LoraUp<scalar_t, acc_t> up{
        sxa.data(), lora_B.const_data_ptr<scalar_t>(),
        given(bias) ? bias->const_data_ptr<scalar_t>() : nullptr, R};
    if (int8_gemv_forward(xs, q, scale, up, T, K, N, y.mutable_data_ptr<scalar_t>())) return;
    // x in acc_t, lane-interleaved to match the widened groups of Q, times 2^-24
    std::vector<acc_t> xp(static_cast<size_t>(T * K));
    i8_permute_rows(xs, T, K, xp.data());
    const int64_t n_groups = div_up(N, kI8Rows);
    at::parallel_for(0, n_groups, work_grain(T * K * kI8Rows), [&](int64_t begin, int64_t end) {
      constexpr int64_t L = VecT<acc_t>::lanes;
      std::vector<acc_t> acc(static_cast<size_t>((T * L + T) * kI8Rows + R));
      i8_linear_decode_kernel<scalar_t, acc_t>(
          xp.data(), q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), up,
          y.mutable_data_ptr<scalar_t>(), T, K, N, begin * kI8Rows, std::min(N, end * kI8Rows),
          acc.data());
    });
  });
  return {y, xa};
}

// Blocked path: y (T, N) += x (T, K) @ W^T, y in x's dtype holding the LoRA part.
void add_int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     at::Tensor& y) {
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0);
  if (T == 0 || N == 0 || K == 0) return;
  const at::Tensor xc = x.to(acc_type(x)).contiguous();  // no copy for fp32 / fp64
  at::Tensor yc = y.scalar_type() == acc_type(x) ? y : y.to(acc_type(x));
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "int8_linear", [&] {
    const int64_t tiles = div_up(N, kFwdTileN);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(static_cast<size_t>(kFwdTileN * kFwdTileK));
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * kFwdTileN, nt = std::min(kFwdTileN, N - n0);
        at::Tensor y_tile = yc.narrow(1, n0, nt);  // (T, nt), row stride N: GEMM's ldc
        for (int64_t k0 = 0; k0 < K; k0 += kFwdTileK) {
          const int64_t kt = std::min(kFwdTileK, K - k0);
          i8_dequant_tile<scalar_t>(q.const_data_ptr<int8_t>() + n0 * K + k0, K,
                                    scale.const_data_ptr<float>() + n0, nt, kt, buf.data());
          const at::Tensor w = at::from_blob(buf.data(), {nt, kt}, xc.options());
          y_tile.addmm_(xc.narrow(1, k0, kt), w.t());
        }
      }
    });
  });
  if (!yc.is_same(y)) y.copy_(yc);
}

// dx (T, K) += dy (T, N) @ W, dx in x's dtype holding the LoRA term.
void add_int8_linear_dx(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& scale,
                        at::Tensor& dx) {
  const int64_t T = dy.size(0), N = dy.size(1), K = q.size(1);
  if (T == 0 || N == 0 || K == 0) return;
  const auto acc = acc_type(dy);
  if (T <= kDecodeMaxRows) {
    // (dy ⊙ sc)^T (N, T) times 2^-24 (see group_part): the scale folded into dy, one
    // cache line of it per row n
    const at::Tensor dyT = (dy.to(acc) * scale.to(acc)).mul_(kI8Unit).t().contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "int8_dx", [&] {
      using acc_t = I8AccOf<scalar_t>;
      const int64_t blocks = i8_dx_blocks<acc_t>(K);
      at::parallel_for(0, blocks, work_grain(T * N * kI8Cols), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc_buf(static_cast<size_t>(T * kI8Span * kI8Cols));
        i8_dx_decode_kernel<scalar_t, acc_t>(dyT.const_data_ptr<acc_t>(),
                                             q.const_data_ptr<int8_t>(),
                                             dx.mutable_data_ptr<scalar_t>(), T, K, N, begin,
                                             end, acc_buf.data());
      });
    });
    return;
  }
  const at::Tensor dyc = dy.to(acc).contiguous();
  at::Tensor dxc = dx.scalar_type() == acc ? dx : dx.to(acc);
  AT_DISPATCH_FLOATING_TYPES(dyc.scalar_type(), "int8_dx", [&] {
    const int64_t tiles = div_up(K, kBwdTileK);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(static_cast<size_t>(kBwdTileN * kBwdTileK));
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t k0 = tile * kBwdTileK, kt = std::min(kBwdTileK, K - k0);
        at::Tensor dx_tile = dxc.narrow(1, k0, kt);  // (T, kt), row stride K
        for (int64_t n0 = 0; n0 < N; n0 += kBwdTileN) {
          const int64_t nt = std::min(kBwdTileN, N - n0);
          i8_dequant_tile<scalar_t>(q.const_data_ptr<int8_t>() + n0 * K + k0, K,
                                    scale.const_data_ptr<float>() + n0, nt, kt, buf.data());
          const at::Tensor w = at::from_blob(buf.data(), {nt, kt}, dyc.options());
          dx_tile.addmm_(dyc.narrow(1, n0, nt), w);
        }
      }
    });
  });
  if (!dxc.is_same(dx)) dx.copy_(dxc);
}

// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> int8_lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastpeft::int8_lora_linear";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_int8_weight(op, qweight, weight_scale, x.size(1));
  const int64_t N = qweight.size(0);
  check_lora_branch(op, x, lora_A, lora_B, N, "qweight");
  check_bias(op, bias, N, x);
  const uint64_t seed_v = read_seed(op, dropout_p, seed);

  const int64_t T = x.size(0);
  if (T <= kDecodeMaxRows || (T <= kGemvMaxRows && gemv_applies(x)))
    return int8_lora_decode_forward(x, qweight, weight_scale, bias, lora_A, lora_B, scaling,
                                    dropout_p, seed_v);
  auto [y, xa] = lora_forward_part(x, bias, lora_A, lora_B, scaling, dropout_p, seed_v);
  add_int8_linear(x, qweight, weight_scale, y);  // onto y = b + s * xa @ B^T
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& weight_scale, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    bool compute_dx) {
  constexpr const char* op = "fastpeft::int8_lora_linear_backward";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_int8_weight(op, qweight, weight_scale, x.size(1));
  const int64_t N = qweight.size(0);
  check_lora_branch(op, x, lora_A, lora_B, N, "qweight");
  check_lora_grads(op, grad_y, x, xa, lora_A, N, "qweight");
  const uint64_t seed_v = read_seed(op, dropout_p, seed);

  auto [dx, dA, dB] = lora_backward_part(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p,
                                         seed_v, compute_dx);
  if (compute_dx) add_int8_linear_dx(grad_y, qweight, weight_scale, dx);  // onto the LoRA term
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("int8_lora_linear", &int8_lora_linear_cpu);
  m.impl("int8_lora_linear_backward", &int8_lora_linear_backward_cpu);
}

}  // namespace fastpeft::cpu
