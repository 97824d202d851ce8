// The usual eager CPU call of the LoRA linear ops and the bottleneck adapter, in one step
// of C++:
//
//   fastpeft._C.<op>_call(<the public function's arguments>) -> y, or None
//
// for lora_linear, int8_lora_linear, nf4_lora_linear, multi_lora_linear and
// bottleneck_adapter. None means "not the usual call": the public function
// (fastpeft/ops/<op>.py) then runs its Python path, which checks every argument and names
// a bad one, and takes every case this leaves out. It asks here only when it is not being
// compiled and the backend in force runs CPU tensors on the native ops
// (fastpeft._backend.eager_native).
//
// The usual call: every tensor exactly a torch.Tensor or nn.Parameter (a subclass may
// override torch functions) and on the CPU, with the dtypes, shapes and devices the Python
// checks accept and no empty one; scaling a finite Python float (a float32 tensor of one
// per adapter for multi_lora_linear), dropout_p a float in [0, 1), training a bool; no
// torch.func transform and no torch function mode in force (for the bottleneck adapter: an
// activation it knows, ln_eps a positive finite float, ln_bias only with ln_weight). For
// it this does what the Python path does: it draws the dropout seed as draw_seed does (the
// same torch.randint on the same generator, so torch.manual_seed gives the same masks on
// both paths), flattens x to (rows, in), calls the registered op through the dispatcher
// (its C++ autograd, dispatch modes and the profiler as for a call from Python) and gives
// y x's leading dimensions back.
//
// Why: a decode step calls these ops once per projection and token, and a layer inside a
// model finds its caches cold. There the Python around the op (the checks, torch.randint
// for the seed, the backend lookup, the op call's argument parsing) took 110-130 us, more
// than the op's own 75-90 us as called from Python, and this call takes 60-70 us in all
// (a 64 -> 64 NF4 call at T = 1 with dropout, caches flushed before each, in an ad hoc
// script on a 2-core Zen 4 VM; benchmarks/call_overhead.py --cold times whole layers).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "calls.h"

namespace fastpeft {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor>;

// obj as a tensor where it is exactly a torch.Tensor or an nn.Parameter, dense (not
// nested) and on the CPU, else nullptr. The pointer borrows the argument's tensor: the
// calls copy the tensors (owned references) before they let the GIL go.
const at::Tensor* cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.defined() && t.is_cpu() && t.layout() == at::kStrided && !t.is_nested() ? &t
                                                                                  : nullptr;
}

// bias: None (-> *out empty), or a tensor of shape (n,) in dtype.
bool read_bias(PyObject* obj, int64_t n, at::ScalarType dtype, OptTensor& out) {
  if (obj == Py_None) return true;
  const at::Tensor* b = cpu_tensor(obj);
  if (b == nullptr || b->dim() != 1 || b->size(0) != n || b->scalar_type() != dtype)
    return false;
  out = *b;
  return true;
}

bool read_float(PyObject* obj, double& out) {
  if (!PyFloat_CheckExact(obj)) return false;
  out = PyFloat_AS_DOUBLE(obj);
  return true;
}

// dropout_p (a float in [0, 1)) and training (a bool) -> the p that applies.
bool read_dropout(PyObject* p_obj, PyObject* training, double& p) {
  if (!read_float(p_obj, p) || !(p >= 0.0 && p < 1.0) || !PyBool_Check(training)) return false;
  if (training == Py_False) p = 0.0;
  return true;
}

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// x a float tensor of at least one dimension and some elements, its last one `in`.
bool read_x(PyObject* obj, int64_t in, const at::Tensor*& x) {
  x = cpu_tensor(obj);
  return x != nullptr && x->dim() >= 1 && float_dtype(x->scalar_type()) && x->size(-1) == in &&
         x->numel() > 0;
}

// lora_A (r, in) and lora_B (out, r) with r >= 1 in dtype.
bool read_lora(PyObject* a_obj, PyObject* b_obj, int64_t in, int64_t out, at::ScalarType dtype,
               const at::Tensor*& a, const at::Tensor*& b) {
  a = cpu_tensor(a_obj);
  b = cpu_tensor(b_obj);
  return a != nullptr && b != nullptr && a->dim() == 2 && a->size(0) >= 1 &&
         a->size(1) == in && b->dim() == 2 && b->size(0) == out && b->size(1) == a->size(0) &&
         a->scalar_type() == dtype && b->scalar_type() == dtype;
}

