// Fused bottleneck adapter, CPU: the ops fastpeft::bottleneck_adapter and
// bottleneck_adapter_backward (argument checks, blocking, the GEMMs); the row-block passes
// are in bottleneck_adapter_kernels.h.
//
//   x (T, d)  Wd = down_weight (m, d)  bd (m,)  Wu = up_weight (d, m)  bu (d,)  s = scaling
//   h = LN(x) = (x - mean) * rstd * ln_w + ln_b   (per row, biased variance) or h = x
//   z = h @ Wd^T + bd   (T, m)        a = act(z)
//   y = res + s * (a @ Wu^T + bu)     res = residual, or x
//
// Backward, with dy = dL/dy; h and z are recomputed from x (and the saved mean, rstd):
//   da = s * dy @ Wu  (T, m)          dz = da ⊙ act'(z)
//   dWu = s * dy^T @ a,   dbu = s * sum_t dy
//   dWd = dz^T @ h,       dbd = sum_t dz
//   dh = dz @ Wd  (T, d)
//   LN on:  xhat = (x - mean) * rstd,  g = dh ⊙ ln_w,
//           dx = rstd * (g - mean_j(g) - xhat * mean_j(g ⊙ xhat)),
//           d ln_w = sum_t dh ⊙ xhat,  d ln_b = sum_t dh
//   LN off: dx = dh;   and dx += dy when the residual is x.
//
// Two implementations, chosen at every call (aten_path::handles): kFused, described here,
// and the one in namespace aten_path below, which runs fp16 / bf16 on kAten (cpu_path.h),
// and fp32 / fp64 inputs of few rows next to the bottleneck, where kFused's per-call
// weight copies and per-chunk gradient partials cost more than the products.
//
// Structure: both ops run over blocks of up to ~1 MiB of x (see kBlockBytes). Per block,
// while it is in cache, everything (T, d)-sized is touched once from memory: forward
// reads x (and the residual) and writes y; backward reads x and dy and writes dx. The
// (rows, m) bottleneck lives only in per-task scratch, so nothing (T, m) is ever stored;
// the price is recomputing z in backward (one extra (rows, d) x (d, m) product per block).
//
// The products are ATen GEMMs (MKL) on the cached blocks, one block per call, each run
// single-threaded by the thread that owns the block (parallel_for_aten, parallel.h). In a
// profile of fwd + bwd most of the time is MKL's GEMM kernel running near the core's FMA
// peak, the rest MKL packing its operands, and the passes of bottleneck_adapter_kernels.h
// take a few percent: a hand-written micro-kernel could save at most the packing, and
// only by matching MKL's kernel; it was not tried. The activation and its derivative are
// ATen's vectorised kernels on the (rows, m) scratch; the (rows, d) passes (layer norm,
// the residual epilogue, the layer-norm backward, conversions) are the loops of
// bottleneck_adapter_kernels.h. `fastpeft-bench --ops bottleneck_adapter` measures it.
//
// Parameter gradients are sums over the T rows. They accumulate per chunk, a fixed run of
// consecutive blocks (dWd and dWu^T (m, d) in the accumulation type, the bias and
// layer-norm gradients in double, see Partials), and the chunk partials are added in
// chunk order at the end. The blocks and chunks depend only on T, d and the dtype, never
// on the thread count, and threads take whole chunks, so the gradients (like y and dx)
// are the same bits for any torch.set_num_threads. dWu is accumulated transposed because
// a^T @ dy (m x rows times rows x d) runs faster in MKL than dy^T @ a. The alternative,
// storing a and dz (T, m) and doing whole-T GEMMs afterwards, spends about the same time
// in MKL but reads x (or recomputes h) and dy from memory a second time.
//
// Precision: fp32 / fp16 / bf16 accumulate in fp32 (fp16 / bf16 blocks are converted to
// fp32 scratch as they are read, weights converted once per call), fp64 in fp64. mean and
// rstd are stored in the accumulation type and the forward applies the stored values, so
// backward recomputes exactly the forward's h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <tuple>

