// The LoRA branch on CPU: a module shared by the two ops that differ only in their base
// layer, lora_linear (a float weight, lora_linear.cpp) and int8_lora_linear (an int8
// weight with per-row scales, int8_lora_linear.cpp). Declared here, defined in
// lora_branch.cpp, its rank-R kernels in lora_branch_kernels.h; no op is registered by it.
//
//   x (T, K)  bias b (N,)  lora_A A (R, K)  lora_B B (N, R)  scaling s
//   m = Philox keep mask of x (philox.h),  c = 1 / (1 - p),  xd = c * m ⊙ x
//
// Forward:   xa = xd @ A^T                        (T, R)
//            y  = b + s * xa @ B^T                (T, N)   the base op adds x @ W^T
// Backward, with dy = dL/dy (T, N) and dyB = dy @ B (T, R); y depends on A, B and x
// through xa = xd @ A^T and y += s * xa @ B^T, and xd = c * m ⊙ x:
//   dL/dB  = s * dy^T @ xa                        (N, R)
//   dL/dxa = s * dy @ B = s * dyB                 (T, R)
//   dL/dA  = (dL/dxa)^T @ xd = s * dyB^T @ xd     (R, K)
//   dL/dxd = dL/dxa @ A = s * dyB @ A             (T, K)
//   dL/dx  = c * m ⊙ dL/dxd                       (T, K)   the base op adds dy @ W
// Each op adds its base term onto the buffers these return (y += x @ W^T, dx += dy @ W),
// so the LoRA term costs no extra pass over y or dx; the dropout mask is regenerated in
// backward rather than stored.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastpeft::cpu::lora_branch {

// Argument checks; each message names the op and the argument.
// bias, if given: (N,), CPU, x's dtype, any stride. Returns it contiguous (a copy only
// for a strided view, e.g. a column of a matrix: N elements), or an undefined tensor.
at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N,
                        const at::Tensor& x);
// dropout_p in [0, 1); the seed (required when p > 0) as uint64, 0 when p == 0
uint64_t read_seed(const char* op, double p, const std::optional<at::Tensor>& seed);
// lora_A (R, K) and lora_B (N, R) against x (T, K), with N the base weight's out_features
// (`base` names that weight in the messages)
void check_branch(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, int64_t N, const char* base);
// the backward's grad_y (T, N) and xa (T, R)
void check_grads(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                 const at::Tensor& xa, const at::Tensor& lora_A, int64_t N, const char* base);

// Forward, on checked arguments (bias contiguous or undefined): returns (y, xa) in x's
// dtype with xa = xd @ A^T (T, R) and y = b + s * xa @ B^T (T, N) (no b without a bias).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& bias,
                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           double scaling, double dropout_p, uint64_t seed);

// Backward, on checked arguments, with dy = grad_y (T, N): returns (dx, dA, dB) in x's
// dtype with dB = s * dy^T @ xa (N, R), dA = s * dyB^T @ xd (R, K) and
// dx = c * m ⊙ (s * dyB @ A) (T, K), the LoRA term of dL/dx (an empty tensor when not
// compute_dx).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p,
    uint64_t seed, bool compute_dx);

// Row-indexed dropout, for an op that takes the rows of x in another order
// (multi_lora_linear groups them by adapter). For j < n, with t = rows[j], m[t] the keep
// mask of row t of the whole (T, K) input x (the same draw as forward / backward above,
// bit-identical on both paths) and c = 1 / (1 - p):
//   gathered[j]  = c * m[t] ⊙ x[t]                      gathered: (n, K)
//   scattered[t] = c * m[t] ⊙ dense[j]   (if dense)     dense: (n, K), scattered: (T, K)
// The matrices are x's dtype with unit column stride (any row stride: views of larger
// buffers). Single-threaded, for the caller's parallel tasks; p in (0, 1).
void dropout_rows(const at::Tensor& x, const int64_t* rows, int64_t n, double dropout_p,
                  uint64_t seed, const at::Tensor& gathered, const at::Tensor& dense = {},
                  const at::Tensor& scattered = {});

}  // namespace fastpeft::cpu::lora_branch
