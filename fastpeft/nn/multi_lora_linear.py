"""``MultiLoRALinear``: one frozen base layer carrying several named LoRA adapters, and a
batch whose rows each pick one of them (or none), in one fused pass."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .. import _backend
from ..ops._checks import check_positive_int
from ..ops.multi_lora_linear import multi_lora_linear
from ._kept import outside_inference_mode, weights_key
from .lora_linear import autocast_dtype, check_linear_base, is_conv1d, linear_weight

__all__ = ["BASE", "MultiLoRALinear", "check_adapter_name", "per_row_ids",
           "set_adapter_names", "stack_adapters", "stack_adapters_cached", "without_caches"]

#: The adapter name that selects the base layer alone (PEFT's ``"__base__"``).
BASE = "__base__"


def check_adapter_name(arg: str, name: object) -> str:
    """Refuses an adapter name that cannot be a module key (``.``), a directory of PEFT's
    multi-adapter layout (a path separator) or the base's own name; ``arg`` names the
    argument in the error."""
    if not isinstance(name, str) or not name or name == BASE \
            or any(c in name for c in "./\\"):
        raise ValueError(f"{arg}: adapter names are non-empty str without '.', '/' or '\\' "
                         f"(a module key and a directory name), not {BASE!r}; got {name!r}")
    return name


class MultiLoRALinear(nn.Module):
    """``base(x) + scaling[i] * lora_B[i](lora_A[i](dropout(x)))`` with ``i`` chosen per row,
    computed by :func:`fastpeft.multi_lora_linear` (the base GEMM once for the batch, each
    adapter on its own rows).

    The adapters are kept as PEFT keeps them: ``lora_A`` and ``lora_B`` are
    ``nn.ModuleDict``s of bias-free ``nn.Linear`` layers keyed by adapter name, so the
    state-dict keys are ``lora_A.<name>.weight`` / ``lora_B.<name>.weight``, and each adapter
    has its own ``r``, ``lora_alpha``, ``lora_dropout`` and ``scaling``. Adapters of a smaller
    rank are zero-padded to the largest rank of the batch for the fused op.

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to adapt (shared, frozen).

    Call with ``adapter_names`` (one name per sample, that is per index of ``x``'s first
    dimension, ``"__base__"`` for none, as PEFT's mixed batches) or ``adapter_ids`` (an int64
    tensor of shape ``x.shape[:-1]`` indexing :attr:`adapter_names`, ``-1`` for none), or
    with neither once :attr:`active_names` is set (inside a model:
    :func:`fastpeft.set_adapter_names`). Gradients reach each adapter from its own rows
    only; in training, the adapters of one batch must share one ``lora_dropout`` (the fused
    op draws one mask for the batch).
    """

    #: Set by :func:`fastpeft.inject` on every layer of a model where some layer holds an
    #: adapter ``"default"``: a call with no names runs ``"default"`` there, and the base
    #: alone where the layer lacks it, as PEFT runs its active adapter.
    model_default: bool = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        check_linear_base(base)
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.fan_in_fan_out = is_conv1d(base)
        self.out_features, self.in_features = linear_weight(base).shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}

    @property
    def active_names(self) -> str | tuple[str, ...] | None:
        """The adapters a call without ``adapter_names`` / ``adapter_ids`` uses, set on every
        layer of a model by :func:`fastpeft.set_adapter_names`: one name for every row, or
        one name per sequence (a name this layer lacks, like ``"__base__"``, is the base
        alone here, as in PEFT). An input of 3 or more dimensions whose first is k times
        as long takes each name k times in a row, as ``generate()`` repeats each sequence
        for ``num_beams`` / ``num_return_sequences``."""
        return self.__dict__.get("_fastpeft_active")

    @active_names.setter
    def active_names(self, names: str | tuple[str, ...] | None) -> None:
        self.__dict__["_fastpeft_active"] = names
        self._index_active_names()

    def _index_active_names(self) -> None:
        """Keeps the indices of :attr:`active_names` in this layer's adapters as a tensor
        on the base weight's device, made when the names are set: a compiled model reads
        the tensor, not the names, so a new combination of names (of the same count) runs
        the same graph instead of compiling another."""
        names = self.active_names
        record = None
        if names is not None:
            keys = tuple(self._modules["lora_A"]._modules)
            index = {a: i for i, a in enumerate(keys)}
            listed = (names,) if isinstance(names, str) else names
            with outside_inference_mode():
                # (ids made in inference mode could not be saved by a later backward)
                ids = torch.tensor([index.get(a, -1) for a in listed], dtype=torch.int64,
                                   device=linear_weight(self.base_layer).device)
            record = (isinstance(names, str), ids, keys)
        self.__dict__["_fastpeft_active_ids"] = record

    def _apply(self, fn, recurse=True):
        # (model.to(device) after set_adapter_names: the names' indices follow the weights)
        module = super()._apply(fn, recurse)
        if self.__dict__.get("_fastpeft_active_ids") is not None:
            self._index_active_names()
        return module

    @property
    def adapter_names(self) -> list[str]:
        """The adapters in the order ``adapter_ids`` index them."""
        return list(self.lora_A.keys())

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, lora_alpha: float = 1.0,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
        """A new adapter with PEFT's initialisation (A Kaiming-uniform, B zeros), in the base
        weight's dtype and device."""
        check_adapter_name("name", name)
        if name in self.lora_A:
            raise ValueError(f"name: adapter {name!r} exists already")
        check_positive_int("r", r)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected 0 <= p < 1, got {lora_dropout}")
        w = self.base_layer.weight
        factory = {"device": w.device, "dtype": w.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.lora_dropout[name], self.use_rslora[name] = float(lora_dropout), use_rslora
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self._index_active_names()

    def delete_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"name: no adapter {name!r} (adapters: {self.adapter_names})")
        del self.lora_A[name], self.lora_B[name]
        for table in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
            del table[name]
        self._index_active_names()

    def ids_of(self, adapter_names: Sequence[str], x: Tensor) -> Tensor:
        """``adapter_ids`` for ``x`` from one adapter name per sample (``x.shape[0]``)."""
        if isinstance(adapter_names, str) or len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names: expected a list of {x.shape[0]} names (one per "
                             f"sample, x.shape[0]), got {adapter_names!r}")
        unknown = sorted({a for a in adapter_names if a != BASE and a not in self.lora_A})
        if unknown:
            raise ValueError(f"adapter_names: no adapter {unknown} in this layer (adapters: "
                             f"{self.adapter_names}; {BASE!r} for the base alone)")
        return per_row_ids(adapter_names, self.adapter_names, x)

    def active_ids(self, x: Tensor) -> Tensor:
        """``adapter_ids`` for ``x`` from :attr:`active_names`, or ``"default"`` where none
        are set (PEFT's active adapter; the per-sequence ids are kept between calls with the
        same names, adapters, batch and device, as in every step of ``generate()``).

        ``x`` is ``(batch, ...)`` with one name per sequence, or per group of
        ``batch // len(names)`` consecutive sequences (generate's beams and returned
        sequences); or 2-D ``(batch * seq, in)``, the tokens of a ``(batch, seq)`` input
        flattened as an MoE's shared expert takes them, where a 3-D input of an earlier
        layer of the same call told ``(batch, seq)``."""
        record = self.__dict__.get("_fastpeft_active_ids")
        if torch.compiler.is_compiling() and record is not None \
                and record[2] == tuple(self._modules["lora_A"]._modules):
            # the names' indices as a tensor, not the names: the graph does not specialise
            # on them (one graph for every combination of as many names)
            one, ids, _ = record
            ids = ids.to(x.device)
            if not one:
                repeat, tokens = self._per_name_rows(x, ids.shape[0])
                ids = ids.repeat_interleave(repeat * tokens) if repeat * tokens > 1 else ids
            return ids.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
        names = self.active_names or "default"
        if isinstance(names, str):  # one adapter for every row
            index = self.adapter_names.index(names) if names in self.lora_A else -1
            return torch.full(x.shape[:-1], index, dtype=torch.int64, device=x.device)
        repeat, tokens = self._per_name_rows(x, len(names))
        key = (names, tuple(self.lora_A.keys()), x.device, repeat, tokens)
        cached = self.__dict__.get("_fastpeft_ids")
        if cached is None or cached[0] != key:
            index = {a: i for i, a in enumerate(self.lora_A.keys())}
            keep = not torch.compiler.is_compiling()
            with outside_inference_mode() if keep else contextlib.nullcontext():
                # (kept ids made in inference mode could not be saved by a later backward)
                ids = torch.tensor([index.get(a, -1) for a in names], dtype=torch.int64,
                                   device=x.device)
                ids = ids.repeat_interleave(repeat * tokens) if repeat * tokens > 1 else ids
            cached = (key, ids)
            if keep:
                self.__dict__["_fastpeft_ids"] = cached
        return cached[1].view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])

    def _per_name_rows(self, x: Tensor, n: int) -> tuple[int, int]:
        """``(repeat, tokens)``: each of the ``n`` names set covers ``repeat`` consecutive
        sequences of ``tokens`` rows each of ``x``'s flattened rows (see
        :meth:`active_ids`); refuses an input the names do not divide."""
        rows, seen = x.shape[0], self.__dict__.get("_fastpeft_batch")
        if x.dim() >= 3 and rows % n == 0 and rows > 0:
            if seen is not None and x.dim() == 3:
                seen.shape = (rows, x.shape[1])
            return rows // n, 1
        if x.dim() == 2 and rows == n:
            return 1, 1
        if x.dim() == 2 and seen is not None and seen.shape is not None \
                and seen.shape[0] % n == 0 and rows == seen.shape[0] * seen.shape[1]:
            return seen.shape[0] // n, seen.shape[1]
        raise ValueError(
            f"adapter_names: {n} names set (fastpeft.set_adapter_names), one per "
            f"sequence, but this layer's input has shape {tuple(x.shape)}, whose first "
            f"dimension is not the batch of sequences (nor, for a 2-D input, its "
            f"batch * sequence-length tokens)")

    def forward(self, x: Tensor, adapter_names: Sequence[str] | None = None,
                adapter_ids: Tensor | None = None) -> Tensor:
        # (submodules and parameters read off their dicts, not through
        # nn.Module.__getattr__: a serving call's Python is a sizeable part of its time)
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        modules = self._modules
        adapters = modules["lora_A"]._modules
        if not adapters:
            raise ValueError("MultiLoRALinear: no adapters yet (add_adapter)")
        if adapter_names is None and adapter_ids is None and self.training \
                and not torch.compiler.is_compiling():
            self._check_recomputed_names()
        if adapter_ids is not None and adapter_names is None:
            ids = adapter_ids
        elif adapter_names is not None and adapter_ids is None:
            ids = self.ids_of(adapter_names, x)
        elif adapter_names is None and (self.__dict__.get("_fastpeft_active_ids") is not None
                                        or "default" in adapters or self.model_default):
            ids = self.active_ids(x)
        else:
            raise ValueError("adapter_names / adapter_ids: pass exactly one of them (or, in a "
                             "model, set them with fastpeft.set_adapter_names; a layer with "
                             "an adapter 'default' runs it when none is named, as PEFT)")
        p = self._batch_dropout(adapter_names, adapter_ids) if self.training else 0.0
        base = modules["base_layer"]
        params = base._parameters
        weight, bias = params.get("weight"), params.get("bias")
        if weight is None or (bias is None and "bias" not in params):
            # a parametrised weight or bias is no parameter of the base: the attributes then
            weight, bias = base.weight, base.bias
        if self.fan_in_fan_out:
            weight = weight.t()
        dtype = autocast_dtype(x)
        if dtype is None:
            lora_A, lora_B, scaling = self.stacked(weight.dtype)
            return multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, ids, p,
                                     self.training)
        # as nn.Linear under autocast: every operand in its dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        lora_A, lora_B, scaling = self.stacked(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, ids, p,
                                     self.training)

    def __getstate__(self) -> dict:
        return without_caches(super().__getstate__())

    def _check_recomputed_names(self) -> None:
        """Under gradient checkpointing a training forward runs again in backward (the
        recomputation), reading :attr:`active_names` then: refuses names other than the
        forward's (names set by a ``set_adapter_names`` context that has exited, or by a
        later forward), which would give wrong gradients."""
        names = self.active_names
        if torch._C._current_graph_task_id() == -1:  # not in backward
            self.__dict__["_fastpeft_forward_names"] = names
        elif self.__dict__.get("_fastpeft_forward_names", names) != names:
            raise RuntimeError(
                f"adapter_names: this layer's forward runs again in backward (gradient "
                f"checkpointing) with names {names!r} set, but ran with "
                f"{self.__dict__['_fastpeft_forward_names']!r}; call backward inside the "
                f"fastpeft.set_adapter_names context, before the names change")

    def _batch_dropout(self, adapter_names: Sequence[str] | None,
                       adapter_ids: Tensor | None) -> float:
        """The one dropout probability of a training batch: its adapters' ``lora_dropout``
        (those of the names or ids given, else of the names set), which must agree; the
        layer's other adapters may differ."""
        ps = set(self.lora_dropout.values())
        if len(ps) == 1:
            return ps.pop()
        if adapter_names is not None:
            used = set(adapter_names)
        elif adapter_ids is not None:
            order = self.adapter_names
            used = {order[i] for i in adapter_ids.unique().tolist() if 0 <= i < len(order)}
        else:
            names = self.active_names or "default"
            used = {names} if isinstance(names, str) else set(names)
        dropouts = {a: p for a, p in self.lora_dropout.items() if a in used}
        if len(set(dropouts.values())) > 1:
            raise ValueError(
                "lora_dropout: one fused batch applies one dropout probability, but the "
                f"batch's adapters have {dropouts}; train them in separate batches, give them "
                "one lora_dropout, or run in eval mode")
        return next(iter(dropouts.values()), 0.0)

    def stacked(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`stack_adapters` of every adapter, in :attr:`adapter_names` order (kept
        between calls where no gradient is needed, as :func:`stack_adapters_cached`)."""
        # (the module dicts themselves: nn.Module.__getattr__ per adapter was a sizeable
        # part of a serving call's Python)
        modules = self._modules
        a_mods, b_mods = modules["lora_A"]._modules, modules["lora_B"]._modules
        scalings = self.scaling
        native = _backend.native_module
        key = None
        if native is not None and not torch.compiler.is_compiling() \
                and (not torch.is_grad_enabled() or _frozen(a_mods, b_mods)):
            # whether the kept stack is current, in one C++ call that reads the scalings
            # and the weights off the modules without listing them (None: no caching)
            key = native.adapters_key(a_mods, b_mods, scalings, "weight")
            if key is not None:
                key = (dtype, key)
                cached = self.__dict__.get("_fastpeft_stack")
                if cached is not None and cached[0] == key:
                    return cached[1]
        lora_A = [m._parameters.get("weight") for m in a_mods.values()]
        lora_B = [b_mods[a]._parameters.get("weight") for a in a_mods]
        if any(w is None for w in lora_A) or any(w is None for w in lora_B):
            # a parametrised weight is no parameter of its module: the attribute then
            lora_A = [m.weight for m in a_mods.values()]
            lora_B = [b_mods[a].weight for a in a_mods]
        scaling = [scalings[a] for a in a_mods]
        if key is None:
            return stack_adapters_cached(self, lora_A, lora_B, scaling, dtype)
        return _keep_stack(self, key, lora_A, lora_B, scaling, dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}(r={self.r[a]}, alpha={self.lora_alpha[a]})"
                             for a in self.adapter_names)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}]")


def _frozen(*module_dicts: dict[str, nn.Module]) -> bool:
    """Whether no module of the dicts has a ``weight`` parameter that requires grad (False
    where one has none, a parametrised weight: the caller then checks the attributes)."""
    for mods in module_dicts:
        for m in mods.values():
            w = m._parameters.get("weight")
            if w is None or w.requires_grad:
                return False
    return True


def stack_adapters(lora_A: Sequence[Tensor], lora_B: Sequence[Tensor],
                   scaling: Sequence[float], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The arguments of :func:`fastpeft.multi_lora_linear` from per-adapter weights
    ``(r_i, in)`` / ``(out, r_i)`` and scalings: ``lora_A (n, r, in)``, ``lora_B (n, out, r)``
    in ``dtype``, smaller ranks zero-padded to the largest ``r``, and ``scaling (n,)``
    float32. Differentiable: gradients reach each adapter's own weights."""
    rank = max(a.shape[0] for a in lora_A)
    stacked_a = torch.stack([nn.functional.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0]))
                             for a in lora_A])
    stacked_b = torch.stack([nn.functional.pad(b.to(dtype), (0, rank - b.shape[1]))
                             for b in lora_B])
    s = torch.tensor([float(v) for v in scaling], dtype=torch.float32, device=lora_A[0].device)
    return stacked_a, stacked_b, s