#include "cpu/bottleneck_adapter_kernels.h"
#include "cpu/checks.h"
#include "cpu/cpu_path.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::bottleneck_adapter {
namespace {

// ---------------------------------------------------------------------------------------
// Argument checks (the Python layer validates first; this is defence in depth).

enum class Act { kRelu, kGelu, kGeluTanh, kSilu };

Act parse_activation(const char* op, c10::string_view name) {
  const std::string_view n(name.data(), name.size());
  if (n == "relu") return Act::kRelu;
  if (n == "gelu") return Act::kGelu;
  if (n == "gelu_tanh") return Act::kGeluTanh;
  if (n == "silu") return Act::kSilu;
  TORCH_CHECK(false, op, ": activation must be one of 'relu', 'gelu', 'gelu_tanh', 'silu', got '",
              n, "'");
}

// t has the given shape, x's dtype and lives on the CPU.
void check_tensor(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                  const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              x.scalar_type(), " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, " (", what,
              "), got ", t.sizes());
}

void check_optional(const char* op, const std::optional<at::Tensor>& t, const char* name,
                    at::IntArrayRef shape, const at::Tensor& x, const char* what) {
  if (given(t)) check_tensor(op, *t, name, shape, x, what);
}

// The checks shared by forward and backward; returns (T, d, m).
std::tuple<int64_t, int64_t, int64_t> check_common(
    const char* op, const at::Tensor& x, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias) {
  check_dtype(op, x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (T, d), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(0) >= 1, op,
              ": down_weight must have shape (m, ", d, ") with m >= 1, got ", down_weight.sizes());
  const int64_t m = down_weight.size(0);
  check_tensor(op, down_weight, "down_weight", {m, d}, x, "bottleneck m, x.shape[1]");
  check_optional(op, down_bias, "down_bias", {m}, x, "bottleneck m");
  check_tensor(op, up_weight, "up_weight", {d, m}, x, "x.shape[1], bottleneck m");
  check_optional(op, ln_weight, "ln_weight", {d}, x, "x.shape[1]");
  check_optional(op, ln_bias, "ln_bias", {d}, x, "x.shape[1]");
  TORCH_CHECK(!given(ln_bias) || given(ln_weight), op,
              ": ln_bias given without ln_weight (the layer norm is enabled by ln_weight)");
  return {T, d, m};
}

// ---------------------------------------------------------------------------------------
// Blocks and chunks.

// Rows per block. Each GEMM call has MKL pack its weight operand (m x d, 512 KiB at
// d = 2048, m = 64) again, so a block needs enough rows to amortise that: the block
// products run well below the core's peak at a few dozen rows and close to it from ~128
// rows on. Hence one (rows, d) buffer of ~1 MiB: 128 rows at d = 2048. A block's two to
// four such buffers (x, dy, h, dh) then spill from L2 to L3, which costs little next to
// the products and still reads x and dy from DRAM once; smaller blocks were slower, larger
// ones gained nothing in a profile (MKL's packing time stays the same).
constexpr int64_t kBlockBytes = int64_t{1} << 20;
constexpr int64_t kMinRows = 8, kMaxRows = 256;
// Backward chunks: at most kChunks, so at most that many partial copies of the weight
// gradients (and as many backward tasks), and at least kMinChunkRows rows each, so a short
// input does not pay for partials it hardly needs. Adding up the partials costs
// kChunks * m * d additions, next to the backward's ~10 * T * m * d multiply-adds.
constexpr int64_t kChunks = 8, kMinChunkRows = 32;

// The rows [0, T) in n blocks of tb rows (the last one shorter), grouped into chunks of
// per_chunk consecutive blocks (the last one shorter). Forward tasks are blocks, backward
// tasks are chunks.
struct Blocks {
  int64_t T = 0, tb = kMinRows, n = 0, per_chunk = 1, chunks = 0;
  int64_t rows(int64_t blk) const { return std::min(tb, T - blk * tb); }
  int64_t first_block(int64_t chunk) const { return std::min(n, chunk * per_chunk); }
};

// Depends on T, d and the element size only (see the header comment).
Blocks make_blocks(int64_t T, int64_t d, int64_t elem_size) {
  Blocks b;
  b.T = T;
  const int64_t tb_max = std::clamp(
      kBlockBytes / std::max<int64_t>(1, d * elem_size) / kMinRows * kMinRows, kMinRows,
      kMaxRows);
  // Chunks of about equal rows, each as few blocks as tb_max allows, the chunk's rows
  // spread evenly over them (short inputs get smaller blocks, down to kMinRows rows).
  const int64_t chunks = std::clamp<int64_t>(div_up(T, kMinChunkRows), 1, kChunks);
  const int64_t chunk_rows = std::max<int64_t>(1, div_up(T, chunks));
  b.per_chunk = div_up(chunk_rows, tb_max);
  b.tb = round_up(div_up(chunk_rows, b.per_chunk), kMinRows);
  b.n = div_up(T, b.tb);
  b.chunks = div_up(b.n, b.per_chunk);
  return b;
}

// ---------------------------------------------------------------------------------------
// The weights in the accumulation type, converted once per call (no copy for fp32/fp64).

// Each GEMM gets its weight operand contiguous in the layout it multiplies by (row-major
// (K, N)): MKL packs that operand on every call, and packs a transposed view more slowly.
// Every 1-D parameter may be strided (e.g. a column of a matrix): as_acc takes a
// contiguous copy of it, d or m elements.
struct Params {
  at::Tensor WdT;     // (d, m) = Wd^T  z = h @ Wd^T
  at::Tensor WuT;     // (m, d) = Wu^T  u = a @ Wu^T          (forward)
  at::Tensor Wu;      // (d, m)         da = s * dy @ Wu      (backward)
  at::Tensor Wd;      // (m, d)         dh = dz @ Wd          (backward)
  at::Tensor bd;      // (m,) or undefined
  at::Tensor lnw;     // (d,) or undefined (no layer norm)
  at::Tensor lnb;     // (d,) or undefined
};

at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return given(t) ? as_acc(*t, acc) : at::Tensor();
}

