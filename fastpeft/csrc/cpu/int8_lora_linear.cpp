// Fused int8 weight-only LoRA linear, CPU: the ops fastpeft::int8_lora_linear and
// int8_lora_linear_backward (argument checks, the choice of path, the threading); the
// kernels are in int8_lora_linear_kernels.h.
//
//   x (T, K)  qweight Q (N, K) int8  weight_scale sc (N,) fp32  bias b (N,)
//   lora_A A (R, K)  lora_B B (N, R)  scaling s
//   W = Q ⊙ sc[:, None], the frozen base weight, never materialised in full
//
// This is lora_linear with W in place of the float weight. Its LoRA branch is the module
// shared with lora_linear (lora_branch.h: the math and its derivation; lora_branch.cpp,
// lora_branch_kernels.h, philox.h), so dropout masks are bit-identical between the ops.
//
// Forward:   xa = xd @ A^T,  y = b + s * xa @ B^T + x @ W^T,
//            x @ W^T = sc[n] * Σ_k x[t, k] * Q[n, k]           (the scale factors out)
// Backward:  dx, dA, dB = LoRA part:  dB = s * dy^T @ xa,  dA = s * (dy @ B)^T @ xd,
//                                     dx = c * m ⊙ (s * (dy @ B) @ A)
//            dx += dy @ W = Σ_n (dy[t, n] * sc[n]) * Q[n, k]    (the scale folds into dy)
// W gets no gradient (frozen); d bias = Σ_t dy is taken by the autograd
// (csrc/linear_autograd.cpp).
//
// The base GEMMs have these paths, by the number of rows T and the dtype:
// * T <= kDecodeMaxRows (decode): memory-bound, so the kernels of
//   int8_lora_linear_kernels.h stream Q once, one byte per weight, widening it in
//   registers. The forward also fuses the LoRA branch (decode_forward): at this size
//   packing A and B for the lora_branch kernels would cost a sizeable part of the whole
//   op. With fp32 accumulation on AVX2 the base product is a GEMV kernel of its own
//   (gemv_forward), in passes of 4 rows, and the forward takes this path up to
//   kGemvMaxRows; for bf16 x on a CPU with AVX512_BF16 the GEMV multiplies Q widened to
//   bf16 with x as it lies by vdpbf16ps, in passes of 8 rows (gemv_bf16). The backward
//   accumulates onto the LoRA part's dx.
// * larger T: compute-bound, so ATen's GEMM does the arithmetic on tiles of W dequantised
//   into a per-thread buffer, accumulating onto the LoRA part's y / dx: dequant_gemm.h,
//   shared with nf4_lora_linear, which says how the tiles are sized and threaded (fp32
//   tiles sized for L2, or on the kAten path 16-bit tiles spanning the reduction).
// * bf16 dy of kBf16DxMinRows to kBf16DxMaxRows rows on a CPU with AVX512_BF16 (dx): Q
//   decoded into panels of bf16 pairs of rows and multiplied with dy ⊙ sc by vdpbf16ps
//   (bf16_dx.h, shared with nf4_lora_linear), accumulators in registers.
// Every path computes an output element the same way whatever the thread count: the tiles
// and row groups are fixed by the shapes, and each element's reduction over K (or N) runs
// on one thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <vector>

