"""Every common transformers family, every method, against PEFT: tiny models built from
configs (tests/families.py), fp32, the CPU kernels.

For LoRA (float and int8 base) each family is checked three ways: a PEFT adapter loaded
into fastpeft (``load_adapter``) gives PEFT's logits and LoRA gradients; fastpeft's
adapter loads into PEFT (``save_adapter``); a PEFT model converted in place
(``from_peft``) runs the fused op on every adapted layer and gives the same logits and
gradients. Greedy ``generate()`` with the cache is compared where the model generates.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastpeft
from fastpeft.nn import peft_lora

from families import DECODERS, ENCODER_DECODERS, ENCODERS, FAMILIES, inputs, tiny

peft = pytest.importorskip("peft")

# What "all-linear" means is the same in both libraries, except for MoE experts, which
# PEFT adapts as 3-D parameters (fastpeft has no fused layer for them; see test_moe_*).
MOE_TARGETS = {
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                  "down_proj", "shared_expert_gate"],
}


def targets(name: str):
    return MOE_TARGETS.get(name, "all-linear")


def peft_lora_model(base, name, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets(name), **kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return pm


def logits(model, batch):
    return model(**batch).logits


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA weights under PEFT-independent names (``<layer>.lora_A``)."""
    model.zero_grad(set_to_none=True)
    model(**batch).logits.square().mean().backward()
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora_" in n:
            key = n.removeprefix("base_model.model.").replace(".default", "")
            out[key] = p.grad.clone()
    return out


def assert_close(a, b, atol=2e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def assert_same_grads(a: dict, b: dict, atol=2e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def generate(model, name, batch):
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    if name in ENCODER_DECODERS:
        return model.generate(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"], **kwargs)
    return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          **kwargs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_matches_peft(name, tmp_path):
    base = tiny(name)
    batch = inputs(name)
    pm = peft_lora_model(base, name)
    want, want_grads = logits(pm, batch).detach(), lora_grads(pm, batch)

    # PEFT's adapter into fastpeft's own layers
    pm.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    n_layers = len(list(fastpeft.inject.__globals__["adapter_layers"](ours)))
    assert n_layers == len(want_grads) // 2
    assert_close(logits(ours, batch), want)
    assert_same_grads(lora_grads(ours, batch), want_grads)

    # and back into PEFT
    fastpeft.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(logits(again, batch), want)

    if name not in ENCODERS:
        assert generate(ours, name, batch).tolist() == generate(pm, name, batch).tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_from_peft_fuses_every_layer(name, monkeypatch):
    base = tiny(name)
    batch = inputs(name)
    pm = peft_lora_model(base, name, lora_dropout=0.0)
    want, want_grads = logits(pm, batch).detach(), lora_grads(pm, batch)
    converted = fastpeft.from_peft(copy.deepcopy(pm))
    calls = []
    original = peft_lora.lora_linear
    monkeypatch.setattr(peft_lora, "lora_linear",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    assert_close(logits(converted, batch), want)
    assert len(calls) == len(want_grads) // 2 * (2 if name in ENCODER_DECODERS else 1) \
        or len(calls) >= len(want_grads) // 2
    assert_same_grads(lora_grads(converted, batch), want_grads)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_int8_base(name):
    """LoRA on an int8 base: fastpeft's layers against PEFT on the dequantised weights."""
    base = tiny(name)
    batch = inputs(name)
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets(name), base_dtype="int8"))
    layers = [m for m in model.modules() if isinstance(m, fastpeft.Int8LoRALinear)]
    assert layers
    for layer in layers:  # looks like a Linear to model code
        assert layer.weight.shape == (layer.out_features, layer.in_features)
        assert layer.weight.device == layer.qweight.device
    # the same model with every adapted weight replaced by its dequantised value
    reference = copy.deepcopy(base)
    for n, layer in model.named_modules():
        if isinstance(layer, fastpeft.Int8LoRALinear):
            w = reference.get_submodule(n).weight
            dq = layer.dequantized_weight(w.dtype)
            with torch.no_grad():
                w.copy_(dq.t() if layer.fan_in_fan_out else dq)
    assert_close(logits(model, batch), logits(reference, batch), atol=1e-4)
    out = logits(model, batch)
    out.square().mean().backward()
    assert all(m.lora_A.weight.grad is not None for m in layers)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ENCODERS])
def test_generate_with_lora_uses_the_cache(name):
    base = tiny(name)
    batch = inputs(name)
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets(name)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    cached = generate(model, name, batch)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": False}
    uncached = model.generate(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"], **kwargs)
    assert cached.tolist() == uncached.tolist()


def test_families_listed():
    assert set(DECODERS) | set(ENCODERS) | set(ENCODER_DECODERS) == set(FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer"])
def test_bottleneck_adapters_in_every_family(name, preset, tmp_path):
    """Adapters on the output of every block's attention / feed-forward: an identity when
    fresh; trained, the same as the unfused adapters applied by hand at those sites;
    saved and loaded."""
    from fastpeft.placement import bottleneck_sites

    base = tiny(name)
    batch = inputs(name)
    want = logits(base, batch)
    config = fastpeft.BottleneckConfig(preset, bottleneck_size=8)
    model = fastpeft.inject(copy.deepcopy(base), config)
    adapters = {n: m for n, m in model.named_modules()
                if isinstance(m, fastpeft.BottleneckAdapter)}
    n_blocks = len(bottleneck_sites(base, "feed_forward"))
    assert n_blocks >= 2
    assert len(adapters) == n_blocks * (2 if preset == "houlsby" else 1) or \
        name in ENCODER_DECODERS
    assert_close(logits(model, batch), want, atol=0)
    with torch.no_grad():
        for a in adapters.values():
            a.up_weight.normal_(0.0, 0.3)
    got = logits(model, batch)
    assert (got - want).abs().max() > 1e-3

    # the unfused reference: the same adapters as plain hooks on a copy of the base
    from fastpeft import reference

    plain = copy.deepcopy(base)
    for n, a in adapters.items():
        site = plain.get_submodule(n.rpartition(".")[0])

        def hook(module, args, out, a=a):
            h = out[0] if isinstance(out, tuple) else out
            y = reference.bottleneck_adapter(
                h, a.down_weight, a.down_bias, a.up_weight, a.up_bias,
                activation=a.activation, scaling=a.scaling,
                ln_weight=a.ln_weight, ln_bias=a.ln_bias)
            return (y, *out[1:]) if isinstance(out, tuple) else y

        site.register_forward_hook(hook)
    assert_close(got, logits(plain, batch))
    fastpeft.save_adapter(model, tmp_path)
    again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(logits(again, batch), got, atol=0)
