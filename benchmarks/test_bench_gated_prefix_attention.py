"""pytest-benchmark suite for gated prefix attention: ``pytest benchmarks/ --benchmark-only``.

Same providers and shapes as ``fastpeft-bench --ops gated_prefix_attention``."""

import pytest
import torch

from fastpeft.bench import gated_prefix_attention as case_module
from fastpeft.bench.runner import default_device, default_dtype, shapes_for
from fastpeft.bench.timing import saved_bytes

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
    f, inputs = case.providers[provider], case.make_inputs()
    dy = torch.randn_like(inputs[0])
    benchmark.group = f"gated_prefix_attention {mode} {SHAPE}"
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: f(*inputs), exclude=case.params)

    def step():
        out = f(*inputs)
        if mode == "full":
            out.backward(dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
