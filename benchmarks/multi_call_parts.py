"""Where a serving call of MultiLoRALinear spends its time, piece by piece: the base
``F.linear``, the registered op (``torch.ops.fastpeft.multi_lora_linear``), the public
function (its checks around the op), the module call, and the module's lookup of its
stacked adapters alone. Timed as fastpeft-bench times (interleaved, each call after the
last-level cache was flushed), no gradient; 16 rows, one adapter each.

    python benchmarks/multi_call_parts.py                  # 1024 -> 1024, fp32
    python benchmarks/multi_call_parts.py --features 4096 --dtype bf16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.bench.timing import time_interleaved
from fastpeft.nn import MultiLoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=1024, help="in = out features")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, d, n = DTYPES[args.dtype], args.features, args.adapters
    base = torch.nn.Linear(d, d, dtype=dtype).requires_grad_(False)
    layer = MultiLoRALinear(base)
    for i in range(n):
        layer.add_adapter(f"a{i}", 16, 32)
        torch.nn.init.normal_(layer.lora_B[f"a{i}"].weight, std=0.02)
    layer.eval().requires_grad_(False)
    ids = torch.arange(16) % n
    x = torch.randn(16, d, dtype=dtype)
    a, b, s = layer.stacked(dtype)
    calls = {
        "F.linear": lambda: F.linear(x, base.weight, base.bias),
        "op": lambda: torch.ops.fastpeft.multi_lora_linear(x, base.weight, base.bias, a, b, s,
                                                           ids, 0.0, None),
        "public": lambda: fastpeft.multi_lora_linear(x, base.weight, base.bias, a, b, s, ids,
                                                     0.0, False),
        "module": lambda: layer(x, adapter_ids=ids),
        "stacked": lambda: layer.stacked(dtype),
    }
    with torch.no_grad():
        times = time_interleaved(calls, torch.device("cpu"), runs=args.runs)
    print(f"MultiLoRALinear {d}x{d}, {n} adapters, 16 rows, {args.dtype}, {args.threads} "
          f"threads; median ms, caches flushed before each call")
    for name, t in times.items():
        print(f"  {name:10s} {t.median_ms:7.3f}")


if __name__ == "__main__":
    main()
