"""What a run's records say: the summary table, the comparison with an earlier run, and the
speedup charts. Everything works from records alone, so it applies as well to a run just
measured as to one read back from ``results.csv`` or a JSON file."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .results import Record

LEGEND = """\
Medians in ms. ref/fp, peer/fp: fastpeft's speedup (> 1: fastpeft is faster);
fp/floor: fastpeft's cost over the layer without any adapter (1: the adapter is free);
saved: bytes autograd keeps for backward (parameters excluded)."""


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
    each mode. 86 columns wide."""
    head = (f"  {'':<12}{'fastpeft':>10}{'reference':>11}{'ref/fp':>8}{'peer':>10}"
            f"{'peer/fp':>9}{'floor':>10}{'fp/floor':>10}")
    lines = [LEGEND]
    lines += [f"peer skipped: {note}" for note in missing_peers]
    for case in _cases(records):
        roles = case.providers
        lines += ["", f"{case.op}  {case.shape}",
                  f"  peer: {roles.get('peer', '-')}, floor: {roles.get('floor', '-')}", head]
        for mode in case.modes:
            fp, ref, peer, floor = case.get(mode, "median_ms")
            lines.append(f"  {mode:<12}{_num(fp):>10}{_num(ref):>11}{_ratio(ref, fp):>8}"
                         f"{_num(peer):>10}{_ratio(peer, fp):>9}{_num(floor):>10}"
                         f"{_ratio(fp, floor):>10}")
        rows = [("saved MB", case.modes[0], "saved_bytes")]
        if case.get(case.modes[0], "weight_bytes")[0] is not None:
            rows.append(("weights MB", case.modes[0], "weight_bytes"))
        rows += [(f"peak MB {mode}"[:12], mode, "peak_bytes") for mode in case.modes
                 if case.get(mode, "peak_bytes")[0] is not None]
        for label, mode, metric in rows:
            fp, ref, peer, floor = case.get(mode, metric)
            lines.append(f"  {label:<12}{_mb(fp):>10}{_mb(ref):>11}{'':>8}{_mb(peer):>10}"
                         f"{'':>9}{_mb(floor):>10}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Change:
    """fastpeft's median in an earlier run (``old_ms``) and in this one (``new_ms``)."""

    key: tuple[str, str, str, str, str, str]  # Record.key
    old_ms: float
    new_ms: float

    @property
    def change(self) -> float:
        """Relative change of the median: +0.25 is 25% slower."""
        return self.new_ms / self.old_ms - 1

    def regressed(self, threshold: float) -> bool:
        """Slower by more than ``threshold`` (a fraction: 0.1 is 10%)."""
        return self.change > threshold


def compare(baseline: Iterable[Record], current: Iterable[Record]) -> list[Change]:
    """fastpeft's medians in ``current`` next to the same measurements (same op, shape,
    provider, mode, dtype and device) in ``baseline``; where ``baseline`` holds several
    runs (an appended CSV), the last one of each wins."""
    old = {r.key: r.value for r in baseline
           if r.role == "fastpeft" and r.metric == "median_ms"}
    return [Change(r.key, old[r.key], r.value) for r in current
            if r.role == "fastpeft" and r.metric == "median_ms" and r.key in old]


def compare_table(changes: Sequence[Change], threshold: float) -> str:
    """One line per matched measurement, the regressions (slower by more than
    ``threshold``, a fraction) marked."""
    labels = [f"{c.key[0]}  {c.key[1]}" for c in changes]
    width = max(len(label) for label in [*labels, "op  shape"]) + 2
    lines = [f"  {'op  shape':<{width}}{'mode':<10}{'old ms':>8}{'new ms':>8}{'change':>9}"]
    for label, c in zip(labels, changes, strict=True):
        flag = "  REGRESSION" if c.regressed(threshold) else ""
        lines.append(f"  {label:<{width}}{c.key[3]:<10}{_num(c.old_ms):>8}"
                     f"{_num(c.new_ms):>8}{c.change:>+9.1%}{flag}")
    return "\n".join(lines)


def plot_speedups(records: Iterable[Record], out_dir: Path) -> list[Path]:
    """One PNG per op, ``speedup-<op>.png`` in ``out_dir``: fastpeft's speedup over the
    reference and over the peer against the size of the op's main input, one line per
    mode. Needs matplotlib (imported here, through its object API: no global backend)."""
    from matplotlib.figure import Figure

    records = list(records)
    paths = []
    for op in dict.fromkeys(r.op for r in records):
        medians: dict[tuple[str, str, int], float] = {}  # (role, mode, size) -> ms
        for r in records:
            if r.op == op and r.metric == "median_ms":
                medians[r.role, r.mode, r.size] = r.value
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for role in ("reference", "peer"):
            for mode in dict.fromkeys(m for _, m, _ in medians):
                sizes = sorted(s for ro, m, s in medians
                               if ro == role and m == mode and ("fastpeft", m, s) in medians)
                if sizes:
                    speedups = [medians[role, mode, s] / medians["fastpeft", mode, s]
                                for s in sizes]
                    ax.plot(sizes, speedups, marker="o", label=f"vs {role}, {mode}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xscale="log", xlabel="elements of the main input",
               ylabel="speedup of fastpeft (x)", title=op)
        ax.legend(fontsize="small")
        path = out_dir / f"speedup-{op}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths
