// Multi-adapter LoRA linear, CPU: the ops fastpeft::multi_lora_linear and
// multi_lora_linear_backward (argument checks, the grouping of rows by adapter, the
// threading, the ATen calls); the row passes and the small-chunk kernels are in
// multi_lora_linear_kernels.h.
//
//   x (T, K)  weight W (N, K)  bias b (N,)  lora_A A (n, R, K)  lora_B B (n, N, R)
//   scaling s (n,) fp32  adapter_ids id (T,) int64 in [-1, n)
//   W is row-major (N, K) or the transposed view of a row-major (K, N) tensor, as in
//   lora_linear (the ATen GEMMs read either in place); bias, scaling and adapter_ids may
//   be strided (contiguous copies are taken); every other argument is contiguous.
//
// Per row t with i = id[t] >= 0 (m = Philox keep mask of the whole (T, K) input by
// global row, c = 1 / (1 - p), xd = c * m ⊙ x: lora_linear's mask for the same seed):
//   xa[t] = xd[t] @ A_i^T                            (zero where i = -1)
//   y[t]  = b + s_i * xa[t] @ B_i^T + x[t] @ W^T      (b + x[t] @ W^T where i = -1)
// Backward, with dy = dL/dy and, per row, sdyB[t] = s_i * dy[t] @ B_i (lora_branch.h's
// derivation, adapter by adapter; an adapter no row names gets zeros):
//   dB_i = sum over its rows of dy[t]^T (s_i * xa[t])          (N, R)
//   dA_i = sum over its rows of sdyB[t]^T xd[t]                (R, K)
//   dx[t] = c * m[t] ⊙ (sdyB[t] @ A_i) + dy[t] @ W
//
// The rows are grouped by adapter with a stable counting sort of the ids (Grouping,
// O(T + n)); an adapter's rows form a segment, cut into chunks of at most chunk_rows rows.
// The rank-R products are ATen GEMMs (oneDNN / MKL: AVX-512, AVX512-BF16, AMX where the
// CPU has them) on each chunk: where a segment's rows are consecutive in the batch (the
// batch is sorted by adapter) its blocks are views of x, y, xa, dy, dx, read and written
// in place; otherwise the chunk's rows are gathered into a buffer and its results
// scattered back, and with dropout the gather applies the mask by each row's global index
// (lora_branch::dropout_rows). Products are rounded to x's dtype between the GEMMs, as in
// the unfused composition and lora_linear's aten path.
//
// Small segments (at most kSmallRows rows: a serving batch's one-row segments, a batch of
// many short sequences) run the kernels' small_forward / small_backward_* instead, on the
// rows where they are: a GEMM call has a fixed cost (tens of microseconds for oneDNN's
// bf16 GEMMs) above a one-row segment's products, and a segment's backward makes four.
//
// Forward: the chunks write y = b + s_i * xa @ B_i^T and xa on their rows (b and zeros on
// the rows with id -1); then the base GEMM runs once for the whole batch, accumulating
// onto y (beta = 1), threaded by ATen as in lora_linear.
// Backward, two parallel phases: (1) per chunk: sdyB for its rows (kept in grouped
// order), the LoRA term of dx (masked and scattered to its rows), and the gathered dy, xa
// and xd rows the weight gradients need; a small segment's task computes all of its
// gradients; (2) per adapter that is not small: dB_i and dA_i, each one GEMM over the
// adapter's whole segment (no partial sums to combine, and fp16 / bf16 rounded once).
// Then dx += dy @ W (one GEMM, beta = 1).
//
// Threading: the chunks (and in phase 2 the per-adapter GEMMs, largest first) are
// handed out dynamically to the intra-op threads, each task's GEMMs single-threaded
// (parallel_for_aten, SingleThreadedOmp). A serving batch of many one-row segments thus
// runs its segments side by side, and a few large segments are split into chunks. The
// chunks are fixed by the ids and shapes and each task computes the same way on
// whichever thread, so xa, the LoRA terms and dA, dB do not depend on the thread count;
// y and dx's base GEMMs are ATen-threaded, as in lora_linear.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/checks.h"
#include "cpu/lora_branch.h"
#include "cpu/multi_lora_linear_kernels.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::multi_lora_linear {
namespace {

// ---------------------------------------------------------------------------------------
// Argument checks

// A stacked (n, d1, d2) adapter tensor: 3-D, CPU, x's dtype, contiguous.
void check_stack(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (n adapters stacked), got shape ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              x.scalar_type(), " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// x, weight, lora_A (n, R, K), lora_B (n, N, R); returns n.
int64_t check_layer(const char* op, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_linear_weight(op, weight, "weight", x);
  check_size(op, weight, "weight", 1, x.size(1), "in_features of x");
  check_stack(op, lora_A, "lora_A", x);
  check_stack(op, lora_B, "lora_B", x);
  const int64_t n = lora_A.size(0);
  check_size(op, lora_A, "lora_A", 2, x.size(1), "in_features of x");
  check_size(op, lora_B, "lora_B", 0, n, "adapters in lora_A");
  check_size(op, lora_B, "lora_B", 1, weight.size(0), "out_features of weight");
  check_size(op, lora_B, "lora_B", 2, lora_A.size(1), "rank of lora_A");
  return n;
}

// scaling: (n,) float32 on the CPU, any stride; returned as a vector.
std::vector<double> read_scaling(const char* op, const at::Tensor& scaling, int64_t n) {
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == n, op,
              ": scaling must have shape (", n, ",) (one per adapter of lora_A), got ",
              scaling.sizes());
  TORCH_CHECK(scaling.scalar_type() == at::kFloat && scaling.device().is_cpu(), op,
              ": scaling must be a float32 CPU tensor, got ", scaling.scalar_type(), " on ",
              scaling.device());
  const at::Tensor s = scaling.contiguous();
  const float* p = s.const_data_ptr<float>();
  return std::vector<double>(p, p + n);
}

// adapter_ids: (T,) int64 on the CPU, any stride, values in [-1, n); grouped by adapter.
Grouping group_ids(const char* op, const at::Tensor& adapter_ids, const at::Tensor& x,
                   int64_t n) {
  const int64_t T = x.size(0);
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == T, op,
              ": adapter_ids must have shape (", T, ",) (one id per row of x), got ",
              adapter_ids.sizes());
  TORCH_CHECK(adapter_ids.scalar_type() == at::kLong && adapter_ids.device().is_cpu(), op,
              ": adapter_ids must be an int64 CPU tensor, got ", adapter_ids.scalar_type(),
              " on ", adapter_ids.device());
  const at::Tensor ids = adapter_ids.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  Grouping g = group_rows(id, T, n);
  // ValueError, with the public function's words: on CPU tensors it leaves this check here
  TORCH_CHECK_VALUE(g.bad_row < 0, op, ": adapter_ids: expected values in [-1, ", n,
                    ") (-1 = the base alone; lora_A holds ", n, " adapters), got ",
                    g.bad_row >= 0 ? id[g.bad_row] : 0, " at row ", g.bad_row);
  return g;
}

