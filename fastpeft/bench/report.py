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
    "nf4_lora_linear": "the floor, the float nn.Linear, reads 2 or 4 bytes per weight where "
                       "fastpeft reads half a byte (and a float32 scale per 64 weights)",
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
        role = r.provider if r.role == "other" else r.role  # others by their names
        case.providers[role] = r.provider
        case.values[role, r.mode, r.metric] = r.value
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
        for role in case.providers:  # further columns a case times (nf4's int8 op)
            if role not in ("fastpeft", "reference", "peer", "floor"):
                times = ", ".join(
                    f"{mode_label(mode)} {_num(case.values.get((role, mode, 'median_ms')))} ms "
                    f"({_ratio(case.values.get((role, mode, 'median_ms')), fp)} fastpeft's time)"
                    for mode, (fp, _, _, _) in zip(case.modes, medians, strict=True))
                lines += textwrap.wrap(f"{case.providers[role]}: {times}", 88,
                                       initial_indent="  ", subsequent_indent="    ")
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
Band = tuple[float, float]  # the 20th and 80th percentiles of one provider's calls, in ms

BASIS = ("judged by fastpeft / reference in each run (the reference is timed in the same "
         "run, interleaved with fastpeft, so a busy machine slows both and the ratio holds; "
         "a slowdown of fastpeft alone moves it)")


def rule(threshold: float) -> str:
    """What :meth:`Change.regressed` calls a regression, in words, for ``threshold``."""
    return (f"A regression: that ratio worse by more than {threshold:.0%} and beyond both "
            "runs' spread, its range in the new run (fastpeft's p20 / the reference's p80 "
            "to p80 / p20) wholly above its range in the old run; a move within the "
            "runs' own scatter is marked 'in spread', not counted")


@dataclass(frozen=True)
class Change:
    """One measurement in an earlier run (``old_*``) and in a later one (``new_*``):
    fastpeft's median and the reference's median of the same run, in ms, and where the
    runs recorded them their 20th and 80th percentiles (``*_band``). Judged by the ratio
    fastpeft / reference of each run; by fastpeft's own median where either run lacks the
    reference.

    A regression (:meth:`regressed`) is a change beyond the threshold that the runs'
    scatter does not explain: the judged quantity's range in the new run lies wholly above
    its range in the old one, a ratio's range going from fastpeft's p20 over the
    reference's p80 to fastpeft's p80 over the reference's p20 (the widest the two
    20-80% bands allow). Where a run has no percentiles (an older file), the threshold
    alone judges."""

    key: MatchKey
    old_ms: float
    new_ms: float
    old_ref_ms: float | None = None
    new_ref_ms: float | None = None
    old_band: Band | None = None
    new_band: Band | None = None
    old_ref_band: Band | None = None
    new_ref_band: Band | None = None

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

    def _range(self, band: Band | None, ref_band: Band | None) -> Band | None:
        if not self.relative:
            return band
        if band is None or ref_band is None or not ref_band[0]:
            return None
        return band[0] / ref_band[1], band[1] / ref_band[0]

    @property
    def old_range(self) -> Band | None:
        """The judged quantity's range in the earlier run (fastpeft / reference, or
        fastpeft's ms without a reference), or None where that run has no percentiles."""
        return self._range(self.old_band, self.old_ref_band)

    @property
    def new_range(self) -> Band | None:
        """As :attr:`old_range`, in the later run."""
        return self._range(self.new_band, self.new_ref_band)

    @property
    def has_spread(self) -> bool:
        """Whether both runs recorded the percentiles the spread rule needs."""
        return self.old_range is not None and self.new_range is not None

    @property
    def beyond_spread(self) -> bool:
        """The new range wholly above the old one (False without percentiles)."""
        old, new = self.old_range, self.new_range
        return old is not None and new is not None and new[0] > old[1]

    def regressed(self, threshold: float) -> bool:
        """Worse by more than ``threshold`` (a fraction: 0.1 is 10%) and, where both runs
        recorded their spread, beyond it."""
        return self.change > threshold and (self.beyond_spread or not self.has_spread)

    def within_spread(self, threshold: float) -> bool:
        """Worse by more than ``threshold`` but within the two runs' spread: no
        regression."""
        return self.change > threshold and self.has_spread and not self.beyond_spread


@dataclass
class Comparison:
    """What :func:`compare` found: the matched measurements, and the measurements of the
    earlier run left out because they were taken on another device, dtype or thread
    count (``skipped``: "dtype on device" -> how many)."""

    changes: list[Change] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def regressions(self, threshold: float) -> list[Change]:
        return [c for c in self.changes if c.regressed(threshold)]


_Run = dict[str, dict[str, float]]  # role -> metric -> value, of one run


