"""The LoRA branch's two C++ paths (csrc/cpu/cpu_path.h) against the number of rows: the
NF4 op (whose decode base is cheap at a few rows, so the branch shows) timed with
FASTPEFT_CPU_PATH=fused and =aten side by side, as fastpeft-bench times (interleaved,
caches flushed before each call), no gradient. Up to kFewRows (8) rows the forward runs
its few-rows kernels (dot products along the rows of A and B, lora_branch_kernels.h) on
every path but a forced aten, so there the columns compare those with ATen's GEMMs.

    python benchmarks/branch_path.py                       # 4096 -> 4096, fp32
    python benchmarks/branch_path.py --features 1024 --rows 1 4 16 64
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

import torch

from fastpeft.bench.timing import time_interleaved
from fastpeft.nn import NF4LoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=4096, help="in = out features")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, d = DTYPES[args.dtype], args.features
    layer = NF4LoRALinear.from_linear(torch.nn.Linear(d, d), args.rank, 2 * args.rank)
    layer = layer.to(dtype).eval().requires_grad_(False)
    weights = (layer.qweight, layer.absmax.float(), layer.bias, layer.lora_A.weight,
               layer.lora_B.weight, layer.scaling, 0.0, None, layer.blocksize)
    op = torch.ops.fastpeft.nf4_lora_linear.default

    def on(path, x):
        def call():
            os.environ["FASTPEFT_CPU_PATH"] = path  # read by the op at every call
            return op(x, *weights)
        return call

    print(f"nf4_lora_linear {d}x{d}, r={args.rank}, {args.dtype}, {args.threads} threads; "
          "median ms, caches flushed before each call")
    print(f"  {'rows':>5} {'fused':>8} {'aten':>8}")
    with mock.patch.dict(os.environ):  # the setting is put back after
        with torch.no_grad():
            for rows in args.rows:
                x = torch.randn(rows, d, dtype=dtype)
                t = time_interleaved({"fused": on("fused", x), "aten": on("aten", x)},
                                     torch.device("cpu"), runs=args.runs)
                print(f"  {rows:5d} {t['fused'].median_ms:8.3f} {t['aten'].median_ms:8.3f}")


if __name__ == "__main__":
    main()
