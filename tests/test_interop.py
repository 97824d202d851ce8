"""fastpeft inside real models: inject, from_peft, save/load in PEFT's format, merge,
generate(), on tiny transformers Llama models built from configs (fp32, CPU kernels)."""

from __future__ import annotations

import copy
import inspect
import json
from contextlib import nullcontext

import pytest
import torch

import fastpeft
from fastpeft.nn import AdaptedAttention, peft_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 2, attn: str = "sdpa") -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, attn_implementation=attn)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def base():
    return tiny_llama()


@pytest.fixture
def batch():
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    return ids, mask


def loss_of(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask[:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def perturb(model, name: str, std: float = 0.2) -> None:
    """Move the zero-initialised half of the adapters off zero, so they matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if name in n:
                p.normal_(0.0, std)


def grads_and_logits(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits.square().mean()).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4)


def keep_rows(t, mask):
    return t[mask.bool()]


@pytest.fixture
def fused_calls(monkeypatch) -> dict[str, int]:
    """Counts the fused ops that converted PEFT layers run (vs PEFT's own forward)."""
    calls = {"lora_linear": 0, "int8_lora_linear": 0}
    for name in calls:
        op = getattr(peft_lora, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(peft_lora, name, counted)
    return calls


def lora_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


# --- from_peft --------------------------------------------------------------------------

def test_from_peft_lora_all_seven_projections(base, batch, fused_calls):
    ids, mask = batch
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN,
                                                   lora_dropout=0.0))
    perturb(pm, "lora_B")
    params_before = trainable(pm)
    optimizer = torch.optim.SGD(params_before.values(), lr=0.1)
    ref_logits, ref_grads = grads_and_logits(pm, ids, mask)
    layers_before = lora_layers(pm)
    assert fastpeft.from_peft(pm) is pm
    # the same PEFT layers (identity, adapters, keys), now with the fused forward
    assert lora_layers(pm) == layers_before and len(layers_before) == 7 * 2
    assert all(isinstance(m, peft_lora.FusedPeftLora) for m in layers_before)
    # the very same Parameter objects, so the optimizer built before keeps working
    assert {id(p) for p in trainable(pm).values()} == {id(p) for p in params_before.values()}
    logits, grads = grads_and_logits(pm, ids, mask)
    assert fused_calls["lora_linear"] == 14
    torch.testing.assert_close(keep_rows(logits, mask), keep_rows(ref_logits, mask),
                               atol=1e-4, rtol=1e-4)
    assert_same(grads, ref_grads)
    before = {n: p.detach().clone() for n, p in params_before.items()}
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in params_before.items())


def test_from_peft_reads_as_peft_in_status_and_repr(base, tmp_path):
    """The fused classes keep PEFT's class names where PEFT and users read them: the
    layers' repr, get_layer_status()'s module_type and get_model_status(); pickle still
    finds them by their own qualified names."""
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer_status, model_status, text = pm.get_layer_status(), pm.get_model_status(), repr(pm)
    fastpeft.from_peft(pm)
    q_proj = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__qualname__ == "FusedLinear"
    assert type(pm.base_model).__qualname__ == "FusedLoraModel"
    assert {s.module_type for s in pm.get_layer_status()} == {"lora.Linear"}
    assert pm.get_layer_status() == layer_status and pm.get_model_status() == model_status
    assert repr(pm) == text
    torch.save(pm, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj) is type(q_proj)


def test_from_peft_keeps_scaling_dropout_and_rslora(base, batch):
    ids, _ = batch
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.25,
                                                   use_rslora=True,
                                                   target_modules=["q_proj", "v_proj"]))
    perturb(pm, "lora_B")
    fastpeft.from_peft(pm)
    parts = peft_lora.lora_parts(pm.base_model.model.model.layers[0].self_attn.q_proj)
    assert parts.scaling == pytest.approx(6 / 2) and parts.use_rslora
    assert parts.lora_dropout == 0.25
    pm.train()  # dropout is live: two forwards differ; eval mode: they agree
    assert not torch.equal(pm(input_ids=ids).logits, pm(input_ids=ids).logits)
    pm.eval()
    torch.testing.assert_close(pm(input_ids=ids).logits, pm(input_ids=ids).logits, atol=0,
                               rtol=0)


def test_converted_layers_fall_back_to_peft_where_fusion_does_not_apply(base, batch,
                                                                         fused_calls):
    ids, _ = batch
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb(pm, "lora_B")
    twin = copy.deepcopy(pm)  # stays PEFT's

    def agree(calls: int) -> None:
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=ids).logits, twin(input_ids=ids).logits,
                                       atol=1e-5, rtol=1e-5)
        assert fused_calls["lora_linear"] == calls

    fastpeft.from_peft(pm)
    agree(2)  # two layers, fused
    with pm.disable_adapter(), twin.disable_adapter():
        agree(2)  # PEFT's forward: the base alone
    pm.merge_adapter()
    twin.merge_adapter()
    agree(2)
    pm.unmerge_adapter()
    twin.unmerge_adapter()
    agree(4)
    dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["v_proj"],
                                                             use_dora=True))
    with pytest.warns(UserWarning, match="keep PEFT's forward"):
        fastpeft.from_peft(dora)
    assert not any(isinstance(m, peft_lora.FusedPeftLora) for m in dora.modules())


