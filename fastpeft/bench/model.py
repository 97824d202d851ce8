"""``fastpeft-bench --model``: whole training steps of a Llama-shaped model, per method.

One *step* is what a trainer does per batch: forward, the language-model loss, backward,
``AdamW.step()`` and ``zero_grad(set_to_none=True)``. It is timed, for each method, on
the model fastpeft gives and on the one people would use instead (the *alternative*):

- ``lora``: LoRA (r=16, alpha 32, dropout 0.05) on every linear layer but the output
  layer (PEFT's ``all-linear``). Alternative ``peft``: ``peft.get_peft_model``; fastpeft:
  that very model, copied and converted by :func:`fastpeft.from_peft`.
- ``int8_lora``: the same LoRA over an int8 base. Alternative ``bnb+peft``: PEFT over
  bitsandbytes ``Linear8bitLt`` layers (no outlier threshold); fastpeft: that model
  converted by ``from_peft``, which runs ``int8_lora_linear`` on bitsandbytes' own int8
  codes. Without bitsandbytes (or PEFT) fastpeft runs alone, from
  ``inject(LoraConfig(base_dtype="int8"))``.
- ``adaption_prompt``: LLaMA-Adapter, a 10-token prompt in every layer. Alternative
  ``peft``: PEFT's ``AdaptionPromptConfig``; fastpeft: that model converted by
  ``from_peft``.
- ``bottleneck``: Houlsby adapters (after the attention and the feed-forward of every
  block), ``inject(BottleneckConfig("houlsby"))``. PEFT has none: the alternative
  ``unfused`` is a copy of the same model run under ``use_backend("reference")``, the
  unfused PyTorch composition.

In bf16/fp16 PEFT keeps its LoRA weights in fp32 (``autocast_adapter_dtype``); the
converted model keeps them too, so both optimizers step the same fp32 tensors.

Beside them, the *floor*: the same step of the frozen model without any adapter. Its one
trainable parameter is a scalar (1.0) multiplying the input embeddings' output, so
backward runs through every layer's activations (what any adapter in the first layer
needs) and computes no weight gradient, and AdamW steps that one scalar.

Both models of a method start from the same weights: the base is built once from a
seeded ``LlamaConfig`` and copied; the fastpeft model is a copy of the alternative (or
the alternative a copy of it). Their adapters, zero-initialised where the method says
so (LoRA B, the gates, the up projections), are first given values as after some
training (:func:`perturb_adapters`), so that the adapters change the loss. Before any
timing, each model computes the loss and the adapter gradients of one batch with
dropout off (:func:`check`); fastpeft's must agree with the alternative's within a
dtype-aware tolerance, or the run says ``MISMATCH`` (the CLI then exits with status 3):
a benchmark of two different computations would be worthless.

Providers are timed interleaved, a step of each in turn, after warm-up rounds. Memory:
``held_bytes``, what the step holds once its forward and loss are computed (activations
saved for backward, however they are saved, and the logits), above what was allocated
before it: the CUDA caching allocator's count, or on a CPU glibc's heap in use
(``mallinfo2``; not recorded where the C library lacks it); on CUDA also ``peak_bytes``,
``torch.cuda.max_memory_allocated`` over one whole step above what was allocated before.

Records: ``op`` is the method, ``mode`` is ``step``, ``shape`` the model (see
:class:`ModelShape`), ``size`` the tokens of one step. The floor is timed once and its
records repeated under each method, so each method's records stand on their own.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .._backend import use_backend
from ..interop import from_peft
from .peers import peer_libraries
from .results import Environment, Record
from .timing import Timing, _quantile

METHODS = ("lora", "int8_lora", "adaption_prompt", "bottleneck")
MODE = "step"
FLOOR = "frozen"  # the floor's provider name
# The alternative's provider name per method, and the libraries it needs.
ALTERNATIVES = {"lora": "peft", "int8_lora": "bnb+peft", "adaption_prompt": "peft",
                "bottleneck": "unfused"}
NEEDS = {"lora": ("peft",), "int8_lora": ("peft", "bitsandbytes"),
         "adaption_prompt": ("peft",), "bottleneck": ()}
# The methods' settings (the issue's): LoRA r=16, alpha 32, dropout 0.05 on every linear
# layer but the output layer; a 10-token prompt in every layer; Houlsby's adapters.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
PROMPT_LEN = 10
LEARNING_RATE = 1e-4
ADAPTER_STD = 0.02  # perturb_adapters: zero-initialised matrices get N(0, ADAPTER_STD^2)
GATE_VALUE = 0.5  # perturb_adapters: a zero-initialised gate (one element)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped model and the batch of one step. ``intermediate`` and ``kv_heads``
    default to Llama's choices: the feed-forward width ``8/3 * hidden`` rounded up to a
    multiple of 256 (2816 for 1024, 11008 for 4096), as many key/value heads as heads."""

    hidden: int = 1024
    layers: int = 4
    heads: int = 16
    vocab: int = 8192
    seq: int = 512
    batch: int = 1
    intermediate: int | None = None
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.intermediate is None:
            object.__setattr__(self, "intermediate", math.ceil(8 * self.hidden / 3 / 256) * 256)
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        for name in ("hidden", "layers", "heads", "vocab", "seq", "batch", "intermediate",
                     "kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads: hidden ({self.hidden}) must be a multiple of heads "
                             f"({self.heads}), and heads of kv_heads ({self.kv_heads})")

    def __str__(self) -> str:
        kv = "" if self.kv_heads == self.heads else f"/{self.kv_heads}kv"
        return (f"Llama h={self.hidden} L={self.layers} ffn={self.intermediate} "
                f"heads={self.heads}{kv} vocab={self.vocab} tokens={self.batch}x{self.seq}")

    @property
    def tokens(self) -> int:
        """Tokens of one step's batch."""
        return self.batch * self.seq

    def config(self):
        """The ``transformers.LlamaConfig`` of this shape (needs transformers)."""
        import transformers

        return transformers.LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
            max_position_embeddings=max(self.seq, 2048))


