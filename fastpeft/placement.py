"""Where adapters go in each ``transformers`` model family: the one table of it.

The adaption prompt (LLaMA-Adapter) wraps a decoder block's self-attention: the modules
:data:`ADAPTION_PROMPT_SITES` names (``<block>.self_attn`` where a family is not
listed). Encoders and encoder-decoders have none (PEFT's adaption prompt neither).

Bottleneck adapters (Houlsby / Pfeiffer) sit on the output of a block's sublayer, before
the block adds its residual: after the attention output projection (``"attention"``) and
after the feed-forward network (``"feed_forward"``). Families name those sublayers
differently; each entry below gives, per placement, a regular expression for the
qualified names of the modules whose output gets the adapter. An encoder-decoder matches
in both stacks (T5, BART: the self-attention of encoder and decoder blocks, and every
feed-forward).

Families not listed use the Llama layout (``<block>.self_attn`` / ``<block>.mlp``), which
most decoders share (Llama, Mistral, Mixtral, Qwen2/3 and their MoE variants, Gemma 1-3,
Phi, Phi3, OLMo2, Starcoder2, Granite). A model where one of the placements asked for
finds no sublayer is refused (``fastpeft.inject`` names the placement and the model type)
rather than given the other placement alone.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["ADAPTION_PROMPT_SITES", "BOTTLENECK_SITES", "adaption_prompt_sites",
           "bottleneck_sites"]

_LLAMA = {"attention": r"layers\.\d+\.self_attn", "feed_forward": r"layers\.\d+\.mlp"}
_BERT = {"attention": r"layer\.\d+\.attention\.output\.dense",
         "feed_forward": r"layer\.\d+\.output\.dense"}

#: model_type -> placement -> regex for the end of the qualified module name
BOTTLENECK_SITES: dict[str, dict[str, str]] = {
    # before transformers 5, Mixtral called its MoE block block_sparse_moe
    "mixtral": {**_LLAMA, "feed_forward": r"layers\.\d+\.(mlp|block_sparse_moe)"},
    "gpt2": {"attention": r"h\.\d+\.attn", "feed_forward": r"h\.\d+\.mlp"},
    "gpt_neox": {"attention": r"layers\.\d+\.attention", "feed_forward": r"layers\.\d+\.mlp"},
    "falcon": {"attention": r"h\.\d+\.self_attention", "feed_forward": r"h\.\d+\.mlp"},
    "opt": {"attention": r"layers\.\d+\.self_attn", "feed_forward": r"layers\.\d+\.fc2"},
    "bart": {"attention": r"layers\.\d+\.self_attn", "feed_forward": r"layers\.\d+\.fc2"},
    "t5": {"attention": r"block\.\d+\.layer\.0\.SelfAttention",
           "feed_forward": r"block\.\d+\.layer\.\d+\.DenseReluDense"},
    "bert": _BERT,
    "roberta": _BERT,
    # Llama 4's decoder block calls its MoE (or, interleaved, dense) feed-forward
    # feed_forward; its tuple output (hidden states, router logits) gets the adapter on
    # the first element
    "llama4_text": {**_LLAMA, "feed_forward": r"layers\.\d+\.feed_forward"},
    # ModernBERT: attn ends in Wo (and its dropout), mlp in Wo; the block adds both residuals
    "modernbert": {"attention": r"layers\.\d+\.attn", "feed_forward": r"layers\.\d+\.mlp"},
    # ViT: transformers 5 has layers.N.attention / layers.N.mlp, the block adding both
    # residuals; transformers 4 has layer.N.attention (no residual in it) and the BERT-style
    # layer.N.output, whose forward adds the residual after its dense
    "vit": {"attention": r"layers?\.\d+\.attention",
            "feed_forward": r"(layers\.\d+\.mlp|layer\.\d+\.output\.dense)"},
    # Whisper: as BART (encoder and decoder self-attention, fc2 ends the feed-forward)
    "whisper": {"attention": r"layers\.\d+\.self_attn", "feed_forward": r"layers\.\d+\.fc2"},
}


def bottleneck_sites(model: nn.Module, placement: str) -> list[str]:
    """Qualified names of the modules of ``model`` whose output gets a bottleneck adapter
    at ``placement`` (``"attention"`` or ``"feed_forward"``), in module order."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    pattern = re.compile(r"(.*\.)?" + BOTTLENECK_SITES.get(model_type, _LLAMA)[placement])
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


#: model_type -> regex for the end of the qualified name of the attention to wrap;
#: None: the family has no place for an adaption prompt
ADAPTION_PROMPT_SITES: dict[str, str | None] = {
    "gpt2": r"h\.\d+\.attn",
    "bert": None, "roberta": None, "t5": None, "bart": None,
    "modernbert": None, "vit": None, "whisper": None, "clip": None, "siglip": None,
}


def adaption_prompt_sites(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules of ``model`` that an adaption prompt
    wraps, in module order (bottom layer first)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    site = ADAPTION_PROMPT_SITES.get(model_type, _LLAMA["attention"])
    if site is None:
        raise NotImplementedError(
            f"model: {type(model).__name__} (model type {model_type!r}) is not a decoder; "
            f"the adaption prompt is for decoder self-attention (PEFT has none for it either)")
    pattern = re.compile(r"(.*\.)?" + site)
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
