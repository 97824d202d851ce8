"""Mixed-adapter batches in real models: PEFT's ``adapter_names`` call on a model converted by
``fastpeft.from_peft`` runs ``fastpeft.multi_lora_linear`` and gives PEFT's logits, trains
(each adapter gets the gradient of its own rows), and generates as PEFT does."""

from __future__ import annotations

import copy
import json

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


def _has_alora() -> bool:
    import inspect

    return "alora_invocation_tokens" in inspect.signature(peft.LoraConfig).parameters


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


def _pre_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_refused_mixed_training_leaves_no_hooks_behind():
    """A mixed training batch refused from inside the forward (adapters with different
    dropout) leaves none of PEFT's ``adapter_names`` hooks on the layers (PEFT's context
    removes them only after a call that returns): later calls, plain or mixed, of other
    batch sizes, in training and eval, run as if it had not happened."""
    model = peft_model(dropout=0.1)
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["sql"].p = 0.2
    fused = fastpeft.from_peft(model).train()
    hooks = _pre_hooks(fused)
    with pytest.raises(ValueError, match="different lora_dropout"):
        fused(input_ids=batch(), adapter_names=NAMES)
    assert _pre_hooks(fused) == hooks
    fused(input_ids=batch(3)).logits.sum().backward()  # the active adapter, on 3 rows
    fused.eval()
    with torch.no_grad():
        fused(input_ids=batch(2), adapter_names=["sql", "math"])
        fused(input_ids=batch(4))
    assert _pre_hooks(fused) == hooks


def test_mixed_training_refusals_name_the_cause():
    """Mixed training batches fastpeft cannot train are refused, naming ``adapter_names`` and
    why: under gradient checkpointing (its recomputation would run without the names: the
    gradients were wrong, or torch's checkpoint failed); the model runs on afterwards."""
    fused = fastpeft.from_peft(peft_model()).train()
    # (transformers 5.x renamed it activation checkpointing)
    what = "activation" if hasattr(fused, "activation_checkpointing_enable") else "gradient"
    getattr(fused, f"{what}_checkpointing_enable")()
    hooks = _pre_hooks(fused)
    with pytest.raises(ValueError, match=r"adapter_names: .*gradient checkpointing"):
        fused(input_ids=batch(), adapter_names=NAMES)
    assert _pre_hooks(fused) == hooks
    getattr(fused, f"{what}_checkpointing_disable")()
    fused(input_ids=batch(), adapter_names=NAMES).logits.sum().backward()


@pytest.mark.parametrize("how", ["checkpoint_wrapper", "reentrant", "non_reentrant"])
def test_mixed_training_under_torch_checkpointing_refused(how):
    """Activation checkpointing applied by torch itself (``checkpoint_wrapper``, as FSDP
    applies it; ``torch.utils.checkpoint`` in a model's own code) recomputes a mixed batch's
    forward in backward without its ``adapter_names``, which gave every row the active
    adapter (wrong gradients) or a CheckpointError: refused, naming the cause; a plain
    training step runs afterwards."""
    import functools

    import torch.utils.checkpoint as checkpoint
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as wrapper

    fused = fastpeft.from_peft(peft_model()).train()
    fused.enable_input_require_grads()
    layer = fused.base_model.model.model.layers[0]
    if how == "checkpoint_wrapper":
        wrapper.apply_activation_checkpointing(
            fused, checkpoint_wrapper_fn=functools.partial(
                wrapper.checkpoint_wrapper, checkpoint_impl=wrapper.CheckpointImpl.REENTRANT),
            check_fn=lambda m: m is layer)
        with pytest.raises(ValueError, match=r"adapter_names: .*gradient checkpointing"):
            fused(input_ids=batch(), adapter_names=NAMES)
        return
    forward = layer.forward
    layer.forward = lambda h, *args, **kwargs: checkpoint.checkpoint(
        lambda h: forward(h, *args, **kwargs), h, use_reentrant=how == "reentrant")
    loss = fused(input_ids=batch(), adapter_names=NAMES).logits.square().mean()
    with pytest.raises(RuntimeError, match=r"adapter_names: .*activation checkpointing"):
        loss.backward()
    del layer.forward
    fused.zero_grad()
    fused(input_ids=batch()).logits.square().mean().backward()


