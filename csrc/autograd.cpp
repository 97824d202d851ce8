// Autograd for the native fastpeft ops, in C++: fastpeft::lora_linear,
// int8_lora_linear, gated_prefix_attention and bottleneck_adapter. (The Triton variants,
// fastpeft::<op>_triton, get theirs from torch.library.register_autograd in
// fastpeft/ops/<op>.py, which states the same formulas in Python.)
//
// At decode sizes (one token per call) a kernel takes tens to hundreds of microseconds,
// and register_autograd's Python wrapper around it was a sizeable part of the call; a
// C++ autograd::Function costs a fraction of that. Each forward re-dispatches below
// autograd to the kernel and saves what the op's backward kernel takes; each backward
// calls that kernel and keeps the gradients of the inputs that need one. The backward ops
// have no autograd of their own: double backward is refused (first_order_only below).
//
// Registered at the Autograd key, so they serve any backend that has the forward and
// backward kernels. torch.compile traces through them (AOTAutograd runs the C++ node under
// its tracing modes, as it does for torchvision's C++ ops), and compiled autograd takes
// their nodes as they are.
//
// The outputs saved only for the backward (xa, the log-sum-exps, the layer-norm
// statistics) carry no gradient: the Functions return them as differentiable outputs and
// the kernels below hand them out detached, rather than marking them non-differentiable,
// which compiled autograd does not accept from a C++ node (an internal assert in
// CppNode::compiled_args). Gradients are materialised as autograd.Function's are, so a
// backward reached with no gradient for y (a custom Function downstream returned none)
// returns zeros for the inputs, as the Triton variants' Python autograd does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/checks.h"

namespace fastpeft {
namespace {

using cpu::given;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;
using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor or_undefined(const OptTensor& t) { return given(t) ? *t : at::Tensor(); }

// The autograd edges are the forward's *given* tensor arguments, in order (an absent
// optional one has none), so needs_input_grad takes an edge index, not an argument
// index. set_edges records, per tensor argument, its edge (-1: absent); needs_grad asks
// by argument.
void set_edges(AutogradContext* ctx, std::initializer_list<bool> present) {
  std::vector<int64_t> edge;
  int64_t next = 0;
  for (const bool p : present) edge.push_back(p ? next++ : -1);
  ctx->saved_data["edges"] = edge;
}

bool needs_grad(AutogradContext* ctx, size_t arg) {
  const int64_t edge = ctx->saved_data["edges"].toIntList().get(arg);
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

// The gradient for argument `arg` when it needs one, else undefined.
at::Tensor if_needed(AutogradContext* ctx, size_t arg, const at::Tensor& grad) {
  return needs_grad(ctx, arg) ? grad : at::Tensor();
}

double saved_double(AutogradContext* ctx, const char* key) {
  return ctx->saved_data[key].toDouble();
}

// The scalars both linear backwards take.
void keep_lora_scalars(AutogradContext* ctx, double scaling, double dropout_p) {
  ctx->saved_data["scaling"] = scaling;
  ctx->saved_data["dropout_p"] = dropout_p;
}

// Double backward is refused: the backward kernels have no derivative, so a backward with
// create_graph=True through these ops would give second derivatives of zero. The check
// runs when the graph would be built (grad mode on and something the gradients come from
// requiring grad); the Triton variants' register_autograd refuses later, when the second
// derivative is taken, which needs an autograd node of its own here.
template <typename Compute>
variable_list first_order_only(const char* op, const variable_list& incoming,
                                  const variable_list& saved, Compute compute) {
  if (at::GradMode::is_enabled())
    for (const auto* list : {&incoming, &saved})
      for (const auto& t : *list)
        TORCH_CHECK(!(t.defined() && t.requires_grad()), op,
                    ": double backward (a backward with create_graph=True through this op) is "
                    "not supported: its backward has no derivative");
  return compute();
}

// ---------------------------------------------------------------------------------------
// lora_linear(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (y, xa)
struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const OptTensor& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               double scaling, double dropout_p, const OptTensor& seed) {
    static const auto op =
        find_op<Tensor2(const at::Tensor&, const at::Tensor&, const OptTensor&,
                        const at::Tensor&, const at::Tensor&, double, double, const OptTensor&)>(
            "fastpeft::lora_linear");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, xa] = op.call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->save_for_backward({x, weight, lora_A, lora_B, xa, or_undefined(seed)});
    set_edges(ctx, {true, true, given(bias), true, true, given(seed)});
    keep_lora_scalars(ctx, scaling, dropout_p);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                        const OptTensor&, bool)>("fastpeft::lora_linear_backward");
    const auto saved = ctx->get_saved_variables();
    return first_order_only("fastpeft::lora_linear", grads, saved, [&] {
      variable_list out(8);
      const at::Tensor& x = saved[0];
      const at::Tensor dy = grads[0].contiguous();
      const bool need_x = needs_grad(ctx, 0);
      auto [dx, d_a, d_b] =
          op.call(dy, x, saved[1], saved[2], saved[3], saved[4], saved_double(ctx, "scaling"),
                  saved_double(ctx, "dropout_p"), optional_of(saved[5]), need_x);
      out[0] = need_x ? dx : at::Tensor();
      // A trainable base (frozen is the rule). d weight is laid out as weight is: for the
      // transposed view of an (in, out) tensor (Conv1D's weight.t()) its gradient is then a
      // contiguous (in, out) tensor, which autograd accumulates without a copy.
      if (needs_grad(ctx, 1))
        out[1] = saved[1].is_contiguous() ? dy.t().mm(x) : x.t().mm(dy).t();
      if (needs_grad(ctx, 2)) out[2] = dy.sum(0);
      out[3] = d_a;
      out[4] = d_b;
      return out;
    });
  }
};

