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
import io
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .runner import Case, Result

# peak_bytes on CUDA only; weight_bytes where a case reports it (the int8 op). The rest
# are --model's (whole training steps, mode "step"; see fastpeft.bench.model): throughput,
# memory held after the forward, trainable parameters, the check's losses, differences and
# tolerances.
METRICS = ("median_ms", "p20_ms", "p80_ms", "saved_bytes", "peak_bytes", "weight_bytes",
           "tokens_per_s", "held_bytes", "trainable_params", "loss", "loss_delta", "loss_tol",
           "grad_error", "grad_tol")
# "other": a further provider a case times beside the four (nf4_lora_linear's int8 op)
ROLES = ("fastpeft", "reference", "peer", "floor", "other")


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
        """The same measurement in another run: op, shape, provider, mode, dtype and
        device (on a CPU the device names torch's thread count)."""
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
    """The GPU's name, or the CPU's model with its widest vector instructions and the
    number of torch threads: ``AMD EPYC (AVX-512 BF16, 2 threads)``. A VM's model name
    ("AMD EPYC") can stand for CPUs of different generations, which ``--compare`` must not
    take for one device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not flags:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = next((label for flag, label in _ISA_LABELS if flag in flags), None)
    return f"{name} ({isa + ', ' if isa else ''}{torch.get_num_threads()} threads)"


# /proc/cpuinfo flag -> label, widest first
_ISA_LABELS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
               ("avx2", "AVX2"))


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


def write_json(path: str | os.PathLike, records: Iterable[Record],
               run: dict | None = None) -> None:
    """One run's records as ``{"columns": [...], "run": {...}, "records": [{...}, ...]}``,
    a record a line; ``run`` (:func:`run_provenance`) says how the run was made (the
    records' own columns say where)."""
    lines = ",\n".join(json.dumps(dataclasses.asdict(r)) for r in records)
    head = f'{{"columns": {json.dumps(COLUMNS)},\n'
    if run is not None:
        head += f'"run": {json.dumps(run, sort_keys=True)},\n'
    Path(path).write_text(f'{head}"records": [\n{lines}\n]}}\n')


def run_provenance(argv: list[str], runs: int, warmup: int) -> dict:
    """How a run was made: its command line, timed runs and warm-ups per provider, the
    versions of the peer libraries and of Python, and the git commit of fastpeft's source
    tree (with ``-dirty`` for uncommitted changes; ``unknown`` outside a checkout)."""
    return {"argv": list(argv), "runs": runs, "warmup": warmup,
            "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("peft", "transformers", "bitsandbytes")},
            "commit": _git_commit()}


def _git_commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


class ResultsFileError(ValueError):
    """A file that :func:`load` cannot read as fastpeft-bench results. The message names
    the file, what is wrong with it and what was expected, on one line."""


EXPECTED = "a run's .json or a results.csv written by fastpeft-bench --out"


def load(path: str | os.PathLike) -> list[Record]:
    """Records from a ``.json`` written by :func:`write_json` or a ``.csv`` written by
    :func:`append_csv` (in file order: later runs after earlier ones). Every version of
    the harness has written these same columns; columns a file has beyond them are
    ignored. Raises :class:`ResultsFileError` for a file that is missing, unreadable,
    malformed or not fastpeft-bench results."""
    path = Path(path)
    if path.suffix not in (".json", ".csv"):
        raise ResultsFileError(f"{path}: not a .json or .csv file; expected {EXPECTED}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file; expected {EXPECTED}") from None
    except IsADirectoryError:
        raise ResultsFileError(f"{path}: a directory; expected {EXPECTED}") from None
    except UnicodeDecodeError:
        raise ResultsFileError(f"{path}: not a text file; expected {EXPECTED}") from None
    except OSError as e:
        raise ResultsFileError(f"{path}: cannot be read ({e.strerror}); expected "
                               f"{EXPECTED}") from None
    rows = _json_rows(path, text) if path.suffix == ".json" else _csv_rows(path, text)
    if not rows:
        raise ResultsFileError(f"{path}: holds no records; expected {EXPECTED}")
    return [_record(path, i, row) for i, row in enumerate(rows, 1)]


def _json_rows(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path}: not JSON ({e.msg} at line {e.lineno} column "
                               f"{e.colno}); expected {EXPECTED}") from None
    rows = data.get("records") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ResultsFileError(f'{path}: JSON but not fastpeft-bench results (no "records" '
                               f"list of objects); expected {EXPECTED}")
    return rows


def _csv_rows(path: Path, text: str) -> list[dict]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header, rows = reader.fieldnames or [], list(reader)
    except csv.Error as e:
        raise ResultsFileError(f"{path}: not CSV ({e}); expected {EXPECTED}") from None
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ResultsFileError(f"{path}: not fastpeft-bench results (no column "
                               f"{', '.join(missing[:3])}{more}); expected {EXPECTED}")
    return rows


def _record(path: Path, number: int, row: dict) -> Record:
    """Record ``number`` (from 1) of the file at ``path``."""
    missing = [name for name in COLUMNS if row.get(name) is None]
    if missing:
        raise ResultsFileError(f"{path}: record {number} has no {', '.join(missing)}; "
                               f"expected {EXPECTED}")
    values = {name: row[name] if name in ("size", "value") else str(row[name])
              for name in COLUMNS}
    try:
        values["size"], values["value"] = int(values["size"]), float(values["value"])
    except (TypeError, ValueError):
        raise ResultsFileError(f"{path}: record {number}: size {row['size']!r} or value "
                               f"{row['value']!r} is not a number; expected {EXPECTED}") from None
    return Record(**values)