def test_per_sequence_names_refused_on_a_vision_encoder():
    """A vision tower's batch is the images, not the sequences (a sequence may hold none or
    several): per-sequence names cannot be matched to its rows, and were matched by
    position. Refused, naming the layer; one name for the batch, or adapting the language
    model alone, runs."""
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=97),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=1, num_attention_heads=4,
                                                    image_size=16, patch_size=4),
        image_token_index=96)
    torch.manual_seed(0)
    base = transformers.LlavaForConditionalGeneration(config).eval()
    model = fastpeft.inject(copy.deepcopy(base), {
        a: fastpeft.LoraConfig(r=4, target_modules="all-linear") for a in ("a", "b")})
    with pytest.raises(ValueError, match=r"names: .*vision_tower.*one adapter name"):
        fastpeft.set_adapter_names(model, ["a", "b"])
    fastpeft.set_adapter_names(model, ["b", "b"])
    text_only = fastpeft.inject(copy.deepcopy(base), {
        a: fastpeft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q|v)_proj")
        for a in ("a", "b")})
    with fastpeft.set_adapter_names(text_only, ["a", "b"]), torch.no_grad():
        text_only(input_ids=batch(2))


def test_adapters_added_after_from_peft_are_fused(monkeypatch):
    """``add_adapter`` on a converted model: the LoRA layers PEFT makes for the new adapter's
    other targets are fused too, so the mixed batch gives PEFT's logits through the fused op
    on every layer, and trains; a DoRA adapter added afterwards keeps PEFT's forward on its
    new layers, with one warning."""
    reference = peft_model()
    (first, kwargs), *rest = ADAPTERS.items()
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs), adapter_name=first)
    fastpeft.from_peft(model)
    for name, kwargs in rest:  # "chat" targets all linear layers, "sql" three of them
        model.add_adapter(name, peft.LoraConfig(**kwargs))
    model.load_state_dict(reference.state_dict())
    lora = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora) == 14 and all(isinstance(m, peft_lora.FusedPeftLora) for m in lora)
    ids = batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=NAMES).logits
        logits, calls = calls_of(model.eval(), ids, NAMES, monkeypatch)
    assert calls == len(lora)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():  # PEFT leaves added adapters frozen
        p.requires_grad_("lora_" in name)
    model.train()(input_ids=ids, adapter_names=NAMES).logits.square().mean().backward()
    assert model.base_model.model.model.layers[0].mlp.up_proj.lora_A["chat"].weight.grad \
        .abs().sum() > 0

    monkeypatch.setattr(fastpeft._warn, "warned", set())
    dora = peft.LoraConfig(r=2, target_modules=["lm_head"], use_dora=True)
    with pytest.warns(UserWarning, match="add_adapter: PEFT LoRA layers .*DoRA") as record:
        model.add_adapter("dora", dora)
        model.add_adapter("dora2", copy.deepcopy(dora))
    assert len([w for w in record if "add_adapter" in str(w.message)]) == 1
    head = model.base_model.model.lm_head
    assert not isinstance(head, peft_lora.FusedPeftLora)


