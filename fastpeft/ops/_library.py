"""The ``fastpeft`` operator namespace: every op schema is declared here.

Each fused op exists as two registered operators with one schema:

* ``fastpeft::<op>`` / ``fastpeft::<op>_backward`` — the native kernels; the CPU
  implementation is C++ registered by ``fastpeft._C`` (``TORCH_LIBRARY_IMPL``);
* ``fastpeft::<op>_triton`` / ``fastpeft::<op>_backward_triton`` — the Triton kernels,
  declared with ``torch.library.triton_op`` in ``fastpeft/triton/`` (schema inferred from
  the same signature) so that ``torch.compile`` sees through them.

Forward ops return the output plus the small tensors the backward needs. Fake
implementations are registered on both variants by ``fastpeft/ops/<op>.py``, and so is
autograd, except on the native ops when ``fastpeft._C`` registers theirs in C++
(``csrc/autograd.cpp``: same formulas, a fraction of the per-call cost).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .. import _backend

lib = torch.library.Library("fastpeft", "DEF")

SCHEMAS = {
    # y (T, out) and xa = dropout(x) @ lora_A.T (T, r), saved for backward
    "lora_linear": (
        "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)"
    ),
    # (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
    "lora_linear_backward": (
        "lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, "
        "Tensor lora_B, Tensor xa, float scaling, float dropout_p, Tensor? seed, "
        "bool compute_dx) -> (Tensor, Tensor, Tensor)"
    ),
    # out (B, H, M, D); lse, prompt_lse (B, H, M) fp32 log-sum-exps of the two softmaxes
    # (lse = +inf for a row with no visible sequence key, so its probabilities are 0)
    "gated_prefix_attention": (
        "gated_prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
        "Tensor prefix_v, Tensor gate, Tensor? key_padding_mask, bool causal, float scale, "
        "bool gate_tanh) -> (Tensor, Tensor, Tensor)"
    ),
    # (dq, dk, dv, dprefix_k, dprefix_v, dgate)
    "gated_prefix_attention_backward": (
        "gated_prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor prefix_k, Tensor prefix_v, Tensor gate, Tensor? key_padding_mask, "
        "Tensor out, Tensor lse, Tensor prompt_lse, bool causal, float scale, "
        "bool gate_tanh) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # y (T, d); mean, rstd (T,) layer-norm statistics of x (empty when ln_weight is None),
    # float32 (float64 for float64 x). The (T, m) bottleneck is recomputed in backward.
    "bottleneck_adapter": (
        "bottleneck_adapter(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
        "Tensor? up_bias, Tensor? residual, Tensor? ln_weight, Tensor? ln_bias, "
        "str activation, float scaling, float ln_eps) -> (Tensor, Tensor, Tensor)"
    ),
    # (dx, d down_weight, d down_bias (m,), d up_weight, d up_bias (d,), d ln_weight,
    # d ln_bias); the last two are empty when ln_weight is None. dx includes grad_y when
    # the residual is x (residual_is_x); otherwise d residual = grad_y needs no kernel.
    "bottleneck_adapter_backward": (
        "bottleneck_adapter_backward(Tensor grad_y, Tensor x, Tensor down_weight, "
        "Tensor? down_bias, Tensor up_weight, Tensor? ln_weight, Tensor? ln_bias, "
        "Tensor mean, Tensor rstd, str activation, float scaling, bool residual_is_x) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # int8 weight-only base: weight = qweight (out, in) int8 * weight_scale (out,) fp32 per
    # row. y (T, out) and xa (T, r) as in lora_linear; the float weight is never built.
    "int8_lora_linear": (
        "int8_lora_linear(Tensor x, Tensor qweight, Tensor weight_scale, Tensor? bias, "
        "Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed) "
        "-> (Tensor, Tensor)"
    ),
    # (dx or an empty tensor when not compute_dx, d lora_A, d lora_B)
    "int8_lora_linear_backward": (
        "int8_lora_linear_backward(Tensor grad_y, Tensor x, Tensor qweight, "
        "Tensor weight_scale, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
        "float dropout_p, Tensor? seed, bool compute_dx) -> (Tensor, Tensor, Tensor)"
    ),
}

for _schema in SCHEMAS.values():
    lib.define(_schema)

# The compiled kernels register against these schemas; loading them here, before the op
# modules add their Python registrations, lets register_autograd see the C++ ones.
_backend.load_native()


def register_autograd(op: str, make_backward: Callable, setup_context: Callable) -> None:
    """Register autograd on ``fastpeft::<op>`` and, where Triton is installed, on
    ``fastpeft::<op>_triton`` (importing ``fastpeft.triton.<op>`` defines it): one
    ``setup_context``, and ``make_backward(backward_op)`` bound to each variant's own
    backward op. The native op keeps the autograd that ``fastpeft._C`` registers in C++
    (``csrc/autograd.cpp``), where it is built."""
    ops = torch.ops.fastpeft
    variants = [""]
    if _backend.TRITON_AVAILABLE:
        importlib.import_module(f"fastpeft.triton.{op}")
        variants.append("_triton")
    for suffix in variants:
        native = f"fastpeft::{op}"  # only _C registers an Autograd kernel on the native ops
        if not suffix and torch._C._dispatch_has_kernel_for_dispatch_key(native, "Autograd"):
            continue
        backward_op = getattr(ops, f"{op}_backward{suffix}").default
        torch.library.register_autograd(
            f"fastpeft::{op}{suffix}", make_backward(backward_op), setup_context=setup_context
        )
