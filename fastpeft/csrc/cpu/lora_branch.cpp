// The LoRA branch shared by lora_linear and int8_lora_linear on CPU (declared, with its
// math, in lora_branch.h): argument checks, and the forward / backward that run the
// rank-R kernels of lora_branch_kernels.h on the intra-op threads. No op is registered
// here.
#include "cpu/lora_branch.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/checks.h"
#include "cpu/cpu_path.h"
#include "cpu/lora_branch_kernels.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::lora_branch {

// ---------------------------------------------------------------------------------------
// Argument checks

at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N,
                        const at::Tensor& x) {
  if (!given(bias)) return {};
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N,
              ",), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(), op,
              ": bias must be a CPU tensor of dtype ", x.scalar_type(), ", got ",
              bias->scalar_type(), " on ", bias->device());
  return bias->contiguous();
}

// The dropout seed as uint64 (two's complement of the int64 value, as the reference).
uint64_t read_seed(const char* op, double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return 0;
  TORCH_CHECK(given(seed), op, ": seed is required when dropout_p > 0");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device().is_cpu(),
              op, ": seed must be a one-element int64 CPU tensor, got ", seed->scalar_type(),
              " of shape ", seed->sizes(), " on ", seed->device());
  return static_cast<uint64_t>(seed->item<int64_t>());
}

void check_branch(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, int64_t N, const char* base) {
  check_matrix(op, lora_A, "lora_A", x);
  check_matrix(op, lora_B, "lora_B", x);
  const std::string out_of_base = std::string("out_features of ") + base;
  check_size(op, lora_A, "lora_A", 1, x.size(1), "in_features of x");
  check_size(op, lora_B, "lora_B", 0, N, out_of_base.c_str());
  check_size(op, lora_B, "lora_B", 1, lora_A.size(0), "rank of lora_A");
}

void check_grads(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                 const at::Tensor& xa, const at::Tensor& lora_A, int64_t N, const char* base) {
  check_matrix(op, grad_y, "grad_y", x);
  check_matrix(op, xa, "xa", x);
  const std::string out_of_base = std::string("out_features of ") + base;
  check_size(op, grad_y, "grad_y", 0, x.size(0), "rows of x");
  check_size(op, grad_y, "grad_y", 1, N, out_of_base.c_str());
  check_size(op, xa, "xa", 0, x.size(0), "rows of x");
  check_size(op, xa, "xa", 1, lora_A.size(0), "rank of lora_A");
}

namespace {

// ---------------------------------------------------------------------------------------
// kFused forward: xa and y = b + s * xa @ B^T, parallel over tiles of kFwdRows rows.

std::tuple<at::Tensor, at::Tensor> forward_fused(const at::Tensor& x, const at::Tensor& bias,
                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           double scaling, double dropout_p, uint64_t seed) {
  const int64_t T = x.size(0), K = x.size(1), N = lora_B.size(0), R = lora_A.size(0);
  const bool dropout = dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(dropout_p);

  at::Tensor xa = at::empty({T, R}, x.options());
  at::Tensor y = at::empty({T, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_branch", [&] {
    using acc_t = acc_of<scalar_t>;
    constexpr int L = VecT<acc_t>::lanes;
    const int64_t Rp = round_up(R, L), Np = round_up(N, L), Np2 = round_up(N, 2 * L);
    // A^T (K, Rp), B^T in panels of 2L columns and the bias (Np) in acc_t, zero-padded
    // (small: R x (K + N)); see forward_kernel.
    std::vector<acc_t> At(static_cast<size_t>(K * Rp), acc_t(0));
    std::vector<acc_t> Bt(static_cast<size_t>(Rp * Np2), acc_t(0)), b(static_cast<size_t>(Np), 0);
    const scalar_t* A = lora_A.const_data_ptr<scalar_t>();
    const scalar_t* B = lora_B.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < R; ++r) At[k * Rp + r] = to_acc(A[r * K + k]);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n)
        Bt[(n / (2 * L) * Rp + r) * 2 * L + n % (2 * L)] = to_acc(B[n * R + r]);
    if (bias.defined())
      load_dropped<scalar_t, acc_t, false>(bias.const_data_ptr<scalar_t>(), N, N, nullptr, 1,
                                           b.data());
    const acc_t keep_scale = dropout ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
    const int64_t tiles = div_up(T, kFwdRows);
    const int64_t grain = work_grain((K + N) * Rp);
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xs(static_cast<size_t>(kFwdRows * (K + Rp)));
      std::vector<float> keep(dropout ? static_cast<size_t>(kFwdRows * 4 * div_up(K, 4)) : 0);
      auto* kernel = dropout ? &forward_kernel<scalar_t, true> : &forward_kernel<scalar_t, false>;
      kernel(x.const_data_ptr<scalar_t>(), At.data(), Bt.data(), b.data(),
             xa.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), T, K, R, N,
             static_cast<acc_t>(scaling), begin, end, seed, threshold, keep_scale, xs.data(),
             keep.data());
    });
  });
  return {y, xa};
}