#include "cpu/bf16_dx.h"
#include "cpu/checks.h"
#include "cpu/cpu_path.h"
#include "cpu/dequant_gemm.h"
#include "cpu/int8_lora_linear_kernels.h"
#include "cpu/lora_branch.h"
#include "cpu/lora_branch_kernels.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::int8_lora_linear {
namespace {

// The row counts up to which the streaming kernels run instead of dequantise + GEMM: the
// tile kernels (and the backward's dx kernel) up to kDecodeMaxRows, the forward's AVX2
// GEMV, which makes passes of 4 rows, up to kGemvMaxRows. Past them the GEMM's arithmetic
// rate wins over reading Q once; the crossovers were chosen by timing both paths on
// K = N = 256 .. 4096 layers, and `fastpeft-bench --ops int8_lora_linear` measures the
// decode and prefill shapes on the machine at hand.
constexpr int64_t kDecodeMaxRows = 16;
constexpr int64_t kGemvMaxRows = 32;
// Rows of bf16 dy from which, and up to which on a CPU without AMX, dx takes AVX512_BF16's
// dot products (add_base_dx_bf16). On a Zen 4 VM (4096 x 4096, 2 threads, the op's backward
// with FASTPEFT_CPU_ISA=auto and =avx512 alternated in one process, each call from a cold
// cache, two runs) they took 3.4-4.0, 3.6-4.0, 5.4-6.2, 16.3-16.6 ms at T = 12, 16, 32,
// 128 against 4.5-5.1, 5.6-6.4, 9.0-11.2, 19.7 ms for dx_decode_kernel (T <= 16) and the
// fp32 / bf16 tiles; at T = 8 and 192 they were even, at T = 4 2.9 against 2.0 ms (the
// decode kernel streams Q by whole rows, the dots' runs of columns read 256 bytes of each).
// With AMX, whose bf16 GEMM this was not measured against, they stop below the bf16 tiles'
// dequant_gemm::kLowpDxMinRows.
constexpr int64_t kBf16DxMinRows = 9;
// Rows of bf16 x from which the forward's GEMV takes AVX512_BF16's dot products (gemv_bf16)
// instead of gemv_avx2 on x widened to fp32. `python benchmarks/rows_sweep.py --op int8
// --dtype bf16`, without and with FASTPEFT_CPU_ISA=avx512 (no dots), Zen 4 VM, 4096 x 4096,
// 2 threads, forward ms: T = 2 0.52-0.59 against 0.64-0.94, T = 4 0.66-0.93 against
// 1.05-1.72, T = 8 1.02-1.35 against 1.82-2.67, T = 16 2.39-2.62 against 4.01-4.53, T = 32
// 4.78-4.96 against 8.60-11.1 (passes of 16 rows, 128 KiB of x at K = 4096 against 64 KiB,
// took 7.1 and 13.0 ms at T = 16 and 32). One row stays on gemv_avx2: the dots were not
// measured there.
constexpr int64_t kGemvBf16MinRows = 2;
// Rows up to which the GEMV runs with those dots (bf16 x, cpu_bf16_dots), past
// kGemvMaxRows. `python benchmarks/rows_sweep.py --op int8 --dtype bf16 --rows 32 33 48 64
// --features 4096 --threads 2`, Zen 4 VM, forward ms, with the dots against
// FASTPEFT_CPU_ISA=avx512 (no dots: the tiles past 32 rows): T = 33 5.28 against 7.48,
// T = 48 7.85 against 8.65, T = 64 9.66 against 8.50 (one run each). The crossover is near
// 64 rows there; on a 2048 -> 5632 layer, 1 thread, the dots stayed ahead up to 64.
constexpr int64_t kGemvBf16MaxRows = 64;
constexpr int64_t kBf16DxMaxRows = 128;

// Whether the forward's GEMV kernels may run: a CPU with AVX2 + FMA, unless
// FASTPEFT_CPU_ISA=generic forces the tile kernel (multi-versioned) instead.
bool have_gemv() {
#ifdef FASTPEFT_HAVE_AVX2_PATH
  return have_gemv_avx2() && cpu_isa() != CpuIsa::kGeneric;
#else
  return false;
#endif
}

// Whether the forward's AVX2 GEMV runs (fp32 accumulation, have_gemv()).
bool gemv_applies(const at::Tensor& x) {
#ifdef FASTPEFT_HAVE_AVX2_PATH
  return x.scalar_type() != at::kDouble && have_gemv();
#else
  return false;
#endif
}

// qweight (N, K) int8, contiguous; weight_scale (N,) fp32, any stride. Returns
// weight_scale contiguous (a copy of its N elements only for a strided view).
at::Tensor checked_weight(const char* op, const at::Tensor& qweight,
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
  return weight_scale.contiguous();
}

// Whether the decode forward's GEMV of T rows takes AVX512_BF16's dot products
// (gemv_bf16): bf16 x of kGemvBf16MinRows or more, on a CPU that has them
// (FASTPEFT_CPU_ISA not forcing them off).
[[maybe_unused]] bool bf16_gemv(int64_t T) {
  return T >= kGemvBf16MinRows && cpu_bf16_dots();
}

// The rows up to which the forward's GEMV runs for x: kGemvBf16MaxRows where it takes the
// AVX512_BF16 dots, else kGemvMaxRows.
int64_t gemv_max_rows(const at::Tensor& x) {
#ifdef FASTPEFT_BF16_DX
  if (x.scalar_type() == at::kBFloat16 && bf16_gemv(kGemvBf16MinRows)) return kGemvBf16MaxRows;
#endif
  return kGemvMaxRows;
}

// The decode forward's base GEMM at T <= kGemvMaxRows with fp32 accumulation, on AVX2 +
// FMA: the GEMV kernel gemv_avx2 and its epilogue, y = b + s * xa @ B^T + x @ W^T (see
// int8_lora_linear_kernels.h for why it beats the tile kernel there). Returns false where
// it does not apply, and the tile kernel runs instead.
template <typename scalar_t, typename acc_t>
bool gemv_forward(const scalar_t* xs, const at::Tensor& q, const at::Tensor& scale,
                  const LoraUp<scalar_t, acc_t>& up, int64_t T, int64_t K, int64_t N,
                  scalar_t* y) {
#ifdef FASTPEFT_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (T > kGemvMaxRows && !(std::is_same_v<scalar_t, at::BFloat16> && T <= kGemvBf16MaxRows &&
                              bf16_gemv(T)))
      return false;
    if (!have_gemv()) return false;
    const int8_t* qs = q.const_data_ptr<int8_t>();
    // A pass: dots (rows, ld) of `rows` rows of x from row t0 against Q's rows [begin, end).
    std::function<void(int64_t, int64_t, int64_t, int64_t, float*, int64_t)> pass;
    int64_t pass_rows = kGemvPassRows;
    std::vector<float> x32;  // x in fp32, natural order, for gemv_avx2
