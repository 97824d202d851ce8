"""QLoRA: ``fastpeft.NF4LoRALinear`` (a 4-bit NF4 base in bitsandbytes' format with a
trainable LoRA) and its place in models: from an ``nn.Linear`` or a bitsandbytes NF4
``Linear4bit`` (its codes shared, double quantisation or not), ``inject(base_dtype="nf4")``,
``from_peft`` on a PEFT QLoRA model (against PEFT: logits, LoRA gradients, training
steps), save / load in PEFT's format, ``merge_and_unload``. Tiny shapes, fp32, CPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import reference
from fastpeft.nn import peft_lora
from fastpeft.ops._linear import draw_seed

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, where it is installed and quantises 4-bit on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    try:
        probe = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
        assert probe.weight.dtype == torch.uint8
    except Exception as err:  # an older bitsandbytes without CPU 4-bit support
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantise 4-bit on CPU: {err}")
    return bnb


def linear4bit(bnb, linear: nn.Linear, double_quant: bool = False, **kwargs) -> nn.Module:
    """``linear`` as a bitsandbytes ``Linear4bit`` (NF4 unless ``quant_type`` says other),
    quantised on the CPU as bitsandbytes does it: on ``.to(device)``."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                              bias=linear.bias is not None, compute_dtype=torch.float32,
                              compress_statistics=double_quant,
                              **{"quant_type": "nf4", **kwargs})
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def tiny_llama(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def qlora_llama(bnb, double_quant: bool = True, seed: int = 0,
                loaded_in_4bit: bool = True) -> nn.Module:
    """A tiny Llama whose linear layers (not lm_head) are bitsandbytes NF4 ``Linear4bit``, as
    transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` loads
    it (which also marks the model ``is_loaded_in_4bit``, what makes PEFT use its
    ``Linear4bit`` LoRA layer)."""
    model = tiny_llama(seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            model.set_submodule(name, linear4bit(bnb, module, double_quant))
    if loaded_in_4bit:
        model.is_loaded_in_4bit = True
    return model


def perturb(model: nn.Module, name: str = "lora_B", std: float = 0.2) -> None:
    """Move the zero-initialised half of the adapters off zero, so they matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if name in n:
                p.normal_(0.0, std)


def batch(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    return ids, mask


def grads_and_logits(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.square().mean().backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.requires_grad}
    return logits.detach(), grads


def loss_of(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask[:, 1:].bool()
    return nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])


def train(model, ids, mask, optimizer, steps: int = 3) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, ids, mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def nf4_calls(monkeypatch) -> list[int]:
    """Counts the fused NF4 op calls of converted PEFT layers (vs PEFT's own forward)."""
    calls = [0]
    op = peft_lora.nf4_lora_linear

    def counted(*args, **kwargs):
        calls[0] += 1
        return op(*args, **kwargs)

    monkeypatch.setattr(peft_lora, "nf4_lora_linear", counted)
    return calls


# --- the module ---------------------------------------------------------------------------

def test_from_linear_starts_as_the_quantised_base():
    linear = nn.Linear(40, 24)
    layer = fastpeft.NF4LoRALinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.1)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (24, 20)
    assert layer.absmax.dtype == torch.float32 and layer.absmax.shape == (15,)  # 960 / 64
    assert layer.weight is layer.qweight and layer.blocksize == 64
    assert set(dict(layer.named_buffers())) == {"qweight", "absmax", "bias"}
    assert {n for n, _ in layer.named_parameters()} == {"lora_A.weight", "lora_B.weight"}
    assert layer.scaling == 2.0 and torch.equal(layer.lora_B.weight, torch.zeros(24, 8))
    q, absmax = fastpeft.quantize_nf4(linear.weight)
    assert torch.equal(layer.qweight, q) and torch.equal(layer.absmax, absmax)
    x = torch.randn(3, 5, 40)
    expected = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(layer.eval()(x), expected, atol=1e-5, rtol=1e-5)
    # NF4 is coarse (16 levels per block), but it is the float layer's output, roughly
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.1
    rs = fastpeft.NF4LoRALinear.from_linear(linear, r=4, lora_alpha=8, use_rslora=True,
                                           blocksize=128)
    assert rs.scaling == 4.0 and rs.blocksize == 128 and rs.absmax.shape == (8,)


def test_outputs_and_gradients_match_the_reference():
    layer = fastpeft.NF4LoRALinear.from_linear(nn.Linear(96, 40), r=4, lora_alpha=8,
                                               lora_dropout=0.25)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 7, 96, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    y.square().sum().backward()
    torch.manual_seed(123)
    seed = draw_seed(torch.device("cpu"))
    copies = [t.detach().double().requires_grad_() for t in
              (x.reshape(14, 96), layer.lora_A.weight, layer.lora_B.weight)]
    ref = reference.nf4_lora_linear(copies[0], layer.qweight, layer.absmax,
                                    layer.bias.double(), copies[1], copies[2], layer.scaling,
                                    0.25, True, seed, 64)
    ref.square().sum().backward()
    torch.testing.assert_close(y.reshape(14, 40).double(), ref.detach(), rtol=1e-4, atol=1e-4)
    for got, want in zip((x.grad.reshape(14, 96), layer.lora_A.weight.grad,
                          layer.lora_B.weight.grad), copies, strict=True):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-4)
    assert layer.qweight.grad is None and not layer.absmax.requires_grad


def test_to_linear_and_requantising_merge():
    layer = fastpeft.NF4LoRALinear.from_linear(nn.Linear(64, 32), r=4, lora_alpha=8).eval()
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = layer(x)
        merged_float = layer.to_linear()
        assert type(merged_float) is nn.Linear
        torch.testing.assert_close(merged_float(x), y, atol=1e-5, rtol=1e-5)
        plain = layer.to_linear(merge_lora=False)
        torch.testing.assert_close(plain.weight, layer.dequantized_weight(), rtol=0, atol=0)
        err = layer.merge()
        assert layer.merged and 0 < err < 0.2
        # re-quantised: the merged NF4 layer is W + delta up to 4-bit rounding
        rel = (layer(x) - y).norm() / y.norm()
        assert rel < 0.2
        torch.testing.assert_close(layer.to_linear()(x), layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_conv1d_round_trip():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(24, 32)  # (in 32, out 24), weight (32, 24)
    layer = fastpeft.NF4LoRALinear.from_linear(conv, r=2)
    assert layer.fan_in_fan_out and layer.qweight.shape == (24, 16)
    x = torch.randn(3, 32)
    back = layer.to_linear()
    assert isinstance(back, transformers.pytorch_utils.Conv1D)
    with torch.no_grad():
        torch.testing.assert_close(back(x), layer(x), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    layer = fastpeft.NF4LoRALinear.from_linear(nn.Linear(64, 48), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    state = layer.state_dict()
    assert set(state) == {"qweight", "absmax", "bias", "lora_A.weight", "lora_B.weight"}
    fresh = fastpeft.NF4LoRALinear(64, 48, r=4, lora_alpha=8)
    fresh.load_state_dict(state)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    other = fastpeft.NF4LoRALinear(64, 48, r=4, blocksize=32)  # more absmax entries
    with pytest.raises(RuntimeError, match="absmax"):
        other.load_state_dict(state)


def test_half_precision_input():
    layer = fastpeft.NF4LoRALinear.from_linear(nn.Linear(64, 32), r=4).to(torch.bfloat16)
    assert layer.qweight.dtype == torch.uint8
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.bfloat16


def test_float64_layer_and_autocast():
    """As Int8LoRALinear: ``.double()`` for float64 activations (absmax, a float buffer,
    is read back as float32), and under CPU autocast the layer computes in bf16."""
    linear = nn.Linear(16, 12)
    layer = fastpeft.NF4LoRALinear.from_linear(linear, 4, 8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    double = copy.deepcopy(layer).double()
    torch.testing.assert_close(double(x.double()), want.double(), atol=1e-5, rtol=1e-5)


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    layer = fastpeft.NF4LoRALinear.from_linear(nn.Linear(32, 24), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)

    def step(module):
        x.grad = None
        layer.zero_grad()
        y = module(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone()

    compiled = step(torch.compile(layer, fullgraph=True))
    eager = step(layer)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


def test_module_bad_arguments():
    with pytest.raises(TypeError, match=r"linear: expected an nn\.Linear"):
        fastpeft.NF4LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2)
    with pytest.raises(ValueError, match="linear: in_features 7 is odd"):
        fastpeft.NF4LoRALinear.from_linear(nn.Linear(7, 4), r=2)
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        fastpeft.NF4LoRALinear.from_linear(nn.Linear(8, 4), r=2, blocksize=48)
    with pytest.raises(ValueError, match="in_features: NF4 packs"):
        fastpeft.NF4LoRALinear(9, 4, r=1)
    with pytest.raises(ValueError, match="r: expected a positive int"):
        fastpeft.NF4LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.NF4LoRALinear(4, 4, r=1, lora_dropout=1.0)
    with pytest.raises(TypeError, match="x: expected"):
        fastpeft.NF4LoRALinear(4, 4, r=1)(torch.randn(2, 4, dtype=torch.float64))


# --- from bitsandbytes --------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_from_bnb_shares_the_codes_and_dequantises_as_bitsandbytes(bnb, double_quant):
    linear = nn.Linear(128, 64)
    layer4 = linear4bit(bnb, linear, double_quant)
    state = layer4.weight.quant_state
    assert state.nested == double_quant
    layer = fastpeft.NF4LoRALinear.from_bnb(layer4, r=4, lora_alpha=8)
    assert layer.qweight.shape == (64, 64) and layer.qweight.dtype == torch.uint8
    assert layer.qweight.untyped_storage().data_ptr() == \
        layer4.weight.untyped_storage().data_ptr()
    assert layer.blocksize == 64 and layer.absmax.dtype == torch.float32
    if not double_quant:  # the very absmax too
        assert layer.absmax.untyped_storage().data_ptr() == \
            state.absmax.untyped_storage().data_ptr()
    # fastpeft's quantisation is bitsandbytes' (bytes and absmax), and so is the float weight
    q, absmax = fastpeft.quantize_nf4(linear.weight)
    assert torch.equal(layer.qweight, q)
    want = bnb.functional.dequantize_4bit(layer4.weight.data, state)
    torch.testing.assert_close(layer.dequantized_weight(), want, rtol=0, atol=0)
    torch.testing.assert_close(layer.to_linear(merge_lora=False).weight, want, rtol=0, atol=0)
    if not double_quant:
        assert torch.equal(layer.absmax, absmax)
    else:  # bitsandbytes' 8-bit absmax of the absmax, dequantised once
        torch.testing.assert_close(layer.absmax, absmax, rtol=1e-2, atol=0)
    # the forward is bitsandbytes' (train mode: it dequantises and runs F.linear), + LoRA
    x = torch.randn(2, 5, 128)
    layer4.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer4(x), atol=1e-5, rtol=1e-5)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref = layer4(x2) + layer.scaling * (x2 @ a.t()) @ b.t()
    ref.square().sum().backward()
    for got, exp in ((xg.grad, x2.grad), (layer.lora_A.weight.grad, a.grad),
                     (layer.lora_B.weight.grad, b.grad)):
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)
    # a merge writes new tensors: the bitsandbytes layer keeps its weight
    before = layer4.weight.data.clone()
    layer.merge()
    assert torch.equal(layer4.weight.data, before)
    assert layer.qweight.untyped_storage().data_ptr() != \
        layer4.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_from_bnb_undoes_bitsandbytes_cpu_repacking(bnb, double_quant):
    """bitsandbytes repacks a layer for its AVX512-BF16 CPU kernel at an eval-mode forward
    (codes in another order, bf16 absmax): from_bnb puts the layer back as bitsandbytes
    does before saving, and stops it from repacking under the shared view."""
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} does not repack for the CPU")
    layer4 = linear4bit(bnb, nn.Linear(128, 64), double_quant)
    codes = layer4.weight.data.clone()
    want = bnb.functional.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state)
    layer4.weight.data, layer4.weight.quant_state = pack(layer4.weight.data,
                                                         layer4.weight.quant_state)
    layer = fastpeft.NF4LoRALinear.from_bnb(layer4, r=4)
    assert not layer4.weight.quant_state.packing_format_for_cpu
    assert not getattr(layer4, "support_avx512bf16_for_cpu", False)
    assert torch.equal(layer4.weight.data, codes)
    assert layer.qweight.untyped_storage().data_ptr() == \
        layer4.weight.untyped_storage().data_ptr()
    # the absmax keeps the bf16 rounding bitsandbytes gave it; bitsandbytes reads it as we do
    torch.testing.assert_close(layer.dequantized_weight(), want, rtol=2e-2, atol=0)
    torch.testing.assert_close(
        layer.dequantized_weight(),
        bnb.functional.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state),
        rtol=0, atol=0)
    layer4.eval()
    with torch.no_grad():  # would repack here on an AVX512-BF16 CPU
        torch.testing.assert_close(layer(torch.randn(3, 128)).shape, (3, 64))
        layer4(torch.randn(3, 128))
    assert not getattr(layer4.weight.quant_state, "packing_format_for_cpu", False)


