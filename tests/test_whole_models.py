"""Models carrying fastpeft layers, as whole models: the output layer as a named target, a
tied output layer merged, T5's float-kept feed-forward output under ``base_dtype``, models
built on the meta device, a bitsandbytes-quantised model merged and saved."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def trained(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_output_layer_as_a_named_target(tie, tmp_path):
    """``lm_head`` named in target_modules is adapted, as PEFT adapts it ("all-linear" leaves
    it out); merged, a head tied to the embeddings gets a weight of its own (the
    embeddings keep theirs) and the model saves and reloads as the adapted one."""
    base = tiny_llama(tie)
    model = trained(fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"])))
    assert isinstance(model.lm_head, fastpeft.LoRALinear)
    assert not isinstance(fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules="all-linear")).lm_head, fastpeft.LoRALinear)
    want = logits(model, IDS)
    fastpeft.save_adapter(model, tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(reference.eval(), IDS), want, rtol=1e-5, atol=1e-5)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = fastpeft.merge_and_unload(model)
    assert any("tied to the input embeddings" in str(w.message) for w in caught) == tie
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    torch.testing.assert_close(logits(merged, IDS), want, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again, IDS), want, rtol=1e-5, atol=1e-5)


def test_t5_feed_forward_output_stays_float_under_base_dtype():
    """T5's ``wo`` (its forward casts the input to ``wo.weight.dtype`` unless int8), which
    transformers keeps unquantised: ``base_dtype`` leaves it a float LoRALinear, with a
    note, and the model runs."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0)
    for base_dtype in ("nf4", "int8"):
        model = transformers.T5ForConditionalGeneration(config).eval()
        with pytest.warns(UserWarning, match=r"leaves .*DenseReluDense\.wo.* float"):
            fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules="all-linear",
                                                       base_dtype=base_dtype))
        block = model.encoder.block[0].layer[1].DenseReluDense
        assert type(block.wo) is fastpeft.LoRALinear and type(block.wi) is not \
            fastpeft.LoRALinear
        out = model(input_ids=IDS, decoder_input_ids=IDS[:, :3]).logits
        assert out.shape == (2, 3, 64) and out.isfinite().all()


@pytest.mark.parametrize("base_dtype", [None, "int8", "nf4"])
def test_inject_on_the_meta_device_then_assign(base_dtype):
    """A model built on the meta device (init_empty_weights), injected, then given the
    state of a real injected model with ``load_state_dict(assign=True)``."""
    config = fastpeft.LoraConfig(r=4, target_modules="all-linear", base_dtype=base_dtype)
    real = trained(fastpeft.inject(tiny_llama(), config))
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(real.config).eval()
    fastpeft.inject(empty, config)
    empty.load_state_dict(real.state_dict(), assign=True, strict=True)
    empty.model.rotary_emb = type(empty.model.rotary_emb)(real.config)  # not in the state
    torch.testing.assert_close(logits(empty, IDS), logits(real, IDS), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merged_bitsandbytes_model_saves_as_a_float_model(kind, tmp_path):
    """A model transformers loaded quantised by bitsandbytes, injected on every linear
    layer and merged: no quantised layer is left, so neither is the quantisation config,
    and the saved model loads with the merged logits."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "plain")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32) \
        if kind == "nf4" else transformers.BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "plain", quantization_config=quantization, dtype=torch.float32).eval()
    except RuntimeError as err:  # transformers < 4.54 quantises with bitsandbytes on GPUs only
        if "bitsandbytes" not in str(err):
            raise
        pytest.skip(f"this transformers does not load bitsandbytes models here: {err}"[:200])
    trained(fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules="all-linear")))
    want = logits(model, IDS)
    merged = fastpeft.merge_and_unload(model)
    assert not getattr(merged, "is_quantized", False)
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged, IDS), want, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again, IDS), want, rtol=1e-4, atol=1e-4)
