"""Where the quantised weights' codes live: in transparent huge pages, on Linux CPUs.

A decode step reads every layer's codes from memory once per call: a few MB in a few
hundred microseconds. In 4 KiB pages each page of them is a TLB miss and a page walk that
the hardware prefetchers do not run ahead of; in 2 MiB pages the same bytes take a few TLB
entries. On a 2-core Zen 4 VM the NF4 op at T = 1, 4096 x 4096 (8 MB of codes), with the
caches flushed before each call, took 0.61-0.74 ms with its codes in 4 KiB pages and
0.50-0.56 ms in huge pages.

So the codes fastpeft makes (``quantize_nf4``, ``quantize_int8``, the buffers of
``NF4LoRALinear`` and ``Int8LoRALinear``) are put in memory that starts on a 2 MiB boundary
and is advised for huge pages (``fastpeft._C.huge_page_empty``), and codes it reuses as
they lie (bitsandbytes' storage, ``NF4LoRALinear.from_bnb``) get the advice in place
(``advise_huge_pages``). This is a hint to the kernel: where transparent huge pages are
off, the memory is in 4 KiB pages and everything works the same. It applies to CPU tensors
of at least 2 MiB, on Linux with 2 MiB huge pages and the compiled kernels loaded;
``FASTPEFT_HUGE_PAGES=0`` turns it off. Such a tensor is an ordinary tensor but for one
thing: its storage cannot be resized (as any tensor made by ``torch.from_blob``), so
``resize_`` to more elements, or an ``out=`` that needs more room, raises.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _backend

HUGE_PAGE = 2 * 2**20


def enabled() -> bool:
    """Whether fastpeft puts its codes in huge pages here: Linux with 2 MiB huge pages
    (x86-64; arm64 with 4 KiB pages), the compiled kernels loaded, and
    ``FASTPEFT_HUGE_PAGES`` not ``0``."""
    return (os.environ.get("FASTPEFT_HUGE_PAGES", "1") != "0"
            and hasattr(_backend.native_module, "huge_page_empty") and _two_mib_pages())


@functools.lru_cache(maxsize=1)
def _two_mib_pages() -> bool:
    """Linux, and its transparent huge pages are 2 MiB (the size the allocator aligns to;
    arm64 kernels with 16 or 64 KiB pages have 32 or 512 MiB ones)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read()) == HUGE_PAGE
    except (OSError, ValueError):  # no THP in this kernel (or no sysfs): nothing to gain
        return False


def _wanted(t: Tensor) -> bool:
    """Whether ``t`` (a fresh tensor, or an empty one that stands for its device) is a
    plain CPU tensor that fastpeft would put in huge pages."""
    return (type(t) is Tensor and t.device.type == "cpu" and t.layout == torch.strided
            and not torch.compiler.is_compiling() and enabled())


def _empty(nbytes: int) -> Tensor | None:
    """``nbytes`` of zeroed memory in huge pages (uint8), or None where the kernel refused."""
    return _backend.native_module.huge_page_empty(nbytes)


def zeros(shape: Sequence[int], dtype: torch.dtype,
          device: torch.device | str | None = None) -> Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``, in huge pages where it is a CPU
    tensor of at least 2 MiB (a default device, ``torch.device`` context and tensor mode
    apply as they do to ``torch.zeros``)."""
    probe = torch.empty(0, dtype=dtype, device=device)
    nbytes = probe.element_size() * _numel(shape)
    if nbytes >= HUGE_PAGE and _wanted(probe):
        buffer = _empty(nbytes)
        if buffer is not None:
            return buffer.view(dtype).view(tuple(shape))
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def in_huge_pages(t: Tensor) -> Tensor:
    """``t``'s values in a fresh tensor in huge pages where ``t`` is a CPU tensor of at
    least 2 MiB (contiguous, same shape and dtype; no autograd history), else ``t``."""
    if t.nbytes < HUGE_PAGE or t.requires_grad or not _wanted(t):
        return t
    buffer = _empty(t.nbytes)
    if buffer is None:
        return t
    return buffer.view(t.dtype).view(t.shape).copy_(t)


def advise(t: Tensor) -> int:
    """Advise the memory of ``t`` (someone else's, kept as it lies) for huge pages: its
    whole 2 MiB spans, collapsed into huge pages now where the kernel can (Linux 6.1+).
    Returns the bytes advised (0 where nothing was done)."""
    if t.nbytes < HUGE_PAGE or not _wanted(t):
        return 0
    return _backend.native_module.advise_huge_pages(t)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