// A float base weight (2-D) in x's dtype, with some elements.
bool float_weight(const at::Tensor& w, at::ScalarType dtype) {
  return w.scalar_type() == dtype && w.numel() > 0;
}

// The weight as the kernels read it (base_weight in fastpeft/ops/_linear.py): itself when
// row-major or the transposed view of a row-major tensor, else a row-major copy.
at::Tensor base_weight(const at::Tensor& w) {
  return w.is_contiguous() || w.t().is_contiguous() ? w : w.contiguous();
}

// No torch.func transform (its wrappers cannot run the ops' C++ autograd: the Python path
// warns and runs the reference) and no torch function mode (the Python path's torch calls
// go through it).
bool plain_context() {
  return !c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !at::impl::torch_function_mode_enabled();
}

// draw_seed(x.device) for a CPU x.
OptTensor draw_seed(double p) {
  if (p == 0.0) return std::nullopt;
  return at::randint(-(int64_t{1} << 62), int64_t{1} << 62, {1},
                     at::TensorOptions().dtype(at::kLong).device(at::kCPU).pinned_memory(false));
}

// x as (rows, in), contiguous.
at::Tensor rows_of(const at::Tensor& x) {
  return x.dim() == 2 ? x.contiguous() : x.reshape({-1, x.size(-1)}).contiguous();
}

// y (rows, out) with x's leading dimensions.
at::Tensor with_leading(at::Tensor y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  auto sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.reshape(sizes);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Runs f (the op's call, returning y, holding its own references to the tensors) without
// the GIL, as torch's own bindings do, and wraps y.
template <typename F>
PyObject* run(F&& f) {
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = f();
  }
  return THPVariable_Wrap(std::move(y));
}

}  // namespace

// lora_linear_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
PyObject* lora_linear_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !plain_context()) Py_RETURN_NONE;
  const at::Tensor* w = cpu_tensor(args[1]);
  const at::Tensor *x, *a, *b;
  OptTensor bias;
  double scaling, p;
  if (w == nullptr || w->dim() != 2 || !read_x(args[0], w->size(1), x) ||
      !float_weight(*w, x->scalar_type()) ||
      !read_bias(args[2], w->size(0), x->scalar_type(), bias) ||
      !read_lora(args[3], args[4], w->size(1), w->size(0), x->scalar_type(), a, b) ||
      !read_float(args[5], scaling) || !std::isfinite(scaling) ||
      !read_dropout(args[6], args[7], p))
    Py_RETURN_NONE;
  using Sig = Outputs(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                      const at::Tensor&, double, double, const OptTensor&);
  static const auto op = find_op<Sig>("fastpeft::lora_linear");
  return run([&, x = *x, w = *w, a = *a, b = *b] {
    const OptTensor seed = draw_seed(p);
    return with_leading(std::get<0>(op.call(rows_of(x), base_weight(w), bias, a.contiguous(),
                                            b.contiguous(), scaling, p, seed)),
                        x);
  });
  END_HANDLE_TH_ERRORS
}

// int8_lora_linear_call(x, qweight, weight_scale, bias, lora_A, lora_B, scaling, dropout_p,
// training)
PyObject* int8_lora_linear_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !plain_context()) Py_RETURN_NONE;
  const at::Tensor* q = cpu_tensor(args[1]);
  const at::Tensor* s = cpu_tensor(args[2]);
  if (q == nullptr || s == nullptr || q->dim() != 2 || q->scalar_type() != at::kChar ||
      q->numel() == 0 || s->dim() != 1 || s->size(0) != q->size(0) ||
      s->scalar_type() != at::kFloat || s->requires_grad())
    Py_RETURN_NONE;
  const at::Tensor *x, *a, *b;
  OptTensor bias;
  double scaling, p;
  if (!read_x(args[0], q->size(1), x) ||
      !read_bias(args[3], q->size(0), x->scalar_type(), bias) ||
      !read_lora(args[4], args[5], q->size(1), q->size(0), x->scalar_type(), a, b) ||
      !read_float(args[6], scaling) || !std::isfinite(scaling) ||
      !read_dropout(args[7], args[8], p))
    Py_RETURN_NONE;
  using Sig = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                      const at::Tensor&, const at::Tensor&, double, double, const OptTensor&);
  static const auto op = find_op<Sig>("fastpeft::int8_lora_linear");
  return run([&, x = *x, q = *q, s = *s, a = *a, b = *b] {
    const OptTensor seed = draw_seed(p);
    return with_leading(std::get<0>(op.call(rows_of(x), q.contiguous(), s.contiguous(), bias,
                                            a.contiguous(), b.contiguous(), scaling, p, seed)),
                        x);
  });
  END_HANDLE_TH_ERRORS
}

