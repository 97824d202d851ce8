"""fastpeft.patch_peft / unpatch_peft: PEFT models built afterwards (get_peft_model,
PeftModel.from_pretrained, add_adapter, TRL's SFTTrainer, Liger-Kernel alongside) hold the
fused layers and compute what PEFT's do; layers whose weights an engine manages through
hooks (DeepSpeed ZeRO-3) run PEFT's forward instead; a 2-process gloo run trains the patched
model as PEFT's under FSDP2 sharded per decoder layer and under the Hugging Face Trainer with
DeepSpeed ZeRO-3. Tiny Llama models built from configs, fp32 CPU."""

from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastpeft
from fastpeft.nn import AdaptedAttention, peft_lora
from fastpeft.patch import peft_patched

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with PEFT unpatched, whatever it does in between."""
    fastpeft.unpatch_peft()
    yield
    fastpeft.unpatch_peft()


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(config)


def lora_config(dropout: float = 0.0, **kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": dropout,
                              "target_modules": "all-linear", **kwargs})


def prompt_config() -> peft.AdaptionPromptConfig:
    return peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")


def build_pair(config, perturb: str = "lora_B") -> tuple[nn.Module, nn.Module]:
    """(PEFT's model, the same built under patch_peft), with the same weights, in eval mode,
    the zero-initialised half of the adapters moved off zero."""
    ref = peft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    fastpeft.patch_peft()
    fused = peft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    fastpeft.unpatch_peft()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if perturb in n:
                p.normal_(0.0, 0.2)
    fused.load_state_dict(ref.state_dict())
    return ref.eval(), fused.eval()


def logits_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_model_outputs(ref: nn.Module, fused: nn.Module, atol: float = 1e-5) -> None:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = logits_and_grads(ref, ids)
    logits, grads = logits_and_grads(fused, ids)
    torch.testing.assert_close(logits, want_logits, atol=atol, rtol=1e-4)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=atol, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


@pytest.fixture
def fused_calls(monkeypatch) -> list[dict]:
    """The arguments of every fused LoRA op the PEFT layers run (not PEFT's forward)."""
    calls: list[dict] = []
    op = peft_lora.lora_linear

    def counted(*args, **kwargs):
        calls.append({"dropout_p": args[6], "training": args[7]})
        return op(*args, **kwargs)

    monkeypatch.setattr(peft_lora, "lora_linear", counted)
    return calls


# --- the patch --------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_get_peft_model_lora_is_fused_and_matches_peft(dropout, fused_calls):
    ref, fused = build_pair(lora_config(dropout))
    layers = lora_layers(fused)
    assert len(layers) == 2 * 7 and all(isinstance(m, peft_lora.FusedPeftLora) for m in layers)
    assert not any(isinstance(m, peft_lora.FusedPeftLora) for m in ref.modules())
    assert_same_model_outputs(ref, fused)  # eval mode: dropout off in both
    assert len(fused_calls) == 14 and not any(c["training"] for c in fused_calls)
    fused.train()
    fused(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert {c["dropout_p"] for c in fused_calls[14:]} == {dropout}
    assert all(c["training"] for c in fused_calls[14:])


def test_patched_get_peft_model_adaption_prompt(fused_calls):
    ref, fused = build_pair(prompt_config(), perturb="adaption_gate")
    adapted = [m for m in fused.modules() if isinstance(m, AdaptedAttention)]
    assert len(adapted) == 2 and not any(isinstance(m, AdaptedAttention) for m in ref.modules())
    assert_same_model_outputs(ref, fused, atol=1e-4)
    # PEFT's own adapter switching works on fastpeft's attentions (they wrap `.model` too)
    fastpeft.patch_peft()
    fused.add_adapter("other", prompt_config())
    fused.set_adapter("other")
    assert sum(isinstance(m, AdaptedAttention) for m in fused.modules()) == 2
    with fused.disable_adapter():
        assert not any(isinstance(m, AdaptedAttention) for m in fused.modules())
    fused.set_adapter("default")
    ref_logits = ref(input_ids=torch.ones(1, 5, dtype=torch.long)).logits
    torch.testing.assert_close(fused(input_ids=torch.ones(1, 5, dtype=torch.long)).logits,
                               ref_logits, atol=1e-4, rtol=1e-4)


def test_patched_add_adapter_and_set_adapter(fused_calls):
    ref, fused = build_pair(lora_config(target_modules=["q_proj", "k_proj"]))
    second = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ref.add_adapter("second", copy.deepcopy(second))
    fastpeft.patch_peft()
    fused.add_adapter("second", copy.deepcopy(second))  # q: one more adapter; v: a new layer
    assert all(isinstance(m, peft_lora.FusedPeftLora) for m in lora_layers(fused))
    assert not any(isinstance(m, peft_lora.FusedPeftLora) for m in ref.modules())
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B.second" in n:
                p.normal_(0.0, 0.2)
    fused.load_state_dict(ref.state_dict())
    for model in (ref, fused):
        model.set_adapter("second")
    assert_same_model_outputs(ref, fused)  # only the second adapter's layers: q, v
    assert len(fused_calls) == 2 * 2
    ref.set_adapter("default")
    fused.set_adapter("default")
    assert_same_model_outputs(ref, fused)


def test_patch_twice_is_harmless_and_unpatch_restores_peft():
    lora_model = peft.tuners.lora.model.LoraModel
    prompt_model = peft.tuners.adaption_prompt.model.AdaptionPromptModel
    originals = (lora_model.__dict__["_create_and_replace"],
                 prompt_model.__dict__["_create_adapted_attentions"])
    fastpeft.patch_peft()
    patched = (lora_model.__dict__["_create_and_replace"],
               prompt_model.__dict__["_create_adapted_attentions"])
    fastpeft.patch_peft()
    assert peft_patched()
    assert (lora_model.__dict__["_create_and_replace"],
            prompt_model.__dict__["_create_adapted_attentions"]) == patched
    assert tuple(m.__wrapped__ for m in patched) == originals
    model = peft.get_peft_model(tiny_llama(), lora_config())
    assert all(type(m).__qualname__ == "FusedLinear" for m in lora_layers(model))
    fastpeft.unpatch_peft()
    fastpeft.unpatch_peft()
    assert not peft_patched()
    assert (lora_model.__dict__["_create_and_replace"],
            prompt_model.__dict__["_create_adapted_attentions"]) == originals
    plain = peft.get_peft_model(tiny_llama(), lora_config())
    assert {type(m) for m in lora_layers(plain)} == {peft.tuners.lora.layer.Linear}
    prompt = peft.get_peft_model(tiny_llama(), prompt_config())
    assert not any(isinstance(m, AdaptedAttention) for m in prompt.modules())
    # a model made while patched keeps its fused layers
    assert all(isinstance(m, peft_lora.FusedPeftLora) for m in lora_layers(model))


@pytest.mark.parametrize("method", ["lora", "adaption_prompt"])
def test_saved_adapter_files_unchanged_and_from_pretrained_fuses(method, tmp_path):
    from safetensors.torch import load_file

    config = lora_config() if method == "lora" else prompt_config()
    ref, fused = build_pair(config, "lora_B" if method == "lora" else "adaption_gate")
    ref.save_pretrained(tmp_path / "peft")
    fused.save_pretrained(tmp_path / "fused")
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "fused"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text())
               for d in ("peft", "fused")]
    assert configs[0] == configs[1]
    fastpeft.patch_peft()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fused").eval()
    if method == "lora":
        assert all(isinstance(m, peft_lora.FusedPeftLora) for m in lora_layers(loaded))
    else:
        assert sum(isinstance(m, AdaptedAttention) for m in loaded.modules()) == 2
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_uncovered_layers_keep_peft_forward_with_one_warning():
    fastpeft.patch_peft()
    fastpeft._warn.warned.clear()
    with pytest.warns(UserWarning, match="DoRA") as record:
        dora = peft.get_peft_model(tiny_llama(), lora_config(use_dora=True))
    assert sum("DoRA" in str(w.message) for w in record) == 1
    assert not any(isinstance(m, peft_lora.FusedPeftLora) for m in dora.modules())


# --- hooks: what DeepSpeed ZeRO-3 does to a base layer ----------------------------------

def zero3_like(linear: nn.Linear) -> None:
    """Keeps ``linear.weight`` as an empty placeholder outside the layer's own call, as
    ZeRO-3 does: a forward pre-hook puts the full weight in, a post-hook takes it out (the
    autograd graph keeps the full one for backward)."""
    full = linear.weight
    empty = nn.Parameter(torch.empty(0), requires_grad=False)
    linear._parameters["weight"] = empty

    def gather(module, args):
        module._parameters["weight"] = full

    def release(module, args, output):
        module._parameters["weight"] = empty

    linear.register_forward_pre_hook(gather)
    linear.register_forward_hook(release)


def test_hooked_base_layers_run_peft_forward(fused_calls, monkeypatch):
    config = lora_config(target_modules=["q_proj", "down_proj"])
    ref, fused = build_pair(config)
    for model in (ref, fused):
        for layer in lora_layers(model):
            zero3_like(layer.get_base_layer())
    monkeypatch.setattr(fastpeft._warn, "warned", set())
    with pytest.warns(UserWarning, match="PEFT's own forward runs") as record:
        assert_same_model_outputs(ref, fused)
        assert_same_model_outputs(ref, fused)
    assert sum("PEFT's own forward" in str(w.message) for w in record) == 1  # once a process
    assert fused_calls == []
    # the reference itself is right: hooks gather the weights PEFT's layers read
    plain, _ = build_pair(config)
    assert_same_model_outputs(plain, fused)


def test_weights_readable():
    assert peft_lora.weights_readable(nn.Linear(3, 2))
    assert not peft_lora.weights_readable(nn.Linear(3, 2, device="meta"))
    hooked = nn.Linear(3, 2)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert not peft_lora.weights_readable(hooked)
    offloaded = nn.Linear(3, 2)  # accelerate's offloading hooks replace forward on the instance
    offloaded.forward = lambda x: x
    assert not peft_lora.weights_readable(offloaded)
    empty = nn.Linear(3, 2)
    empty.weight.data = torch.empty(0)
    assert not peft_lora.weights_readable(empty)
    deepspeed_like = nn.Linear(3, 2)
    deepspeed_like.weight.ds_id = 0
    assert not peft_lora.weights_readable(deepspeed_like)


def test_patched_layers_under_autocast(fused_calls):
    ref, fused = build_pair(lora_config())
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = logits_and_grads(ref, ids)
        got, grads = logits_and_grads(fused, ids)
    assert fused_calls and got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    for name, grad in want_grads.items():
        assert grads[name].dtype == torch.float32
        cos = nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, name


# --- TRL's SFTTrainer and Liger-Kernel -------------------------------------------------

def word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                                unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def sft_losses(tmp_path, patched: bool, **config) -> tuple[list[float], nn.Module]:
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (11,), generator=g))
             for _ in range(12)]
    if patched:
        fastpeft.patch_peft()
    args = trl.SFTConfig(output_dir=str(tmp_path / f"sft-{patched}"), max_steps=3,
                         per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                         max_length=16, report_to="none", use_cpu=True, bf16=False,
                         save_strategy="no", disable_tqdm=True, seed=0, **config)
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, processing_class=word_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             peft_config=lora_config(task_type="CAUSAL_LM"))
    fastpeft.unpatch_peft()
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.model


