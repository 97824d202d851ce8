"""``BottleneckAdapter``: a Houlsby / Pfeiffer bottleneck adapter with its residual, fused."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops._checks import check_float_dtype, check_positive_int
from ..ops.bottleneck_adapter import ACTIVATIONS, bottleneck_adapter
from .lora_linear import autocast_dtype

__all__ = ["ADAPTER_PRESETS", "AdapterPreset", "BottleneckAdapter"]


@dataclass(frozen=True)
class AdapterPreset:
    """A common bottleneck-adapter configuration.

    Attributes:
        placements: where the adapters go in each transformer block: after the attention
            output (``"attention"``) and/or after the feed-forward (``"feed_forward"``).
        activation: the bottleneck's nonlinearity.
        reduction_factor: ``bottleneck_size = hidden_size // reduction_factor``.
        layer_norm: whether the adapter normalises its own input.
    """

    placements: tuple[str, ...]
    activation: str
    reduction_factor: int = 16
    layer_norm: bool = False


#: Houlsby et al. 2019: two adapters per block (after attention and after the
#: feed-forward), swish, reduction 16. Pfeiffer et al. 2020: one adapter after the
#: feed-forward, relu, reduction 16.
ADAPTER_PRESETS: dict[str, AdapterPreset] = {
    "houlsby": AdapterPreset(placements=("attention", "feed_forward"), activation="silu"),
    "pfeiffer": AdapterPreset(placements=("feed_forward",), activation="relu"),
}


class BottleneckAdapter(nn.Module):
    """``residual + scaling * up(act(down(LN(x))))``, computed by one fused op.

    ``residual`` defaults to ``x``. The up projection (weight and bias) starts at zero,
    so a fresh adapter is an exact identity and training starts from the base model.
    The down projection has ``nn.Linear``'s initialisation.

    Args:
        hidden_size: ``d``, the model's hidden size.
        bottleneck_size: ``m``, the adapter's inner size (>= 1).
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        layer_norm: normalise the adapter's input with its own ``LayerNorm`` (affine).
        scaling: multiplies the adapter branch.
        bias: give the two projections biases.
        ln_eps: the layer norm's epsilon.
        device, dtype: of the parameters.

    Parameters are ``down_weight (m, d)``, ``down_bias (m,)``, ``up_weight (d, m)``,
    ``up_bias (d,)`` and, with ``layer_norm``, ``ln_weight`` / ``ln_bias (d,)``.
    """

    #: set by :func:`fastpeft.inject`: ``"attention"`` or ``"feed_forward"``
    placement: str | None = None

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        activation: str = "relu",
        layer_norm: bool = False,
        scaling: float = 1.0,
        *,
        bias: bool = True,
        ln_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("bottleneck_size", bottleneck_size)):
            check_positive_int(name, value)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        factory = {"device": device, "dtype": check_float_dtype("dtype", dtype)}
        self.hidden_size = hidden_size
        self.bottleneck_size = bottleneck_size
        self.activation = activation
        self.scaling = float(scaling)
        self.ln_eps = float(ln_eps)
        d, m = hidden_size, bottleneck_size
        self.down_weight = nn.Parameter(torch.empty(m, d, **factory))
        self.up_weight = nn.Parameter(torch.empty(d, m, **factory))
        self.down_bias = nn.Parameter(torch.empty(m, **factory)) if bias else None
        self.up_bias = nn.Parameter(torch.empty(d, **factory)) if bias else None
        self.ln_weight = nn.Parameter(torch.empty(d, **factory)) if layer_norm else None
        self.ln_bias = nn.Parameter(torch.empty(d, **factory)) if layer_norm else None
        self.reset_parameters()

    @classmethod
    def from_preset(
        cls, preset: str | AdapterPreset, hidden_size: int, **kwargs
    ) -> BottleneckAdapter:
        """An adapter configured as ``"houlsby"`` or ``"pfeiffer"`` (or an
        :class:`AdapterPreset`); ``kwargs`` override the constructor's other arguments."""
        if isinstance(preset, str):
            if preset not in ADAPTER_PRESETS:
                raise ValueError(
                    f"preset: expected one of {tuple(ADAPTER_PRESETS)}, got {preset!r}"
                )
            preset = ADAPTER_PRESETS[preset]
        kwargs.setdefault("activation", preset.activation)
        kwargs.setdefault("layer_norm", preset.layer_norm)
        return cls(hidden_size, max(1, hidden_size // preset.reduction_factor), **kwargs)

    def reset_parameters(self) -> None:
        """Down projection as ``nn.Linear``; up projection zero (identity at start)."""
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        if self.down_bias is not None:
            bound = 1 / math.sqrt(self.hidden_size)
            nn.init.uniform_(self.down_bias, -bound, bound)
        nn.init.zeros_(self.up_weight)
        if self.up_bias is not None:
            nn.init.zeros_(self.up_bias)
        if self.ln_weight is not None:
            nn.init.ones_(self.ln_weight)
            nn.init.zeros_(self.ln_bias)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x``: ``(..., hidden_size)``; ``residual``: same shape, or ``None`` for ``x``.
        Under autocast (a Trainer's ``bf16=True`` / ``fp16=True``) the adapter computes in
        autocast's dtype, as its linear layers would unfused: ``x``, ``residual`` and the
        parameters are cast to it, and so is the result."""
        dtype = autocast_dtype(x)
        if dtype is None:
            return self._adapter(x, residual, None)
        with torch.autocast(x.device.type, enabled=False):
            return self._adapter(x.to(dtype), None if residual is None else residual.to(dtype),
                                 dtype)

    def _adapter(self, x: Tensor, residual: Tensor | None, dtype: torch.dtype | None) -> Tensor:
        def cast(p: Tensor | None) -> Tensor | None:
            return p if p is None or dtype is None else p.to(dtype)

        return bottleneck_adapter(
            x,
            cast(self.down_weight),
            cast(self.down_bias),
            cast(self.up_weight),
            cast(self.up_bias),
            activation=self.activation,
            residual=residual,
            scaling=self.scaling,
            ln_weight=cast(self.ln_weight),
            ln_bias=cast(self.ln_bias),
            ln_eps=self.ln_eps,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
            f"activation={self.activation!r}, layer_norm={self.ln_weight is not None}, "
            f"scaling={self.scaling}"
        )
