"""fastpeft.inject on architectures beyond tests/families.py: where bottleneck adapters go
in Llama 4, ModernBERT, ViT and Whisper (both placements, or a refusal naming the missing
one); dual encoders without input embeddings (CLIP, SigLIP); 3-D parameters that are no
MoE experts (ViT, SigLIP); and layers whose weight the model reads instead of calling them
(Mamba's mixer projections, nn.MultiheadAttention's out_proj). Tiny models from configs."""

from __future__ import annotations

import copy
import importlib
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.inject import _model_dtype, adapter_layers
from fastpeft.nn import peft_lora
from fastpeft.targets import expert_parameters

transformers = pytest.importorskip("transformers")

VOCAB = 97


def build(config_cls: str, model_cls: str, **kwargs) -> nn.Module:
    """A tiny eval-mode model, skipped where the installed transformers lacks the class."""
    if not (hasattr(transformers, config_cls) and hasattr(transformers, model_cls)):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def fastpeft_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("inject:")]


def output(out) -> torch.Tensor:
    for key in ("logits", "logits_per_image", "pooler_output", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError(f"no output tensor in {type(out).__name__}")


_IDS = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
_PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "image_size": 16, "patch_size": 4}
_TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 64}


# --- bug 3: bottleneck placements per family --------------------------------------------

# name -> (config class, model class, config kwargs, inputs, blocks, feed-forward leaf names)
BOTTLENECK_FAMILIES = {
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    {"hidden_size": 32, "intermediate_size": 48, "intermediate_size_mlp": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 8, "vocab_size": VOCAB,
                     "num_local_experts": 2, "num_experts_per_tok": 1,
                     "interleave_moe_layer_step": 2},  # one MoE block, one dense block
                    {"input_ids": _IDS}, 2, ("feed_forward",)),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",
                   {**_TEXT, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                    "cls_token_id": 1, "sep_token_id": 2},
                   {"input_ids": _IDS}, 2, ("mlp",)),
    "vit": ("ViTConfig", "ViTModel", _VISION, {"pixel_values": _PIXELS}, 2,
            ("mlp", "dense")),  # transformers 5: layers.N.mlp; 4: layer.N.output.dense
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                 "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                 "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "vocab_size": VOCAB,
                 "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32,
                 "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                 "decoder_start_token_id": 1},
                {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": _IDS},
                4, ("fc2",)),  # 2 encoder + 2 decoder blocks
}


@pytest.mark.parametrize("name", BOTTLENECK_FAMILIES)
def test_houlsby_places_both_adapters_in_every_block(name):
    """Houlsby: one adapter after the attention and one after the feed-forward of every
    block (encoder and decoder), on the sublayer ending each; identity at step 0; every
    adapter on the path of the output (gets a gradient) once its up projection is not 0."""
    config_cls, model_cls, kwargs, batch, blocks, ffn_leaves = BOTTLENECK_FAMILIES[name]
    base = build(config_cls, model_cls, **kwargs)
    assert base.config.model_type == name
    try:
        want = output(base(**batch)).detach()
    except RuntimeError as e:  # transformers 4.51's Llama 4 casts to bf16 in fp32 models
        pytest.skip(f"transformers {transformers.__version__}: the plain {model_cls} fails: {e}")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = fastpeft.inject(copy.deepcopy(base), fastpeft.BottleneckConfig("houlsby"))
    assert fastpeft_warnings(record) == []
    placed: dict[str, list[str]] = {}
    for n, layer in adapter_layers(model):
        placed.setdefault(layer.placement, []).append(n.rpartition(".")[0])
    assert {p: len(names) for p, names in placed.items()} == \
        {"attention": blocks, "feed_forward": blocks}
    assert all(n.rpartition(".")[2] in ffn_leaves for n in placed["feed_forward"])
    torch.testing.assert_close(output(model(**batch)), want)

    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.up_weight.normal_(0.0, 0.1)
    output(model(**batch)).float().square().mean().backward()
    for n, layer in adapter_layers(model):
        assert layer.up_weight.grad is not None and layer.up_weight.grad.abs().sum() > 0, n
    assert not any(p.grad is not None for n, p in model.named_parameters()
                   if "bottleneck_adapter" not in n)


