// Argument checks shared by the CPU ops. The Python layer validates first; these are
// defence in depth for direct torch.ops calls, and each message names the op and the
// argument.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastpeft::cpu {

// An optional tensor argument that was passed (and is not an undefined tensor).
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The activation that sets the op's dtype: float32, float64, float16 or bfloat16.
inline void check_float_dtype(const char* op, const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_dtype(const char* op, const at::Tensor& x) {
  check_float_dtype(op, x, "x");
}

// 2-D, CPU, contiguous, with the dtype of `like` (x).
inline void check_matrix(const char* op, const at::Tensor& t, const char* name,
                         const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A linear layer's float weight, (N, K) = (out, in): 2-D, CPU, x's dtype, and laid out
// as either a row-major (N, K) tensor or the transposed view of a row-major (K, N) one
// (GPT-2's Conv1D stores (in, out): weight.t()). ATen's GEMMs read both in place; any
// other layout (a strided slice, an expanded tensor) is refused, and the Python wrapper
// makes such a weight contiguous before it gets here.
inline void check_linear_weight(const char* op, const at::Tensor& w, const char* name,
                                const at::Tensor& like) {
  TORCH_CHECK(w.dim() == 2, op, ": ", name, " must be 2-D, got shape ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), " (the dtype of x), got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous() || w.t().is_contiguous(), op, ": ", name,
              " must be contiguous (out, in) or the transpose of a contiguous (in, out) "
              "tensor, got shape ", w.sizes(), " with strides ", w.strides());
}

inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, " has shape ", t.sizes(),
              ", expected size ", expected, " (", what, ") in dim ", dim);
}

}  // namespace fastpeft::cpu
