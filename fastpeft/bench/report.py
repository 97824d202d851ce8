"""What a run's records say: the summary table, the comparison with an earlier run, and the
speedup charts. Everything works from records alone, so it applies as well to a run just
measured as to one read back from ``results.csv`` or a JSON file.

Records keep the mode ``full`` (forward and backward in one timed call), as the CLI's
``--modes`` does; what is printed and drawn spells it ``forward+backward``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .results import Record

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MODE_LABELS = {"full": "forward+backward"}

LEGEND = """\
Medians in ms. ref/fp, peer/fp: fastpeft's speedup (> 1: fastpeft is faster).
fp/floor: fastpeft's time over the floor's, the layer without any adapter (1: the adapter
is free; below 1: fastpeft beats a floor that does less work, as noted under the table).
saved: bytes autograd keeps for backward (parameters excluded)."""

# Why fastpeft can beat an op's floor, printed under its table when it does.
FLOOR_NOTES = {
    "int8_lora_linear": "the floor, the float nn.Linear, reads 2 or 4 bytes per weight where "
                        "fastpeft reads 1",
    "gated_prefix_attention": "the floor is torch's causal SDPA (sdpa_causal) over the "
                              "sequence alone; fastpeft's kernel, attending to the sequence "
                              "and the prompt in one pass, outruns it",
}


def mode_label(mode: str) -> str:
    """How a mode is printed: ``full`` is ``forward+backward``."""
    return MODE_LABELS.get(mode, mode)


@dataclass
class _Case:
    """The records of one (op, shape), by role."""

    op: str
    shape: str
    providers: dict[str, str]  # role -> provider
    values: dict[tuple[str, str, str], float]  # (role, mode, metric) -> value
    modes: list[str]

    def get(self, mode: str, metric: str) -> list[float | None]:
        """``metric`` in ``mode`` of fastpeft, the reference, the peer and the floor."""
        return [self.values.get((role, mode, metric))
                for role in ("fastpeft", "reference", "peer", "floor")]


def _cases(records: Iterable[Record]) -> list[_Case]:
    cases: dict[tuple[str, str], _Case] = {}
    for r in records:
        case = cases.setdefault((r.op, r.shape), _Case(r.op, r.shape, {}, {}, []))
        case.providers[r.role] = r.provider
        case.values[r.role, r.mode, r.metric] = r.value
        if r.mode not in case.modes:
            case.modes.append(r.mode)
    return list(cases.values())


def _num(value: float | None) -> str:
    """Three significant digits: 0.0123, 1.79, 26.4, 188, 1880; 0 and "-" (no value)."""
    if not value:
        return "-" if value is None else "0"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "-"


def _mb(value: float | None) -> str:
    return _num(None if value is None else value / 2**20)


def summary_table(records: Iterable[Record], missing_peers: Sequence[str] = ()) -> str:
    """Per op and shape, one row per mode: the medians (ms) of fastpeft, the reference,
    the peer and the floor, with fastpeft's speedups and its cost over the floor; then
    the saved-for-backward MB, the weights' MB where recorded and, on CUDA, the peak MB of
    each mode. At most 94 columns wide (88 without peak rows)."""
    cases = _cases(records)
    labels = ["saved MB", "weights MB"]
    for case in cases:
        labels += [mode_label(mode) for mode in case.modes]
        labels += [f"peak MB {mode_label(mode)}" for mode in case.modes
                   if case.get(mode, "peak_bytes")[0] is not None]
    width = max(len(label) for label in labels) + 2
    head = (f"  {'':<{width}}{'fastpeft':>10}{'reference':>11}{'ref/fp':>8}{'peer':>10}"
            f"{'peer/fp':>9}{'floor':>10}{'fp/floor':>10}")
    lines = [LEGEND]
    lines += [f"peer skipped: {note}" for note in missing_peers]
    for case in cases:
        roles = case.providers
        lines += ["", f"{case.op}  {case.shape}",
                  f"  peer: {roles.get('peer', '-')}, floor: {roles.get('floor', '-')}", head]
        for mode in case.modes:
            fp, ref, peer, floor = case.get(mode, "median_ms")
            lines.append(f"  {mode_label(mode):<{width}}{_num(fp):>10}{_num(ref):>11}"
                         f"{_ratio(ref, fp):>8}{_num(peer):>10}{_ratio(peer, fp):>9}"
                         f"{_num(floor):>10}{_ratio(fp, floor):>10}")
        medians = [case.get(mode, "median_ms") for mode in case.modes]
        if any(fp is not None and floor and fp < floor for fp, _, _, floor in medians):
            note = FLOOR_NOTES.get(case.op, "fastpeft is faster than a floor that does less")
            lines += textwrap.wrap(f"fp/floor < 1: {note}", 88, initial_indent="  ",
                                   subsequent_indent="    ")
        rows = [("saved MB", case.modes[0], "saved_bytes")]
        if case.get(case.modes[0], "weight_bytes")[0] is not None:
            rows.append(("weights MB", case.modes[0], "weight_bytes"))
        rows += [(f"peak MB {mode_label(mode)}", mode, "peak_bytes") for mode in case.modes
                 if case.get(mode, "peak_bytes")[0] is not None]
        for label, mode, metric in rows:
            fp, ref, peer, floor = case.get(mode, metric)
            lines.append(f"  {label:<{width}}{_mb(fp):>10}{_mb(ref):>11}{'':>8}{_mb(peer):>10}"
                         f"{'':>9}{_mb(floor):>10}")
    return "\n".join(lines)


# --compare ---------------------------------------------------------------------------

# What --compare matches: the same op, shape and mode measured on the same device (which
# on a CPU names torch's thread count) in the same dtype.
MatchKey = tuple[str, str, str, str, str]  # (op, shape, mode, dtype, device)

BASIS = ("judged by fastpeft / reference in each run (the reference is timed in the same "
         "run, interleaved with fastpeft, so a busy machine slows both and the ratio holds; "
         "a slowdown of fastpeft alone moves it)")


@dataclass(frozen=True)
class Change:
    """One measurement in an earlier run (``old_*``) and in a later one (``new_*``):
    fastpeft's median and the reference's median of the same run, in ms. Judged by the
    ratio fastpeft / reference of each run; by fastpeft's own median where either run
    lacks the reference."""

    key: MatchKey
    old_ms: float
    new_ms: float
    old_ref_ms: float | None = None
    new_ref_ms: float | None = None

    @property
    def relative(self) -> bool:
        """Whether the change is judged against the reference (both runs have it)."""
        return bool(self.old_ref_ms) and bool(self.new_ref_ms)

    @property
    def old_ratio(self) -> float | None:
        """fastpeft / reference in the earlier run, or None without a reference."""
        return self.old_ms / self.old_ref_ms if self.old_ref_ms else None

    @property
    def new_ratio(self) -> float | None:
        """fastpeft / reference in the later run, or None without a reference."""
        return self.new_ms / self.new_ref_ms if self.new_ref_ms else None

    @property
    def change(self) -> float:
        """The relative change of what is judged: +0.25 is fastpeft 25% slower, relative
        to the reference where both runs have it, else in absolute time."""
        if self.old_ratio is not None and self.new_ratio is not None:
            return self.new_ratio / self.old_ratio - 1
        return self.new_ms / self.old_ms - 1

    def regressed(self, threshold: float) -> bool:
        """Worse by more than ``threshold`` (a fraction: 0.1 is 10%)."""
        return self.change > threshold


@dataclass
class Comparison:
    """What :func:`compare` found: the matched measurements, and the measurements of the
    earlier run left out because they were taken on another device, dtype or thread
    count (``skipped``: "dtype on device" -> how many)."""

    changes: list[Change] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def regressions(self, threshold: float) -> list[Change]:
        return [c for c in self.changes if c.regressed(threshold)]


def _latest_medians(records: Iterable[Record]) -> dict[MatchKey, tuple[float, float | None]]:
    """Per measurement, fastpeft's median and the reference's median of the same run (or
    None): of the last run that has fastpeft's, where the records hold several runs (an
    appended CSV, in file order)."""
    runs: dict[MatchKey, dict[str, dict[str, float]]] = {}  # key -> timestamp -> role -> ms
    for r in records:
        if r.metric == "median_ms" and r.role in ("fastpeft", "reference"):
            key = (r.op, r.shape, r.mode, r.dtype, r.device)
            runs.setdefault(key, {}).setdefault(r.timestamp, {})[r.role] = r.value
    latest = {}
    for key, by_run in runs.items():
        with_fp = [roles for roles in by_run.values() if "fastpeft" in roles]
        if with_fp:
            latest[key] = (with_fp[-1]["fastpeft"], with_fp[-1].get("reference"))
    return latest


def compare(baseline: Iterable[Record], current: Iterable[Record]) -> Comparison:
    """fastpeft's medians in ``current`` next to the same measurements (op, shape, mode,
    dtype and device) in ``baseline``, each with the reference's median of its own run;
    where either holds several runs (an appended CSV), the last one of each wins.
    Measurements of ``baseline`` whose op, shape and mode ``current`` has, but on another
    device or dtype, are counted in ``skipped``."""
    old, new = _latest_medians(baseline), _latest_medians(current)
    result = Comparison()
    for key, (new_ms, new_ref) in new.items():
        if key in old:
            old_ms, old_ref = old[key]
            result.changes.append(Change(key, old_ms, new_ms, old_ref, new_ref))
    measured = {key[:3] for key in new}
    for key in old:
        if key not in new and key[:3] in measured:
            where = f"{key[3]} on {key[4]}"
            result.skipped[where] = result.skipped.get(where, 0) + 1
    return result


def compare_table(comparison: Comparison | Sequence[Change], threshold: float) -> str:
    """Per op and shape, one line per matched mode: fastpeft's and the reference's
    medians and their ratio in each run, and the change of that ratio; marked
    ``REGRESSION`` beyond ``threshold`` (a fraction). A change judged by fastpeft's own
    median (no reference in a run) is starred and explained under the table. 92 columns
    at most."""
    changes = comparison.changes if isinstance(comparison, Comparison) else list(comparison)
    lines = [f"  {'':<18}{'old run':^25}{'new run':^25}",
             f"  {'':<18}{'fp ms':>8}{'ref ms':>9}{'fp/ref':>8}{'fp ms':>8}{'ref ms':>9}"
             f"{'fp/ref':>8}{'change':>10}"]
    shown: tuple[str, str] | None = None
    for c in changes:
        if c.key[:2] != shown:
            shown = c.key[:2]
            lines.append(f"{c.key[0]}  {c.key[1]}")
        star = "" if c.relative else "*"
        flag = "  REGRESSION" if c.regressed(threshold) else ""
        lines.append(f"  {mode_label(c.key[2]):<18}{_num(c.old_ms):>8}{_num(c.old_ref_ms):>9}"
                     f"{_num(c.old_ratio):>8}{_num(c.new_ms):>8}{_num(c.new_ref_ms):>9}"
                     f"{_num(c.new_ratio):>8}{c.change:>+9.1%}{star:<1}{flag}")
    if any(not c.relative for c in changes):
        lines.append("* no reference median in one of the runs: judged by fastpeft's own "
                     "median,\n  which load on the machine moves as much as any change")
    return "\n".join(line.rstrip() for line in lines)


# --plot -------------------------------------------------------------------------------

def plot_speedups(records: Iterable[Record], out_dir: Path) -> list[Path]:
    """One PNG per op, ``speedup-<op>.png`` in ``out_dir`` (see :func:`speedup_figure`).
    Needs matplotlib."""
    records = list(records)
    paths = []
    for op in dict.fromkeys(r.op for r in records):
        path = out_dir / f"speedup-{op}.png"
        speedup_figure(records, op).savefig(path, dpi=120)
        paths.append(path)
    return paths


def speedup_figure(records: Iterable[Record], op: str) -> Figure:
    """fastpeft's speedup on ``op`` over the reference and over the peer (named), per
    mode, on a log scale with 1 marked; the title names the device (with its threads on
    a CPU), dtype, torch and fastpeft. Where the op's shapes have distinct sizes, a line
    per (provider, mode) against the size of the main input, the size axis logarithmic
    where sizes span more than 10x; else (one shape, as with ``--quick``, or shapes of
    one size) grouped bars per shape and mode. Of records holding several runs, the last
    run's. Uses matplotlib's object API (no global backend)."""
    from matplotlib.figure import Figure

    records = [r for r in records if r.op == op]
    last = records[-1]
    records = [r for r in records if r.timestamp == last.timestamp]
    medians = {(r.role, r.shape, r.mode): r.value for r in records if r.metric == "median_ms"}
    names = {r.role: r.provider for r in records}
    sizes = {r.shape: r.size for r in records}
    modes = list(dict.fromkeys(r.mode for r in records))
    series = {}  # legend label -> {(shape, mode): speedup}
    for role in ("reference", "peer"):
        if role in names:
            label = f"vs {names[role]}" + (" (peer)" if role == "peer" else "")
            series[label] = {(s, m): medians[role, s, m] / medians["fastpeft", s, m]
                             for (ro, s, m) in medians
                             if ro == role and medians.get(("fastpeft", s, m))}

    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    if len(set(sizes.values())) == len(sizes) > 1:
        _speedup_lines(ax, series, sizes, modes)
    else:
        _speedup_bars(ax, series, list(sizes), modes)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("speedup of fastpeft (x, log scale; > 1: fastpeft faster)")
    ax.set_title(f"{op}: fastpeft's speedup\n{last.device}, {last.dtype}, torch {last.torch}, "
                 f"fastpeft {last.fastpeft}", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def _speedup_lines(ax: Axes, series: dict[str, dict[tuple[str, str], float]],
                   sizes: dict[str, int], modes: list[str]) -> None:
    styles = ["-", "--", ":", "-."]
    for color, (label, speedups) in zip(("C0", "C1"), series.items(), strict=False):
        for style, mode in zip(styles, modes, strict=False):
            points = sorted((sizes[s], v) for (s, m), v in speedups.items() if m == mode)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, linestyle=style,
                        label=f"{label}, {mode_label(mode)}")
    values = sorted(sizes.values())
    if values[-1] > 10 * values[0]:
        ax.set_xscale("log")
    ax.set_xlabel("elements of the main input" + (" (log scale)" if values[-1] > 10 * values[0]
                                                  else ""))


def _speedup_bars(ax: Axes, series: dict[str, dict[tuple[str, str], float]],
                  shapes: list[str], modes: list[str]) -> None:
    """Grouped bars, one group per (shape, mode), each bar from 1 to the speedup (down
    for a slowdown), its value written at its end."""
    groups = [(s, m) for s in shapes for m in modes]
    width = 0.8 / max(1, len(series))
    for i, (label, speedups) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [speedups.get(g, math.nan) - 1 for g in groups]
        bars = ax.bar(xs, heights, width, bottom=1.0, label=label)
        ax.bar_label(bars, labels=[f"{speedups[g]:.2f}x" if g in speedups else ""
                                   for g in groups], fontsize="small")
    if len(shapes) == 1:
        ticks = [mode_label(m) for _, m in groups]
    else:
        ticks = [textwrap.fill(s, 16) + "\n" + mode_label(m) for s, m in groups]
    ax.set_xticks(range(len(groups)), ticks, fontsize="small" if len(shapes) == 1
                  else "x-small")
    ax.set_xlabel(shapes[0] if len(shapes) == 1 else "shape, mode")
    ax.margins(y=0.15)


def _plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (0.5, 1, 2, 20), minor ticks labelled
    too where the axis spans under a decade or so."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
