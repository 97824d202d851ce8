"""pytest-benchmark suite for the bottleneck adapter: ``pytest benchmarks/ --benchmark-only``.

The providers and shapes of ``fastpeft-bench --ops bottleneck_adapter`` (the shapes chosen with
``--bench-shapes``, see conftest.py); a missing peer library is a skipped test.
"""

import pytest

from fastpeft.bench import bottleneck_adapter
from fastpeft.bench.runner import pytest_benchmark_step

CASE = bottleneck_adapter  # read by conftest.py
PROVIDERS = ["fastpeft", "reference", "copy"]


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bottleneck_adapter(benchmark, case, shape, provider, mode, device):
    label = f"bottleneck_adapter {shape}"
    pytest_benchmark_step(benchmark, case, provider, mode, label, device)
