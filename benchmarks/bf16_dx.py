"""The backward of the quantised layers in bf16 with and without AVX512_BF16's dot products
for dx (csrc/cpu/bf16_dx.h): one retained graph per row count, its backward replayed with
FASTPEFT_CPU_ISA unset and set to avx512 (which turns the dots off and nothing else the
backward runs), interleaved in one process, each call after the caches are flushed as
fastpeft-bench flushes them.

    python benchmarks/bf16_dx.py
    python benchmarks/bf16_dx.py --op int8 --rows 8 9 16 64 128 192

The row ranges these figures chose are kBf16DxMaxRows in fastpeft/csrc/cpu/
nf4_lora_linear.cpp and kBf16DxMinRows / kBf16DxMaxRows in int8_lora_linear.cpp.
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

import torch

import fastpeft
from fastpeft.bench.timing import time_interleaved

LAYERS = {"nf4": fastpeft.NF4LoRALinear, "int8": fastpeft.Int8LoRALinear}


def _has_bf16_dots() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=sorted(LAYERS), default="nf4")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 64, 128])
    parser.add_argument("--features", type=int, default=4096, help="in = out features")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not _has_bf16_dots():
        raise SystemExit("this CPU has no AVX512_BF16: nothing to compare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.features
    layer = LAYERS[args.op].from_linear(torch.nn.Linear(d, d, dtype=torch.bfloat16), r=16,
                                        lora_alpha=32, lora_dropout=0.1).train()
    print(f"{args.op} {d}x{d} bf16, {args.threads} threads; backward, median ms of "
          f"{args.runs}: with the dots / without (FASTPEFT_CPU_ISA=avx512)")
    with mock.patch.dict(os.environ):  # the setting is put back after
        for rows in args.rows:
            x = torch.randn(rows, d, dtype=torch.bfloat16, requires_grad=True)
            y = layer(x)
            dy = torch.randn_like(y)

            def backward(isa: str, y=y, dy=dy):
                def call():
                    os.environ["FASTPEFT_CPU_ISA"] = isa
                    y.backward(dy, retain_graph=True)
                return call

            t = time_interleaved({"dots": backward("auto"), "off": backward("avx512")},
                                 torch.device("cpu"), runs=args.runs)
            print(f"T={rows:<5d} {t['dots'].median_ms:8.2f} / {t['off'].median_ms:8.2f}")


if __name__ == "__main__":
    main()
