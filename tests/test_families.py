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
import json
import warnings

import pytest
import torch
from families import DECODERS, ENCODER_DECODERS, ENCODERS, FAMILIES, inputs, tiny

import fastpeft
from fastpeft.inject import adapter_layers
from fastpeft.nn import peft_lora
from fastpeft.targets import param_target_key

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# The fused path on every family: "all-linear" except, on MoE models, the experts and
# the router, which transformers 5 holds as 3-D parameters / a router module that PEFT
# (and fastpeft, through PEFT's ParamWrapper) adapts as parameters: see test_moe_*.
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
    """Greedy, with the cache (an encoder-decoder starts its own decoder ids)."""
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
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
    assert len(list(adapter_layers(ours))) == len(want_grads) // 2
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
    # every adapted layer once, but LoRA on parameters (PEFT's ParamWrapper: from PEFT
    # 0.22 these target_modules also reach an MoE's 3-D expert weights), which keeps
    # PEFT's forward
    wrapped = sum(1 for m in converted.modules() if peft_lora.is_param_wrapper(m))
    assert len(calls) == len(want_grads) // 2 - wrapped
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
    with torch.no_grad():  # a trained adapter: the LoRA branch adds to the output
        for layer in layers:
            layer.lora_B.weight.normal_(0.0, 0.2)
    # PEFT on the same model with every adapted weight replaced by its dequantised value,
    # with the same LoRA weights
    reference = copy.deepcopy(base)
    for n, layer in model.named_modules():
        if isinstance(layer, fastpeft.Int8LoRALinear):
            w = reference.get_submodule(n).weight
            dq = layer.dequantized_weight(w.dtype)
            with torch.no_grad():
                w.copy_(dq.t() if layer.fan_in_fan_out else dq)
    pm = peft_lora_model(reference, name)
    copy_lora(model, pm)
    assert_close(logits(model, batch), logits(pm, batch), atol=1e-4)
    assert_same_grads(lora_grads(model, batch), lora_grads(pm, batch), atol=1e-4)


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
    assert len(adapters) == n_blocks * (2 if preset == "houlsby" else 1)
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


# --- the adaption prompt ------------------------------------------------------------------

# decoders whose attention fastpeft does not wrap, and the word its refusal names
ADAPTION_REFUSED = {"gemma2": "attn_logit_softcapping", "phi": "PhiAttention",
                    "phi3": "Phi3Attention", "opt": "OPTAttention",
                    "gpt_neox": "GPTNeoXForCausalLM", "falcon": "FalconForCausalLM"}
ADAPTION_OK = [n for n in DECODERS if n not in ADAPTION_REFUSED]


def gate_open(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaption_gate" in n:
                p.normal_(0.0, 1.0)


@pytest.mark.parametrize("name", [*ENCODERS, *ENCODER_DECODERS, *ADAPTION_REFUSED])
def test_adaption_prompt_refused_where_it_has_no_place(name):
    with pytest.raises((NotImplementedError, TypeError, ValueError),
                       match=ADAPTION_REFUSED.get(name, "not a decoder")):
        fastpeft.inject(tiny(name), fastpeft.AdaptionPromptConfig(adapter_len=3))


@pytest.mark.parametrize("name", ADAPTION_OK)
def test_adaption_prompt_in_every_decoder(name):
    """Zero gate: the base model exactly (on positions that are not padding); an open
    gate: the cached decode of generate() agrees with the uncached one."""
    base = tiny(name)
    batch = {**inputs(name), "use_cache": False}  # a training forward
    keep = batch["attention_mask"].bool()
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2))
    assert_close(logits(model, batch)[keep], logits(base, batch)[keep])
    gate_open(model)
    assert (logits(model, batch)[keep] - logits(base, batch)[keep]).abs().max() > 1e-3
    logits(model, batch).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "adaption_" in n)
    try:
        cached = generate(model, name, batch)
    except NotImplementedError as err:  # transformers 4.x: Gemma3 generates with a HybridCache
        assert "static cache" in str(err) and transformers.__version__ < "5"
        pytest.skip(f"transformers {transformers.__version__}: {err}")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert cached.tolist() == model.generate(**batch, **kwargs).tolist()


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_adaption_prompt_matches_peft(name, tmp_path):
    """Where PEFT has the adaption prompt: its logits, gradients, generate(), and save /
    load both ways."""
    base = tiny(name)
    batch = inputs(name)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # PEFT's GPT-2 path
    try:
        pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
            adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    except ValueError as err:  # PEFT before 0.17 has no GPT-2 adaption prompt
        pytest.skip(f"peft {peft.__version__}: {err}")
    gate_open(pm)
    want = logits(pm, batch).detach()
    converted = fastpeft.from_peft(copy.deepcopy(pm))
    assert_close(logits(converted, batch), want)
    pm.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_close(logits(ours, batch), want)
    grads = {}
    for model in (pm, ours):
        model.zero_grad(set_to_none=True)
        logits(model, batch).square().mean().backward()
        grads[model is pm] = {n.removeprefix("base_model.model."): p.grad
                              for n, p in model.named_parameters() if p.requires_grad}
    assert_same_grads(grads[True], grads[False])
    fastpeft.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(logits(again, batch), want)
    assert generate(ours, name, batch).tolist() == generate(pm, name, batch).tolist()