def test_trl_sft_trainer_patched_trains_like_peft(tmp_path, fused_calls):
    want, ref_model = sft_losses(tmp_path, patched=False)
    assert fused_calls == []
    got, model = sft_losses(tmp_path, patched=True)
    assert len(got) == 3 and fused_calls
    assert got == pytest.approx(want, abs=1e-5)
    assert len(lora_layers(model)) == 14
    assert all(isinstance(m, peft_lora.FusedPeftLora) for m in lora_layers(model))
    assert not any(isinstance(m, peft_lora.FusedPeftLora) for m in ref_model.modules())


@pytest.mark.parametrize("liger_first", [True, False], ids=["liger-then-peft", "peft-then-liger"])
def test_liger_kernel_and_patch_peft_together(liger_first, monkeypatch, fused_calls):
    """Liger swaps the model's norms, RoPE, MLP and loss; patch_peft PEFT's LoRA layers. On
    CPU (Triton's interpreter) Liger's RoPE and fused linear cross-entropy run (its RMSNorm and
    SwiGLU kernels do not): both patches applied, in either order (the Trainer applies Liger
    to the PEFT model's base model), the model computes what PEFT's does."""
    liger = pytest.importorskip("liger_kernel.transformers",
                                reason="liger-kernel is not installed")
    try:
        apply_liger = liger.apply_liger_kernel_to_llama  # imported on first use
    except ImportError as err:
        pytest.skip(f"liger-kernel does not support this transformers: {err}")
    from transformers.models.llama import modeling_llama

    # Liger patches the RoPE function of transformers' module: restored after the test
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb",
                        modeling_llama.apply_rotary_pos_emb)

    def liger_on(model: nn.Module) -> None:
        apply_liger(rope=True, fused_linear_cross_entropy=True, cross_entropy=False,
                    rms_norm=False, swiglu=False, model=model)

    ids = torch.randint(0, VOCAB, (2, 9))
    results = []
    for patched in (False, True):
        model = tiny_llama()
        if liger_first:
            liger_on(model)
        if patched:
            fastpeft.patch_peft()
        pm = peft.get_peft_model(model, lora_config()).train()
        fastpeft.unpatch_peft()
        if not liger_first:
            liger_on(pm.get_base_model())
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.05)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
        results.append((loss.detach(), grad))
        assert all(isinstance(m, peft_lora.FusedPeftLora) == patched for m in lora_layers(pm))
        assert pm.get_base_model().forward.__func__.__module__.startswith("liger_kernel")
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert len(fused_calls) == 14
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