#ifdef FASTPEFT_BF16_DX
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (bf16_gemv(T)) {
        const uint16_t* xb = reinterpret_cast<const uint16_t*>(xs);
        pass_rows = kGemvBf16PassRows;
        pass = [=](int64_t t0, int64_t rows, int64_t begin, int64_t end, float* dots,
                   int64_t ld) { gemv_bf16(xb + t0 * K, K, rows, qs, K, begin, end, dots, ld); };
      }
    }
#endif
    if (!pass) {
      const float* xf = nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        xf = xs;
      } else {
        x32.assign(xs, xs + T * K);
        xf = x32.data();
      }
      pass = [=](int64_t t0, int64_t rows, int64_t begin, int64_t end, float* dots,
                 int64_t ld) { gemv_avx2(xf + t0 * K, rows, qs, K, begin, end, dots, ld); };
    }
    // Threads take chunks of ~1 MiB of Q from a shared counter rather than fixed halves of
    // the rows: on cores shared with other processes one thread often runs slower, and the
    // op waits for the slowest. (A row's dot products do not depend on its chunk, so the
    // chunking may follow the thread count.) The kernels stream a chunk as up to 4
    // sequential runs of rows. Past one pass's rows (pass_rows) they make several passes
    // over a chunk, which is then sized for L2 (256 KiB of the 512 KiB) so that only the
    // first pass reads Q from memory.
    const int64_t chunk_bytes = T <= pass_rows ? int64_t{1} << 20 : int64_t{1} << 18;
    // A small layer is still split between the threads.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t chunk = std::max<int64_t>(
        1, std::min(div_up(N, threads),
                    std::max<int64_t>(kStreams, chunk_bytes / std::max<int64_t>(K, 1))));
    const int64_t chunks = div_up(N, chunk);
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(chunks, threads);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<float> dots(static_cast<size_t>(T * chunk));  // (T, chunk)
      std::vector<float> scratch(static_cast<size_t>(T * kGroupRows + up.R));
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        const int64_t begin = c * chunk, end = std::min(N, begin + chunk);
        for (int64_t t0 = 0; t0 < T; t0 += pass_rows)
          pass(t0, std::min(pass_rows, T - t0), begin, end, dots.data() + t0 * chunk, chunk);
        gemv_epilogue<scalar_t>(dots.data(), chunk, scale.const_data_ptr<float>(), up, y, T, N,
                                begin, end, scratch.data());
      }
    });
    return true;
  }