def stack_adapters_cached(owner: nn.Module, lora_A: Sequence[Tensor], lora_B: Sequence[Tensor],
                          scaling: Sequence[float],
                          dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`stack_adapters`, kept on ``owner`` between calls that need no gradient (grad
    disabled, as when serving, or no adapter weight requiring grad): a serving step then
    reads the adapters once, in the kernels, instead of copying them first. The stack is
    made again when a weight changes (its version, storage or layout: an optimizer step, a
    load, ``.to()``, ``.data =``), an adapter or a scaling changes, or the dtype does; it
    holds one copy of the adapters' weights (and keeps their storages alive until it is
    made again). A write through ``weight.data`` is not seen: PyTorch does not count it in
    the version, so write into the weight itself (under ``torch.no_grad()``), as optimizers
    and ``load_state_dict`` do. With gradients needed, the stack is made per call,
    differentiably."""
    weights = [*lora_A, *lora_B]
    if (torch.is_grad_enabled() and any(w.requires_grad for w in weights)) \
            or torch.compiler.is_compiling():  # (compiled: the graph stacks them itself)
        return stack_adapters(lora_A, lora_B, scaling, dtype)
    words = weights_key(weights)
    if words is None:  # inference tensors: no versions to tell a change by
        return stack_adapters(lora_A, lora_B, scaling, dtype)
    # (the scalings copied, as floats: one changed in place is seen)
    key = (dtype, tuple(map(float, scaling)), words)
    cached = owner.__dict__.get("_fastpeft_stack")
    if cached is not None and cached[0] == key:
        return cached[1]
    return _keep_stack(owner, key, lora_A, lora_B, scaling, dtype)


def without_caches(state: dict) -> dict:
    """A module's pickled state (``torch.save``, ``copy.deepcopy``) without the stacked
    adapters and ids kept between serving calls: the stack also holds the weights' storages
    (which ``torch.save`` refuses to write next to the same data typed), and is made again
    on the first call."""
    return {k: v for k, v in state.items() if k not in ("_fastpeft_stack", "_fastpeft_ids")}


def _keep_stack(owner: nn.Module, key: object, lora_A: Sequence[Tensor],
                lora_B: Sequence[Tensor], scaling: Sequence[float],
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """A new stack, kept on ``owner`` under ``key`` with the weights' storages: while they
    live no other tensor can take their addresses, so an equal key is never a new weight
    at an old address."""
    with torch.no_grad(), outside_inference_mode():
        # (a stack made in inference mode could not be saved by a later call's backward)
        stack = stack_adapters(lora_A, lora_B, scaling, dtype)
    storages = tuple(w.untyped_storage() for w in (*lora_A, *lora_B))
    owner.__dict__["_fastpeft_stack"] = (key, stack, storages)
    return stack


def per_row_ids(adapter_names: Sequence[str], adapters: Sequence[str], x: Tensor) -> Tensor:
    """``adapter_ids`` of shape ``x.shape[:-1]`` from one name per sample (``x.shape[0]``):
    each name's index in ``adapters``, -1 for a name not there (``"__base__"``)."""
    index = {a: i for i, a in enumerate(adapters)}
    per_sample = torch.tensor([index.get(a, -1) for a in adapter_names], dtype=torch.int64,
                              device=x.device)
    return per_sample.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])


