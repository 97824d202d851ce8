"""fastpeft's layers under DistributedDataParallel and FSDP2 (fully_shard): a 2-process
training step on CPU (gloo) gives the gradients of a single-process run over the same two
shards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fastpeft

transformers = pytest.importorskip("transformers")

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def build_model() -> torch.nn.Module:
    """The same model in every process: LoRA (int8 base on the MLP), an adaption prompt and
    bottleneck adapters on a tiny Llama, with every adapter moved off its zero start."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=101)
    model = transformers.LlamaForCausalLM(config)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["up_proj"],
                                               base_dtype="int8"))
    fastpeft.inject(model, fastpeft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    fastpeft.inject(model, fastpeft.BottleneckConfig("houlsby"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "adaption_gate", "up_weight")):
                p.normal_(0.0, 0.2)
    return model


def shard(rank: int) -> torch.Tensor:
    return torch.randint(0, 101, (4, 7), generator=torch.Generator().manual_seed(1))[
        2 * rank:2 * rank + 2]


def step(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _worker(rank: int, wrap: str, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = build_model()
        if wrap == "ddp":
            ddp = DistributedDataParallel(model)  # kept alive: its hooks all-reduce in backward
            step(ddp, shard(rank)).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        else:  # FSDP2: parameters (frozen and trainable) sharded per block, then the rest
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
            step(model, shard(rank)).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()
                     if p.requires_grad}
        if rank == 0:
            torch.save(grads, out_file)
        # Tear down in order: every collective finished, then the wrappers (DDP's reducer
        # holds the process group) released while the group is still registered. Dropping
        # the last reference to a gloo group from the reducer's destructor at exit can
        # deadlock (it joins a worker thread that waits for the GIL).
        dist.barrier()
        del model, grads
        if wrap == "ddp":
            del ddp
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_distributed_step_matches_single_process(wrap, tmp_path):
    mp.spawn(_worker, args=(wrap, str(tmp_path / "init"), str(tmp_path / "grads.pt")),
             nprocs=WORLD, join=True)
    ddp_grads = torch.load(tmp_path / "grads.pt")
    model = build_model()
    for rank in range(WORLD):  # DDP averages the shards' gradients
        (step(model, shard(rank)) / WORLD).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ddp_grads.keys() == want.keys()
    assert any("lora_A" in n for n in want) and any("adaption_prompt" in n for n in want)
    assert any("bottleneck_adapter" in n for n in want)
    for name, grad in want.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ddp_grads[name], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
