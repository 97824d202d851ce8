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