@dataclass
class Arm:
    """One provider of one method: its model, its optimizer, and the backend its steps run
    under (``reference`` for the unfused composition)."""

    method: str | None  # None: the floor
    provider: str
    role: str  # fastpeft, peer, reference or floor
    model: nn.Module
    optimizer: torch.optim.Optimizer
    backend: str = "auto"

    @property
    def label(self) -> str:
        return f"{self.method or 'floor'} {self.provider}"

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """The language-model loss of ``tokens`` (next-token cross-entropy, in fp32 as
        transformers computes it)."""
        with use_backend(self.backend):
            return self.model(input_ids=tokens, labels=tokens, use_cache=False).loss

    def step(self, tokens: torch.Tensor) -> None:
        """One training step: forward, loss, backward, AdamW step, zero_grad."""
        with use_backend(self.backend):
            self.loss(tokens).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


@dataclass
class Method:
    """A method's fastpeft arm and its alternative (None, with ``missing`` saying why,
    where the alternative's library is not installed)."""

    name: str
    fastpeft: Arm
    alternative: Arm | None
    missing: str | None = None

    @property
    def arms(self) -> list[Arm]:
        return [self.fastpeft] + ([self.alternative] if self.alternative else [])


@dataclass(frozen=True)
class Check:
    """fastpeft against the alternative on one batch, dropout off: the two losses, their
    difference, and the largest relative difference of an adapter gradient
    (``||g_fp - g_alt|| / ||g_alt||`` over each trainable tensor), with the tolerances
    they are held to (the loss's absolute). Without an alternative, fastpeft's loss only."""

    loss: float
    alternative_loss: float | None = None
    loss_delta: float | None = None
    grad_error: float | None = None
    loss_tol: float | None = None
    grad_tol: float | None = None

    @property
    def ok(self) -> bool:
        """Within tolerance (vacuously, without an alternative)."""
        if self.loss_delta is None:
            return True
        return self.loss_delta <= self.loss_tol and self.grad_error <= self.grad_tol