// ---------------------------------------------------------------------------------------
// Tasks

// Rows per chunk: a chunk's blocks (rows x (K + N)) take at most ~1 MiB, half an L2, so
// that a gathered chunk is still cached when its GEMMs read it and its results when they
// are scattered; enough rows (16 .. 256) for the GEMMs to run at speed, and few GEMM calls
// (each has a fixed cost).
int64_t chunk_rows(int64_t K, int64_t N, int64_t elem) {
  return std::clamp<int64_t>((int64_t{1} << 20) / std::max<int64_t>(1, (K + N) * elem), 16, 256);
}

// A chunk: rows order[begin : end) of the grouping, all of adapter `adapter`.
struct Chunk {
  int64_t adapter, begin, end;
};

std::vector<Chunk> make_chunks(const Grouping& g, int64_t n, int64_t rows) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = g.offset[i]; b < g.offset[i + 1]; b += rows)
      chunks.push_back({i, b, std::min(b + rows, g.offset[i + 1])});
  return chunks;
}

// While alive, OpenMP's nthreads-var is 1 on the calling thread. oneDNN (ATen's bf16 /
// fp16 GEMMs) plans a GEMM's decomposition, its split of the reduction included, for
// omp_get_max_threads() threads, also inside a parallel region where it then runs them
// one after the other on one thread: without this, a bf16 GEMM of a task gave other bits
// for 1 thread than for 2 or 3 (SingleThreadedMkl does the same for MKL).
class SingleThreadedOmp {
 public:
#ifdef _OPENMP
  SingleThreadedOmp() : previous_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreadedOmp() { omp_set_num_threads(previous_); }
#else
  SingleThreadedOmp() = default;
#endif
  SingleThreadedOmp(const SingleThreadedOmp&) = delete;
  SingleThreadedOmp& operator=(const SingleThreadedOmp&) = delete;

