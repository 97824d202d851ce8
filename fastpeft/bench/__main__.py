"""fastpeft-bench (python -m fastpeft.bench): what the fused ops gain on this machine.

For each op and shape, every provider (fastpeft, the unfused reference, the peer library,
the floor) is timed side by side in one process. The run ends with a table of fastpeft's
speedups over the reference and the peer and its cost over the floor; its records are
appended to DIR/results.csv and written to DIR/<timestamp>.json (--out DIR).

Modes: forward, backward (replaying one retained graph) and full, printed as
forward+backward (one call of each; --modes takes either spelling, records say full).

--compare OLD judges fastpeft by its ratio to the reference timed in the same run, in OLD
and in this run, so load on the machine, which slows both, raises no alarm; a regression is
that ratio worse by more than --threshold and beyond the scatter both runs recorded (its
p20-p80 range in this run wholly above OLD's). --compare OLD NEW compares two saved runs
without running anything.

--model times whole training steps instead (forward, loss, backward, AdamW step,
zero_grad) of a Llama-shaped model built from a config, per method (--methods: LoRA on
every linear layer, LoRA on an int8 base, adaption prompt, Houlsby adapters), fastpeft
against PEFT (or the unfused composition) and the frozen model as the floor, after
checking that fastpeft's loss and gradients agree with the alternative's
(fastpeft.bench.model says how).

Exit status: 0; 1 when --compare finds a regression beyond --threshold; 2 for a usage
error or a --compare file that is not fastpeft-bench results; 3 when --model finds
fastpeft's loss or gradients disagreeing with the alternative's.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import NoReturn, Protocol

import torch

from . import (
    bottleneck_adapter,
    gated_prefix_attention,
    int8_lora_linear,
    lora_linear,
    model,
    multi_lora_linear,
    nf4_lora_linear,
)
from .peers import peer_libraries
from .report import BASIS, compare, compare_table, plot_speedups, rule, summary_table
from .results import (
    Environment,
    Record,
    ResultsFileError,
    append_csv,
    case_records,
    load,
    run_provenance,
    write_json,
)
from .runner import MODES, SWEEPS, default_device, default_dtype, run_case, shapes_for

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = {
    "bottleneck_adapter": bottleneck_adapter,
    "gated_prefix_attention": gated_prefix_attention,
    "int8_lora_linear": int8_lora_linear,
    "lora_linear": lora_linear,
    "multi_lora_linear": multi_lora_linear,
    "nf4_lora_linear": nf4_lora_linear,
}
FORWARD_BACKWARD = "forward+backward"  # --modes: the printed name of the mode full
QUICK_RUNS = 10  # --quick: the first shape of each op, 10 timed runs (all four ops in ~2 min)
MODEL_RUNS, MODEL_WARMUP = 10, 2  # --model: timed steps and warm-up rounds per provider
MISMATCH_STATUS = 3  # --model: fastpeft's check against the alternative failed
# --model's options: the model's shape (fastpeft.bench.model.ModelShape's fields)
SHAPE_OPTIONS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; ``--compare OLD [NEW]`` (argparse would say
    ``OLD [NEW ...]`` for the one-or-two files it takes)."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.dest == "compare":
            return "OLD [NEW]"
        return super()._format_args(action, default_metavar)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastpeft-bench", description=__doc__,
                                     formatter_class=_Formatter, allow_abbrev=False)
    parser.add_argument("--ops", nargs="+", choices=sorted(CASES), default=None,
                        metavar="OP", help="default: all of " + ", ".join(sorted(CASES)))
    parser.add_argument("--device", default=str(default_device()), help="default: %(default)s")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--modes", nargs="+", choices=[*MODES, FORWARD_BACKWARD],
                        default=None, metavar="MODE",
                        help="forward, backward, full (also spelled forward+backward: one "
                             "call of both); default: forward full")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed runs per provider (default 20; {QUICK_RUNS} with --quick, "
                             f"{MODEL_RUNS} steps with --model)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"warm-up rounds before the timed runs (default 3; {MODEL_WARMUP} "
                             f"steps with --model)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the first shape of each op, {QUICK_RUNS} runs: --shapes quick")
    parser.add_argument("--shapes", choices=SWEEPS, default=None,
                        help="the shape sweep (default: full); tiny: a smoke test, its "
                             "timings mean nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR",
                        help="append to DIR/results.csv, write DIR/<timestamp>.json "
                             "(default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="write no files")
    parser.add_argument("--plot", action="store_true",
                        help="a PNG chart of fastpeft's speedups per op in DIR: against "
                             "size, or bars for a single shape (needs matplotlib)")
    parser.add_argument("--compare", type=Path, nargs="+", default=None,
                        metavar=("OLD", "NEW"),
                        help="OLD: an earlier run's .json or a results.csv; report where "
                             "fastpeft / reference got worse than in OLD, exit 1 if "
                             "anywhere. With NEW (a saved run too) compare the two, run "
                             "nothing")
    parser.add_argument("--threshold", type=float, default=None, metavar="PCT",
                        help="--compare: fastpeft / reference worse by more than PCT "
                             "percent, and beyond both runs' p20-p80 spread, regresses "
                             "(default: 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    steps = parser.add_argument_group(
        "whole training steps", "--model: one optimizer step of a Llama-shaped model per "
        "method, fastpeft vs PEFT (or the unfused composition) vs the frozen model")
    steps.add_argument("--model", action="store_true",
                       help="time whole training steps instead of single ops")
    steps.add_argument("--methods", nargs="+", choices=model.METHODS, default=None,
                       metavar="METHOD", help="default: all of " + ", ".join(model.METHODS))
    defaults = model.ModelShape()
    for name, what in (("hidden", "hidden size"), ("layers", "decoder layers"),
                       ("heads", "attention heads"),
                       ("kv_heads", "key/value heads (default: --heads)"),
                       ("intermediate", "feed-forward size (default: Llama's, 8/3 hidden "
                                        "rounded up to a multiple of 256)"),
                       ("vocab", "vocabulary size"), ("seq", "tokens per sequence"),
                       ("batch", "sequences per step")):
        default = getattr(defaults, name)
        steps.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, metavar="N",
                           help=what if "default:" in what
                           else f"{what} (default: {default})")
    args = parser.parse_args(argv)
    _check_model_options(parser, args)
    if args.model:
        args.methods = args.methods or list(model.METHODS)
        try:
            args.shape = model.ModelShape(**{name: getattr(args, name) for name in SHAPE_OPTIONS
                                             if getattr(args, name) is not None})
        except ValueError as e:
            parser.error(f"--model: {e}")
        args.runs = MODEL_RUNS if args.runs is None else args.runs
        args.warmup = MODEL_WARMUP if args.warmup is None else args.warmup
    args.ops = args.ops or sorted(CASES)
    args.modes = list(dict.fromkeys("full" if m == FORWARD_BACKWARD else m
                                    for m in args.modes or ["forward", "full"]))
    if args.quick:
        if args.shapes not in (None, "quick"):
            parser.error(f"--quick is --shapes quick; not with --shapes {args.shapes}")
        args.shapes = "quick"
    args.shapes = args.shapes or "full"
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.runs is None:
        args.runs = QUICK_RUNS if args.shapes == "quick" else 20
    if args.warmup is None:
        args.warmup = 3
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    _check_device(parser, args.device)
    if args.plot and args.no_save:
        parser.error("--plot: writes its chart to the --out directory, not with --no-save")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib, or fastpeft[bench])")
    if args.threshold is not None and args.compare is None:
        parser.error("--threshold: only with --compare")
    args.threshold = 10.0 if args.threshold is None else args.threshold
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        parser.error(f"--threshold must be a percentage >= 0, got {args.threshold}")
    args.baseline = args.later = None
    if args.compare is not None:
        if len(args.compare) > 2:
            parser.error("--compare takes OLD and at most one NEW file")
        if len(args.compare) == 2:  # two saved runs: nothing is measured
            measuring = [flag for flag in ("--ops", "--runs", "--warmup", "--dtype",
                                           "--modes", "--quick", "--shapes", "--threads",
                                           "--device")
                         if any(a == flag or a.startswith(flag + "=")
                                for a in (sys.argv[1:] if argv is None else argv))]
            if measuring:
                parser.error(f"{', '.join(measuring)}: not with --compare OLD NEW, which "
                             f"compares two saved runs and measures nothing")
        try:  # read now: a bad file fails before the run, and --out may be the same CSV
            args.baseline = load(args.compare[0])
            args.later = load(args.compare[1]) if len(args.compare) == 2 else None
        except ResultsFileError as e:
            _file_error(parser, f"--compare {e}")
    if not args.no_save and args.later is None:  # checked before the run, not after it
        problem = _unwritable(args.out)
        if problem:
            _file_error(parser, f"--out {args.out}: {problem}")
    return args


def _unwritable(out: Path) -> str | None:
    """Why DIR cannot take the results (None: it can), without creating it: an existing
    file, or a nearest existing ancestor that is no writable directory."""
    if out.exists():
        return None if out.is_dir() and os.access(out, os.W_OK | os.X_OK) else \
            "not a writable directory"
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created in {parent}"
    return None


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """--device: cpu, or cuda[:index] of a GPU torch sees."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parser.error(f"--device: expected cpu or cuda[:index], got {device!r}")
    if parsed.type == "cpu" and parsed.index not in (None, 0):
        parser.error(f"--device {device}: the CPU takes no index (--threads sets its cores)")
    elif parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"--device {device}: torch sees no CUDA device")
        if parsed.index is not None and parsed.index >= count:
            parser.error(f"--device {device}: torch sees {count} CUDA device(s)")
    elif parsed.type != "cpu":
        parser.error(f"--device: expected cpu or cuda[:index], got {device!r}")


