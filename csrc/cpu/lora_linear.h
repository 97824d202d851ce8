// The LoRA branch of the fused LoRA linear ops on CPU, shared by the ops that differ only
// in their base layer: lora_linear (a float weight, lora_linear.cpp) and int8_lora_linear
// (an int8 weight with per-row scales, int8_lora_linear.cpp). Defined in lora_parts.cpp;
// the math is in the header comment of lora_linear.cpp.
//
//   x (T, K)  bias b (N,)  lora_A A (R, K)  lora_B B (N, R)  scaling s
//   m = Philox keep mask of x (philox.h),  c = 1 / (1 - p),  xd = c * m ⊙ x
//
// Each op adds its base term onto the buffers these return (y += x @ W^T, dx += dy @ W),
// so the LoRA term costs no extra pass over y or dx.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/checks.h"

namespace fastpeft::cpu {

// Tasks per at::parallel_for chunk so that a chunk is worth ~64K multiply-adds.
inline int64_t work_grain(int64_t macs_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_task));
}

// Argument checks beyond checks.h; each names the op and the argument.
// bias, if given: (N,), CPU, contiguous, x's dtype; returns whether it is given
bool check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N,
                const at::Tensor& x);
// dropout_p in [0, 1); the seed (required when p > 0) as uint64, 0 when p == 0
uint64_t read_seed(const char* op, double p, const std::optional<at::Tensor>& seed);
// lora_A (R, K) and lora_B (N, R) against x (T, K), with N the base weight's out_features
// (`base` names that weight in the messages)
void check_lora_branch(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, int64_t N, const char* base);
// the backward's grad_y (T, N) and xa (T, R)
void check_lora_grads(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                      const at::Tensor& xa, const at::Tensor& lora_A, int64_t N,
                      const char* base);

// Forward LoRA part, on checked arguments: returns (y, xa) in x's dtype with
//   xa = xd @ A^T (T, R)   and   y = b + s * xa @ B^T (T, N)   (y = s * xa @ B^T without b).
std::tuple<at::Tensor, at::Tensor> lora_forward_part(
    const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, uint64_t seed);

// Backward LoRA part, on checked arguments, with dy = grad_y (T, N) and dyB = dy @ B:
// returns (dx, dA, dB) in x's dtype with
//   dB = s * dy^T @ xa (N, R)   dA = s * dyB^T @ xd (R, K)
//   dx = c * m ⊙ (s * dyB @ A) (T, K), the LoRA term of dL/dx (an empty tensor when not
//   compute_dx).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_part(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    uint64_t seed, bool compute_dx);

}  // namespace fastpeft::cpu
