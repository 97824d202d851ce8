// Fused bottleneck adapter, CPU: the ops fastpeft::bottleneck_adapter and
// bottleneck_adapter_backward.
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
// Structure: both ops run over blocks of `tb` rows (~1 MiB of x, see kBlockBytes), split
// into one contiguous range of blocks per thread ("task"). Per block, while it is in cache,
// everything (T, d)-sized is touched once from memory: forward reads x (and the residual)
// and writes y; backward reads x and dy and writes dx. The (tb, m) bottleneck lives only
// in per-task scratch, so nothing (T, m) is ever stored; the price is recomputing z in
// backward (one extra (tb, d) x (d, m) product per block).
//
// The products are ATen GEMMs (MKL) on the cached blocks; inside at::parallel_for they
// run single-threaded, one per task, which is what we want. A CPU profile of fwd + bwd
// (fp32, T = d = 2048, m = 64, one Zen 3 thread) has 41 ms in MKL's sgemm kernel (~90
// GFLOP/s, about the core's FMA peak), 11 ms in MKL packing its operands and 2 ms in the
// passes of bottleneck_adapter_kernels.h. A hand-written micro-kernel could save at most
// the packing, and only by matching that kernel; it was not tried. The activation and its
// derivative are ATen's vectorised kernels on the (tb, m) scratch; the (tb, d) passes
// (layer norm, the residual epilogue, the layer-norm backward, conversions) are the loops
// of bottleneck_adapter_kernels.h.
//
// Parameter gradients accumulate per task (dWd and dWu^T (m, d) in the accumulation type,
// the bias and layer-norm gradients in double, see Partials) and are summed over the (few)
// tasks at the end. dWu is accumulated transposed because a^T @ dy (m x tb times tb x d)
// runs ~30% faster in MKL than dy^T @ a here. The alternative, storing a and dz (T, m)
// and doing whole-T GEMMs afterwards, spent the same time in MKL (a profile of one
// thread: 61.6 vs 60.1 ms per fwd + bwd, within noise) but reads x (or recomputes h) and
// dy from memory a second time.
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
#include "cpu/simd.h"

namespace fastpeft::cpu::bottleneck {
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
// Blocks and tasks.

// Rows per block. Each GEMM call has MKL pack its weight operand (m x d, 512 KiB at
// d = 2048, m = 64) again, so a block needs enough rows to amortise that: one Zen 3 core
// runs the block products at ~65-80 GFLOP/s with 32 rows and ~85 (its peak, about) from
// 128 rows on. Hence one (tb, d) buffer of ~1 MiB: 128 rows at d = 2048. A block's two to
// four such buffers (x, dy, h, dh) then spill from L2 to L3, which costs little next to
// the products and still reads x and dy from DRAM once. Measured, fp32 T = d = 2048,
// m = 64, one thread, fwd + bwd (best CPU time of 15): 60 ms with 256 KiB blocks, 55 with
// 1 MiB; 2 MiB blocks gain nothing more in a profile (MKL's packing time stays the same).
constexpr int64_t kBlockBytes = int64_t{1} << 20;
constexpr int64_t kMinRows = 8, kMaxRows = 256;

struct Blocks {
  int64_t tb = 1, n = 0, tasks = 0;
  // Blocks [first(task), first(task + 1)) belong to task.
  int64_t first(int64_t task) const { return task * n / tasks; }
};

Blocks make_blocks(int64_t T, int64_t d, int64_t elem_size) {
  Blocks b;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tb = kBlockBytes / std::max<int64_t>(1, d * elem_size) / kMinRows * kMinRows;
  tb = std::clamp(tb, kMinRows, kMaxRows);
  // Then as many blocks as that needs, rounded up to a multiple of the thread count, and
  // rows spread evenly over them: every thread gets the same number of blocks, of about
  // the same size (short inputs get smaller blocks, down to kMinRows rows).
  const int64_t n = round_up(div_up(T, tb), threads);
  b.tb = std::max<int64_t>(1, round_up(div_up(T, std::max<int64_t>(n, 1)), kMinRows));
  b.n = div_up(T, b.tb);
  b.tasks = std::min(threads, b.n);
  return b;
}

// Runs body(task) for every task on the intra-op threads (one task per thread). The
// ATen calls inside run below autograd: at::parallel_for does not carry the caller's
// dispatch-key state to its OpenMP threads, and without the guard an input that requires
// grad would send the out= GEMMs of a worker thread through autograd (an error).
template <typename Body>
void for_each_task(const Blocks& blocks, const Body& body) {
  at::parallel_for(0, blocks.tasks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) body(task);
  });
}

