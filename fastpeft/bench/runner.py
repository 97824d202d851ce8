"""Runs one benchmark case: every provider, every mode, timed side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .timing import Timing, saved_bytes, time_interleaved

MODES = ("forward", "backward", "full")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what people train in), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def shapes_for(case_module, device: torch.device) -> list:
    """A case module's shape sweep for ``device`` (``CUDA_SHAPES`` or ``CPU_SHAPES``)."""
    return case_module.CUDA_SHAPES if device.type == "cuda" else case_module.CPU_SHAPES


@dataclass
class Case:
    """Providers of one op at one shape. Each provider maps the tensors from
    ``make_inputs()`` to one output tensor; ``floor`` names the provider that costs what
    the layer would cost without any adapter (ratios are reported against it)."""

    providers: Mapping[str, Callable[..., torch.Tensor]]
    make_inputs: Callable[[], tuple[torch.Tensor, ...]]
    floor: str
    params: list[torch.Tensor] = field(default_factory=list)  # not counted as saved bytes
    weight_bytes: Mapping[str, int] = field(default_factory=dict)  # per provider, if relevant


@dataclass(frozen=True)
class Result:
    provider: str
    mode: str
    timing: Timing
    saved_bytes: int


def run_case(case: Case, device: torch.device, modes: tuple[str, ...] = MODES,
             runs: int = 20, warmup: int = 3) -> list[Result]:
    inputs = case.make_inputs()
    dy = torch.randn_like(case.providers[case.floor](*inputs))
    saved = {name: saved_bytes(lambda f=f: f(*inputs), exclude=case.params)
             for name, f in case.providers.items()}
    results = []
    for mode in modes:
        fns = {}
        for name, f in case.providers.items():
            if mode == "forward":
                fns[name] = lambda f=f: f(*inputs)
            elif mode == "full":
                fns[name] = lambda f=f: f(*inputs).backward(dy)
            else:  # backward alone: replay the backward of one retained graph
                y = f(*inputs)
                fns[name] = lambda y=y: y.backward(dy, retain_graph=True)
        timings = time_interleaved(fns, device, warmup=warmup, runs=runs)
        results += [Result(n, mode, timings[n], saved[n]) for n in case.providers]
        for t in inputs:
            t.grad = None
    return results


def pytest_benchmark_step(benchmark, case: Case, provider: str, mode: str, label: str,
                          device: torch.device, rounds: int = 20) -> None:
    """One (provider, mode) of a case under pytest-benchmark (``benchmarks/``): grouped
    by ``label`` and mode so the providers of one mode share a table, saved-for-backward
    bytes in ``extra_info``. pytest-benchmark times providers one after another; the CLI
    interleaves them."""
    import pytest

    if provider not in case.providers:
        pytest.skip(f"{provider} is not installed")
    f, inputs = case.providers[provider], case.make_inputs()
    dy = torch.randn_like(f(*inputs))
    benchmark.group = f"{label} {mode}"
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: f(*inputs), exclude=case.params)

    def step():
        out = f(*inputs)
        if mode == "full":
            out.backward(dy)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2)
