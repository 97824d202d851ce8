"""Launcher helpers shared by the Triton ops: configs, autotuning, precision flags and the
interpreter workarounds (``TRITON_INTERPRET=1`` runs the kernels on CPU tensors)."""

import os

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cfgs(interpreted: dict, gpu: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """One small config under the interpreter (fast CPU tests, no tuning); a handful of
    Hopper configs (meta, num_warps, num_stages) on a GPU."""
    if INTERPRET:
        return [triton.Config(interpreted)]
    return [triton.Config(m, num_warps=w, num_stages=s) for m, w, s in gpu]


def tuned(configs: list[triton.Config], key: list[str]):
    return lambda fn: triton.autotune(configs=configs, key=key)(fn)


def skip_launch(t: Tensor) -> bool:
    """Under the interpreter wrap_triton returns the kernel itself, which cannot run on
    fake tensors; skip the launches there so the op's function still serves as its fake
    (on a GPU, wrap_triton's traceable wrapper handles fake and traced tensors)."""
    return INTERPRET and is_fake(t)


def allow_tf32(dtype: torch.dtype) -> bool:
    """tl.dot precision flag: "ieee" for fp64, and for fp32 unless torch's own fp32 matmuls
    may use TF32; fp16/bf16 operands ignore it (passed as True, Triton's default)."""
    if dtype == torch.float64:
        return False
    return dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"


def size_bucket(n) -> int:
    """Power of two >= n (16 .. 65536): the eager autotune key for a row count, so
    variable sequence lengths reuse a tuned config instead of re-tuning for every n.
    A symbolic n (torch.compile, dynamic shapes) is passed through: Inductor tunes user
    kernels itself, and comparing it here would only add shape guards."""
    if isinstance(n, torch.SymInt):
        return n
    b = 16
    while b < n and b < 65536:
        b *= 2
    return b


def keep_opaque(mode, op, types, args, kwargs):
    """FunctionalTensorMode handler that keeps a triton_op opaque (see ``register_opaque``)."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def register_opaque(*ops) -> None:
    """Under the interpreter only: triton_op decomposes into its kernel launches under
    AOTDispatcher (torch.compile, opcheck), but interpreted kernels cannot be captured in
    a graph (wrap_triton hands them back unwrapped). Keep the ops opaque there instead:
    the graph calls the eager op, which runs the interpreter, and the fake path is the
    op's own function."""
    if INTERPRET:
        for op in ops:
            op.register_torch_dispatch(FunctionalTensorMode, keep_opaque)