Params make_params(const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
                   const at::Tensor& up_weight, const std::optional<at::Tensor>& ln_weight,
                   const std::optional<at::Tensor>& ln_bias, at::ScalarType acc, bool backward) {
  Params p;
  p.WdT = as_acc(down_weight.t(), acc);
  if (backward) {
    p.Wu = as_acc(up_weight, acc), p.Wd = as_acc(down_weight, acc);
  } else {
    p.WuT = as_acc(up_weight.t(), acc);
  }
  p.bd = as_acc(down_bias, acc), p.lnw = as_acc(ln_weight, acc), p.lnb = as_acc(ln_bias, acc);
  return p;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// z = h @ Wd^T + bd into z (rows, m).
void down_projection(const at::Tensor& h, const Params& p, at::Tensor& z) {
  if (p.bd.defined())
    at::addmm_out(z, p.bd, h, p.WdT);
  else
    at::mm_out(z, h, p.WdT);
}

void activation_(Act act, at::Tensor& z) {
  switch (act) {
    case Act::kRelu: at::relu_(z); break;
    case Act::kGelu: at::gelu_(z, "none"); break;
    case Act::kGeluTanh: at::gelu_(z, "tanh"); break;
    case Act::kSilu: at::silu_(z); break;
  }
}

void activation_out(Act act, const at::Tensor& z, at::Tensor& a) {
  switch (act) {
    case Act::kRelu: at::clamp_min_out(a, z, 0); break;
    case Act::kGelu: at::gelu_out(a, z, "none"); break;
    case Act::kGeluTanh: at::gelu_out(a, z, "tanh"); break;
    case Act::kSilu: at::silu_out(a, z); break;
  }
}

// dz = da ⊙ act'(z).
void activation_backward_out(Act act, const at::Tensor& da, const at::Tensor& z, at::Tensor& dz) {
  switch (act) {
    case Act::kRelu: at::threshold_backward_out(dz, da, z, 0); break;
    case Act::kGelu: at::gelu_backward_out(dz, da, z, "none"); break;
    case Act::kGeluTanh: at::gelu_backward_out(dz, da, z, "tanh"); break;
    case Act::kSilu: at::silu_backward_out(dz, da, z); break;
  }
}

// ---------------------------------------------------------------------------------------
// The kAten path (cpu_path.h) of fp16 / bf16. kFused converts fp16 / bf16 blocks to fp32
// and multiplies them with fp32 GEMMs; here every GEMM takes its operands in their own
// dtype, so that ATen hands it to oneDNN, which runs it on AVX512-BF16 / AVX512-FP16 / AMX
// where the CPU has them (fp32 accumulation inside, the result rounded once). fp32 / fp64
// run this code too where T is short next to the bottleneck (handles); on long inputs
// kFused's per-block weight-gradient partials cost less than the whole-T GEMMs below.
//
// The rows go in blocks, one thread per block, each block's GEMMs single-threaded
// (parallel_for_aten): the (rows, d) intermediates (h, u, dh) are used while still in
// cache, and x, the residual, y, dy and dx each make one trip to memory per direction.
// Our passes (bottleneck_adapter_kernels.h, lowp_*) read and write x's dtype and compute
// in fp32; z, a, da, dz, u and dh are in x's dtype, as the GEMMs return them (and as
// nn.Linear gives them to the unfused composition).
//
//   forward, per block:  [h = LN(x) (pass), mean, rstd]   z = h @ Wd^T + bd   a = act(z)
//                        u = a @ Wu^T,  then y = res + s * (u + bu)                 (pass)
//   backward, per block: [h = LN(x) with the saved mean, rstd (pass)]   z = h @ Wd^T + bd
//                        a = act(z),  da = s * dy @ Wu,  dz = act'(z) * da
//                        LN on:  dh = dz @ Wd, then in one pass dx (+ dy when the
//                                residual is x) and the block sums of dh * xhat, dh, dy
//                        LN off: dx = dz @ Wd (+ dy, the GEMM's C operand); sum of dy (pass)
//                        the block sum of dz
//   then, over all T:    dWu = s * dy^T @ a,   dWd = dz^T @ h
//
// The weight gradients are one GEMM each over all T rows, rounded to x's dtype once as
// nn.Linear's are, rather than per-block partials summed in x's dtype (rounded once per
// block). That keeps a and dz (T, m) for the length of the call (small next to x), h
// (T, d) too with a layer norm, and reads dy and h (or x) a second time. The vector
// gradients are block sums in fp32, added in block order in double.
//
// Blocks of about kLowpBlockBytes of x, their number rounded up to a multiple of the
// thread count so that the threads get equal work (and no fewer than there are threads,
// down to kMinRows rows a block). Unlike kFused's, the blocks thus depend on the thread
// count, and the sums over rows with them; with the weight gradients' threaded GEMMs, the
// last bits of this path's results may change with torch.set_num_threads, as nn.Linear's
// do.
namespace aten_path {

// Each GEMM call re-packs its weight operand (oneDNN's brgemm layout), which costs tens of
// microseconds: blocks of ~2 MiB (512 rows at d = 2048 in bf16) amortise it; smaller
// blocks were slower in fastpeft-bench, larger ones no faster.
constexpr int64_t kLowpBlockBytes = int64_t{2} << 20;

// Whether a call runs this path: forced by FASTPEFT_CPU_PATH (fused: never; aten: fp32 /
// fp64, as they are, and the 16-bit dtypes aten_lowp_gemm takes); else (auto) the 16-bit
// dtypes whose GEMMs oneDNN runs as they are (aten_lowp_gemm) on kAten, and fp32 / fp64
// inputs short next to the weights: where kFused's per-chunk weight-gradient partials
// (chunks x 2 x m x d) or its per-call transposed weight copies (2 x m x d) outweigh x
// (T x d). There kFused spent more on them than on the products, while these GEMMs read
// the weights as they lie and the weight gradients are two whole-T GEMMs.
// `fastpeft-bench --ops bottleneck_adapter --threads 2` (fp32, Zen 4 VM), the reference's
// time over fastpeft's, forward / forward+backward: T = 1, d = 4096, m = 256: 0.77 / 0.84
// here, 0.24 / 0.28 with FASTPEFT_CPU_PATH=fused; T = 100, silu + layer norm: 0.97 / 0.95
// here, 0.47 / 0.48 fused.
bool handles(at::ScalarType dtype, int64_t T, int64_t d, int64_t m) {
  const bool wide = dtype == at::kFloat || dtype == at::kDouble;
  if (const auto forced = forced_cpu_path())
    return *forced == CpuPath::kAten && (wide || aten_lowp_gemm(dtype));
  if (wide) {
    const int64_t chunks = make_blocks(T, d, c10::elementSize(dtype)).chunks;
    return T < 2 * m * std::max<int64_t>(chunks, 1);
  }
  return cpu_path(dtype) == CpuPath::kAten && aten_lowp_gemm(dtype);
}

// Blocks as above; the tasks are the blocks (per_chunk = 1).
Blocks make_lowp_blocks(int64_t T, int64_t d, int64_t elem_size) {
  const int64_t target =
      std::max<int64_t>(kMinRows, kLowpBlockBytes / std::max<int64_t>(1, d * elem_size));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n = std::min(div_up(div_up(T, target), threads) * threads,
                             std::max<int64_t>(1, div_up(T, kMinRows)));
  Blocks b;
  b.T = T;
  b.tb = round_up(div_up(T, n), kMinRows);
  b.n = div_up(T, b.tb);
  b.per_chunk = 1;
  b.chunks = b.n;
  return b;
}

template <typename scalar_t>
void forward(const at::Tensor& x, const at::Tensor& res, const at::Tensor& down_weight,
             const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
             const std::optional<at::Tensor>& up_bias, const std::optional<at::Tensor>& ln_weight,
             const std::optional<at::Tensor>& ln_bias, Act act, double scaling, double ln_eps,
             at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = acc_of<scalar_t>;
  const int64_t T = x.size(0), d = x.size(1), m = down_weight.size(0);
  const bool ln = given(ln_weight);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor lnw = as_acc(ln_weight, acc), lnb = as_acc(ln_bias, acc);
  const at::Tensor bu =
      given(up_bias) ? as_acc(*up_bias, acc) : at::zeros({d}, x.options().dtype(acc));
  const at::Tensor bd = given(down_bias) ? down_bias->contiguous() : at::Tensor();
  const at::Tensor WdT = down_weight.t(), WuT = up_weight.t();
  const Blocks blocks = make_lowp_blocks(T, d, sizeof(scalar_t));
  const acc_t s = static_cast<acc_t>(scaling), eps = static_cast<acc_t>(ln_eps);
  const scalar_t *xp = x.const_data_ptr<scalar_t>(), *rp = res.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const acc_t* bup = bu.const_data_ptr<acc_t>();
  const acc_t *lnwp = ptr_or_null<acc_t>(lnw), *lnbp = ptr_or_null<acc_t>(lnb);
  acc_t* meanp = ln ? mean.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* rstdp = ln ? rstd.mutable_data_ptr<acc_t>() : nullptr;

  parallel_for_aten(blocks.n, [&](int64_t begin, int64_t end) {
    const int64_t tb = blocks.tb;
    at::Tensor hs = ln ? at::empty({tb, d}, x.options()) : at::Tensor();
    at::Tensor zs = at::empty({tb, m}, x.options()), us = at::empty({tb, d}, x.options());
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * tb, rows = blocks.rows(blk);
      at::Tensor h = x.narrow(0, r0, rows);
      if (ln) {
        lowp_ln_rows<true>(xp + r0 * d, rows, d, eps, meanp + r0, rstdp + r0, lnwp, lnbp,
                           hs.mutable_data_ptr<scalar_t>());
        h = hs.narrow(0, 0, rows);
      }
      at::Tensor z = zs.narrow(0, 0, rows), u = us.narrow(0, 0, rows);
      if (bd.defined())
        at::addmm_out(z, bd, h, WdT);
      else
        at::mm_out(z, h, WdT);
      activation_(act, z);
      at::mm_out(u, z, WuT);
      lowp_finish_rows(u.const_data_ptr<scalar_t>(), rp + r0 * d, bup, s, rows, d, yp + r0 * d);
    }
  });
}

// Returns (dx, d down_weight, d down_bias, d up_weight, d up_bias, d ln_weight, d ln_bias).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& down_weight,
         const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
         const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
         const at::Tensor& mean, const at::Tensor& rstd, Act act, double scaling,
         bool residual_is_x) {
  using acc_t = acc_of<scalar_t>;
  const int64_t T = x.size(0), d = x.size(1), m = down_weight.size(0);
  const bool ln = given(ln_weight);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor lnw = as_acc(ln_weight, acc), lnb = as_acc(ln_bias, acc);
  const at::Tensor bd = given(down_bias) ? down_bias->contiguous() : at::Tensor();
  const at::Tensor WdT = down_weight.t();
  const Blocks blocks = make_lowp_blocks(T, d, sizeof(scalar_t));
  // Each block's sums over its rows: dy (d), dz (m), then d ln_w, d ln_b (d each) with LN.
  const int64_t nvec = d + m + (ln ? 2 * d : 0);
  at::Tensor parts = at::zeros({blocks.n, nvec}, x.options().dtype(acc));
  at::Tensor a_all = at::empty({T, m}, x.options()), dz_all = at::empty({T, m}, x.options());
  at::Tensor h_all = ln ? at::empty_like(x) : x;
  at::Tensor dx = at::empty_like(x);
  const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t *lnwp = ptr_or_null<acc_t>(lnw), *lnbp = ptr_or_null<acc_t>(lnb);
  const acc_t* meanp = ln ? mean.const_data_ptr<acc_t>() : nullptr;
  const acc_t* rstdp = ln ? rstd.const_data_ptr<acc_t>() : nullptr;

  parallel_for_aten(blocks.n, [&](int64_t begin, int64_t end) {
    const int64_t tb = blocks.tb;
    at::Tensor zs = at::empty({tb, m}, x.options()), das = at::empty({tb, m}, x.options());
    at::Tensor dhs = ln ? at::empty({tb, d}, x.options()) : at::Tensor();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * tb, rows = blocks.rows(blk);
      acc_t* sum_dy = parts[blk].mutable_data_ptr<acc_t>();
      acc_t *sum_dz = sum_dy + d, *sum_lnw = sum_dz + m, *sum_lnb = sum_lnw + d;
      const at::Tensor dyb = dy.narrow(0, r0, rows);
      at::Tensor h = h_all.narrow(0, r0, rows);
      if (ln)
        lowp_ln_rows<false>(xp + r0 * d, rows, d, acc_t(0), meanp + r0, rstdp + r0, lnwp, lnbp,
                            h.mutable_data_ptr<scalar_t>());
      at::Tensor z = zs.narrow(0, 0, rows), da = das.narrow(0, 0, rows);
      at::Tensor a = a_all.narrow(0, r0, rows), dz = dz_all.narrow(0, r0, rows);
      if (bd.defined())
        at::addmm_out(z, bd, h, WdT);
      else
        at::mm_out(z, h, WdT);
      activation_out(act, z, a);
      at::addmm_out(da, da, dyb, up_weight, 0, scaling);  // s * dy @ Wu (beta 0: da unread)
      activation_backward_out(act, da, z, dz);
      lowp_colsum_rows(dz.const_data_ptr<scalar_t>(), rows, m, sum_dz);
      if (ln) {
        at::Tensor dh = dhs.narrow(0, 0, rows);
        at::mm_out(dh, dz, down_weight);
        lowp_ln_backward_rows(dh.const_data_ptr<scalar_t>(), xp + r0 * d, dyp + r0 * d,
                              residual_is_x, meanp + r0, rstdp + r0, lnwp, rows, d,
                              dxp + r0 * d, sum_lnw, sum_lnb, sum_dy);
      } else {
        at::Tensor dxb = dx.narrow(0, r0, rows);
        if (residual_is_x)
          at::addmm_out(dxb, dyb, dz, down_weight);
        else
          at::mm_out(dxb, dz, down_weight);
        lowp_colsum_rows(dyp + r0 * d, rows, d, sum_dy);
      }
    }
  });

  // The weight gradients over all T (GEMMs threaded by ATen), then the block sums in order.
  at::Tensor d_up_weight = at::empty({d, m}, x.options());
  at::addmm_out(d_up_weight, d_up_weight, dy.t(), a_all, 0, scaling);  // s * dy^T @ a
  at::Tensor d_down_weight = at::mm(dz_all.t(), h_all);
  at::Tensor sums = parts[0].to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  for (int64_t blk = 1; blk < blocks.n; ++blk) sums.add_(parts[blk]);
  const auto dtype = x.scalar_type();
  at::Tensor d_up_bias = sums.narrow(0, 0, d).mul(scaling).to(dtype);
  at::Tensor d_down_bias = sums.narrow(0, d, m).to(dtype);
  at::Tensor d_ln_weight = ln ? sums.narrow(0, d + m, d).to(dtype) : at::empty({0}, x.options());
  at::Tensor d_ln_bias = ln ? sums.narrow(0, 2 * d + m, d).to(dtype) : at::empty({0}, x.options());
  return {dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_ln_weight, d_ln_bias};
}

}  // namespace aten_path

