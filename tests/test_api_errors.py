"""The model-level API refuses a mistake with an error that names the argument and what was
expected (the ops' own checks are in test_op_layer.py and each op's tests)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import info

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_inject_and_configs():
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got Tensor"):
        fastpeft.inject(torch.randn(3), fastpeft.LoraConfig())
    with pytest.raises(TypeError, match=r"^config: .*got peft\..*LoraConfig \(a PEFT config: "
                                        r".*fastpeft.from_peft"):
        fastpeft.inject(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"^target_modules: expected a name, a list of names"):
        fastpeft.LoraConfig(target_modules=5)
    assert fastpeft.BottleneckConfig(placements="feed_forward").placements == ("feed_forward",)
    model = fastpeft.inject(tiny_llama(), {"a": fastpeft.LoraConfig(target_modules=["q_proj"])})
    with pytest.raises(ValueError, match=r"^names: expected an adapter name or a non-empty"):
        fastpeft.set_adapter_names(model, 3)


def test_from_peft_of_what_it_cannot_convert():
    with pytest.raises(TypeError, match=r"^peft_model: expected a PEFT model"):
        fastpeft.from_peft(None)
    with pytest.warns(UserWarning, match="LlamaForCausalLM has no PEFT LoRA layer .*nothing "
                                         "was converted"):
        fastpeft.from_peft(tiny_llama())
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["q_proj"],
                                                           feedforward_modules=[]))
    with pytest.warns(UserWarning, match=r"its adapters: IA3\): nothing was converted"):
        fastpeft.from_peft(ia3)
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.from_peft(lora)
        fastpeft.from_peft(lora)  # converted already: found, no warning


def test_save_and_load_paths(tmp_path):
    model = fastpeft.inject(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"^directory: expected a path"):
        fastpeft.save_adapter(model, None)
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(NotADirectoryError, match=f"^directory: {file} is a file"):
        fastpeft.save_adapter(model, file)
    with pytest.raises(FileNotFoundError, match=r"^directory: no adapter_config.json in"):
        fastpeft.load_adapter(model, tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{r: 8")
    with pytest.raises(ValueError, match=r"^directory: .*adapter_config.json is not a JSON"):
        fastpeft.load_adapter(model, tmp_path / "bad")
    with pytest.raises(TypeError, match=r"^directory: expected a path"):
        fastpeft.load_adapter(model, 3)


def test_modules_name_their_arguments():
    prompt = fastpeft.AdaptionPrompt(64, num_heads=4, num_kv_heads=2, adapter_len=10)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    full = nn.Linear(64, 64, bias=False)  # q_proj's width, not the 2 key/value heads'
    with pytest.raises(ValueError, match=r"^k_proj: expected 32 output features "
                                         r"\(num_kv_heads=2 x head_dim=16\), got 64"):
        prompt(q, k, k, full, nn.Linear(64, 32, bias=False))
    assert prompt(q, k, k, nn.Linear(64, 32), nn.Linear(64, 32)).shape == q.shape
    layer = fastpeft.MultiLoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", 2)
    for module, x in ((layer, [[1.0] * 8]), (fastpeft.LoRALinear(nn.Linear(8, 8), 2),
                                             [[1.0] * 8])):
        with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list"):
            module(x, adapter_ids=torch.zeros(1, dtype=torch.int64)) \
                if module is layer else module(x)
    with pytest.raises(TypeError, match=r"^layer: expected a bitsandbytes.nn.Linear8bitLt"):
        fastpeft.Int8LoRALinear.from_bnb(nn.Linear(8, 8), 2)


def test_info_takes_no_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        info.main(["--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