def tolerances(dtype: torch.dtype, method: str, device: torch.device) -> tuple[float, float]:
    """(loss, gradient) tolerances of :class:`Check`: relative to the loss, and to each
    adapter gradient's norm. In fp32 the two models compute the same sums in another
    order. In bf16/fp16 every matmul rounds, and differently (PEFT keeps LoRA weights in
    fp32 and computes the LoRA branch in fp32, fastpeft in the activations' dtype): at the
    default size the losses agree to 1e-4 of the loss and the gradients to 2-3% in norm,
    a gate's (one sum over the whole batch) to 6%; a wrong computation is off by far more.
    bitsandbytes on CUDA quantises the activations to int8 too, which fastpeft's weight-only
    int8 does not."""
    loss_tol, grad_tol = (1e-4, 1e-3) if dtype == torch.float32 else (5e-4, 0.15)
    if method == "int8_lora" and device.type == "cuda":
        loss_tol, grad_tol = max(loss_tol, 5e-3), max(grad_tol, 0.3)
    return loss_tol, grad_tol


class Progress(Protocol):
    """What the benchmark uses of a progress bar (the CLI's tqdm)."""

    def update(self, n: int = 1) -> object: ...
    def set_description(self, desc: str) -> None: ...


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...


# --- building the models ----------------------------------------------------------------

def missing_alternatives(methods: Iterable[str]) -> dict[str, str]:
    """method -> why its alternative cannot run (``"bitsandbytes (not installed)"``), for
    the methods whose alternative needs a library that is not installed. Imports the
    libraries quietly (:func:`fastpeft.bench.peers.peer_libraries`)."""
    missing = {}
    for method in methods:
        libs = [lib for lib in peer_libraries(NEEDS[method]) if lib.version is None]
        if libs:
            missing[method] = "; ".join(lib.describe() for lib in libs)
    return missing


def build(shape: ModelShape, methods: Sequence[str], dtype: torch.dtype,
          device: torch.device, seed: int = 0,
          progress: Progress | None = None) -> tuple[Arm, list[Method]]:
    """The floor and, per method, fastpeft's model and its alternative, all from one base
    model built from ``shape.config()`` with ``seed``; in training mode, each with its
    own AdamW over its trainable parameters. ``progress`` advances once per model built."""
    import transformers

    progress = progress or _Silent()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {METHODS}")
    missing = missing_alternatives(methods)
    devices = []  # fork_rng: the CUDA devices whose random state to save and restore
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):  # the caller's random state is left alone
        torch.manual_seed(seed)
        base = transformers.LlamaForCausalLM(shape.config()).to(device=device, dtype=dtype)
    base.train()
    progress.set_description("building the frozen model (floor)")
    floor = _arm(None, FLOOR, "floor", _floor_model(copy.deepcopy(base)))
    progress.update()
    built = []
    for i, method in enumerate(methods):
        progress.set_description(f"building {method}")
        with _quiet_build(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + 1 + i)  # the adapters' initialisation (PEFT's, ours)
            fast, alt = _method_models(method, base, missing.get(method), seed + 1 + i)
        role = "reference" if method == "bottleneck" else "peer"
        built.append(Method(
            method, _arm(method, "fastpeft", "fastpeft", fast),
            None if alt is None else _arm(method, ALTERNATIVES[method], role, alt,
                                          "reference" if method == "bottleneck" else "auto"),
            missing.get(method)))
        progress.update(1 + (alt is not None))
    return floor, built


def _arm(method: str | None, provider: str, role: str, model: nn.Module,
         backend: str = "auto") -> Arm:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Arm(method, provider, role, model, torch.optim.AdamW(params, lr=LEARNING_RATE),
               backend)


def _floor_model(model: nn.Module) -> nn.Module:
    """``model`` frozen, but for one scalar (1.0) that scales its input embeddings'
    output: backward runs through all activations, no weight gradient is computed."""
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight
    embeddings.floor_scale = nn.Parameter(torch.ones((), dtype=weight.dtype, device=weight.device))
    embeddings.register_forward_hook(lambda module, args, out: out * module.floor_scale)
    return model


