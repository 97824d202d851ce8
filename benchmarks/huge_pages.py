"""What transparent huge pages do for a decode step: the NF4 op at T = 1 with its codes in
fastpeft's huge-page memory (as ``quantize_nf4`` gives them on Linux) against the same
codes copied into torch's allocator (4 KiB pages), next to the fp32 ``F.linear`` on the
same layer. Timed as fastpeft-bench times (interleaved, caches flushed before each call),
one process; each NF4 call comes after an ``F.linear``, so neither finds the other's
absmax or adapters in a cache.

    python benchmarks/huge_pages.py
    python benchmarks/huge_pages.py --op int8 --features 2048
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.bench.timing import time_interleaved
from fastpeft.ops import _memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=("nf4", "int8"), default="nf4")
    parser.add_argument("--features", type=int, default=4096, help="in = out features")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not _memory.enabled():
        raise SystemExit("huge pages are off here (FASTPEFT_HUGE_PAGES=0, or no compiled "
                         "kernels on Linux): nothing to compare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, r = args.features, 16
    base = torch.nn.Linear(d, d).requires_grad_(False)
    a = (torch.randn(r, d) / d**0.5).requires_grad_()
    b = (torch.randn(d, r) * 0.02).requires_grad_()
    x = torch.randn(1, d, requires_grad=True)
    if args.op == "nf4":
        huge, scales = fastpeft.quantize_nf4(base.weight)

        def layer(codes):
            return fastpeft.nf4_lora_linear(x, codes, scales, base.bias, a, b, 2.0, 0.1)
    else:
        huge, scales = fastpeft.quantize_int8(base.weight)

        def layer(codes):
            return fastpeft.int8_lora_linear(x, codes, scales, base.bias, a, b, 2.0, 0.1)
    small = torch.empty_like(huge).copy_(huge)  # torch's allocator: 4 KiB pages
    if huge.untyped_storage().resizable():
        raise SystemExit(f"{tuple(huge.shape)} codes are under 2 MiB: not in huge pages")
    calls = {
        "F.linear": lambda: F.linear(x, base.weight, base.bias),
        "huge pages": lambda: layer(huge),
        "F.linear ": lambda: F.linear(x, base.weight, base.bias),
        "4 KiB pages": lambda: layer(small),
    }
    times = time_interleaved(calls, torch.device("cpu"), runs=args.runs)
    floor = (times["F.linear"].median_ms + times["F.linear "].median_ms) / 2
    print(f"{args.op} {d}x{d}, T=1, r={r}, p=0.1, fp32, {args.threads} threads; median ms, "
          f"caches flushed before each call")
    print(f"  fp32 F.linear   {floor:7.3f}")
    for name in ("huge pages", "4 KiB pages"):
        ms = times[name].median_ms
        print(f"  {name:14s}  {ms:7.3f}   {ms / floor:.3f} of F.linear")


if __name__ == "__main__":
    main()
