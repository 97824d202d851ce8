"""Runs one benchmark case: every provider, every mode, timed side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .timing import Timing, cache_flusher, peak_bytes, saved_bytes, time_interleaved

MODES = ("forward", "backward", "full")
SWEEPS = ("full", "quick", "tiny")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what people train in), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def shapes_for(case_module, device: torch.device, sweep: str = "full") -> list:
    """A case module's shapes for ``device``: its whole sweep (``CUDA_SHAPES`` or
    ``CPU_SHAPES``), the first of them (``quick``), or ``TINY_SHAPES`` (``tiny``: a smoke
    test of the harness, whose timings mean nothing)."""
    if sweep == "tiny":
        return case_module.TINY_SHAPES
    shapes = case_module.CUDA_SHAPES if device.type == "cuda" else case_module.CPU_SHAPES
    return shapes[:1] if sweep == "quick" else shapes


@dataclass
class Case:
    """Providers of one op at one shape. Each provider maps the tensors from
    ``make_inputs()`` to one output tensor. Besides ``fastpeft`` and ``reference`` (the
    unfused composition), ``floor`` names the provider that costs what the layer would
    cost without any adapter, and ``peer`` the library people would use instead; a peer
    whose library is not installed is left out of ``providers`` and ``missing_peer``
    says which."""

    providers: Mapping[str, Callable[..., torch.Tensor]]
    make_inputs: Callable[[], tuple[torch.Tensor, ...]]
    floor: str
    peer: str | None = None
    missing_peer: str | None = None  # e.g. "peft (not installed)"
    params: list[torch.Tensor] = field(default_factory=list)  # not counted as saved bytes
    weight_bytes: Mapping[str, int] = field(default_factory=dict)  # per provider, if relevant
    # the modes that mean something for this case; a serving case (nothing requires a
    # gradient, as in a server) is timed forward only
    modes: tuple[str, ...] = MODES

    def role(self, provider: str) -> str:
        """fastpeft, reference, peer or floor: what ``provider`` stands for; "other" for a
        further provider timed beside them (shown by name)."""
        named = {self.floor: "floor", self.peer: "peer", "fastpeft": "fastpeft",
                 "reference": "reference"}
        return named.get(provider, "other")


@dataclass(frozen=True)
class Result:
    provider: str
    mode: str
    timing: Timing
    saved_bytes: int
    peak_bytes: int | None = None  # CUDA only: peak allocated during one call


def run_case(case: Case, device: torch.device, modes: tuple[str, ...] = MODES,
             runs: int = 20, warmup: int = 3,
             on_mode_done: Callable[[str], None] | None = None) -> list[Result]:
    """Time every provider of ``case`` in each mode, interleaved: ``forward``, ``backward``
    (replaying one retained graph) or ``full`` (forward + backward). ``on_mode_done(mode)``
    is called after each mode (the CLI's progress bar). Modes the case does not take
    (:attr:`Case.modes`) are left out."""
    inputs = case.make_inputs()
    dy = torch.randn_like(case.providers[case.floor](*inputs))
    saved = {name: saved_bytes(lambda f=f: f(*inputs), exclude=case.params)
             for name, f in case.providers.items()}
    results = []
    for mode in modes:
        if mode not in case.modes:
            if on_mode_done is not None:
                on_mode_done(mode)
            continue
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
        peaks = {n: peak_bytes(fn, device) if device.type == "cuda" else None
                 for n, fn in fns.items()}
        results += [Result(n, mode, timings[n], saved[n], peaks[n]) for n in case.providers]
        for t in inputs:
            t.grad = None
        if on_mode_done is not None:
            on_mode_done(mode)
    return results


def pytest_benchmark_step(benchmark, case: Case, provider: str, mode: str, label: str,
                          device: torch.device, rounds: int = 20) -> None:
    """One (provider, mode) of a case under pytest-benchmark (``benchmarks/``): grouped
    by ``label`` and mode so the providers of one mode share a table, saved-for-backward
    bytes in ``extra_info``. Each round starts with the CLI's cache flush
    (:func:`~fastpeft.bench.timing.cache_flusher`, untimed) after as many warm-up rounds;
    pytest-benchmark times providers one after another, where the CLI interleaves them."""
    import pytest

    if provider not in case.providers:
        pytest.skip(case.missing_peer if provider == case.peer and case.missing_peer
                     else f"{label} has no {provider} provider")
    if mode not in case.modes:
        pytest.skip(f"{label} is timed in {', '.join(case.modes)} only")
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

    flush = cache_flusher(device)

    def setup():
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=3)