def test_lora_on_another_tuner_keeps_peft_forward():
    """A PEFT mixed model's LoRA stacked on another tuner's layer (LoHa here): the fused op
    would read the innermost base and skip the LoHa; PEFT's forward runs, with PEFT's
    output and gradients for both adapters."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))
    model = peft.get_peft_model(base, peft.LoHaConfig(target_modules=["0"], init_weights=False),
                                adapter_name="loha", mixed=True)
    model.add_adapter("lora", peft.LoraConfig(target_modules=["0"], init_lora_weights=False))
    model.set_adapter(["loha", "lora"])
    twin = copy.deepcopy(model)
    for module in model.modules():  # (as patch_peft fuses them: from_peft takes PeftModels)
        if isinstance(module, peft.tuners.lora.LoraLayer):
            assert fastpeft.interop.fuse_lora_layer(module, {})
    x = torch.randn(4, 10)
    y, want = model(x), twin(x)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    want.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("hada" in n for n in grads) and all(g is not None for g in grads.values())
    for n, p in twin.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-6, atol=1e-6, msg=n)


def test_compiled_hotswap_preparation_keeps_peft_forward(base, batch):
    """PEFT's ``prepare_model_for_compiled_hotswap`` makes each scaling a tensor (and pads
    the ranks): the layers then run PEFT's forward, whose output the preparation keeps."""
    hotswap = pytest.importorskip("peft.utils.hotswap")
    ids, _ = batch
    pm = fastpeft.from_peft(peft.get_peft_model(base, peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)))
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        hotswap.prepare_model_for_compiled_hotswap(pm, target_rank=8)
        torch.testing.assert_close(pm(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_from_peft_adaption_prompt(base, batch):
    ids, mask = batch
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2,
                                                             task_type="CAUSAL_LM"))
    perturb(pm, "adaption_gate", std=1.0)
    params_before = trainable(pm)
    ref_logits = pm(input_ids=ids, attention_mask=mask).logits
    fastpeft.from_peft(pm)
    adapted = [m for m in pm.modules() if isinstance(m, AdaptedAttention)]
    assert len(adapted) == 2
    assert {id(p) for p in trainable(pm).values()} == {id(p) for p in params_before.values()}
    logits = pm(input_ids=ids, attention_mask=mask).logits
    # padded query rows see no sequence key: what they hold differs and is never used
    torch.testing.assert_close(keep_rows(logits, mask), keep_rows(ref_logits, mask),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_from_peft_adaption_prompt_gradients_no_padding(family, base, batch):
    ids, _ = batch
    full = torch.ones_like(ids)
    if family == "mistral":
        base = transformers.MistralForCausalLM(transformers.MistralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, sliding_window=64)).eval()
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2,
                                                             task_type="CAUSAL_LM"))
    perturb(pm, "adaption_gate", std=1.0)
    ref_logits, ref_grads = grads_and_logits(pm, ids, full)
    fastpeft.from_peft(pm)
    logits, grads = grads_and_logits(pm, ids, full)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert_same(grads, ref_grads)


def test_from_peft_bnb_int8(base, batch, fused_calls):
    bnb = pytest.importorskip("bitsandbytes")
    ids, mask = batch
    model = base
    for layer in model.model.layers:  # the MLP projections as bitsandbytes int8 layers
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                    has_fp16_weights=False)
            q.load_state_dict(lin.state_dict())
            setattr(layer.mlp, name, q.to("cpu"))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                    target_modules=["up_proj", "q_proj"]))
    perturb(pm, "lora_B")
    ref = pm(input_ids=ids, attention_mask=mask).logits
    fastpeft.from_peft(pm)
    out = pm(input_ids=ids, attention_mask=mask).logits
    assert fused_calls == {"lora_linear": 2, "int8_lora_linear": 2}
    # bitsandbytes' int8 matmul vs weight-only dequantisation: close, not identical
    rel = (keep_rows(out - ref, mask).norm() / keep_rows(ref, mask).norm()).item()
    assert rel < 2e-2


# --- inject and training ----------------------------------------------------------------

