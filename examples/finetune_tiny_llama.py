"""Fine-tune a small Llama (built from a config, no download) on synthetic data with each
PEFT method, Hugging Face PEFT (or the unfused path) vs fastpeft side by side.

For each method both arms start from the same base model and the same adapter weights
(the fastpeft arm is the PEFT model converted in place with ``fastpeft.from_peft``, or
for bottleneck adapters, which PEFT lacks, the same injected model run on fastpeft's
unfused reference path), train on the same batches, and report their loss curve, training
throughput (tokens/s, median step) and memory (autograd's saved-for-backward bytes of one
step; peak allocated memory too on a GPU)::

    python examples/finetune_tiny_llama.py                  # CPU: a few minutes
    python examples/finetune_tiny_llama.py --methods lora --steps 50
    python examples/finetune_tiny_llama.py --device cuda    # bf16 on a GPU

Needs ``pip install -e ".[hf]"`` (transformers, peft) and bitsandbytes for the int8 arm.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers

import fastpeft
from fastpeft.bench.peers import import_quietly
from fastpeft.bench.timing import saved_bytes

METHODS = ("lora", "int8_lora", "adaption_prompt", "bottleneck")


@dataclass
class Arm:
    name: str
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    saved: int = 0
    peak: int | None = None


def markov_batches(vocab: int, batch: int, seq: int, steps: int, device, seed: int = 0):
    """Token sequences from a fixed random Markov chain in which every token has 4 likely
    successors: learnable structure, so the loss has somewhere to go (floor ~ ln 4)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            pick = torch.randint(0, 4, (batch,), generator=g)
            tokens[:, t] = successors[tokens[:, t - 1], pick]
        out.append(tokens.to(device))
    return out


def build_base(args, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2, vocab_size=args.vocab,
        max_position_embeddings=args.seq)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)


def quantise_bnb(model: torch.nn.Module) -> None:
    """Every ``*_proj`` linear layer as a bitsandbytes int8 layer (the PEFT int8 arm)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj"):
            q = bnb.nn.Linear8bitLt(module.in_features, module.out_features,
                                    bias=module.bias is not None, has_fp16_weights=False,
                                    threshold=0.0)
            q.load_state_dict(module.state_dict())
            model.set_submodule(name, q.to(module.weight.device))


def make_arms(method: str, args, device, dtype):
    """(reference name, reference model, fastpeft model, learning rate)."""
    import peft

    base = build_base(args, device, dtype)
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                               "up_proj", "down_proj"]}
    if method == "bottleneck":
        model = fastpeft.inject(base, fastpeft.BottleneckConfig("houlsby", reduction_factor=8))
        return "unfused", copy.deepcopy(model), model, 1e-2
    if method == "int8_lora":
        quantise_bnb(base)
        ref = peft.get_peft_model(base, peft.LoraConfig(**lora))
        lr = 1e-2
    elif method == "lora":
        ref = peft.get_peft_model(base, peft.LoraConfig(**lora))
        lr = 1e-2
    else:
        ref = peft.get_peft_model(base, peft.AdaptionPromptConfig(
            adapter_len=10, adapter_layers=max(1, args.layers // 2), task_type="CAUSAL_LM"))
        lr = 3e-3
    return "peft", ref, fastpeft.from_peft(copy.deepcopy(ref)), lr


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             tokens[:, 1:].flatten())


def train(arm: Arm, model: torch.nn.Module, batches, lr: float, device,
          context: Callable[[], object]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    with context():
        weights = [*model.parameters(), *model.buffers()]  # saved by reference: not counted
        arm.saved = saved_bytes(lambda: lm_loss(model, batches[0]), exclude=weights)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for tokens in batches:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(model, tokens)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            arm.step_s.append(time.perf_counter() - start)
            arm.losses.append(loss.item())
        if device.type == "cuda":
            arm.peak = torch.cuda.max_memory_allocated(device)


def report(method: str, arms: list[Arm], tokens_per_step: int, every: int) -> None:
    print(f"\n== {method}")
    steps = range(0, len(arms[0].losses), every)
    print("  loss at step " + " ".join(f"{s:>6}" for s in steps))
    for arm in arms:
        print(f"  {arm.name:<12} " + " ".join(f"{arm.losses[s]:>6.3f}" for s in steps))
    ref = arms[0]
    for arm in arms:
        step = statistics.median(arm.step_s[2:] or arm.step_s)
        speed = statistics.median(ref.step_s[2:] or ref.step_s) / step
        peak = f", peak {arm.peak / 2**20:.0f} MB" if arm.peak is not None else ""
        print(f"  {arm.name:<12} final loss {arm.losses[-1]:.3f}, "
              f"{tokens_per_step / step:,.0f} tokens/s ({speed:.2f}x), "
              f"saved for backward {arm.saved / 2**20:.1f} MB{peak}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = markov_batches(args.vocab, args.batch, args.seq, args.steps, device)
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads; "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, {device}, {dtype}")
    # PEFT imports bitsandbytes when it is installed, which prints a note about its optional
    # CPU 4-bit kernel that reads like an error of this script: import it first, quietly.
    bnb = import_quietly("bitsandbytes")
    for method in args.methods:
        if method == "int8_lora" and bnb.version is None:
            print(f"\n== {method}: skipped ({bnb.describe()})")
            continue
        ref_name, ref_model, fast_model, lr = make_arms(method, args, device, dtype)
        ref, fast = Arm(ref_name), Arm("fastpeft")
        unfused = (lambda: fastpeft.use_backend("reference")) if ref_name == "unfused" \
            else contextlib.nullcontext
        train(ref, ref_model, batches, lr, device, unfused)
        train(fast, fast_model, batches, lr, device, contextlib.nullcontext)
        report(method, [ref, fast], args.batch * args.seq, max(1, args.steps // 6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
