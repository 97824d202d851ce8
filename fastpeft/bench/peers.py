"""The layers people use today, built through their public APIs; a missing library
yields ``None`` so its column is skipped rather than the run failing.

The peer libraries are imported through :func:`import_quietly`: what they print, log or
warn while being imported (bitsandbytes, for one, logs that its optional CPU 4-bit kernel
could not be fetched, at every import) is captured, and the CLI's header summarises it
once, where it says anything that bears on the run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Messages known to say nothing about what the harness measures, and their gist.
_KNOWN_NOTES = {
    "Failed to load CPU gemm_4bit_forward": "its optional CPU 4-bit kernel is unavailable, "
                                            "not used here",
}


@dataclass(frozen=True)
class PeerLibrary:
    """A peer library as :func:`import_quietly` found it."""

    name: str
    version: str | None  # None: not installed, or its import failed
    said: tuple[str, ...] = ()  # the lines it printed, logged or warned while imported
    error: str | None = None  # why its import failed

    def describe(self) -> str:
        """One phrase for the run's header: ``bitsandbytes 0.50.2 (its optional CPU 4-bit
        kernel is unavailable; ...)``, ``peft (not installed)``."""
        if self.error is not None:
            return f"{self.name} (import failed: {_clip(self.error)})"
        if self.version is None:
            return f"{self.name} (not installed)"
        notes = list(dict.fromkeys(_gist(line) for line in self.said))
        return f"{self.name} {self.version}" + (f" ({'; '.join(notes)})" if notes else "")


_IMPORTED: dict[str, PeerLibrary] = {}


def import_quietly(name: str) -> PeerLibrary:
    """Import the top-level package ``name`` once per process, capturing what it prints
    (Python's ``sys.stdout`` / ``sys.stderr``; not writes of C code to the file
    descriptors), logs and warns meanwhile. A package imported before is not imported
    again: its messages, if any, were shown then."""
    if name in _IMPORTED:
        return _IMPORTED[name]
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:  # not cached: a test may hide a package for a while
        return PeerLibrary(name, None)
    already = sys.modules.get(name) is not None
    said: list[str] = []
    error = None
    with _captured(said):
        try:
            importlib.import_module(name)
        except Exception as e:  # a broken install is a skipped peer, not a failed run
            error = f"{type(e).__name__}: {e}"
    version = None if error else _version(name)
    return _IMPORTED.setdefault(name, PeerLibrary(name, version, () if already else
                                                  tuple(said), error))


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get(name), "__version__", "?"))


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured(lines: list[str]) -> Iterator[None]:
    """Within: ``sys.stdout`` / ``sys.stderr`` written to a buffer, every log record
    collected instead of handled (the root logger's handlers swapped for a collector;
    ``logging.lastResort`` then never fires) and the warnings that the filters in force
    would show recorded instead; the non-empty lines
    of all three are appended to ``lines`` on the way out. A logging handler made
    meanwhile on the redirected stream (transformers makes one at its import) is pointed
    back at the real stream."""
    out, err = io.StringIO(), io.StringIO()
    real = {id(out): sys.stdout, id(err): sys.stderr}
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = [_Collect(lines)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            yield  # under the filters in force: the warnings that would have been shown
    finally:
        root.handlers = handlers
        for logger in [root, *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", ()):
                stream = getattr(handler, "stream", None)
                if isinstance(handler, logging.StreamHandler) and id(stream) in real:
                    handler.setStream(real[id(stream)])
        lines += [str(w.message) for w in caught]
        lines += [line for line in (out.getvalue() + err.getvalue()).splitlines()
                  if line.strip()]


def _gist(line: str) -> str:
    for start, gist in _KNOWN_NOTES.items():
        if line.startswith(start):
            return gist
    return "said at import: " + _clip(line)


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def peer_libraries(names: Iterable[str]) -> list[PeerLibrary]:
    """:func:`import_quietly` each of ``names``, bitsandbytes first wherever PEFT is
    among them: PEFT imports bitsandbytes itself when it is installed (at its import or
    when it builds a LoRA model), and its messages would otherwise escape."""
    names = list(dict.fromkeys(names))
    if "peft" in names:
        import_quietly("bitsandbytes")
    return [import_quietly(name) for name in names]


def peft_lora_linear(base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float,
                     use_rslora: bool = False,
                     names: tuple[str, ...] = ("default",)) -> nn.Module | None:
    """Hugging Face PEFT's LoRA ``Linear`` around ``base`` (shared, frozen), or None without
    PEFT. With several ``names`` it holds one adapter per name, all trainable (PEFT's mixed
    batch is a call with ``adapter_names``)."""
    if peer_libraries(("peft",))[0].version is None:
        return None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    holder = nn.Module()
    holder.proj = base

    def config():
        return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=["proj"], use_rslora=use_rslora)

    model = get_peft_model(holder, config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    layer = model.base_model.model.proj
    if len(names) > 1:  # every adapter trainable, not the active one's only
        for p in layer.parameters():
            p.requires_grad_(p is not base.weight and p is not base.bias)
    return layer


def bnb_int8_lora_linear(base: nn.Linear, r: int, lora_alpha: float,
                         lora_dropout: float) -> nn.Module | None:
    """bitsandbytes' ``Linear8bitLt`` (int8 weight, ``has_fp16_weights=False``) holding
    ``base``'s weights, with PEFT's LoRA on top; None without bitsandbytes or PEFT."""
    if any(lib.version is None for lib in peer_libraries(("bitsandbytes", "peft"))):
        return None
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=base.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(base.state_dict())
    layer = layer.to(base.weight.device)  # quantises the weight
    holder = nn.Module()
    holder.proj = layer
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=["proj"])
    return get_peft_model(holder, config).base_model.model.proj


def bnb_nf4_lora_linear(base: nn.Linear, r: int, lora_alpha: float,
                        lora_dropout: float) -> nn.Module | None:
    """bitsandbytes' ``Linear4bit`` (NF4, its default block size 64 and double-quantised
    absmax, as QLoRA trains; computing in the base's dtype) holding ``base``'s weights,
    with PEFT's LoRA on top. None without bitsandbytes or PEFT."""
    if any(lib.version is None for lib in peer_libraries(("bitsandbytes", "peft"))):
        return None
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                              compute_dtype=base.weight.dtype, quant_type="nf4")
    layer.load_state_dict(base.state_dict())
    layer = layer.to(base.weight.device)  # quantises the weight
    holder = nn.Module()
    holder.proj = layer
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=["proj"])
    return get_peft_model(holder, config).base_model.model.proj


def peft_style_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                                gate: torch.Tensor) -> torch.Tensor:
    """LLaMA-Adapter attention computed as PEFT's ``AdaptedAttention`` does it (PEFT's
    adapter only runs inside a whole LLaMA attention layer, so its steps are replayed):
    the model's own causal attention (SDPA), then the prompt attention in two matmuls
    with the softmax taken in fp32, the gate multiplying the probabilities, and the sum.

    q: (B, H, M, D); k, v: (B, Hkv, N, D); prefix_k, prefix_v: (1, Hkv, P, D); gate: (H,)
    or (1,). Key/value heads are repeated for grouped queries, as PEFT does.
    """
    group = q.shape[1] // k.shape[1]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t if group == 1 else t.repeat_interleave(group, dim=1)

    seq = F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)
    scores = q @ expand(prefix_k).transpose(2, 3) / math.sqrt(q.shape[-1])  # (B, H, M, P)
    probs = gate.view(1, -1, 1, 1) * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return seq + probs @ expand(prefix_v)
