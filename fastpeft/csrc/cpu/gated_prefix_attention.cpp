// Gated prefix attention (LLaMA-Adapter zero-init attention), CPU: the ops
// fastpeft::gated_prefix_attention and gated_prefix_attention_backward (checks, blocking,
// threading, reductions); the micro-kernels are in gated_prefix_attention_kernels.h.
//
//   q (B, H, M, D)   k, v (B, Hkv, N, D)   pk, pv (PB, Hkv, P, D), PB in {1, B}
//   g (H) = tanh(gate) or gate;  head h reads kv head h / G, G = H / Hkv
//   S = scale q k^T + mask (M, N),  Sp = scale q pk^T (M, P)
//   out = softmax(S) v + g softmax(Sp) pv = O_s + g O_p
//
// Forward (flash attention, two softmaxes): per (b, h, block of kBlockM queries), the
// prompt softmax first (its P keys in one block), then an online softmax over blocks of
// kBlockN keys up to the causal limit, skipping blocks the key padding mask hides
// entirely. Saved for backward: the sequence part O_s (B, H, M, D), in the inputs' dtype,
// and lse, prompt_lse (B, H, M) fp32, natural log (lse = +inf for a row with no visible key,
// so its recomputed probabilities are 0).
//
// Backward, with dO = dL/dout, P = exp(S - lse), Pp = exp(Sp - lse_p):
//   out = P v + g Pp pv  =>  dv = P^T dO,  dP = dO v^T,  dpv = g Pp^T dO,  dPp = g dO pv^T,
//                            dg = sum over rows of D_p,  D_p = rowsum(dO ⊙ O_p).
//   Softmax rows s = softmax(x) have dx = s ⊙ (ds - <ds, s>), and
//   <dP, P>   = rowsum(dO ⊙ P v)  = rowsum(dO ⊙ O_s) =: D_s (from the saved O_s: taken
//               as rowsum(dO ⊙ out) - g D_p instead, out rounded to its dtype, it would
//               carry the rounding of g O_p, which outgrows O_s as the gate grows),
//   <dPp, Pp> = g rowsum(dO ⊙ O_p) = g D_p, so
//   dS = P ⊙ (dP - D_s),  dSp = g Pp ⊙ (dO pv^T - D_p),
//   dq = scale (dS k + dSp pk),  dk = scale dS^T q,  dpk = scale dSp^T q.
// P is recomputed block by block from lse (re-derived in fp64 for fp64 inputs, since the
// saved lse is fp32); Pp from scratch, normalised, with D_p taken as sum_p Pp dPp / g, so
// that the prompt softmax gradient sums to 0 to rounding. Nothing O(M N) is stored.
// Grouped-query heads sum into their kv head, a batch-shared prefix (PB = 1) over b, and
// d gate = dg (1 - tanh^2(gate)) with gate_tanh, summed over heads for a (1,) gate.
//
// fp16/bf16 inputs are converted to fp32 once, up front (O((M + N) D), negligible next
// to the O(M N D) work); fp32 and fp64 tensors are read in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/checks.h"
#include "cpu/gated_prefix_attention_kernels.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::gated_prefix_attention {
namespace {

constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

// The backward splits the query blocks of a (batch, kv head) pair into chunks, with a
// partial dk, dv each, until there are at least this many tasks: enough to occupy the
// cores of a typical CPU. Chunks are not free (the partials are zeroed, then summed, and
// dk, dv can no longer be accumulated in place), so no more than that.
constexpr int64_t kMinTasks = 8;

// Runs body(task, scratch) for tasks [0, n) on the intra-op threads, handed out one at a
// time from a shared counter: causal blocks differ in cost, so static splits imbalance.
template <typename Scratch, typename Make, typename Body>
void run_tasks(int64_t n, const Make& make_scratch, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch w = make_scratch();
    for (int64_t t; (t = next.fetch_add(1)) < n;) body(t, w);
  });
}

// ---------------------------------------------------------------------------------------
// Forward: one (b, h, query block). Blocks are query-minor with leading dim kBlockM:
// qt = scale2 q^T (D, .), s = S^T (max(kBlockN, P), .), o = O_s^T and op = O_p^T (D, .).
template <typename T>
struct FwdScratch {
  std::vector<T> qt, s, o, op, m, l, mp, lp, alpha;
};

