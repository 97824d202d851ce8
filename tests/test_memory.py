"""The quantised weights' codes in transparent huge pages (fastpeft/ops/_memory.py,
fastpeft/csrc/huge_pages.cpp): where fastpeft makes codes of 2 MiB or more on a Linux CPU
they lie in its own 2 MiB-aligned memory, with the same values, and behave as any tensor
(saved, loaded, copied, freed); small ones, other devices, tensor modes and
``FASTPEFT_HUGE_PAGES=0`` get ordinary memory; codes reused as they lie are only advised.

Whether the kernel then backs the memory with huge pages depends on its settings (off in
some), so no test asks for AnonHugePages.
"""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch

import fastpeft
from fastpeft import reference
from fastpeft.ops import _memory

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and _memory.enabled()),
    reason="huge pages: the compiled kernels on Linux",
)

BIG = (4096, 1024)  # 2 MiB of NF4 codes, 4 MiB of int8 codes


def _ours(t: torch.Tensor) -> bool:
    """Whether t lies in fastpeft's huge-page memory (from_blob: aligned, not resizable)."""
    return t.data_ptr() % _memory.HUGE_PAGE == 0 and not t.untyped_storage().resizable()


def test_quantize_nf4_codes_in_huge_pages_same_values():
    w = torch.randn(*BIG)
    q, absmax = fastpeft.quantize_nf4(w)
    want_q, want_absmax = reference.quantize_nf4(w, 64)
    assert _ours(q) and not _ours(absmax)  # absmax: 256 KiB
    assert torch.equal(q, want_q) and torch.equal(absmax, want_absmax)
    assert q.is_contiguous() and q.dtype == torch.uint8 and q.shape == want_q.shape


def test_quantize_int8_codes_in_huge_pages_same_values():
    w = torch.randn(*BIG)
    q, scale = fastpeft.quantize_int8(w)
    want_q, want_scale = reference.quantize_int8(w)
    assert _ours(q)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)


def test_small_codes_stay_in_ordinary_memory():
    q, _ = fastpeft.quantize_nf4(torch.randn(64, 128))
    assert q.untyped_storage().resizable()


def test_turned_off(monkeypatch):
    monkeypatch.setenv("FASTPEFT_HUGE_PAGES", "0")
    q, _ = fastpeft.quantize_nf4(torch.randn(*BIG))
    assert q.untyped_storage().resizable()
    assert fastpeft.NF4LoRALinear(BIG[1], BIG[0], 4, 8).qweight.untyped_storage().resizable()


@pytest.mark.parametrize("cls", ["NF4LoRALinear", "Int8LoRALinear"])
def test_module_buffers(cls):
    linear = torch.nn.Linear(BIG[1], BIG[0])
    layer = getattr(fastpeft, cls).from_linear(linear, r=4, lora_alpha=8)
    assert _ours(layer.qweight)
    empty = getattr(fastpeft, cls)(BIG[1], BIG[0], 4, 8)
    assert _ours(empty.qweight) and int(empty.qweight.count_nonzero()) == 0  # zeros
    # state dicts, torch.save, deepcopy: the same values (copies in ordinary memory)
    empty.load_state_dict(layer.state_dict())
    assert _ours(empty.qweight) and torch.equal(empty.qweight, layer.qweight)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert torch.equal(loaded["qweight"], layer.qweight)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.qweight, layer.qweight)
    x = torch.randn(3, BIG[1])
    assert torch.equal(twin(x), layer(x))


def test_other_devices_and_modes_get_torch_zeros():
    with torch.device("meta"):
        layer = fastpeft.NF4LoRALinear(BIG[1], BIG[0], 4, 8)
    assert layer.qweight.is_meta
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = _memory.zeros(BIG, torch.uint8)
    assert type(fake).__name__ == "FakeTensor"
    assert _memory.in_huge_pages(torch.randn(*BIG).to("meta")).is_meta


def test_memory_is_returned():
    """Each buffer is unmapped when its tensor dies: many in turn leave the resident set
    where one left it."""
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    t = _memory.zeros((16 * 2**20,), torch.uint8)
    t.fill_(1)
    del t
    start = rss_kib()
    for _ in range(40):  # 640 MiB in all, 16 MiB at a time
        t = _memory.zeros((16 * 2**20,), torch.uint8)
        t.fill_(1)
        del t
    assert rss_kib() - start < 64 * 1024


def test_advise_keeps_the_values_in_place():
    t = torch.randint(0, 255, (5 * 2**20,), dtype=torch.uint8)  # holds a whole 2 MiB span
    before, ptr = t.clone(), t.data_ptr()
    advised = _memory.advise(t)
    assert 0 < advised <= t.nbytes and advised % _memory.HUGE_PAGE == 0
    assert t.data_ptr() == ptr and torch.equal(t, before)
    assert _memory.advise(torch.zeros(100, dtype=torch.uint8)) == 0


def test_off_where_huge_pages_are_not_two_mib(monkeypatch):
    """arm64 kernels with 16 or 64 KiB pages have 32 or 512 MiB huge pages, which 2 MiB
    alignment does not reach: ordinary memory there."""
    monkeypatch.setattr(_memory, "_two_mib_pages", lambda: False)
    assert not _memory.enabled()
    q, _ = fastpeft.quantize_nf4(torch.randn(*BIG))
    assert q.untyped_storage().resizable()
