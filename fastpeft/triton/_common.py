"""Launcher helpers shared by the Triton ops: autotune configs, precision flags, block
sizes, the dropout arguments (``TRITON_INTERPRET=1`` runs the kernels on CPU tensors)."""

import torch
import triton
from torch import Tensor

from .._backend import TRITON_INTERPRET as INTERPRET
from ..reference import dropout_threshold


def cfgs(interpreted: dict, gpu: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """One small config under the interpreter (fast CPU tests, no tuning); a handful of
    Hopper configs (meta, num_warps, num_stages) on a GPU."""
    if INTERPRET:
        return [triton.Config(interpreted)]
    return [triton.Config(m, num_warps=w, num_stages=s) for m, w, s in gpu]


def tuned(configs: list[triton.Config], key: list[str], restore_value: list[str] | None = None):
    """triton.autotune over ``configs``, keyed by ``key``. A kernel that updates a tensor
    in place (reads and adds onto it) names that argument in ``restore_value``: the
    autotuner then restores it after each benchmarking run, so tuning does not add twice."""
    return lambda fn: triton.autotune(configs=configs, key=key, restore_value=restore_value)(fn)


def mnk(bm: int, bn: int, bk: int) -> dict:
    """Meta-parameters of a grouped-order GEMM tile (see ``_common_kernels.grouped_tile``)."""
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}


# The interpreter's GEMM tile (lora_linear and int8_lora_linear).
GEMM_INTERPRETED = mnk(16, 32, 32)


def allow_tf32(dtype: torch.dtype) -> bool:
    """tl.dot precision flag: "ieee" for fp64, and for fp32 unless torch's own fp32 matmuls
    may use TF32; fp16/bf16 operands ignore it (passed as True, Triton's default)."""
    if dtype == torch.float64:
        return False
    return dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "3.9.0+git1234"."""
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# Triton before 3.9 cannot compile an fp64 tl.dot whose operand is computed in registers
# (the int8 dequantised tile, the attention probabilities) for sm_90: its MMA lowering
# asserts "fp64 don't support largeK MMA" (checked with benchmarks/compile_check.py on
# 3.6, 3.7 and 3.8). The interpreter, and the ops whose dot operands come from memory
# (lora_linear, bottleneck_adapter), run fp64 on every version.
FP64_REGISTER_DOTS = _version(triton.__version__) >= (3, 9)


def check_fp64_register_dots(op: str, like: Tensor) -> None:
    """Refuse fp64 CUDA tensors for ``op``'s kernels on a Triton that cannot compile them,
    naming the way out, rather than fail inside Triton's compiler."""
    if like.dtype == torch.float64 and like.device.type == "cuda" and not FP64_REGISTER_DOTS:
        raise RuntimeError(
            f"fastpeft.{op}: float64 CUDA tensors need Triton >= 3.9 for the Triton kernels "
            f"(Triton {triton.__version__} cannot compile their fp64 matrix products for "
            "this GPU); use the unfused reference for float64 (fastpeft.use_backend("
            "'reference') or FASTPEFT_BACKEND=reference), or a newer Triton")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_block(n: int) -> int:
    """n padded to a power of two >= 16 (tl.dot's minimum dimension): a whole-dimension
    tile (LoRA rank, head dim, bottleneck width)."""
    return max(16, triton.next_power_of_2(n))


def size_bucket(n: int) -> int:
    """Power of two >= n (16 .. 65536): the autotune key for a row count, so variable
    sequence lengths reuse a tuned config instead of re-tuning for every n."""
    b = 16
    while b < n and b < 65536:
        b *= 2
    return b


def dropout_args(dropout_p: float, seed: Tensor | None, like: Tensor):
    """(has_dropout, seed tensor or a never-read placeholder, threshold, 1 / (1 - p)) of the
    seeded dropout mask (:mod:`._dropout`)."""
    if dropout_p == 0.0:
        return False, like, 0, 1.0
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed: expected an int64 1-element tensor when dropout_p > 0, got "
                         f"{None if seed is None else (seed.dtype, tuple(seed.shape))}")
    if seed.device != like.device:
        raise ValueError(f"seed: expected a tensor on {like.device}, got one on {seed.device}")
    threshold = dropout_threshold(dropout_p)
    return True, seed, threshold, 1.0 / (1.0 - dropout_p)


def in_place_epilogue_args(xa: Tensor, scaling: float, multi_r: bool) -> tuple[Tensor, float]:
    """(xa, scaling) for a GEMM epilogue that adds ``scaling * B @ xa^T`` to its
    accumulator. With many ranks (``MULTI_R``) the kernels add it in place as
    ``scaling * (acc / scaling + B @ xa^T)``, where ``acc / scaling`` overflows for a tiny
    ``scaling``: there, xa is scaled here instead (a (T, R) tensor) and the kernel takes 1."""
    if multi_r and scaling != 0.0 and abs(scaling) < 2.0 ** -24:
        return (xa.to(acc_dtype(xa.dtype)) * scaling).to(xa.dtype), 1.0
    return xa, scaling
