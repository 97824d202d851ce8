"""``python -m fastpeft.info``: which implementation each op will use here, and why.

Prints the versions that matter, how the C++ CPU kernels were loaded (prebuilt, built on
first use, or why not), whether Triton can run, and for each op the backend a CPU and a
CUDA tensor would get under the backend in force (``FASTPEFT_BACKEND``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from . import _backend
from .ops import _memory


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _choice(op: str, device: str) -> str:
    try:
        backend = _backend.select(torch.device(device))
    except RuntimeError as err:
        return f"refused: {err}"
    if backend != "reference" and backend not in _backend.available_backends(op):
        return "reference (no kernel for it)"
    return backend


def cpu_path() -> str:
    """The C++ path of lora_linear, int8_lora_linear and bottleneck_adapter (as
    csrc/cpu/cpu_path.h decides): ``FASTPEFT_CPU_PATH`` if set, else "aten" (ATen / oneDNN
    GEMMs) for bf16 (and fp16 with AVX512-FP16) on CPUs with AVX-512, "fused" (fastpeft's
    own kernels) for every other dtype and CPU. Up to 8 rows the LoRA branch's forward
    takes fastpeft's few-rows kernels on either path, unless aten is forced."""
    forced = os.environ.get("FASTPEFT_CPU_PATH", "")
    if forced not in ("", "auto"):
        return f"{forced} (FASTPEFT_CPU_PATH)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        fp16 = "fp16 and " if "avx512fp16" in _cpu_flags() else ""
        path = f"aten for {fp16}bf16, fused for the other dtypes"
    else:
        path = "fused"
    return (f"{path}, the LoRA branch's forward of up to 8 rows fused (auto: CPU capability "
            f"{capability}; FASTPEFT_CPU_PATH=fused|aten forces)")


def cpu_isa() -> str:
    """The vector ISA of the NF4 decoder (as csrc/cpu/cpu_path.h decides):
    ``FASTPEFT_CPU_ISA`` if set, else the widest the CPU has: "avx512bf16" (AVX-512 with
    AVX512_BF16's dot products for bf16 inputs), "avx512", "avx2" or "generic"."""
    forced = os.environ.get("FASTPEFT_CPU_ISA", "")
    if forced not in ("", "auto"):
        return f"{forced} (FASTPEFT_CPU_ISA)"
    flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        isa = "avx512bf16" if "avx512_bf16" in flags else "avx512"
    else:
        isa = "avx2" if capability == "AVX2" else "generic"
    return f"{isa} (auto; FASTPEFT_CPU_ISA=avx512bf16|avx512|avx2|generic forces)"


def huge_pages() -> str:
    """Whether the quantised codes go in transparent huge pages (fastpeft/ops/_memory.py),
    and the kernel's setting for them (Linux's
    /sys/kernel/mm/transparent_hugepage/enabled: the mode in brackets)."""
    if os.environ.get("FASTPEFT_HUGE_PAGES", "1") == "0":
        return "off (FASTPEFT_HUGE_PAGES=0)"
    if not _memory.enabled():
        return "off (needs the compiled kernels, on Linux with 2 MiB transparent huge pages)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            setting = f.read().strip()
    except OSError:
        setting = "unknown"
    mode = setting[setting.find("[") + 1:setting.find("]")] if "[" in setting else setting
    note = "; the kernel gives none, codes stay in 4 KiB pages" if mode == "never" else ""
    return (f"codes of 2 MiB or more (kernel setting: {mode}{note}; "
            "FASTPEFT_HUGE_PAGES=0 turns off)")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def report() -> str:
    """The text ``python -m fastpeft.info`` prints."""
    cuda = torch.cuda.is_available()
    triton = ("not installed" if not _backend.TRITON_AVAILABLE else
              _version("triton") + (" (interpreter: TRITON_INTERPRET=1)"
                                    if _backend.TRITON_INTERPRET else ""))
    lines = [
        f"fastpeft {_version('fastpeft')}  torch {torch.__version__}  "
        f"python {platform.python_version()}  {platform.machine()}",
        f"C++ CPU kernels: {_backend.native_origin}",
        f"C++ CPU path: {cpu_path()}",
        f"NF4 decoder ISA: {cpu_isa()}",
        f"huge pages: {huge_pages()}",
        f"triton: {triton}; CUDA device: "
        f"{torch.cuda.get_device_name() if cuda else 'none'}",
        f"backend in force: {_backend.current()} (FASTPEFT_BACKEND or use_backend)",
        "",
        f"{'op':<24}{'CPU tensors':<16}CUDA tensors",
    ]
    for op in _backend.declared_ops():
        gpu = _choice(op, "cuda") if cuda else "(no GPU)"
        lines.append(f"{op:<24}{_choice(op, 'cpu'):<16}{gpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m fastpeft.info``: prints :func:`report`; takes no arguments but ``--help``."""
    import argparse

    argparse.ArgumentParser(
        prog="python -m fastpeft.info", allow_abbrev=False,
        description="What fastpeft runs on this machine: its backends and kernel paths, "
                    "per op and device.").parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
