// Memory in transparent huge pages for the quantised weights' codes (fastpeft/ops/_memory.py).
//
// A decode step reads each layer's codes from memory once per call, a few MB in a few
// hundred microseconds. In 4 KiB pages every page is a TLB miss and a page walk, which the
// hardware prefetchers do not run ahead of; in 2 MiB pages the same bytes are a few TLB
// entries. NF4 at T = 1, 4096 x 4096 (8 MB of codes), caches flushed before each call, 2-core
// Zen 4 VM: 0.61-0.74 ms in 4 KiB pages, 0.50-0.56 ms in huge pages (ad hoc scripts).
//
//   huge_page_empty(nbytes) -> uint8 tensor (nbytes,) or None
//       fresh memory, zero-filled, its start on a 2 MiB boundary and every whole 2 MiB of
//       it advised MADV_HUGEPAGE (the tail, under 2 MiB, stays in 4 KiB pages: a huge page
//       there would back memory nobody asked for); unmapped when the storage dies. None
//       off Linux or where the kernel refuses the mapping.
//   advise_huge_pages(tensor) -> int
//       for memory that is someone else's (bitsandbytes' codes, reused as they lie): the
//       whole 2 MiB spans inside the tensor's bytes advised MADV_HUGEPAGE, then collapsed
//       into huge pages now (MADV_COLLAPSE, Linux 6.1+; older kernels leave it to
//       khugepaged). Returns the bytes advised (whether or not the collapse succeeded), 0
//       where none (small, not CPU, off Linux).
//
// Both are hints: where transparent huge pages are off ("never") the memory stays in
// 4 KiB pages and works the same.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "huge_pages.h"

namespace fastpeft {
namespace {

#ifdef __linux__
// x86-64's and 4 KiB-page arm64's huge page; fastpeft/ops/_memory.py asks here only where
// the kernel's hpage_pmd_size is this
constexpr uintptr_t kHuge = uintptr_t{1} << 21;

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1's value, for older headers
#endif

uintptr_t round_up(uintptr_t v, uintptr_t to) { return (v + to - 1) / to * to; }

// An anonymous mapping of nbytes (rounded up to pages) that starts on a 2 MiB boundary, or
// nullptr: a mapping 2 MiB longer, trimmed at both ends.
void* map_aligned(size_t nbytes, size_t& length) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  length = round_up(nbytes, page);
  const size_t span = length + kHuge;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = round_up(base, kHuge);
  if (start > base) munmap(raw, start - base);
  const uintptr_t end = start + length;
  if (base + span > end) munmap(reinterpret_cast<void*>(end), base + span - end);
  return reinterpret_cast<void*>(start);
}
#endif

}  // namespace

PyObject* huge_page_empty(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  const long long nbytes = PyLong_AsLongLong(arg);
  if (nbytes == -1 && PyErr_Occurred()) return nullptr;
  if (nbytes < 0) {
    PyErr_SetString(PyExc_ValueError, "huge_page_empty: nbytes must be >= 0");
    return nullptr;
  }
#ifdef __linux__
  size_t length = 0;
  void* data = map_aligned(static_cast<size_t>(nbytes), length);
  if (data == nullptr) Py_RETURN_NONE;
  const size_t whole = static_cast<size_t>(nbytes) / kHuge * kHuge;
  if (whole > 0) madvise(data, whole, MADV_HUGEPAGE);  // a hint: its failure changes nothing
  at::Tensor t = at::from_blob(
      data, {static_cast<int64_t>(nbytes)}, [length](void* p) { munmap(p, length); },
      at::TensorOptions().dtype(at::kByte));
  return THPVariable_Wrap(std::move(t));
#else
  Py_RETURN_NONE;
#endif
  END_HANDLE_TH_ERRORS
}

PyObject* advise_huge_pages(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  if (!THPVariable_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "advise_huge_pages: expected a tensor, got %s",
                 Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  long long advised = 0;
#ifdef __linux__
  const at::Tensor t = THPVariable_Unpack(arg);  // owned: the GIL is let go below
  if (t.defined() && t.is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
      t.is_contiguous()) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
    const uintptr_t first = round_up(begin, kHuge), last = end / kHuge * kHuge;
    if (last > first) {
      void* p = reinterpret_cast<void*>(first);
      // the collapse copies the pages (about 0.15 s per 64 MiB): other threads run
      Py_BEGIN_ALLOW_THREADS
      if (madvise(p, last - first, MADV_HUGEPAGE) == 0) {
        madvise(p, last - first, MADV_COLLAPSE);  // now, where the kernel can
        advised = static_cast<long long>(last - first);
      }
      Py_END_ALLOW_THREADS
    }
  }
#endif
  return PyLong_FromLongLong(advised);
  END_HANDLE_TH_ERRORS
}

}  // namespace fastpeft