def copy_lora_from_peft(model, pm) -> None:
    """Give fastpeft's LoRA layers the weights of PEFT's (same qualified names)."""
    src = {n.replace("base_model.model.", "", 1).replace(".default", ""): p
           for n, p in pm.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(src[n])


def train(model, ids, mask, steps: int = 6, second_grads: dict | None = None) -> list[float]:
    """AdamW steps; the losses. second_grads (a dict) receives the second step's gradients
    under PEFT-independent names (at the first, a fresh lora_B or adaption gate of zeros
    leaves the other factor's gradient zero): Adam's steps do not change when a gradient
    is scaled, so the losses alone would not see a gradient off by a constant factor."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, ids, mask)
        loss.backward()
        if step == 1 and second_grads is not None:
            for n, p in model.named_parameters():
                if p.requires_grad:
                    key = n.replace("base_model.model.", "", 1).replace(".default", "")
                    second_grads[key] = p.grad.clone()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, grad in ours.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, theirs[key], atol=1e-6, rtol=1e-4, msg=key)


def test_inject_lora_follows_peft_loss_trajectory(base, batch):
    ids, mask = batch
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=SEVEN, lora_dropout=0.0))
    model = fastpeft.inject(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    copy_lora_from_peft(model, pm)
    assert trainable(model).keys() == {
        n.replace("base_model.model.", "", 1).replace(".default", "")
        for n in trainable(pm)}
    ours_grads, theirs_grads = {}, {}
    ours, theirs = train(model, ids, mask, second_grads=ours_grads), train(
        pm, ids, mask, second_grads=theirs_grads)
    assert ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-4)
    assert_same_grads(ours_grads, theirs_grads)


def test_inject_adaption_prompt_follows_peft_loss_trajectory(base, batch):
    ids, _ = batch
    full = torch.ones_like(ids)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"))
    model = fastpeft.inject(base, fastpeft.AdaptionPromptConfig(adapter_len=4,
                                                                adapter_layers=1))
    ours_attn = model.model.layers[1].self_attn
    theirs_attn = pm.base_model.model.model.layers[1].self_attn
    with torch.no_grad():
        ours_attn.adaption_prompt.copy_(theirs_attn.adaption_prompt)
    assert isinstance(ours_attn, AdaptedAttention)
    assert not isinstance(model.model.layers[0].self_attn, AdaptedAttention)
    ours_grads, theirs_grads = {}, {}
    ours, theirs = train(model, ids, full, second_grads=ours_grads), train(
        pm, ids, full, second_grads=theirs_grads)
    assert ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-4)
    assert_same_grads(ours_grads, theirs_grads)


def test_int8_base_lora_trains_like_fp32_base(base, batch):
    ids, mask = batch
    fp32 = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear"))
    int8 = fastpeft.inject(base, fastpeft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", base_dtype="int8"))
    layers = [m for m in int8.modules() if isinstance(m, fastpeft.Int8LoRALinear)]
    assert len(layers) == 14 and int8.lm_head.__class__ is torch.nn.Linear
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(trainable(fp32).items(), trainable(int8).items(),
                                    strict=True):
            assert n == n2
            p2.copy_(p)
    a, b = train(fp32, ids, mask, steps=8), train(int8, ids, mask, steps=8)
    # the int8 rounding of the base moves each step's loss by a few parts in a thousand
    # at the start, and the two runs learn as much
    assert abs(b[0] - a[0]) < 5e-3 * a[0]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=3e-2, atol=0)
    assert (b[0] - b[-1]) == pytest.approx(a[0] - a[-1], rel=0.1)


def test_inject_bottleneck_placements_identity_and_training(base, batch):
    ids, mask = batch
    ref = base(input_ids=ids, attention_mask=mask).logits
    for preset, count in (("houlsby", 4), ("pfeiffer", 2)):
        model = fastpeft.inject(copy.deepcopy(base), fastpeft.BottleneckConfig(preset))
        adapters = [n for n, m in model.named_modules()
                    if isinstance(m, fastpeft.BottleneckAdapter)]
        assert len(adapters) == count
        assert all(n.endswith((".self_attn.bottleneck_adapter", ".mlp.bottleneck_adapter"))
                   for n in adapters)
        # a fresh adapter is an identity; the base model's keys are unchanged
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref)
        assert set(base.state_dict()) <= set(model.state_dict())
        assert all("bottleneck_adapter" in n for n in trainable(model))
    losses = train(model, ids, mask)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_adaption_prompt_packed_sequences(attn, monkeypatch):
    """Packed sequences (position_ids restarting within a row, no attention_mask, as
    padding-free collators give): transformers masks block-diagonally, which the fused
    kernels do not take; the unfused attention runs there (one warning) and matches PEFT,
    and each document gets what it gets alone."""
    from fastpeft.nn import adapted_attention

    monkeypatch.setattr(fastpeft._warn, "warned", set())
    pm = peft.get_peft_model(tiny_llama(attn=attn), peft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    perturb(pm, "adaption_gate", std=2.0)
    ids = torch.randint(0, 101, (2, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5]])

    def run(model):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), {id(p): p.grad.clone() for p in trainable(model).values()}

    with torch.no_grad(), pm.disable_adapter():  # transformers < 4.5x does not mask them
        packed = pm(input_ids=ids, position_ids=pos, use_cache=False).logits
        masks = torch.allclose(packed[1:, 3:], pm(input_ids=ids[1:, 3:]).logits, atol=1e-5)
    ref_logits, ref_grads = run(pm)
    fastpeft.from_peft(pm)
    with pytest.warns(UserWarning, match="unfused attention") if masks else nullcontext():
        logits, grads = run(pm)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert_same(grads, ref_grads, atol=1e-6)
    compiled = torch.compile(pm, fullgraph=attn == "sdpa")
    if masks:
        with torch.no_grad():
            alone = pm(input_ids=ids[:1, :4]).logits
        torch.testing.assert_close(logits[:1, :4], alone, atol=1e-5, rtol=1e-5)
        # compiled: no branch on the mask's values in the graph; a packed batch is refused
        with pytest.raises(RuntimeError, match=r"under torch\.compile"):
            compiled(input_ids=ids, position_ids=pos, use_cache=False)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            keep_rows(compiled(input_ids=ids, attention_mask=mask).logits, mask),
            keep_rows(pm(input_ids=ids, attention_mask=mask).logits, mask))
    # left- or right-padded batches keep the fused kernels: causal masks with key padding
    fused = []
    monkeypatch.setattr(adapted_attention, "gated_prefix_attention",
                        lambda *a, _op=adapted_attention.gated_prefix_attention, **k:
                        fused.append(1) or _op(*a, **k))
    for pad in (slice(0, 3), slice(6, 9)):
        mask = torch.ones_like(ids)
        mask[0, pad] = 0
        with torch.no_grad():
            pm(input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(fused) == 2 * 2


def test_adaption_prompt_keeps_starcoder2_residual_dropout():
    """Starcoder2 drops out its attention's output in training (residual_dropout): with
    the gate at zero, the adapted model in training mode is the base model's, mask for
    mask."""
    config = transformers.Starcoder2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, sliding_window=None, residual_dropout=0.5)
    base = transformers.Starcoder2ForCausalLM(config).train()
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2)).train()
    ids = torch.randint(0, 101, (2, 7))
    torch.manual_seed(3)
    want = base(input_ids=ids).logits
    torch.manual_seed(3)
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, base.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adaption_prompt_and_bottleneck_under_autocast(dtype, base, batch):
    """A Trainer's bf16=True / fp16=True: the fp32 model runs under autocast. The rotary
    tables promote q and k back to fp32 while v stays in autocast's dtype, and a bottleneck
    adapter's fp32 weights meet its sublayer's autocast output: both compute in
    autocast's dtype, as PEFT's (unfused) layers do."""
    ids, mask = batch
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2,
                                                             task_type="CAUSAL_LM"))
    perturb(pm, "adaption_gate", std=1.0)
    with torch.autocast("cpu", dtype=dtype):
        ref_logits, ref_grads = grads_and_logits(pm, ids, mask)
        fastpeft.from_peft(pm)
        logits, grads = grads_and_logits(pm, ids, mask)
    assert logits.dtype == ref_logits.dtype == dtype
    torch.testing.assert_close(keep_rows(logits, mask).float(),
                               keep_rows(ref_logits, mask).float(), atol=2e-2, rtol=2e-2)
    assert_same(grads, ref_grads, atol=2e-3)

    model = fastpeft.inject(tiny_llama(), fastpeft.BottleneckConfig("houlsby"))
    perturb(model, "up_weight")
    adapter = next(m for m in model.modules() if isinstance(m, fastpeft.BottleneckAdapter))
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=dtype):
        y = adapter(x)
        loss = model(input_ids=ids, attention_mask=mask).logits.float().square().mean()
    loss.backward()
    low = copy.deepcopy(adapter).to(dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y, low(x.to(dtype)))
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in trainable(model).values())


def test_inject_combines_methods_and_freezes_the_rest(base):
    model = fastpeft.inject(base, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    model = fastpeft.inject(model, fastpeft.BottleneckConfig("pfeiffer", bottleneck_size=8))
    names = set(trainable(model))
    assert any("lora_A" in n for n in names) and any("bottleneck" in n for n in names)
    assert all("lora_" in n or "bottleneck" in n for n in names)
    assert model.model.layers[0].mlp.bottleneck_adapter.bottleneck_size == 8


def test_inject_target_modules_regex_and_all_linear(base):
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=2, target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    lora = [n for n, m in model.named_modules() if isinstance(m, fastpeft.LoRALinear)]
    assert lora == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = fastpeft.inject(base, fastpeft.LoraConfig(
        r=2, target_modules="all-linear", rank_pattern={"down_proj": 3}))
    lora = {n: m for n, m in model.named_modules() if isinstance(m, fastpeft.LoRALinear)}
    assert len(lora) == 14 and "lm_head" not in lora
    assert lora["model.layers.0.mlp.down_proj"].r == 3
    assert lora["model.layers.0.mlp.up_proj"].r == 2


# --- save / load in PEFT's format -------------------------------------------------------

def test_save_lora_loads_in_peft_and_back(base, batch, tmp_path):
    ids, mask = batch
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=SEVEN, use_rslora=True))
    perturb(model, "lora_B")
    want = model(input_ids=ids, attention_mask=mask).logits
    fastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] and "fastpeft" not in config
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want,
                               atol=1e-5, rtol=1e-5)
    again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, want)


def test_peft_saved_lora_loads_in_fastpeft(base, batch, tmp_path):
    ids, mask = batch
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", rank_pattern={"o_proj": 2}))
    perturb(pm, "lora_B")
    pm.save_pretrained(tmp_path / "peft")
    model = fastpeft.load_adapter(base, tmp_path / "peft")
    assert model.model.layers[0].self_attn.o_proj.r == 2
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               pm(input_ids=ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-5)
    # a converted PEFT model saves under the same keys PEFT uses
    fastpeft.from_peft(pm)
    fastpeft.save_adapter(pm, tmp_path / "converted")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adaption_prompt_save_load_both_ways(base, batch, tmp_path):
    ids, _ = batch
    full = torch.ones_like(ids)
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2))
    perturb(model, "adaption_gate", std=1.0)
    want = model(input_ids=ids, attention_mask=full).logits
    fastpeft.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=full).logits, want,
                               atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "peft")
    again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(again(input_ids=ids, attention_mask=full).logits, want)


def test_bottleneck_and_per_head_gate_round_trip(base, batch, tmp_path):
    ids, mask = batch
    for config in (fastpeft.BottleneckConfig("houlsby", layer_norm=True),
                   fastpeft.AdaptionPromptConfig(adapter_len=2, gate="per_head",
                                                 gate_tanh=True)):
        model = fastpeft.inject(copy.deepcopy(base), config)
        perturb(model, "up_weight")
        perturb(model, "adaption_gate")
        want = model(input_ids=ids, attention_mask=mask).logits
        fastpeft.save_adapter(model, tmp_path / type(config).__name__)
        again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / type(config).__name__)
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, want)


def test_save_load_refusals(base, tmp_path):
    with pytest.raises(ValueError, match="no fastpeft adapters"):
        fastpeft.save_adapter(base, tmp_path / "none")
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"]))
    fastpeft.inject(model, fastpeft.BottleneckConfig())
    with pytest.raises(ValueError, match="several methods"):
        fastpeft.save_adapter(model, tmp_path / "mixed")
    small = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=2,
                                                                     target_modules=["q_proj"]))
    fastpeft.save_adapter(small, tmp_path / "r2")
    big = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=3,
                                                                   target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="shape"):
        fastpeft.load_adapter(big, tmp_path / "r2")
    other = fastpeft.inject(base, fastpeft.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="missing"):
        fastpeft.load_adapter(other, tmp_path / "r2")


# --- merge_and_unload -------------------------------------------------------------------

def test_merge_and_unload(base, batch):
    ids, mask = batch
    for base_dtype in (None, "int8"):
        model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
            r=4, target_modules="all-linear", base_dtype=base_dtype))
        perturb(model, "lora_B", std=0.05)
        want = model(input_ids=ids, attention_mask=mask).logits
        merged = fastpeft.merge_and_unload(model)
        assert not any(isinstance(m, (fastpeft.LoRALinear, fastpeft.Int8LoRALinear))
                       for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want,
                                   atol=1e-5, rtol=1e-4)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"]))
    assert isinstance(fastpeft.merge_and_unload(fastpeft.from_peft(pm)),
                      transformers.LlamaForCausalLM)
    ap = fastpeft.inject(base, fastpeft.AdaptionPromptConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        fastpeft.merge_and_unload(ap)


# --- generate() with the adaption prompt ------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_adaption_prompt(attn):
    base = tiny_llama(attn=attn)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(
        adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    perturb(pm, "adaption_gate", std=2.0)
    model = copy.deepcopy(pm)
    fastpeft.from_peft(model)
    ids = torch.randint(1, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0,
              "return_dict_in_generate": True, "output_logits": True}
    ours = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    theirs = pm.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    for a, b in zip(ours.logits, theirs.logits, strict=True):  # M = 1 decode steps
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the cached decode agrees with one forward over the whole sequence
    seq = ours.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1],
                                            dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers them
    logits = model(input_ids=seq, attention_mask=full_mask, position_ids=positions).logits
    steps = torch.stack(ours.logits, dim=1)
    torch.testing.assert_close(logits[:, ids.shape[1] - 1:-1], steps, atol=1e-4, rtol=1e-4)


def test_generate_projects_the_prompt_once_per_layer(base):
    """Without gradients the prompt's keys and values are kept between calls (generation
    projects the same prompt at every step): k_proj sees the prompt once per layer over a
    whole generate(), and again after the prompt or a projection changes; with gradients,
    at every call. The tokens are those of a model that projects it every time."""
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(
        adapter_len=4, adapter_layers=2))
    perturb(model, "adaption_gate", std=2.0)
    adapted = [m for m in model.modules() if isinstance(m, fastpeft.nn.AdaptedAttention)]
    prompt_len = adapted[0].adapter_len
    seen = []
    for layer in adapted:
        layer.model.k_proj.register_forward_hook(
            lambda mod, args, out: seen.append(args[0].shape[1] == prompt_len
                                                and args[0].shape[0] == 1))
    ids = torch.randint(1, 101, (2, 6))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    tokens = model.generate(input_ids=ids, **kwargs)
    assert sum(seen) == len(adapted)
    unkept = copy.deepcopy(model)
    for layer in unkept.modules():
        if isinstance(layer, fastpeft.nn.AdaptedAttention):
            layer._prompt_modules = lambda: None  # projected at every call
    assert unkept.generate(input_ids=ids, **kwargs).tolist() == tokens.tolist()
    seen.clear()
    with torch.no_grad():
        adapted[0].adaption_prompt.mul_(3.0)  # in place: the version moves
        adapted[-1].model.v_proj.weight.add_(0.5)
    changed = model.generate(input_ids=ids, **kwargs)
    assert sum(seen) == len(adapted)
    unkept.load_state_dict(model.state_dict())
    assert unkept.generate(input_ids=ids, **kwargs).tolist() == changed.tolist()
    seen.clear()
    model.train()
    for _ in range(2):
        model(input_ids=ids).logits.sum().backward()
    assert sum(seen) == 2 * len(adapted)


def test_adapted_attention_compiles_fullgraph():
    base = tiny_llama(layers=1)
    model = fastpeft.inject(base, fastpeft.AdaptionPromptConfig(adapter_len=3))
    attn = model.model.layers[0].self_attn
    perturb(model, "adaption_gate")
    h = torch.randn(2, 5, 64)
    position_ids = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(h, position_ids)
    want, _ = attn(h, (cos, sin), None)
    got, _ = torch.compile(attn, fullgraph=True)(h, (cos, sin), None)
    torch.testing.assert_close(got, want)


# --- bad configs ------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"r": 0}, "^r:"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"target_modules": []}, "target_modules"),
    ({"base_dtype": "int4"}, "base_dtype"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"target_modules": [], "target_parameters": []}, "target_modules"),
    ({"target_parameters": ["experts.down_proj", ""]}, "target_parameters"),
])
def test_lora_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.LoraConfig(**kwargs)


def test_configs_and_inject_refuse(base):
    with pytest.raises(ValueError, match="adapter_len"):
        fastpeft.AdaptionPromptConfig(adapter_len=0)
    with pytest.raises(ValueError, match="gate"):
        fastpeft.AdaptionPromptConfig(gate="vector")
    with pytest.raises(ValueError, match="preset"):
        fastpeft.BottleneckConfig("lora")
    with pytest.raises(ValueError, match="placements"):
        fastpeft.BottleneckConfig(placements=("embedding",))
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="adapter_layers"):
        fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(adapter_layers=3))
    with pytest.raises(TypeError, match="config"):
        fastpeft.inject(base, {"r": 8})
    with pytest.raises(TypeError, match="attn"):
        AdaptedAttention(torch.nn.Linear(4, 4))


def test_config_values_refused():
    for kwargs, match in (({"scaling": float("nan")}, "^scaling"),
                          ({"scaling": float("inf")}, "^scaling"),
                          ({"placements": ("attention", "attention")}, "^placements")):
        with pytest.raises(ValueError, match=match):
            fastpeft.BottleneckConfig(**kwargs)
    with pytest.raises(TypeError, match=r"^layer_norm"):
        fastpeft.BottleneckConfig(layer_norm="yes")
    with pytest.raises(TypeError, match=r"^gate_tanh"):
        fastpeft.AdaptionPromptConfig(gate_tanh="no")


def test_inject_refusals_change_nothing(base):
    """A refused inject leaves the model as it was: every site is checked before the
    first adapter goes in."""
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.BottleneckConfig("pfeiffer"))
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="has a bottleneck adapter already"):
        fastpeft.inject(model, fastpeft.BottleneckConfig("houlsby"))
    assert [n for n, _ in model.named_modules()] == before
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.AdaptionPromptConfig(adapter_layers=1))
    with pytest.raises(ValueError, match=r"^config: model\.layers\.1\.self_attn has an adap"):
        fastpeft.inject(model, fastpeft.AdaptionPromptConfig(adapter_layers=2))
    assert not isinstance(model.model.layers[0].self_attn, AdaptedAttention)


def test_lora_after_a_bottleneck_on_the_same_linear_refused():
    """BERT's bottleneck adapters sit on linear layers (attention.output.dense): a fused
    LoRA layer put there afterwards would bypass the adapter's hook."""
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=101))
    model = fastpeft.inject(bert, fastpeft.BottleneckConfig("houlsby"))
    for config in (fastpeft.LoraConfig(target_modules=["dense"]),
                   {"a": fastpeft.LoraConfig(target_modules=["dense"]),
                    "b": fastpeft.LoraConfig(target_modules=["dense"])}):
        with pytest.raises(ValueError, match="has a bottleneck adapter already; inject the "):
            fastpeft.inject(model, config)
    # the other order composes: the adapter on the LoRA layer's output
    other = fastpeft.inject(transformers.BertForMaskedLM(bert.config), fastpeft.LoraConfig(
        target_modules=["attention.output.dense"]))
    fastpeft.inject(other, fastpeft.BottleneckConfig("houlsby"))
    dense = other.bert.encoder.layer[0].attention.output.dense
    assert isinstance(dense, fastpeft.LoRALinear) and hasattr(dense, "bottleneck_adapter")