def _method_models(method: str, base: nn.Module, missing: str | None,
                   seed: int) -> tuple[nn.Module, nn.Module | None]:
    """(fastpeft's model, the alternative or None) of ``method``, from copies of ``base``;
    adapters perturbed (the same values in both)."""
    import fastpeft

    if method == "bottleneck":
        fast = fastpeft.inject(copy.deepcopy(base), fastpeft.BottleneckConfig("houlsby"))
        perturb_adapters(fast, seed)
        return fast, copy.deepcopy(fast)
    layers = base.config.num_hidden_layers
    if missing is not None:  # fastpeft alone, from its own configs
        config = (fastpeft.AdaptionPromptConfig(PROMPT_LEN, layers)
                  if method == "adaption_prompt" else
                  fastpeft.LoraConfig(**LORA, target_modules="all-linear",
                                      base_dtype="int8" if method == "int8_lora" else None))
        fast = fastpeft.inject(copy.deepcopy(base), config)
        perturb_adapters(fast, seed)
        return fast, None
    import peft

    model = copy.deepcopy(base)
    if method == "adaption_prompt":
        config = peft.AdaptionPromptConfig(adapter_len=PROMPT_LEN, adapter_layers=layers,
                                           task_type="CAUSAL_LM")
    else:
        config = peft.LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
        if method == "int8_lora":
            _to_bnb_int8(model)
    alt = peft.get_peft_model(model, config)
    perturb_adapters(alt, seed)
    return from_peft(copy.deepcopy(alt)), alt


def _to_bnb_int8(model: nn.Module) -> None:
    """Every linear layer of the decoder (what ``all-linear`` adapts) as a bitsandbytes
    ``Linear8bitLt`` holding its weights, quantised to int8 (no outlier threshold)."""
    import bitsandbytes as bnb

    output = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not output:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features,
                                        bias=module.bias is not None,
                                        has_fp16_weights=False, threshold=0.0)
            layer.load_state_dict(module.state_dict())
            model.set_submodule(name, layer.to(module.weight.device))  # quantises


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
    """Deprecation notices the libraries give while a model is wrapped (transformers 5
    via PEFT: ``is_gradient_checkpointing``) are not the benchmark's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def perturb_adapters(model: nn.Module, seed: int) -> None:
    """Give the zero-initialised trainable tensors of ``model`` values as after some
    training, so that its adapters change the loss: a one-element tensor (a gate)
    ``GATE_VALUE``, any other all-zero one (LoRA B, an up projection and its bias) draws
    from N(0, ``ADAPTER_STD``^2), in name order from a generator seeded with
    ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            if bool((p == 0).all()):
                if p.numel() == 1:
                    p.fill_(GATE_VALUE)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * ADAPTER_STD)


# --- measuring --------------------------------------------------------------------------

def batch(shape: ModelShape, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The token ids every step trains on: uniform over the vocabulary, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)


@contextlib.contextmanager
def _no_dropout(model: nn.Module) -> Iterator[None]:
    """Every ``nn.Dropout`` of ``model`` at p = 0 within (fastpeft reads LoRA's dropout
    from PEFT's module at each call), the model still in training mode: bitsandbytes
    takes another path in eval mode."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(dropouts, saved, strict=True):
            m.p = p


def _loss_and_grads(arm: Arm, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    with _no_dropout(arm.model), use_backend(arm.backend):
        loss = arm.loss(tokens)
        loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in arm.trainable()
             if p.grad is not None}
    arm.optimizer.zero_grad(set_to_none=True)
    return loss.item(), grads


def check(method: Method, tokens: torch.Tensor, device: torch.device) -> Check:
    """fastpeft's loss and adapter gradients against the alternative's on ``tokens``,
    dropout off (:class:`Check`). The adapters' parameter names must agree."""
    loss, grads = _loss_and_grads(method.fastpeft, tokens)
    if method.alternative is None:
        return Check(loss)
    alt_loss, alt_grads = _loss_and_grads(method.alternative, tokens)
    if grads.keys() != alt_grads.keys():
        only = sorted(grads.keys() ^ alt_grads.keys())
        raise RuntimeError(f"{method.name}: fastpeft's and {method.alternative.provider}'s "
                           f"adapter parameters differ: {only[:4]}")
    errors = [float((grads[n] - g).norm() / g.norm().clamp_min(1e-30))
              for n, g in alt_grads.items()]
    dtype = method.fastpeft.model.get_input_embeddings().weight.dtype
    loss_tol, grad_tol = tolerances(dtype, method.name, device)
    return Check(loss, alt_loss, abs(loss - alt_loss), max(errors, default=0.0),
                 loss_tol * max(1.0, abs(alt_loss)), grad_tol)