# --- MoE: experts and routers as parameters (transformers 5) -----------------------------

MOE = ("mixtral", "qwen2_moe")


def has_param_wrapper() -> bool:
    import peft.tuners.lora.layer as peft_layer

    return hasattr(peft_layer, "ParamWrapper")


def stacked_experts(model) -> list[str]:
    """Modules holding 3-D (per-expert) parameters: transformers 5's MoE layout."""
    return [n for n, m in model.named_modules()
            if any(p.dim() == 3 for p in m.parameters(recurse=False))]


def moe_base(name):
    base = tiny(name)
    if stacked_experts(base) and not has_param_wrapper():
        pytest.skip(f"peft {peft.__version__} has no ParamWrapper for 3-D experts")
    return base


def adapted(model) -> dict[str, str]:
    """What carries LoRA, under PEFT-independent names -> "linear" / "parameter": a linear
    layer's name, a wrapped parameter's qualified name (``...experts.gate_up_proj``)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for n, m in model.named_modules():
        n = n.removeprefix("base_model.model.")
        if peft_lora.is_param_wrapper(m):
            out[param_target_key(n, m)] = "parameter"
        elif isinstance(m, (LoraLayer, fastpeft.LoRALinear, fastpeft.Int8LoRALinear)):
            out[n] = "linear"
    return out


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in model.named_parameters() if ".lora_" in n}


def copy_lora(src, dst) -> None:
    want, got = lora_weights(src), lora_weights(dst)
    assert want.keys() == got.keys()
    with torch.no_grad():
        for key, p in got.items():
            p.copy_(want[key])


def fastpeft_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("inject:")]


def peft_all_linear(base, **kwargs):
    with warnings.catch_warnings():  # PEFT's own notes on its MoE conversion
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", **kwargs))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return pm


@pytest.mark.parametrize("name", MOE)
def test_moe_all_linear_matches_peft(name, tmp_path):
    """"all-linear" on a MoE model adapts what PEFT adapts: linear layers fused, the
    experts / router parameters PEFT adapts (transformers 5) with PEFT's ParamWrapper and
    one warning; PEFT's logits, gradients, save / load both ways, generate(), merge."""
    base = moe_base(name)
    batch = inputs(name)
    pm = peft_all_linear(base)
    targets = adapted(pm)
    wrapped = sorted(k for k, kind in targets.items() if kind == "parameter")
    left_out = [n for n in stacked_experts(base)
                if not any(w.startswith(n + ".") for w in wrapped)]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear"))
    said = fastpeft_warnings(record)
    if wrapped or left_out:  # transformers 5: one warning, naming what PEFT's forward runs
        assert len(said) == 1, said
        if wrapped:
            assert "PEFT's unfused forward" in said[0]
            assert all(w.rpartition(".")[0] in said[0] for w in wrapped[:4])
        if left_out:
            assert "unadapted" in said[0] and left_out[0] in said[0]
    else:  # transformers 4: experts are nn.Linear layers, all fused, nothing to say
        assert said == []
        assert all(isinstance(m, fastpeft.LoRALinear) for _, m in adapter_layers(ours))
    assert adapted(ours) == targets
    copy_lora(pm, ours)
    want = logits(pm, batch).detach()
    assert_close(logits(ours, batch), want)
    assert_same_grads(lora_grads(ours, batch), lora_grads(pm, batch))
    assert generate(ours, name, batch).tolist() == generate(pm, name, batch).tolist()

    # fastpeft's adapter into PEFT, PEFT's into fastpeft
    fastpeft.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved.get("target_parameters") or []) == wrapped
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert adapted(again) == targets
    assert_close(logits(again, batch), want)
    pm.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    # PEFT saved the linear layers by name: only a wrapped parameter leaves something to say
    assert len(fastpeft_warnings(record)) == (1 if wrapped else 0)
    assert adapted(loaded) == targets
    assert_close(logits(loaded, batch), want)

    # merged: plain modules, PEFT's merge into the experts' parameters
    merged = fastpeft.merge_and_unload(loaded)
    assert not list(adapter_layers(merged)) and not adapted(merged)
    assert_close(logits(merged, batch), want, atol=1e-4)