def _check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model's options only with --model, and none of the single-op ones with it."""
    model_only = [f"--{name.replace('_', '-')}" for name in ("methods", *SHAPE_OPTIONS)
                  if getattr(args, name) is not None]
    if model_only and not args.model:
        parser.error(f"{', '.join(model_only)}: only with --model")
    if args.model:
        op_only = [flag for flag, given in (("--ops", args.ops is not None),
                                            ("--modes", args.modes is not None),
                                            ("--quick", args.quick),
                                            ("--shapes", args.shapes is not None),
                                            ("--plot", args.plot),
                                            ("--compare", args.compare is not None)) if given]
        if op_only:
            parser.error(f"{', '.join(op_only)}: not with --model (whole steps have no ops, "
                         f"modes or shape sweeps, and --compare judges fastpeft by the "
                         f"unfused reference, which only the bottleneck method has)")
        if importlib.util.find_spec("transformers") is None:
            parser.error("--model needs transformers (pip install fastpeft[hf])")


def _file_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with status 2 and one line, as argparse does for a usage error, without the
    usage: the command line was right, the file is not."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = ["fastpeft-bench", *(sys.argv[1:] if argv is None else argv)]
    if args.later is not None:  # two saved runs: nothing to measure
        return _report_comparison(args.baseline, args.later, args.compare[0],
                                  args.threshold / 100)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = Environment.current(device, dtype)
    print(f"fastpeft-bench on {env.device}, {env.dtype}, torch {env.torch}, "
          f"triton {env.triton}, fastpeft {env.fastpeft}", flush=True)
    if args.model:
        return _main_model(args, env, device, dtype)
    peers = peer_libraries(name for op in args.ops for name in CASES[op].PEER_LIBRARIES)
    for peer in peers:
        print(f"peer {peer.describe()}", flush=True)

    plan = [(op, shape) for op in args.ops
            for shape in shapes_for(CASES[op], device, args.shapes)]
    records: list[Record] = []
    missing: dict[str, str] = {}  # op -> the peer it could not run
    bar = _progress_bar(len(plan) * len(args.modes), args.no_progress)
    for op, shape in plan:
        bar.set_description(f"{op} {shape}")
        case = CASES[op].build(shape, dtype, device)
        results = run_case(case, device, tuple(args.modes), runs=args.runs,
                           warmup=args.warmup, on_mode_done=lambda _: bar.update())
        records += case_records(env, op, case, shape, shape.size, results)
        if case.missing_peer:
            missing[op] = case.missing_peer
    bar.close()

    print()
    print(summary_table(records, [f"{op}: {peer}" for op, peer in missing.items()]))
    _save(args, env, records)
    if args.compare is not None:
        return _report_comparison(args.baseline, records, args.compare[0],
                                  args.threshold / 100)
    return 0


def _main_model(args: argparse.Namespace, env: Environment, device: torch.device,
                dtype: torch.dtype) -> int:
    """--model: whole training steps (fastpeft.bench.model), the table, the files."""
    for peer in peer_libraries(name for m in args.methods for name in model.NEEDS[m]):
        print(f"peer {peer.describe()}", flush=True)
    print(_wrap(f"model: {args.shape}; methods: {', '.join(args.methods)}; {args.warmup} "
                f"warm-up and {args.runs} timed steps per provider, interleaved"), flush=True)
    missing = model.missing_alternatives(args.methods)
    bar = _progress_bar(model.steps_in_run(args.methods, missing, args.warmup, args.runs),
                        args.no_progress, unit="step")
    try:
        result = model.run(env, args.shape, args.methods, dtype, device, warmup=args.warmup,
                           runs=args.runs, progress=bar)
    finally:
        bar.close()
    print()
    print(model.model_table(result.records, result.missing))
    _save(args, env, result.records)
    if result.mismatches:
        print(_wrap(f"\nMISMATCH: fastpeft's loss or gradients differ from the alternative's "
                    f"beyond tolerance for {', '.join(result.mismatches)}: these timings "
                    f"compare different computations."))
        return MISMATCH_STATUS
    return 0


def _save(args: argparse.Namespace, env: Environment, records: list[Record]) -> None:
    """Append ``records`` to DIR/results.csv and write DIR/<timestamp>.json (unless
    --no-save), and draw the charts --plot asks for; say where."""
    if args.no_save:
        return
    run_json = args.out / f"{env.run_name}.json"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        append_csv(args.out / "results.csv", records)
        write_json(run_json, records, run_provenance(args.argv, args.runs, args.warmup))
    except OSError as e:  # (the tables above keep the measurements)
        raise SystemExit(f"fastpeft-bench: error: --out {args.out}: {e}") from None
    print(f"\nresults: appended to {args.out / 'results.csv'}, written to {run_json}")
    if args.plot:
        for path in plot_speedups(records, args.out):
            print(f"chart: {path}")


