"""``fastpeft-bench`` / ``python -m fastpeft.bench``: what the fused ops gain on this machine.

For each op and shape, every provider (fastpeft, the unfused reference, the peer library,
the floor) is timed side by side in one process; the table reports medians and the
ratios fastpeft / floor and reference / fastpeft, plus autograd's saved bytes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import bottleneck_adapter, gated_prefix_attention, int8_lora_linear, lora_linear
from .runner import MODES, default_device, default_dtype, run_case, shapes_for

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = {
    "bottleneck_adapter": bottleneck_adapter,
    "gated_prefix_attention": gated_prefix_attention,
    "int8_lora_linear": int8_lora_linear,
    "lora_linear": lora_linear,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastpeft-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["forward", "full"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the first shape of each op only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"fastpeft-bench on {_device_name(device)}, {dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for op in args.ops:
        case = CASES[op]
        shapes = shapes_for(case, device)
        for shape in shapes[:1] if args.quick else shapes:
            bench_case = case.build(shape, dtype, device)
            results = run_case(bench_case, device, tuple(args.modes), runs=args.runs)
            _print_table(op, shape, results, bench_case.floor, bench_case.weight_bytes)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def _print_table(op: str, shape: object, results: list, floor_name: str,
                 weight_bytes: dict[str, int]) -> None:
    print(f"\n{op}  {shape}")
    if weight_bytes:
        print("  weights: " + ", ".join(f"{n} {b / 2**20:.1f} MB" for n, b in weight_bytes.items()))
    print(f"  {'mode':<9}{'provider':<13}{'median ms':>10}{'p20':>9}{'p80':>9}"
          f"{'vs floor':>9}{'vs ref':>8}{'saved MB':>10}")
    by_mode: dict[str, dict] = {}
    for r in results:
        by_mode.setdefault(r.mode, {})[r.provider] = r
    for mode, rows in by_mode.items():
        floor, ref = rows.get(floor_name), rows.get("reference")
        for name, r in rows.items():
            ratio = f"{r.timing.median_ms / floor.timing.median_ms:.2f}x" if floor else "-"
            vs_ref = f"{r.timing.median_ms / ref.timing.median_ms:.2f}x" if ref else "-"
            print(f"  {mode:<9}{name:<13}{r.timing.median_ms:>10.3f}{r.timing.p20_ms:>9.3f}"
                  f"{r.timing.p80_ms:>9.3f}{ratio:>9}{vs_ref:>8}{r.saved_bytes / 2**20:>10.2f}")


if __name__ == "__main__":
    sys.exit(main())