def floor_loss(floor: Arm, tokens: torch.Tensor) -> float:
    """The frozen model's loss of ``tokens`` (no adapter: what the adapters move away from)."""
    with torch.no_grad():
        return floor.loss(tokens).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(arms: Sequence[Arm], tokens: torch.Tensor, device: torch.device, *,
               warmup: int, runs: int, progress: Progress | None = None) -> dict[str, Timing]:
    """Per arm (by label), the median and 20/80th percentiles of ``runs`` steps, timed
    round-robin (a step of each arm in turn) after ``warmup`` rounds; wall time between
    two synchronisations on CUDA (a step's launch overhead is part of its cost)."""
    progress = progress or _Silent()
    samples: dict[str, list[float]] = {arm.label: [] for arm in arms}
    for round_ in range(warmup + runs):
        for arm in arms:
            what = "warm-up" if round_ < warmup else f"run {round_ - warmup + 1}/{runs}"
            progress.set_description(f"{what}: {arm.label}")
            _sync(device)
            start = time.perf_counter()
            arm.step(tokens)
            _sync(device)
            if round_ >= warmup:
                samples[arm.label].append((time.perf_counter() - start) * 1e3)
            progress.update()
    timings = {}
    for label, values in samples.items():
        values.sort()
        timings[label] = Timing(statistics.median(values), _quantile(values, 0.2),
                                _quantile(values, 0.8), runs)
    return timings


@dataclass(frozen=True)
class Memory:
    """What one step of an arm holds after its forward (``held``) and, on CUDA, its peak
    over the whole step (``peak``), in bytes above what was allocated before the step."""

    held: int | None
    peak: int | None


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's bytes in use (``mallinfo2``: main-arena chunks in use plus mmapped ones),
    or None where the C library has no ``mallinfo2`` (not glibc, or glibc < 2.33)."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def memory(arm: Arm, tokens: torch.Tensor, device: torch.device) -> Memory:
    """:class:`Memory` of one step of ``arm`` (a step like the timed ones), with Python's
    garbage collector paused (a collection inside the step would free memory that was
    not the step's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        in_use = lambda: torch.cuda.memory_allocated(device)
    else:
        in_use = _heap_in_use()
        before = in_use() if in_use else 0
    with use_backend(arm.backend), _gc_paused():
        loss = arm.loss(tokens)
        held = in_use() - before if in_use else None
        loss.backward()
        del loss
        arm.optimizer.step()
        arm.optimizer.zero_grad(set_to_none=True)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return Memory(held, peak)


# --- the whole run ----------------------------------------------------------------------

@dataclass
class ModelRun:
    """What :func:`run` measured: the records, the methods whose alternative was missing
    (method -> why) and the methods whose check failed."""

    records: list[Record]
    missing: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)


def steps_in_run(methods: Sequence[str], missing: dict[str, str], warmup: int,
                 runs: int) -> int:
    """How many times :func:`run` advances its progress bar."""
    arms = 1 + sum(1 + (m not in missing) for m in methods)
    return arms * (2 + warmup + runs) + len(methods)


def run(env: Environment, shape: ModelShape, methods: Sequence[str], dtype: torch.dtype,
        device: torch.device, *, warmup: int, runs: int,
        progress: Progress | None = None) -> ModelRun:
    """Build every method's models and the floor, check fastpeft against each alternative,
    time the steps interleaved, measure each arm's memory; the records of it all."""
    progress = progress or _Silent()
    floor, methods_built = build(shape, methods, dtype, device, progress=progress)
    tokens = batch(shape, device)
    checks = {}
    for method in methods_built:
        progress.set_description(f"checking {method.name}: loss and gradients")
        checks[method.name] = check(method, tokens, device)
        progress.update()
    base_loss = floor_loss(floor, tokens)
    arms = [floor] + [arm for m in methods_built for arm in m.arms]
    timings = time_steps(arms, tokens, device, warmup=warmup, runs=runs, progress=progress)
    memories = {}
    gc.collect()  # what earlier steps left for the collector, before the first memory step
    for arm in arms:
        progress.set_description(f"memory: {arm.label}")
        memories[arm.label] = memory(arm, tokens, device)
        progress.update()
    records = []
    for method in methods_built:
        c = checks[method.name]
        for arm, loss in ((method.fastpeft, c.loss), (method.alternative, c.alternative_loss),
                          (floor, base_loss)):
            if arm is not None:
                records += _records(env, shape, method.name, arm, timings[arm.label],
                                    memories[arm.label], loss,
                                    c if arm is method.fastpeft else None)
    return ModelRun(records, {m.name: m.missing for m in methods_built if m.missing},
                    [name for name, c in checks.items() if not c.ok])


