// Fused LoRA linear, CPU: the ops fastpeft::lora_linear and lora_linear_backward.
//
//   x (T, K)  weight W (N, K)  bias b (N,)  lora_A A (R, K)  lora_B B (N, R)  scaling s
//   W is row-major (N, K) or the transposed view of a row-major (K, N) tensor (GPT-2's
//   Conv1D weight.t(), PEFT's fan_in_fan_out); the ATen GEMMs read either in place. The
//   bias may be strided (a contiguous copy of its N elements is taken); every other
//   argument is contiguous.
//
//   y  = b + s * xd @ A^T @ B^T + x @ W^T         xd = dropout(x), regenerated in backward
//   dx = c * m ⊙ (s * (dy @ B) @ A) + dy @ W,  dA, dB as derived in lora_branch.h
//
// lora_linear has no kernels of its own: the LoRA branch (the rank-R parts, the dropout
// mask) is the module shared with int8_lora_linear (lora_branch.h, lora_branch.cpp,
// lora_branch_kernels.h), and the heavy GEMMs (x @ W^T, dy @ W) stay in ATen (MKL /
// oneDNN), accumulating onto the LoRA terms the branch writes (beta = 1), so that the
// LoRA term costs no extra pass over y or dx. ATen threads these GEMMs itself, and MKL
// may split a GEMM's reduction over K differently for another thread count, so y and dx
// can change in their last bits with torch.set_num_threads, as torch.nn.Linear's do (the
// LoRA terms, d lora_A and d lora_B do not). Pinning them would take tiling the GEMMs
// ourselves in thread-count-independent tiles, at the cost of repacking x and W per tile
// and of capping the GEMMs' parallelism at the tile count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/checks.h"
#include "cpu/lora_branch.h"

namespace fastpeft::cpu::lora_linear {
namespace {

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastpeft::lora_linear";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_linear_weight(op, weight, "weight", x);
  check_size(op, weight, "weight", 1, x.size(1), "in_features of x");
  const int64_t N = weight.size(0);
  lora_branch::check_branch(op, x, lora_A, lora_B, N, "weight");
  const at::Tensor b = lora_branch::checked_bias(op, bias, N, x);
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);

  auto [y, xa] = lora_branch::forward(x, b, lora_A, lora_B, scaling, dropout_p, seed_v);
  // The base GEMM accumulates onto y = b + s * xa @ B^T (beta = 1): no extra pass over y.
  y.addmm_(x, weight.t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, bool compute_dx) {
  constexpr const char* op = "fastpeft::lora_linear_backward";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_linear_weight(op, weight, "weight", x);
  check_size(op, weight, "weight", 1, x.size(1), "in_features of x");
  const int64_t N = weight.size(0);
  lora_branch::check_branch(op, x, lora_A, lora_B, N, "weight");
  lora_branch::check_grads(op, grad_y, x, xa, lora_A, N, "weight");
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);

  auto [dx, dA, dB] = lora_branch::backward(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p,
                                            seed_v, compute_dx);
  if (compute_dx) dx.addmm_(grad_y, weight);  // beta = 1 onto the LoRA term
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear", &forward);
  m.impl("lora_linear_backward", &backward);
}

}  // namespace fastpeft::cpu::lora_linear