#endif
  return false;
}

// Decode path forward (T <= kDecodeMaxRows, or gemv_max_rows where the GEMV runs), the LoRA
// branch fused: returns (y, xa) with xa = xd @ A^T and y = b + s * xa @ B^T + x @ W^T,
// written once by the streaming kernel.
// xd and the rank-R products are lora_branch's few-rows helpers (dropped_rows: the mask
// bit-identical to lora_linear's; lora_down_kernel; lora_terms in the epilogue): small
// here (T x R x (K + N)), with no packing of A or B.
std::tuple<at::Tensor, at::Tensor> decode_forward(
    const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    uint64_t seed) {
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), R = lora_A.size(0);
  at::Tensor y = at::empty({T, N}, x.options()), xa = at::empty({T, R}, x.options());
  if (T == 0) return {y, xa};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int8_decode", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const std::vector<acc_t> xd = lora_branch::dropped_rows(xs, T, K, dropout_p, seed);
    // xa in acc_t, then s * xa for the epilogue (forward_kernel likewise uses the
    // unrounded xa for y)
    // no copy for fp32 / fp64
    const at::Tensor A = lora_A.to(dequant_gemm::acc_type(x)).contiguous();
    std::vector<acc_t> sxa(static_cast<size_t>(T * R));
    lora_down_kernel(xd.data(), A.const_data_ptr<acc_t>(), T, K, R, 0, R, sxa.data());
    scalar_t* xa_out = xa.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < T * R; ++e) {
      xa_out[e] = static_cast<scalar_t>(sxa[e]);
      sxa[e] *= static_cast<acc_t>(scaling);
    }
    const LoraUp<scalar_t, acc_t> up{sxa.data(), lora_B.const_data_ptr<scalar_t>(),
                                     bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                     R};
    if (gemv_forward(xs, q, scale, up, T, K, N, y.mutable_data_ptr<scalar_t>())) return;
    // x in acc_t, lane-interleaved to match the widened groups of Q, times 2^-24
    std::vector<acc_t> xp(static_cast<size_t>(T * K));
    permute_rows(xs, T, K, xp.data());
    const int64_t n_groups = div_up(N, kGroupRows), grain = work_grain(T * K * kGroupRows);
    at::parallel_for(0, n_groups, grain, [&](int64_t begin, int64_t end) {
      constexpr int64_t L = VecT<acc_t>::lanes;
      std::vector<acc_t> acc(static_cast<size_t>((T * L + T) * kGroupRows + R));
      decode_forward_kernel<scalar_t, acc_t>(
          xp.data(), q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), up,
          y.mutable_data_ptr<scalar_t>(), T, K, N, begin * kGroupRows,
          std::min(N, end * kGroupRows), acc.data());
    });
  });
  return {y, xa};
}

