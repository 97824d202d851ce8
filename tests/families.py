"""Tiny models of every common transformers family, built from configs (no downloads).

``tiny(name)`` returns a fresh model in eval mode; the sizes are small enough that a
forward, a backward and a short ``generate()`` take milliseconds on two cores, and every
model has at least two layers, grouped-query attention where the family has it, and a
vocabulary of ``VOCAB`` tokens.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 97

_DECODER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
            "max_position_embeddings": 64}

_ENCODER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 64}

# name -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2,
                 "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 24, "shared_expert_intermediate_size": 32}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_DECODER, "head_dim": 8, "sliding_window": 64}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {**_DECODER, "head_dim": 8, "sliding_window": 64}),
    "phi": ("PhiConfig", "PhiForCausalLM", {**_DECODER, "partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             {**_DECODER, "pad_token_id": 0, "sliding_window": None}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**_DECODER, "pad_token_id": 0}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   {**_DECODER, "sliding_window": None}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _DECODER),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
              "vocab_size": VOCAB}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "vocab_size": VOCAB,
                  "max_position_embeddings": 64}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            {"hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": VOCAB, "word_embed_proj_dim": 32,
             "max_position_embeddings": 64, "pad_token_id": 1}),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "vocab_size": VOCAB}),
    "bert": ("BertConfig", "BertForMaskedLM", _ENCODER),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", _ENCODER),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           {"d_model": 32, "d_ff": 48, "d_kv": 8, "num_layers": 2, "num_heads": 4,
            "vocab_size": VOCAB, "decoder_start_token_id": 0, "pad_token_id": 0}),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4,
              "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "vocab_size": VOCAB,
              "max_position_embeddings": 64}),
}

ENCODERS = ("bert", "roberta")
ENCODER_DECODERS = ("t5", "bart")
DECODERS = tuple(n for n in FAMILIES if n not in ENCODERS + ENCODER_DECODERS)


def available(name: str) -> bool:
    config_cls, model_cls, _ = FAMILIES[name]
    return hasattr(transformers, config_cls) and hasattr(transformers, model_cls)


def tiny(name: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny model of family ``name`` (eval mode, fp32)."""
    config_cls, model_cls, kwargs = FAMILIES[name]
    if not available(name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def inputs(name: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    """Model inputs: token ids with left padding in the first row of a decoder (right
    padding for encoders), plus decoder ids for encoder-decoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if name in ENCODERS + ENCODER_DECODERS:
        mask[0, -2:] = 0
    else:
        mask[0, :2] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if name in ENCODER_DECODERS:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out
