"""Argument checks shared by the public ops: each error names the argument and what
was expected, so a bad call fails in Python rather than inside a kernel."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    like: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Check ``t`` is a tensor of the given rank/shape (``None`` = any size) and, when
    ``like`` is given, of ``like``'s dtype (or ``dtype``) and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and any(
        e is not None and e != s for e, s in zip(shape, t.shape, strict=False)
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    want_dtype = dtype if dtype is not None else (like.dtype if like is not None else None)
    if want_dtype is not None and t.dtype != want_dtype:
        raise TypeError(f"{name}: expected dtype {want_dtype}, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got one on {t.device}")
    return t


def check_float_input(name: str, t: object) -> Tensor:
    """The activation that sets the call's dtype and device: fp32, fp16, bf16 (or fp64)."""
    t = check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32, float16, bfloat16 or float64, got {t.dtype}"
        )
    if t.dim() < 1:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    return t


def check_scalar(
    name: str,
    value: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    hi_inclusive: bool = True,
    lo_inclusive: bool = True,
) -> float:
    """A finite real number (a Python or NumPy int or float) within the bounds given (also
    a symbolic one, which ``torch.compile`` traces: ``dynamic=True``, or a scaling that
    changed between compiled calls)."""
    value = _from_numpy(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    if not -math.inf < v < math.inf:  # (NaN too; a comparison, which torch.compile traces)
        raise ValueError(f"{name}: expected a finite number, got {value}")
    too_low = lo is not None and (v < lo if lo_inclusive else v <= lo)
    too_high = hi is not None and (v > hi if hi_inclusive else v >= hi)
    if too_low or too_high:
        if lo is not None and hi is not None:
            rng = f"in {'[' if lo_inclusive else '('}{lo}, {hi}{']' if hi_inclusive else ')'}"
        elif lo is not None:
            rng = f"{'>=' if lo_inclusive else '>'} {lo}"
        else:
            rng = f"{'<=' if hi_inclusive else '<'} {hi}"
        raise ValueError(f"{name}: expected a value {rng}, got {value}")
    return v


def _from_numpy(value: object) -> object:
    """A 0-d NumPy array as a Python float, else ``value``: ``torch.compile`` traces a NumPy
    scalar (a ``numbers.Real`` in eager) as a 0-d ndarray, whose dtype it cannot read."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return value


def rows_of(x: Tensor) -> Tensor:
    """``x (..., d)`` as ``(rows, d)``. ``-1`` for the rows, not the product of the leading
    sizes, which would pin them to their values in ``torch.export`` with dynamic dims."""
    return x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(x.shape[:-1].numel(), 0)


def check_positive_int(name: str, value: object) -> int:
    """An int >= 1 (a sizes' or rank's check; bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """A flag: a bool (or the ints 0 / 1); a str such as ``"no"``, which is truthy, is
    refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r}")


def check_float_dtype(name: str, dtype: object) -> torch.dtype | None:
    """A floating-point ``torch.dtype`` (or None, for a default)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise TypeError(f"{name}: expected a floating-point torch.dtype, got {dtype!r}")


def check_same_dtype(tensors: Mapping[str, Tensor | None]) -> None:
    """All given tensors (``None`` skipped) share one dtype. The odd one out is named: the
    dtype most of them have is taken as intended (on a tie, the first one's)."""
    _check_same("dtype {}", "dtype {}", {n: t.dtype for n, t in tensors.items() if t is not None},
                TypeError)


def check_same_device(tensors: Mapping[str, Tensor | None]) -> None:
    """All given tensors (``None`` skipped) are on one device; the odd one out is named."""
    _check_same("a tensor on {}", "one on {}",
                {n: t.device for n, t in tensors.items() if t is not None}, ValueError)


def _check_same(expected: str, got: str, values: dict[str, object],
                error: type[Exception]) -> None:
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) < 2:
        return
    counts = {v: sum(1 for x in values.values() if x == v) for v in distinct}
    want = max(distinct, key=lambda v: counts[v])  # max keeps the first of equal counts
    odd = next(n for n, v in values.items() if v != want)
    agree = ", ".join(n for n, v in values.items() if v == want)
    raise error(f"{odd}: expected {expected.format(want)} (like {agree}), got "
                f"{got.format(values[odd])}")