@pytest.mark.parametrize("name", MOE)
def test_moe_int8_base(name):
    """int8 base: the linear layers are Int8LoRALinear, the parameters PEFT's wrapper
    adapts stay float (the warning says so); the same as PEFT on the dequantised base."""
    base = moe_base(name)
    batch = inputs(name)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", base_dtype="int8"))
    kinds = adapted(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, fastpeft.Int8LoRALinear)]
    assert sorted(linear) == sorted(k for k, kind in kinds.items() if kind == "linear")
    said = fastpeft_warnings(record)
    if "parameter" in kinds.values():
        assert len(said) == 1 and "stay float32" in said[0]
        for m in model.modules():
            if peft_lora.is_param_wrapper(m):
                assert m.get_param().dtype == torch.float32
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    # PEFT on the dequantised base, with the same LoRA weights
    reference = copy.deepcopy(base)
    for n in linear:
        layer = model.get_submodule(n)
        w = reference.get_submodule(n).weight
        with torch.no_grad():
            w.copy_(layer.dequantized_weight(w.dtype))
    pm = peft_all_linear(reference)
    assert adapted(pm) == kinds
    copy_lora(model, pm)
    assert_close(logits(model, batch), logits(pm, batch), atol=1e-4)


def test_moe_target_parameters_as_peft(tmp_path):
    """Explicit target_parameters, with rank_pattern / alpha_pattern and rsLoRA, adapt what
    PEFT adapts with the same ranks and scalings (on Qwen2-MoE too, whose "all-linear"
    leaves the experts out); the refusals name what to change."""
    base = tiny("qwen2_moe")
    if not stacked_experts(base):
        pytest.skip("this transformers keeps Qwen2-MoE's experts as nn.Linear layers")
    if not has_param_wrapper():
        pytest.skip(f"peft {peft.__version__} has no ParamWrapper")
    batch = inputs("qwen2_moe")
    kwargs = {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj"],
              "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
              "rank_pattern": {"gate_up_proj": 3}, "alpha_pattern": {"down_proj": 5}}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    with pytest.warns(UserWarning, match="PEFT's unfused forward") as record:
        ours = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**kwargs))
    assert len(fastpeft_warnings(record)) == 1
    assert adapted(ours) == adapted(pm)
    scalings = {}
    for model in (pm, ours):
        for n, m in model.named_modules():
            if peft_lora.is_param_wrapper(m):
                parts = peft_lora.lora_parts(m)
                key = param_target_key(n.removeprefix("base_model.model."), m)
                scalings.setdefault(key, []).append((parts.r, parts.scaling))
    assert scalings and all(a == b for a, b in scalings.values())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    copy_lora(pm, ours)
    want = logits(pm, batch).detach()
    assert_close(logits(ours, batch), want)
    assert_same_grads(lora_grads(ours, batch), lora_grads(pm, batch))
    # loaded into layers that exist already: the saved alpha / rsLoRA decide the scalings
    fastpeft.save_adapter(ours, tmp_path)
    with pytest.warns(UserWarning, match="PEFT's unfused forward"):
        other = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            **{**kwargs, "lora_alpha": 1, "alpha_pattern": {}, "use_rslora": False}))
    assert_close(logits(fastpeft.load_adapter(other, tmp_path), batch), want)

    with pytest.raises(ValueError, match="carries a LoRA adapter already"):
        fastpeft.inject(ours, fastpeft.LoraConfig(target_modules=[],
                                                  target_parameters=["experts.down_proj"]))
    with pytest.raises(ValueError, match="lora_dropout"):  # as PEFT's ParamWrapper
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**kwargs, lora_dropout=0.1))
    with pytest.raises(ValueError, match="has shape"):  # PEFT: 2-D and 3-D only
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            target_modules=[], target_parameters=["input_layernorm.weight"]))
    with pytest.raises(NotImplementedError, match="target_parameters="):
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["experts"]))
    with pytest.raises(TypeError, match="target_parameters"):
        fastpeft.LoraConfig(target_parameters="experts.down_proj")