// ---------------------------------------------------------------------------------------
// Forward for a few rows (T <= kFewRows; on either path, unless kAten is forced): xd in
// acc_t, then xa by rows of A and y by rows of B, each pass parallel over its rows
// (lora_down_kernel, lora_up_kernel) in tasks of at least kFewRowsTaskBytes of the weight:
// there is little arithmetic per byte, and the threads' reads of A and B from memory
// overlap.
constexpr int64_t kFewRowsTaskBytes = 16384;

std::tuple<at::Tensor, at::Tensor> forward_few_rows(const at::Tensor& x, const at::Tensor& bias,
                                                    const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling,
                                                    double dropout_p, uint64_t seed) {
  const int64_t T = x.size(0), K = x.size(1), N = lora_B.size(0), R = lora_A.size(0);
  at::Tensor xa = at::empty({T, R}, x.options());
  at::Tensor y = at::empty({T, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_branch", [&] {
    using acc_t = acc_of<scalar_t>;
    const std::vector<acc_t> xd =
        dropped_rows(x.const_data_ptr<scalar_t>(), T, K, dropout_p, seed);
    // no copy for fp32 / fp64
    const at::Tensor A = lora_A.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto grain = [](int64_t row_bytes) {
      return std::max<int64_t>(1, kFewRowsTaskBytes / std::max<int64_t>(1, row_bytes));
    };
    std::vector<acc_t> sxa(static_cast<size_t>(T * R));
    at::parallel_for(0, R, grain(K * sizeof(acc_t)), [&](int64_t begin, int64_t end) {
      lora_down_kernel(xd.data(), A.const_data_ptr<acc_t>(), T, K, R, begin, end, sxa.data());
    });
    scalar_t* xa_out = xa.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < T * R; ++e) {  // y from the unrounded xa, as forward_kernel's
      xa_out[e] = static_cast<scalar_t>(sxa[e]);
      sxa[e] *= static_cast<acc_t>(scaling);
    }
    const LoraUp<scalar_t, acc_t> up{sxa.data(), lora_B.const_data_ptr<scalar_t>(),
                                     bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                     R};
    at::parallel_for(0, N, grain(R * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(static_cast<size_t>(T * kUpCols + R));
      lora_up_kernel(up, T, N, begin, end, y.mutable_data_ptr<scalar_t>(), scratch.data());
    });
  });
  return {y, xa};
}

