"""The benchmark harness itself (fastpeft.bench): records and their files, the summary,
--compare, missing peers, the CLI end to end. Tiny shapes, and no assertion on a timing."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fastpeft import reference
from fastpeft.bench import __main__ as cli
from fastpeft.bench import gated_prefix_attention, int8_lora_linear, lora_linear
from fastpeft.bench import model as model_bench
from fastpeft.bench.peers import peft_style_prompt_attention
from fastpeft.bench.report import Change, compare, summary_table
from fastpeft.bench.results import (
    COLUMNS,
    METRICS,
    ROLES,
    Record,
    ResultsFileError,
    append_csv,
    load,
    write_json,
)

CPU = torch.device("cpu")
COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _committed_op_sweeps() -> list:
    """The committed op-sweep runs (the whole-step runs, ``*-model-*``, are not)."""
    return [p for p in COMMITTED.glob("*.json") if "-model-" not in p.name]
TINY = ["--shapes", "tiny", "--runs", "2", "--no-progress", "--threads", "1"]


def run_cli(*argv: str, common: list[str] = TINY) -> tuple[int, str]:
    """``fastpeft-bench common argv``: its exit status and what it printed on stdout."""
    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            status = cli.main([*common, *argv])
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the process
    return status, out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of every op in every mode at the tiny shapes, saved under a temporary --out."""
    out_dir = tmp_path_factory.mktemp("bench-out")
    status, text = run_cli("--out", str(out_dir), "--modes", "forward", "backward", "full")
    return status, text, out_dir


def flat(text: str) -> str:
    """``text`` with every run of white space one space, as if never wrapped."""
    return " ".join(text.split())


def records_like(records: list[Record], factor: float, **changes: str) -> list[Record]:
    """``records`` with their values times ``factor`` and ``changes`` to their fields."""
    return [dataclasses.replace(r, value=r.value * factor, **changes) for r in records]