template <typename T>
void forward_block(const Problem<T>& pr, int64_t b, int64_t h, int64_t qb, T* out, T* seq,
                   float* lse, float* plse, FwdScratch<T>& w) {
  constexpr int64_t L = VecT<T>::lanes, ld = kBlockM;
  const int64_t D = pr.D, P = pr.P, i0 = qb * kBlockM;
  const int64_t rows = std::min(kBlockM, pr.M - i0), cols = round_up(rows, L);
  const T* q = pr.q_at(pr.q, b, h, i0);
  const T *k = pr.kv_at(pr.k, b, h), *v = pr.kv_at(pr.v, b, h);
  const T *pk = pr.prefix_at(pr.pk, b, h), *pv = pr.prefix_at(pr.pv, b, h);
  T *qt = w.qt.data(), *s = w.s.data(), *o = w.o.data(), *op = w.op.data();
  transpose_scaled(q, D, rows, D, pr.scale2, qt, ld);
  for (int64_t d = 0; d < D; ++d) std::fill(qt + d * ld + rows, qt + d * ld + cols, T(0));
  // Prompt: its softmax, then O_p^T = pv^T Pp^T (D, cols), normalised below.
  prompt_softmax(pr, pk, qt, cols, s, w.mp.data(), w.lp.data(), w.alpha.data());
  mm<0>(pv, 1, D, D, s, ld, cols, op, ld, P);
  // Sequence: online softmax over the visible key blocks, O_s^T = O_s^T alpha + V^T P^T.
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<T>::infinity());
  std::fill(w.l.begin(), w.l.end(), T(0));
  std::fill(o, o + D * ld, T(0));
  const int64_t end = pr.kv_end(i0, rows);
  for (int64_t j0 = 0; j0 < end; j0 += kBlockN) {
    if (pr.skip(b, j0)) continue;
    const int64_t nb = std::min(kBlockN, end - j0);
    seq_scores(pr, b, k, j0, nb, qt, i0, rows, cols, s);
    softmax_online(s, ld, nb, cols, w.m.data(), w.l.data(), w.alpha.data());
    mm<2>(v + j0 * D, 1, D, D, s, ld, cols, o, ld, nb, w.alpha.data());
  }
  // O_s = O_s / l (saved), then out = O_s + g O_p / l_p, each through one transpose.
  T *l = w.l.data(), *lp = w.lp.data();
  for (int64_t i = 0; i < cols; ++i) {
    if (i < rows) {
      lse[i] = l[i] > 0 ? static_cast<float>((w.m[i] + std::log2(l[i])) * kLn2)
                        : std::numeric_limits<float>::infinity();
      plse[i] = lp[i] > 0 ? static_cast<float>((w.mp[i] + std::log2(lp[i])) * kLn2)
                          : -std::numeric_limits<float>::infinity();
    }
    l[i] = l[i] > 0 ? T(1) / l[i] : T(0), lp[i] = lp[i] > 0 ? pr.g[h] / lp[i] : T(0);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < cols; ++i) o[d * ld + i] *= l[i];
  transpose_scaled(o, ld, D, rows, T(1), seq, D);
  std::fill(l, l + cols, T(1));
  combine_outputs(o, op, ld, D, cols, l, lp);
  transpose_scaled(o, ld, D, rows, T(1), out, D);
}

// ---------------------------------------------------------------------------------------
// Backward: one (b, h, query block), accumulating into its task's dk, dv (N, Dp),
// dpk, dpv (P, Dp) and dg; writes the block's dq. qt = scale2 q^T, dot = dO^T (D, .);
// qn = scale q, don = dO (cols, Dp) row-major, zero-padded, as GEMM right-hand sides
// (qn carries the scale of dk = scale dS^T q and dpk).
template <typename T>
struct BwdScratch {
  std::vector<T> qt, dot, qn, don, s, dp, dqt, lse2, ds, dpr, m, l, alpha;
};

template <typename T>
struct BwdIO {
  const T *dout, *seq;
  const float* lse;
  T* dq;
};