def test_from_bnb_refusals_name_the_argument(bnb):
    linear = nn.Linear(64, 32)
    with pytest.raises(TypeError, match=r"layer: expected a bitsandbytes\.nn\.Linear4bit"):
        fastpeft.NF4LoRALinear.from_bnb(linear, r=2)
    fp4 = linear4bit(bnb, linear, quant_type="fp4")
    with pytest.raises(ValueError, match="layer: quant_type='fp4'"):
        fastpeft.NF4LoRALinear.from_bnb(fp4, r=2)
    unquantised = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    with pytest.raises(ValueError, match="layer: the Linear4bit holds no 4-bit weight"):
        fastpeft.NF4LoRALinear.from_bnb(unquantised, r=2)
    stored = bnb.nn.Linear4bit(64, 32, quant_type="nf4", quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match=r"layer: quant_storage=torch\.bfloat16"):
        fastpeft.NF4LoRALinear.from_bnb(stored, r=2)
    with pytest.raises(ValueError, match=r"layer: quant_storage=torch\.bfloat16"):
        fastpeft.NF4LoRALinear.from_bnb(stored.to("cpu"), r=2)


# --- inject -------------------------------------------------------------------------------

def test_inject_nf4_trains_saves_loads_and_merges(tmp_path):
    ids, mask = batch()
    model = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", base_dtype="nf4"))
    layers = [m for m in model.modules() if isinstance(m, fastpeft.NF4LoRALinear)]
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train(model, ids, mask, torch.optim.AdamW(params, lr=1e-2), steps=4)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    fastpeft.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fastpeft"] == {"base_dtype": "nf4"} and saved["r"] == 4
    loaded = fastpeft.load_adapter(tiny_llama().eval(), tmp_path)  # same base weights
    assert sum(isinstance(m, fastpeft.NF4LoRALinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want,
                                   rtol=0, atol=0)
        merged = fastpeft.merge_and_unload(model)
        assert not any(isinstance(m, fastpeft.NF4LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want,
                                   atol=1e-4, rtol=1e-4)


def test_inject_reuses_bitsandbytes_nf4_layers(bnb):
    model = qlora_llama(bnb, double_quant=True)
    codes = {n: m.weight.untyped_storage().data_ptr() for n, m in model.named_modules()
             if isinstance(m, bnb.nn.Linear4bit)}
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for name, ptr in codes.items():
        module = model.get_submodule(name)
        if name.endswith(("q_proj", "down_proj")):
            assert isinstance(module, fastpeft.NF4LoRALinear)
            assert module.qweight.untyped_storage().data_ptr() == ptr
        else:
            assert isinstance(module, bnb.nn.Linear4bit)
    ids, mask = batch()
    loss_of(model, ids, mask).backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None


def test_inject_refuses_fp4_before_changing_anything(bnb):
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj = linear4bit(bnb, model.model.layers[1].mlp.up_proj,
                                                   quant_type="fp4")
    with pytest.raises(ValueError, match=r"target_modules: model\.layers\.1\.mlp\.up_proj: "
                                         r"quant_type='fp4'"):
        fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules="all-linear"))
    assert not any(isinstance(m, fastpeft.LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="base_dtype: expected None, 'int8' or 'nf4'"):
        fastpeft.LoraConfig(base_dtype="fp4")


# --- from_peft on a QLoRA model -----------------------------------------------------------

@pytest.mark.parametrize(("double_quant", "loaded_in_4bit"),
                         [(True, True), (False, True), (True, False)],
                         ids=["double_quant", "plain", "peft_linear_on_bnb"])
def test_from_peft_qlora_matches_peft(bnb, nf4_calls, double_quant, loaded_in_4bit):
    """PEFT's LoRA layers on NF4 Linear4bit (its Linear4bit layer; or, on a model not marked
    4-bit, its plain Linear around the bnb layer): fused, same logits and LoRA gradients,
    and training steps with an optimizer built before the conversion."""
    peft = pytest.importorskip("peft")
    ids, mask = batch()
    pm = peft.get_peft_model(qlora_llama(bnb, double_quant, loaded_in_4bit=loaded_in_4bit),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear4bit" if loaded_in_4bit else "Linear")
    perturb(pm, "lora_B", std=0.05)
    pm.train()  # bitsandbytes' CPU forward in eval mode runs its bf16 kernel
    ref_model = copy.deepcopy(pm)
    ref_logits, ref_grads = grads_and_logits(ref_model, ids, mask)
    lora = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    fastpeft.from_peft(pm)
    assert isinstance(layer, peft_lora.FusedPeftLora)
    assert [p for p in pm.parameters() if p.requires_grad] == lora  # the same objects
    logits, grads = grads_and_logits(pm, ids, mask)
    assert nf4_calls[0] == 14
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    ref_by_name = dict(zip([n for n, p in ref_model.named_parameters() if p.requires_grad],
                           ref_grads.values(), strict=True))
    got_by_name = dict(zip([n for n, p in pm.named_parameters() if p.requires_grad],
                           grads.values(), strict=True))
    assert ref_by_name.keys() == got_by_name.keys() and len(got_by_name) == 28
    for name, g in got_by_name.items():
        torch.testing.assert_close(g, ref_by_name[name], atol=1e-5, rtol=1e-4, msg=name)
    ref_opt = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad],
                                lr=1e-2)
    ref_losses = train(ref_model, ids, mask, ref_opt)
    losses = train(pm, ids, mask, optimizer)
    assert losses[-1] < losses[0]
    for a, b in zip(losses, ref_losses, strict=True):
        assert abs(a - b) < 1e-4 * abs(b)