def _latest_runs(records: Iterable[Record]) -> dict[MatchKey, _Run]:
    """Per measurement, the median and percentiles of fastpeft and of the reference
    (where measured) of the last run that has fastpeft's median, where the records hold
    several runs (an appended CSV, in file order)."""
    runs: dict[MatchKey, dict[str, _Run]] = {}  # key -> timestamp -> role -> metric -> value
    for r in records:
        if r.metric in ("median_ms", "p20_ms", "p80_ms") and r.role in ("fastpeft",
                                                                       "reference"):
            key = (r.op, r.shape, r.mode, r.dtype, r.device)
            by_role = runs.setdefault(key, {}).setdefault(r.timestamp, {})
            by_role.setdefault(r.role, {})[r.metric] = r.value
    latest = {}
    for key, by_run in runs.items():
        with_fp = [roles for roles in by_run.values()
                   if "median_ms" in roles.get("fastpeft", {})]
        if with_fp:
            latest[key] = with_fp[-1]
    return latest


def _median_and_band(run: _Run, role: str) -> tuple[float | None, Band | None]:
    metrics = run.get(role, {})
    band = ((metrics["p20_ms"], metrics["p80_ms"])
            if "p20_ms" in metrics and "p80_ms" in metrics else None)
    return metrics.get("median_ms"), band


def compare(baseline: Iterable[Record], current: Iterable[Record]) -> Comparison:
    """fastpeft's medians in ``current`` next to the same measurements (op, shape, mode,
    dtype and device) in ``baseline``, each with the reference's median of its own run
    and, where recorded, both providers' 20th and 80th percentiles; where either holds
    several runs (an appended CSV), the last one of each wins. Measurements of
    ``baseline`` whose op, shape and mode ``current`` has, but on another device or
    dtype, are counted in ``skipped``."""
    old, new = _latest_runs(baseline), _latest_runs(current)
    result = Comparison()
    for key, new_run in new.items():
        if key in old:
            old_ms, old_band = _median_and_band(old[key], "fastpeft")
            new_ms, new_band = _median_and_band(new_run, "fastpeft")
            old_ref, old_ref_band = _median_and_band(old[key], "reference")
            new_ref, new_ref_band = _median_and_band(new_run, "reference")
            result.changes.append(Change(key, old_ms, new_ms, old_ref, new_ref, old_band,
                                         new_band, old_ref_band, new_ref_band))
    measured = {key[:3] for key in new}
    for key in old:
        if key not in new and key[:3] in measured:
            where = f"{key[3]} on {key[4]}"
            result.skipped[where] = result.skipped.get(where, 0) + 1
    return result


def _range_text(band: Band | None) -> str:
    return "-" if band is None else f"{_num(band[0])}-{_num(band[1])}"


def compare_table(comparison: Comparison | Sequence[Change], threshold: float) -> str:
    """Per op and shape, one line per matched mode: fastpeft's and the reference's
    medians and their ratio in each run, and the change of that ratio; marked
    ``REGRESSION`` (see :meth:`Change.regressed`) or ``in spread`` (beyond ``threshold``,
    a fraction, but within the runs' scatter), either followed by a line with the ratio's
    p20-p80 range in each run. A change judged by fastpeft's own median (no reference in
    a run) is starred, one judged without percentiles (an older file) marked ``~``; both
    are explained under the table. 94 columns at most."""
    changes = comparison.changes if isinstance(comparison, Comparison) else list(comparison)
    lines = [f"  {'':<18}{'old run':^25}{'new run':^25}",
             f"  {'':<18}{'fp ms':>8}{'ref ms':>9}{'fp/ref':>8}{'fp ms':>8}{'ref ms':>9}"
             f"{'fp/ref':>8}{'change':>10}"]
    shown: tuple[str, str] | None = None
    for c in changes:
        if c.key[:2] != shown:
            shown = c.key[:2]
            lines.append(f"{c.key[0]}  {c.key[1]}")
        marks = ("" if c.relative else "*") + ("" if c.has_spread else "~")
        flag = ("  REGRESSION" if c.regressed(threshold) else
                "  in spread" if c.within_spread(threshold) else "")
        lines.append(f"  {mode_label(c.key[2]):<18}{_num(c.old_ms):>8}{_num(c.old_ref_ms):>9}"
                     f"{_num(c.old_ratio):>8}{_num(c.new_ms):>8}{_num(c.new_ref_ms):>9}"
                     f"{_num(c.new_ratio):>8}{c.change:>+9.1%}{marks:<2}{flag}")
        if flag and c.has_spread:
            what = "fp/ref" if c.relative else "fp ms"
            lines.append(f"    {what} p20-p80 range: old {_range_text(c.old_range)}, new "
                         f"{_range_text(c.new_range)}"
                         f" ({'apart' if c.beyond_spread else 'overlapping'})")
    if any(c.within_spread(threshold) for c in changes):
        lines.append(f"in spread: worse by more than {threshold:.0%}, but the two runs' "
                     "ranges overlap: within the\n  scatter of their calls, no regression "
                     "(a quieter machine narrows the ranges)")
    if any(not c.relative for c in changes):
        lines.append("* no reference median in one of the runs: judged by fastpeft's own "
                     "median,\n  which load on the machine moves as much as any change")
    if any(not c.has_spread for c in changes):
        lines.append(f"~ no p20/p80 in one of the runs: judged by the {threshold:.0%} "
                     "threshold alone")
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