// nf4_lora_linear_call(x, qweight, absmax, bias, lora_A, lora_B, scaling, dropout_p,
// training, blocksize)
PyObject* nf4_lora_linear_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10 || !plain_context() || !PyLong_CheckExact(args[9])) Py_RETURN_NONE;
  const long blocksize = PyLong_AsLong(args[9]);
  if (blocksize == -1 && PyErr_Occurred()) {
    PyErr_Clear();  // out of a long's range: not a block size the Python path takes either
    Py_RETURN_NONE;
  }
  // BLOCKSIZES in fastpeft/ops/nf4_lora_linear.py: the powers of two 16 .. 4096
  if (blocksize < 16 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    Py_RETURN_NONE;
  const at::Tensor* q = cpu_tensor(args[1]);
  const at::Tensor* am = cpu_tensor(args[2]);
  if (q == nullptr || am == nullptr || q->dim() != 2 || q->scalar_type() != at::kByte ||
      q->numel() == 0 || am->dim() != 1 || am->scalar_type() != at::kFloat ||
      am->requires_grad())
    Py_RETURN_NONE;
  const int64_t N = q->size(0), K = 2 * q->size(1);
  if (am->size(0) != (N * K + blocksize - 1) / blocksize) Py_RETURN_NONE;  // absmax_length
  const at::Tensor *x, *a, *b;
  OptTensor bias;
  double scaling, p;
  if (!read_x(args[0], K, x) || !read_bias(args[3], N, x->scalar_type(), bias) ||
      !read_lora(args[4], args[5], K, N, x->scalar_type(), a, b) ||
      !read_float(args[6], scaling) || !std::isfinite(scaling) ||
      !read_dropout(args[7], args[8], p))
    Py_RETURN_NONE;
  using Sig = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                      const at::Tensor&, const at::Tensor&, double, double, const OptTensor&,
                      int64_t);
  static const auto op = find_op<Sig>("fastpeft::nf4_lora_linear");
  return run([&, x = *x, q = *q, am = *am, a = *a, b = *b] {
    const OptTensor seed = draw_seed(p);
    return with_leading(std::get<0>(op.call(rows_of(x), q.contiguous(), am.contiguous(), bias,
                                            a.contiguous(), b.contiguous(), scaling, p, seed,
                                            blocksize)),
                        x);
  });
  END_HANDLE_TH_ERRORS
}