def test_from_peft_converts_every_adaption_prompt_adapter(base, batch):
    """PEFT keeps the attentions of the adapters not active aside: they are converted too,
    and set_adapter puts fastpeft's in place."""
    ids, mask = batch
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    pm.add_adapter("b", peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1,
                                                  task_type="CAUSAL_LM"))
    pm.set_adapter("b")
    perturb(pm, "adaption_gate", std=1.0)
    want_b = pm(input_ids=ids, attention_mask=mask).logits
    pm.set_adapter("default")
    perturb(pm, "adaption_gate", std=1.0)
    want_default = pm(input_ids=ids, attention_mask=mask).logits
    fastpeft.from_peft(pm)
    for name, want, count in (("b", want_b, 1), ("default", want_default, 2)):
        pm.set_adapter(name)
        assert sum(isinstance(m, AdaptedAttention) for m in pm.modules()) == count
        torch.testing.assert_close(keep_rows(pm(input_ids=ids, attention_mask=mask).logits,
                                             mask), keep_rows(want, mask),
                                   atol=1e-5, rtol=1e-5)


def test_saved_task_type_of_gpt2(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=4, vocab_size=101, n_positions=32))
    fastpeft.save_adapter(fastpeft.inject(gpt2, fastpeft.LoraConfig(target_modules=["c_attn"])),
                          tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


# --- modes, dtypes, PEFT's own saving, refusals -----------------------------------

def test_new_layers_take_the_replaced_layers_mode(base, batch):
    ids, _ = batch
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_dropout=0.5, target_modules="all-linear"))
    fastpeft.inject(model, fastpeft.AdaptionPromptConfig(adapter_len=2))
    fastpeft.inject(model, fastpeft.BottleneckConfig("houlsby"))
    assert not any(m.training for m in model.modules())  # base is in eval mode
    perturb(model, "lora_B")
    with torch.no_grad():  # no dropout in eval mode: deterministic
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=0, rtol=0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_dropout=0.5,
                                                   target_modules=["q_proj"])).eval()
    fastpeft.from_peft(pm)
    assert not any(m.training for m in pm.modules())


