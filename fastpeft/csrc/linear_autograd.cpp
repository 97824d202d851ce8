// The autograd of the LoRA linear ops (lora_linear, int8_lora_linear, nf4_lora_linear,
// multi_lora_linear), for every variant of each: the native ops (csrc/cpu/<op>.cpp) and
// the Triton ones (fastpeft::<op>_triton, fastpeft/triton/<op>.py). It is C++ for its
// per-call cost: a decode step calls these ops once per projection and token, and a Python
// autograd.Function around them cost about 10 us forward and 25 us forward+backward more.
// The bottleneck adapter has its own C++ autograd (bottleneck_autograd.cpp); the gated
// prefix attention keeps a Python one (fastpeft/ops/<op>.py); fastpeft/ops/_library.py
// declares each kind.
//
// The four ops share one convention, which is what lets one autograd serve them (the
// first call of each op checks it against the schemas):
//
//   forward  (x, weight, <frozen tensors>, bias?, lora_A, lora_B, <other args>) -> (y, xa)
//   backward (grad_y, <the forward's arguments but bias, xa after lora_B>, bool compute_dx)
//            -> (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
//
// `weight` is the float base (lora, multi) or its codes (int8, nf4: no gradient); the
// frozen tensors are the quantised base's scales (weight_scale, absmax); the other
// arguments are scalars and the per-row adapter tensors of multi_lora_linear (scaling,
// adapter_ids), none of which gets a gradient: a tensor among them that requires grad is
// refused, naming it. xa (dropout(x) @ lora_A^T, T x r) is saved for backward and handed
// out not requiring grad. A trainable float base gets the plain formulas here,
// d weight = dy^T x (laid out as weight is) and d bias = dy.sum(0): the backward kernels
// compute the frozen-base case only.
//
// Double backward: the backward ops' own (Python) autograd refuses to be differentiated,
// so a create_graph=True backward runs and the second derivative raises. Compiled
// autograd calls this node's backward as it is (an opaque C++ function). torch.func
// transforms cannot run a C++ autograd Function; the public functions run the reference
// under them (fastpeft/_backend.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace fastpeft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using torch::jit::Stack;

// One forward op and what its autograd needs to know, read off the schemas on first use.
struct LinearOp {
  const char* name;  // "fastpeft::lora_linear_triton"
  std::once_flag once;
  std::optional<c10::OperatorHandle> forward, backward;
  size_t num_args = 0, bias = 0;
  std::vector<bool> is_tensor;  // per forward argument: Tensor or Tensor?
};

// The ops that take this autograd, native and Triton variants. A name that is never
// defined (the Triton variants where Triton is not installed) costs nothing.
std::array<LinearOp, 8> linear_ops{{
    {"fastpeft::lora_linear"},
    {"fastpeft::lora_linear_triton"},
    {"fastpeft::int8_lora_linear"},
    {"fastpeft::int8_lora_linear_triton"},
    {"fastpeft::nf4_lora_linear"},
    {"fastpeft::nf4_lora_linear_triton"},
    {"fastpeft::multi_lora_linear"},
    {"fastpeft::multi_lora_linear_triton"},
}};

LinearOp& find(const std::string& name) {
  for (auto& op : linear_ops)
    if (name == op.name) return op;
  TORCH_CHECK(false, "fastpeft: ", name, " is not a LoRA linear op");
}

bool tensor_typed(const c10::Argument& arg) {
  const auto& type = arg.type();
  if (type->kind() == c10::TypeKind::TensorType) return true;
  const auto optional = type->cast<c10::OptionalType>();
  return optional && optional->getElementType()->kind() == c10::TypeKind::TensorType;
}

// Reads the op's schema and its backward's, and checks them against the convention above.
void resolve(LinearOp& op, const c10::OperatorHandle& forward) {
  std::string backward_name = op.name;
  const auto triton = backward_name.rfind("_triton");
  if (triton != std::string::npos && triton + 7 == backward_name.size())
    backward_name.insert(triton, "_backward");
  else
    backward_name += "_backward";
  const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow(backward_name.c_str(), "");
  const auto& args = forward.schema().arguments();
  const auto& bargs = backward.schema().arguments();
  op.num_args = args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    op.is_tensor.push_back(tensor_typed(args[i]));
    if (args[i].name() == "bias") op.bias = i;
  }
  // backward: grad_y, the forward's arguments but bias with xa after lora_B, compute_dx
  std::vector<std::string> expected{"grad_y"};
  for (size_t i = 0; i < args.size(); ++i) {
    if (i == op.bias) continue;
    expected.push_back(args[i].name());
    if (args[i].name() == "lora_B") expected.push_back("xa");
  }
  expected.push_back("compute_dx");
  bool ok = args.size() >= 5 && args[0].name() == "x" && op.bias >= 2 &&
            args[op.bias + 1].name() == "lora_A" && args[op.bias + 2].name() == "lora_B" &&
            forward.schema().returns().size() == 2 && bargs.size() == expected.size();
  for (size_t i = 0; ok && i < bargs.size(); ++i) ok = bargs[i].name() == expected[i];
  TORCH_CHECK(ok, op.name, " does not follow the LoRA linear ops' convention (see "
              "csrc/linear_autograd.cpp): ", forward.schema(), " / ", backward.schema());
  op.forward = forward;
  op.backward = backward;
}

