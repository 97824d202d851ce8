"""Supervised fine-tuning with TRL's ``SFTTrainer`` and a PEFT ``LoraConfig``, with and without
``fastpeft.patch_peft()``: the same trainer code, the same losses, fastpeft's fused LoRA
layers inside the patched run.

Everything is offline: a tiny Llama built from a config, a word-level tokenizer built in
memory, a synthetic dataset (``datasets.Dataset.from_dict``)::

    python examples/sft_trl_patched.py                # CPU, a few seconds
    python examples/sft_trl_patched.py --steps 30 --hidden 256

Needs ``pip install trl`` besides ``pip install -e ".[hf]"``. ``patch_peft()`` is the only
fastpeft line a training script needs: every PEFT LoRA (and adaption-prompt) layer created
after it, here by ``SFTTrainer`` from ``peft_config``, is fastpeft's fused layer; the adapter
TRL saves is PEFT's, unchanged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import transformers

import fastpeft
from fastpeft.bench.peers import import_quietly


def word_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``w0 .. w{vocab - 5}`` plus 4 special tokens."""
    import tokenizers

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 4)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                                unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def markov_texts(vocab: int, n: int, length: int, seed: int = 0) -> list[str]:
    """Sentences from a fixed random Markov chain (4 likely successors per word): structure
    for the loss to learn."""
    g = torch.Generator().manual_seed(seed)
    words = vocab - 4
    successors = torch.randint(0, words, (words, 4), generator=g)
    texts = []
    for _ in range(n):
        w = int(torch.randint(0, words, (1,), generator=g))
        sentence = [w]
        for _ in range(length - 1):
            w = int(successors[w, int(torch.randint(0, 4, (1,), generator=g))])
            sentence.append(w)
        texts.append(" ".join(f"w{i}" for i in sentence))
    return texts


def train(args: argparse.Namespace, patched: bool, output_dir: str) -> tuple[list[float], float,
                                                                              int]:
    """One SFT run; (losses, seconds, fused LoRA layers in the trained model)."""
    import datasets
    import peft
    import trl

    from fastpeft.nn.peft_lora import FusedPeftLora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = transformers.LlamaForCausalLM(config)
    dataset = datasets.Dataset.from_dict({"text": markov_texts(args.vocab, 64, args.seq - 1)})
    sft_config = trl.SFTConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=3e-3, logging_steps=1, max_length=args.seq, report_to="none",
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
        save_strategy="no", disable_tqdm=True, seed=0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    if patched:
        fastpeft.patch_peft()  # before the trainer builds the PEFT model from peft_config
    try:
        trainer = trl.SFTTrainer(model=model, args=sft_config, train_dataset=dataset,
                                 processing_class=word_tokenizer(args.vocab), peft_config=lora)
    finally:
        fastpeft.unpatch_peft()  # only needed here, to build the unpatched run next
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fused = sum(isinstance(m, FusedPeftLora) for m in trainer.model.modules())
    return losses, seconds, fused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=64)
    args = parser.parse_args(argv)
    # PEFT imports bitsandbytes when it is installed, which prints a note about its optional
    # CPU 4-bit kernel that reads like an error of this script: import it first, quietly.
    import_quietly("bitsandbytes")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("this example needs TRL: pip install trl")
        return 1
    runs = {}
    with tempfile.TemporaryDirectory() as out:
        for name, patched in (("peft", False), ("fastpeft", True)):
            runs[name] = train(args, patched, f"{out}/{name}")
    every = max(1, args.steps // 5)
    print("loss at step " + " ".join(f"{s:>7}" for s in range(0, args.steps, every)))
    for name, (losses, seconds, fused) in runs.items():
        print(f"{name:<12} " + " ".join(f"{loss:>7.4f}" for loss in losses[::every])
              + f"   {seconds:.2f} s, {fused} fused LoRA layers")
    diff = max(abs(a - b) for a, b in zip(runs["peft"][0], runs["fastpeft"][0], strict=True))
    print(f"largest loss difference: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
