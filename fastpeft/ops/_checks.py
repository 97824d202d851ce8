"""Argument checks shared by the public ops: each error names the argument and what
was expected, so a bad call fails in Python rather than inside a kernel."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
) -> float:
    """A finite Python number within ``[lo, hi]`` (or ``[lo, hi)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    bad = not math.isfinite(v) or (lo is not None and v < lo)
    bad = bad or (hi is not None and (v > hi if hi_inclusive else v >= hi))
    if bad:
        rng = f"[{lo}, {hi}{']' if hi_inclusive else ')'}" if hi is not None else "finite"
        raise ValueError(f"{name}: expected a value in {rng}, got {value}")
    return v