def set_adapter_names(model: nn.Module,
                      names: str | Sequence[str] | None) -> contextlib.AbstractContextManager:
    """Picks the adapter of each sequence for every :class:`MultiLoRALinear` in ``model``
    (what :func:`fastpeft.inject` with several LoRA configs, or :func:`fastpeft.load_adapter`
    of several adapters, puts in): the model's plain calls, ``model(input_ids)``,
    ``model.generate(...)``, training steps, then run each sequence with its adapter.

    ``names``: one adapter name per sequence of the batch (``"__base__"`` for the base model
    alone; a layer that lacks a named adapter computes the base alone for its rows, as in
    PEFT); or one name for every sequence; or ``None`` to unset. ``generate()`` keeps the
    batch, so the names hold for every step; with ``num_beams`` / ``num_return_sequences``
    each name is repeated as generate repeats its sequence. The names stay set until set
    again; used as a context manager (``with fastpeft.set_adapter_names(model, names):``),
    the previous ones come back on exit. Unknown names are refused here, naming the model's
    adapters. Backward needs no names (the ids are saved with the graph), except where
    gradient checkpointing runs the forward again: keep them set until ``backward()``.
    Each layer keeps the names' indices as a tensor, which a compiled model reads: a new
    combination of as many names runs the same compiled graph. Different names per sequence
    are refused where adapted layers sit in a vision / audio encoder (``vision_tower``,
    ``visual``, ...), whose batch is the images or clips rather than the sequences.
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]
    layers = [m for _, m in named]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MultiLoRALinear layers "
                         f"(fastpeft.inject with several LoRA configs puts them in)")
    if names is not None:
        listed = [names] if isinstance(names, str) else \
            list(names) if isinstance(names, Iterable) else []
        if not listed or not all(isinstance(a, str) for a in listed):
            raise ValueError(f"names: expected an adapter name or a non-empty list of them "
                             f"(one per sequence), got {names!r}")
        known = dict.fromkeys(a for m in layers for a in m.lora_A)
        unknown = sorted({a for a in listed if a != BASE and a not in known})
        if unknown:
            raise ValueError(f"names: no adapter {unknown} in the model (adapters: "
                             f"{list(known)}; {BASE!r} for the base alone)")
        names = names if isinstance(names, str) else tuple(listed)
        encoder = next((n for n, _ in named if _MEDIA_ENCODER.search(n)), None)
        if len(set(listed)) > 1 and encoder is not None:
            raise ValueError(
                f"names: one adapter per sequence cannot be matched to the rows of {encoder}, "
                f"in a vision / audio encoder whose batch is the images or clips, not the "
                f"sequences; adapt the language model alone (a target_modules regex), or "
                f"give the batch one adapter name")
    restore = _RestoreNames([(m, m.active_names, m.__dict__.get("_fastpeft_batch"))
                             for m in layers])
    seen = _BatchShape()  # shared: a 3-D input tells the 2-D ones (batch, seq)
    for m in layers:
        m.active_names = names
        m.__dict__["_fastpeft_batch"] = seen
    return restore


#: Where multimodal transformers models keep their vision / audio encoders, whose inputs
#: (images, clips) are not one per sequence.
_MEDIA_ENCODER = re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|"
                            r"image_encoder|audio_tower|audio_model)(\.|$)")


class _BatchShape:
    """``(batch, seq)`` of the last 3-D input a layer of one :func:`set_adapter_names`
    took, for the layers that take the same tokens flattened to 2-D."""

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None


class _RestoreNames(contextlib.AbstractContextManager):
    """What :func:`set_adapter_names` returns: as a context manager, puts the names each
    layer had before back on exit."""

    def __init__(self, previous: list[tuple[MultiLoRALinear, str | tuple[str, ...] | None,
                                            _BatchShape | None]]):
        self.previous = previous

    def __exit__(self, *exc_info) -> None:
        for layer, names, seen in self.previous:
            layer.active_names = names
            layer.__dict__["_fastpeft_batch"] = seen
