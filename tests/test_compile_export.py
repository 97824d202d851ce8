"""Models carrying fastpeft layers under torch.compile with symbolic sizes and scalars, and
torch.export with dynamic batch and sequence dims (the ops' own fullgraph and opcheck tests
are in each op's test file)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpeft

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(1))


def injected(config, cache: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=cache)).eval()
    fastpeft.inject(model, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "adaption_gate" in n or ("up" in n and "adapter" in n):
                p.normal_(0.0, 0.2)
    return model


CONFIGS = {
    "lora": fastpeft.LoraConfig(r=4, target_modules="all-linear"),
    "int8": fastpeft.LoraConfig(r=4, target_modules="all-linear", base_dtype="int8"),
    "prompt": fastpeft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1),
    "bottleneck": fastpeft.BottleneckConfig("houlsby"),
}


@pytest.mark.parametrize("kind", CONFIGS)
def test_compile_dynamic_fullgraph(kind):
    """``torch.compile(dynamic=True, fullgraph=True)``: the scalings and sizes are symbolic
    (the argument checks trace), and two shapes give eager's logits."""
    model = injected(CONFIGS[kind])
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad():
        for ids in (IDS, OTHER):
            torch.testing.assert_close(compiled(input_ids=ids).logits,
                                       model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_numpy_scalars_compile_fullgraph():
    """A NumPy scaling / dropout_p, which eager takes as a number, under torch.compile
    (which traces a NumPy scalar as a 0-d ndarray): one graph, eager's results."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)

    def f(x):
        y = fastpeft.lora_linear(x, w, None, a, b, np.float64(2.0), np.float32(0.0))
        return fastpeft.bottleneck_adapter(y, a[:, :6], None, a[:, :6].t(), None,
                                           scaling=np.float32(0.5))

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_compiled_layer_follows_a_changed_scaling_and_compiles_once():
    """A scaling changed between compiled calls (PEFT's rescale_adapter_scale, an adapter
    strength knob) is read, not baked in; identical calls compile one graph (no guard on
    fastpeft's backend memo, which the first call used to fill)."""
    torch.manual_seed(0)
    layer = fastpeft.LoRALinear(nn.Linear(16, 8), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for _ in range(3):
        compiled(x)
    assert counter.frame_count == 1
    for scaling in (0.5, 3.0, -1.0):
        layer.scaling = scaling
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("kind", ["lora", "int8", "bottleneck"])
def test_export_with_dynamic_batch_and_sequence(kind):
    """``torch.export`` with dynamic batch and sequence dims (the ops flatten rows with -1,
    which leaves the sizes symbolic), run at another shape."""
    from torch.export import Dim, export

    model = injected(CONFIGS[kind], cache=False)
    dims = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32)},)
    program = export(model, (IDS,), dynamic_shapes=dims)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(OTHER).logits,
                                   model(input_ids=OTHER).logits, rtol=1e-5, atol=1e-5)


def test_compiled_mixed_batches_share_one_graph():
    """``set_adapter_names`` keeps the names' indices as tensors that the compiled model
    reads: every combination of as many names (and every single name) runs one graph, with
    eager's logits and, in training, eager's gradients."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128))
    fastpeft.inject(model, {"a": fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                            "b": fastpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                            "c": fastpeft.LoraConfig(r=4, target_modules=["q_proj"])})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    with torch.no_grad():
        for names in [("a", "b", "c"), ("c", "c", "__base__"), ("b", "a", "a")]:
            with fastpeft.set_adapter_names(model, names):
                torch.testing.assert_close(compiled(input_ids=ids).logits,
                                           model(input_ids=ids).logits)
        assert counter.frame_count == 1
        for name in ("a", "__base__", "c"):
            with fastpeft.set_adapter_names(model, name):
                torch.testing.assert_close(compiled(input_ids=ids).logits,
                                           model(input_ids=ids).logits)
        assert counter.frame_count == 2
    model.train()
    for names in [("b", "__base__", "a"), ("a", "c", "b")]:
        with fastpeft.set_adapter_names(model, names):
            want = torch.autograd.grad(model(input_ids=ids).logits.square().sum(), params)
            got = torch.autograd.grad(compiled(input_ids=ids).logits.square().sum(), params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 3
