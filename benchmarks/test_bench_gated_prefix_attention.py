"""pytest-benchmark suite for gated prefix attention: ``pytest benchmarks/ --benchmark-only``.

Same providers and shapes as ``fastpeft-bench --ops gated_prefix_attention`` (its first shape);
a missing peer library is a skipped test.
"""

import pytest

from fastpeft.bench import gated_prefix_attention as case_module
from fastpeft.bench.runner import default_device, default_dtype, pytest_benchmark_step, shapes_for

DEVICE = default_device()
DTYPE = default_dtype(DEVICE)
SHAPE = shapes_for(case_module, DEVICE)[0]
PROVIDERS = ["fastpeft", "reference", "two_sdpa", "sdpa_causal"]


@pytest.fixture(scope="module")
def case():
    return case_module.build(SHAPE, DTYPE, DEVICE)


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_prefix_attention(benchmark, case, provider, mode):
    label = f"gated_prefix_attention {SHAPE}"
    pytest_benchmark_step(benchmark, case, provider, mode, label, DEVICE)