std::string scalar_key(size_t i) { return "arg" + std::to_string(i); }

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  // The autograd inputs are x, weight, bias (when given), lora_A, lora_B; `call` holds all
  // the forward's arguments.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                               LinearOp* op, Stack* call) {
    // Saved: the backward's arguments (the forward's but bias, xa after lora_B).
    variable_list saved;
    saved.reserve(op->num_args);
    for (size_t i = 0; i < op->num_args; ++i) {
      if (i == op->bias) continue;
      const c10::IValue& arg = (*call)[i];
      if (op->is_tensor[i])
        saved.push_back(arg.isTensor() ? arg.toTensor() : at::Tensor());
      else
        ctx->saved_data[scalar_key(i)] = arg;
    }
    {
      at::AutoDispatchBelowADInplaceOrView below;
      op->forward->callBoxed(call);
    }
    at::Tensor y = (*call)[0].toTensor();
    // xa goes after lora_B: saved positions are the arguments' with bias taken out
    saved.insert(saved.begin() + static_cast<std::ptrdiff_t>(op->bias + 2),
                 (*call)[1].toTensor());
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["op"] = std::string(op->name);
    ctx->saved_data["bias"] = bias.has_value();
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    LinearOp& op = find(ctx->saved_data["op"].toStringRef());
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor dy = grads[0].contiguous();
    const bool need_x = ctx->needs_input_grad(0);
    Stack stack;
    stack.reserve(op.num_args + 2);
    stack.emplace_back(dy);
    size_t k = 0;
    for (size_t i = 0; i < op.num_args; ++i) {
      if (i == op.bias) continue;
      if (op.is_tensor[i]) {
        const at::Tensor& t = saved[k++];
        stack.emplace_back(t.defined() ? c10::IValue(t) : c10::IValue());
      } else {
        stack.emplace_back(ctx->saved_data[scalar_key(i)]);
      }
      if (i == op.bias + 2) stack.emplace_back(saved[k++]);  // xa, after lora_B
    }
    stack.emplace_back(need_x);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: through the backward op's autograd, whose node refuses to be
      // differentiated (a second derivative would otherwise come out as zero).
      op.backward->callBoxed(&stack);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      op.backward->callBoxed(&stack);
    }
    // One gradient per forward argument: x, weight, bias, lora_A, lora_B, op, call;
    // needs_input_grad counts the tensors given (edges): bias's is absent without one.
    variable_list out(7);
    const bool has_bias = ctx->saved_data["bias"].toBool();
    if (need_x) out[0] = stack[0].toTensor();
    if (ctx->needs_input_grad(1)) {
      // A trainable float base (frozen is the rule). d weight is laid out as weight is: for
      // the transposed view of an (in, out) tensor (Conv1D's weight.t()) its gradient is a
      // contiguous (in, out) tensor, which autograd accumulates without a copy.
      const at::Tensor& x = saved[0];
      out[1] = saved[1].is_contiguous() ? dy.t().mm(x) : x.t().mm(dy).t();
    }
    if (has_bias && ctx->needs_input_grad(2)) out[2] = dy.sum(0);
    out[3] = stack[1].toTensor();
    out[4] = stack[2].toTensor();
    return out;
  }
};

// The Autograd kernel of every op in linear_ops.
struct LinearAutograd final : public c10::OperatorKernel {
  explicit LinearAutograd(LinearOp* op) : op_(op) {}

  void operator()(const c10::OperatorHandle& handle, c10::DispatchKeySet keys, Stack* stack) {
    LinearOp& op = *op_;
    std::call_once(op.once, [&] { resolve(op, handle); });
    const auto args = torch::jit::last(*stack, op.num_args);
    bool track = false;
    if (at::GradMode::is_enabled()) {
      for (size_t i = 0; i < op.num_args; ++i) {
        if (!args[i].isTensor() || !args[i].toTensor().requires_grad()) continue;
        const bool differentiable = i <= 1 || i == op.bias || i == op.bias + 1 ||
                                    i == op.bias + 2;
        TORCH_CHECK(differentiable, op.name, ": ",
                    handle.schema().arguments()[i].name(),
                    " gets no gradient (the frozen base's data, or the per-row arguments), "
                    "but it requires grad; pass it detached");
        track = true;
      }
    }
    if (!track) {
      at::AutoDispatchBelowADInplaceOrView below;
      handle.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
      return;
    }
    const auto tensor = [&](size_t i) {
      return args[i].isTensor() ? args[i].toTensor() : at::Tensor();
    };
    Stack call(args.begin(), args.end());
    const at::Tensor x = tensor(0), weight = tensor(1), lora_A = tensor(op.bias + 1),
                     lora_B = tensor(op.bias + 2);
    std::optional<at::Tensor> bias;
    if (args[op.bias].isTensor()) bias = args[op.bias].toTensor();
    torch::jit::drop(*stack, op.num_args);
    // xa, saved for backward, is returned as the kernels gave it: it requires no grad.
    // (A CppNode cannot mark outputs non-differentiable under compiled autograd, so xa is
    // not one of the Function's outputs.)
    const variable_list y = LinearFunction::apply(x, weight, bias, lora_A, lora_B, &op, &call);
    const at::Tensor xa = call[1].toTensor();
    stack->emplace_back(y[0]);
    stack->emplace_back(xa);
  }

 private:
  LinearOp* op_;
};

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, Autograd, m) {
  for (auto& op : linear_ops) {
    const char* name = op.name + 10;  // without "fastpeft::"
    m.impl(name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<LinearAutograd>(&op)));
  }
}

}  // namespace fastpeft
