"""pytest-benchmark suite for the int8 base + LoRA: ``pytest benchmarks/ --benchmark-only``.

The providers and shapes of ``fastpeft-bench --ops int8_lora_linear`` (the shapes chosen with
``--bench-shapes``, see conftest.py); a missing peer library is a skipped test.
"""

import pytest

from fastpeft.bench import int8_lora_linear
from fastpeft.bench.runner import pytest_benchmark_step

CASE = int8_lora_linear  # read by conftest.py
PROVIDERS = ["fastpeft", "reference", "bnb+peft", "base"]


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_int8_lora_linear(benchmark, case, shape, provider, mode, device):
    label = f"int8_lora_linear {shape}"
    pytest_benchmark_step(benchmark, case, provider, mode, label, device)