// The saved lse is fp32; the fp64 path recomputes it (one extra S^T product per block) so
// that its gradients are exact to fp64 rounding rather than to fp32's.
template <typename T>
void recompute_lse2(const Problem<T>& pr, int64_t b, int64_t i0, int64_t rows, int64_t cols,
                    const T* k, BwdScratch<T>& w) {
  T *s = w.s.data(), *m = w.m.data(), *l = w.l.data();
  std::fill(m, m + kBlockM, -std::numeric_limits<T>::infinity());
  std::fill(l, l + kBlockM, T(0));
  const int64_t end = pr.kv_end(i0, rows);
  for (int64_t j0 = 0; j0 < end; j0 += kBlockN) {
    if (pr.skip(b, j0)) continue;
    const int64_t nb = std::min(kBlockN, end - j0);
    seq_scores(pr, b, k, j0, nb, w.qt.data(), i0, rows, cols, s);
    softmax_online(s, kBlockM, nb, cols, m, l, w.alpha.data());
  }
  for (int64_t i = 0; i < rows; ++i)
    w.lse2[i] = l[i] > 0 ? m[i] + std::log2(l[i]) : std::numeric_limits<T>::infinity();
}

template <typename T>
void backward_block(const Problem<T>& pr, const BwdIO<T>& io, int64_t b, int64_t h,
                    int64_t qb, T* dk, T* dv, T* dpk, T* dpv, double& dg, BwdScratch<T>& w) {
  constexpr int64_t L = VecT<T>::lanes, ld = kBlockM;
  const int64_t D = pr.D, Dp = pr.Dp, P = pr.P, i0 = qb * kBlockM;
  const int64_t rows = std::min(kBlockM, pr.M - i0), cols = round_up(rows, L);
  const T *q = pr.q_at(pr.q, b, h, i0), *dO = pr.q_at(io.dout, b, h, i0);
  const T* seq = pr.q_at(io.seq, b, h, i0);
  const int64_t row0 = (b * pr.H + h) * pr.M + i0;  // row of lse, dq
  const T *k = pr.kv_at(pr.k, b, h), *v = pr.kv_at(pr.v, b, h);
  const T *pk = pr.prefix_at(pr.pk, b, h), *pv = pr.prefix_at(pr.pv, b, h);
  T *qt = w.qt.data(), *dot = w.dot.data(), *qn = w.qn.data(), *don = w.don.data();
  T *s = w.s.data(), *dp = w.dp.data(), *dqt = w.dqt.data();
  T *ds = w.ds.data(), *dpr = w.dpr.data();
  const T inf = std::numeric_limits<T>::infinity(), g = pr.g[h];
  transpose_scaled(q, D, rows, D, pr.scale2, qt, ld);
  transpose_scaled(dO, D, rows, D, T(1), dot, ld);
  for (int64_t d = 0; d < D; ++d) {
    std::fill(qt + d * ld + rows, qt + d * ld + cols, T(0));
    std::fill(dot + d * ld + rows, dot + d * ld + cols, T(0));
  }
  std::fill(qn, qn + cols * Dp, T(0));
  std::fill(don, don + cols * Dp, T(0));
  for (int64_t i = 0; i < cols; ++i) {
    T dsum = 0;
    if (i < rows) {
      for (int64_t d = 0; d < D; ++d) qn[i * Dp + d] = q[i * D + d] * pr.scale;
      std::copy(dO + i * D, dO + (i + 1) * D, don + i * Dp);
#pragma omp simd reduction(+ : dsum)
      for (int64_t d = 0; d < D; ++d) dsum += dO[i * D + d] * seq[i * D + d];
    }
    w.lse2[i] = i < rows ? T(io.lse[row0 + i]) * T(kLog2e) : inf;  // +inf: P = 0 on padding
    ds[i] = dsum;  // D_s = rowsum(dO ⊙ O_s)
  }
  if constexpr (std::is_same_v<T, double>) recompute_lse2(pr, b, i0, rows, cols, k, w);
  // Prompt: Pp^T (P, cols) recomputed and normalised from scratch (not from prompt_lse), so
  // that sum_p dSp = 0 holds to rounding (and P = 1 gives exactly Pp = 1, dSp = 0).
  // dPp^T / g = pv dO^T,  D_p = sum_p Pp dPp / g = rowsum(dO ⊙ O_p).
  T* l = w.l.data();
  prompt_softmax(pr, pk, qt, cols, s, w.m.data(), l, w.alpha.data());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < cols; ++i) s[p * ld + i] /= l[i];  // l >= 1 (P >= 1)
  mm<0>(pv, D, 1, P, dot, ld, cols, dp, ld, D);
  colsum_product(s, dp, ld, P, cols, dpr);
  for (int64_t i = 0; i < rows; ++i) dg += dpr[i];
  // dSp^T = g Pp^T ⊙ (pv dO^T - D_p);  dpv += (g Pp^T) dO;  dpk += dSp^T q;  dq^T = pk^T dSp^T.
  softmax_grad(s, dp, ld, P, cols, dpr, g);
  for (int64_t e = 0; e < P * ld; ++e) s[e] *= g;
  mm<1>(s, ld, 1, P, don, Dp, Dp, dpv, Dp, cols);
  mm<1>(dp, ld, 1, P, qn, Dp, Dp, dpk, Dp, cols);
  mm<0>(pk, 1, D, D, dp, ld, cols, dqt, ld, P);
  // Sequence, per visible key block: P^T, dP^T = V dO^T, dS^T, then the three products.
  const int64_t end = pr.kv_end(i0, rows);
  for (int64_t j0 = 0; j0 < end; j0 += kBlockN) {
    if (pr.skip(b, j0)) continue;
    const int64_t nb = std::min(kBlockN, end - j0);
    seq_scores(pr, b, k, j0, nb, qt, i0, rows, cols, s);
    softmax_recompute(s, ld, nb, cols, w.lse2.data());
    mm<0>(v + j0 * D, D, 1, nb, dot, ld, cols, dp, ld, D);
    softmax_grad(s, dp, ld, nb, cols, ds, T(1));
    mm<1>(s, ld, 1, nb, don, Dp, Dp, dv + j0 * Dp, Dp, cols);   // dv += P^T dO
    mm<1>(dp, ld, 1, nb, qn, Dp, Dp, dk + j0 * Dp, Dp, cols);   // dk += dS^T q
    mm<1>(k + j0 * D, 1, D, D, dp, ld, cols, dqt, ld, nb);      // dq^T += k^T dS^T
  }
  transpose_scaled(dqt, ld, D, rows, pr.scale, io.dq + row0 * D, D);
}