@pytest.mark.skipif(not _has_alora(), reason="this PEFT has no aLoRA (alora_invocation_tokens)")
def test_lora_variants_keep_peft_forward():
    """An adapter PEFT computes as a LoRA variant (here aLoRA: active from its invocation
    tokens on) is not fused as plain LoRA: PEFT's logits, active alone or after
    ``set_adapter``."""
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                adapter_name="plain")
    model.add_adapter("alora", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               alora_invocation_tokens=[5, 6]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    ids = torch.randint(7, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    ids[:, 3], ids[:, 4] = 5, 6
    fused = fastpeft.from_peft(copy.deepcopy(model))
    for adapter in ("plain", "alora"):
        model.set_adapter(adapter)
        fused.set_adapter(adapter)
        with torch.no_grad():
            torch.testing.assert_close(fused(input_ids=ids).logits,
                                       model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_patch_peft_models_train_mixed_batches():
    """A model PEFT builds under ``patch_peft`` (as a Trainer does) takes mixed training
    batches as one ``from_peft`` makes does, with the same gradients."""
    fastpeft.patch_peft()
    try:
        patched = peft_model()
    finally:
        fastpeft.unpatch_peft()
    converted = fastpeft.from_peft(peft_model())
    grads = []
    for model in (patched, converted):
        model.train()(input_ids=batch(), adapter_names=NAMES).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_save_after_serving(tmp_path):
    """``torch.save`` of a converted model after a serving call, which keeps the stacked
    adapters (and their weights' storages) between calls: saved without them, and loaded
    it serves the same logits."""
    fused = fastpeft.from_peft(peft_model())
    ids = batch()
    with torch.no_grad():
        want = fused(input_ids=ids, adapter_names=NAMES).logits
    torch.save(fused, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, adapter_names=NAMES).logits, want)


def test_save_adapter_of_a_peft_model_with_several_adapters(tmp_path):
    """``fastpeft.save_adapter`` of a ``from_peft`` model with several adapters writes every
    one (PEFT's own layout, by PEFT's writer), whichever is active; loaded into a plain
    model, the mixed batch gives PEFT's logits."""
    reference = peft_model()
    fused = fastpeft.from_peft(copy.deepcopy(reference))
    fused.set_adapter("math")  # on q_proj and o_proj only
    fastpeft.save_adapter(fused, tmp_path)
    assert {"sql", "chat", "math"} <= {p.name for p in tmp_path.iterdir()}
    plain = tiny_llama()
    for adapter in ADAPTERS:
        fastpeft.load_adapter(plain, tmp_path / adapter, adapter_name=adapter)
    ids = batch()
    with torch.no_grad():
        want = reference(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(logits_of(plain, ids, NAMES), want, rtol=1e-5, atol=1e-5)


# --- several adapters injected into a plain model (MultiLoRALinear), saved and loaded ----

CONFIGS = {  # different ranks, alphas, targets (a layer gets the adapters that target it)
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "chat": dict(r=8, lora_alpha=4, target_modules="all-linear"),
    "math": dict(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], use_rslora=True,
                 rank_pattern={"layers.1.self_attn.q_proj": 3}),
}
ROWS = ["chat", "__base__", "default", "math", "chat"]


def llama64() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def injected(base=None, dropout: float = 0.0) -> torch.nn.Module:
    model = fastpeft.inject(copy.deepcopy(base or llama64()), {
        a: fastpeft.LoraConfig(**c, lora_dropout=dropout) for a, c in CONFIGS.items()})
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return model


def ids128(n: int = len(ROWS), length: int = 6):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(3))


def logits_of(model, ids, names) -> torch.Tensor:
    with torch.no_grad(), fastpeft.set_adapter_names(model, names):
        return model(input_ids=ids).logits


def multi_layers(model) -> dict[str, list[str]]:
    return {n: m.adapter_names for n, m in model.named_modules()
            if isinstance(m, fastpeft.MultiLoRALinear)}


def test_inject_several_adapters_and_pick_them_per_sequence():
    model = injected()
    layers = multi_layers(model)
    assert len(layers) == 2 * 7  # the union of the targets: every linear but lm_head
    assert layers["model.layers.0.self_attn.q_proj"] == ["default", "chat", "math"]
    assert layers["model.layers.0.mlp.up_proj"] == ["chat"]
    q1 = model.model.layers[1].self_attn.q_proj
    assert q1.r["math"] == 3 and q1.scaling["math"] == 6 / 3 ** 0.5  # rank_pattern, rsLoRA
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in model.state_dict() if ".lora_" in n}
    ids = ids128()
    mixed = logits_of(model, ids, ROWS)
    for row, name in enumerate(ROWS):  # each row as its adapter alone computes it
        alone = logits_of(model, ids[row:row + 1], name)  # one name: every sequence
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = llama64()(input_ids=ids[1:2]).logits
    torch.testing.assert_close(mixed[1:2], plain, rtol=1e-5, atol=1e-5)  # "__base__"
    # the names stay set; as a context manager, the previous ones come back on exit
    fastpeft.set_adapter_names(model, "chat")
    with fastpeft.set_adapter_names(model, ROWS):
        assert model.model.layers[0].mlp.up_proj.active_names == tuple(ROWS)
    assert model.model.layers[0].mlp.up_proj.active_names == "chat"
    fastpeft.set_adapter_names(model, None)  # none set: "default", the base where absent
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   logits_of(model, ids, "default"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no adapter \['sql'\] in the model"):
        fastpeft.set_adapter_names(model, ["chat", "sql"])
    with fastpeft.set_adapter_names(model, ["chat", "math"]), \
            pytest.raises(ValueError, match="2 names set"):
        model(input_ids=ids[:3])


def test_injected_mixed_batch_trains_each_adapter_on_its_rows():
    """Each adapter's gradient from the mixed batch equals that of its sub-batch trained
    alone; an adapter no row names gets none (or zero)."""
    model = injected().train()
    ids = ids128()
    with fastpeft.set_adapter_names(model, ROWS):
        loss = model(input_ids=ids).logits.square().mean()
    loss.backward()  # (outside the context: the ids were saved with the graph)
    ref = injected().train()
    total = 0.0
    for name in dict.fromkeys(ROWS):
        rows = [i for i, a in enumerate(ROWS) if a == name]
        with fastpeft.set_adapter_names(ref, name):
            logits = ref(input_ids=ids[rows]).logits
        part = logits.square().sum() / (len(ROWS) * logits[0].numel())
        part.backward()
        total += part.item()
    torch.testing.assert_close(loss.item(), total, rtol=1e-5, atol=0)
    ours = dict(model.named_parameters())
    checked = 0
    for n, p in ref.named_parameters():
        if p.requires_grad:
            g = ours[n].grad if ours[n].grad is not None else torch.zeros_like(p)
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=n)
            checked += int(torch.count_nonzero(want) > 0)
    assert checked > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_injected_mixed_batch_trains_under_gradient_checkpointing(reentrant):
    """Under gradient checkpointing the recomputation in backward reads the names set, so
    with backward inside ``set_adapter_names`` the gradients are those without it."""
    grads = []
    for checkpointing in (False, True):
        model = injected().train()
        if checkpointing:
            what = "activation" if hasattr(model, "activation_checkpointing_enable") \
                else "gradient"  # (transformers 5.x renamed it)
            getattr(model, f"{what}_checkpointing_enable")(
                {"use_reentrant": reentrant})
            model.enable_input_require_grads()  # (reentrant: older transformers do not)
        with fastpeft.set_adapter_names(model, ROWS):
            model(input_ids=ids128()).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # backward after the context exited would recompute with other names: refused
    with fastpeft.set_adapter_names(model, ROWS):
        loss = model(input_ids=ids128()).logits.square().mean()
    with pytest.raises(RuntimeError, match=r"adapter_names: .* runs again in backward"):
        loss.backward()