// ---------------------------------------------------------------------------------------
// kFused backward: dyB and dB in one pass over dy, then dx_lora and dA in one pass over x.

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_fused(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    uint64_t seed, bool compute_dx) {
  const int64_t T = x.size(0), K = x.size(1), N = lora_B.size(0), R = lora_A.size(0);
  const bool dropout = dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(dropout_p);

  at::Tensor dB = at::empty({N, R}, x.options());
  at::Tensor dA = at::empty({R, K}, x.options());
  at::Tensor dx = compute_dx ? at::empty({T, K}, x.options()) : x.new_empty({0});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_branch", [&] {
    using acc_t = acc_of<scalar_t>;
    constexpr int L = VecT<acc_t>::lanes;
    const int64_t Rp = round_up(R, L);
    const acc_t s = static_cast<acc_t>(scaling);

    // dyB = dy @ B (kept in acc_t) and dB = s * dy^T @ xa, one pass over dy, parallel
    // over blocks of kDyCols columns of N. Each block writes its share of dyB into a
    // partial of its own and the partials are summed in block order, so dyB does not
    // depend on how the blocks were shared among the threads. Rows go in chunks sized so
    // that the partials take at most kDyPartsElems elements (and at least kDyRows rows).
    constexpr int64_t kDyCols = 128, kDyChunk = 4096, kDyPartsElems = int64_t{1} << 20;
    const int64_t n_blocks = div_up(N, kDyCols);
    const int64_t chunk = std::clamp<int64_t>(
        kDyPartsElems / std::max<int64_t>(1, n_blocks * Rp), kDyRows, kDyChunk);
    std::vector<acc_t> dB_acc(static_cast<size_t>(N * Rp), acc_t(0));
    std::vector<acc_t> parts(static_cast<size_t>(n_blocks * std::min(T, chunk) * Rp));
    std::vector<acc_t> dyB(static_cast<size_t>(T * R));
    for (int64_t t_begin = 0; t_begin < T; t_begin += chunk) {
      const int64_t t_end = std::min(T, t_begin + chunk), rows = t_end - t_begin;
      const int64_t part_stride = rows * Rp, grain = work_grain(rows * kDyCols * Rp);
      at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> work(static_cast<size_t>((kDyCols + kDyRows) * Rp + kDyRows * kDyCols));
        dy_kernel<scalar_t>(grad_y.const_data_ptr<scalar_t>(), lora_B.const_data_ptr<scalar_t>(),
                            xa.const_data_ptr<scalar_t>(), dB_acc.data(), parts.data(),
                            part_stride, t_begin, t_end, N, R, kDyCols, begin, end, s,
                            work.data());
      });
      at::parallel_for(0, rows, work_grain(n_blocks * R), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          acc_t* out = dyB.data() + (t_begin + t) * R;
          std::fill_n(out, R, acc_t(0));
          for (int64_t p = 0; p < n_blocks; ++p) {
            const acc_t* part = parts.data() + p * part_stride + t * Rp;
            for (int64_t r = 0; r < R; ++r) out[r] += part[r];
          }
        }
      });
    }
    scalar_t* dB_out = dB.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t r = 0; r < R; ++r) dB_out[n * R + r] = static_cast<scalar_t>(dB_acc[n * Rp + r]);

    // dx_lora and dA, parallel over column blocks of K.
    const int64_t KB = backward_block_cols(R), KBp = round_up(KB, L), k_blocks = div_up(K, KB);
    const acc_t keep_scale = dropout ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
    at::parallel_for(0, k_blocks, work_grain(T * KB * R), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> work(static_cast<size_t>((2 * R + kBwdRows) * KBp + kBwdRows * R));
      std::vector<float> keep(static_cast<size_t>(kBwdRows * KBp), 0.0f);
      using Kernel = decltype(&backward_kernel<scalar_t, true, true>);
      const Kernel kernels[2][2] = {
          {&backward_kernel<scalar_t, false, false>, &backward_kernel<scalar_t, false, true>},
          {&backward_kernel<scalar_t, true, false>, &backward_kernel<scalar_t, true, true>}};
      kernels[dropout][compute_dx](
          x.const_data_ptr<scalar_t>(), lora_A.const_data_ptr<scalar_t>(), dyB.data(),
          compute_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr, dA.mutable_data_ptr<scalar_t>(),
          T, K, R, KB, begin, end, s, seed, threshold, keep_scale, work.data(), keep.data());
    });
  });
  return {dx, dA, dB};
}

// ---------------------------------------------------------------------------------------
// kAten (cpu_path.h): the five rank-R products as ATen GEMMs, which oneDNN runs on AVX-512,
// AVX512-BF16 or AMX; ours are the dropout passes. xd = c * m ⊙ x is materialised in x's
// dtype (one pass over x per direction) and the mask is applied to dx's LoRA term in
// place; both use the Philox words of the fused kernels (dropout_keep_rows), so the two
// paths drop the same elements. Products are rounded to x's dtype between the GEMMs, as in
// the unfused composition.

