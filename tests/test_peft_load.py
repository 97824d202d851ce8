"""A PEFT model converted by ``fastpeft.from_peft`` loads what PEFT saves: ``fastpeft.load_adapter``
of a file holding what only PEFT's layers hold (``modules_to_save``, DoRA), of an adapter
by name, of PEFT's multi-adapter layout; every new LoRA layer fused where it can be."""

from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft.nn import peft_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=101)
    return transformers.LlamaForCausalLM(config).eval()


def trained(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adapters (and modules_to_save copies) moved off their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def test_modules_to_save_round_trip(tmp_path, ids):
    """A classifier-style model (PEFT's ``modules_to_save``): what ``save_adapter`` writes,
    ``load_adapter`` reads back into a converted model, the head's copy and the file's
    LoRA hyperparameters included; the LoRA layers stay fused."""
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                             modules_to_save=["lm_head"])
    saved = trained(fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), config)), 0)
    fastpeft.save_adapter(saved, tmp_path)
    other = copy.deepcopy(config)
    other.lora_alpha = 4
    model = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), other))
    assert fastpeft.load_adapter(model, tmp_path) is model
    torch.testing.assert_close(logits(model, ids), logits(saved, ids), rtol=1e-5, atol=1e-5)
    assert model.peft_config["default"].lora_alpha == 16
    assert sum(isinstance(m, peft_lora.FusedPeftLora) for m in model.modules()) == 4
    # a file the model's adapter has no place for is refused, naming the directory
    plain = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=TARGETS)))
    with pytest.raises(ValueError, match=r"^directory: .* does not fit .*unexpected"):
        fastpeft.load_adapter(plain, tmp_path)
    # fastpeft's own layers cannot hold it: refused, pointing at from_peft
    with pytest.raises(NotImplementedError, match=r"modules_to_save.*from_peft"):
        fastpeft.load_adapter(copy.deepcopy(base), tmp_path)


def test_named_and_multi_adapter_loads(tmp_path, ids):
    """An adapter loaded by name joins the converted model trainable, its new layers fused;
    PEFT's multi-adapter layout loads each adapter; a DoRA adapter keeps PEFT's forward.
    Each gives the logits of PEFT's own load of the same files."""
    base = tiny_llama()
    source = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4,
                                                                      target_modules=TARGETS))
    source.add_adapter("mlp", peft.LoraConfig(r=2, lora_alpha=8, use_rslora=True,
                                              target_modules=["q_proj", "down_proj"]))
    trained(source.eval(), 1).save_pretrained(tmp_path / "both")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both").eval()
    reference.load_adapter(tmp_path / "both" / "mlp", adapter_name="mlp")

    model = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=TARGETS))).eval()
    fastpeft.load_adapter(model, tmp_path / "both" / "mlp", adapter_name="mlp")
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(down, peft_lora.FusedPeftLora) and down.lora_A["mlp"].weight.requires_grad
    reference.set_adapter("mlp")
    model.set_adapter("mlp")
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)

    everything = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=TARGETS))).eval()
    fastpeft.load_adapter(everything, tmp_path / "both")  # "default" and "mlp"
    names = ["default", "mlp"]
    with torch.no_grad():
        want = reference(input_ids=ids, adapter_names=names).logits
        got = everything(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    dora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["o_proj"], use_dora=True))
    trained(dora.eval(), 2).save_pretrained(tmp_path / "dora")
    reference.load_adapter(tmp_path / "dora", adapter_name="dora")
    fastpeft.load_adapter(model, tmp_path / "dora", adapter_name="dora")
    reference.set_adapter("dora")
    model.set_adapter("dora")
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert not isinstance(model.base_model.model.model.layers[0].self_attn.o_proj,
                          peft_lora.FusedPeftLora)


def test_adaption_prompt_by_name_refused(tmp_path):
    base = tiny_llama()
    prompt = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"))
    prompt.save_pretrained(tmp_path)
    model = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=TARGETS)))
    with pytest.raises(NotImplementedError, match=r"^directory: .*ADAPTION_PROMPT"):
        fastpeft.load_adapter(model, tmp_path, adapter_name="prompt")


def test_root_adapter_loads_into_default_whatever_is_active(tmp_path, ids):
    """A directory's root adapter is ``"default"`` (PEFT's layout): loaded into a PEFT model
    whose active adapter is another, it replaces ``"default"`` and leaves the active one
    as it was; the dropout made for the file's ``lora_dropout`` follows the model's eval
    mode."""
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=TARGETS)
    source = trained(fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), config)), 0)
    fastpeft.save_adapter(source, tmp_path)
    start = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    model = peft.get_peft_model(copy.deepcopy(base), start)
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    model = trained(fastpeft.from_peft(model), 1).eval()
    model.set_adapter("other")
    before = logits(model, ids)
    other = {n: p.clone() for n, p in model.named_parameters() if ".other." in n}
    fastpeft.load_adapter(model, tmp_path)
    assert all(torch.equal(p, other[n]) for n, p in model.named_parameters() if n in other)
    torch.testing.assert_close(logits(model, ids), before)  # "other" still active
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, ids), logits(source.eval(), ids))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling == {"default": 2.0, "other": 0.5}
    assert not layer.lora_dropout["default"].training
    torch.testing.assert_close(logits(model, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("option", [{"bias": "lora_only"}, {"use_qalora": True},
                                    {"alora_invocation_tokens": [5, 6]},
                                    {"some_future_variant": {"k": 1}}])
def test_plain_model_refuses_peft_only_options(tmp_path, option):
    """A saved LoRA config setting an option only PEFT's layers implement (a LoRA variant,
    biases, ...; any key fastpeft does not follow that is set) is refused for a plain model,
    naming the option, instead of loading as plain LoRA."""
    import json

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **option}))
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        fastpeft.load_adapter(tiny_llama(), tmp_path)


def test_bias_file_loads_into_a_peft_model(tmp_path, ids):
    """PEFT's ``bias="all"`` file (the base biases saved with the adapter) loads into a
    PEFT model through PEFT's own load, as PEFT's ``load_adapter`` loads it."""
    base = tiny_llama()
    for m in base.modules():
        if isinstance(m, torch.nn.Linear) and m.out_features == 32:
            m.bias = torch.nn.Parameter(torch.zeros(32))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="all")
    source = trained(fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), config)), 0)
    with torch.no_grad():
        for n, p in source.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    source.save_pretrained(tmp_path)
    model = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), config)).eval()
    fastpeft.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), logits(source.eval(), ids))


def test_root_adapter_loads_into_the_active_adapter_without_default(tmp_path, ids):
    """A PEFT model made (or loaded) under another adapter name, without "default": a
    directory's lone root adapter loads into its active adapter, as before the root
    adapter was taken for "default" (it joined as an unused second adapter)."""
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    source = trained(fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), config)), 0)
    fastpeft.save_adapter(source, tmp_path)
    model = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), config,
                                                   adapter_name="foo")).eval()
    fastpeft.load_adapter(model, tmp_path)
    assert list(model.peft_config) == ["foo"]
    torch.testing.assert_close(logits(model, ids), logits(source.eval(), ids))