def test_save_several_adapters_in_peft_layout_and_load_both_ways(tmp_path):
    from safetensors.torch import load_file

    base = llama64()
    model = injected(base)
    ids = ids128()
    expected = logits_of(model, ids, ROWS)
    fastpeft.save_adapter(model, tmp_path)
    # PEFT's layout: "default" at the root, the others in subdirectories; keys unnamed
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "chat", "math"}
    math = json.loads((tmp_path / "math" / "adapter_config.json").read_text())
    assert (math["r"], math["lora_alpha"], math["use_rslora"]) == (2, 6, True)
    assert math["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 3}
    assert sorted(load_file(tmp_path / "math" / "adapter_model.safetensors")) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{x}.weight"
        for i in (0, 1) for m in ("q_proj", "o_proj") for x in "AB")
    # PEFT reads it as its own, and gives the same mixed batch
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for name in ("chat", "math"):
        pm.load_adapter(tmp_path / name, adapter_name=name)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=ROWS).logits, expected,
                                   rtol=1e-4, atol=1e-5)
    # and fastpeft: a plain model gets the three adapters back
    again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert multi_layers(again) == multi_layers(model)
    torch.testing.assert_close(logits_of(again, ids, ROWS), expected, rtol=0, atol=0)
    # a model that has the adapters takes the saved hyperparameters and tensors
    other = injected(base)
    other.model.layers[0].self_attn.q_proj.scaling["chat"] = 9.0
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_" in n:
                p.zero_()
    fastpeft.load_adapter(other, tmp_path)
    torch.testing.assert_close(logits_of(other, ids, ROWS), expected, rtol=0, atol=0)