def test_peft_save_pretrained_still_saves_a_converted_model(base, batch, tmp_path):
    ids, mask = batch
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=SEVEN))
    perturb(pm, "lora_B")
    want = pm(input_ids=ids, attention_mask=mask).logits
    fastpeft.from_peft(pm)
    pm.save_pretrained(tmp_path)  # what HF Trainer checkpoints call
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want,
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # PEFT's load_adapter into the converted model lands too
        for p in trainable(pm).values():
            p.zero_()
    pm.load_adapter(tmp_path, adapter_name="default")
    torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, want,
                               atol=1e-5, rtol=1e-5)


def test_load_adapter_sets_the_saved_hyperparameters(base, batch, tmp_path):
    ids, mask = batch
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 1}))
    perturb(pm, "lora_B")
    pm.save_pretrained(tmp_path / "peft")
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 1}))
    fastpeft.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               pm(input_ids=ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-5)
    fastpeft.from_peft(pm)  # a PEFT model is saved by PEFT: its own config
    fastpeft.save_adapter(pm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"] == {"v_proj": 1}
    # into a PEFT model (from_peft) made with other hyperparameters: they follow the file
    other = fastpeft.from_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 1})))
    fastpeft.load_adapter(other, tmp_path / "peft")
    torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits,
                               pm(input_ids=ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-5)
    assert other.peft_config["default"].lora_alpha == 32
    assert other.peft_config["default"].use_rslora


