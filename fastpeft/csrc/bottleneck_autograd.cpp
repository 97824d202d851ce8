// The autograd of fastpeft::bottleneck_adapter, for its native op (csrc/cpu/
// bottleneck_adapter.cpp) and its Triton one (fastpeft::bottleneck_adapter_triton,
// fastpeft/triton/bottleneck_adapter.py). It is C++ for its per-call cost, as the LoRA
// linear ops' is (linear_autograd.cpp): a Houlsby model calls the adapter twice per block
// and token, and around a few-row call the Python autograd.Function cost more than the
// op's own kernels (benchmarks/call_overhead.py times the layer).
// fastpeft/ops/bottleneck_adapter.py states the same formulas in Python (its setup_context
// and backward), which serve where this library is not built (the Triton variant on a
// machine that could not compile it).
//
//   forward  (x, down_weight, down_bias?, up_weight, up_bias?, residual?, ln_weight?,
//             ln_bias?, activation, scaling, ln_eps) -> (y, mean, rstd)
//   backward (grad_y, x, down_weight, down_bias?, up_weight, ln_weight?, ln_bias?, mean,
//             rstd, activation, scaling, residual_is_x)
//            -> (dx, d down_weight, d down_bias, d up_weight, d up_bias, d ln_weight,
//                d ln_bias)
//
// Saved: x, the weights (not up_bias) and the layer-norm statistics mean and rstd, which
// the call returns not requiring grad (as linear_autograd.cpp returns xa: a CppNode cannot
// mark outputs non-differentiable under compiled autograd). The residual's gradient is
// grad_y itself. A create_graph=True backward runs the backward op through its own
// (Python) autograd, which refuses to be differentiated.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ForwardSig = Outputs(const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, c10::string_view, double, double);
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;
using BackwardSig = Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                          const at::Tensor&, const at::Tensor&, c10::string_view, double, bool);

// The native and the Triton variant, looked up on first use: Python defines the schemas
// after this library registers its kernels (a variant never defined, Triton's without
// Triton, is never called).
enum Variant : size_t { kNative = 0, kTriton = 1 };

struct Ops {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
};

const Ops& ops(Variant variant) {
  static std::array<std::optional<Ops>, 2> found;
  static std::array<std::once_flag, 2> once;
  std::call_once(once[variant], [variant] {
    auto& dispatcher = c10::Dispatcher::singleton();
    const std::string suffix = variant == kTriton ? "_triton" : "";
    found[variant] = Ops{
        dispatcher.findSchemaOrThrow(("fastpeft::bottleneck_adapter" + suffix).c_str(), "")
            .typed<ForwardSig>(),
        dispatcher
            .findSchemaOrThrow(("fastpeft::bottleneck_adapter_backward" + suffix).c_str(), "")
            .typed<BackwardSig>()};
  });
  return *found[variant];
}

// The forward's scalar arguments, and where it leaves mean and rstd.
struct Call {
  Variant variant;
  c10::string_view activation;
  double scaling, ln_eps;
  at::Tensor mean, rstd;
};

