"""The results of a benchmark run as flat records, and their CSV and JSON files.

One :class:`Record` per (op, shape, provider, mode, metric), carrying the environment it
was measured in, so a row read back from ``results.csv`` months later still says what it
is. ``metric`` is one of :data:`METRICS`; times are milliseconds per call, sizes bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .runner import Case, Result

# peak_bytes on CUDA only; weight_bytes where a case reports it (the int8 op)
METRICS = ("median_ms", "p20_ms", "p80_ms", "saved_bytes", "peak_bytes", "weight_bytes")
ROLES = ("fastpeft", "reference", "peer", "floor")


@dataclass(frozen=True)
class Environment:
    """Where and with what a run was measured; ``timestamp`` (ISO 8601, UTC) names the run."""

    dtype: str  # "float32", "bfloat16", ...
    device: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC 7B13 (2 threads)", ...
    torch: str
    triton: str  # "none" when triton is not installed
    fastpeft: str
    timestamp: str

    @classmethod
    def current(cls, device: torch.device, dtype: torch.dtype) -> Environment:
        from .. import __version__

        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(str(dtype).removeprefix("torch."), device_name(device), torch.__version__,
                   _version("triton"), __version__, now)

    @property
    def run_name(self) -> str:
        """The timestamp as a file name: ``20261122T102406Z``."""
        return self.timestamp.replace("-", "").replace(":", "").removesuffix("+0000") + "Z"


@dataclass(frozen=True)
class Record:
    """One measured number. ``role`` says what the provider stands for in its case
    (fastpeft, reference, peer or floor); ``size`` is the element count of the op's main
    input, the x axis of ``--plot``. CSV columns follow the field order."""

    timestamp: str
    op: str
    shape: str
    size: int
    provider: str
    role: str
    mode: str
    metric: str
    value: float
    dtype: str
    device: str
    torch: str
    triton: str
    fastpeft: str

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """What ``--compare`` matches on: the same measurement in another run."""
        return (self.op, self.shape, self.provider, self.mode, self.dtype, self.device)


COLUMNS = tuple(f.name for f in dataclasses.fields(Record))


def case_records(env: Environment, op: str, case: Case, shape: object, size: int,
                 results: Iterable[Result]) -> list[Record]:
    """The records of one case's results: every metric of every (provider, mode)."""
    records = []
    for r in results:
        metrics = {"median_ms": r.timing.median_ms, "p20_ms": r.timing.p20_ms,
                   "p80_ms": r.timing.p80_ms, "saved_bytes": r.saved_bytes}
        if r.peak_bytes is not None:
            metrics["peak_bytes"] = r.peak_bytes
        if r.provider in case.weight_bytes:
            metrics["weight_bytes"] = case.weight_bytes[r.provider]
        records += [
            Record(env.timestamp, op, str(shape), size, r.provider, case.role(r.provider),
                   r.mode, metric, float(value), env.dtype, env.device, env.torch, env.triton,
                   env.fastpeft)
            for metric, value in metrics.items()
        ]
    return records


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def append_csv(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Append ``records`` to the CSV at ``path``, writing the header only when the file
    is new or empty."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in records)


def write_json(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """One run's records as ``{"columns": [...], "records": [{...}, ...]}``, a record a line."""
    lines = ",\n".join(json.dumps(dataclasses.asdict(r)) for r in records)
    Path(path).write_text(f'{{"columns": {json.dumps(COLUMNS)},\n"records": [\n{lines}\n]}}\n')


def load(path: str | os.PathLike) -> list[Record]:
    """Records from a ``.json`` written by :func:`write_json` or a ``.csv`` written by
    :func:`append_csv` (in file order: later runs after earlier ones)."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())["records"]
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: expected a .json or .csv file of fastpeft-bench results")
    missing = set(COLUMNS) - set(rows[0]) if rows else set()
    if missing:
        raise ValueError(f"{path}: not fastpeft-bench results (no {', '.join(sorted(missing))})")
    return [_record(row) for row in rows]


def _record(row: dict) -> Record:
    values = {name: row[name] for name in COLUMNS}
    values["size"], values["value"] = int(values["size"]), float(values["value"])
    return Record(**values)