def test_peft_models_save_and_merge_as_peft_does(base, batch, tmp_path):
    """A PEFT model trains more than LoRA's A and B (modules_to_save, biases) and has a
    task type: save_adapter writes what PEFT's save_pretrained writes, and merge_and_unload
    leaves no PEFT module behind."""
    ids, mask = batch
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
        bias="all", task_type="CAUSAL_LM"))
    fastpeft.from_peft(pm)
    perturb(pm, "lora_B")
    perturb(pm, "modules_to_save", std=0.05)
    want = pm(input_ids=ids, attention_mask=mask).logits
    fastpeft.save_adapter(pm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["bias"] == "all"
    assert config["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want,
                               atol=1e-5, rtol=1e-5)
    merged = fastpeft.merge_and_unload(pm)
    assert type(merged) is type(base)
    assert not any(isinstance(m, (peft.tuners.tuners_utils.BaseTunerLayer,
                                  peft.utils.other.ModulesToSaveWrapper))
                   for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want,
                               atol=1e-5, rtol=1e-5)


def test_linear_subclasses_with_their_own_forward(base, batch):
    """An nn.Linear subclass with a forward of its own (a head that scales its logits):
    the fused LoRA, computing x @ weight.T + bias, would bypass it. from_peft keeps PEFT's
    forward there; inject refuses it as a named target and leaves it out of all-linear."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 3.0 * super().forward(x)

    def scaled(model):
        for i in range(2):
            old = model.model.layers[i].mlp.down_proj
            new = Scaled(old.in_features, old.out_features, bias=False)
            new.weight = old.weight
            model.model.layers[i].mlp.down_proj = new
        return model

    ids, mask = batch
    pm = peft.get_peft_model(scaled(copy.deepcopy(base)), peft.LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"]))
    perturb(pm, "lora_B")
    want = pm(input_ids=ids, attention_mask=mask).logits
    with pytest.warns(UserWarning, match="down_proj"):
        fastpeft.from_peft(pm)
    torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, want)
    assert sum(isinstance(m, peft_lora.FusedPeftLora) for m in pm.modules()) == 2
    with pytest.raises(NotImplementedError, match=r"^target_modules: .*down_proj \(Scaled\)"):
        fastpeft.inject(scaled(copy.deepcopy(base)),
                        fastpeft.LoraConfig(target_modules=["q_proj", "down_proj"]))
    with pytest.warns(UserWarning, match="all-linear' leaves .*down_proj"):
        model = fastpeft.inject(scaled(copy.deepcopy(base)),
                                fastpeft.LoraConfig(target_modules="all-linear"))
    assert isinstance(model.model.layers[0].mlp.down_proj, Scaled)
    assert isinstance(model.model.layers[0].mlp.up_proj, fastpeft.LoRALinear)
    with pytest.raises(TypeError, match=r"^base: Scaled has a forward of its own"):
        fastpeft.LoRALinear(Scaled(4, 4), r=2)
    with pytest.raises(TypeError, match=r"^base: Scaled has a forward of its own"):
        fastpeft.MultiLoRALinear(Scaled(4, 4))


def test_int8_models_in_half_precision(batch):
    bnb = pytest.importorskip("bitsandbytes")
    ids, mask = batch
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_llama().to(dtype)
        for name, lin in list(model.named_modules()):
            if name.endswith(("q_proj", "k_proj", "v_proj", "up_proj")):
                q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                        has_fp16_weights=False, threshold=0.0)
                q.load_state_dict(lin.state_dict())
                model.set_submodule(name, q.to("cpu"))
        # PEFT keeps the adapter weights in float32 on a half-precision model
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=4, target_modules=["q_proj", "up_proj", "o_proj"]))
        assert pm.base_model.model.model.layers[0].mlp.up_proj.lora_A.default.weight.dtype \
            == torch.float32
        perturb(pm, "lora_B", std=0.05)
        want = pm(input_ids=ids, attention_mask=mask).logits.float()
        fastpeft.from_peft(pm)
        got = pm(input_ids=ids, attention_mask=mask).logits
        assert got.dtype == dtype
        rel = (keep_rows(got.float() - want, mask).norm() / keep_rows(want, mask).norm())
        assert rel < 3e-2
        injected = fastpeft.inject(copy.deepcopy(model), fastpeft.LoraConfig(
            r=4, target_modules=["q_proj", "up_proj"]))
        fastpeft.inject(injected, fastpeft.AdaptionPromptConfig(adapter_len=2))
        fastpeft.inject(injected, fastpeft.BottleneckConfig("pfeiffer"))
        assert injected.model.layers[1].self_attn.adaption_prompt.dtype == dtype
        loss_of(injected, ids, mask).backward()


def test_refusals_found_in_review(base, tmp_path):
    houlsby = fastpeft.inject(copy.deepcopy(base), fastpeft.BottleneckConfig("houlsby"))
    with pytest.raises(ValueError, match="before the BottleneckConfig"):
        fastpeft.inject(houlsby, fastpeft.AdaptionPromptConfig())
    model = fastpeft.inject(base, fastpeft.AdaptionPromptConfig(adapter_len=2))
    extra = {"max_batch_size": 1} if "max_batch_size" in inspect.signature(
        transformers.StaticCache.__init__).parameters else {}  # transformers < 4.56
    cache = transformers.StaticCache(config=model.config, max_cache_len=16, **extra)
    with pytest.raises(NotImplementedError, match="static cache"):
        model(input_ids=torch.randint(0, 101, (1, 4)), past_key_values=cache)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=101, attn_logit_softcapping=50.0))
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        fastpeft.inject(gemma, fastpeft.AdaptionPromptConfig())
    dropping = tiny_llama()
    dropping.config.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="attention_dropout"):
        fastpeft.inject(dropping, fastpeft.AdaptionPromptConfig())
    ids = torch.randint(0, 101, (1, 6))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, sliding_window=4)).eval()
    windowed = fastpeft.inject(mistral, fastpeft.AdaptionPromptConfig(adapter_len=2))
    windowed(input_ids=ids[:, :4])  # within the window
    with pytest.raises(NotImplementedError, match="sliding_window: 6 keys exceed"):
        windowed(input_ids=ids)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[0]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="layers_to_transform"):
        fastpeft.load_adapter(tiny_llama(), tmp_path)