def _report_comparison(baseline: list[Record], records: list[Record], path: Path,
                       threshold: float) -> int:
    """Print the comparison of ``records`` with ``baseline`` (read from ``path``); 1 if
    it finds a regression beyond ``threshold`` (a fraction), else 0."""
    comparison = compare(baseline, records)
    skipped = [f"{where} ({n} measurement{'s' * (n != 1)})"
               for where, n in comparison.skipped.items()]
    print()
    if skipped:
        print(_wrap(f"--compare: not compared, measured on another device, dtype or "
                    f"thread count in {path}: " + "; ".join(skipped)))
    if not comparison.changes:
        print(_wrap(f"--compare: no measurement of this run matches one in {path} "
                    "(same op, shape, mode, dtype and device); nothing compared."))
        return 0
    regressions = comparison.regressions(threshold)
    print(_wrap(f"--compare against {path}: {BASIS}. {rule(threshold)}. Medians in ms, "
                "for information."))
    print(compare_table(comparison, threshold))
    print(f"{len(regressions)} regression(s) in {len(comparison.changes)} matched "
          "measurement(s)")
    return 1 if regressions else 0


def _wrap(text: str) -> str:
    """``text`` in lines of at most 88 columns, paths unbroken."""
    return textwrap.fill(text, 88, break_long_words=False, break_on_hyphens=False)


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


def _progress_bar(total: int, disabled: bool, unit: str = "mode") -> _Bar:
    """tqdm on stderr when it is installed, stderr is a terminal and not ``disabled``;
    ``total`` ``unit``s."""
    if disabled or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit=unit, leave=False, dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
