"""Shared test helpers: backend parametrisation and dtype-aware comparisons."""

from __future__ import annotations

import os

import pytest
import torch

import fastpeft

HAS_CUDA = torch.cuda.is_available()
# The Triton backend runs under its (slow) interpreter: keep its shapes small.
TRITON_INTERPRETED = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"


# Ops whose C++ backend has two paths, FASTPEFT_CPU_PATH=fused|aten (csrc/cpu/cpu_path.h)
CPU_PATH_OPS = ("lora_linear", "int8_lora_linear", "bottleneck_adapter")


def backend_params(op: str) -> list:
    """The fused backends of ``op`` this machine can run, each with its tensors' device;
    a backend whose kernels were not built (or not installed) is skipped, with the reason."""
    available = fastpeft.available_backends(op)
    cpu_ok = "cpu" in available
    not_built = pytest.mark.skipif(not cpu_ok, reason=f"fastpeft._C has no {op} kernel (not built)")
    if op in CPU_PATH_OPS:  # both C++ paths, whichever this CPU would pick (cpu_path.h)
        cpus = [pytest.param(("cpu", "cpu"), id=f"cpu-{path}",
                             marks=[not_built, pytest.mark.cpu_path(path)])
                for path in ("fused", "aten")]
    else:
        cpus = [pytest.param(("cpu", "cpu"), id="cpu", marks=not_built)]
    triton_device = "cuda" if HAS_CUDA else "cpu"
    triton_ok = "triton" in available
    triton = pytest.param(
        ("triton", triton_device),
        id=f"triton-{triton_device}",
        marks=pytest.mark.skipif(not triton_ok, reason="triton (or its interpreter) unavailable"),
    )
    return [*cpus, triton]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 where the arithmetic is real (not the interpreter)."""
    dtypes = [torch.float32, torch.float16]
    if backend == "cpu" or device == "cuda":
        dtypes.append(torch.bfloat16)
    return dtypes


def skip_without_fp64_kernels(backend: str, device: str) -> None:
    """Skip an fp64 test of int8_lora_linear / gated_prefix_attention on Triton-on-CUDA
    where Triton is older than 3.9: their launchers refuse fp64 there (Triton cannot compile
    those fp64 dots for the GPU; see fastpeft.triton._common.check_fp64_register_dots and
    test_triton_compat.py). The interpreter runs them on every version."""
    if backend != "triton" or device != "cuda":
        return
    from fastpeft.triton._common import FP64_REGISTER_DOTS

    if not FP64_REGISTER_DOTS:
        pytest.skip("fp64 Triton kernels of this op need Triton >= 3.9 on a GPU (refused)")


def forced(backend: str):
    return fastpeft.use_backend(backend)


def assert_close_to_ref(
    name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, atol_eps: float = 4.0
) -> None:
    """flash-attention's rule: the fused result's error against a float64 reference must be
    within 2x PyTorch's own error in the same dtype, plus ``atol_eps`` ulps of the largest
    reference value (kernels that reduce over long rows may need a few more)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    eps = torch.finfo(ref_lowp.dtype).eps
    scale = ref64.abs().max().item() + 1e-6
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    bound = 2 * ref_err + atol_eps * eps * scale
    assert err <= bound, (
        f"{name}: max |fused - ref64| = {err:.3e} > bound {bound:.3e} "
        f"(torch {ref_lowp.dtype} error {ref_err:.3e}, max |ref| {scale:.3e})"
    )