// ---------------------------------------------------------------------------------------
// Op glue: checks, conversion to the accumulation type, the problem description.

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& gate,
                  const std::optional<at::Tensor>& kpm) {
  check_float_dtype(op, q, "q");
  const auto dt = q.scalar_type();
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, M, D), got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const std::pair<const at::Tensor*, const char*> named[] = {
      {&q, "q"}, {&k, "k"}, {&v, "v"}, {&pk, "prefix_k"}, {&pv, "prefix_v"}, {&gate, "gate"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, " must have dtype ", dt,
                " (the dtype of q), got ", t->scalar_type());
  }
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(3) == D, op,
              ": k must have shape (", B, ", Hkv, N, ", D, "), got ", k.sizes());
  const int64_t Hkv = k.size(1);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": the query heads H=", H,
              " must be a multiple of the kv heads of k, got k of shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(pk.dim() == 4 && (pk.size(0) == 1 || pk.size(0) == B) && pk.size(1) == Hkv &&
                  pk.size(3) == D,
              op, ": prefix_k must have shape (1 or ", B, ", ", Hkv, ", P, ", D, "), got ",
              pk.sizes());
  TORCH_CHECK(pv.sizes() == pk.sizes(), op, ": prefix_v must have the shape of prefix_k ",
              pk.sizes(), ", got ", pv.sizes());
  TORCH_CHECK(gate.dim() == 1 && (gate.size(0) == H || gate.size(0) == 1), op,
              ": gate must have shape (", H, ",) or (1,), got ", gate.sizes());
  if (given(kpm)) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->device().is_cpu(), op,
                ": key_padding_mask must be a bool CPU tensor, got ", kpm->scalar_type(), " on ",
                kpm->device());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == B && kpm->size(1) == k.size(2), op,
                ": key_padding_mask must have shape (", B, ", ", k.size(2), "), got ",
                kpm->sizes());
  }
}

