"""pytest-benchmark suite for LoRA linear: ``pytest benchmarks/ --benchmark-only``.

Same providers and shapes as ``fastpeft-bench --ops lora_linear`` (its first shape);
a missing peer library is a skipped test.
"""

import pytest

from fastpeft.bench import lora_linear as case_module
from fastpeft.bench.runner import default_device, default_dtype, pytest_benchmark_step, shapes_for

DEVICE = default_device()
DTYPE = default_dtype(DEVICE)
SHAPE = shapes_for(case_module, DEVICE)[0]
PROVIDERS = ["fastpeft", "reference", "peft", "base"]


@pytest.fixture(scope="module")
def case():
    return case_module.build(SHAPE, DTYPE, DEVICE)


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lora_linear(benchmark, case, provider, mode):
    pytest_benchmark_step(benchmark, case, provider, mode, f"lora_linear {SHAPE}", DEVICE)
