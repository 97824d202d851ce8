// Autograd for the two fused linear ops, in C++: fastpeft::lora_linear and
// fastpeft::int8_lora_linear (the native variants; the Triton variants get theirs from
// torch.library.register_autograd in fastpeft/ops/).
//
// These are the ops a decode step calls once per projection with a single token, where
// the kernel is a few hundred microseconds and the Python autograd wrapper of
// register_autograd was a sizeable part of the call. The formulas are those of the
// Python docs (fastpeft/ops/lora_linear.py): the forward saves x, the weights, the
// (T, r) xa and the dropout seed; the backward calls the op's backward kernel, plus
// d weight = dy^T x (a trainable float base only) and d bias = dy.sum(0).
//
// Registered at the Autograd key, so they work for any backend that has the forward and
// backward kernels, and under torch.compile (AOTAutograd traces through the C++ node as
// it does for torchvision's ops). The forward re-dispatches below autograd to the
// kernel; the backward op has no autograd of its own (no double backward, as before).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

OptTensor optional_of(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// The saved scalars and the positions among the forward's tensor inputs (the autograd
// edges: an absent bias or seed has none) that needs_input_grad is asked about.
void save_scalars(AutogradContext* ctx, double scaling, double dropout_p, int64_t bias_edge) {
  ctx->saved_data["scaling"] = scaling;
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["bias_edge"] = bias_edge;  // -1: no bias
}

bool needs_bias_grad(AutogradContext* ctx) {
  const int64_t edge = ctx->saved_data["bias_edge"].toInt();
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

// lora_linear(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (y, xa)
struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const OptTensor& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               double scaling, double dropout_p, const OptTensor& seed) {
    static const auto op = find_op<Pair(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                        const at::Tensor&, const at::Tensor&, double, double,
                                        const OptTensor&)>("fastpeft::lora_linear");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, xa] = op.call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->save_for_backward({x, weight, lora_A, lora_B, xa, seed.value_or(at::Tensor())});
    save_scalars(ctx, scaling, dropout_p, defined(bias) ? 2 : -1);
    ctx->mark_non_differentiable({xa});
    ctx->set_materialize_grads(false);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          double, double, const OptTensor&, bool)>(
        "fastpeft::lora_linear_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3];
    variable_list out(8);
    if (!grads[0].defined()) return out;  // y unused: no gradient anywhere
    const at::Tensor dy = grads[0].contiguous();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    auto [dx, d_a, d_b] = op.call(dy, x, weight, lora_A, lora_B, saved[4],
                                  ctx->saved_data["scaling"].toDouble(),
                                  ctx->saved_data["dropout_p"].toDouble(),
                                  optional_of(saved[5]), need_x);
    if (need_x) out[0] = dx;
    if (need_w) out[1] = dy.t().mm(x);  // a trainable base (the frozen base is the rule)
    if (needs_bias_grad(ctx)) out[2] = dy.sum(0);
    out[3] = d_a;
    out[4] = d_b;
    return out;
  }
};

// int8_lora_linear(x, qweight, weight_scale, bias?, lora_A, lora_B, scaling, dropout_p,
// seed?) -> (y, xa); the int8 weight and its scales are frozen buffers (no gradient).
struct Int8LoraLinearFunction : public torch::autograd::Function<Int8LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& qweight, const at::Tensor& weight_scale,
                               const OptTensor& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, double scaling, double dropout_p,
                               const OptTensor& seed) {
    static const auto op =
        find_op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                     const at::Tensor&, const at::Tensor&, double, double, const OptTensor&)>(
            "fastpeft::int8_lora_linear");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, xa] =
        op.call(x, qweight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->save_for_backward(
        {x, qweight, weight_scale, lora_A, lora_B, xa, seed.value_or(at::Tensor())});
    save_scalars(ctx, scaling, dropout_p, defined(bias) ? 3 : -1);
    ctx->mark_non_differentiable({xa});
    ctx->set_materialize_grads(false);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                       const OptTensor&, bool)>("fastpeft::int8_lora_linear_backward");
    const auto saved = ctx->get_saved_variables();
    variable_list out(9);
    if (!grads[0].defined()) return out;
    const at::Tensor dy = grads[0].contiguous();
    const bool need_x = ctx->needs_input_grad(0);
    auto [dx, d_a, d_b] = op.call(dy, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                  ctx->saved_data["scaling"].toDouble(),
                                  ctx->saved_data["dropout_p"].toDouble(),
                                  optional_of(saved[6]), need_x);
    if (need_x) out[0] = dx;
    if (needs_bias_grad(ctx)) out[3] = dy.sum(0);
    out[4] = d_a;
    out[5] = d_b;
    return out;
  }
};

Pair lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                          double dropout_p, const OptTensor& seed) {
  auto out =
      LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  return {out[0], out[1]};
}

Pair int8_lora_linear_autograd(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& weight_scale, const OptTensor& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               double scaling, double dropout_p, const OptTensor& seed) {
  auto out = Int8LoraLinearFunction::apply(x, qweight, weight_scale, bias, lora_A, lora_B,
                                           scaling, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("int8_lora_linear", &int8_lora_linear_autograd);
}

}  // namespace fastpeft