# --- distributed: FSDP2 per decoder layer, the Trainer under DeepSpeed ZeRO-3 -------------

WORLD = 2
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _fsdp2_run(rank: int, patched: bool) -> dict:
    """3 AdamW steps on this rank's shard, the PEFT model sharded as accelerate's FSDP2 does
    it: ``fully_shard`` on every decoder layer, then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    calls = [0]
    op = peft_lora.lora_linear

    def counted(*args, **kwargs):
        calls[0] += 1
        return op(*args, **kwargs)

    peft_lora.lora_linear = counted
    try:
        if patched:
            fastpeft.patch_peft()
        model = peft.get_peft_model(tiny_llama(), lora_config())
        fastpeft.unpatch_peft()
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.2)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-2)
        ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids[2 * rank:2 * rank + 2],
                         labels=ids[2 * rank:2 * rank + 2]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        fused = sum(isinstance(m, peft_lora.FusedPeftLora) for m in model.modules())
        params = {n: p.full_tensor().detach() for n, p in model.named_parameters()
                  if p.requires_grad}
        return {"losses": losses, "fused_layers": fused, "fused_calls": calls[0],
                "params": params}
    finally:
        peft_lora.lora_linear = op


def _zero3_trainer_run(rank: int, patched: bool, out: str) -> dict:
    """2 steps of the Hugging Face Trainer with DeepSpeed ZeRO-3 (on CPU, gloo)."""
    datasets = pytest.importorskip("datasets")
    ids = torch.randint(0, VOCAB, (8, 9), generator=torch.Generator().manual_seed(2)).tolist()
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, ddp_backend="gloo",
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3},
                   "gradient_accumulation_steps": "auto"})
    if patched:
        fastpeft.patch_peft()
    model = peft.get_peft_model(tiny_llama(), lora_config())
    fastpeft.unpatch_peft()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset
                                   .from_dict({"input_ids": ids, "labels": ids}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "engine": type(trainer.model_wrapped).__name__,
              "fused_layers": sum(isinstance(m, peft_lora.FusedPeftLora)
                                  for m in trainer.model.modules()),
              "fallback_warned": any("PEFT's own forward" in str(w.message) for w in record)}
    del trainer, model
    return result


def _distributed_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results: dict = {"fsdp2": {p: _fsdp2_run(rank, p) for p in (False, True)},
                         "zero3": "DeepSpeed is not installed"}
        if HAS_DEEPSPEED:
            try:
                ref = _zero3_trainer_run(rank, False, f"{tmp}/zero3-peft")
            except Exception as err:  # PEFT's own model fails: the engine does not run here
                results["zero3"] = f"{type(err).__name__}: {err}"
            else:
                results["zero3"] = {False: ref,
                                    True: _zero3_trainer_run(rank, True, f"{tmp}/zero3-fused")}
        torch.save(results, f"{tmp}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_patched_model_trains_as_peft_distributed(tmp_path):
    """FSDP2 (as accelerate shards: per decoder layer) runs the fused layers: the base weights
    are whole inside the decoder layer's forward. DeepSpeed ZeRO-3 gathers each base layer's
    weight in that layer's own hooks: the fused layers run PEFT's forward, with one warning.
    Either way the patched model trains as PEFT's. (accelerate runs FSDP only on
    accelerators, so on CPU the Trainer cannot be asked for FSDP2: it is applied here as
    accelerate applies it.)"""
    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        ref, fused = results["fsdp2"][False], results["fsdp2"][True]
        assert ref["fused_layers"] == ref["fused_calls"] == 0
        assert fused["fused_layers"] == 14 and fused["fused_calls"] == 3 * 14  # a layer a step
        assert fused["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert fused["params"].keys() == ref["params"].keys()
        for name, want in ref["params"].items():
            torch.testing.assert_close(fused["params"][name], want, atol=1e-5, rtol=1e-4)
        if isinstance(results["zero3"], str):
            continue
        ref, fused = results["zero3"][False], results["zero3"][True]
        assert fused["engine"] == "DeepSpeedEngine" and len(fused["losses"]) == 2
        assert fused["fused_layers"] == 14 and fused["fallback_warned"]
        assert ref["fused_layers"] == 0 and not ref["fallback_warned"]
        assert fused["losses"] == pytest.approx(ref["losses"], abs=1e-6)
    if isinstance(results["zero3"], str):
        pytest.skip(f"FSDP2 checked; DeepSpeed ZeRO-3 not: {results['zero3'][:300]}")
