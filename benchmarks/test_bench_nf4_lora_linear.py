"""pytest-benchmark suite for the NF4 base + LoRA (QLoRA): ``pytest benchmarks/ --benchmark-only``.

The providers and shapes of ``fastpeft-bench --ops nf4_lora_linear`` (the shapes chosen with
``--bench-shapes``, see conftest.py); a missing peer library, or a provider the shape does
not have, is a skipped test.
"""

import pytest

from fastpeft.bench import nf4_lora_linear
from fastpeft.bench.runner import pytest_benchmark_step

CASE = nf4_lora_linear  # read by conftest.py
PROVIDERS = ["fastpeft", "reference", "bnb+peft", "int8", "base"]


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nf4_lora_linear(benchmark, case, shape, provider, mode, device):
    label = f"nf4_lora_linear {shape}"
    pytest_benchmark_step(benchmark, case, provider, mode, label, device)
