// Fused LoRA linear, CPU: the ops fastpeft::lora_linear and lora_linear_backward.
//
//   x (T, K)  weight W (N, K)  bias b (N,)  lora_A A (R, K)  lora_B B (N, R)  scaling s
//   W is row-major (N, K) or the transposed view of a row-major (K, N) tensor (GPT-2's
//   Conv1D weight.t(), PEFT's fan_in_fan_out); the ATen GEMMs read either in place. Every
//   other argument is contiguous.
//   m = keep mask of x (Philox, philox.h),  c = 1 / (1 - p),  xd = c * m ⊙ x
//
// Forward:   xa = xd @ A^T                       (T, R)  lora_fwd_kernel
//            y  = b + s * xa @ B^T               (T, N)  lora_fwd_kernel, same pass
//            y += x @ W^T                                ATen GEMM, beta = 1
//
// Backward, with dy = dL/dy (T, N) and dyB = dy @ B (T, R); y depends on A, B and x
// through xa = xd @ A^T and y += s * xa @ B^T, and xd = c * m ⊙ x:
//   dL/dB  = s * dy^T @ xa                        (N, R)   lora_dy_kernel, with dyB
//   dL/dxa = s * dy @ B = s * dyB                 (T, R)
//   dL/dA  = (dL/dxa)^T @ xd = s * dyB^T @ xd     (R, K)   lora_bwd_kernel
//   dL/dxd = dL/dxa @ A = s * dyB @ A             (T, K)   lora_bwd_kernel
//   dL/dx  = dy @ W + c * m ⊙ dL/dxd              (T, K)   + ATen GEMM onto it
// The heavy GEMMs (x @ W^T, dy @ W) stay in ATen (MKL / oneDNN); the kernels do the
// rank-R parts, regenerate the dropout mask instead of storing it, and write the LoRA
// terms into the output buffers that the big GEMMs then accumulate onto (beta = 1).
// The LoRA parts live in lora_parts.cpp (lora_linear.h), shared with int8_lora_linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/lora_linear.h"

namespace fastpeft::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fastpeft::lora_linear";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_linear_weight(op, weight, "weight", x);
  check_size(op, weight, "weight", 1, x.size(1), "in_features of x");
  const int64_t N = weight.size(0);
  check_lora_branch(op, x, lora_A, lora_B, N, "weight");
  check_bias(op, bias, N, x);
  const uint64_t seed_v = read_seed(op, dropout_p, seed);

  auto [y, xa] = lora_forward_part(x, bias, lora_A, lora_B, scaling, dropout_p, seed_v);
  // The base GEMM accumulates onto y = b + s * xa @ B^T (beta = 1): no extra pass over y.
  y.addmm_(x, weight.t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, bool compute_dx) {
  constexpr const char* op = "fastpeft::lora_linear_backward";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  check_linear_weight(op, weight, "weight", x);
  check_size(op, weight, "weight", 1, x.size(1), "in_features of x");
  const int64_t N = weight.size(0);
  check_lora_branch(op, x, lora_A, lora_B, N, "weight");
  check_lora_grads(op, grad_y, x, xa, lora_A, N, "weight");
  const uint64_t seed_v = read_seed(op, dropout_p, seed);

  auto [dx, dA, dB] = lora_backward_part(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p,
                                         seed_v, compute_dx);
  if (compute_dx) dx.addmm_(grad_y, weight);  // beta = 1 onto the LoRA term
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace fastpeft::cpu