 private:
  [[maybe_unused]] int previous_ = 1;
};

// Per-thread buffers, allocated on first use at their largest size: (rows, width) blocks,
// and the small-segment kernels' work space (acc_t, float or double; not initialised).
struct Scratch {
  Scratch(at::TensorOptions options_, int64_t max_rows_)
      : options(options_), max_rows(max_rows_) {}

  at::TensorOptions options;
  int64_t max_rows;
  at::Tensor bufs[3];
  std::unique_ptr<double[]> work;
  int64_t work_size = 0;

  at::Tensor get(int slot, int64_t rows, int64_t width) {
    at::Tensor& b = bufs[slot];
    if (!b.defined()) b = at::empty({max_rows, width}, options);
    return b.narrow(0, 0, rows);
  }
  template <typename T>
  T* work_buffer(int64_t n) {
    if (work_size < n) work.reset(new double[static_cast<size_t>(n)]), work_size = n;
    return reinterpret_cast<T*>(work.get());
  }
};

// Runs body(task, scratch) for task in [0, n_tasks) on the intra-op threads, the tasks
// handed out one at a time (an atomic counter) so that unequal tasks balance; each thread
// has a Scratch of its own. Each task runs on one thread with single-threaded GEMMs
// (parallel_for_aten, SingleThreadedOmp), so its results do not depend on where it ran.
template <typename Body>
void run_tasks(int64_t n_tasks, const at::TensorOptions& options, int64_t max_rows,
               const Body& body) {
  if (n_tasks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n_tasks, at::get_num_threads());
  parallel_for_aten(workers, [&](int64_t, int64_t) {
    SingleThreadedOmp single_threaded_omp;
    Scratch scratch(options, max_rows);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;)
      body(task, scratch);
  });
}

// The chunk's rows of src (T, w) gathered into dst (m, w), or the scatter back
void gather(const at::Tensor& src, const int64_t* rows, int64_t m, const at::Tensor& dst) {
  gather_rows(src.const_data_ptr(), src.stride(0), rows, m, dst.mutable_data_ptr(),
              dst.stride(0), src.size(1), src.element_size());
}
void scatter(const at::Tensor& src, const int64_t* rows, int64_t m, const at::Tensor& dst) {
  scatter_rows(src.const_data_ptr(), src.stride(0), rows, m, dst.mutable_data_ptr(),
               dst.stride(0), dst.size(1), dst.element_size());
}