def _records(env: Environment, shape: ModelShape, method: str, arm: Arm, timing: Timing,
             mem: Memory, loss: float | None, check_: Check | None) -> list[Record]:
    """The records of one arm under ``method``; ``check_`` on fastpeft's only."""
    metrics = {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms,
               "p80_ms": timing.p80_ms, "tokens_per_s": shape.tokens / timing.median_ms * 1e3,
               "trainable_params": sum(p.numel() for _, p in arm.trainable()),
               "held_bytes": mem.held, "peak_bytes": mem.peak, "loss": loss}
    if check_ is not None and check_.loss_delta is not None:
        metrics.update(loss_delta=check_.loss_delta, grad_error=check_.grad_error,
                       loss_tol=check_.loss_tol, grad_tol=check_.grad_tol)
    return [Record(env.timestamp, method, str(shape), shape.tokens, arm.provider, arm.role,
                   MODE, metric, float(value), env.dtype, env.device, env.torch, env.triton,
                   env.fastpeft)
            for metric, value in metrics.items() if value is not None]


# --- the table --------------------------------------------------------------------------

LEGEND = """\
One step: forward, loss, backward, AdamW step, zero_grad. step ms: the median of the timed
steps; spread: their 20th to 80th percentile, in % of the median. speedup: the
alternative's step time over fastpeft's (> 1: fastpeft is faster). /floor: the step time
over the floor's, the frozen model without any adapter (backward through the activations
only, no weight gradient)."""

CHECK_LEGEND = """\
Check, before timing: the loss and the adapter gradients of one batch, dropout off.
grad diff: the largest ||g_fastpeft - g_alternative|| / ||g_alternative|| over the
adapter tensors. no adapter: the frozen model's loss, which the adapters move away from."""


def mismatch(records: Iterable[Record], method: str) -> bool:
    """Whether the records say fastpeft's check against the alternative failed."""
    values = {r.metric: r.value for r in records if r.op == method and r.role == "fastpeft"}
    if "loss_delta" not in values:
        return False
    return values["loss_delta"] > values["loss_tol"] or values["grad_error"] > values["grad_tol"]


def _num(value: float | None) -> str:
    """Three significant digits (2.52, 26.4, 2521); "-" for no value."""
    if value is None:
        return "-"
    if not value:
        return "0"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def _count(value: float | None) -> str:
    """A parameter count: 6.29M, 41k, 1."""
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "-"