// A tile of W = Q ⊙ sc for dequant_gemm: rows n0 .. n0 + nt, columns k0 .. k0 + kt.
struct TileDecoder {
  const int8_t* q;
  const float* scale;
  int64_t K;
  template <typename out_t>
  void operator()(out_t* out, int64_t n0, int64_t nt, int64_t k0, int64_t kt) const {
    dequant_tile<out_t>(q + n0 * K + k0, K, scale + n0, nt, kt, out);
  }
};

#ifdef FASTPEFT_BF16_DX
// Columns of dx a task of the bf16 dx owns (bf16_dx.h): 16 groups of 16, 256 bytes of each
// row of Q. Same runs as for kBf16DxMaxRows: T = 16 took 3.6-4.0 ms with 256 columns,
// against 5.6-5.8 with 128, 4.1 with 512 and 5.1 with 1024.
constexpr int64_t kBf16DxColumns = 256;

// The bf16 dx's panel entries of rows n and n + 1 of Q (q0, q1; q1 null past the last row:
// zeros) over columns [k0, k0 + 16 groups) of K: the int8 values, exact in bf16 (the
// scale is folded into dy: bf16_dx::dy_pairs), zeros past K.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void decode_pair_bf16(
    const int8_t* q0, const int8_t* q1, int64_t K, int64_t k0, int64_t groups, uint16_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = k0 + 16 * g, left = std::min<int64_t>(16, K - k);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1u);
    const __m512 w0 = widen16_ps(_mm_maskz_loadu_epi8(m, q0 + k));
    const __m512 w1 =
        q1 == nullptr ? _mm512_setzero_ps() : widen16_ps(_mm_maskz_loadu_epi8(m, q1 + k));
    _mm512_storeu_si512(out + 32 * g, bf16_dx::pair_bf16(w0, w1));
  }
}

// dx (T, K) += dy (T, N) @ W for bf16 dy on a CPU with AVX512_BF16 (bf16_dx.h): threads
// take runs of kBf16DxColumns columns; the rows of Q are decoded a pair at a time into
// panels of bf16 pairs and multiplied by vdpbf16ps with dy ⊙ sc rounded to bf16, each
// product of a bf16 and an int8 exact in fp32. (The unfused layer rounds W = Q ⊙ sc to
// bf16 instead: either way one rounding of the relative size of bf16's, per product.)
void add_base_dx_bf16(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& scale,
                      at::Tensor& dx) {
  const int64_t T = dy.size(0), N = dy.size(1), K = q.size(1);
  const int8_t* qs = q.const_data_ptr<int8_t>();
  auto* dxs = dx.mutable_data_ptr<at::BFloat16>();
  constexpr int64_t run = kBf16DxColumns;
  const auto cols_of = [&](int64_t task) {
    return std::min(run, K - task * run);
  };
  bf16_dx::add_dx_bf16(
      T, N, bf16_dx::dy_pairs(dy, scale.const_data_ptr<float>()), div_up(K, run),
      run / 16, [&](int64_t task) { return div_up(cols_of(task), 16); },
      [&](int64_t task, int64_t n, uint16_t* out) {
        decode_pair_bf16(qs + n * K, n + 1 < N ? qs + (n + 1) * K : nullptr, K,
                         task * run, div_up(cols_of(task), 16), out);
      },
      [&](int64_t task, const float* acc, int64_t lda) {
        const int64_t k0 = task * run, kt = cols_of(task);
        for (int64_t t = 0; t < T; ++t) {
          at::BFloat16* o = dxs + t * K + k0;
          for (int64_t c = 0; c < kt; ++c)
            o[c] = static_cast<at::BFloat16>(static_cast<float>(o[c]) + acc[t * lda + c]);
        }
      });
}
#endif