// ---------------------------------------------------------------------------------------
// Forward

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scaling,
    const at::Tensor& adapter_ids, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastpeft::multi_lora_linear";
  const int64_t n = check_layer(op, x, weight, lora_A, lora_B);
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  const at::Tensor b = lora_branch::checked_bias(op, bias, N, x);
  const std::vector<double> s = read_scaling(op, scaling, n);
  const Grouping g = group_ids(op, adapter_ids, x, n);
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);
  const bool dropout = dropout_p > 0.0;

  at::Tensor y = at::empty({T, N}, x.options());
  at::Tensor xa = at::empty({T, R}, x.options());
  // rows with id -1: y = b (or 0), xa = 0
  const size_t elem = x.element_size();
  fill_rows(b.defined() ? b.const_data_ptr() : nullptr, g.base.data(), g.base.size(),
            y.mutable_data_ptr(), N, N, elem);
  fill_rows(nullptr, g.base.data(), g.base.size(), xa.mutable_data_ptr(), R, R, elem);

  const int64_t rows = chunk_rows(K, N, x.element_size());
  const std::vector<Chunk> chunks = make_chunks(g, n, rows);
  const auto chunk_task = [&](int64_t task, Scratch& scratch) {
    const Chunk& c = chunks[task];
    const int64_t m = c.end - c.begin, i = c.adapter;
    const int64_t* rows_c = g.order.data() + c.begin;
    const bool in_place = g.consecutive(i);
    const int64_t t0 = rows_c[0];
    if (m <= kSmallRows) {  // our kernels, on the rows where they are
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora", [&] {
        using acc_t = acc_of<scalar_t>;
        const scalar_t* x_p = x.const_data_ptr<scalar_t>();
        const scalar_t* xd_p = nullptr;
        if (dropout) {
          at::Tensor xd = scratch.get(0, m, K);
          lora_branch::dropout_rows(x, rows_c, m, dropout_p, seed_v, xd);
          xd_p = xd.const_data_ptr<scalar_t>();
        }
        const scalar_t* xr[kSmallRows];
        scalar_t *xar[kSmallRows], *yr[kSmallRows];
        for (int64_t j = 0; j < m; ++j) {
          xr[j] = dropout ? xd_p + j * K : x_p + rows_c[j] * K;
          xar[j] = xa.mutable_data_ptr<scalar_t>() + rows_c[j] * R;
          yr[j] = y.mutable_data_ptr<scalar_t>() + rows_c[j] * N;
        }
        acc_t* work =
            scratch.work_buffer<acc_t>((kBlockRows + 8) * round_up(R, 8) + kBlockRows * K);
        small_forward<scalar_t>(xr, m, lora_A.const_data_ptr<scalar_t>() + i * R * K,
                                lora_B.const_data_ptr<scalar_t>() + i * N * R,
                                b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                static_cast<acc_t>(s[i]), R, K, N, xar, yr, work);
      });
      return;
    }
    at::Tensor xd;  // the chunk's (dropped) x rows
    if (dropout) {
      xd = scratch.get(0, m, K);
      lora_branch::dropout_rows(x, rows_c, m, dropout_p, seed_v, xd);
    } else if (in_place) {
      xd = x.narrow(0, t0, m);
    } else {
      xd = scratch.get(0, m, K);
      gather(x, rows_c, m, xd);
    }
    at::Tensor xa_c = in_place ? xa.narrow(0, t0, m) : scratch.get(1, m, R);
    at::Tensor y_c = in_place ? y.narrow(0, t0, m) : scratch.get(2, m, N);
    at::mm_out(xa_c, xd, lora_A[i].t());
    // y_c = b + s_i * xa_c @ B_i^T: the bias rows first, then addmm_ in place (beta = 1;
    // without a bias beta = 0, and y_c's contents are ignored). Not addmm_out(y_c, b, ...):
    // with a separate input, on oversubscribed threads, it gave other last bits now and
    // then (1 call in ~200), where the in-place form gave the same bits in every trial.
    if (b.defined()) fill_block(b.const_data_ptr(), m, y_c.mutable_data_ptr(), N, N, elem);
    y_c.addmm_(xa_c, lora_B[i].t(), b.defined() ? 1.0 : 0.0, s[i]);
    if (!in_place) {
      scatter(xa_c, rows_c, m, xa);
      scatter(y_c, rows_c, m, y);
    }
  };
  run_tasks(static_cast<int64_t>(chunks.size()), x.options(), rows, chunk_task);

  // The base GEMM accumulates onto y (beta = 1), once for the whole batch.
  y.addmm_(x, weight.t());
  return {y, xa};
}

