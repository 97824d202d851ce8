// `import fastpeft._C` loads this shared library; the CPU kernels (csrc/cpu/*.cpp)
// register themselves with the dispatcher through static
// TORCH_LIBRARY_IMPL initialisers.
// The Python module itself is empty.
#include <Python.h>

static struct PyModuleDef fastpeft_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastpeft_c_module); }
