"""``AdaptedAttention``: a Llama-style or GPT-2 attention layer of a ``transformers`` model
with LLaMA-Adapter's gated adaption prompt, computed by the fused gated prefix attention."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import reference
from .._warn import warn_once
from ..ops._checks import check_float_dtype, check_positive_int
from ..ops.gated_prefix_attention import gated_prefix_attention
from ._kept import outside_inference_mode, weights_key
from .lora_linear import autocast_dtype

__all__ = ["AdaptedAttention", "compute_dtype"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# caches of transformers 4.x that hold a fixed number of slots without saying so
# (is_compileable False): Gemma2/3's default in generate() there
_FIXED_SIZE_CACHES = ("HybridCache", "HybridChunkedCache", "SlidingWindowCache")


class AdaptedAttention(nn.Module):
    """Wraps a Llama-style attention module (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, rotary embeddings, optional per-head or whole-projection q/k norms; Llama,
    Mistral, Qwen, Gemma, OLMo2 and their relatives in ``transformers``) and replaces its
    attention by :func:`fastpeft.gated_prefix_attention`: the sequence attention plus a
    gated, separately normalised attention over a learnable prompt, whose keys and values
    are the prompt through the layer's own k/v projections (and key norm), without
    rotary embeddings. A layer without positional embeddings (``use_rope`` false: the
    NoPE layers of SmolLM3) gets none on its queries and keys either, as in the model.

    A GPT-2 attention (``GPT2Attention``) is wrapped as PEFT does it: GPT-2's own
    attention runs (its cache, mask and ``c_proj``) and the gated prompt attention, fused,
    is added to its output after ``c_proj``, with the prompt's keys and values from
    ``c_attn``.

    The layout is PEFT's ``AdaptedAttention``: the wrapped layer is ``self.model`` and the
    trainable parameters are ``adaption_prompt (1, adapter_len, hidden_size)`` and
    ``adaption_gate`` (``(1,)`` or ``(num_heads,)``, zero so the layer starts as the plain
    attention), so state-dict keys are the same as PEFT's.

    The forward has the wrapped layer's signature (``hidden_states``,
    ``position_embeddings``, ``attention_mask``, and the cache as ``cache``,
    ``past_key_values`` or ``past_key_value``, whichever the installed transformers
    passes) and returns ``(output, None)`` (GPT-2: what its attention returns). It
    handles grouped-query attention natively and the KV cache
    (``generate()``, single-token decode included). The attention mask must be what
    ``transformers`` builds for causal language models: causal plus key padding (a 4D
    bool or additive mask, or ``None``), with the default dynamic cache; any other mask
    (packed sequences, the bidirectional image tokens of Gemma3's vision-language models)
    runs the unfused attention with exactly that mask. Sliding windows shorter than the
    keys, static caches, logit soft-capping, attention sinks, attention dropout and
    attention weights as an output are refused. A query whose sequence keys are all masked
    (a left-padding position) gets what the wrapped attention gives it besides the prompt
    part (:func:`keyless_rows`): eager attention's average of the masked keys; nothing from
    sdpa with a bool mask.

    Args:
        attn: the attention module to wrap (its parameters stay as they are).
        adapter_len: prompt tokens.
        gate: ``"scalar"`` (PEFT) or ``"per_head"``.
        gate_tanh: apply ``tanh`` to the gate (the original LLaMA-Adapter).
        adaption_prompt, adaption_gate: existing parameters to adopt (e.g. PEFT's) instead
            of creating new ones.
        dtype: of new parameters; default: that of ``q_proj``'s first floating parameter.
            Forward computes in the activations' dtype, casting the prompt and gate to it.
    """

    def __init__(
        self,
        attn: nn.Module,
        adapter_len: int = 10,
        gate: str = "scalar",
        gate_tanh: bool = False,
        *,
        adaption_prompt: nn.Parameter | None = None,
        adaption_gate: nn.Parameter | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(attn, AdaptedAttention):
            raise TypeError("attn: this attention layer already has an adaption prompt")
        config = getattr(attn, "config", None)
        self.gpt2 = _is_gpt2_attention(attn)
        if self.gpt2:
            if attn.is_cross_attention:
                raise NotImplementedError("attn: a GPT-2 cross-attention layer has no "
                                          "adaption prompt (PEFT's neither)")
            self.num_heads = self.num_kv_heads = int(attn.num_heads)
            self.head_dim = int(attn.head_dim)
            self.scaling = self.head_dim ** -0.5  # PEFT's, whatever GPT-2's own scale
            self.sliding_window = None
            proj = attn.c_attn
        else:
            self._check_llama_style(attn, config)
            self.rotary = _rotary_of(attn)
            self.num_heads = int(config.num_attention_heads)
            self.num_kv_heads = int(getattr(config, "num_key_value_heads", None)
                                    or self.num_heads)
            self.head_dim = int(attn.head_dim)
            self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
            self.sliding_window = _sliding_window(attn, config)
            self._arity = _result_arity(attn)
            proj = attn.q_proj
        self.model = attn
        self.gate_tanh = bool(gate_tanh)
        if gate not in ("scalar", "per_head"):
            raise ValueError(f"gate: expected 'scalar' or 'per_head', got {gate!r}")
        factory = {"device": next(attn.parameters()).device,
                   "dtype": check_float_dtype("dtype", dtype) or compute_dtype(proj)}
        hidden = int(attn.embed_dim if self.gpt2 else config.hidden_size)
        if adaption_prompt is None:
            check_positive_int("adapter_len", adapter_len)
            adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden, **factory))
        elif adaption_prompt.dim() != 3 or adaption_prompt.shape[0] != 1 \
                or adaption_prompt.shape[2] != hidden:
            raise ValueError(f"adaption_prompt: expected (1, P, {hidden}), got "
                             f"{tuple(adaption_prompt.shape)}")
        if adaption_gate is None:
            size = self.num_heads if gate == "per_head" else 1
            adaption_gate = nn.Parameter(torch.zeros(size, **factory))
        elif tuple(adaption_gate.shape) not in ((1,), (self.num_heads,)):
            raise ValueError(f"adaption_gate: expected (1,) or ({self.num_heads},), got "
                             f"{tuple(adaption_gate.shape)}")
        self.adaption_prompt = adaption_prompt
        self.adaption_gate = adaption_gate

    @staticmethod
    def _check_llama_style(attn: nn.Module, config) -> None:
        missing = [n for n in _PROJECTIONS if not isinstance(getattr(attn, n, None), nn.Module)]
        if missing or config is None or not hasattr(attn, "head_dim"):
            raise TypeError(
                f"attn: expected a Llama-style transformers attention module with "
                f"{', '.join(_PROJECTIONS)}, head_dim and config, or GPT-2's; "
                f"{type(attn).__name__} lacks {', '.join(missing) or 'config/head_dim'}")
        if getattr(config, "attention_dropout", 0.0):
            raise NotImplementedError(
                "attn: the model's attention_dropout is not supported by the fused attention")
        if getattr(config, "attn_logit_softcapping", None):
            raise NotImplementedError(
                "attn: the model caps its attention logits (attn_logit_softcapping), which "
                "the fused attention does not")
        # attention sinks (GPT-OSS, and families since): a learned logit per head, or one
        # projected per token (sink_proj), joins the softmax's denominator; the fused
        # attention's normalisation has no such column, so the output would differ
        if isinstance(getattr(attn, "sinks", None), Tensor) or \
                isinstance(getattr(attn, "sink_proj", None), nn.Module):
            raise NotImplementedError(
                f"attn: {type(attn).__name__} has attention sinks (an extra logit in the "
                f"softmax), which the fused attention does not support")

    @property
    def adapter_len(self) -> int:
        return self.adaption_prompt.shape[1]

    @property
    def layer_idx(self) -> int | None:
        return getattr(self.model, "layer_idx", None)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple:
        if self.gpt2:
            return self._forward_gpt2(hidden_states, *args, **kwargs)
        return self._forward_llama(hidden_states, *args, **kwargs)

    def _forward_gpt2(self, hidden_states: Tensor, *args, **kwargs) -> tuple:
        """PEFT's GPT-2 adaption prompt: GPT-2's own attention (its cache, mask and
        output projection), plus the gated prompt attention added after ``c_proj``."""
        if kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError("encoder_hidden_states: GPT-2 cross-attention has no "
                                      "adaption prompt")
        attn = self.model
        outputs = attn(hidden_states, *args, **kwargs)
        batch, m, embed = hidden_states.shape
        q = attn.c_attn(hidden_states)[..., :embed]
        q = q.view(batch, m, self.num_heads, self.head_dim).transpose(1, 2)
        prefix_k, prefix_v = self._prompt_keys_values(hidden_states)
        q, prefix_k, prefix_v = _in_compute_dtype(hidden_states, q, prefix_k, prefix_v)
        none = q.new_empty(batch, self.num_heads, 0, self.head_dim)  # no sequence keys
        out = gated_prefix_attention(
            q, none, none, prefix_k, prefix_v, self.adaption_gate.to(q.dtype),
            causal=False, scale=self.scaling, gate_tanh=self.gate_tanh)
        out = out.transpose(1, 2).reshape(batch, m, embed)
        return (outputs[0] + out, *outputs[1:])

    def _forward_llama(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        if kwargs.get("output_attentions"):
            raise NotImplementedError("output_attentions: the fused attention returns no "
                                      "attention weights")
        attn = self.model
        # NoPE layers (SmolLM3's every fourth, use_rope = 0) apply no rotary embedding
        use_rope = getattr(attn, "use_rope", True)
        if use_rope and position_embeddings is None:
            raise ValueError("position_embeddings: the (cos, sin) rotary tables are required "
                             "(transformers passes them to the attention layer)")
        batch, m = hidden_states.shape[:2]
        q = _heads(attn.q_proj(hidden_states), getattr(attn, "q_norm", None), self.head_dim)
        k = _heads(attn.k_proj(hidden_states), getattr(attn, "k_norm", None), self.head_dim)
        v = _heads(attn.v_proj(hidden_states), None, self.head_dim)
        if use_rope:
            cos, sin = position_embeddings
            q, k = self.rotary(q, k, cos, sin)
        past_key_values = _cache_argument(past_key_values, kwargs)
        if getattr(past_key_values, "is_compileable", False) or \
                type(past_key_values).__name__ in _FIXED_SIZE_CACHES:
            # a static cache holds max_cache_len slots, not the keys seen so far: the
            # bottom-right causal alignment of the fused attention would be wrong
            raise NotImplementedError(
                f"past_key_values: {type(past_key_values).__name__} is a static cache; the "
                f"fused attention needs the default dynamic cache")
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        n = k.shape[2]
        if self.sliding_window is not None and n > self.sliding_window:
            raise NotImplementedError(
                f"sliding_window: {n} keys exceed the model's sliding window of "
                f"{self.sliding_window}; the fused attention has no sliding window")
        pk, pv = self._prompt_keys_values(hidden_states)
        q, k, v, pk, pv = _in_compute_dtype(hidden_states, q, k, v, pk, pv)
        gate = self.adaption_gate.to(q.dtype)
        key_padding, visible = mask_parts(attention_mask, m, n)
        if visible is None:
            out = gated_prefix_attention(q, k, v, pk, pv, gate, causal=True,
                                         scale=self.scaling, gate_tanh=self.gate_tanh,
                                         key_padding_mask=key_padding)
            out = keyless_rows(out, q, k, v, attention_mask, key_padding, self.scaling)
        else:  # a mask the fused kernels do not take (packed sequences, bidirectional image
            # tokens): the unfused form, with exactly that mask, as transformers' attention
            # applies it; it holds the causal part already, and adding one would hide later
            # keys a query may see (Gemma3's image tokens see each other both ways)
            _warn_unfused_once()
            out = reference.gated_prefix_attention(q, k, v, pk, pv, gate, causal=False,
                                                   scale=self.scaling, gate_tanh=self.gate_tanh,
                                                   attn_mask=visible)
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, m, -1))
        residual_dropout = getattr(attn, "residual_dropout", 0.0)  # Starcoder2's, in training
        if residual_dropout and attn.training:
            out = nn.functional.dropout(out, residual_dropout, training=True)
        # as many results as the wrapped layer returns (some families in transformers 4.x
        # return the cache third): no attention weights, the cache updated in place
        return (out, None, past_key_values)[:self._arity]

    def _project_prompt(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """The prompt's keys and values ``(1, kv heads, P, head_dim)``: the layer's own
        projections (and key norm) of the prompt in the activations' dtype, no rotary."""
        attn = self.model
        prompt = self.adaption_prompt.to(hidden_states.dtype)
        if self.gpt2:
            embed = prompt.shape[-1]
            _, pk, pv = attn.c_attn(prompt).split(embed, dim=2)
            heads = (1, -1, self.num_heads, self.head_dim)
            return pk.view(heads).transpose(1, 2), pv.view(heads).transpose(1, 2)
        return (_heads(attn.k_proj(prompt), getattr(attn, "k_norm", None), self.head_dim),
                _heads(attn.v_proj(prompt), None, self.head_dim))

    def _prompt_keys_values(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_project_prompt`, kept between calls without gradients (generation
        projects the same prompt at every step, once per layer): kept under what they
        depend on, the data pointer, version, dtype, device, shape and strides of the
        prompt and of the projections' parameters and buffers, the activations' dtype and
        autocast's. Only where the projections are plain layers (``nn.Linear``, GPT-2's
        ``Conv1D``), whose output depends on nothing else (a LoRA layer on ``k_proj``
        depends on its scaling and dropout too)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._project_prompt(hidden_states)
        modules = self._prompt_modules()
        if modules is None:
            return self._project_prompt(hidden_states)
        tensors = [self.adaption_prompt, *(t for m in modules for t in m.parameters()),
                   *(t for m in modules for t in m.buffers())]
        weights = weights_key(tensors)
        if weights is None:  # inference tensors: no versions to tell a change by
            return self._project_prompt(hidden_states)
        key = (hidden_states.dtype, autocast_dtype(hidden_states), weights)
        kept = self.__dict__.get("_fastpeft_prompt_kv")
        if kept is not None and kept[0] == key:
            return kept[1]
        with outside_inference_mode():  # (inference tensors could not be saved later)
            keys_values = self._project_prompt(hidden_states)
        # the storages kept with the key: while they live no other tensor takes their
        # addresses, so an equal key is never a new tensor at an old address
        storages = tuple(t.untyped_storage() for t in tensors)
        self.__dict__["_fastpeft_prompt_kv"] = (key, keys_values, storages)
        return keys_values

    def _prompt_modules(self) -> list[nn.Module] | None:
        """The modules the prompt's projection runs, None where one of them is more than
        a plain linear layer (or norm without submodules)."""
        attn = self.model
        if self.gpt2:
            projections = [attn.c_attn]
            plain = type(attn.c_attn).__name__ == "Conv1D"
        else:
            projections = [attn.k_proj, attn.v_proj]
            plain = all(type(m) is nn.Linear for m in projections)
        norm = getattr(attn, "k_norm", None)
        if isinstance(norm, nn.Module) and not self.gpt2:
            plain = plain and next(norm.children(), None) is None
            projections.append(norm)
        return projections if plain else None

    def __getstate__(self) -> dict:
        # (the kept prompt keys and values are made again on the first call)
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_fastpeft_prompt_kv"}

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_fastpeft_prompt_kv", None)
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str):
        """Attributes the model code reads on its attention (``is_sliding``,
        ``layer_idx``, ...) come from the wrapped layer."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)

    def extra_repr(self) -> str:
        return (f"adapter_len={self.adapter_len}, gate={tuple(self.adaption_gate.shape)}, "
                f"gate_tanh={self.gate_tanh}")


def _heads(projected: Tensor, norm: nn.Module | None, head_dim: int) -> Tensor:
    """``(B, M, heads * head_dim)`` projections as ``(B, heads, M, head_dim)``, through
    the layer's q/k norm where it has one, as its weight's shape says: over the whole
    projection where the weight is ``(heads * head_dim,)`` (OLMo2), else per head on the
    ``(B, M, heads, head_dim)`` view, a weight ``(head_dim,)`` shared by the heads (Qwen3,
    Gemma3) or ``(heads, head_dim)``, one per head (Cohere's ``use_qk_norm``)."""
    weight = getattr(norm, "weight", None) if norm is not None else None
    if isinstance(weight, Tensor) and weight.shape[-1] != head_dim \
            and weight.numel() == projected.shape[-1]:
        projected = norm(projected)
        norm = None
    heads = projected.view(*projected.shape[:-1], -1, head_dim)
    if norm is not None:
        heads = norm(heads)
    return heads.transpose(1, 2)


def _in_compute_dtype(hidden_states: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The attention's operands in one dtype: autocast's under autocast (where the
    projections give its dtype and the rotary tables, in the hidden states' dtype, promote
    q and k back), else as they are (the model's own dtype)."""
    dtype = autocast_dtype(hidden_states)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) for t in tensors)


def _sliding_window(attn: nn.Module, config) -> int | None:
    """The layer's sliding window, None for full attention: the layer's own attribute
    where the family mixes full and sliding layers, else the config's (``layer_types``,
    ``use_sliding_window``, ``sliding_window``; 0 means none)."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        layer_types = getattr(config, "layer_types", None)
        idx = getattr(attn, "layer_idx", None)
        if layer_types is not None and idx is not None and idx < len(layer_types):
            sliding = layer_types[idx] == "sliding_attention"
        else:
            sliding = getattr(config, "use_sliding_window", True)
        window = getattr(config, "sliding_window", None) if sliding else None
    return window or None


def _result_arity(attn: nn.Module) -> int:
    """How many results the attention's forward returns (2, or 3 where transformers 4.x
    returned the cache too), read from its ``return`` statements; 2 if unreadable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(attn).forward)))
    except (OSError, TypeError, SyntaxError):
        return 2
    sizes = [len(node.value.elts) for node in ast.walk(tree)
             if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)]
    return max(sizes, default=2)


def _is_gpt2_attention(attn: nn.Module) -> bool:
    module = sys.modules.get("transformers.models.gpt2.modeling_gpt2")
    return module is not None and isinstance(attn, module.GPT2Attention)


def _cache_argument(past_key_values, kwargs: dict):
    """The KV cache under whichever name the installed transformers passes it: ``cache``
    (5.x), ``past_key_values`` (4.56 - 4.57) or ``past_key_value`` (before 4.56)."""
    for cache in (kwargs.get("cache"), past_key_values, kwargs.get("past_key_value")):
        if cache is not None:
            return cache
    return None


def mask_parts(attention_mask: Tensor | None, m: int,
               n: int) -> tuple[Tensor | None, Tensor | None]:
    """What the mask ``transformers`` gives an attention layer of a causal LM asks of ``m``
    queries over ``n`` keys: ``(key_padding, None)`` where it is the causal mask with key
    padding (what the fused kernels take; :func:`key_padding_from_mask`), else
    ``(None, visible)``, the whole mask as bool (True = attend) for the unfused attention:
    the block-diagonal mask of packed sequences (``position_ids`` restarting at 0 within a
    row, no ``attention_mask``: Hugging Face's padding-free collators and TRL's
    ``padding_free``), or any other pattern. The rows of padded queries (their own key
    padded, and seeing no key or, after sdpa's fix for such rows, every key) are not
    compared: :func:`keyless_rows` gives them what the wrapped attention does. Under
    ``torch.compile``, which cannot branch on the mask's values inside a graph, the fused
    kernels run and any other mask raises a RuntimeError when the compiled code runs."""
    key_padding = key_padding_from_mask(attention_mask, n)
    if key_padding is None:
        return None, None
    visible = attention_mask[..., :n]
    if visible.dtype != torch.bool:
        visible = visible > torch.finfo(visible.dtype).min / 2
    if visible.dim() != 4 or visible.shape[1] != 1 or visible.shape[2] != m:
        return None, visible
    rows = visible[:, 0]
    expected = torch.ones(m, n, dtype=torch.bool, device=rows.device).tril(n - m) \
        & key_padding[:, None, :]
    # a padded query sees no key, or (sdpa's fix for such rows) every key
    padded = ~key_padding[:, n - m:] & (rows.all(-1) | ~rows.any(-1))
    plain = ((rows == expected).all(-1) | padded).all()
    if torch.compiler.is_compiling():  # no branch on data in a graph: the fused kernels,
        torch._assert_async(plain, _COMPILED_MASK)  # and an error where they do not fit
        return key_padding, None
    if bool(plain):
        return key_padding, None
    return None, visible


_COMPILED_MASK = ("fastpeft: under torch.compile, an adaption prompt's attention takes the "
                  "causal mask with key padding only; packed sequences (a block-diagonal mask) "
                  "run in eager mode")


def _warn_unfused_once() -> None:
    warn_once("unfused attention", "fastpeft: an adaption prompt's attention got a mask other "
              "than causal with key padding (packed sequences, or a custom mask): it runs the "
              "unfused attention there", stacklevel=4)


def keyless_rows(out: Tensor, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None,
                 key_padding: Tensor | None, scale: float) -> Tensor:
    """``out`` (B, H, M, D) of the fused attention, plus what the wrapped attention gives
    the queries that see no sequence key there (left-padding positions): the fused kernels
    give them none, while eager attention (and sdpa with an additive mask) adds the
    dtype's minimum to each of their scores, so that their softmax is uniform over the
    keys, and sdpa's fix for such rows lets them see every key. Their outputs matter in
    training: the last padding position's logits predict the first token. An all-False
    bool row gets nothing, as from sdpa. Eager only (under torch.compile, which cannot
    branch on the mask, such rows keep the prompt part alone)."""
    if key_padding is None or attention_mask is None or torch.compiler.is_compiling():
        return out
    b, m, n = q.shape[0], q.shape[2], k.shape[2]
    # (B, M): no unpadded key up to the query's own (a mask may broadcast over the batch)
    keyless = (key_padding.cumsum(-1)[:, n - m:] == 0).expand(b, m)
    rows = attention_mask[:, 0, -m:, :n].expand(b, m, n)
    if rows.dtype == torch.bool:
        keyless = keyless & rows.any(-1)
    batch, query = keyless.nonzero(as_tuple=True)
    if batch.numel() == 0:
        return out
    group = q.shape[1] // k.shape[1]
    keys = k[batch].repeat_interleave(group, dim=1)  # (R, H, N, D)
    values = v[batch].repeat_interleave(group, dim=1)
    # as eager attention computes them: scores in the activations' dtype, the mask added,
    # softmax in float32
    scores = torch.einsum("rhd,rhnd->rhn", q[batch, :, query], keys) * scale
    mask = rows[batch, query][:, None, :]
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    part = torch.einsum("rhn,rhnd->rhd", weights, values)
    return out.transpose(1, 2).index_put((batch, query), part, accumulate=True).transpose(1, 2)


def key_padding_from_mask(attention_mask: Tensor | None, n: int) -> Tensor | None:
    """The ``(B, N)`` keep-mask of the keys from the mask ``transformers`` gives an
    attention layer of a causal LM: ``None``, or ``(B, 1, M, N)`` bool (True = attend) or
    additive float (0 = attend). Its last query row sees every key the causal mask allows,
    so that row is the key padding (:func:`mask_parts` checks that the mask is no more
    than causal with key padding)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
        raise NotImplementedError(
            f"attention_mask: expected None or a 4D (B, 1, M, N) tensor, got "
            f"{type(attention_mask).__name__}"
            + (f" of shape {tuple(attention_mask.shape)}"
               if isinstance(attention_mask, Tensor) else "")
            + "; use attn_implementation='sdpa' or 'eager'")
    if attention_mask.shape[-1] < n:
        raise ValueError(f"attention_mask: covers {attention_mask.shape[-1]} keys, "
                         f"the cache holds {n}")
    row = attention_mask[:, 0, -1, :n]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


def _rotary_of(attn: nn.Module) -> Callable[[Tensor, Tensor, Tensor, Tensor],
                                            tuple[Tensor, Tensor]]:
    """The model family's ``apply_rotary_pos_emb(q, k, cos, sin)``, from the module that
    defines the attention class (transformers keeps one per model family)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"attn: found no apply_rotary_pos_emb beside {type(attn).__name__} "
                        f"in {type(attn).__module__}")
    return fn


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a projection computes in (its first floating parameter: the
    weight of an nn.Linear or LoRALinear, the LoRA weights of an Int8LoRALinear)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
