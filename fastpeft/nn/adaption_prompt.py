"""``AdaptionPrompt``: LLaMA-Adapter's learnable prompt with zero-initialised gating."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops._checks import check_float_dtype, check_positive_int
from ..ops.gated_prefix_attention import gated_prefix_attention

__all__ = ["AdaptionPrompt", "prompt_prefix"]


def prompt_prefix(prompt: Tensor, proj: nn.Module, num_kv_heads: int, head_dim: int,
                  name: str = "proj") -> Tensor:
    """A prompt ``(P, hidden)`` or ``(1, P, hidden)`` through a frozen k or v projection,
    as the ``(1, Hkv, P, D)`` prefix keys or values of :func:`gated_prefix_attention`;
    a projection of another width is refused (``name``: the argument it came from)."""
    p = proj(prompt)
    if p.shape[-1] != num_kv_heads * head_dim:
        raise ValueError(f"{name}: expected {num_kv_heads * head_dim} output features "
                         f"(num_kv_heads={num_kv_heads} x head_dim={head_dim}), got "
                         f"{p.shape[-1]}")
    return p.view(1, -1, num_kv_heads, head_dim).transpose(1, 2)


class AdaptionPrompt(nn.Module):
    """A learnable prompt attended to by every query through its own gated softmax.

    Owns the prompt ``(adapter_len, hidden_size)`` and the gate (zeros: per head
    ``(num_heads,)`` or one ``(1,)`` shared). Given an attention layer's projected
    ``q (B, H, M, D)``, ``k, v (B, Hkv, N, D)`` and its frozen key/value projections, it
    projects the prompt into ``prefix_k`` / ``prefix_v`` ``(1, Hkv, P, D)`` (no rotary
    embedding, as in LLaMA-Adapter and PEFT) and runs :func:`fastpeft.gated_prefix_attention`.
    With the gate at zero the output is exactly the layer's plain attention.

    Conventions: PEFT's ``adaption_prompt`` is ``gate="scalar", gate_tanh=False``; litgpt
    uses a per-head gate without tanh; the original LLaMA-Adapter a per-head gate with tanh.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        adapter_len: int = 10,
        gate: str = "per_head",
        gate_tanh: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size: {hidden_size} is not a multiple of "
                             f"num_heads={num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads: {num_kv_heads} must divide num_heads={num_heads}")
        check_positive_int("adapter_len", adapter_len)
        if gate not in ("per_head", "scalar"):
            raise ValueError(f"gate: expected 'per_head' or 'scalar', got {gate!r}")
        factory = {"device": device, "dtype": check_float_dtype("dtype", dtype)}
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.gate_tanh = gate_tanh
        self.prompt = nn.Parameter(torch.empty(adapter_len, hidden_size, **factory))
        self.gate = nn.Parameter(torch.empty(num_heads if gate == "per_head" else 1, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Prompt ~ N(0, 1) as in PEFT; gate zero so training starts from the base model."""
        nn.init.normal_(self.prompt)
        nn.init.zeros_(self.gate)

    def prefix(self, proj: nn.Module, name: str = "proj") -> Tensor:
        """The prompt through a frozen k or v projection: ``(1, Hkv, P, D)``; ``name``
        names ``proj`` in the error for a projection of another width than
        ``num_kv_heads * head_dim``."""
        return prompt_prefix(self.prompt, proj, self.num_kv_heads, self.head_dim, name)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_proj: nn.Module,
        v_proj: nn.Module,
        *,
        causal: bool = True,
        scale: float | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        return gated_prefix_attention(
            q, k, v, self.prefix(k_proj, "k_proj"), self.prefix(v_proj, "v_proj"), self.gate,
            causal=causal, scale=scale, gate_tanh=self.gate_tanh,
            key_padding_mask=key_padding_mask,
        )

    def extra_repr(self) -> str:
        p, h = self.prompt.shape
        return (f"adapter_len={p}, hidden_size={h}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, gate={tuple(self.gate.shape)}, "
                f"gate_tanh={self.gate_tanh}")