def test_moe_parameters_need_peft_with_param_wrapper(monkeypatch):
    """Where the installed PEFT has no ParamWrapper (peft < 0.17) or there is no peft,
    parameter targets are refused with the module and what to install, before any change;
    the transformers 4 layout (experts as nn.Linear) needs none of it."""
    base = tiny("mixtral")
    if has_param_wrapper():  # the newest versions: pretend it is missing
        monkeypatch.setattr(peft_lora, "_PARAM_WRAPPER", ("peft.tuners.lora.layer", "Gone"))
    with pytest.raises(ImportError, match=r"peft>=0\.17"):
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            target_modules=[], target_parameters=["mlp.gate.weight"]))
    if stacked_experts(base):
        untouched = copy.deepcopy(base)
        with pytest.raises(ImportError, match=r"model\.layers\.0\.mlp\.experts.*peft>=0\.17"):
            fastpeft.inject(untouched, fastpeft.LoraConfig(target_modules="all-linear"))
        assert not list(adapter_layers(untouched))
    else:
        model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            target_modules="all-linear"))
        assert any(n.endswith("experts.0.w1") for n, _ in adapter_layers(model))


def test_from_peft_keeps_peft_forward_for_moe_parameters(tmp_path):
    """PEFT's ParamWrapper layers (transformers 5's experts and router) keep PEFT's forward
    under from_peft, with one warning; fastpeft saves them under PEFT's keys and merges
    them with PEFT's merge."""
    base = tiny("mixtral")
    if not stacked_experts(base):
        pytest.skip("this transformers keeps Mixtral's experts as nn.Linear layers")
    batch = inputs("mixtral")
    pm = peft_all_linear(base)
    want = logits(pm, batch).detach()
    with pytest.warns(UserWarning, match="keep PEFT's forward"):
        fastpeft.from_peft(pm)
    assert_close(logits(pm, batch), want)
    fastpeft.save_adapter(pm, tmp_path)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close(logits(again, batch), want)
    merged = fastpeft.merge_and_unload(pm)
    assert not adapted(merged)
    assert_close(logits(merged, batch), want, atol=1e-4)


def test_lora_errors_read_right():
    base = tiny("llama")
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carry a LoRA adapter already"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="matches no linear layer"):
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["nope"]))
    # None: PEFT's default targets for the model type, as in PEFT
    default = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=None))
    adapted = {n.rpartition(".")[2] for n, m in default.named_modules()
               if isinstance(m, fastpeft.LoRALinear)}
    assert adapted == {"q_proj", "v_proj"}