class _HalfLlama(nn.Module):
    """Blocks with a Llama-style self_attn but a feed-forward named otherwise."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy_family", hidden_size=8)
        self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": nn.Linear(8, 8),
                                                   "ffn": nn.Linear(8, 8)}) for _ in range(2))


def test_bottleneck_refuses_a_missing_placement():
    """A placement that finds no sublayer is refused, naming it and the model type, before
    any adapter is added (not the other placement alone); one that matches works."""
    model = _HalfLlama()
    for config in (fastpeft.BottleneckConfig("houlsby"), fastpeft.BottleneckConfig("pfeiffer")):
        with pytest.raises(ValueError, match=r"no feed_forward sublayers in _HalfLlama "
                                             r"\(model type 'toy_family'\)"):
            fastpeft.inject(model, config)
        assert not list(adapter_layers(model))
    fastpeft.inject(model, fastpeft.BottleneckConfig("houlsby", placements="attention"))
    assert [n for n, _ in adapter_layers(model)] == \
        [f"layers.{i}.self_attn.bottleneck_adapter" for i in range(2)]


# --- bug 5: dual encoders have no input embeddings --------------------------------------

def clip() -> nn.Module:
    return build("CLIPConfig", "CLIPModel",
                 text_config={**_TEXT, "bos_token_id": 1, "eos_token_id": 2},
                 vision_config=_VISION, projection_dim=16)


def test_merge_and_unload_dual_encoder():
    """merge_and_unload on CLIP (whose get_input_embeddings raises NotImplementedError)
    merges: a plain model, the unmerged logits."""
    model = clip()
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj", "fc1"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    batch = {"input_ids": _IDS, "pixel_values": _PIXELS}
    want = model(**batch).logits_per_image.detach()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        merged = fastpeft.merge_and_unload(model)
    assert not [w for w in record if "tied" in str(w.message)]
    assert not list(adapter_layers(merged))
    got = merged(**batch).logits_per_image
    assert not torch.allclose(got, clip()(**batch).logits_per_image)  # the LoRA is in
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dual_encoder_adaption_prompt_and_dtype():
    """The adaption prompt on CLIP is refused as for any encoder (not with transformers'
    NotImplementedError); the dtype of a model without input embeddings is its
    parameters'."""
    with pytest.raises(NotImplementedError, match=r"CLIPModel \(model type 'clip'\) is not "
                                                  r"a decoder"):
        fastpeft.inject(clip(), fastpeft.AdaptionPromptConfig(adapter_layers=1))
    assert _model_dtype(clip().to(torch.bfloat16)) == torch.bfloat16


# --- bug 6: 3-D parameters that are no experts ------------------------------------------

def vit() -> nn.Module:
    return build("ViTConfig", "ViTForImageClassification", **_VISION, num_labels=3)


def lora_names(model, peft_layer: type = fastpeft.LoRALinear) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, (peft_layer, fastpeft.LoRALinear)))


@pytest.mark.parametrize("peft_state", ["installed", "no ParamWrapper", "not installed"])
def test_vit_all_linear_is_peft_and_not_experts(peft_state, monkeypatch):
    """ViT's cls_token / position_embeddings (3-D) are no MoE experts: "all-linear" adapts
    what PEFT's adapts, with no warning, and needs neither PEFT's ParamWrapper nor PEFT."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = lora_names(peft.get_peft_model(vit(), peft.LoraConfig(
            target_modules="all-linear")), peft.tuners.lora.LoraLayer)
    if peft_state == "no ParamWrapper":  # as peft < 0.17
        monkeypatch.setattr(peft_lora, "_PARAM_WRAPPER", ("peft.tuners.lora.layer", "Gone"))
    elif peft_state == "not installed":
        for module in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
            monkeypatch.setitem(sys.modules, module, None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = fastpeft.inject(vit(), fastpeft.LoraConfig(target_modules="all-linear"))
    assert fastpeft_warnings(record) == []
    assert lora_names(model) == want and len(want) >= 13
    model(pixel_values=_PIXELS).logits.sum().backward()


def test_expert_parameters_are_moe_experts_only():
    """expert_parameters: transformers 5's stacked experts (Mixtral, Llama 4), never ViT's
    embeddings or SigLIP's pooling probe."""
    vit_model = vit()
    assert expert_parameters(vit_model.vit.embeddings) == []
    if hasattr(transformers, "SiglipVisionModel"):
        siglip = build("SiglipVisionConfig", "SiglipVisionModel", **_VISION)
        assert all(expert_parameters(m) == [] for m in siglip.modules())
    try:
        llama4 = importlib.import_module("transformers.models.llama4.modeling_llama4")
    except ImportError:  # transformers < 4.51
        llama4 = None
    experts = getattr(llama4, "Llama4TextExperts", None)
    if experts is not None:
        config = transformers.Llama4TextConfig(
            hidden_size=32, intermediate_size=48, num_local_experts=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)
        assert sorted(expert_parameters(experts(config))) == ["down_proj", "gate_up_proj"]

    class Experts(nn.Module):  # 3-D parameters of a module named for its experts
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
            self.down_proj = nn.Parameter(torch.zeros(4, 8, 8))
            self.bias = nn.Parameter(torch.zeros(4, 8))

    assert expert_parameters(Experts()) == ["gate_up_proj", "down_proj"]
    odd = nn.Module()
    odd.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
    odd.probe = nn.Parameter(torch.zeros(1, 1, 8))
    assert expert_parameters(odd) == ["gate_up_proj"]