// ---------------------------------------------------------------------------------------
// int8_lora_linear(x, qweight, weight_scale, bias?, lora_A, lora_B, scaling, dropout_p,
// seed?) -> (y, xa); the int8 weight and its scales are frozen buffers (no gradient).
struct Int8LoraLinearFunction : public torch::autograd::Function<Int8LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& qweight, const at::Tensor& weight_scale,
                               const OptTensor& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, double scaling, double dropout_p,
                               const OptTensor& seed) {
    static const auto op =
        find_op<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptTensor&, const at::Tensor&, const at::Tensor&, double, double,
                        const OptTensor&)>("fastpeft::int8_lora_linear");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, xa] =
        op.call(x, qweight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->save_for_backward(
        {x, qweight, weight_scale, lora_A, lora_B, xa, or_undefined(seed)});
    set_edges(ctx, {true, true, true, given(bias), true, true, given(seed)});
    keep_lora_scalars(ctx, scaling, dropout_p);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, double, const OptTensor&, bool)>(
            "fastpeft::int8_lora_linear_backward");
    const auto saved = ctx->get_saved_variables();
    return first_order_only("fastpeft::int8_lora_linear", grads, saved, [&] {
      variable_list out(9);
      const at::Tensor dy = grads[0].contiguous();
      const bool need_x = needs_grad(ctx, 0);
      auto [dx, d_a, d_b] = op.call(dy, saved[0], saved[1], saved[2], saved[3], saved[4],
                                    saved[5], saved_double(ctx, "scaling"),
                                    saved_double(ctx, "dropout_p"), optional_of(saved[6]), need_x);
      out[0] = need_x ? dx : at::Tensor();
      if (needs_grad(ctx, 3)) out[3] = dy.sum(0);
      out[4] = d_a;
      out[5] = d_b;
      return out;
    });
  }
};

// ---------------------------------------------------------------------------------------
// gated_prefix_attention(q, k, v, prefix_k, prefix_v, gate, key_padding_mask?, causal,
// scale, gate_tanh) -> (out, lse, prompt_lse); the backward takes the output and both
// log-sum-exps and returns (dq, dk, dv, dprefix_k, dprefix_v, dgate).
struct GatedPrefixAttentionFunction
    : public torch::autograd::Function<GatedPrefixAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& prefix_k,
                               const at::Tensor& prefix_v, const at::Tensor& gate,
                               const OptTensor& key_padding_mask, bool causal, double scale,
                               bool gate_tanh) {
    static const auto op =
        find_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptTensor&, bool, double, bool)>("fastpeft::gated_prefix_attention");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse, prompt_lse] =
        op.call(q, k, v, prefix_k, prefix_v, gate, key_padding_mask, causal, scale, gate_tanh);
    ctx->save_for_backward({q, k, v, prefix_k, prefix_v, gate, or_undefined(key_padding_mask),
                            out, lse, prompt_lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["gate_tanh"] = gate_tanh;
    set_edges(ctx, {true, true, true, true, true, true, given(key_padding_mask)});
    return {out, lse, prompt_lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor6(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const OptTensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, bool, double, bool)>(
            "fastpeft::gated_prefix_attention_backward");
    const auto s = ctx->get_saved_variables();
    return first_order_only("fastpeft::gated_prefix_attention", grads, s, [&] {
      variable_list out(10);
      auto [dq, dk, dv, dpk, dpv, dgate] =
          op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], optional_of(s[6]),
                  s[7], s[8], s[9], ctx->saved_data["causal"].toBool(),
                  saved_double(ctx, "scale"), ctx->saved_data["gate_tanh"].toBool());
      const at::Tensor all[] = {dq, dk, dv, dpk, dpv, dgate};
      for (size_t i = 0; i < 6; ++i) out[i] = if_needed(ctx, i, all[i]);
      return out;
    });
  }
};

