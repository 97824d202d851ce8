"""Side-by-side timing and saved-for-backward accounting used by the benchmark harness.

Providers are timed interleaved (A, B, C, A, B, C, ...) so that frequency scaling, cache
state and background load hit every provider alike, and each is summarised by its
median with the 20th and 80th percentiles; each call starts with the caches flushed
(see ``_clock``). On CUDA each call is timed between two CUDA events (GPU time, launch
gaps included; ``triton.testing.do_bench`` times one function at a time, so it cannot
interleave); on the CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20/80 percentiles over ``runs`` calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


def _flush_bytes(device: torch.device) -> int:
    """Twice the last-level cache: 256 MiB on a GPU (an H100's L2 is 50 MB), on a CPU twice
    its largest cache as Linux lists it (sysfs; Python's ``os.sysconf`` has no name for
    the L3's size), and at least 64 MiB."""
    if device.type == "cuda":
        return 256 * 2**20
    return max(2 * _largest_cpu_cache(), 64 * 2**20)


def _largest_cpu_cache() -> int:
    """The largest cache of CPU 0 in bytes (its L3 on a server CPU), 0 where unknown."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if size[-1:] in units and size[:-1].isdigit():
            largest = max(largest, int(size[:-1]) * units[size[-1]])
        elif size.isdigit():
            largest = max(largest, int(size))
    return largest


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """What runs before each timed call: a buffer twice the size of the last-level cache
    is zeroed (as ``triton.testing.do_bench`` does on a GPU), so that every call starts
    with cold caches, as a layer inside a model does after the layers before it, instead of
    finding its weights still cached from its previous call; and on a CPU the zeroing (a
    parallel op) wakes every core, as the layer before it would have."""
    buffer = torch.empty(_flush_bytes(device) // 4, dtype=torch.float32, device=device)
    return buffer.zero_


def _clock(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Times one call, after :func:`cache_flusher`'s flush."""
    flush = cache_flusher(device)
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            flush()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 3,
    runs: int = 20,
) -> dict[str, Timing]:
    """Time every callable ``runs`` times, round-robin, after ``warmup`` rounds."""
    clock = _clock(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + runs):
        for name, fn in fns.items():
            ms = clock(fn)
            if round_ >= warmup:
                samples[name].append(ms)
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = Timing(
            statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8), runs
        )
    return out


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while ``fn`` runs, each storage counted once;
    tensors in ``exclude`` (parameters, which are saved by reference) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated during one call of ``fn``, above what was allocated
    before it (the inputs, the weights, a retained graph): activations, saved tensors,
    workspaces, the output."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