# --- bug 7: layers whose weight the model reads -----------------------------------------

def mamba(kind: str = "Mamba") -> nn.Module:
    return build(f"{kind}Config", f"{kind}ForCausalLM", hidden_size=32, state_size=4,
                 num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=64, conv_kernel=4,
                 time_step_rank=4)


def siglip_vision() -> nn.Module:
    return build("SiglipVisionConfig", "SiglipVisionModel", **_VISION)


def adapted_names(model) -> set[str]:
    return {n for n, _ in adapter_layers(model)}


@pytest.mark.parametrize("kind", ["Mamba", "FalconMamba"])
@pytest.mark.parametrize("base_dtype", [None, "int8", "nf4"])
def test_mamba_all_linear_leaves_weight_read_layers_out(kind, base_dtype):
    """Mamba's dt_proj (its weight multiplied in the forward), x_proj and out_proj (their
    weights passed to the mamba-ssm kernels) stay out of "all-linear", with one note; the
    rest is adapted, and the forward runs on int8 / NF4 bases; every LoRA gets a gradient."""
    model = mamba(kind)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules="all-linear",
                                                   base_dtype=base_dtype))
    said = fastpeft_warnings(record)
    assert len(said) == 1 and "dt_proj" in said[0] and "reads" in said[0], said
    assert adapted_names(model) == {f"backbone.layers.{i}.mixer.in_proj" for i in range(2)}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    model(input_ids=_IDS).logits.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("target", ["dt_proj", "x_proj", "out_proj"])
def test_mamba_weight_read_layers_named(target):
    """Named, a layer whose weight the model reads is refused on an int8 base (the model
    would read the codes) and where PEFT refuses it (out_proj of a Mamba model); on a float
    base otherwise it is adapted as PEFT adapts it, with a note that its LoRA is inert."""
    model = mamba()
    with pytest.raises(ValueError, match=rf"target_modules: backbone\.layers\.0\.mixer\."
                                         rf"{target}.*reads"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["in_proj", target],
                                                   base_dtype="int8"))
    assert not list(adapter_layers(model))
    if target == "out_proj":
        with pytest.raises(ValueError, match=r"target_modules: .*mixer\.out_proj.*reads"):
            fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["in_proj", target]))
        with pytest.raises(ValueError, match=r"config\['a'\]: .*mixer\.out_proj"):
            fastpeft.inject(model, {"a": fastpeft.LoraConfig(target_modules=[target])})
        assert not list(adapter_layers(model))
        return
    with pytest.warns(UserWarning, match=rf"mixer\.{target}.*adapted as named.*never"):
        fastpeft.inject(model, fastpeft.LoraConfig(target_modules=["in_proj", target]))
    assert f"backbone.layers.0.mixer.{target}" in adapted_names(model)
    model(input_ids=_IDS).logits.sum().backward()


def test_multihead_attention_out_proj_left_out_and_refused():
    """nn.MultiheadAttention's out_proj (SigLIP's pooling head), whose weight
    F.multi_head_attention_forward reads, stays out of "all-linear" (single and several
    adapters; the int8 base runs), is refused when named on an int8 base, and adapted as
    PEFT adapts it, inert, on a float one."""
    model = siglip_vision()
    # head.attention.out_proj (transformers 5), under vision_model. before
    (mha,) = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    head = f"{mha}.out_proj"
    for config in (fastpeft.LoraConfig(target_modules="all-linear", base_dtype="int8"),
                   {"default": fastpeft.LoraConfig(target_modules="all-linear")}):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            adapted = fastpeft.inject(copy.deepcopy(model), config)
        said = fastpeft_warnings(record)
        assert len(said) == 1 and head in said[0] and "MultiheadAttention" in said[0], said
        names = adapted_names(adapted)
        assert head not in names and head.replace("attention.out_proj", "mlp.fc1") in names
        adapted(pixel_values=_PIXELS).pooler_output.sum().backward()
    with pytest.raises(ValueError, match=rf"{head} is not called.*MultiheadAttention"):
        fastpeft.inject(copy.deepcopy(model), fastpeft.LoraConfig(
            target_modules=["q_proj", "head.attention.out_proj"], base_dtype="int8"))
    # a float base takes it as PEFT does (what PEFT saves for ["q_proj", ..., "out_proj"]
    # loads back), with a note
    with pytest.warns(UserWarning, match=rf"{head} is adapted as named"):
        adapted = fastpeft.inject(copy.deepcopy(model), fastpeft.LoraConfig(
            target_modules=["q_proj", "out_proj"]))
    assert head in adapted_names(adapted)