// ---------------------------------------------------------------------------------------
// The weights in the accumulation type, converted once per call (no copy for fp32/fp64).

// Each GEMM gets its weight operand contiguous in the layout it multiplies by (row-major
// (K, N)): MKL packs that operand on every call, and packs a transposed view measurably
// slower (z = h @ Wd^T: 65 vs 79 GFLOP/s at 32 rows, 83 vs 88 at 128, one Zen 3 core).
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

  for_each_task(blocks, [&](int64_t task) {
    const int64_t tb = blocks.tb;
    // Per-task scratch: x converted (fp16 / bf16), h (layer norm), z / a, u = a @ Wu^T.
    at::Tensor xs = kDirect ? at::Tensor() : at::empty({tb, d}, opts);
    at::Tensor hs = ln ? at::empty({tb, d}, opts) : at::Tensor();
    at::Tensor zs = at::empty({tb, m}, opts), us = at::empty({tb, d}, opts);
    for (int64_t blk = blocks.first(task); blk < blocks.first(task + 1); ++blk) {
      const int64_t r0 = blk * tb, rows = std::min(tb, T - r0);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_cpu(
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
  const Params p = make_params(down_weight, down_bias, up_weight, ln_weight, ln_bias, acc,
                               /*backward=*/false);
  // The up bias as a full (d,) vector (zeros when absent): the epilogue has one form.
  const at::Tensor bu =
      given(up_bias) ? as_acc(*up_bias, acc) : at::zeros({d}, x.options().dtype(acc));
  at::Tensor y = at::empty({T, d}, x.options());
  at::Tensor mean = at::empty({ln ? T : 0}, x.options().dtype(acc)), rstd = at::empty_like(mean);
  if (T == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    forward_impl<scalar_t>(x, res, p, bu, act, scaling, ln_eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

// ---------------------------------------------------------------------------------------
// Backward.

// Per-task partial sums of the parameter gradients, with a leading task dimension, summed
// at the end. The weight gradients are in the accumulation type (each block's GEMM adds
// onto them, as a whole-T GEMM would accumulate over K); the vector gradients are summed
// per block in the accumulation type and added up over blocks in double, so that their
// rounding does not grow with T (a plain fp32 running sum over thousands of rows would be
// several times less accurate than torch's cascaded sums).
struct Partials {
  at::Tensor dWd, dWuT;  // (tasks, m, d) acc_t
  at::Tensor dbd;        // (tasks, m) double
  at::Tensor dbu;        // (tasks, d) double, sum of dy (times s at the end)
  at::Tensor dln;        // (tasks, 2, d) or (tasks, 2, 0) double: d ln_weight, d ln_bias
};

template <typename scalar_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const Params& p,
                   const at::Tensor& mean, const at::Tensor& rstd, Act act, double scaling,
                   bool residual_is_x, const Blocks& blocks, at::Tensor& dx, Partials& parts) {
  using acc_t = acc_of<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // x, dy, dx used in place
  const int64_t T = x.size(0), d = x.size(1), m = p.WdT.size(1);
  const bool ln = p.lnw.defined();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const double s = scaling;
  const scalar_t *xp = x.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t *lnw = ptr_or_null<acc_t>(p.lnw), *lnb = ptr_or_null<acc_t>(p.lnb);
  const acc_t* meanp = ln ? mean.const_data_ptr<acc_t>() : nullptr;
  const acc_t* rstdp = ln ? rstd.const_data_ptr<acc_t>() : nullptr;

  for_each_task(blocks, [&](int64_t task) {
    const int64_t tb = blocks.tb;
    // Scratch: x and dy converted (fp16 / bf16), h (layer norm), z, a, da, dz (tb, m),
    // and dh when it cannot go straight into dx.
    at::Tensor xs = kDirect ? at::Tensor() : at::empty({tb, d}, opts);
    at::Tensor dys = kDirect ? at::Tensor() : at::empty({tb, d}, opts);
    at::Tensor hs = ln ? at::empty({tb, d}, opts) : at::Tensor();
    at::Tensor dhs = ln || !kDirect ? at::empty({tb, d}, opts) : at::Tensor();
    at::Tensor small = at::empty({4, tb, m}, opts);
    // The block's sums of dy, dz, dh * xhat, dh (then added onto the task's partials).
    at::Tensor vec = at::empty({3 * d + m}, opts);
    acc_t *sum_dy = vec.mutable_data_ptr<acc_t>(), *sum_dz = sum_dy + d;
    acc_t *sum_lnw = sum_dz + m, *sum_lnb = sum_lnw + d;
    at::Tensor dWd = parts.dWd[task], dWuT = parts.dWuT[task];
    double* dbd = parts.dbd[task].mutable_data_ptr<double>();
    double* dbu = parts.dbu[task].mutable_data_ptr<double>();
    double* dln = ln ? parts.dln[task].mutable_data_ptr<double>() : nullptr;
    for (int64_t blk = blocks.first(task); blk < blocks.first(task + 1); ++blk) {
      const int64_t r0 = blk * tb, rows = std::min(tb, T - r0);
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
      // Parameter gradients of the block, onto the task's partials.
      dWuT.addmm_(a.t(), dyb, 1, s);
      dWd.addmm_(dz.t(), h);
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
        ln_backward(dhp, xa, rows, d, meanp + r0, rstdp + r0, lnw, residual_is_x ? dya : nullptr,
                    dxp + r0 * d, sum_lnw, sum_lnb);
        add_wide(sum_lnw, 2 * d, dln);  // sum_lnb follows sum_lnw, as d ln_b follows d ln_w
      } else
        store_dx(dhp, residual_is_x ? dya : nullptr, rows * d, dxp + r0 * d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward_cpu(
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
  const Params p = make_params(down_weight, down_bias, up_weight, ln_weight, ln_bias, acc,
                               /*backward=*/true);
  const auto acc_opts = x.options().dtype(acc);
  const Blocks blocks = make_blocks(T, d, c10::elementSize(acc));
  const int64_t tasks = std::max<int64_t>(blocks.tasks, 1), d_ln = ln ? d : 0;
  const auto f64 = x.options().dtype(at::kDouble);
  Partials parts{at::zeros({tasks, m, d}, acc_opts), at::zeros({tasks, m, d}, acc_opts),
                 at::zeros({tasks, m}, f64), at::zeros({tasks, d}, f64),
                 at::zeros({tasks, 2, d_ln}, f64)};
  at::Tensor dx = at::empty({T, d}, x.options());
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      backward_impl<scalar_t>(dy, x, p, mean, rstd, act, scaling, residual_is_x, blocks, dx,
                              parts);
    });
  }
  // Sum the task partials, then to x's dtype (dWu un-transposed on the way).
  const auto dtype = x.scalar_type();
  auto total = [&](const at::Tensor& t) { return tasks == 1 ? t[0] : t.sum(0); };
  at::Tensor d_down_weight = total(parts.dWd).to(dtype);
  at::Tensor d_up_weight = total(parts.dWuT).t().contiguous().to(dtype);
  at::Tensor d_down_bias = total(parts.dbd).to(dtype);
  at::Tensor d_up_bias = total(parts.dbu).mul_(scaling).to(dtype);
  const at::Tensor dln = total(parts.dln);
  // (copies even when dtype is double: outputs must not share storage)
  at::Tensor d_ln_weight = dln[0].to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor d_ln_bias = dln[1].to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_ln_weight, d_ln_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace fastpeft::cpu::bottleneck