// ---------------------------------------------------------------------------------------
// bottleneck_adapter(x, down_weight, down_bias?, up_weight, up_bias?, residual?, ln_weight?,
// ln_bias?, activation, scaling, ln_eps) -> (y, mean, rstd). The backward recomputes the
// bottleneck from x; d residual = dy needs no kernel, and with no residual (it is x) the
// kernel adds dy into dx.
struct BottleneckAdapterFunction : public torch::autograd::Function<BottleneckAdapterFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& down_weight, const OptTensor& down_bias,
                               const at::Tensor& up_weight, const OptTensor& up_bias,
                               const OptTensor& residual, const OptTensor& ln_weight,
                               const OptTensor& ln_bias, c10::string_view activation,
                               double scaling, double ln_eps) {
    static const auto op =
        find_op<Tensor3(const at::Tensor&, const at::Tensor&, const OptTensor&,
                        const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                        const OptTensor&, c10::string_view, double, double)>(
            "fastpeft::bottleneck_adapter");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd] = op.call(x, down_weight, down_bias, up_weight, up_bias, residual,
                                   ln_weight, ln_bias, activation, scaling, ln_eps);
    ctx->save_for_backward({x, down_weight, or_undefined(down_bias), up_weight,
                            or_undefined(ln_weight), or_undefined(ln_bias), mean, rstd});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["residual_is_x"] = !given(residual);
    set_edges(ctx, {true, true, given(down_bias), true, given(up_bias), given(residual),
                    given(ln_weight), given(ln_bias)});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor7(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                        const at::Tensor&, const at::Tensor&, c10::string_view, double, bool)>(
            "fastpeft::bottleneck_adapter_backward");
    const auto s = ctx->get_saved_variables();
    return first_order_only("fastpeft::bottleneck_adapter", grads, s, [&] {
      variable_list out(11);
      const at::Tensor dy = grads[0].contiguous();
      const std::string activation = ctx->saved_data["activation"].toStringRef();
      auto [dx, d_dw, d_db, d_uw, d_ub, d_lnw, d_lnb] =
          op.call(dy, s[0], s[1], optional_of(s[2]), s[3], optional_of(s[4]), optional_of(s[5]),
                  s[6], s[7], activation, saved_double(ctx, "scaling"),
                  ctx->saved_data["residual_is_x"].toBool());
      const at::Tensor all[] = {dx, d_dw, d_db, d_uw, d_ub, dy, d_lnw, d_lnb};
      for (size_t i = 0; i < 8; ++i) out[i] = if_needed(ctx, i, all[i]);
      return out;
    });
  }
};

// ---------------------------------------------------------------------------------------
// The Autograd kernels: each unpacks its Function's outputs into the schema's tuple, the
// outputs saved only for the backward detached (see the top of the file).

Tensor2 lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                             const OptTensor& bias, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scaling, double dropout_p,
                             const OptTensor& seed) {
  auto out =
      LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  return {out[0], out[1].detach()};
}

Tensor2 int8_lora_linear_autograd(const at::Tensor& x, const at::Tensor& qweight,
                                  const at::Tensor& weight_scale, const OptTensor& bias,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  double scaling, double dropout_p, const OptTensor& seed) {
  auto out = Int8LoraLinearFunction::apply(x, qweight, weight_scale, bias, lora_A, lora_B,
                                           scaling, dropout_p, seed);
  return {out[0], out[1].detach()};
}

Tensor3 gated_prefix_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& prefix_k,
                                        const at::Tensor& prefix_v, const at::Tensor& gate,
                                        const OptTensor& key_padding_mask, bool causal,
                                        double scale, bool gate_tanh) {
  auto out = GatedPrefixAttentionFunction::apply(q, k, v, prefix_k, prefix_v, gate,
                                                 key_padding_mask, causal, scale, gate_tanh);
  return {out[0], out[1].detach(), out[2].detach()};
}

Tensor3 bottleneck_adapter_autograd(const at::Tensor& x, const at::Tensor& down_weight,
                                    const OptTensor& down_bias, const at::Tensor& up_weight,
                                    const OptTensor& up_bias, const OptTensor& residual,
                                    const OptTensor& ln_weight, const OptTensor& ln_bias,
                                    c10::string_view activation, double scaling,
                                    double ln_eps) {
  auto out = BottleneckAdapterFunction::apply(x, down_weight, down_bias, up_weight, up_bias,
                                              residual, ln_weight, ln_bias, activation, scaling,
                                              ln_eps);
  return {out[0], out[1].detach(), out[2].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("int8_lora_linear", &int8_lora_linear_autograd);
  m.impl("gated_prefix_attention", &gated_prefix_attention_autograd);
  m.impl("bottleneck_adapter", &bottleneck_adapter_autograd);
}

}  // namespace fastpeft
