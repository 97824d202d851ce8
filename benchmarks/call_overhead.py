"""The fixed cost of one call of the fused layers: a 64 -> 64 layer at T = 1, where the
kernels take a few microseconds and the rest is the Python, the dispatcher and autograd
around them. Decode steps pay it once per projection and token. The bottleneck adapter
(64 -> 8 -> 64) comes with the unfused composition it replaces, "(unfused)".

    python benchmarks/call_overhead.py            # this checkout's fastpeft
    python benchmarks/call_overhead.py --cold --runs 300
    PYTHONPATH=/path/to/other/tree python benchmarks/call_overhead.py

Prints the median of many calls, forward and forward+backward, per layer. ``--cold``
flushes the caches before each call, as fastpeft-bench does (a layer inside a model finds
them so, after the layers before it). Compare two trees by running both, alternately, on a
quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastpeft


# (this script times other trees too, through PYTHONPATH: it imports nothing of the
# harness that an older tree may lack)
def _median_us(fn, runs: int, flush: torch.Tensor | None) -> float:
    for _ in range(runs // 10):
        fn()
    times = []
    for _ in range(runs):
        if flush is not None:
            flush.zero_()  # twice the last-level cache: the call starts from memory
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _flush_buffer() -> torch.Tensor:
    try:
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (AttributeError, ValueError, OSError):
        l3 = 0
    return torch.empty(max(2 * l3, 64 * 2**20) // 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold", action="store_true",
                        help="flush the caches before each call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = {
        "LoRALinear": fastpeft.LoRALinear(torch.nn.Linear(64, 64), r=4, lora_alpha=8,
                                          lora_dropout=0.1),
        "Int8LoRALinear": fastpeft.Int8LoRALinear.from_linear(torch.nn.Linear(64, 64), r=4,
                                                              lora_alpha=8, lora_dropout=0.1),
    }
    if hasattr(fastpeft, "NF4LoRALinear"):  # (older trees have no NF4 op)
        layers["NF4LoRALinear"] = fastpeft.NF4LoRALinear.from_linear(
            torch.nn.Linear(64, 64), r=4, lora_alpha=8, lora_dropout=0.1)
    x = torch.randn(1, 64, requires_grad=True)
    calls = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
    if hasattr(fastpeft, "MultiLoRALinear"):  # one of two adapters on the row
        multi = fastpeft.MultiLoRALinear(torch.nn.Linear(64, 64))
        for name in ("a", "b"):
            multi.add_adapter(name, 4, 8, lora_dropout=0.1)
        layers["MultiLoRALinear"] = multi
        ids = torch.zeros(1, dtype=torch.int64)
        calls["MultiLoRALinear"] = lambda: multi(x, adapter_ids=ids)
    # a Houlsby adapter of 64 -> 8 -> 64, and the unfused composition it replaces
    bottleneck = fastpeft.BottleneckAdapter(64, 8, "silu", scaling=0.5)
    torch.nn.init.normal_(bottleneck.up_weight, std=0.02)
    layers["BottleneckAdapter"] = layers["(unfused)"] = bottleneck
    calls["BottleneckAdapter"] = lambda: bottleneck(x)
    calls["(unfused)"] = lambda: fastpeft.reference.bottleneck_adapter(
        x, bottleneck.down_weight, bottleneck.down_bias, bottleneck.up_weight,
        bottleneck.up_bias, activation="silu", scaling=0.5)
    flush = _flush_buffer() if args.cold else None
    print(f"fastpeft from {fastpeft.__file__}, torch {torch.__version__}, "
          f"{args.threads} threads; median of {args.runs} calls, microseconds"
          + (", caches flushed before each" if args.cold else ""))
    for name, call in calls.items():
        layers[name].train()
        forward = _median_us(call, args.runs, flush)
        full = _median_us(lambda call=call: call().sum().backward(), args.runs, flush)
        print(f"{name:17s} forward {forward:7.1f}   forward+backward {full:7.1f}")


if __name__ == "__main__":
    main()
