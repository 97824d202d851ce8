"""The quantised layers over a sweep of row counts T, to see where the C++ paths cross over
(decode kernels at a few rows, dequantised tiles + GEMM past them): forward and
forward+backward of a training layer (r=16, dropout 0.1), median of a loop of calls (the
weight stays in cache as far as it fits; the harness, fastpeft-bench, flushes it).

    python benchmarks/rows_sweep.py --op nf4 --dtype bf16
    python benchmarks/rows_sweep.py --op int8 --rows 16 17 32 64

The constants these figures chose are in fastpeft/csrc/cpu/nf4_lora_linear.cpp
(kDecodeMaxRows, kDxDecodeMaxRows) and dequant_gemm.h (kLowpDxMinRows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastpeft

LAYERS = {"nf4": fastpeft.NF4LoRALinear, "int8": fastpeft.Int8LoRALinear}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# (this script times other trees too, through PYTHONPATH: it imports nothing of the
# harness that an older tree may lack)
def _median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=sorted(LAYERS), default="nf4")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 12, 16, 17, 32])
    parser.add_argument("--features", type=int, default=4096, help="in = out features")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, d = DTYPES[args.dtype], args.features
    layer = LAYERS[args.op].from_linear(torch.nn.Linear(d, d, dtype=dtype), r=16,
                                        lora_alpha=32, lora_dropout=0.1).train()
    print(f"{args.op} {d}x{d} {args.dtype}, {args.threads} threads; median ms of "
          f"{args.runs} calls: forward / forward+backward")
    for rows in args.rows:
        x = torch.randn(rows, d, dtype=dtype, requires_grad=True)
        forward = _median_ms(lambda x=x: layer(x), args.runs)
        full = _median_ms(lambda x=x: layer(x).sum().backward(), args.runs)
        print(f"T={rows:<5d} {forward:8.2f} / {full:8.2f}")


if __name__ == "__main__":
    main()
