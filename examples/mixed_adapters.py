"""Serve one batch that mixes LoRA adapters: a Llama-shaped model (built from a config, no
download) holding several PEFT LoRA adapters, each sequence of the batch with its own
adapter, through PEFT's mixed-batch call ``model(input_ids=..., adapter_names=[...])``:
PEFT's own forward (a loop over sub-batches in every layer) against the same model after
``fastpeft.from_peft`` (``fastpeft.multi_lora_linear``: the base GEMM once per layer, each
adapter on its rows). Prints both logits' largest difference and the tokens/s of each
(median of the timed forward passes, the two interleaved)::

    python examples/mixed_adapters.py                       # 8 sequences, 8 adapters, CPU
    python examples/mixed_adapters.py --hidden 1024 --layers 4 --dtype bf16
    python examples/mixed_adapters.py --device cuda --dtype bf16

Needs ``pip install -e ".[hf]"`` (transformers, peft).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import time

import torch


def build(args: argparse.Namespace) -> torch.nn.Module:
    """A Llama-shaped PEFT model holding ``args.adapters`` trained-looking LoRA adapters."""
    import transformers
    with contextlib.redirect_stderr(io.StringIO()):  # bitsandbytes' optional-kernel notice
        import peft

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        vocab_size=8192)
    base = transformers.LlamaForCausalLM(config).to(args.device, DTYPES[args.dtype]).eval()
    model = None
    for i in range(args.adapters):
        lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
        if model is None:
            model = peft.get_peft_model(base, lora, adapter_name=f"task{i}")
        else:
            model.add_adapter(f"task{i}", lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="sequences, one adapter each")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import fastpeft

    peft_model = build(args)
    fused = fastpeft.from_peft(copy.deepcopy(peft_model))
    names = [f"task{i % args.adapters}" for i in range(args.batch)]
    ids = torch.randint(0, 8192, (args.batch, args.seq), device=args.device)

    def forward(model):
        with torch.no_grad():
            return model(input_ids=ids, adapter_names=names).logits

    diff = (forward(fused).float() - forward(peft_model).float()).abs().max().item()
    times = {"peft": [], "fastpeft": []}
    for _ in range(2):  # warm-up
        forward(peft_model), forward(fused)
    for _ in range(args.runs):
        for arm, model in (("peft", peft_model), ("fastpeft", fused)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward(model)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[arm].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(f"Llama h={args.hidden} L={args.layers}, {args.adapters} LoRA adapters r={args.r} on "
          f"every linear layer, batch {args.batch} x {args.seq} tokens (one adapter per "
          f"sequence), {args.dtype}, {args.device}, {torch.get_num_threads()} threads")
    print(f"max |logits fastpeft - logits PEFT| = {diff:.2e}")
    rate = {arm: tokens / statistics.median(t) for arm, t in times.items()}
    for arm in ("peft", "fastpeft"):
        median_ms = statistics.median(times[arm]) * 1e3
        print(f"  {arm:<9} {rate[arm]:10.0f} tokens/s   median {median_ms:8.1f} ms")
    print(f"  fastpeft / PEFT: {rate['fastpeft'] / rate['peft']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
