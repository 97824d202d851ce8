"""Side-by-side timing and saved-for-backward accounting used by the benchmark harness.

Providers are timed interleaved (A, B, C, A, B, C, ...) so that frequency scaling, cache
state and background load hit every provider alike, and each is summarised by its
median with the 20th and 80th percentiles. On CUDA each call is timed between two CUDA
events (GPU time, launch gaps included; ``triton.testing.do_bench`` times one function at a
time, so it cannot interleave); on the CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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


def _clock(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
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
