"""fastpeft-bench (python -m fastpeft.bench): what the fused ops gain on this machine.

For each op and shape, every provider (fastpeft, the unfused reference, the peer library,
the floor) is timed side by side in one process. The run ends with a table of fastpeft's
speedups over the reference and the peer and its cost over the floor; its records are
appended to DIR/results.csv and written to DIR/<timestamp>.json (--out DIR).

Exit status: 0, or 1 when --compare finds a regression beyond --threshold.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Protocol

import torch

from . import bottleneck_adapter, gated_prefix_attention, int8_lora_linear, lora_linear
from .report import compare, compare_table, plot_speedups, summary_table
from .results import Environment, Record, append_csv, case_records, load, write_json
from .runner import MODES, SWEEPS, default_device, default_dtype, run_case, shapes_for

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = {
    "bottleneck_adapter": bottleneck_adapter,
    "gated_prefix_attention": gated_prefix_attention,
    "int8_lora_linear": int8_lora_linear,
    "lora_linear": lora_linear,
}
QUICK_RUNS = 10  # --quick: the first shape of each op, 10 timed runs (all four ops in ~2 min)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastpeft-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(CASES), default=sorted(CASES),
                        metavar="OP", help="default: all of " + ", ".join(sorted(CASES)))
    parser.add_argument("--device", default=str(default_device()), help="default: %(default)s")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["forward", "full"])
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed runs per provider (default 20; {QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the first shape of each op, {QUICK_RUNS} runs: --shapes quick")
    parser.add_argument("--shapes", choices=SWEEPS, default="full",
                        help="the shape sweep; tiny: a smoke test, its timings mean nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR",
                        help="append to DIR/results.csv, write DIR/<timestamp>.json "
                             "(default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="write no files")
    parser.add_argument("--plot", action="store_true",
                        help="PNG charts of speedup vs size per op in DIR (needs matplotlib)")
    parser.add_argument("--compare", type=Path, default=None, metavar="FILE",
                        help="an earlier run's .json or results .csv: report fastpeft's "
                             "regressions, exit 1 if any")
    parser.add_argument("--threshold", type=float, default=10.0, metavar="PCT",
                        help="--compare: a median slower by more than PCT percent regresses "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = "quick"
    if args.runs is None:
        args.runs = QUICK_RUNS if args.shapes == "quick" else 20
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    if args.plot and (args.no_save or importlib.util.find_spec("matplotlib") is None):
        parser.error("--plot needs matplotlib (pip install matplotlib, or fastpeft[bench]) "
                     "and an --out directory (not --no-save)")
    if args.compare is not None:
        try:  # read now: a bad file fails before the run, and --out may be the same CSV
            args.baseline = load(args.compare)
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--compare: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = Environment.current(device, dtype)
    print(f"fastpeft-bench on {env.device}, {env.dtype}, torch {env.torch}, "
          f"triton {env.triton}, fastpeft {env.fastpeft}", flush=True)

    plan = [(op, shape) for op in args.ops
            for shape in shapes_for(CASES[op], device, args.shapes)]
    records: list[Record] = []
    missing: dict[str, str] = {}  # op -> the peer it could not run
    bar = _progress_bar(len(plan) * len(args.modes), args.no_progress)
    for op, shape in plan:
        bar.set_description(f"{op} {shape}")
        case = CASES[op].build(shape, dtype, device)
        results = run_case(case, device, tuple(args.modes), runs=args.runs,
                           on_mode_done=lambda _: bar.update())
        records += case_records(env, op, case, shape, shape.size, results)
        if case.missing_peer:
            missing[op] = case.missing_peer
    bar.close()

    print()
    print(summary_table(records, [f"{op}: {peer}" for op, peer in missing.items()]))
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        run_json = args.out / f"{env.run_name}.json"
        append_csv(args.out / "results.csv", records)
        write_json(run_json, records)
        print(f"\nresults: appended to {args.out / 'results.csv'}, written to {run_json}")
        if args.plot:
            for path in plot_speedups(records, args.out):
                print(f"chart: {path}")
    if args.compare is not None:
        return _report_comparison(args.baseline, records, args.compare, args.threshold / 100)
    return 0


def _report_comparison(baseline: list[Record], records: list[Record], path: Path,
                       threshold: float) -> int:
    changes = compare(baseline, records)
    if not changes:
        print(f"\n--compare: no fastpeft median of this run matches one in {path} (same op, "
              "shape, mode, dtype and device); nothing compared.")
        return 0
    regressions = [c for c in changes if c.regressed(threshold)]
    print(f"\nfastpeft's medians against {path} (regression: slower by > {threshold:.0%})")
    print(compare_table(changes, threshold))
    print(f"{len(regressions)} regression(s) in {len(changes)} matched measurement(s)")
    return 1 if regressions else 0


class _Bar(Protocol):
    """What the CLI uses of a tqdm progress bar."""

    def update(self, n: int = 1) -> object: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


class _NoBar:
    """Stands in for tqdm when it is not installed or not wanted."""

    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress_bar(total: int, disabled: bool) -> _Bar:
    """tqdm on stderr when it is installed, stderr is a terminal and not ``disabled``."""
    if disabled or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="mode", leave=False, dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