def test_cli_runs_every_op_and_saves_csv_and_json(tiny_run):
    status, text, out_dir = tiny_run
    assert status == 0
    for op in cli.CASES:
        assert op in text
    with (out_dir / "results.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == COLUMNS
    (run_json,) = out_dir.glob("*.json")
    records = load(run_json)
    assert records == load(out_dir / "results.csv")
    assert {r.op for r in records} == set(cli.CASES)
    assert {r.mode for r in records} == {"forward", "backward", "full"}
    assert {r.metric for r in records} <= set(METRICS)
    assert {r.role for r in records} <= set(ROLES)
    assert "peak_bytes" not in {r.metric for r in records}  # CUDA only
    assert {r.triton for r in records} != {""} and len({r.timestamp for r in records}) == 1
    run = json.loads(run_json.read_text())["run"]  # how the run was made
    assert run["argv"][0] == "fastpeft-bench" and "--out" in run["argv"]
    assert run["runs"] == 2 and run["warmup"] == 3 and run["commit"]
    assert set(run["versions"]) == {"peft", "transformers", "bitsandbytes"}
    # a VM's CPU model name is not enough to tell CPUs apart: the vector instructions too
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" in flags:
        (device,) = {r.device for r in records}
        assert re.fullmatch(r".+ \((AMX|AVX-512 BF16|AVX-512|AVX2), 1 threads\)", device)
    for op, shape in {(r.op, r.shape) for r in records}:
        # every (provider, mode) of a shape has the three timings and saved bytes; every
        # mode, but for a serving case, which is timed forward only (Case.modes)
        keys = {(r.provider, r.mode, r.metric) for r in records
                if (r.op, r.shape) == (op, shape)}
        providers = {p for p, _, _ in keys}
        modes = ("forward",) if "serving" in shape else ("forward", "backward", "full")
        assert {m for _, m, _ in keys} == set(modes)
        assert {(p, m, k) for p in providers for m in modes
                for k in ("median_ms", "p20_ms", "p80_ms", "saved_bytes")} <= keys


def test_summary_table_fits_100_columns(tiny_run):
    _, text, out_dir = tiny_run
    table = summary_table(load(out_dir / "results.csv"))
    assert table in text
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "peer: peft_style, floor: sdpa_causal" in table
    assert "peer: bnb+peft, floor: base" in table and "weights MB" in table


def test_csv_appends_under_one_header(tmp_path, tiny_run):
    records = load(next(tiny_run[2].glob("*.json")))[:5]
    path = tmp_path / "results.csv"
    append_csv(path, records)
    append_csv(path, records)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and lines.count(lines[0]) == 1
    assert load(path) == records + records


def test_json_round_trip(tmp_path, tiny_run):
    records = load(tiny_run[2] / "results.csv")
    write_json(tmp_path / "run.json", records)
    assert load(tmp_path / "run.json") == records


def test_load_rejects_what_is_not_results(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not fastpeft-bench results"):
        load(tmp_path / "other.csv")
    with pytest.raises(ValueError, match=r"\.json or \.csv"):
        load(tmp_path / "run.txt")


def test_compare_matches_fastpeft_medians_and_honours_threshold(tiny_run):
    # without p20/p80 the threshold alone judges (the spread rule: test_compare_judges_
    # beyond_the_runs_spread; a tiny run's 2 calls make no useful spread)
    records = [r for r in load(tiny_run[2] / "results.csv")
               if r.metric not in ("p20_ms", "p80_ms")]
    faster = [dataclasses.replace(r, value=r.value / 1.15) if r.role == "fastpeft" else r
              for r in records]
    comparison = compare(faster, records)
    n_medians = sum(r.role == "fastpeft" and r.metric == "median_ms" for r in records)
    assert len(comparison.changes) == n_medians and not comparison.skipped
    assert all(c.relative and c.change == pytest.approx(0.15) for c in comparison.changes)
    assert all(c.regressed(0.10) and not c.regressed(0.20) for c in comparison.changes)
    assert compare(records_like(records, 1.0, device="another GPU"), records).changes == []


def test_compare_takes_the_last_run_of_a_csv(tmp_path, tiny_run):
    records = load(tiny_run[2] / "results.csv")
    old = [dataclasses.replace(r, value=r.value * (1e-6 if r.role == "fastpeft" else 1),
                               timestamp="2020-01-01T00:00:00+00:00") for r in records]
    append_csv(tmp_path / "results.csv", old)  # an old run where fastpeft was far faster
    append_csv(tmp_path / "results.csv", records)  # then the same numbers
    comparison = compare(load(tmp_path / "results.csv"), records)
    assert comparison.changes and not comparison.regressions(0.01)


def test_change_is_relative_to_the_reference_of_its_own_run():
    key = ("op", "shape", "forward", "float32", "CPU (2 threads)")
    both_slower = Change(key, 2.0, 5.0, 4.0, 10.0)  # 2.5x each: fastpeft / reference holds
    assert both_slower.relative and both_slower.change == pytest.approx(0.0)
    alone = Change(key, 2.0, 3.0, 4.0, 4.0)  # fastpeft 1.5x slower, the reference not
    assert alone.change == pytest.approx(0.5) and alone.regressed(0.2)
    no_reference = Change(key, 2.0, 2.5, None, 4.0)  # falls back on the absolute time
    assert not no_reference.relative and no_reference.change == pytest.approx(0.25)


def synthetic_run(timestamp: str, fastpeft_ms: float, reference_ms: float | None, *,
                  device: str = "Test CPU (2 threads)", dtype: str = "float32",
                  modes: tuple[str, ...] = ("forward", "full"),
                  spread: tuple[float, float] | None = (0.9, 1.1)) -> list[Record]:
    """The records a lora_linear run would write, with made-up medians (peer and floor
    at fixed times); ``reference_ms=None``: a run without the reference. p20 and p80 are
    each median times ``spread``; ``spread=None``: none, as in a file without them."""
    times = {"fastpeft": fastpeft_ms, "reference": reference_ms, "peft": 30.0, "base": 8.0}
    roles = {"fastpeft": "fastpeft", "reference": "reference", "peft": "peer", "base": "floor"}
    factors = [("median_ms", 1.0)]
    if spread is not None:
        factors += [("p20_ms", spread[0]), ("p80_ms", spread[1])]
    return [Record(timestamp, "lora_linear", "T=512 in=2048 out=2048 r=16 p=0.1", 2**20,
                   provider, roles[provider], mode, metric, value * factor, dtype, device,
                   "2.13.0+cpu", "3.9.0", "0.1.0")
            for mode in modes for provider, value in times.items() if value is not None
            for metric, factor in factors]


def compare_files(tmp_path, old: list[Record], new: list[Record], *args: str,
                  suffixes: tuple[str, str] = (".json", ".json")) -> tuple[int, str]:
    """``fastpeft-bench --compare OLD NEW`` on two saved runs (nothing is timed)."""
    paths = [tmp_path / f"old{suffixes[0]}", tmp_path / f"new{suffixes[1]}"]
    for path, records in zip(paths, (old, new), strict=True):
        (write_json if path.suffix == ".json" else append_csv)(path, records)
    return run_cli("--compare", *map(str, paths), *args, common=[])


def test_compare_a_busy_machine_is_no_regression(tmp_path):
    """The issue's false alarm: the same code on a busy machine, fastpeft and the
    reference both 2.5x slower in the second run. Judged by their ratio: no regression."""
    old = synthetic_run("2026-01-01T00:00:00+00:00", 48.5, 60.0)
    busy = synthetic_run("2026-01-02T00:00:00+00:00", 48.5 * 2.5, 60.0 * 2.5)
    status, text = compare_files(tmp_path, old, busy)
    assert status == 0 and "REGRESSION" not in text
    assert "judged by fastpeft / reference in each run" in flat(text)
    assert "0 regression(s) in 2 matched measurement(s)" in text
    assert "121" in text and "150" in text  # the absolute medians, for information
    assert "forward+backward" in text


def test_compare_a_slowdown_of_fastpeft_alone_regresses(tmp_path):
    old = synthetic_run("2026-01-01T00:00:00+00:00", 48.5, 60.0)
    slower = synthetic_run("2026-01-02T00:00:00+00:00", 48.5 * 1.5, 60.0)
    status, text = compare_files(tmp_path, old, slower, "--threshold", "10")
    assert status == 1
    assert text.count("REGRESSION") == 2 and "+50.0%" in text
    assert compare_files(tmp_path, old, slower, "--threshold", "60")[0] == 0


def test_compare_judges_beyond_the_runs_spread(tmp_path):
    """A ratio worse by more than the threshold regresses only where the two runs'
    scatter cannot explain it: the ratio's range in the new run (fastpeft's p20 / the
    reference's p80 to p80 / p20) wholly above the old run's. Runs without p20/p80 (an
    older file): the threshold alone, as before."""
    old = synthetic_run("2026-01-01T00:00:00+00:00", 48.5, 60.0)  # p20/p80: median -10%/+10%
    later = "2026-01-02T00:00:00+00:00"
    # the same code on a loaded machine: both 2x slower, the ratio 15% worse by chance,
    # each provider's calls scattered -20%/+25% around its median
    noisy = synthetic_run(later, 48.5 * 2 * 1.15, 60.0 * 2, spread=(0.8, 1.25))
    for c in compare(old, noisy).changes:
        assert c.change == pytest.approx(0.15) and c.has_spread
        assert c.old_range == pytest.approx((48.5 / 60 * 0.9 / 1.1, 48.5 / 60 * 1.1 / 0.9))
        assert c.within_spread(0.10) and not c.regressed(0.10)
    status, text = compare_files(tmp_path, old, noisy)
    assert status == 0 and "REGRESSION" not in text and text.count("  in spread") == 2
    assert "0 regression(s) in 2 matched measurement(s)" in text
    assert "(overlapping)" in text and "beyond both runs' spread" in flat(text)
    # a real slowdown of fastpeft alone, 2x, under the same scatter: beyond it
    slow = synthetic_run(later, 48.5 * 2, 60.0, spread=(0.8, 1.25))
    assert all(c.beyond_spread and c.regressed(0.10) for c in compare(old, slow).changes)
    status, text = compare_files(tmp_path, old, slow)
    assert status == 1 and text.count("REGRESSION") == 2 and "(apart)" in text
    # a small move out of tight ranges is a regression too
    tight = [synthetic_run(t, ms, 60.0, spread=(0.99, 1.01))
             for t, ms in (("2026-01-01T00:00:00+00:00", 48.5), (later, 48.5 * 1.15))]
    assert compare_files(tmp_path, *tight)[0] == 1
    # no p20/p80 in either run: the threshold alone judges, and the table says so
    for bare in (synthetic_run("2026-01-01T00:00:00+00:00", 48.5, 60.0, spread=None),
                 [r for r in old if r.role == "reference" or r.metric == "median_ms"]):
        changes = compare(bare, noisy).changes
        assert changes and all(not c.has_spread and c.regressed(0.10) for c in changes)
        status, text = compare_files(tmp_path, bare, noisy)
        assert status == 1 and "+15.0%~" in text and "judged by the 10% threshold alone" in text


def test_compare_falls_back_on_absolute_times_without_a_reference(tmp_path):
    old = synthetic_run("2026-01-01T00:00:00+00:00", 10.0, None)
    new = synthetic_run("2026-01-02T00:00:00+00:00", 12.5, 50.0)
    status, text = compare_files(tmp_path, old, new, suffixes=(".csv", ".json"))
    assert status == 1 and "+25.0%*" in text
    assert "judged by fastpeft's own median" in flat(text)


def test_compare_skips_other_devices_dtypes_and_thread_counts(tmp_path):
    old = [*synthetic_run("2026-01-01T00:00:00+00:00", 1.0, 2.0, device="Test CPU (4 threads)"),
           *synthetic_run("2026-01-01T00:00:00+00:00", 1.0, 2.0, dtype="bfloat16")]
    new = synthetic_run("2026-01-02T00:00:00+00:00", 10.0, 2.0)
    comparison = compare(old, new)
    assert comparison.changes == []
    assert comparison.skipped == {"float32 on Test CPU (4 threads)": 2,
                                  "bfloat16 on Test CPU (2 threads)": 2}
    status, text = compare_files(tmp_path, old, new)
    assert status == 0 and "nothing compared" in text
    assert "float32 on Test CPU (4 threads) (2 measurements)" in flat(text)


@pytest.mark.parametrize("committed", _committed_op_sweeps(), ids=lambda p: p.name)
def test_compare_reads_the_committed_run(committed):
    """The format written by earlier versions of the harness still loads and compares."""
    records = load(committed)
    assert records and {r.op for r in records} <= set(cli.CASES)
    comparison = compare(records, records)
    assert comparison.changes and all(c.relative and c.change == 0 for c in comparison.changes)


@pytest.mark.parametrize(("factor", "expected"), [(1e-3, 1), (1e3, 0)])
def test_cli_compare_exit_status(tmp_path, tiny_run, factor, expected):
    """Against a baseline where fastpeft alone was a thousand times faster: a regression
    (exit 1); a thousand times slower: an improvement. A real (tiny) run."""
    baseline = tmp_path / "baseline.json"
    write_json(baseline, [dataclasses.replace(r, value=r.value * factor)
                          if r.role == "fastpeft" else r
                          for r in load(tiny_run[2] / "results.csv")])
    status, text = run_cli("--ops", "lora_linear", "--modes", "forward", "--no-save",
                           "--compare", str(baseline))
    assert status == expected
    assert ("REGRESSION" in text) == bool(expected)


def test_cli_compare_notes_when_nothing_matches(tmp_path, tiny_run):
    baseline = tmp_path / "baseline.csv"
    append_csv(baseline, records_like(load(tiny_run[2] / "results.csv"), 1e-6, dtype="bfloat16"))
    status, text = run_cli("--ops", "lora_linear", "--modes", "forward", "--no-save",
                           "--compare", str(baseline))
    assert status == 0 and "nothing compared" in text


BAD_FILES = {
    "missing.json": (None, "no such file"),
    "text.json": ("not json at all\n", "not JSON"),
    "object.json": ('{"a": 1}', 'no "records" list'),
    "empty.json": ('{"columns": [], "records": []}', "holds no records"),
    "partial.json": ('{"records": [{"op": "x"}]}', "record 1 has no timestamp"),
    "other.csv": ("a,b\n1,2\n", "no column timestamp"),
    "binary.csv": (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text file"),
    "run.txt": ("anything", "not a .json or .csv file"),
    "a-directory.json": ("dir", "a directory"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_cli_rejects_a_bad_compare_file_in_one_line(tmp_path, capsys, name):
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ResultsFileError, match=reason):
        load(path)
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--compare", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"fastpeft-bench: error: --compare {path}: ") and reason in err
    assert "expected a run's .json or a results.csv" in err


def test_cli_rejects_a_bad_value_and_a_third_compare_file(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    append_csv(path, synthetic_run("2026-01-01T00:00:00+00:00", 1.0, 2.0))
    path.write_text(path.read_text().replace("1048576", "many", 1))
    with pytest.raises(ResultsFileError, match="record 1: size 'many'"):
        load(path)
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--compare", str(path), str(path), str(path)])
    assert exc.value.code == 2 and "at most one NEW" in capsys.readouterr().err
    # two saved runs are compared, nothing measured: the measuring options are refused,
    # as are --quick with another sweep and no threads
    for argv, said in ((["--compare", str(path), str(path), "--runs", "5"],
                        "--runs: not with --compare OLD NEW"),
                       (["--compare", str(path), str(path), "--run", "5"],
                        "unrecognized arguments: --run"),  # no abbreviations
                       (["--quick", "--shapes", "tiny"], "not with --shapes tiny"),
                       (["--quick", "--shapes", "full"], "not with --shapes full"),
                       (["--threads", "0"], "--threads must be at least 1"),
                       (["--device", "gpu"], "--device: expected cpu or cuda"),
                       (["--device", "cpu:5"], "the CPU takes no index"),
                       (["--threshold", "5"], "--threshold: only with --compare"),
                       (["--compare", str(path), "--threshold", "nan"], "a percentage >= 0"),
                       (["--plot", "--no-save"], "not with --no-save"),
                       (["--out", str(path)], f"--out {path}: not a writable directory")):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(argv)
        assert exc.value.code == 2 and said in capsys.readouterr().err


def test_pytest_benchmark_suites_run_every_op():
    """``pytest benchmarks/ --benchmark-only`` collects a suite per op and runs it (tiny
    shapes, each test once: ``--benchmark-disable``)."""
    pytest.importorskip("pytest_benchmark")
    import subprocess

    suites = sorted(p.stem for p in COMMITTED.parent.glob("test_bench_*.py"))
    ops = {"lora_linear", "gated_prefix_attention", "bottleneck_adapter", "int8_lora_linear",
           "nf4_lora_linear", "multi_lora_linear"}
    assert suites == sorted(f"test_bench_{op}" for op in ops)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(COMMITTED.parent),
         "--benchmark-disable", "--bench-shapes", "tiny"],
        capture_output=True, text=True, timeout=600, cwd=COMMITTED.parents[1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\b\d+ passed", run.stdout)


def test_missing_peers_are_skipped_columns(monkeypatch):
    from fastpeft.bench import peers

    monkeypatch.setattr(peers, "_IMPORTED", {})  # forget the peers imported so far
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    case = lora_linear.build(lora_linear.TINY_SHAPES[0], torch.float32, CPU)
    assert "peft" not in case.providers and case.missing_peer
    case = int8_lora_linear.build(int8_lora_linear.TINY_SHAPES[0], torch.float32, CPU)
    assert "bnb+peft" not in case.providers and case.missing_peer
    status, text = run_cli("--ops", "lora_linear", "int8_lora_linear", "--modes", "forward",
                           "--no-save")
    assert status == 0
    assert text.count("peer skipped:") == 2
    assert "lora_linear: peft (not installed)" in text


def test_peft_style_peer_computes_the_op():
    shape = gated_prefix_attention.AttentionShape(2, 4, 2, 12, 8, prompt=3)  # GQA
    q = torch.randn(2, 4, 12, 8)
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    pk, pv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    gate = torch.rand(shape.heads)
    expected = reference.gated_prefix_attention(q, k, v, pk, pv, gate)
    torch.testing.assert_close(peft_style_prompt_attention(q, k, v, pk, pv, gate), expected)


def test_plot_needs_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--plot", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "needs matplotlib" in capsys.readouterr().err


def test_plot_writes_a_png_per_op(tmp_path, tiny_run):
    pytest.importorskip("matplotlib")
    from fastpeft.bench.report import plot_speedups

    paths = plot_speedups(load(tiny_run[2] / "results.csv"), tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"speedup-{op}.png" for op in cli.CASES)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_plot_of_one_shape_draws_bars_and_says_where_it_ran(tmp_path):
    """--quick: one shape per op, so grouped bars per mode, not a dot on a size axis."""
    pytest.importorskip("matplotlib")
    from fastpeft.bench.report import plot_speedups, speedup_figure

    records = synthetic_run("2026-01-01T00:00:00+00:00", 10.0, 20.0)
    fig = speedup_figure(records, "lora_linear")
    ax = fig.axes[0]
    assert "Test CPU (2 threads), float32, torch 2.13.0+cpu" in ax.get_title()
    assert legend_texts(fig) == ["vs reference", "vs peft (peer)"]
    assert ax.get_yscale() == "log" and not ax.get_lines()[1:]  # only the line at 1
    assert len(ax.containers) == 2 and all(len(bars) == 2 for bars in ax.containers)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["forward", "forward+backward"]
    (path,) = plot_speedups(records, tmp_path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_of_a_sweep_draws_lines_on_log_axes_where_sizes_span_10x(tmp_path):
    pytest.importorskip("matplotlib")
    from fastpeft.bench.report import speedup_figure

    records = load(COMMITTED / "cpu-epyc-2threads-fp32-20261122T132419Z.json")  # a full sweep
    fig = speedup_figure(records, "int8_lora_linear")  # T = 1 ... 512: sizes over 500x
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and not ax.containers
    assert "vs bnb+peft (peer), forward+backward" in legend_texts(fig)
    assert "AMD EPYC (2 threads), float32, torch 2.13.0+cpu" in ax.get_title()
    bottleneck = speedup_figure(records, "bottleneck_adapter")  # two shapes of one size
    assert bottleneck.axes[0].containers and "vs reference" in legend_texts(bottleneck)


def test_terminal_spells_forward_backward_and_explains_fp_floor(tiny_run):
    _, text, _ = tiny_run
    assert "  forward+backward " in text and "\n  full " not in text
    assert "below 1: fastpeft beats a floor that does less work" in text
    floor_beaten = [dataclasses.replace(r, value=r.value / 100) if r.role == "fastpeft" else r
                    for r in synthetic_run("2026-01-01T00:00:00+00:00", 10.0, 20.0)]
    table = summary_table([dataclasses.replace(r, op="int8_lora_linear") for r in floor_beaten])
    assert "  fp/floor < 1: the floor, the float nn.Linear, reads 2 or 4 bytes" in table
    assert "fp/floor < 1" not in summary_table(synthetic_run("2026-01-01T00:00:00+00:00",
                                                             10.0, 20.0))
    args = cli.parse_args(["--modes", "forward+backward", "forward", "full"])
    assert args.modes == ["full", "forward"]  # records keep the name full


def test_peer_imports_are_quiet_and_summarised_once(tmp_path, monkeypatch, capsys):
    """What a peer library prints, logs or warns at import is captured, not shown; a
    logging handler it makes meanwhile still writes to the real stderr afterwards."""
    from fastpeft.bench import peers

    (tmp_path / "noisy_peer_lib.py").write_text(
        "import logging, sys, warnings\n"
        "print('hello from stdout')\n"
        "print('Failed to load CPU gemm_4bit_forward from kernels-community: no', "
        "file=sys.stderr)\n"
        "logging.getLogger('noisy_peer_lib.sub').warning('a logged %s', 'warning')\n"
        "warnings.warn('a UserWarning')\n"
        "handler = logging.StreamHandler()\n"
        "logging.getLogger('noisy_peer_lib').addHandler(handler)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(peers, "_IMPORTED", {})
    monkeypatch.delitem(sys.modules, "noisy_peer_lib", raising=False)
    lib = peers.import_quietly("noisy_peer_lib")
    assert capsys.readouterr() == ("", "")
    assert set(lib.said) == {"hello from stdout", "a logged warning", "a UserWarning",
                             "Failed to load CPU gemm_4bit_forward from kernels-community: no"}
    described = lib.describe()
    assert "its optional CPU 4-bit kernel is unavailable, not used here" in described
    assert "said at import: hello from stdout" in described
    assert sys.modules["noisy_peer_lib"].handler.stream is sys.stderr
    assert peers.import_quietly("noisy_peer_lib") is lib  # once per process
    assert peers.import_quietly("no_such_peer_lib").describe() == "no_such_peer_lib (not installed)"


def test_progress_bar_is_optional(monkeypatch):
    assert isinstance(cli._progress_bar(3, disabled=True), cli._NoBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed
    bar = cli._progress_bar(3, disabled=False)
    assert isinstance(bar, cli._NoBar)
    bar.update()
    bar.close()


# --- --model: whole training steps --------------------------------------------------------

TINY_MODEL = ["--model", "--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "128",
              "--seq", "16", "--runs", "1", "--warmup", "0", "--no-progress", "--threads", "1"]
TINY_SHAPE = model_bench.ModelShape(hidden=64, layers=2, heads=4, vocab=128, seq=16)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """One --model run of every method on a tiny Llama, saved under a temporary --out."""
    out_dir = tmp_path_factory.mktemp("bench-model")
    status, text = run_cli("--out", str(out_dir), common=TINY_MODEL)
    return status, text, load(next(out_dir.glob("*.json")))


def test_model_runs_every_method_with_its_alternative_and_the_floor(model_run):
    status, text, records = model_run
    assert status == 0 and "MISMATCH" not in text
    assert {r.op for r in records} == set(model_bench.METHODS)
    assert {r.mode for r in records} == {"step"} and {r.shape for r in records} == {str(TINY_SHAPE)}
    assert {r.metric for r in records} <= set(METRICS) and {r.size for r in records} == {16}
    missing = model_bench.missing_alternatives(model_bench.METHODS)
    for method in model_bench.METHODS:
        values = {(r.role, r.metric): r.value for r in records if r.op == method}
        roles = {role for role, _ in values}
        alternative = "reference" if method == "bottleneck" else "peer"
        assert roles == {"fastpeft", "floor"} | ({alternative} if method not in missing else set())
        for role in roles:
            for metric in ("median_ms", "p20_ms", "p80_ms", "tokens_per_s", "trainable_params",
                           "loss"):
                assert (role, metric) in values, (method, role, metric)
            assert values[role, "tokens_per_s"] == pytest.approx(
                16 / values[role, "median_ms"] * 1e3)
            assert ((role, "held_bytes") in values) == (model_bench._heap_in_use() is not None)
        assert values["floor", "trainable_params"] == 1  # the floor's one scalar
        if method in missing:
            continue
        assert values["fastpeft", "trainable_params"] == values[alternative, "trainable_params"]
        # the check: same loss and gradients, and adapters that move the loss
        assert values["fastpeft", "loss_delta"] <= values["fastpeft", "loss_tol"]
        assert values["fastpeft", "grad_error"] <= values["fastpeft", "grad_tol"]
        assert values["fastpeft", "loss_delta"] == pytest.approx(
            abs(values["fastpeft", "loss"] - values[alternative, "loss"]))
        assert abs(values["fastpeft", "loss"] - values["floor", "loss"]) \
            > values["fastpeft", "loss_tol"]
    floors = {r.value for r in records if r.role == "floor" and r.metric == "median_ms"}
    assert len(floors) == 1  # timed once, recorded under each method


def test_model_table(model_run):
    _, text, records = model_run
    table = model_bench.model_table(records)
    assert table in text and max(len(line) for line in table.splitlines()) <= 100
    assert str(TINY_SHAPE) in table and "tokens/s" in table and "held MB" in table
    for method in model_bench.METHODS:
        assert f"\n{method} " in table
    assert "\nfloor           frozen" in table
    verdicts = [line.split()[-1] for line in table.split("verdict\n")[1].splitlines()]
    assert len(verdicts) == len(model_bench.METHODS) and set(verdicts) <= {"ok", "alternative"}


def test_model_check_catches_a_different_computation(monkeypatch):
    """A fastpeft model that computes something else than PEFT's: the check says so (no
    CLI: the tiny models are built and checked directly)."""

    from_peft = model_bench.from_peft

    def off_by_a_little(peft_model):
        converted = from_peft(peft_model)
        weight = next(p for n, p in converted.named_parameters() if "lora_B" in n)
        with torch.no_grad():
            weight.mul_(1.5)  # one layer's adapter, scaled
        return converted

    monkeypatch.setattr(model_bench, "from_peft", off_by_a_little)
    _, (lora,) = model_bench.build(TINY_SHAPE, ["lora"], torch.float32, CPU)
    check = model_bench.check(lora, model_bench.batch(TINY_SHAPE, CPU), CPU)
    assert not check.ok and check.grad_error > check.grad_tol


class RecordingBar:
    """A progress bar that remembers what it was told."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.descriptions = total, 0, []

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_description(self, desc: str) -> None:
        self.descriptions.append(desc)

    def close(self) -> None: ...


def test_model_without_bitsandbytes_times_fastpeft_alone(monkeypatch):
    """The int8 method's alternative needs bitsandbytes: without it, fastpeft is timed
    alone (from inject(LoraConfig(base_dtype="int8"))); the progress bar ends full."""
    from fastpeft.bench import peers

    bars = []

    def progress_bar(total: int, disabled: bool, unit: str) -> RecordingBar:
        bars.append(RecordingBar(total))
        return bars[-1]

    monkeypatch.setattr(cli, "_progress_bar", progress_bar)
    monkeypatch.setattr(peers, "_IMPORTED", {})  # forget the peers imported so far
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    status, text = run_cli("--methods", "int8_lora", "--no-save", "--runs", "2",
                           common=TINY_MODEL)
    assert status == 0
    assert "alternative skipped: int8_lora: bitsandbytes (not installed)" in text
    assert "no alternative" in text and "bnb+peft" not in text
    (bar,) = bars
    assert bar.done == bar.total == 2 * (2 + 0 + 2) + 1  # 2 models, 1 check
    assert "run 2/2: int8_lora fastpeft" in bar.descriptions


def test_model_options():
    args = cli.parse_args(["--model"])
    assert args.shape == model_bench.ModelShape() and args.shape.intermediate == 2816
    assert (args.runs, args.warmup, args.methods) == (10, 2, list(model_bench.METHODS))
    assert model_bench.ModelShape(hidden=4096).intermediate == 11008  # Llama 2 7B's
    assert cli.parse_args(["--model", "--kv-heads", "4"]).shape.kv_heads == 4
    with pytest.raises(ValueError, match="heads"):
        model_bench.ModelShape(hidden=64, heads=5)


@pytest.mark.parametrize("argv", [["--hidden", "64"], ["--methods", "lora"],
                                  ["--model", "--ops", "lora_linear"], ["--model", "--quick"],
                                  ["--model", "--heads", "5"], ["--model", "--runs", "0"],
                                  ["--model", "--compare", "old.json"]])
def test_model_options_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
