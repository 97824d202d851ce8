// `import fastpeft._C` loads this shared library; the CPU kernels (csrc/cpu/*.cpp)
// register themselves with the dispatcher through static TORCH_LIBRARY_IMPL initialisers.
// The Python module holds two helpers for the modules' Python: weights_key and
// parameters_key.
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <cstdint>
#include <vector>

namespace {

// What a cache of values computed from tensors (MultiLoRALinear's stacked adapters)
// depends on: per tensor its data pointer, version (bumped by every in-place write but
// those through .data), dtype, device, sizes and strides. Equal words from two calls mean
// none of the tensors was written in place, moved to other memory or relaid out in
// between, provided the cache keeps the storages alive (else a new tensor may take a
// freed one's address). False for an inference tensor, which has no version counter.
bool append_words(const at::Tensor& t, std::vector<int64_t>& words) {
  if (t.is_inference()) return false;
  words.push_back(t.has_storage() ? reinterpret_cast<intptr_t>(t.const_data_ptr()) : 0);
  words.push_back(static_cast<int64_t>(t._version()));
  words.push_back(static_cast<int64_t>(t.scalar_type()));
  words.push_back(static_cast<int64_t>(t.device().type()) * 65536 + t.device().index());
  words.push_back(t.dim());
  for (const int64_t s : t.sizes()) words.push_back(s);
  for (const int64_t s : t.strides()) words.push_back(s);
  return true;
}

PyObject* as_bytes(const std::vector<int64_t>& words) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

// weights_key(tensors) -> bytes, or None when one is an inference tensor.
PyObject* weights_key(PyObject* /*self*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  THPObjectPtr seq(PySequence_Fast(tensors, "weights_key: expected a list or tuple of tensors"));
  if (!seq) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  std::vector<int64_t> words;
  words.reserve(static_cast<size_t>(n) * 9);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq.get(), i);
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "weights_key: item %zd is a %s, not a tensor", i,
                   Py_TYPE(item)->tp_name);
      return nullptr;
    }
    if (!append_words(THPVariable_Unpack(item), words)) Py_RETURN_NONE;
  }
  return as_bytes(words);
  END_HANDLE_TH_ERRORS
}

// parameters_key(modules, name) -> bytes: weights_key of module._parameters[name] for each
// module, without the list of them; None when a module has no such parameter (a
// parametrised or deleted weight) or it is an inference tensor. A serving call's lookup
// of MultiLoRALinear's stack is this one call.
PyObject* parameters_key(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* modules = nullptr;
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "Os:parameters_key", &modules, &name)) return nullptr;
  THPObjectPtr seq(
      PySequence_Fast(modules, "parameters_key: expected a list or tuple of modules"));
  if (!seq) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  std::vector<int64_t> words;
  words.reserve(static_cast<size_t>(n) * 9);
  for (Py_ssize_t i = 0; i < n; ++i) {
    THPObjectPtr params(
        PyObject_GetAttrString(PySequence_Fast_GET_ITEM(seq.get(), i), "_parameters"));
    if (!params) return nullptr;
    PyObject* t = PyDict_Check(params.get()) ? PyDict_GetItemString(params.get(), name) : nullptr;
    if (t == nullptr || !THPVariable_Check(t) || !append_words(THPVariable_Unpack(t), words))
      Py_RETURN_NONE;
  }
  return as_bytes(words);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"weights_key", weights_key, METH_O,
     "weights_key(tensors) -> bytes | None: data pointers, versions, dtypes, devices, "
     "sizes and strides of the tensors (None for an inference tensor); equal bytes mean "
     "unchanged tensors, where the caller keeps their storages alive."},
    {"parameters_key", parameters_key, METH_VARARGS,
     "parameters_key(modules, name) -> bytes | None: weights_key of each module's "
     "_parameters[name] (None where one has none)."},
    {nullptr, nullptr, 0, nullptr}};

#define FASTPEFT_STR2(x) #x
#define FASTPEFT_STR(x) FASTPEFT_STR2(x)
#define FASTPEFT_CAT2(a, b) a##b
#define FASTPEFT_CAT(a, b) FASTPEFT_CAT2(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FASTPEFT_STR(TORCH_EXTENSION_NAME), nullptr,
                          -1, methods};

}  // namespace

// named after the extension: _C when setup.py builds it, the cache's name when
// fastpeft._build compiles it on first use
PyMODINIT_FUNC FASTPEFT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&module_def);
}
