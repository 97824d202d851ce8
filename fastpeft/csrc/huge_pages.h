// fastpeft._C.huge_page_empty / advise_huge_pages (huge_pages.cpp): memory in transparent
// huge pages for the quantised weights' codes, functions of the extension's Python module
// (fastpeft.cpp).
#pragma once

#include <Python.h>

namespace fastpeft {

PyObject* huge_page_empty(PyObject* self, PyObject* nbytes);
PyObject* advise_huge_pages(PyObject* self, PyObject* tensor);

}  // namespace fastpeft