def test_from_peft_qlora_mixed_training_refused(bnb):
    """A mixed-adapter training batch on a QLoRA model is refused, naming adapter_names and
    the quantised base: the fused mixed batch takes float bases, and PEFT's own mixed batch
    (which would run instead) does not train (PEFT refuses it; on a repacked bitsandbytes
    layer it failed deep inside). A plain training call still runs."""
    peft = pytest.importorskip("peft")
    ids, mask = batch()
    pm = peft.get_peft_model(qlora_llama(bnb), peft.LoraConfig(r=4, target_modules=SEVEN),
                             adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=4, target_modules=SEVEN))
    fastpeft.from_peft(pm).train()
    with pytest.raises(ValueError, match=r"adapter_names: .*bitsandbytes"):
        pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])
    pm(input_ids=ids, attention_mask=mask).logits.sum().backward()


def test_from_peft_qlora_eval_after_bitsandbytes_repacked(bnb):
    """A PEFT QLoRA model run in eval mode before the conversion (bitsandbytes repacks its
    layers for its bf16 CPU kernel there, on such a CPU): the fused layers read them back."""
    peft = pytest.importorskip("peft")
    ids, mask = batch()
    pm = peft.get_peft_model(qlora_llama(bnb), peft.LoraConfig(r=4, target_modules=SEVEN))
    perturb(pm, "lora_B", std=0.05)
    base = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    repacks = getattr(base, "support_avx512bf16_for_cpu", False)  # this CPU, this bnb
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        assert getattr(base.weight.quant_state, "packing_format_for_cpu", False) == repacks
        fastpeft.from_peft(pm)
        got = pm(input_ids=ids, attention_mask=mask).logits
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        torch.testing.assert_close(pm.train()(input_ids=ids, attention_mask=mask).logits, got,
                                   rtol=0, atol=0)
    rel = (got - ref)[mask.bool()].norm() / ref[mask.bool()].norm()
    assert rel < 2e-2  # bitsandbytes' bf16 kernel (where it repacked) vs fp32