at::ScalarType acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
// The tensor in the accumulation type, contiguous (no copy for fp32/fp64 contiguous input).
at::Tensor as_acc(const at::Tensor& t) { return t.to(acc_type(t)).contiguous(); }

// Fills pr from tensors already in the accumulation type (kept alive by the caller).
template <typename T>
void describe(Problem<T>& pr, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& gate,
              const at::Tensor& kpm, bool causal, double scale, bool gate_tanh) {
  pr.B = q.size(0), pr.H = q.size(1), pr.M = q.size(2), pr.D = q.size(3);
  pr.Hkv = k.size(1), pr.N = k.size(2), pr.PB = pk.size(0), pr.P = pk.size(2);
  pr.G = pr.H / pr.Hkv, pr.Dp = round_up(pr.D, VecT<T>::lanes), pr.nkb = div_up(pr.N, kBlockN);
  pr.causal = causal;
  pr.scale = static_cast<T>(scale), pr.scale2 = static_cast<T>(scale * kLog2e);
  pr.q = q.const_data_ptr<T>(), pr.k = k.const_data_ptr<T>(), pr.v = v.const_data_ptr<T>();
  pr.pk = pk.const_data_ptr<T>(), pr.pv = pv.const_data_ptr<T>();
  const T* gp = gate.const_data_ptr<T>();
  pr.g.resize(pr.H);
  for (int64_t h = 0; h < pr.H; ++h) {
    const T x = gp[gate.numel() == 1 ? 0 : h];
    pr.g[h] = gate_tanh ? std::tanh(x) : x;
  }
  if (kpm.defined()) {
    pr.keep = kpm.const_data_ptr<bool>();
    pr.kb_state.assign(pr.B * pr.nkb, kKept);
    for (int64_t b = 0; b < pr.B; ++b)
      for (int64_t kb = 0; kb < pr.nkb; ++kb) {
        const bool* first = pr.keep + b * pr.N + kb * kBlockN;
        const int64_t n = std::min(kBlockN, pr.N - kb * kBlockN);
        const int64_t kept = std::count(first, first + n, true);
        pr.kb_state[b * pr.nkb + kb] = kept == n ? kKept : kept == 0 ? kMasked : kMixed;
      }
  }
}

