// fastpeft._C.<op>_call: the LoRA linear ops' usual eager CPU call in one step of C++
// (calls.cpp), METH_FASTCALL functions of the extension's Python module (fastpeft.cpp).
#pragma once

#include <Python.h>

namespace fastpeft {

PyObject* lora_linear_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* int8_lora_linear_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* nf4_lora_linear_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* multi_lora_linear_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* bottleneck_adapter_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace fastpeft