def test_from_peft_qlora_save_load_and_merge(bnb, tmp_path):
    peft = pytest.importorskip("peft")
    ids, mask = batch()
    pm = peft.get_peft_model(qlora_llama(bnb), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    perturb(pm, "lora_B", std=0.05)
    pm.train()
    fastpeft.from_peft(pm)
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
    fastpeft.save_adapter(pm, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "fastpeft" not in saved  # PEFT's own layers: a PEFT adapter
    # PEFT reads it onto a fresh QLoRA base, and fastpeft onto a fresh one of its own
    peft_loaded = peft.PeftModel.from_pretrained(qlora_llama(bnb), tmp_path).train()
    ours = fastpeft.load_adapter(qlora_llama(bnb), tmp_path).train()
    assert sum(isinstance(m, fastpeft.NF4LoRALinear) for m in ours.modules()) == 6
    with torch.no_grad():
        for model in (peft_loaded, ours):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want,
                                       atol=1e-4, rtol=1e-4)
    # merge_and_unload: PEFT's merge (re-quantising into the Linear4bit), as PEFT's own
    reference_merge = copy.deepcopy(pm)
    with pytest.warns(UserWarning, match="4-bit"):
        merged = fastpeft.merge_and_unload(pm)
        peft_merged = reference_merge.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, peft_merged(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
    # fastpeft's own NF4 layers merge into float layers, exactly
    with torch.no_grad():
        ours_merged = fastpeft.merge_and_unload(ours)
        torch.testing.assert_close(ours_merged(input_ids=ids, attention_mask=mask).logits, want,
                                   atol=1e-4, rtol=1e-4)
    assert type(ours_merged.model.layers[0].self_attn.q_proj) is nn.Linear


def test_patch_peft_builds_fused_qlora_layers(bnb):
    peft = pytest.importorskip("peft")
    fastpeft.patch_peft()
    try:
        pm = peft.get_peft_model(qlora_llama(bnb), peft.LoraConfig(r=4, target_modules=SEVEN))
    finally:
        fastpeft.unpatch_peft()
    layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == 14 and all(isinstance(m, peft_lora.FusedPeftLora) for m in layers)


def test_from_peft_leaves_fp4_layers_to_peft(bnb, nf4_calls):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    proj = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = linear4bit(bnb, proj, quant_type="fp4")
    model.is_loaded_in_4bit = True
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"1 PEFT LoRA layers keep PEFT's forward"):
        fastpeft.from_peft(pm)
    pm.train()
    pm(input_ids=torch.randint(0, 128, (1, 5)))
    assert nf4_calls[0] == 0


def test_transformers_bitsandbytes_config_model(bnb, tmp_path):
    """A model loaded by transformers with BitsAndBytesConfig (NF4, double quantisation) on
    the CPU, then PEFT: fused with PEFT's logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tiny_llama().save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, device_map="cpu")
    except (ImportError, RuntimeError, ValueError) as err:  # transformers / bnb without CPU 4-bit
        pytest.skip(f"transformers cannot load a 4-bit model on the CPU here: {err}")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.nested
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    perturb(pm, "lora_B", std=0.05)
    pm.train()
    ids, mask = batch()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        fastpeft.from_peft(pm)
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, ref,
                                   atol=1e-4, rtol=1e-4)
    assert all(isinstance(m, peft_lora.FusedPeftLora) for m in pm.modules()
               if isinstance(m, peft.tuners.lora.LoraLayer))