def peft_several(base) -> torch.nn.Module:
    pm = None
    for name, kwargs in CONFIGS.items():
        config = peft.LoraConfig(**kwargs)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return pm.eval()


def test_peft_saved_adapters_load_into_a_plain_model(tmp_path):
    base = llama64()
    pm = peft_several(base)
    pm.save_pretrained(tmp_path / "peft")
    model = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert sorted(model.model.layers[0].self_attn.q_proj.adapter_names) == \
        ["chat", "default", "math"]
    ids = ids128()
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=ROWS).logits
    torch.testing.assert_close(logits_of(model, ids, ROWS), expected, rtol=1e-4, atol=1e-5)
    for name in CONFIGS:  # each adapter alone, as PEFT's active adapter
        pm.set_adapter(name)
        with torch.no_grad():
            want = pm(input_ids=ids).logits
        torch.testing.assert_close(logits_of(model, ids, name), want, rtol=1e-4, atol=1e-5)
    # and back: fastpeft's save of them loads into PEFT with PEFT's tensors
    fastpeft.save_adapter(model, tmp_path / "ours")
    from safetensors.torch import load_file
    for sub in ("", "chat", "math"):
        a = load_file(tmp_path / "peft" / sub / "adapter_model.safetensors")
        b = load_file(tmp_path / "ours" / sub / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_adapter_directories_join_under_a_name(tmp_path):
    """Adapters trained and saved one by one (PEFT's single layout) served together:
    ``load_adapter(..., adapter_name=...)``; a single directory with no name keeps loading
    as before (a LoRALinear model), a Trainer checkpoint beside it is not an adapter."""
    base = llama64()
    pm = peft_several(base)
    for name in ("chat", "math"):
        pm.save_pretrained(tmp_path / "all", selected_adapters=[name])
    model = copy.deepcopy(base)
    for name in ("chat", "math"):
        fastpeft.load_adapter(model, tmp_path / "all" / name, adapter_name=name)
    ids = ids128()
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=["chat", "math", "__base__", "math",
                                                    "chat"]).logits
    got = logits_of(model, ids, ["chat", "math", "__base__", "math", "chat"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    single = tmp_path / "all" / "chat"
    (single / "checkpoint-5").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (single / "checkpoint-5" / f).write_bytes((single / f).read_bytes())
    (single / "checkpoint-5" / "trainer_state.json").write_text("{}")
    plain = fastpeft.load_adapter(copy.deepcopy(base), single)
    assert not multi_layers(plain)
    assert isinstance(plain.model.layers[0].mlp.up_proj, fastpeft.LoRALinear)


def test_generate_with_mixed_adapters():
    """Greedy generate() with the KV cache, one adapter per sequence: PEFT's tokens; with
    beams, each name repeated as generate repeats its sequence."""
    model = injected()
    ids = ids128(length=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with fastpeft.set_adapter_names(model, ROWS):
        ours = model.generate(input_ids=ids, **kwargs)
    assert ours.shape == (len(ROWS), 9)
    tmp = {}
    for row, name in enumerate(ROWS):
        with fastpeft.set_adapter_names(model, name):
            tmp[row] = model.generate(input_ids=ids[row:row + 1], **kwargs)
        assert torch.equal(ours[row:row + 1], tmp[row]), (row, name)
    beams = dict(kwargs, num_beams=2, num_return_sequences=2)
    with fastpeft.set_adapter_names(model, ROWS[:3]):
        mixed = model.generate(input_ids=ids[:3], **beams)
    for row, name in enumerate(ROWS[:3]):
        with fastpeft.set_adapter_names(model, name):
            alone = model.generate(input_ids=ids[row:row + 1], **beams)
        assert torch.equal(mixed[2 * row:2 * row + 2], alone), (row, name)


def test_generate_matches_peft_mixed_batch(tmp_path):
    base = llama64()
    pm = peft_several(base)
    pm.save_pretrained(tmp_path)
    model = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    ids = ids128(length=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with fastpeft.set_adapter_names(model, ROWS):
        ours = model.generate(input_ids=ids, **kwargs)
    torch.testing.assert_close(ours, pm.generate(input_ids=ids, adapter_names=ROWS, **kwargs),
                               rtol=0, atol=0)


def test_several_adapters_refusals(tmp_path):
    base = llama64()
    lora = fastpeft.LoraConfig(r=2, target_modules=["q_proj"])
    for configs, error, match in [
        ({}, ValueError, "empty dict"),
        ({"a.b": lora}, ValueError, "without '.'"),
        ({"__base__": lora}, ValueError, "__base__"),
        ({"a": fastpeft.AdaptionPromptConfig()}, TypeError, "expected a LoraConfig"),
        ({"a": fastpeft.LoraConfig(base_dtype="int8")}, NotImplementedError, "base_dtype"),
        ({"a": lora, "b": fastpeft.LoraConfig(target_modules=["nope"])}, ValueError,
         r"config\['b'\].*matches no linear layer"),
    ]:
        untouched = copy.deepcopy(base)
        with pytest.raises(error, match=match):
            fastpeft.inject(untouched, configs)
        assert not multi_layers(untouched)  # refused before anything changed
    model = fastpeft.inject(copy.deepcopy(base), {"a": lora})
    with pytest.raises(ValueError, match="has an adapter 'a' already"):
        fastpeft.inject(model, {"a": lora})
    fastpeft.inject(model, {"b": fastpeft.LoraConfig(target_modules=["q_proj", "v_proj"])})
    assert multi_layers(model)["model.layers.0.self_attn.q_proj"] == ["a", "b"]
    assert multi_layers(model)["model.layers.0.self_attn.v_proj"] == ["b"]
    with pytest.raises(ValueError, match="carry a LoRA adapter already"):
        fastpeft.inject(model, lora)  # a single adapter on top
    with pytest.raises(ValueError, match="several adapters"):
        fastpeft.merge_and_unload(model)
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        fastpeft.set_adapter_names(base, "a")
    single = fastpeft.inject(copy.deepcopy(base), lora)
    with pytest.raises(ValueError, match="single LoRA adapter already"):
        fastpeft.inject(single, {"a": lora})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    fastpeft.save_adapter(model, tmp_path)
    pm = fastpeft.from_peft(peft_several(base))  # a PEFT model loads them by PEFT's loader
    fastpeft.load_adapter(pm, tmp_path)
    ids, names = ids128(3), ["a", "b", "__base__"]
    with torch.no_grad():
        got = pm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, logits_of(model, ids, names), rtol=1e-4, atol=1e-5)


def test_no_names_runs_default_and_the_base_where_a_layer_lacks_it():
    """With no names set, a model holding "default" on some layers runs it there and the
    base alone on the layers without it (chat's all-linear ones), as PEFT runs its active
    adapter; a model without "default" still asks for names."""
    base = llama64()
    model = injected(base)
    ids = ids128(2)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, logits_of(model, ids, "default"), rtol=0, atol=0)
    pm = peft_several(base)  # the same adapters in PEFT, "default" active
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # layer.lora_A.<adapter>.weight: PEFT's key in the PEFT model
                pm.get_parameter(f"base_model.model.{n}").copy_(p)
        pm.set_adapter("default")
        torch.testing.assert_close(got, pm(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    without = fastpeft.inject(copy.deepcopy(base), {"a": fastpeft.LoraConfig(
        target_modules=["q_proj"])})
    with pytest.raises(ValueError, match="adapter_names / adapter_ids: pass exactly one"):
        without(input_ids=ids)


def test_second_all_linear_inject_adapts_the_base_layers_only():
    """An adapter's own lora_A / lora_B linears are not targets of a later inject."""
    model = injected()
    before = multi_layers(model)
    fastpeft.inject(model, {"extra": fastpeft.LoraConfig(r=2, target_modules="all-linear")})
    after = multi_layers(model)
    assert set(after) == set(before)  # no MultiLoRALinear inside another one
    assert all(names == before[n] + ["extra"] for n, names in after.items())
    for layer in (m for m in model.modules() if isinstance(m, fastpeft.MultiLoRALinear)):
        assert all(type(m) is torch.nn.Linear for m in layer.lora_A.values())


@pytest.mark.parametrize("name", ["a/b", "..\\up", "/abs", "x.y", "__base__", ""])
def test_adapter_names_that_are_paths_refused(name, tmp_path):
    lora = fastpeft.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="config: adapter names"):
        fastpeft.inject(llama64(), {name: lora})
    layer = fastpeft.MultiLoRALinear(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="name: adapter names"):
        layer.add_adapter(name, 2)
    model = fastpeft.inject(llama64(), {"a": lora})
    fastpeft.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="adapter_name: adapter names"):
        fastpeft.load_adapter(model, tmp_path / "a", adapter_name=name)
    # a name put in by hand is refused when saving, before anything is written
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_A["x/y"], layer.lora_B["x/y"] = layer.lora_A["a"], layer.lora_B["a"]
    with pytest.raises(ValueError, match="model: adapter names"):
        fastpeft.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_adapter_directory_does_not_replace_default_unnamed(tmp_path):
    """A model holding "default" and others: a one-adapter directory needs adapter_name."""
    model = injected()
    fastpeft.save_adapter(model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_name: .* would replace the model's "
                                         r"'default'"):
        fastpeft.load_adapter(model, tmp_path / "math")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fastpeft.load_adapter(model, tmp_path / "math", adapter_name="math2")
    assert "math2" in model.model.layers[0].self_attn.q_proj.adapter_names
    only_default = fastpeft.inject(llama64(), {"default": fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"])})
    fastpeft.load_adapter(only_default, tmp_path)  # the same single adapter again: reloads
    torch.testing.assert_close(only_default.model.layers[1].mlp.down_proj.lora_B["default"]
                               .weight, model.model.layers[1].mlp.down_proj.lora_B["default"]
                               .weight)


def test_subdirectory_next_to_a_single_adapter_still_runs(tmp_path):
    """A copy of a single adapter kept below it (``v1_backup``) loads as a named adapter
    too; the model, with no names set, runs "default" as PEFT runs its active adapter.
    A subdirectory whose name cannot be an adapter's (``v1.bak``) is not one."""
    base = llama64()
    single = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in single.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    fastpeft.save_adapter(single, tmp_path)
    for sub in ("v1_backup", "v1.bak"):
        (tmp_path / sub).mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp_path / sub / f).write_bytes((tmp_path / f).read_bytes())
    model = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert multi_layers(model)["model.layers.0.self_attn.q_proj"] == ["default", "v1_backup"]
    ids = ids128()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, single(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


class _SharedExpertBlock(torch.nn.Module):
    """An attention-like projection on (batch, seq, h), then an MoE-style shared expert on
    the same tokens flattened to (batch * seq, h), as Qwen2-MoE's shared_expert takes them."""

    def __init__(self, h: int = 16):
        super().__init__()
        self.q_proj = torch.nn.Linear(h, h)
        self.shared_expert = torch.nn.Linear(h, h)

    def forward(self, x):
        y = self.q_proj(x)
        return self.shared_expert(y.reshape(-1, y.shape[-1])).view_as(y)


def test_names_per_sequence_reach_flattened_2d_inputs():
    torch.manual_seed(0)
    lora = fastpeft.LoraConfig(r=2, target_modules=["q_proj", "shared_expert"])
    model = fastpeft.inject(_SharedExpertBlock(), {"a": lora, "b": lora})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    x = torch.randn(3, 5, 16)
    names = ["b", "__base__", "a"]
    with torch.no_grad(), fastpeft.set_adapter_names(model, names):
        mixed = model(x)
    for row, name in enumerate(names):
        with torch.no_grad(), fastpeft.set_adapter_names(model, name):
            torch.testing.assert_close(mixed[row:row + 1], model(x[row:row + 1]))
    assert not torch.allclose(mixed[0], mixed[2])
    layer = model.shared_expert
    with fastpeft.set_adapter_names(model, names), \
            pytest.raises(ValueError, match=r"3 names set .* shape \(7, 16\)"):
        layer(torch.randn(7, 16))  # neither 3 sequences nor their 15 tokens
    with fastpeft.set_adapter_names(model, "a"):  # one name: any shape
        assert layer(torch.randn(7, 16)).shape == (7, 16)
