"""The adaption prompt on attention layers that differ from Llama's: SmolLM3's NoPE layers
(no rotary embedding), Gemma3's vision-language model (image tokens attend to each other
both ways), Cohere's per-head q/k LayerNorm ``(heads, head_dim)``, and GPT-OSS's attention
sinks (refused). With the gate at zero the adapted model is the base model exactly, in the
forward and in cached generate(); training moves it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft

transformers = pytest.importorskip("transformers")

VOCAB = 97


def model_class(name: str):
    """The installed transformers' class, or a skip where it is too old to have it."""
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def token_ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB - 4, (batch, length), generator=torch.Generator().manual_seed(0))


def tiny_smollm3():
    """Four layers, the top one (the adapted one) NoPE, as SmolLM3's every fourth."""
    cls = model_class("SmolLM3ForCausalLM")
    config = transformers.SmolLM3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert config.no_rope_layers[-1] == 0 and config.no_rope_layers[-2] == 1
    torch.manual_seed(0)
    return cls(config).eval(), {"input_ids": token_ids()}


def tiny_cohere():
    """``use_qk_norm``: q/k LayerNorms ``(heads, head_dim)``, weights not all one."""
    cls = model_class("CohereForCausalLM")
    config = transformers.CohereConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_qk_norm=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # as after training: per-head weights that differ
        for n, p in model.named_parameters():
            if "q_norm" in n or "k_norm" in n:
                p.normal_(1.0, 0.5)
    assert model.model.layers[-1].self_attn.k_norm.weight.dim() == 2
    return model, {"input_ids": token_ids()}


def tiny_gemma3_vision():
    """Gemma3's vision-language model with one image (four image tokens) per row, at two
    places: the image tokens see each other bidirectionally."""
    cls = model_class("Gemma3ForConditionalGeneration")
    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         vocab_size=VOCAB, sliding_window=64),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=96, boi_token_index=95, eoi_token_index=94)
    torch.manual_seed(0)
    model = cls(config).eval()
    image = [95, 96, 96, 96, 96, 94]
    ids = torch.tensor([image + [5, 6, 7, 8, 9, 10], [11, 12] + image + [13, 14, 15, 16]])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "token_type_ids": (ids == 96).long(),
                   "pixel_values": pixels}


SUPPORTED = {"smollm3": tiny_smollm3, "cohere_qk_norm": tiny_cohere,
             "gemma3_vision": tiny_gemma3_vision}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfused attention's warning for Gemma3's mask
        return model(**batch, use_cache=False).logits


def generate(model, batch, use_cache: bool = True) -> list:
    """Greedy generate(); skipped where transformers 4.x gives Gemma3 a HybridCache (a static
    cache, which the adaption prompt refuses)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                  use_cache=use_cache).tolist()
        except NotImplementedError as err:
            assert "static cache" in str(err) and transformers.__version__ < "5"
            pytest.skip(f"transformers {transformers.__version__}: {err}")


@pytest.mark.parametrize("name", SUPPORTED)
def test_zero_gate_is_the_base_model(name):
    """Step 0: the logits and the cached generate() of the base model."""
    base, batch = SUPPORTED[name]()
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=1))
    adapted = [m for m in model.modules() if isinstance(m, fastpeft.nn.AdaptedAttention)]
    assert len(adapted) == 1
    if name == "smollm3":
        assert not adapted[0].model.use_rope  # the NoPE layer is the adapted one
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-5, rtol=0)
    assert generate(model, batch) == generate(base, batch)


@pytest.mark.parametrize("name", SUPPORTED)
def test_training_moves_the_model(name):
    """A few steps: the gradient reaches the gate and then the prompt, the output moves,
    and the cached decode of generate() agrees with the uncached one."""
    base, batch = SUPPORTED[name]()
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("adaption_" in n for n in params)
    before = logits(model, batch)
    optimizer = torch.optim.Adam(params.values(), lr=0.05)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(**batch, labels=batch["input_ids"], use_cache=False)
        out.loss.backward()
        optimizer.step()
    model.eval()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert (logits(model, batch) - before).abs().max() > 1e-3
    assert generate(model, batch) == generate(model, batch, use_cache=False)


def test_attention_sinks_refused():
    """GPT-OSS adds a learned logit per head to the softmax (``sinks``), which the fused
    attention has not: inject refuses, naming the layer and the sinks."""
    cls = model_class("GptOssForCausalLM")
    config = transformers.GptOssConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError,
                       match=r"model\.layers\.1\.self_attn.*GptOssAttention.*attention sinks"):
        fastpeft.inject(model, fastpeft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    # nothing half-done: the model is untouched
    assert not any(isinstance(m, fastpeft.nn.AdaptedAttention) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_training_matches_peft(attn):
    """A left-padded batch with labels = the ids (pads -100): the last padding position's
    logits predict the first real token, so what a padded query row's attention gives
    reaches the loss. Eager attention averages the masked keys there (its softmax over
    equal scores), sdpa's bool mask gives nothing: fastpeft's adapters give PEFT's loss and
    gradients with either."""
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    reference = peft.get_peft_model(base, peft.AdaptionPromptConfig(
        adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "adaption_gate" in name:
                p.fill_(0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fastpeft.from_peft(copy.deepcopy(reference))
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (reference, fused):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for n, p in model.named_parameters()
                                            if "adaption_prompt" in n]))
    (loss, grads), (loss_fp, grads_fp) = results
    torch.testing.assert_close(loss_fp, loss, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(grads_fp) == 2
    if attn == "sdpa" and int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4 gives sdpa an additive mask: for a row of minimums torch's CPU
        # SDPA returns the mean of the values, as eager does, but its backward takes every
        # probability as 1 (its logsumexp, the minimum plus log N, rounds to the minimum),
        # N times eager's gradient there; fastpeft's is eager's
        return
    for g_fp, g in zip(grads_fp, grads, strict=True):
        torch.testing.assert_close(g_fp, g, rtol=1e-4, atol=1e-6)
