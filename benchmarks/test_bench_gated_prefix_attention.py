"""pytest-benchmark suite for gated prefix attention: ``pytest benchmarks/ --benchmark-only``.

The providers and shapes of ``fastpeft-bench --ops gated_prefix_attention`` (the shapes chosen with
``--bench-shapes``, see conftest.py); a missing peer library is a skipped test.
"""

import pytest

from fastpeft.bench import gated_prefix_attention
from fastpeft.bench.runner import pytest_benchmark_step

CASE = gated_prefix_attention  # read by conftest.py
PROVIDERS = ["fastpeft", "reference", "peft_style", "sdpa_causal"]


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_prefix_attention(benchmark, case, shape, provider, mode, device):
    label = f"gated_prefix_attention {shape}"
    pytest_benchmark_step(benchmark, case, provider, mode, label, device)
