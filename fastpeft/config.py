"""What :func:`fastpeft.inject` puts into a model: one config class per method.

The field names and meanings follow Hugging Face PEFT where PEFT has the method
(:class:`LoraConfig`, :class:`AdaptionPromptConfig`), so a config reads the same in both
libraries and :func:`fastpeft.save_adapter` can write PEFT's ``adapter_config.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .nn.bottleneck_adapter import ADAPTER_PRESETS
from .ops._checks import check_positive_int as _positive_int
from .reference import ACTIVATIONS

__all__ = ["AdaptionPromptConfig", "BottleneckConfig", "LoraConfig"]


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


@dataclass
class LoraConfig:
    """LoRA on the model's linear layers, with PEFT's meanings.

    Attributes:
        r: rank of every LoRA pair.
        lora_alpha: scaling numerator (``scaling = lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA branch input.
        target_modules: which linear layers (``nn.Linear``, ``Conv1D``) get LoRA: a list
            of names (a layer matches when its qualified name equals a name or ends with
            ``"." + name``), a string that is a regular expression matched against the
            whole qualified name, ``"all-linear"`` (every linear layer except the output
            layer ``lm_head``; on transformers 5 MoE models whatever PEFT's "all-linear"
            also adapts as parameters, see ``target_parameters``), or ``None``: PEFT's
            default targets for the model type (needs peft). ``[]`` adapts no layer (with
            ``target_parameters``). A name or regex that matches ``lm_head`` adapts it, as
            in PEFT (merged, a head tied to the input embeddings gets a weight of its own).
        target_parameters: parameters to adapt directly, as PEFT's ``target_parameters``:
            a parameter matches when its qualified name (``module.param``, e.g.
            ``model.layers.0.mlp.experts.gate_up_proj``) equals a name or ends with
            ``"." + name``. Meant for what is not a linear layer, like transformers 5's MoE
            experts (3-D ``gate_up_proj`` / ``down_proj``) and routers: they get PEFT's own
            ``ParamWrapper`` and its unfused forward (needs peft >= 0.17; one warning).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        base_dtype: ``None`` keeps the base layers as they are (:class:`fastpeft.LoRALinear`);
            ``"int8"`` quantises them to per-row int8 (:class:`fastpeft.Int8LoRALinear`);
            ``"nf4"`` to 4-bit NF4 in blocks of 64, bitsandbytes' QLoRA format
            (:class:`fastpeft.NF4LoRALinear`). bitsandbytes layers keep their format
            whatever it says: ``Linear8bitLt`` become ``Int8LoRALinear``, NF4 ``Linear4bit``
            ``NF4LoRALinear`` (sharing their codes). Layers transformers keeps unquantised
            (the model's ``_keep_in_fp32_modules``: T5's ``wo``) stay float
            ``LoRALinear``, with a note.
        rank_pattern, alpha_pattern: per-layer ``r`` / ``lora_alpha``, keyed by a regular
            expression that matches the end of a qualified name (PEFT's convention).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | tuple[str, ...] | str | None = ("q_proj", "v_proj")
    use_rslora: bool = False
    base_dtype: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        _positive_int("r", self.r)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {self.lora_dropout}")
        if not math.isfinite(float(self.lora_alpha)):
            raise ValueError(f"lora_alpha: expected a finite number, got {self.lora_alpha}")
        if self.base_dtype not in (None, "int8", "nf4"):
            raise ValueError(f"base_dtype: expected None, 'int8' or 'nf4', got "
                             f"{self.base_dtype!r}")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str):  # as PEFT: a list, never a regex
                raise TypeError(f"target_parameters: expected a list of names, got the "
                                f"string {self.target_parameters!r}")
            params = list(self.target_parameters)
            if not all(isinstance(n, str) and n for n in params):
                raise ValueError(f"target_parameters: expected non-empty names, got {params!r}")
            self.target_parameters = params or None
        if self.target_modules is None:
            pass  # resolved against the model by inject (PEFT's table)
        elif isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules: expected names, a regex or 'all-linear'")
        else:
            if not isinstance(self.target_modules, Iterable):
                raise TypeError(f"target_modules: expected a name, a list of names, a regex "
                                f"or 'all-linear', got {self.target_modules!r}")
            names = list(self.target_modules)
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"target_modules: expected non-empty names, got {names!r}")
            if not names and not self.target_parameters:
                raise ValueError("target_modules: [] adapts no layer, which only makes sense "
                                 "with target_parameters")
            self.target_modules = names
        for key, r in self.rank_pattern.items():
            _positive_int(f"rank_pattern[{key!r}]", r)

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of the layer with qualified name ``name`` (of a parameter
        target: the parameter's, ``module.param``, as PEFT)."""
        return (_pattern_value(self.rank_pattern, name, self.r),
                _pattern_value(self.alpha_pattern, name, self.lora_alpha))


def _pattern_value(pattern: dict, name: str, default):
    # PEFT: the first key whose regex matches the end of the name at a dot boundary
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class AdaptionPromptConfig:
    """LLaMA-Adapter's adaption prompt in the top ``adapter_layers`` attention layers.

    Works with Llama-style attention modules of ``transformers`` models (``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``, rotary embeddings, q/k norms; Llama, Mistral,
    Qwen, Gemma and their relatives) and GPT-2's, grouped-query attention and the KV cache
    included; which modules in each family: :mod:`fastpeft.placement`.

    Attributes:
        adapter_len: prompt tokens per adapted layer.
        adapter_layers: how many layers, counted from the top, get a prompt.
        gate: ``"scalar"`` (one gate per layer, as PEFT) or ``"per_head"``.
        gate_tanh: pass the gate through ``tanh`` (the original LLaMA-Adapter); PEFT and
            litgpt use the raw gate.

    PEFT's ``AdaptionPromptConfig`` is ``gate="scalar", gate_tanh=False`` (the defaults),
    and only that convention can be loaded by PEFT from :func:`fastpeft.save_adapter`.
    """

    adapter_len: int = 10
    adapter_layers: int = 1
    gate: str = "scalar"
    gate_tanh: bool = False

    def __post_init__(self) -> None:
        _positive_int("adapter_len", self.adapter_len)
        _positive_int("adapter_layers", self.adapter_layers)
        if self.gate not in ("scalar", "per_head"):
            raise ValueError(f"gate: expected 'scalar' or 'per_head', got {self.gate!r}")
        _bool("gate_tanh", self.gate_tanh)


@dataclass
class BottleneckConfig:
    """Bottleneck adapters in every transformer block (Houlsby or Pfeiffer placement).

    An adapter at a placement maps the sublayer's output ``o`` to
    ``o + scaling * up(act(down(LN?(o))))`` before the block's own residual addition:
    after the attention (``"attention"``) and/or after the feed-forward
    (``"feed_forward"``).

    Attributes:
        preset: ``"houlsby"`` (both placements, silu) or ``"pfeiffer"`` (feed-forward
            only, relu); fields left as ``None`` take the preset's value.
        placements, activation, reduction_factor, layer_norm: override the preset
            (``placements``: a tuple of them, or one as a str);
            ``bottleneck_size = hidden_size // reduction_factor`` (at least 1).
        scaling: multiplies the adapter branch.
        bottleneck_size: the adapters' inner size, if given (overrides
            ``reduction_factor``).
    """

    preset: str = "pfeiffer"
    placements: tuple[str, ...] | str | None = None
    activation: str | None = None
    reduction_factor: int | None = None
    layer_norm: bool | None = None
    scaling: float = 1.0
    bottleneck_size: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in ADAPTER_PRESETS:
            raise ValueError(f"preset: expected one of {sorted(ADAPTER_PRESETS)}, "
                             f"got {self.preset!r}")
        base = ADAPTER_PRESETS[self.preset]
        if self.placements is None:
            self.placements = base.placements
        if isinstance(self.placements, str):  # one placement
            self.placements = (self.placements,)
        self.placements = tuple(self.placements)
        bad = [p for p in self.placements if p not in ("attention", "feed_forward")]
        if bad or not self.placements or len(set(self.placements)) < len(self.placements):
            raise ValueError("placements: expected 'attention' and/or 'feed_forward' (each "
                             f"once), got {self.placements!r}")
        if self.activation is None:
            self.activation = base.activation
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.reduction_factor is None:
            self.reduction_factor = base.reduction_factor
        _positive_int("reduction_factor", self.reduction_factor)
        if self.layer_norm is None:
            self.layer_norm = base.layer_norm
        _bool("layer_norm", self.layer_norm)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise ValueError(f"scaling: expected a finite number, got {self.scaling!r}")
        if self.bottleneck_size is not None:
            _positive_int("bottleneck_size", self.bottleneck_size)

    def size_for(self, hidden_size: int) -> int:
        """The adapters' inner size in a model of ``hidden_size``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden_size // self.reduction_factor)
