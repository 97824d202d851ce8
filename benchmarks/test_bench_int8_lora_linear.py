"""pytest-benchmark suite for int8 base + LoRA: ``pytest benchmarks/ --benchmark-only``.

Same providers and shapes as ``fastpeft-bench --ops int8_lora_linear``; pytest-benchmark
times providers one after another (the CLI interleaves them), and groups the table by
mode so the providers of one mode sit side by side. Saved-for-backward bytes go to
``extra_info``.
"""

import pytest
import torch

from fastpeft.bench import int8_lora_linear
from fastpeft.bench.runner import default_device, default_dtype, shapes_for
from fastpeft.bench.timing import saved_bytes

DEVICE = default_device()
DTYPE = default_dtype(DEVICE)
SHAPE = shapes_for(int8_lora_linear, DEVICE)[0]
PROVIDERS = ["fastpeft", "reference", "bnb+peft", "base"]


@pytest.fixture(scope="module")
def case():
    return int8_lora_linear.build(SHAPE, DTYPE, DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_int8_lora_linear(benchmark, case, provider, mode):
    if provider not in case.providers:
        pytest.skip(f"{provider} is not installed")
    f, (x,) = case.providers[provider], case.make_inputs()
    dy = torch.randn(SHAPE.tokens, SHAPE.d_out, dtype=DTYPE, device=DEVICE)
    benchmark.group = f"int8_lora_linear {mode} {SHAPE}"
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: f(x), exclude=case.params)

    def step():
        y = f(x)
        if mode == "full":
            y.backward(dy)
        _sync()

    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