OptTensor given(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The differentiable arguments, in the forward's order (the slots of `present` below).
enum Slot { kX, kDownW, kDownB, kUpW, kUpB, kResidual, kLnW, kLnB, kSlots };

struct BottleneckFunction : public torch::autograd::Function<BottleneckFunction> {
  // An optional argument that is absent is no autograd input: needs_input_grad counts the
  // tensors given, so each slot's edge is the number of tensors given before it.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& down_weight, const OptTensor& down_bias,
                               const at::Tensor& up_weight, const OptTensor& up_bias,
                               const OptTensor& residual, const OptTensor& ln_weight,
                               const OptTensor& ln_bias, Call* call) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, call->mean, call->rstd) = ops(call->variant).forward.call(
          x, down_weight, down_bias, up_weight, up_bias, residual, ln_weight, ln_bias,
          call->activation, call->scaling, call->ln_eps);
    }
    ctx->save_for_backward({x, down_weight, down_bias.value_or(at::Tensor()), up_weight,
                            ln_weight.value_or(at::Tensor()), ln_bias.value_or(at::Tensor()),
                            call->mean, call->rstd});
    int64_t present = 0;
    const std::array<bool, kSlots> is_given{true, true, down_bias.has_value(), true,
                                            up_bias.has_value(), residual.has_value(),
                                            ln_weight.has_value(), ln_bias.has_value()};
    for (size_t i = 0; i < kSlots; ++i) present |= int64_t{is_given[i]} << i;
    ctx->saved_data["present"] = present;
    ctx->saved_data["variant"] = static_cast<int64_t>(call->variant);
    ctx->saved_data["activation"] = std::string(call->activation);
    ctx->saved_data["scaling"] = call->scaling;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t present = ctx->saved_data["present"].toInt();
    const auto variant = static_cast<Variant>(ctx->saved_data["variant"].toInt());
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const at::Tensor dy = grads[0].contiguous();
    const bool residual_is_x = !(present >> kResidual & 1);
    const auto run = [&] {
      return ops(variant).backward.call(dy, saved[0], saved[1], given(saved[2]), saved[3],
                                        given(saved[4]), given(saved[5]), saved[6], saved[7],
                                        activation, scaling, residual_is_x);
    };
    Grads g;
    if (at::GradMode::is_enabled()) {
      g = run();  // create_graph=True: through the backward op's autograd, which refuses
    } else {      // to be differentiated (a second derivative would come out as zero)
      at::AutoDispatchBelowADInplaceOrView below;
      g = run();
    }
    const std::array<at::Tensor, kSlots> by_slot{std::get<0>(g), std::get<1>(g), std::get<2>(g),
                                                 std::get<3>(g), std::get<4>(g), dy,
                                                 std::get<5>(g), std::get<6>(g)};
    // One gradient per forward argument (the slots, then call); none where absent.
    variable_list out(kSlots + 1);
    size_t edge = 0;
    for (size_t i = 0; i < kSlots; ++i) {
      if (!(present >> i & 1)) continue;
      if (ctx->needs_input_grad(edge++)) out[i] = by_slot[i];
    }
    return out;
  }
};

// The Autograd kernel of both variants: the kernels alone when nothing requires grad.
template <Variant variant>
Outputs bottleneck_autograd(c10::DispatchKeySet keys, const at::Tensor& x,
                            const at::Tensor& down_weight, const OptTensor& down_bias,
                            const at::Tensor& up_weight, const OptTensor& up_bias,
                            const OptTensor& residual, const OptTensor& ln_weight,
                            const OptTensor& ln_bias, c10::string_view activation,
                            double scaling, double ln_eps) {
  const auto tracked = [](const OptTensor& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  const bool track =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || down_weight.requires_grad() || up_weight.requires_grad() ||
       tracked(down_bias) || tracked(up_bias) || tracked(residual) || tracked(ln_weight) ||
       tracked(ln_bias));
  if (!track) {
    at::AutoDispatchBelowADInplaceOrView below;
    return ops(variant).forward.redispatch(keys & c10::after_autograd_keyset, x, down_weight,
                                           down_bias, up_weight, up_bias, residual, ln_weight,
                                           ln_bias, activation, scaling, ln_eps);
  }
  // (an optional given as an undefined tensor counts as absent)
  const auto opt = [](const OptTensor& t) {
    return t.has_value() && t->defined() ? t : std::nullopt;
  };
  Call call{variant, activation, scaling, ln_eps, {}, {}};
  const variable_list y =
      BottleneckFunction::apply(x, down_weight, opt(down_bias), up_weight, opt(up_bias),
                                opt(residual), opt(ln_weight), opt(ln_bias), &call);
  return {y[0], call.mean, call.rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  m.impl("bottleneck_adapter", TORCH_FN(bottleneck_autograd<kNative>));
  m.impl("bottleneck_adapter_triton", TORCH_FN(bottleneck_autograd<kTriton>));
}

}  // namespace fastpeft
