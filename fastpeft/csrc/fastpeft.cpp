// `import fastpeft._C` loads this shared library; the CPU kernels (csrc/cpu/*.cpp)
// register themselves with the dispatcher through static TORCH_LIBRARY_IMPL initialisers.
// The Python module holds two helpers for the modules' Python (weights_key and
// adapters_key), the LoRA linear ops' usual eager CPU calls (<op>_call, calls.cpp), and
// memory in huge pages for the quantised weights (huge_pages.cpp).
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "calls.h"
#include "huge_pages.h"

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

// module.__dict__["_parameters"][name], borrowed (the module holds it), or nullptr where
// there is none (a parametrised or deleted weight). Read off the instance dict: the
// attribute lookup through the module's type (and a name string made per call) cost a
// cold serving call about 2 us per module.
PyObject* parameter_of(PyObject* module, PyObject* parameters, PyObject* name) {
  THPObjectPtr dict(PyObject_GenericGetDict(module, nullptr));
  if (!dict) {
    PyErr_Clear();
    return nullptr;
  }
  PyObject* params = PyDict_GetItemWithError(dict.get(), parameters);
  if (params == nullptr || !PyDict_Check(params)) return nullptr;
  return PyDict_GetItemWithError(params, name);
}

// adapters_key(lora_A, lora_B, scaling, name) -> bytes | None: for each adapter of the dict
// lora_A (name -> module), in its order, the bits of float(scaling[adapter]) and the words
// of lora_A[adapter]._parameters[name] and lora_B[adapter]._parameters[name]; None where a
// module or parameter is missing or a weight is an inference tensor. A serving call's
// check that MultiLoRALinear's stack is current is this one call.
PyObject* adapters_key(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *a_modules = nullptr, *b_modules = nullptr, *scalings = nullptr, *name = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O!U:adapters_key", &PyDict_Type, &a_modules, &PyDict_Type,
                        &b_modules, &PyDict_Type, &scalings, &name))
    return nullptr;
  static PyObject* const parameters = PyUnicode_InternFromString("_parameters");
  if (parameters == nullptr) return nullptr;
  std::vector<int64_t> words;
  words.reserve(static_cast<size_t>(PyDict_Size(a_modules)) * 15);
  Py_ssize_t pos = 0;
  PyObject *adapter_ref = nullptr, *a_module_ref = nullptr;
  while (PyDict_Next(a_modules, &pos, &adapter_ref, &a_module_ref)) {
    // owned: a scaling's __float__ may run Python code that changes the dicts
    THPObjectPtr adapter(Py_NewRef(adapter_ref)), a_module(Py_NewRef(a_module_ref));
    PyObject* b_ref = PyDict_GetItemWithError(b_modules, adapter.get());
    PyObject* scaling = b_ref ? PyDict_GetItemWithError(scalings, adapter.get()) : nullptr;
    if (scaling == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    THPObjectPtr b_module(Py_NewRef(b_ref)), scaling_ref(Py_NewRef(scaling));
    const double value = PyFloat_AsDouble(scaling_ref.get());
    if (value == -1.0 && PyErr_Occurred()) return nullptr;
    int64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    words.push_back(bits);
    for (PyObject* module : {a_module.get(), b_module.get()}) {
      PyObject* t = parameter_of(module, parameters, name);
      if (t == nullptr && PyErr_Occurred()) return nullptr;
      if (t == nullptr || !THPVariable_Check(t) || !append_words(THPVariable_Unpack(t), words))
        Py_RETURN_NONE;
    }
  }
  return as_bytes(words);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"weights_key", weights_key, METH_O,
     "weights_key(tensors) -> bytes | None: data pointers, versions, dtypes, devices, "
     "sizes and strides of the tensors (None for an inference tensor); equal bytes mean "
     "unchanged tensors, where the caller keeps their storages alive."},
    {"adapters_key", adapters_key, METH_VARARGS,
     "adapters_key(lora_A, lora_B, scaling, name) -> bytes | None: per adapter of the dict "
     "lora_A, in order, its float scaling and the weights_key words of lora_A[a] and "
     "lora_B[a]'s _parameters[name] (None where one is missing)."},
#define FASTPEFT_CALL(op)                                                                  \
  {#op "_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fastpeft::op##_call)), \
   METH_FASTCALL,                                                                         \
   #op "_call(<fastpeft." #op "'s arguments>) -> Tensor | None: the usual eager CPU call "  \
   "in C++, or None for any other (csrc/calls.cpp)."}
    FASTPEFT_CALL(lora_linear),
    FASTPEFT_CALL(int8_lora_linear),
    FASTPEFT_CALL(nf4_lora_linear),
    FASTPEFT_CALL(multi_lora_linear),
    FASTPEFT_CALL(bottleneck_adapter),
#undef FASTPEFT_CALL
    {"huge_page_empty", fastpeft::huge_page_empty, METH_O,
     "huge_page_empty(nbytes) -> uint8 tensor | None: fresh memory on a 2 MiB boundary, "
     "advised for transparent huge pages (csrc/huge_pages.cpp); None off Linux."},
    {"advise_huge_pages", fastpeft::advise_huge_pages, METH_O,
     "advise_huge_pages(tensor) -> int: the whole 2 MiB spans of the tensor's memory "
     "advised for huge pages and collapsed into them; the bytes advised."},
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