// Whether dx of T rows takes the bf16 dots (add_base_dx_bf16): bf16 dy, a CPU with
// AVX512_BF16 (FASTPEFT_CPU_ISA not forcing it off), kBf16DxMinRows to kBf16DxMaxRows
// rows, or below the bf16 tiles' kLowpDxMinRows on a CPU with AMX.
[[maybe_unused]] bool bf16_dx(at::ScalarType dtype, int64_t T) {
#ifdef FASTPEFT_BF16_DX
  const int64_t max_rows =
      cpu_has_amx_bf16() ? dequant_gemm::kLowpDxMinRows - 1 : kBf16DxMaxRows;
  return T >= kBf16DxMinRows && T <= max_rows && dtype == at::kBFloat16 && cpu_bf16_dots();
#else
  (void)dtype, (void)T;
  return false;
#endif
}

// dx (T, K) += dy (T, N) @ W, dx in x's dtype holding the LoRA term.
void add_base_dx(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& scale,
                 at::Tensor& dx) {
  const int64_t T = dy.size(0), N = dy.size(1), K = q.size(1);
  if (T == 0 || N == 0 || K == 0) return;
#ifdef FASTPEFT_BF16_DX
  if (bf16_dx(dx.scalar_type(), T)) return add_base_dx_bf16(dy, q, scale, dx);
#endif
  if (T <= kDecodeMaxRows) {
    const auto acc = dequant_gemm::acc_type(dy);
    // (dy ⊙ sc)^T (N, T) times 2^-24 (see group_part): the scale folded into dy, one
    // cache line of it per row n
    const at::Tensor dyT = (dy.to(acc) * scale.to(acc)).mul_(kUnit).t().contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "int8_dx", [&] {
      using acc_t = acc_of<scalar_t>;
      const int64_t blocks = dx_blocks<acc_t>(K);
      at::parallel_for(0, blocks, work_grain(T * N * kDxCols), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc_buf(static_cast<size_t>(T * kDxSpan * kDxCols));
        dx_decode_kernel<scalar_t, acc_t>(dyT.const_data_ptr<acc_t>(), q.const_data_ptr<int8_t>(),
                                          dx.mutable_data_ptr<scalar_t>(), T, K, N, begin, end,
                                          acc_buf.data());
      });
    });
    return;
  }
  dequant_gemm::add_base_dx(
      dy, K, TileDecoder{q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), K}, dx);
}

// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastpeft::int8_lora_linear";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  const at::Tensor scale = checked_weight(op, qweight, weight_scale, x.size(1));
  const int64_t N = qweight.size(0);
  lora_branch::check_branch(op, x, lora_A, lora_B, N, "qweight");
  const at::Tensor b = lora_branch::checked_bias(op, bias, N, x);
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);

  const int64_t T = x.size(0);
  if (T <= kDecodeMaxRows || (T <= gemv_max_rows(x) && gemv_applies(x)))
    return decode_forward(x, qweight, scale, b, lora_A, lora_B, scaling, dropout_p, seed_v);
  auto [y, xa] = lora_branch::forward(x, b, lora_A, lora_B, scaling, dropout_p, seed_v);
  dequant_gemm::add_base(  // onto y = b + s * xa @ B^T
      x, N, TileDecoder{qweight.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), x.size(1)},
      y);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& weight_scale, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    bool compute_dx) {
  constexpr const char* op = "fastpeft::int8_lora_linear_backward";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  const at::Tensor scale = checked_weight(op, qweight, weight_scale, x.size(1));
  const int64_t N = qweight.size(0);
  lora_branch::check_branch(op, x, lora_A, lora_B, N, "qweight");
  lora_branch::check_grads(op, grad_y, x, xa, lora_A, N, "qweight");
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);

  auto [dx, dA, dB] = lora_branch::backward(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p,
                                            seed_v, compute_dx);
  if (compute_dx) add_base_dx(grad_y, qweight, scale, dx);  // onto the LoRA term
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("int8_lora_linear", &forward);
  m.impl("int8_lora_linear_backward", &backward);
}

}  // namespace fastpeft::cpu::int8_lora_linear
