// `import fastpeft._C` loads this shared library; the kernels register themselves with
// the dispatcher through the static TORCH_LIBRARY_IMPL initialisers in csrc/cpu/*.cpp.
// The Python module itself is empty.
#include <Python.h>

static struct PyModuleDef fastpeft_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastpeft_c_module); }