// ---------------------------------------------------------------------------------------
// Backward

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
    const at::Tensor& scaling, const at::Tensor& adapter_ids, double dropout_p,
    const std::optional<at::Tensor>& seed, bool compute_dx) {
  constexpr const char* op = "fastpeft::multi_lora_linear_backward";
  const int64_t n = check_layer(op, x, weight, lora_A, lora_B);
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  check_matrix(op, grad_y, "grad_y", x);
  check_size(op, grad_y, "grad_y", 0, T, "rows of x");
  check_size(op, grad_y, "grad_y", 1, N, "out_features of weight");
  check_matrix(op, xa, "xa", x);
  check_size(op, xa, "xa", 0, T, "rows of x");
  check_size(op, xa, "xa", 1, R, "rank of lora_A");
  const std::vector<double> s = read_scaling(op, scaling, n);
  const Grouping g = group_ids(op, adapter_ids, x, n);
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);
  const bool dropout = dropout_p > 0.0;

  at::Tensor dA = at::empty_like(lora_A);
  at::Tensor dB = at::empty_like(lora_B);
  at::Tensor dx = compute_dx ? at::empty({T, K}, x.options()) : x.new_empty({0});
  const size_t elem = x.element_size();
  if (compute_dx)  // rows with id -1: no LoRA term
    fill_rows(nullptr, g.base.data(), g.base.size(), dx.mutable_data_ptr(), K, K, elem);
  bool gathered = false;  // some adapter's rows are gathered
  for (int64_t i = 0; i < n; ++i) {
    if (g.rows(i) == 0) {  // an adapter no row names: zero gradients
      std::memset(static_cast<char*>(dA.mutable_data_ptr()) + i * R * K * elem, 0, R * K * elem);
      std::memset(static_cast<char*>(dB.mutable_data_ptr()) + i * N * R * elem, 0, N * R * elem);
    } else if (!g.consecutive(i)) {
      gathered = true;
    }
  }

  // In grouped order, over all active rows: s_i * dy @ B_i, and the dy, xa and xd rows
  // the weight gradients read where they are not views of dy, xa and x.
  const int64_t active = static_cast<int64_t>(g.order.size());
  at::Tensor sdyB = at::empty({active, R}, x.options());
  at::Tensor dy_g = gathered ? at::empty({active, N}, x.options()) : at::Tensor();
  at::Tensor xa_g = gathered ? at::empty({active, R}, x.options()) : at::Tensor();
  at::Tensor xd_g = gathered || dropout ? at::empty({active, K}, x.options()) : at::Tensor();
  const auto small = [&](int64_t i) { return g.rows(i) <= kSmallRows; };

  // Phase 1: per chunk. A small segment is one chunk, and its task computes all of its
  // gradients with the kernels' small_backward_*.
  const int64_t rows = chunk_rows(K, N, x.element_size());
  const std::vector<Chunk> chunks = make_chunks(g, n, rows);
  const auto chunk_task = [&](int64_t task, Scratch& scratch) {
    const Chunk& c = chunks[task];
    const int64_t m = c.end - c.begin, i = c.adapter;
    const int64_t* rows_c = g.order.data() + c.begin;
    const bool in_place = g.consecutive(i);
    const int64_t t0 = rows_c[0];
    if (small(i)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora", [&] {
        using acc_t = acc_of<scalar_t>;
        const scalar_t *dyr[kSmallRows], *xar[kSmallRows], *xdr[kSmallRows];
        scalar_t* dxr[kSmallRows];
        at::Tensor dxl = compute_dx && dropout ? scratch.get(0, m, K) : at::Tensor();
        for (int64_t j = 0; j < m; ++j) {
          const int64_t t = rows_c[j];
          dyr[j] = grad_y.const_data_ptr<scalar_t>() + t * N;
          xar[j] = xa.const_data_ptr<scalar_t>() + t * R;
          xdr[j] = x.const_data_ptr<scalar_t>() + t * K;
          if (compute_dx)
            dxr[j] = dropout ? dxl.mutable_data_ptr<scalar_t>() + j * K
                             : dx.mutable_data_ptr<scalar_t>() + t * K;
        }
        const int64_t Rq = round_up(R, 16);  // >= the kernels' R rounded to 2 vectors
        acc_t* sdyB_s =
            scratch.work_buffer<acc_t>(2 * kSmallRows * Rq + N * Rq + 32 * kSmallRows);
        acc_t* work = sdyB_s + kSmallRows * Rq;
        small_backward_dy<scalar_t>(dyr, xar, m, lora_A.const_data_ptr<scalar_t>() + i * R * K,
                                    lora_B.const_data_ptr<scalar_t>() + i * N * R,
                                    static_cast<acc_t>(s[i]), R, K, N,
                                    dB.mutable_data_ptr<scalar_t>() + i * N * R,
                                    compute_dx ? dxr : nullptr, sdyB_s, work);
        if (dropout) {  // xd rows, and the mask onto dx's LoRA term, from one draw
          at::Tensor xd = scratch.get(1, m, K);
          lora_branch::dropout_rows(x, rows_c, m, dropout_p, seed_v, xd, dxl, dx);
          for (int64_t j = 0; j < m; ++j) xdr[j] = xd.const_data_ptr<scalar_t>() + j * K;
        }
        small_backward_dA<scalar_t>(sdyB_s, xdr, m, R, K,
                                    dA.mutable_data_ptr<scalar_t>() + i * R * K, work);
      });
      return;
    }
    at::Tensor dy_c, sdyB_c = sdyB.narrow(0, c.begin, m);
    if (in_place) {
      dy_c = grad_y.narrow(0, t0, m);
    } else {
      dy_c = dy_g.narrow(0, c.begin, m);
      gather(grad_y, rows_c, m, dy_c);
      gather(xa, rows_c, m, xa_g.narrow(0, c.begin, m));
    }
    sdyB_c.addmm_(dy_c, lora_B[i], 0.0, s[i]);  // s_i * dy @ B_i (beta = 0)
    at::Tensor xd_c = xd_g.defined() ? xd_g.narrow(0, c.begin, m) : at::Tensor();
    if (dropout) {  // xd rows, and the mask onto dx's LoRA term, from one draw
      at::Tensor dxl;
      if (compute_dx) {
        dxl = scratch.get(0, m, K);
        at::mm_out(dxl, sdyB_c, lora_A[i]);
      }
      lora_branch::dropout_rows(x, rows_c, m, dropout_p, seed_v, xd_c, dxl, dx);
    } else {
      if (compute_dx) {
        if (in_place) {
          at::Tensor dx_c = dx.narrow(0, t0, m);
          at::mm_out(dx_c, sdyB_c, lora_A[i]);
        } else {
          at::Tensor dxl = scratch.get(0, m, K);
          at::mm_out(dxl, sdyB_c, lora_A[i]);
          scatter(dxl, rows_c, m, dx);
        }
      }
      if (!in_place) gather(x, rows_c, m, xd_c);
    }
  };
  run_tasks(static_cast<int64_t>(chunks.size()), x.options(), rows, chunk_task);

  // Phase 2: per adapter that is not small, dB_i = s_i * dy_i^T @ xa_i and
  // dA_i = sdyB_i^T @ xd_i over its whole segment, one GEMM each; the largest first.
  std::vector<int64_t> large;
  for (int64_t i = 0; i < n; ++i)
    if (g.rows(i) > 0 && !small(i)) large.push_back(i);
  std::stable_sort(large.begin(), large.end(),
                   [&](int64_t a, int64_t c) { return g.rows(a) > g.rows(c); });
  const auto adapter_task = [&](int64_t task, Scratch&) {
    const int64_t i = large[task / 2], off = g.offset[i], m = g.rows(i);
    const bool in_place = g.consecutive(i);
    const int64_t t0 = g.order[off];
    if (task % 2 == 0) {
      const at::Tensor xd_i = dropout || !in_place ? xd_g.narrow(0, off, m) : x.narrow(0, t0, m);
      at::Tensor dA_i = dA[i];
      at::mm_out(dA_i, sdyB.narrow(0, off, m).t(), xd_i);
    } else {
      const at::Tensor dy_i = in_place ? grad_y.narrow(0, t0, m) : dy_g.narrow(0, off, m);
      const at::Tensor xa_i = in_place ? xa.narrow(0, t0, m) : xa_g.narrow(0, off, m);
      dB[i].addmm_(dy_i.t(), xa_i, 0.0, s[i]);  // beta = 0
    }
  };
  run_tasks(2 * static_cast<int64_t>(large.size()), x.options(), 0, adapter_task);

  if (compute_dx) dx.addmm_(grad_y, weight);  // beta = 1 onto the LoRA term
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("multi_lora_linear", &forward);
  m.impl("multi_lora_linear_backward", &backward);
}

}  // namespace fastpeft::cpu::multi_lora_linear
