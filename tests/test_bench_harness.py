"""The benchmark harness itself (fastpeft.bench): records and their files, the summary,
--compare, missing peers, the CLI end to end. Tiny shapes, and no assertion on a timing."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import sys

import pytest
import torch

from fastpeft import reference
from fastpeft.bench import __main__ as cli
from fastpeft.bench import gated_prefix_attention, int8_lora_linear, lora_linear
from fastpeft.bench.peers import peft_style_prompt_attention
from fastpeft.bench.report import Change, compare, summary_table
from fastpeft.bench.results import COLUMNS, METRICS, ROLES, Record, append_csv, load, write_json

CPU = torch.device("cpu")
TINY = ["--shapes", "tiny", "--runs", "2", "--no-progress", "--threads", "1"]


def run_cli(*argv: str) -> tuple[int, str]:
    """``fastpeft-bench argv``: its exit status and what it printed on stdout."""
    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            status = cli.main([*TINY, *argv])
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the process
    return status, out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of every op in every mode at the tiny shapes, saved under a temporary --out."""
    out_dir = tmp_path_factory.mktemp("bench-out")
    status, text = run_cli("--out", str(out_dir), "--modes", "forward", "backward", "full")
    return status, text, out_dir


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
    for op in cli.CASES:  # every (provider, mode) has the three timings and saved bytes
        keys = {(r.provider, r.mode, r.metric) for r in records if r.op == op}
        providers = {p for p, _, _ in keys}
        assert {(p, m, k) for p in providers for m in ("forward", "backward", "full")
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
    records = load(tiny_run[2] / "results.csv")
    changes = compare(records_like(records, 1 / 1.15), records)
    n_medians = sum(r.role == "fastpeft" and r.metric == "median_ms" for r in records)
    assert len(changes) == n_medians
    assert all(c.change == pytest.approx(0.15) for c in changes)
    assert all(c.regressed(0.10) and not c.regressed(0.20) for c in changes)
    assert not any(c.regressed(0.10) for c in compare(records_like(records, 2.0), records))
    assert compare(records_like(records, 1.0, device="another GPU"), records) == []


def test_compare_takes_the_last_run_of_a_csv(tmp_path, tiny_run):
    records = load(tiny_run[2] / "results.csv")
    append_csv(tmp_path / "results.csv", records_like(records, 1e-6))  # an old, fast run
    append_csv(tmp_path / "results.csv", records_like(records, 1.0))  # then the same numbers
    assert not any(c.regressed(0.01) for c in compare(load(tmp_path / "results.csv"), records))


def test_change_is_relative_to_the_old_median():
    change = Change(("op", "shape", "fastpeft", "forward", "float32", "CPU"), 2.0, 2.5)
    assert change.change == pytest.approx(0.25) and change.regressed(0.2)


@pytest.mark.parametrize(("factor", "expected"), [(1e-6, 1), (1e6, 0)])
def test_cli_compare_exit_status(tmp_path, tiny_run, factor, expected):
    """A baseline a million times faster is a regression (exit 1); slower, an improvement."""
    baseline = tmp_path / "baseline.json"
    write_json(baseline, records_like(load(tiny_run[2] / "results.csv"), factor))
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


def test_cli_rejects_a_bad_compare_file_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--compare", str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "--compare" in capsys.readouterr().err


def test_missing_peers_are_skipped_columns(monkeypatch):
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


def test_progress_bar_is_optional(monkeypatch):
    assert isinstance(cli._progress_bar(3, disabled=True), cli._NoBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed
    bar = cli._progress_bar(3, disabled=False)
    assert isinstance(bar, cli._NoBar)
    bar.update()
    bar.close()