// o[k] = src[k] * keep[k] * after, in src's dtype
template <typename scalar_t, typename acc_t>
void scale_row(const scalar_t* src, const float* keep, acc_t after, int64_t K, scalar_t* o) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // c10's float -> bfloat16 conversion does not vectorise; the same rounding (to nearest
    // even, NaN kept a quiet NaN) written on the bits does
    const uint16_t* in = reinterpret_cast<const uint16_t*>(src);
    uint16_t* out = reinterpret_cast<uint16_t*>(o);
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t in_bits = uint32_t{in[k]} << 16;
      float v;
      std::memcpy(&v, &in_bits, sizeof(v));
      v *= keep[k];
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof(bits));
      const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      out[k] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      o[k] = static_cast<scalar_t>(to_acc(src[k]) * (static_cast<acc_t>(keep[k]) * after));
  }
}

// out = c * m ⊙ src for src (T, K), out of src's shape and dtype; and, if given,
// also = c * m ⊙ also in place (the backward masks dx's LoRA term with the same draw).
void apply_dropout(const at::Tensor& src, at::Tensor& out, double dropout_p, uint64_t seed,
                   at::Tensor* also = nullptr) {
  const int64_t T = src.size(0), K = src.size(1), groups = div_up(K, 4);
  const uint32_t threshold = dropout_threshold(dropout_p);
  constexpr int64_t kRows = 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "lora_dropout", [&] {
    using acc_t = acc_of<scalar_t>;
    // keep holds c for kept elements (float) or 1 (double, scaled by the double c below)
    const acc_t keep_scale = acc_t(1.0 / (1.0 - dropout_p));
    const float keep_on = std::is_same_v<acc_t, float> ? static_cast<float>(keep_scale) : 1.0f;
    const acc_t after = std::is_same_v<acc_t, float> ? acc_t(1) : keep_scale;
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    scalar_t* also_ptr = also != nullptr ? also->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, div_up(T, kRows), work_grain(kRows * K * 8), [&](int64_t begin, int64_t end) {
      std::vector<float> keep(static_cast<size_t>(kRows * 4 * groups));
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t t0 = tile * kRows, rows = std::min(kRows, T - t0);
        dropout_keep_rows(seed, static_cast<uint64_t>(t0 * groups), groups, rows, groups,
                          threshold, keep_on, keep.data(), 4 * groups);
        for (int64_t i = 0; i < rows; ++i) {
          const float* m = keep.data() + i * 4 * groups;
          scale_row(in + (t0 + i) * K, m, after, K, dst + (t0 + i) * K);
          if (also_ptr != nullptr)
            scale_row(also_ptr + (t0 + i) * K, m, after, K, also_ptr + (t0 + i) * K);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> forward_aten(const at::Tensor& x, const at::Tensor& bias,
                                                const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, double scaling,
                                                double dropout_p, uint64_t seed) {
  at::Tensor xd = x;
  if (dropout_p > 0.0) {
    xd = at::empty_like(x);
    apply_dropout(x, xd, dropout_p, seed);
  }
  at::Tensor xa = at::mm(xd, lora_A.t());
  at::Tensor y = bias.defined() ? at::addmm(bias, xa, lora_B.t(), 1.0, scaling)
                                : at::mm(xa.mul(scaling), lora_B.t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_aten(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    uint64_t seed, bool compute_dx) {
  at::Tensor dB = at::mm(grad_y.t(), xa.mul(scaling));   // s * dy^T @ xa
  at::Tensor sdyB = at::mm(grad_y, lora_B).mul_(scaling);  // s * dy @ B
  at::Tensor dx = compute_dx ? at::mm(sdyB, lora_A) : x.new_empty({0});  // before the mask
  at::Tensor xd = x;
  if (dropout_p > 0.0) {  // xd, and the mask onto dx, from one draw
    xd = at::empty_like(x);
    apply_dropout(x, xd, dropout_p, seed, compute_dx ? &dx : nullptr);
  }
  at::Tensor dA = at::mm(sdyB.t(), xd);
  return {dx, dA, dB};
}

}  // namespace

void dropout_rows(const at::Tensor& x, const int64_t* rows, int64_t n, double dropout_p,
                  uint64_t seed, const at::Tensor& gathered, const at::Tensor& dense,
                  const at::Tensor& scattered) {
  const int64_t K = x.size(1), groups = div_up(K, 4);
  const uint32_t threshold = dropout_threshold(dropout_p);
  const bool scatter = dense.defined();
  TORCH_INTERNAL_ASSERT(dropout_p > 0.0 && dropout_p < 1.0);
  // rows are read as K consecutive elements: a unit column stride, or a single column
  // (whose stride is meaningless: torch calls an (T, 1) view contiguous whatever it is)
  const auto unit_columns = [](const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; };
  TORCH_INTERNAL_ASSERT(unit_columns(x) && unit_columns(gathered) && gathered.size(0) >= n);
  TORCH_INTERNAL_ASSERT(!scatter || (unit_columns(dense) && unit_columns(scattered)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout", [&] {
    using acc_t = acc_of<scalar_t>;
    // as in apply_dropout: keep holds c (float) or 1 (double, scaled by the double c)
    const acc_t keep_scale = acc_t(1.0 / (1.0 - dropout_p));
    const float keep_on = std::is_same_v<acc_t, float> ? static_cast<float>(keep_scale) : 1.0f;
    const acc_t after = std::is_same_v<acc_t, float> ? acc_t(1) : keep_scale;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = gathered.mutable_data_ptr<scalar_t>();
    const int64_t ld_x = x.stride(0), ld_out = gathered.stride(0);
    std::vector<float> keep(static_cast<size_t>(4 * groups));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = rows[j];
      dropout_keep_rows(seed, static_cast<uint64_t>(t * groups), groups, 1, groups, threshold,
                        keep_on, keep.data(), 4 * groups);
      scale_row(in + t * ld_x, keep.data(), after, K, out + j * ld_out);
      if (scatter)
        scale_row(dense.const_data_ptr<scalar_t>() + j * dense.stride(0), keep.data(), after, K,
                  scattered.mutable_data_ptr<scalar_t>() + t * scattered.stride(0));
    }
  });
}

// Ranks above which the branch takes ATen's rank-R GEMMs on every dtype unless kFused is
// forced. The fused kernels lay A^T and B^T out afresh on every call (R * (K + N) writes)
// and stream B^T once per tile of rows, 8 lanes wide: fine at the usual ranks, but at
// r = 128 / 256 that outgrew the products, while ATen's GEMMs, whose N = R is then wide
// enough, run at the unfused layer's speed. `fastpeft-bench --ops lora_linear --threads 2`
// (fp32, Zen 4 VM, T = 100, 2048 -> 5632, r = 256), reference's time over fastpeft's:
// forward 1.05, forward+backward 1.07; with FASTPEFT_CPU_PATH=fused 0.92 and 0.93.
namespace {
constexpr int64_t kFusedMaxRank = 64;

// The path of a call with rank R: FASTPEFT_CPU_PATH when it forces one, else kAten above
// kFusedMaxRank, else cpu_path's choice for the dtype.
CpuPath branch_path(at::ScalarType dtype, int64_t R) {
  if (const auto forced = forced_cpu_path()) return *forced;
  return R > kFusedMaxRank ? CpuPath::kAten : cpu_path(dtype);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& bias,
                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           double scaling, double dropout_p, uint64_t seed) {
  // Up to kFewRows rows the few-rows kernels, whatever cpu_path's choice, unless kAten is
  // forced: ATen's GEMMs cost more there, bf16 on AVX-512 included (nf4_lora_linear T = 1,
  // 4096 x 4096, r = 16, bf16, caches flushed, Zen 4: 0.51-0.65 ms against 0.65-0.84 with
  // kAten; 1024 x 1024: 0.10-0.15 against 0.25-0.33, two runs of
  // python benchmarks/branch_path.py --dtype bf16).
  const auto forced = forced_cpu_path();
  if (x.size(0) <= kFewRows && forced != CpuPath::kAten)
    return forward_few_rows(x, bias, lora_A, lora_B, scaling, dropout_p, seed);
  if (branch_path(x.scalar_type(), lora_A.size(0)) == CpuPath::kAten)
    return forward_aten(x, bias, lora_A, lora_B, scaling, dropout_p, seed);
  return forward_fused(x, bias, lora_A, lora_B, scaling, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    uint64_t seed, bool compute_dx) {
  if (branch_path(x.scalar_type(), lora_A.size(0)) == CpuPath::kAten)
    return backward_aten(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx);
  return backward_fused(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx);
}

}  // namespace fastpeft::cpu::lora_branch
