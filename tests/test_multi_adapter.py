"""Mixed-adapter batches in real models: PEFT's ``adapter_names`` call on a model converted by
``fastpeft.from_peft`` runs ``fastpeft.multi_lora_linear`` and gives PEFT's logits, trains
(each adapter gets the gradient of its own rows), and generates as PEFT does."""

from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft.nn import peft_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# three adapters of different ranks, alphas and targets; "__base__" rows use none
ADAPTERS = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "chat": dict(r=8, lora_alpha=4, target_modules="all-linear"),
    "math": dict(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], use_rslora=True),
}
NAMES = ["chat", "__base__", "sql", "math", "chat"]


def tiny_llama(gpt2: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if gpt2:  # Conv1D layers (fan_in_fan_out)
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97,
                                         n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(config).eval()


def peft_model(gpt2: bool = False, dropout: float = 0.0) -> torch.nn.Module:
    model = None
    for name, kwargs in ADAPTERS.items():
        kwargs = dict(kwargs, lora_dropout=dropout)
        if gpt2:
            kwargs["target_modules"] = ["c_attn", "c_proj"] if name != "math" else ["c_fc"]
            kwargs["fan_in_fan_out"] = True
        config = peft.LoraConfig(**kwargs)
        if model is None:
            model = peft.get_peft_model(tiny_llama(gpt2), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: B off zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return model.eval()


def batch(n: int = len(NAMES), length: int = 6):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 97, (n, length), generator=g)


def calls_of(model, ids, names, monkeypatch) -> tuple[torch.Tensor, int]:
    """Logits of the mixed batch, and how many times the fused op ran."""
    count = [0]
    original = peft_lora.multi_lora_linear

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_lora, "multi_lora_linear", counting)
    return model(input_ids=ids, adapter_names=names).logits, count[0]


@pytest.mark.parametrize("gpt2", [False, True], ids=["llama", "gpt2"])
def test_mixed_batch_gives_peft_logits(gpt2, monkeypatch):
    reference = peft_model(gpt2)
    ids = batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=NAMES).logits
        fused = fastpeft.from_peft(copy.deepcopy(reference))
        logits, calls = calls_of(fused, ids, NAMES, monkeypatch)
    lora_layers = sum(isinstance(m, peft_lora.FusedPeftLora) for m in fused.modules())
    assert calls == lora_layers > 0  # every LoRA layer took the fused mixed path
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # each row as PEFT computes it with only that row's adapter active
    for row, name in enumerate(NAMES):
        if name == "__base__":
            with reference.disable_adapter(), torch.no_grad():
                alone = reference(input_ids=ids[row:row + 1]).logits
        else:
            reference.set_adapter(name)
            with torch.no_grad():
                alone = reference(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(logits[row:row + 1], alone, rtol=1e-4, atol=1e-4)


def test_mixed_batch_trains_each_adapter_on_its_rows():
    """In training mode (which PEFT refuses for ``adapter_names``): the loss of the mixed
    batch, and each adapter's gradient equal to the sum over the sub-batches trained alone
    (PEFT, one adapter active per sub-batch)."""
    reference = peft_model()
    fused = fastpeft.from_peft(copy.deepcopy(reference)).train()
    for name, p in fused.named_parameters():  # every adapter trainable, not the active one's
        p.requires_grad_("lora_" in name)
    ids = batch()
    with pytest.raises(ValueError, match="training mode"):
        reference.train()(input_ids=ids, adapter_names=NAMES)
    loss = fused(input_ids=ids, labels=ids, adapter_names=NAMES).logits.square().mean()
    loss.backward()

    reference.train()
    reference.zero_grad(set_to_none=True)
    per_row = []
    for row, name in enumerate(NAMES):
        if name == "__base__":
            with reference.disable_adapter(), torch.no_grad():
                logits = reference(input_ids=ids[row:row + 1]).logits
        else:
            reference.base_model.set_adapter(name)  # keeps the other adapters' grads
            logits = reference(input_ids=ids[row:row + 1]).logits
        per_row.append(logits.square().sum() / (len(NAMES) * logits[0].numel()))
        if name != "__base__":
            per_row[-1].backward()
    torch.testing.assert_close(loss.detach(), sum(p.detach() for p in per_row),
                               rtol=1e-5, atol=1e-6)
    fused_params = dict(fused.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        if "lora_" not in name:
            continue
        g = fused_params[name].grad
        if p.grad is None:  # an adapter no row reaches in this layer
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked > 0


def test_mixed_batch_with_dropout_trains():
    """Dropout on (one p for all adapters): gradients reach every named adapter; adapters
    with different dropout probabilities are refused in training, naming the cause."""
    fused = fastpeft.from_peft(peft_model(dropout=0.1)).train()
    ids = batch()
    fused(input_ids=ids, adapter_names=NAMES).logits.sum().backward()
    for name, p in fused.named_parameters():
        if "lora_A.sql." in name and "q_proj" in name:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    model = peft_model(dropout=0.1)
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["sql"].p = 0.2
    fused = fastpeft.from_peft(model).train()
    with pytest.raises(ValueError, match="different lora_dropout"):
        fused(input_ids=ids, adapter_names=NAMES)


def test_mixed_batch_generate():
    reference = peft_model()
    fused = fastpeft.from_peft(copy.deepcopy(reference))
    ids = batch(length=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, adapter_names=NAMES, pad_token_id=0)
    torch.testing.assert_close(fused.generate(input_ids=ids, **kwargs),
                               reference.generate(input_ids=ids, **kwargs), rtol=0, atol=0)


def test_unknown_adapter_refused_as_peft_does():
    fused = fastpeft.from_peft(peft_model())
    with pytest.raises(ValueError, match="non-existing adapter"):
        fused(input_ids=batch(2), adapter_names=["sql", "nope"])
