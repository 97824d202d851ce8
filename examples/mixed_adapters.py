"""Serve one batch that mixes LoRA adapters: a Llama-shaped model (built from a config, no
download) holding several LoRA adapters, each sequence of the batch with its own adapter.
Three arms, the same weights:

- ``peft``: PEFT's mixed-batch call, ``model(input_ids=..., adapter_names=[...])`` (a loop
  over sub-batches in every layer);
- ``from_peft``: the same PEFT model after ``fastpeft.from_peft`` (the same call, through
  ``fastpeft.multi_lora_linear``: the base GEMM once per layer, each adapter on its rows);
- ``inject``: a plain transformers model that loaded the adapters PEFT saved
  (``fastpeft.load_adapter`` of PEFT's multi-adapter directory: ``MultiLoRALinear``
  layers), each sequence's adapter picked with ``fastpeft.set_adapter_names``.

Prints each fastpeft arm's largest logit difference to PEFT and the tokens/s of each arm
(median of the timed runs, the arms interleaved): of a forward pass over the batch, or with
``--generate N`` of greedy generation (KV cache) of N new tokens per sequence, counting the
new tokens::

    python examples/mixed_adapters.py                  # small and quick: CPU, fp32
    python examples/mixed_adapters.py --generate 32
    # the whole-model figure: TinyLlama-1.1B's shape, 8 sequences, 8 adapters, on a GPU
    python examples/mixed_adapters.py --preset tinyllama --device cuda --dtype bf16 --seq 256
    python examples/mixed_adapters.py --preset tinyllama --device cuda --dtype bf16 \\
        --seq 256 --generate 64

Needs ``pip install -e ".[hf]"`` (transformers, peft).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (hidden, intermediate, layers, heads, key/value heads, vocab)
PRESETS = {"small": (256, 640, 2, 4, 4, 8192),
           "tinyllama": (2048, 5632, 22, 32, 4, 32000)}  # TinyLlama-1.1B's shape


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A Llama-shaped PEFT model holding ``args.adapters`` trained-looking LoRA adapters,
    and a plain model with the same base weights."""
    import transformers
    with contextlib.redirect_stderr(io.StringIO()):  # bitsandbytes' optional-kernel notice
        import peft

    torch.manual_seed(0)
    hidden, intermediate, layers, heads, kv_heads, vocab = PRESETS[args.preset]
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab)
    with torch.device(args.device):  # initialised where it runs (fast on a GPU)
        base = transformers.LlamaForCausalLM(config).to(DTYPES[args.dtype]).eval()
    plain = copy.deepcopy(base)
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
    return model.eval(), plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="model shape (tinyllama: hidden 2048, 22 layers, GQA 32/4)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="sequences, one adapter each")
    parser.add_argument("--seq", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="time greedy generation of N new tokens instead of a forward")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import fastpeft

    peft_model, plain = build(args)
    fused = fastpeft.from_peft(copy.deepcopy(peft_model))
    with tempfile.TemporaryDirectory() as out:  # PEFT's multi-adapter layout, read back
        peft_model.save_pretrained(out)
        injected = fastpeft.load_adapter(plain, out).eval()
    names = [f"task{i % args.adapters}" for i in range(args.batch)]
    fastpeft.set_adapter_names(injected, names)
    ids = torch.randint(0, plain.config.vocab_size, (args.batch, args.seq), device=args.device)
    arms = {"peft": (peft_model, {"adapter_names": names}),
            "from_peft": (fused, {"adapter_names": names}),
            "inject": (injected, {})}

    def run(arm: str):
        model, kwargs = arms[arm]
        with torch.no_grad():
            if args.generate:
                return model.generate(input_ids=ids, max_new_tokens=args.generate,
                                      min_new_tokens=args.generate, do_sample=False,
                                      pad_token_id=0, **kwargs)
            return model(input_ids=ids, **kwargs).logits

    with torch.no_grad():
        reference = peft_model(input_ids=ids, adapter_names=names).logits.float()
        diffs = {arm: (model(input_ids=ids, **kw).logits.float() - reference).abs().max().item()
                 for arm, (model, kw) in arms.items() if arm != "peft"}
    times = {arm: [] for arm in arms}
    for _ in range(2):  # warm-up
        for arm in arms:
            run(arm)
    for _ in range(args.runs):
        for arm in arms:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(arm)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[arm].append(time.perf_counter() - t0)
    hidden, _, layers, *_ = PRESETS[args.preset]
    tokens = args.batch * (args.generate or args.seq)
    what = (f"greedy generate(), {args.generate} new tokens per sequence after {args.seq}"
            if args.generate else f"forward over {args.seq} tokens per sequence")
    print(f"Llama {args.preset} (h={hidden} L={layers}), {args.adapters} LoRA adapters "
          f"r={args.r} on every linear layer, {args.batch} sequences (one adapter each), "
          f"{what}; {args.dtype}, {args.device}, {torch.get_num_threads()} threads")
    for arm, diff in diffs.items():
        print(f"max |logits {arm} - logits PEFT| = {diff:.2e}")
    rate = {arm: tokens / statistics.median(t) for arm, t in times.items()}
    for arm in arms:
        median_ms = statistics.median(times[arm]) * 1e3
        ratio = "" if arm == "peft" else f"   {rate[arm] / rate['peft']:.2f}x PEFT"
        print(f"  {arm:<10} {rate[arm]:10.0f} tokens/s   median {median_ms:9.1f} ms{ratio}")


if __name__ == "__main__":
    main()
