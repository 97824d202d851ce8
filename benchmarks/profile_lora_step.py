"""Where a lora_linear training step spends its time, next to its frozen base layer:
``torch.profiler`` over 20 forward+backward steps of ``LoRALinear`` (T=512, 2048 -> 2048,
r=16, dropout 0.1) and of the plain ``nn.Linear``, bf16 by default, 2 threads.
The README's lora_linear explanation quotes its tables::

    python benchmarks/profile_lora_step.py            # bf16
    python benchmarks/profile_lora_step.py fp32
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fastpeft

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def profiled(layer: torch.nn.Module, x: torch.Tensor, steps: int = 20) -> str:
    for _ in range(5):  # warm-up
        layer(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            y = layer(x)
            y.backward(torch.ones_like(y))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dtype", nargs="?", choices=sorted(DTYPES), default="bf16")
    dtype = DTYPES[parser.parse_args().dtype]
    torch.set_num_threads(2)
    base = torch.nn.Linear(2048, 2048, dtype=dtype).requires_grad_(False)
    lora = fastpeft.LoRALinear(base, 16, 32, 0.1).train()
    torch.nn.init.normal_(lora.lora_B.weight, std=0.02)
    x = torch.randn(512, 2048, dtype=dtype, requires_grad=True)
    print("LoRALinear\n" + profiled(lora, x))
    print("frozen nn.Linear\n" + profiled(base, x))


if __name__ == "__main__":
    main()