// multi_lora_linear_call(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p,
// training). The ids' values are the op's to check (it refuses one out of range).
PyObject* multi_lora_linear_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !plain_context()) Py_RETURN_NONE;
  const at::Tensor* w = cpu_tensor(args[1]);
  const at::Tensor *x, *a, *b;
  if (w == nullptr || w->dim() != 2 || !read_x(args[0], w->size(1), x) ||
      !float_weight(*w, x->scalar_type()))
    Py_RETURN_NONE;
  const int64_t N = w->size(0), K = w->size(1);
  a = cpu_tensor(args[3]);
  b = cpu_tensor(args[4]);
  const at::Tensor* s = cpu_tensor(args[5]);
  const at::Tensor* ids = cpu_tensor(args[6]);
  if (a == nullptr || b == nullptr || s == nullptr || ids == nullptr || a->dim() != 3)
    Py_RETURN_NONE;
  const int64_t n = a->size(0), r = a->size(1);
  const at::ScalarType dtype = x->scalar_type();
  OptTensor bias;
  double p;
  if (n < 1 || r < 1 || a->size(2) != K || a->scalar_type() != dtype ||
      b->sizes() != at::IntArrayRef{n, N, r} || b->scalar_type() != dtype ||
      s->dim() != 1 || s->size(0) != n || s->scalar_type() != at::kFloat ||
      s->requires_grad() || ids->scalar_type() != at::kLong ||
      ids->sizes() != x->sizes().slice(0, x->dim() - 1) ||
      !read_bias(args[2], N, dtype, bias) || !read_dropout(args[7], args[8], p))
    Py_RETURN_NONE;
  using Sig = Outputs(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                      const OptTensor&);
  static const auto op = find_op<Sig>("fastpeft::multi_lora_linear");
  return run([&, x = *x, w = *w, a = *a, b = *b, s = *s, ids = *ids] {
    const OptTensor seed = draw_seed(p);
    const at::Tensor flat_ids = x.dim() == 2 ? ids.contiguous() : ids.reshape(-1).contiguous();
    return with_leading(std::get<0>(op.call(rows_of(x), base_weight(w), bias, a.contiguous(),
                                            b.contiguous(), s.contiguous(), flat_ids, p, seed)),
                        x);
  });
  END_HANDLE_TH_ERRORS
}

// bottleneck_adapter_call(x, down_weight, down_bias, up_weight, up_bias, activation,
// residual, scaling, ln_weight, ln_bias, ln_eps): the public function's arguments in its
// order, its keywords given positionally.
PyObject* bottleneck_adapter_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 11 || !plain_context()) Py_RETURN_NONE;
  const at::Tensor* wd = cpu_tensor(args[1]);
  const at::Tensor* wu = cpu_tensor(args[3]);
  const at::Tensor* x;
  if (wd == nullptr || wu == nullptr || wd->dim() != 2 || wd->size(0) < 1 ||
      !read_x(args[0], wd->size(1), x))
    Py_RETURN_NONE;
  const int64_t m = wd->size(0), d = wd->size(1);
  const at::ScalarType dtype = x->scalar_type();
  OptTensor down_bias, up_bias, ln_weight, ln_bias, residual;
  double scaling, ln_eps;
  if (wd->scalar_type() != dtype || wu->sizes() != at::IntArrayRef{d, m} ||
      wu->scalar_type() != dtype || !read_bias(args[2], m, dtype, down_bias) ||
      !read_bias(args[4], d, dtype, up_bias) || !read_float(args[7], scaling) ||
      !std::isfinite(scaling) || !read_bias(args[8], d, dtype, ln_weight) ||
      !read_bias(args[9], d, dtype, ln_bias) || (ln_bias && !ln_weight) ||
      !read_float(args[10], ln_eps) || !(ln_eps > 0.0) || !std::isfinite(ln_eps))
    Py_RETURN_NONE;
  if (args[6] != Py_None) {
    const at::Tensor* r = cpu_tensor(args[6]);
    if (r == nullptr || r->sizes() != x->sizes() || r->scalar_type() != dtype) Py_RETURN_NONE;
    residual = *r;
  }
  // ACTIVATIONS in fastpeft/reference.py
  if (!PyUnicode_CheckExact(args[5])) Py_RETURN_NONE;
  Py_ssize_t size = 0;
  const char* chars = PyUnicode_AsUTF8AndSize(args[5], &size);
  if (chars == nullptr) {
    PyErr_Clear();  // not UTF-8 encodable: no activation's name
    Py_RETURN_NONE;
  }
  const std::string activation(chars, static_cast<size_t>(size));
  if (activation != "relu" && activation != "gelu" && activation != "gelu_tanh" &&
      activation != "silu")
    Py_RETURN_NONE;
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
      double, double);
  static const auto op = find_op<Sig>("fastpeft::bottleneck_adapter");
  return run([&, x = *x, wd = *wd, wu = *wu] {
    const OptTensor res = residual ? OptTensor(rows_of(*residual)) : std::nullopt;
    return with_leading(std::get<0>(op.call(rows_of(x), wd.contiguous(), down_bias,
                                            wu.contiguous(), up_bias, res, ln_weight, ln_bias,
                                            activation, scaling, ln_eps)),
                        x);
  });
  END_HANDLE_TH_ERRORS
}

}  // namespace fastpeft