at::Tensor mask_of(const std::optional<at::Tensor>& kpm) {
  return given(kpm) ? kpm->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& pk_in, const at::Tensor& pv_in, const at::Tensor& gate_in,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    bool gate_tanh) {
  constexpr const char* op = "fastpeft::gated_prefix_attention";
  check_inputs(op, q_in, k_in, v_in, pk_in, pv_in, gate_in, key_padding_mask);
  const at::Tensor q = as_acc(q_in), k = as_acc(k_in), v = as_acc(v_in), pk = as_acc(pk_in),
                   pv = as_acc(pv_in), gate = as_acc(gate_in), kpm = mask_of(key_padding_mask);
  at::Tensor out = at::empty(q.sizes(), q.options()), seq = at::empty_like(out);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), f32), plse = at::empty_like(lse);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), op, [&] {
    using T = scalar_t;
    Problem<T> pr;
    describe(pr, q, k, v, pk, pv, gate, kpm, causal, scale, gate_tanh);
    const int64_t nqb = div_up(pr.M, kBlockM), D = pr.D, rows_s = std::max(kBlockN, pr.P);
    auto make = [&] {
      FwdScratch<T> w;
      for (auto* b : {&w.qt, &w.o, &w.op}) b->resize(D * kBlockM);
      w.s.resize(rows_s * kBlockM);
      for (auto* b : {&w.m, &w.l, &w.mp, &w.lp, &w.alpha}) b->resize(kBlockM);
      return w;
    };
    // Tasks head-major (K, V of a head stay in cache), the longest causal block first.
    run_tasks<FwdScratch<T>>(pr.B * pr.H * nqb, make, [&](int64_t t, FwdScratch<T>& w) {
      const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb, row0 = bh * pr.M + qb * kBlockM;
      forward_block(pr, bh / pr.H, bh % pr.H, qb, out.mutable_data_ptr<T>() + row0 * D,
                    seq.mutable_data_ptr<T>() + row0 * D, lse.mutable_data_ptr<float>() + row0,
                    plse.mutable_data_ptr<float>() + row0, w);
    });
  });
  return {out.to(q_in.scalar_type()), lse, plse, seq.to(q_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& pk_in, const at::Tensor& pv_in,
    const at::Tensor& gate_in, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& seq_in, const at::Tensor& lse_in, const at::Tensor& plse_in, bool causal,
    double scale, bool gate_tanh) {
  constexpr const char* op = "fastpeft::gated_prefix_attention_backward";
  check_inputs(op, q_in, k_in, v_in, pk_in, pv_in, gate_in, key_padding_mask);
  for (const auto& [t, name] : {std::pair{&grad_out_in, "grad_out"}, std::pair{&seq_in, "seq_out"}})
    TORCH_CHECK(t->sizes() == q_in.sizes() && t->scalar_type() == q_in.scalar_type() &&
                    t->device().is_cpu(),
                op, ": ", name, " must be a CPU tensor of shape ", q_in.sizes(), " and dtype ",
                q_in.scalar_type(), ", got ", t->sizes(), " ", t->scalar_type());
  for (const auto& [t, name] : {std::pair{&lse_in, "lse"}, std::pair{&plse_in, "prompt_lse"}})
    TORCH_CHECK(t->sizes() == q_in.sizes().slice(0, 3) && t->scalar_type() == at::kFloat &&
                    t->device().is_cpu(),
                op, ": ", name, " must be a float32 CPU tensor of shape ",
                q_in.sizes().slice(0, 3), ", got ", t->sizes(), " ", t->scalar_type());
  const at::Tensor q = as_acc(q_in), k = as_acc(k_in), v = as_acc(v_in), pk = as_acc(pk_in),
                   pv = as_acc(pv_in), gate = as_acc(gate_in), kpm = mask_of(key_padding_mask),
                   dout = as_acc(grad_out_in), seq = as_acc(seq_in), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty_like(dk), dpk = at::empty(pk.sizes(), pk.options());
  at::Tensor dpv = at::empty_like(dpk), dgate = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), op, [&] {
    using T = scalar_t;
    Problem<T> pr;
    describe(pr, q, k, v, pk, pv, gate, kpm, causal, scale, gate_tanh);
    const int64_t B = pr.B, Hkv = pr.Hkv, G = pr.G, N = pr.N, P = pr.P, D = pr.D, Dp = pr.Dp;
    const int64_t nqb = div_up(pr.M, kBlockM), rows_s = std::max(kBlockN, P);
    // Task = (b, kv head, chunk): the G query heads of a kv head and every C-th query block
    // (strided, so that causal chunks cost the same). A task owns its dq blocks outright
    // and accumulates dk, dv, dpk, dpv, dg in its own fp32 partials, summed over chunks
    // in chunk order below; C > 1 only when B * Hkv gives fewer than kMinTasks tasks. C
    // depends on the shapes only, not on the thread count, so neither do the sums.
    const int64_t C = std::clamp<int64_t>(div_up(kMinTasks, std::max<int64_t>(B * Hkv, 1)), 1,
                                          std::max<int64_t>(nqb, 1));
    const int64_t tasks = B * Hkv * C;
    // One chunk and an unpadded fp32 / fp64 head dim: accumulate straight into dk, dv.
    const bool direct = C == 1 && D == Dp && q_in.scalar_type() == q.scalar_type();
    if (direct) dk.zero_(), dv.zero_();
    std::vector<T> dk_p(direct ? 0 : tasks * N * Dp, T(0)), dv_p(dk_p.size(), T(0));
    T* dk_acc = direct ? dk.mutable_data_ptr<T>() : dk_p.data();
    T* dv_acc = direct ? dv.mutable_data_ptr<T>() : dv_p.data();
    std::vector<T> dpk_p(tasks * P * Dp, T(0)), dpv_p(dpk_p.size(), T(0));
    std::vector<double> dg_p(tasks * G, 0.0);
    const BwdIO<T> io{dout.const_data_ptr<T>(), seq.const_data_ptr<T>(),
                      lse.const_data_ptr<float>(), dq.mutable_data_ptr<T>()};
    auto make = [&] {
      BwdScratch<T> w;
      for (auto* b : {&w.qt, &w.dot, &w.dqt}) b->resize(D * kBlockM);
      for (auto* b : {&w.qn, &w.don}) b->resize(kBlockM * Dp);
      for (auto* b : {&w.s, &w.dp}) b->resize(rows_s * kBlockM);
      for (auto* b : {&w.lse2, &w.ds, &w.dpr, &w.m, &w.l, &w.alpha}) b->resize(kBlockM);
      return w;
    };
    run_tasks<BwdScratch<T>>(tasks, make, [&](int64_t t, BwdScratch<T>& w) {
      const int64_t bk = t / C, c = t % C, b = bk / Hkv, hk = bk % Hkv;
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t qb = c; qb < nqb; qb += C)
          backward_block(pr, io, b, hk * G + gi, qb, dk_acc + t * N * Dp,
                         dv_acc + t * N * Dp, dpk_p.data() + t * P * Dp,
                         dpv_p.data() + t * P * Dp, dg_p[t * G + gi], w);
    });
    // Reductions over chunks (and over b for a shared prefix, PB = 1).
    T *dk_o = dk.mutable_data_ptr<T>(), *dv_o = dv.mutable_data_ptr<T>();
    at::parallel_for(0, direct ? 0 : B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk)
        for (int64_t j = 0; j < N; ++j) {
          T *rk = dk_p.data() + (bk * C * N + j) * Dp, *rv = dv_p.data() + (bk * C * N + j) * Dp;
          for (int64_t c = 1; c < C; ++c)
            for (int64_t d = 0; d < D; ++d)
              rk[d] += rk[c * N * Dp + d], rv[d] += rv[c * N * Dp + d];
          std::copy(rk, rk + D, dk_o + (bk * N + j) * D);
          std::copy(rv, rv + D, dv_o + (bk * N + j) * D);
        }
    });
    T *dpk_o = dpk.mutable_data_ptr<T>(), *dpv_o = dpv.mutable_data_ptr<T>();
    const int64_t per_b = pr.PB == 1 ? B : 1;  // batches summed into one prefix entry
    for (int64_t o = 0; o < pr.PB * Hkv * P * D; ++o) {  // o = ((pb, hk), p, d)
      const int64_t pbk = o / (P * D), pd = o % (P * D), pb = pbk / Hkv, hk = pbk % Hkv;
      T sk = 0, sv = 0;
      for (int64_t b = pb; b < pb + per_b; ++b)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t e = ((b * Hkv + hk) * C + c) * P * Dp + pd / D * Dp + pd % D;
          sk += dpk_p[e], sv += dpv_p[e];
        }
      dpk_o[o] = sk, dpv_o[o] = sv;
    }
    // dg[h] = sum_{b, m} D_p; chain rule through tanh; a (1,) gate sums over heads.
    std::vector<double> dgh(pr.H, 0.0);
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t gi = 0; gi < G; ++gi) dgh[(t / C) % Hkv * G + gi] += dg_p[t * G + gi];
    const T* gp = gate.const_data_ptr<T>();
    T* dg_o = dgate.mutable_data_ptr<T>();
    std::fill(dg_o, dg_o + gate.numel(), T(0));
    for (int64_t h = 0; h < pr.H; ++h) {
      const int64_t gi = gate.numel() == 1 ? 0 : h;
      const double th = std::tanh(static_cast<double>(gp[gi]));
      dg_o[gi] += static_cast<T>(gate_tanh ? dgh[h] * (1.0 - th * th) : dgh[h]);
    }
  });
  const auto dt = q_in.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt), dpk.to(dt), dpv.to(dt), dgate.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("gated_prefix_attention", &forward);
  m.impl("gated_prefix_attention_backward", &backward);
}

}  // namespace fastpeft::cpu::gated_prefix_attention
