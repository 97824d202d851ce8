"""Test set-up: the Triton kernels run on CPU tensors through the Triton interpreter
when no GPU is present, which must be switched on before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cpu_path(request, monkeypatch):
    """FASTPEFT_CPU_PATH for tests marked ``cpu_path(name)`` (helpers.backend_params marks
    the C++ backend's two paths: fastpeft's fused kernels and the ATen-GEMM composition)."""
    marker = request.node.get_closest_marker("cpu_path")
    if marker is not None:
        monkeypatch.setenv("FASTPEFT_CPU_PATH", marker.args[0])
    yield