// ---------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& res, const Params& p,
                  const at::Tensor& bu, Act act, double scaling, double ln_eps, at::Tensor& y,
                  at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = acc_of<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // x readable in place
  const int64_t T = x.size(0), d = x.size(1), m = p.WdT.size(1);
  const bool ln = p.lnw.defined();
  const Blocks blocks = make_blocks(T, d, sizeof(acc_t));
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t s = static_cast<acc_t>(scaling), eps = static_cast<acc_t>(ln_eps);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = res.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const acc_t* bup = bu.const_data_ptr<acc_t>();
  const acc_t *lnw = ptr_or_null<acc_t>(p.lnw), *lnb = ptr_or_null<acc_t>(p.lnb);
  acc_t* meanp = ln ? mean.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* rstdp = ln ? rstd.mutable_data_ptr<acc_t>() : nullptr;

  parallel_for_aten(blocks.n, [&](int64_t begin, int64_t end) {
    const int64_t tb = blocks.tb;
    // Per-task scratch: x converted (fp16 / bf16), h (layer norm), z / a, u = a @ Wu^T.
    at::Tensor xs = kDirect ? at::Tensor() : at::empty({tb, d}, opts);
    at::Tensor hs = ln ? at::empty({tb, d}, opts) : at::Tensor();
    at::Tensor zs = at::empty({tb, m}, opts), us = at::empty({tb, d}, opts);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * tb, rows = blocks.rows(blk);
      at::Tensor xb = kDirect ? x.narrow(0, r0, rows) : xs.narrow(0, 0, rows);
      if constexpr (!kDirect) load_block(xp + r0 * d, rows * d, xs.mutable_data_ptr<acc_t>());
      at::Tensor h = xb;
      if (ln) {
        const acc_t* xa = xb.const_data_ptr<acc_t>();
        ln_stats(xa, rows, d, eps, meanp + r0, rstdp + r0);
        ln_apply(xa, rows, d, meanp + r0, rstdp + r0, lnw, lnb, hs.mutable_data_ptr<acc_t>());
        h = hs.narrow(0, 0, rows);
      }
      at::Tensor z = zs.narrow(0, 0, rows), u = us.narrow(0, 0, rows);
      down_projection(h, p, z);
      activation_(act, z);
      at::mm_out(u, z, p.WuT);
      finish_forward(u.const_data_ptr<acc_t>(), rp + r0 * d, bup, s, rows, d, yp + r0 * d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& up_bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    c10::string_view activation, double scaling, double ln_eps) {
  constexpr const char* op = "fastpeft::bottleneck_adapter";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing here is differentiated
  const auto [T, d, m] = check_common(op, x_in, down_weight, down_bias, up_weight, ln_weight,
                                      ln_bias);
  check_optional(op, up_bias, "up_bias", {d}, x_in, "x.shape[1]");
  check_optional(op, residual, "residual", {T, d}, x_in, "the shape of x");
  const Act act = parse_activation(op, activation);
  const bool ln = given(ln_weight);
  TORCH_CHECK(!ln || ln_eps > 0.0, op, ": ln_eps must be > 0, got ", ln_eps);

  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = given(residual) ? residual->contiguous() : x;
  at::Tensor y = at::empty({T, d}, x.options());
  at::Tensor mean = at::empty({ln ? T : 0}, x.options().dtype(acc)), rstd = at::empty_like(mean);
  if (T == 0) return {y, mean, rstd};
  if (aten_path::handles(x.scalar_type(), T, d, m)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      aten_path::forward<scalar_t>(x, res, down_weight, down_bias, up_weight, up_bias,
                                   ln_weight, ln_bias, act, scaling, ln_eps, y, mean, rstd);
    });
    return {y, mean, rstd};
  }
  const Params p = make_params(down_weight, down_bias, up_weight, ln_weight, ln_bias, acc,
                               /*backward=*/false);
  // The up bias as a full (d,) vector (zeros when absent): the epilogue has one form.
  const at::Tensor bu =
      given(up_bias) ? as_acc(*up_bias, acc) : at::zeros({d}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    forward_impl<scalar_t>(x, res, p, bu, act, scaling, ln_eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

// ---------------------------------------------------------------------------------------
// Backward.

// Per-chunk partial sums of the parameter gradients, with a leading chunk dimension,
// summed in chunk order at the end (sum_chunks). The weight gradients are in the
// accumulation type: the chunk's first block writes them (beta = 0, so they start
// uninitialised) and each later block's GEMM adds onto them, as a whole-T GEMM would
// accumulate over K. The vector gradients are summed per block in the accumulation type
// and added up over blocks in double, so that their rounding does not grow with T (a plain
// fp32 running sum over thousands of rows would be several times less accurate than
// torch's cascaded sums).
struct Partials {
  at::Tensor dWd, dWuT;  // (chunks, m, d) acc_t
  at::Tensor dbd;        // (chunks, m) double
  at::Tensor dbu;        // (chunks, d) double, sum of dy (times s at the end)
  at::Tensor dln;        // (chunks, 2, d) or (chunks, 2, 0) double: d ln_weight, d ln_bias
};

// parts[0] + parts[1] + ... in chunk order: elementwise adds, each output element on one
// thread, so the sum is the same bits for any thread count (a reduction kernel may split
// the chunk dimension between threads).
at::Tensor sum_chunks(const at::Tensor& parts) {
  if (parts.size(0) == 1) return parts[0];
  at::Tensor sum = parts[0].clone();
  for (int64_t c = 1; c < parts.size(0); ++c) sum.add_(parts[c]);
  return sum;
}

template <typename scalar_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const Params& p,
                   const at::Tensor& mean, const at::Tensor& rstd, Act act, double scaling,
                   bool residual_is_x, const Blocks& blocks, at::Tensor& dx, Partials& parts) {
  using acc_t = acc_of<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // x, dy, dx used in place
  const int64_t d = x.size(1), m = p.WdT.size(1);
  const bool ln = p.lnw.defined();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const double s = scaling;
  const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t *lnw = ptr_or_null<acc_t>(p.lnw), *lnb = ptr_or_null<acc_t>(p.lnb);
  const acc_t* meanp = ln ? mean.const_data_ptr<acc_t>() : nullptr;
  const acc_t* rstdp = ln ? rstd.const_data_ptr<acc_t>() : nullptr;

  parallel_for_aten(blocks.chunks, [&](int64_t begin, int64_t end) {
    const int64_t tb = blocks.tb;
    // Scratch: x and dy converted (fp16 / bf16), h (layer norm), z, a, da, dz (tb, m),
    // and dh when it cannot go straight into dx.
    at::Tensor xs = kDirect ? at::Tensor() : at::empty({tb, d}, opts);
    at::Tensor dys = kDirect ? at::Tensor() : at::empty({tb, d}, opts);
    at::Tensor hs = ln ? at::empty({tb, d}, opts) : at::Tensor();
    at::Tensor dhs = ln || !kDirect ? at::empty({tb, d}, opts) : at::Tensor();
    at::Tensor small = at::empty({4, tb, m}, opts);
    // The block's sums of dy, dz, dh * xhat, dh (then added onto the chunk's partials).
    at::Tensor vec = at::empty({3 * d + m}, opts);
    acc_t *sum_dy = vec.mutable_data_ptr<acc_t>(), *sum_dz = sum_dy + d;
    acc_t *sum_lnw = sum_dz + m, *sum_lnb = sum_lnw + d;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      at::Tensor dWd = parts.dWd[chunk], dWuT = parts.dWuT[chunk];
      double* dbd = parts.dbd[chunk].mutable_data_ptr<double>();
      double* dbu = parts.dbu[chunk].mutable_data_ptr<double>();
      double* dln = ln ? parts.dln[chunk].mutable_data_ptr<double>() : nullptr;
      const int64_t first = blocks.first_block(chunk), last = blocks.first_block(chunk + 1);
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t r0 = blk * tb, rows = blocks.rows(blk);
        at::Tensor xb = kDirect ? x.narrow(0, r0, rows) : xs.narrow(0, 0, rows);
        at::Tensor dyb = kDirect ? dy.narrow(0, r0, rows) : dys.narrow(0, 0, rows);
        if constexpr (!kDirect) {
          load_block(xp + r0 * d, rows * d, xs.mutable_data_ptr<acc_t>());
          load_block(dyp + r0 * d, rows * d, dys.mutable_data_ptr<acc_t>());
        }
        const acc_t *xa = xb.const_data_ptr<acc_t>(), *dya = dyb.const_data_ptr<acc_t>();
        // Recompute h and z, then a = act(z).
        at::Tensor h = xb;
        if (ln) {
          ln_apply(xa, rows, d, meanp + r0, rstdp + r0, lnw, lnb, hs.mutable_data_ptr<acc_t>());
          h = hs.narrow(0, 0, rows);
        }
        at::Tensor z = small[0].narrow(0, 0, rows), a = small[1].narrow(0, 0, rows);
        at::Tensor da = small[2].narrow(0, 0, rows), dz = small[3].narrow(0, 0, rows);
        down_projection(h, p, z);
        activation_out(act, z, a);
        // da = s * dy @ Wu (beta = 0: da's old contents are ignored), dz = da ⊙ act'(z).
        at::addmm_out(da, da, dyb, p.Wu, 0, s);
        activation_backward_out(act, da, z, dz);
        // Parameter gradients of the block, onto the chunk's partials (written by its first
        // block: beta = 0 ignores their uninitialised contents).
        const double beta = blk == first ? 0.0 : 1.0;
        dWuT.addmm_(a.t(), dyb, beta, s);
        dWd.addmm_(dz.t(), h, beta);
        colsum_block(dya, rows, d, sum_dy);
        add_wide(sum_dy, d, dbu);
        colsum_block(dz.const_data_ptr<acc_t>(), rows, m, sum_dz);
        add_wide(sum_dz, m, dbd);
        // dh = dz @ Wd, then dx.
        if (!ln && kDirect) {  // straight into dx, onto dy when the residual is x
          at::Tensor dxb = dx.narrow(0, r0, rows);
          if (residual_is_x)
            at::addmm_out(dxb, dyb, dz, p.Wd);
          else
            at::mm_out(dxb, dz, p.Wd);
          continue;
        }
        at::Tensor dh = dhs.narrow(0, 0, rows);
        at::mm_out(dh, dz, p.Wd);
        const acc_t* dhp = dh.const_data_ptr<acc_t>();
        if (ln) {
          std::fill(sum_lnw, sum_lnw + 2 * d, acc_t(0));
          ln_backward(dhp, xa, rows, d, meanp + r0, rstdp + r0, lnw,
                      residual_is_x ? dya : nullptr, dxp + r0 * d, sum_lnw, sum_lnb);
          add_wide(sum_lnw, 2 * d, dln);  // sum_lnb follows sum_lnw, as d ln_b follows d ln_w
        } else
          store_dx(dhp, residual_is_x ? dya : nullptr, rows * d, dxp + r0 * d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, c10::string_view activation,
    double scaling, bool residual_is_x) {
  constexpr const char* op = "fastpeft::bottleneck_adapter_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [T, d, m] = check_common(op, x_in, down_weight, down_bias, up_weight, ln_weight,
                                      ln_bias);
  check_tensor(op, grad_y, "grad_y", {T, d}, x_in, "the shape of x");
  const Act act = parse_activation(op, activation);
  const bool ln = given(ln_weight);
  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [t, name] : {std::pair{&mean_in, "mean"}, std::pair{&rstd_in, "rstd"}})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == acc && t->dim() == 1 &&
                    t->size(0) == (ln ? T : 0),
                op, ": ", name, " must be a ", acc, " CPU tensor of shape (", ln ? T : 0,
                ",) (the forward's layer-norm statistics), got ", t->scalar_type(), " of shape ",
                t->sizes(), " on ", t->device());

  const at::Tensor x = x_in.contiguous(), dy = grad_y.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  if (T > 0 && aten_path::handles(x.scalar_type(), T, d, m)) {
    return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      return aten_path::backward<scalar_t>(dy, x, down_weight, down_bias, up_weight, ln_weight,
                                           ln_bias, mean, rstd, act, scaling, residual_is_x);
    });
  }
  const Params p = make_params(down_weight, down_bias, up_weight, ln_weight, ln_bias, acc,
                               /*backward=*/true);
  const auto acc_opts = x.options().dtype(acc);
  const Blocks blocks = make_blocks(T, d, c10::elementSize(acc));
  const int64_t chunks = std::max<int64_t>(blocks.chunks, 1), d_ln = ln ? d : 0;
  const auto f64 = x.options().dtype(at::kDouble);
  // The weight partials are written by each chunk's first block; with no rows, zeros.
  auto weight_parts = [&] {
    return T > 0 ? at::empty({chunks, m, d}, acc_opts) : at::zeros({chunks, m, d}, acc_opts);
  };
  Partials parts{weight_parts(), weight_parts(), at::zeros({chunks, m}, f64),
                 at::zeros({chunks, d}, f64), at::zeros({chunks, 2, d_ln}, f64)};
  at::Tensor dx = at::empty({T, d}, x.options());
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      backward_impl<scalar_t>(dy, x, p, mean, rstd, act, scaling, residual_is_x, blocks, dx,
                              parts);
    });
  }
  // Sum the chunk partials, then to x's dtype (dWu un-transposed on the way).
  const auto dtype = x.scalar_type();
  at::Tensor d_down_weight = sum_chunks(parts.dWd).to(dtype);
  at::Tensor d_up_weight = sum_chunks(parts.dWuT).t().contiguous().to(dtype);
  at::Tensor d_down_bias = sum_chunks(parts.dbd).to(dtype);
  at::Tensor d_up_bias = sum_chunks(parts.dbu).mul_(scaling).to(dtype);
  const at::Tensor dln = sum_chunks(parts.dln);
  // (copies even when dtype is double: outputs must not share storage)
  at::Tensor d_ln_weight = dln[0].to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor d_ln_bias = dln[1].to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_ln_weight, d_ln_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("bottleneck_adapter", &forward);
  m.impl("bottleneck_adapter_backward", &backward);
}

}  // namespace fastpeft::cpu::bottleneck_adapter