def _mb(value: float | None) -> str:
    return _num(None if value is None else value / 2**20)


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def model_table(records: Iterable[Record], missing: dict[str, str] | None = None) -> str:
    """The run's tables: per method, a line each for fastpeft, the alternative and (once,
    last) the floor: step time and spread, tokens/s, fastpeft's speedup over the
    alternative, each one's time over the floor's, memory (held after the forward; on
    CUDA also the step's peak) and trainable parameters; then the check of each method.
    At most 100 columns."""
    records = list(records)
    by: dict[tuple[str, str], dict[str, float]] = {}  # (method, role) -> metric -> value
    names = {}
    for r in records:
        by.setdefault((r.op, r.role), {})[r.metric] = r.value
        names[r.op, r.role] = r.provider
    methods = list(dict.fromkeys(r.op for r in records))
    peak = any("peak_bytes" in values for values in by.values())
    first = records[0]
    lines = [f"{first.shape}", f"{first.dtype} on {first.device}", LEGEND,
             "held MB: " + ("allocated after the forward and loss, above before the step; "
                            "peak MB: the most allocated during the step, above before it"
                            if peak else "heap in use after the forward and loss, above before "
                            "the step (glibc's\nmallinfo2: what the graph keeps for backward, "
                            "however it is saved, and the logits)")]
    lines += [f"alternative skipped: {m}: {why}" for m, why in (missing or {}).items()]
    lines += ["", f"{'method':<16}{'provider':<10}{'step ms':>8}{'spread':>8}{'tokens/s':>10}"
              f"{'speedup':>9}{'/floor':>8}{'held MB':>9}" + (f"{'peak MB':>9}" if peak else "")
              + f"{'trainable':>11}"]

    def row(method: str, provider: str, values: dict[str, float], speedup: str,
            floor_ms: float | None) -> str:
        median = values["median_ms"]
        spread = f"{(values['p80_ms'] - values['p20_ms']) / median:.0%}"
        return (f"{method:<16}{provider:<10}{_num(median):>8}{spread:>8}"
                f"{_num(values['tokens_per_s']):>10}{speedup:>9}"
                f"{_ratio(median, floor_ms):>8}{_mb(values.get('held_bytes')):>9}"
                + (f"{_mb(values.get('peak_bytes')):>9}" if peak else "")
                + f"{_count(values.get('trainable_params')):>11}")

    floor = next((by[m, "floor"] for m in methods if (m, "floor") in by), None)
    floor_ms = floor["median_ms"] if floor else None
    for method in methods:
        roles = [role for role in ("fastpeft", "peer", "reference") if (method, role) in by]
        alt = next((role for role in roles if role != "fastpeft"), None)
        for i, role in enumerate(roles):
            speedup = "-"
            if role == "fastpeft" and alt is not None:
                speedup = _ratio(by[method, alt]["median_ms"], by[method, role]["median_ms"])
            lines.append(row(method if i == 0 else "", names[method, role], by[method, role],
                             speedup, floor_ms))
    if floor is not None:
        lines.append(row("floor", FLOOR, floor, "-", floor_ms))

    lines += ["", CHECK_LEGEND, "",
              f"{'method':<16}{'fastpeft':>10}{'alternative':>13}{'no adapter':>12}"
              f"{'loss diff':>11}{'tol':>9}{'grad diff':>10}{'tol':>9}  verdict"]
    for method in methods:
        fast = by.get((method, "fastpeft"), {})
        alt_role = next((role for role in ("peer", "reference") if (method, role) in by), None)
        alt_loss = by[method, alt_role].get("loss") if alt_role else None
        base_loss = by.get((method, "floor"), {}).get("loss")
        if "loss_delta" in fast:
            verdict = "MISMATCH" if mismatch(records, method) else "ok"
        else:
            verdict = "no alternative"
        lines.append(f"{method:<16}{_loss(fast.get('loss')):>10}{_loss(alt_loss):>13}"
                     f"{_loss(base_loss):>12}{_sci(fast.get('loss_delta')):>11}"
                     f"{_sci(fast.get('loss_tol')):>9}{_sci(fast.get('grad_error')):>10}"
                     f"{_sci(fast.get('grad_tol')):>9}  {verdict}")
    return "\n".join(line.rstrip() for line in lines)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
