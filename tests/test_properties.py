"""Property tests: every public op on every backend against the unfused reference, over
randomly drawn cases.

Each test item draws ONE case from ``random.Random(f"{op}:{test id}")`` (for instance
``random.Random("lora_linear:cpu-float32-seed7")``), so a failing id reproduces exactly;
the drawn case is printed in every assertion message too. A case draws the shapes (odd
sizes, sizes of 1, some up to ~1000 with the total work bounded, 0 to 3 leading batch
dims, now and then an empty one), the dtype's values, the memory layout of every tensor
argument (transposed, permuted, strided and padded views; the storage around a view is
filled with NaN so a kernel reading outside it shows), which inputs require grad, bias
on/off, dropout (p in {0, 0.1, 0.5}, training on/off) and the op's options.

The fused op's output and every gradient are compared with the reference computed in
float64 from the same inputs, within :func:`helpers.assert_close_to_ref`'s dtype-aware
bound (2x PyTorch's own error in the test dtype plus a few ulps of the largest reference
value), widened only where the op's arithmetic says so (:class:`Sizes`: long sums and
sums that cancel, bounded by the size of their terms). Dropout masks agree through
``torch.manual_seed`` before the fused call and before drawing the reference's seed, as
in ``test_lora_linear.py``.

The Triton backend runs on CPU tensors through the interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1`` when there is no GPU): fewer, smaller cases, fp32 and fp16 only
there (the interpreter mishandles bf16 arithmetic); float64 runs on the CPU kernels.
The last section keeps the smallest cases of what the properties found, by name.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from helpers import assert_close_to_ref, backend_params, dtypes_for
from torch import Tensor

import fastpeft
from fastpeft import reference
from fastpeft.ops.lora_linear import draw_seed

# --- budgets --------------------------------------------------------------------------

# Examples per (op, backend, dtype); the CPU kernels get many, the interpreter few.
CPU_EXAMPLES = {"lora_linear": 24, "int8_lora_linear": 20, "gated_prefix_attention": 20,
                "bottleneck_adapter": 24, "multi_lora_linear": 24, "nf4_lora_linear": 20}
TRITON_EXAMPLES = {"lora_linear": 6, "int8_lora_linear": 5, "gated_prefix_attention": 5,
                   "bottleneck_adapter": 8, "multi_lora_linear": 10, "nf4_lora_linear": 5}


@dataclass(frozen=True)
class Budget:
    """Bounds of one drawn case: the largest size of a dimension, and the multiply-adds
    of one forward pass (the reference runs it three times more in float64)."""

    max_dim: int
    work: int


BUDGETS = {"cpu": Budget(max_dim=1000, work=200_000), "triton": Budget(max_dim=80, work=12_000)}

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def cases(op: str) -> list:
    """One pytest param per drawn case: (backend, device, dtype, rng key), the backend's
    skip marks (kernels not built, no interpreter) reused from :func:`backend_params`."""
    params = []
    for bp in backend_params(op):
        backend, device = bp.values[0]
        dtypes = dtypes_for(backend, device)
        if backend == "cpu":
            dtypes = [*dtypes, torch.float64]
        count = (CPU_EXAMPLES if backend == "cpu" else TRITON_EXAMPLES)[op]
        for dtype in dtypes:
            for i in range(count):
                case_id = f"{bp.id}-{DTYPE_NAMES[dtype]}-seed{i}"
                params.append(pytest.param(backend, device, dtype, f"{op}:{case_id}",
                                           id=case_id, marks=bp.marks))
    return params


# --- drawing sizes, layouts and values ------------------------------------------------


def draw_size(rng: random.Random, hi: int, *, zero: bool = False) -> int:
    """A dimension in [1, hi] (or 0, rarely, with ``zero``): often 1, often small and odd,
    sometimes large."""
    hi = max(hi, 1)
    u = rng.random()
    if zero and u < 0.03:
        return 0
    if u < 0.2:
        n = 1
    elif u < 0.55:
        n = rng.randint(2, 17)
    elif u < 0.85:
        n = rng.randint(18, 130)
    else:
        n = rng.randint(131, 1000)
    if rng.random() < 0.6:
        n |= 1  # odd sizes leave a tail after every block width
    return min(n, hi)


def draw_lead(rng: random.Random, max_rows: int) -> tuple[int, ...]:
    """0 to 3 leading batch dims (sizes include 1, rarely 0) whose product is <= max_rows."""
    dims = []
    left = max(max_rows, 1)
    for _ in range(rng.randint(0, 3)):
        n = draw_size(rng, left, zero=True)
        dims.append(n)
        left = max(left // max(n, 1), 1)
    return tuple(dims)


def fit(rng: random.Random, sizes: list[int], cost: Callable[[list[int]], int],
        budget: int) -> list[int]:
    """Halve randomly chosen sizes (> 1) until ``cost(sizes) <= budget``."""
    sizes = list(sizes)
    while cost(sizes) > budget:
        big = [i for i, s in enumerate(sizes) if s > 1]
        if not big:
            break
        i = rng.choice(big)
        sizes[i] = max(1, sizes[i] // 2) | (sizes[i] & 1)
    return sizes


# Layouts a tensor argument may come in; each is a leaf view with that layout.
#   contiguous  - plain row-major
#   transposed  - the last two dims swapped in storage (w_in_out.t(), x of (.., in, T))
#   permuted    - the first two dims swapped in storage (seq-first activations)
#   strided     - every other element of the last dim
#   padded      - rows longer than the last dim (a slice of a wider tensor)
#   column      - 1-D only: a column of a 2-D tensor
LAYOUTS_ND = ("contiguous", "transposed", "permuted", "strided", "padded")
LAYOUTS_1D = ("contiguous", "strided", "column")


def draw_layout(rng: random.Random, ndim: int, p_plain: float = 0.5) -> str:
    """A layout that applies to an ``ndim``-D tensor; contiguous with probability p_plain."""
    if rng.random() < p_plain:
        return "contiguous"
    if ndim == 1:
        return rng.choice(LAYOUTS_1D[1:])
    choices = ["strided", "padded"]
    if ndim >= 2:
        choices.append("transposed")
    if ndim >= 3:
        choices.append("permuted")
    return rng.choice(choices)


def _filler(dtype: torch.dtype) -> float:
    return float("nan") if dtype.is_floating_point else 77


def laid_out(value: Tensor, layout: str, requires_grad: bool = False,
             device: str = "cpu") -> Tensor:
    """A leaf tensor on ``device`` equal to ``value`` in ``layout`` (see LAYOUTS_ND); what
    its storage holds outside the view is NaN (77 for integers), so a kernel that reads
    past the view fails."""
    value = value.to(device)
    shape, dt = tuple(value.shape), value.dtype
    if layout == "contiguous" or value.dim() == 0:
        out = value.clone()
    elif layout == "transposed" and value.dim() >= 2:
        out = value.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "permuted" and value.dim() >= 3:
        out = value.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "heads_last" and value.dim() == 4:  # (B, M, H, D).transpose(1, 2)
        out = value.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), _filler(dt), dtype=dt, device=device)
        out = buf[..., 1::2]
        out.copy_(value)
    elif layout == "padded":
        buf = torch.full((*shape[:-1], shape[-1] + 3), _filler(dt), dtype=dt, device=device)
        out = buf[..., 2:2 + shape[-1]]
        out.copy_(value)
    elif layout == "column" and value.dim() == 1:
        buf = torch.full((shape[0], 3), _filler(dt), dtype=dt, device=device)
        out = buf[:, 1]
        out.copy_(value)
    else:
        raise ValueError(f"layout {layout!r} does not apply to shape {shape}")
    assert torch.equal(out, value)
    return out.requires_grad_(requires_grad)


def randn(gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype, scale: float = 1.0,
          shift: float = 0.0) -> Tensor:
    """Normal values drawn in float64 from ``gen``, rounded to ``dtype``."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def draw_requires_grad(rng: random.Random, names: Sequence[str], p: float) -> dict[str, bool]:
    """Each name requires grad with probability p; at least one does."""
    flags = {n: rng.random() < p for n in names}
    if not any(flags.values()):
        flags[rng.choice(list(names))] = True
    return flags


# --- running and comparing ------------------------------------------------------------

Inputs = dict[str, "Tensor | None"]
# (inputs, dropout seed or None, low precision reference?) -> output
RefFn = Callable[[Inputs, "Tensor | None", bool], Tensor]


def _unique_grad_inputs(inputs: Inputs) -> list[tuple[str, Tensor]]:
    """The (name, tensor) pairs that require grad, each tensor once (the adapter's
    residual may be x itself)."""
    seen: set[int] = set()
    out = []
    for name, t in inputs.items():
        if t is not None and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _cast(inputs: Inputs, dtype: torch.dtype, keep: frozenset[str]) -> Inputs:
    """Fresh leaves of ``inputs`` in ``dtype`` (the names in ``keep``, int8 weights,
    scales and masks, unchanged), aliases preserved."""
    memo: dict[int, Tensor] = {}
    out: Inputs = {}
    for name, t in inputs.items():
        if t is None or name in keep:
            out[name] = t
            continue
        if id(t) not in memo:
            memo[id(t)] = t.detach().to(dtype).requires_grad_(t.requires_grad)
        out[name] = memo[id(t)]
    return out


def _grads(y: Tensor, wrt: list[tuple[str, Tensor]], dy: Tensor) -> list[Tensor | None]:
    got = torch.autograd.grad(y, [t for _, t in wrt], dy.to(y.dtype), allow_unused=True)
    return list(got)


@dataclass
class Sizes:
    """How large the quantities are that each result (``out``, ``d_<input>``) is made of,
    beyond its own largest value, so that the bound can follow the op's arithmetic.

    ``cancel``: the size of terms rounded in the test dtype that cancel analytically (a
    softmax over one key gives d k = 0 from terms of size |dO| |v|): the helper's
    ``ulps * eps * max|ref|`` is applied with max|ref| raised to it.
    ``terms``: the sum of |terms| a result accumulates (in fp32, fp64 for fp64): the
    standard bound of a sum is a few eps times it, which covers long reductions (up to
    ~10^4 rows here) and sums that cancel by chance (a d lora_A of one column).
    """

    cancel: dict[str, float] = field(default_factory=dict)
    terms: dict[str, float] = field(default_factory=dict)


# eps (of the accumulation dtype) times the sum of |terms| allowed per result
ACC_ULPS = 4.0


def check_case(
    case: object,
    backend: str,
    dtype: torch.dtype,
    inputs: Inputs,
    fused: Callable[[Inputs], Tensor],
    ref: RefFn,
    dropout: bool,
    ulps: float,
    keep: frozenset[str] = frozenset(),
    sizes: Callable[[Tensor, Tensor | None], Sizes] | None = None,
    exact: Callable[[dict[str, Tensor], str], None] | None = None,
) -> None:
    """Run ``fused`` under ``backend`` and the reference in float64 and in ``dtype``
    (PyTorch's own error) on the same inputs, and compare the output and the gradient of
    every input that requires grad (a random upstream gradient ``dy``):
    :func:`helpers.assert_close_to_ref` with ``ulps`` of the largest reference value, more
    where ``sizes(dy, dropout seed)`` says the result sums or cancels larger terms.
    ``exact(results by name, label)`` checks what must hold exactly (zeros)."""
    torch.manual_seed(1234)
    with fastpeft.use_backend(backend):
        y = fused(inputs)
    torch.manual_seed(1234)  # the seed the op drew for its dropout mask
    seed = draw_seed(y.device) if dropout else None
    wrt = _unique_grad_inputs(inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dy = dy.to(dtype).to(y.device)
    got = [y, *_grads(y, wrt, dy)]

    refs: dict[str, list[Tensor | None]] = {}
    for key, dt in (("64", torch.float64), ("lowp", dtype)):
        if key == "lowp" and dtype == torch.float64:
            refs["lowp"] = refs["64"]
            break
        copies = _cast(inputs, dt, keep)
        r = ref(copies, seed, key == "lowp")
        refs[key] = [r, *_grads(r, _unique_grad_inputs(copies), dy)]

    names = ["out", *(f"d_{n}" for n, _ in wrt)]
    if exact is not None:
        exact(dict(zip(names, got, strict=True)), f"[{backend}, {DTYPE_NAMES[dtype]}] of {case}")
    size = sizes(dy.double(), seed) if sizes is not None else Sizes()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    acc_ratio = torch.finfo(acc).eps / torch.finfo(dtype).eps
    for name, g, r64, rlow in zip(names, got, refs["64"], refs["lowp"], strict=True):
        label = f"{name} [{backend}, {DTYPE_NAMES[dtype]}] of {case}"
        assert g is not None, f"{label}: no gradient although the input requires grad"
        assert r64 is not None and rlow is not None
        assert g.shape == r64.shape, f"{label}: shape {tuple(g.shape)} != {tuple(r64.shape)}"
        if r64.numel() == 0:
            continue
        if not torch.isfinite(rlow).all():  # PyTorch overflowed in dtype: rounding only
            rlow = r64.to(dtype)
        magnitude = r64.abs().max().item() + 1e-6
        atol_eps = ulps * max(1.0, size.cancel.get(name, 0.0) / magnitude)
        atol_eps += ACC_ULPS * acc_ratio * size.terms.get(name, 0.0) / magnitude
        assert_close_to_ref(label, g, r64, rlow, atol_eps=atol_eps)


def abs_terms(inputs: Inputs, ref_abs: Callable[[Inputs], Tensor], dy: Tensor) -> Sizes:
    """``Sizes.terms`` of an op that is multilinear in its inputs (the LoRA linears):
    its float64 reference on |inputs| with upstream gradient |dy| gives, for the output
    and each gradient, the sum of |terms| of every element; the largest is kept."""
    memo: dict[int, Tensor] = {}
    copies: Inputs = {}
    for name, t in inputs.items():
        if t is not None and id(t) not in memo:
            a = t.detach().abs()  # the int8 weight stays int8, its |codes|
            if a.is_floating_point():
                a = a.double().requires_grad_(t.requires_grad)
            memo[id(t)] = a
        copies[name] = None if t is None else memo[id(t)]
    y = ref_abs(copies)
    wrt = _unique_grad_inputs(copies)
    grads = _grads(y, wrt, dy.abs())
    out = {"out": y}
    out.update({f"d_{n}": g for (n, _), g in zip(wrt, grads, strict=True) if g is not None})
    return Sizes(terms={n: t.max().item() if t.numel() else 0.0 for n, t in out.items()})


# --- lora_linear, int8_lora_linear and nf4_lora_linear -----------------------------------

# The base weight of a LoRA linear case: "float" (lora_linear), "int8", "nf4".
LORA_FNS = {"float": (fastpeft.lora_linear, reference.lora_linear),
            "int8": (fastpeft.int8_lora_linear, reference.int8_lora_linear),
            "nf4": (fastpeft.nf4_lora_linear, reference.nf4_lora_linear)}
QUANTISED_BASE = frozenset({"qweight", "weight_scale", "absmax"})


@dataclass(frozen=True)
class LoraCase:
    """One drawn call of ``lora_linear``, ``int8_lora_linear`` or ``nf4_lora_linear``."""

    lead: tuple[int, ...]
    d_in: int
    d_out: int
    r: int
    bias: bool
    dropout_p: float
    training: bool
    scaling: float
    layouts: tuple[tuple[str, str], ...]  # (argument, layout)
    requires_grad: tuple[str, ...]
    zero_rows: int  # int8 / nf4: weight rows that are all zero (scale / absmax 0)
    value_seed: int
    blocksize: int = 64  # nf4

    def layout(self, name: str) -> str:
        return dict(self.layouts)[name]


def draw_lora(rng: random.Random, budget: Budget, base: str) -> LoraCase:
    """A LoRA linear call over a ``base`` weight (see LORA_FNS) within ``budget``: sizes,
    layouts, flags and values."""
    hi = budget.max_dim
    r = draw_size(rng, min(hi, 72))
    d_in, d_out = draw_size(rng, hi), draw_size(rng, hi)
    d_in, d_out, r = fit(rng, [d_in, d_out, r], lambda s: s[0] * s[1] + s[2] * (s[0] + s[1]),
                         budget.work)
    if base == "nf4":
        d_in += d_in & 1  # two codes per byte
    dropout_p = rng.choice([0.0, 0.1, 0.5])
    training = rng.random() < 0.75
    max_rows = budget.work // (d_in * d_out + r * (d_in + d_out))
    if dropout_p and training:
        # the reference draws its mask with Philox in int64 torch ops (~1 us an element,
        # three times a case): at most ~30k masked elements
        max_rows = min(max_rows, max(1, 30_000 // d_in))
    lead = draw_lead(rng, max_rows)
    bias = rng.random() < 0.6
    scaling = rng.choice([1.0, 2.0, 16 / math.sqrt(r), rng.uniform(-3.0, 3.0)])
    x_dims = len(lead) + 1
    layouts = [("x", draw_layout(rng, x_dims)), ("weight", draw_layout(rng, 2)),
               ("bias", draw_layout(rng, 1)), ("lora_A", draw_layout(rng, 2, 0.7)),
               ("lora_B", draw_layout(rng, 2, 0.7))]
    if base != "float":  # the quantised weight is frozen
        layouts[1] = ("weight", draw_layout(rng, 2, 0.8))
        layouts.append(("weight_scale" if base == "int8" else "absmax",
                        draw_layout(rng, 1, 0.7)))
        flags = draw_requires_grad(rng, ["x", "bias", "lora_A", "lora_B"], 0.8)
    else:
        flags = draw_requires_grad(rng, ["x", "weight", "bias", "lora_A", "lora_B"], 0.8)
        if rng.random() < 0.6:  # the usual case: a frozen base layer
            flags["weight"] = flags["bias"] = False
            if not any(flags.values()):
                flags["lora_A"] = True
    if not bias:
        flags["bias"] = False
        if not any(flags.values()):
            flags["x"] = True
    zero_rows = rng.choice([0, 0, 0, 1]) if base != "float" else 0
    # nf4: blocks that cross rows (in % blocksize != 0) more often than not
    blocksize = rng.choice([16, 32, 64, 128]) if base == "nf4" else 64
    return LoraCase(lead, d_in, d_out, r, bias, dropout_p, training, scaling, tuple(layouts),
                    tuple(n for n, f in flags.items() if f), min(zero_rows, d_out),
                    rng.getrandbits(62), blocksize)


def lora_inputs(case: LoraCase, dtype: torch.dtype, base: str, device: str) -> Inputs:
    """The tensors of ``case`` in ``dtype`` on ``device``, in their layouts."""
    gen = torch.Generator().manual_seed(case.value_seed)
    d_in, d_out, r = case.d_in, case.d_out, case.r

    def make(name: str, value: Tensor) -> Tensor:
        return laid_out(value, case.layout(name), name in case.requires_grad, device)

    x = make("x", randn(gen, (*case.lead, d_in), dtype))
    w = randn(gen, (d_out, d_in), dtype if base == "float" else torch.float64, d_in**-0.5)
    inputs: Inputs = {"x": x}
    if base == "int8":
        w[: case.zero_rows] = 0.0
        q, s = fastpeft.quantize_int8(w.float())
        inputs["qweight"] = laid_out(q, case.layout("weight"), device=device)
        inputs["weight_scale"] = laid_out(s, case.layout("weight_scale"), device=device)
    elif base == "nf4":
        w[: case.zero_rows] = 0.0
        q, absmax = fastpeft.quantize_nf4(w.float(), case.blocksize)
        inputs["qweight"] = laid_out(q, case.layout("weight"), device=device)
        inputs["absmax"] = laid_out(absmax, case.layout("absmax"), device=device)
    else:
        inputs["weight"] = make("weight", w)
    inputs["bias"] = make("bias", randn(gen, (d_out,), dtype, 0.5)) if case.bias else None
    inputs["lora_A"] = make("lora_A", randn(gen, (r, d_in), dtype, d_in**-0.5))
    inputs["lora_B"] = make("lora_B", randn(gen, (d_out, r), dtype, r**-0.5))
    return inputs


def _lora_call(fn: Callable[..., Tensor], t: Inputs, case: LoraCase, scaling: float,
               *seed: Tensor | None) -> Tensor:
    """``fn`` (one of LORA_FNS, fused or the reference with its dropout ``seed``) on
    ``t``."""
    if "weight" in t:
        return fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling,
                  case.dropout_p, case.training, *seed)
    if "absmax" in t:
        return fn(t["x"], t["qweight"], t["absmax"], t["bias"], t["lora_A"], t["lora_B"],
                  scaling, case.dropout_p, case.training, *seed, blocksize=case.blocksize)
    return fn(t["x"], t["qweight"], t["weight_scale"], t["bias"], t["lora_A"], t["lora_B"],
              scaling, case.dropout_p, case.training, *seed)


def float_base(case: LoraCase, inputs: Inputs) -> Tensor:
    """The base weight of ``inputs`` as the reference uses it, in float64."""
    if "weight" in inputs:
        return inputs["weight"].detach().double()
    if "absmax" in inputs:
        return reference.dequantize_nf4(inputs["qweight"], inputs["absmax"], case.blocksize,
                                        torch.float64)
    return reference.dequantize_int8(inputs["qweight"], inputs["weight_scale"], torch.float64)


def lora_cancel(case: LoraCase, inputs: Inputs, dy: Tensor,
                seed: Tensor | None) -> dict[str, float]:
    """``Sizes.cancel`` of the LoRA linears: y and dx each add two products (base and
    LoRA branch) that the kernels, like PyTorch, may round to the test dtype before the
    sum, which can cancel (one output of size 4e-3 from terms of size 1): the largest
    |base| + |LoRA| of each, in float64."""
    t = {n: v.detach().double() for n, v in inputs.items()
         if v is not None and n not in QUANTISED_BASE}
    w = float_base(case, inputs)
    x = t["x"].reshape(-1, case.d_in)
    g = dy.reshape(-1, case.d_out)
    keep = torch.ones_like(x)
    if seed is not None:
        mask = reference.dropout_keep_mask(seed, x.shape[0], case.d_in, case.dropout_p,
                                           x.device)
        keep = mask.to(x) / (1.0 - case.dropout_p)
    a, b, s = t["lora_A"], t["lora_B"], case.scaling
    base = x @ w.T + (t["bias"] if "bias" in t else 0.0)
    lora = s * ((x * keep) @ a.T) @ b.T
    dx = (g @ w).abs() + (s * keep * ((g @ b) @ a)).abs()
    sizes = {"out": (base.abs() + lora.abs()), "d_x": dx}
    return {n: v.max().item() if v.numel() else 0.0 for n, v in sizes.items()}


def check_lora(backend: str, device: str, dtype: torch.dtype, case: LoraCase,
               base: str) -> None:
    """The LoRA linear over a ``base`` weight (see LORA_FNS) of ``case`` against the
    reference: the output and the gradients of x, lora_A, lora_B, and of bias (and weight)
    when they require grad; the references of the quantised ops dequantise the weight."""
    inputs = lora_inputs(case, dtype, base, device)
    fused_fn, ref_fn = LORA_FNS[base]

    def sizes(dy: Tensor, seed: Tensor | None) -> Sizes:
        # y and its gradients are sums of products of the inputs (and dropout's
        # non-negative mask): the reference on |inputs| sums their |terms|. The NF4
        # codes' values are signed (|code| is no code of |value|): their float weight.
        plain, abs_base = inputs, base
        if base == "nf4":
            plain = {n: v for n, v in inputs.items() if n not in QUANTISED_BASE}
            plain["weight"], abs_base = float_base(case, inputs), "float"
        size = abs_terms(plain, lambda t: _lora_call(LORA_FNS[abs_base][1], t, case,
                                                     abs(case.scaling), seed), dy)
        size.cancel = lora_cancel(case, inputs, dy, seed)
        return size

    check_case(case, backend, dtype, inputs,
               lambda t: _lora_call(fused_fn, t, case, case.scaling),
               lambda t, seed, _lowp: _lora_call(ref_fn, t, case, case.scaling, seed),
               case.dropout_p > 0 and case.training, 4.0, keep=QUANTISED_BASE, sizes=sizes)


@pytest.mark.parametrize(("backend", "device", "dtype", "key"), cases("lora_linear"))
def test_lora_linear(backend: str, device: str, dtype: torch.dtype, key: str) -> None:
    """lora_linear, any weight layout (w_in_out.t() included), against the reference."""
    case = draw_lora(random.Random(key), BUDGETS[backend], "float")
    check_lora(backend, device, dtype, case, "float")


@pytest.mark.parametrize(("backend", "device", "dtype", "key"), cases("int8_lora_linear"))
def test_int8_lora_linear(backend: str, device: str, dtype: torch.dtype, key: str) -> None:
    """int8_lora_linear on a weight from quantize_int8 (sometimes with all-zero rows,
    scale 0) against the reference on the dequantised weight."""
    case = draw_lora(random.Random(key), BUDGETS[backend], "int8")
    check_lora(backend, device, dtype, case, "int8")


@pytest.mark.parametrize(("backend", "device", "dtype", "key"), cases("nf4_lora_linear"))
def test_nf4_lora_linear(backend: str, device: str, dtype: torch.dtype, key: str) -> None:
    """nf4_lora_linear on a weight from quantize_nf4 (block sizes 16 .. 128, blocks that
    cross rows, sometimes all-zero rows: absmax 0) against the reference on the
    dequantised weight."""
    case = draw_lora(random.Random(key), BUDGETS[backend], "nf4")
    check_lora(backend, device, dtype, case, "nf4")


# --- multi_lora_linear -------------------------------------------------------------------


@dataclass(frozen=True)
class MultiCase:
    """One drawn call of ``multi_lora_linear``."""

    lead: tuple[int, ...]
    d_in: int
    d_out: int
    r: int
    n: int
    ranks: tuple[int, ...]  # each adapter's own rank (<= r), zero-padded to r
    ids_pool: tuple[int, ...]  # the ids the rows draw from (-1: the base alone)
    ids_sorted: bool  # rows already grouped by adapter (one segment each)
    bias: bool
    dropout_p: float
    training: bool
    scaling: tuple[float, ...]  # per adapter (float32 values)
    layouts: tuple[tuple[str, str], ...]
    requires_grad: tuple[str, ...]
    value_seed: int

    def layout(self, name: str) -> str:
        return dict(self.layouts)[name]


MULTI_TENSORS = ("x", "weight", "bias", "lora_A", "lora_B", "scaling", "adapter_ids")


def draw_multi(rng: random.Random, budget: Budget) -> MultiCase:
    """A multi-adapter LoRA linear call within ``budget``: 1 to 6 adapters of rank up to
    16 (some zero-padded from a smaller rank), rows naming every adapter, a subset (the
    others unused, their gradients zero), one adapter, or none (all -1)."""
    hi = budget.max_dim
    n = rng.randint(1, 6)
    r = draw_size(rng, min(hi, 16))
    d_in, d_out = draw_size(rng, hi), draw_size(rng, hi)
    # the adapters' parameters and gradients (n r (in + out)) count as much as a row
    d_in, d_out, r = fit(rng, [d_in, d_out, r],
                         lambda s: s[0] * s[1] + n * s[2] * (s[0] + s[1]), budget.work)
    dropout_p = rng.choice([0.0, 0.1, 0.5])
    training = rng.random() < 0.75
    # a row's multiply-adds, and the (T, out) sum the reference adds each adapter into
    max_rows = budget.work // (d_in * d_out + r * (d_in + d_out) + n * d_out)
    if dropout_p and training:  # as draw_lora: the reference's Philox mask is slow
        max_rows = min(max_rows, max(1, 30_000 // d_in))
    lead = draw_lead(rng, max_rows)
    u = rng.random()
    if u < 0.1:
        pool: tuple[int, ...] = (-1,)
    elif u < 0.25:
        pool = (rng.randrange(n),)
    elif u < 0.55:
        pool = tuple(sorted(rng.sample(range(-1, n), rng.randint(1, n + 1))))
    else:
        pool = tuple(range(-1, n))
    ranks = tuple(rng.randint(1, r) for _ in range(n)) if rng.random() < 0.3 else (r,) * n
    scaling = tuple(float(torch.tensor(0.0 if rng.random() < 0.05 else rng.choice(
        [1.0, 2.0, 16 / math.sqrt(r), rng.uniform(-3.0, 3.0)]), dtype=torch.float32))
        for _ in range(n))
    bias = rng.random() < 0.6
    x_dims = len(lead) + 1
    layouts = (("x", draw_layout(rng, x_dims)), ("weight", draw_layout(rng, 2)),
               ("bias", draw_layout(rng, 1)), ("lora_A", draw_layout(rng, 3, 0.6)),
               ("lora_B", draw_layout(rng, 3, 0.6)), ("scaling", draw_layout(rng, 1, 0.7)),
               ("adapter_ids", draw_layout(rng, len(lead), 0.7) if lead else "contiguous"))
    flags = draw_requires_grad(rng, ["x", "weight", "bias", "lora_A", "lora_B"], 0.8)
    if rng.random() < 0.6:  # a frozen base layer
        flags["weight"] = flags["bias"] = False
        if not any(flags.values()):
            flags["lora_A"] = True
    if not bias:
        flags["bias"] = False
        if not any(flags.values()):
            flags["x"] = True
    return MultiCase(lead, d_in, d_out, r, n, ranks, pool, rng.random() < 0.3, bias,
                     dropout_p, training, scaling, layouts,
                     tuple(k for k, f in flags.items() if f), rng.getrandbits(62))


def multi_inputs(case: MultiCase, dtype: torch.dtype, device: str) -> Inputs:
    """The tensors of ``case`` in ``dtype`` on ``device`` (scaling float32, adapter_ids
    int64), in their layouts."""
    gen = torch.Generator().manual_seed(case.value_seed)
    d_in, d_out, r, n = case.d_in, case.d_out, case.r, case.n

    def make(name: str, value: Tensor) -> Tensor:
        return laid_out(value, case.layout(name), name in case.requires_grad, device)

    a = randn(gen, (n, r, d_in), torch.float64, d_in**-0.5)
    b = randn(gen, (n, d_out, r), torch.float64, r**-0.5)
    for i, rank in enumerate(case.ranks):
        a[i, rank:] = 0.0
        b[i, :, rank:] = 0.0
    pool = torch.tensor(case.ids_pool, dtype=torch.int64)
    ids = pool[torch.randint(len(pool), case.lead, generator=gen)]
    if case.ids_sorted:
        ids = ids.reshape(-1).sort().values.reshape(case.lead)
    return {
        "x": make("x", randn(gen, (*case.lead, d_in), dtype)),
        "weight": make("weight", randn(gen, (d_out, d_in), dtype, d_in**-0.5)),
        "bias": make("bias", randn(gen, (d_out,), dtype, 0.5)) if case.bias else None,
        "lora_A": make("lora_A", a.to(dtype)),
        "lora_B": make("lora_B", b.to(dtype)),
        "scaling": make("scaling", torch.tensor(case.scaling, dtype=torch.float32)),
        "adapter_ids": make("adapter_ids", ids),
    }


def _multi_call(fn: Callable[..., Tensor], t: Inputs, case: MultiCase,
                *seed: Tensor | None) -> Tensor:
    """``fn`` (multi_lora_linear, fused or the reference with its dropout ``seed``) on ``t``."""
    return fn(*(t[k] for k in MULTI_TENSORS), case.dropout_p, case.training, *seed)


def multi_cancel(case: MultiCase, inputs: Inputs, dy: Tensor,
                 seed: Tensor | None) -> dict[str, float]:
    """``Sizes.cancel`` of multi_lora_linear, as :func:`lora_cancel`: the largest
    |base| + |LoRA| of y and dx, each row with its own adapter, in float64."""
    t = {k: v.detach().double() for k, v in inputs.items()
         if v is not None and k not in ("scaling", "adapter_ids")}
    x = t["x"].reshape(-1, case.d_in).requires_grad_()
    w = t["weight"]
    g = dy.reshape(-1, case.d_out)
    lora = reference.multi_lora_linear(x, torch.zeros_like(w), None, t["lora_A"], t["lora_B"],
                                       inputs["scaling"], inputs["adapter_ids"],
                                       case.dropout_p, case.training, seed)
    base = x.detach() @ w.T + (t["bias"] if "bias" in t else 0.0)
    dx_lora = torch.autograd.grad(lora, x, g, allow_unused=True)[0]
    dx = (g @ w).abs() + (0.0 if dx_lora is None else dx_lora.abs())
    sizes = {"out": base.abs() + lora.detach().abs(), "d_x": dx}
    return {k: v.max().item() if v.numel() else 0.0 for k, v in sizes.items()}


def check_multi(backend: str, device: str, dtype: torch.dtype, case: MultiCase) -> None:
    """multi_lora_linear of ``case`` against the reference: the output and the gradients
    of x, lora_A, lora_B, and of weight and bias when they require grad; the gradients of
    the adapters no row names exactly zero."""
    inputs = multi_inputs(case, dtype, device)
    ids = inputs["adapter_ids"]
    used = set(ids.unique().tolist())
    unused = [i for i in range(case.n) if i not in used]

    def sizes(dy: Tensor, seed: Tensor | None) -> Sizes:
        # as check_lora's: the reference on |inputs| (|scaling|; the ids themselves)
        size = abs_terms(inputs, lambda t: _multi_call(reference.multi_lora_linear,
                                                       {**t, "adapter_ids": ids}, case, seed),
                         dy)
        size.cancel = multi_cancel(case, inputs, dy, seed)
        return size

    def exact(got: dict[str, Tensor], label: str) -> None:
        for name in ("d_lora_A", "d_lora_B"):
            if name in got and unused:
                g = got[name][unused]
                assert torch.equal(g, torch.zeros_like(g)), (
                    f"{name} {label}: adapters {unused} name no row, yet their gradient "
                    f"reaches {g.abs().max().item():.3e}")

    check_case(case, backend, dtype, inputs,
               lambda t: _multi_call(fastpeft.multi_lora_linear, t, case),
               lambda t, seed, _lowp: _multi_call(reference.multi_lora_linear, t, case, seed),
               case.dropout_p > 0 and case.training, 4.0,
               keep=frozenset({"scaling", "adapter_ids"}), sizes=sizes, exact=exact)


@pytest.mark.parametrize(("backend", "device", "dtype", "key"), cases("multi_lora_linear"))
def test_multi_lora_linear(backend: str, device: str, dtype: torch.dtype, key: str) -> None:
    """multi_lora_linear (1 to 6 adapters, rows naming all, some, one or none of them, ids
    sorted or mixed, any weight layout) against the reference."""
    case = draw_multi(random.Random(key), BUDGETS[backend])
    check_multi(backend, device, dtype, case)


# --- gated_prefix_attention ------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCase:
    """One drawn call of ``gated_prefix_attention``."""

    b: int
    h: int
    h_kv: int
    m: int
    n: int
    p: int
    d: int
    prefix_batch: int
    gate_per_head: bool
    causal: bool
    gate_tanh: bool
    scale: float | None
    keep_prob: float | None  # key_padding_mask: None, or each key kept with this chance
    qk_scale: float
    layouts: tuple[tuple[str, str], ...]
    requires_grad: tuple[str, ...]
    value_seed: int

    def layout(self, name: str) -> str:
        return dict(self.layouts)[name]


ATTENTION_TENSORS = ("q", "k", "v", "prefix_k", "prefix_v", "gate")


def draw_attention(rng: random.Random, budget: Budget) -> AttentionCase:
    """An attention call within ``budget``: GQA heads, causal or not, a padding mask
    (sometimes hiding every key of a row), a prompt shared or per batch."""
    d = min(draw_size(rng, 128), budget.max_dim)
    h_kv = rng.choice([1, 1, 2, 3])
    h = h_kv * rng.choice([1, 1, 2, 3])
    sizes = [draw_size(rng, 8, zero=True), h, draw_size(rng, budget.max_dim, zero=True),
             draw_size(rng, budget.max_dim, zero=True), draw_size(rng, 40), d]

    def cost(s: list[int]) -> int:  # b * h * m * (n + p) * d
        return max(s[0], 1) * s[1] * max(s[2], 1) * (s[3] + s[4]) * s[5]

    b, h, m, n, p, d = fit(rng, sizes, cost, budget.work)
    h_kv = math.gcd(h, h_kv)
    if rng.random() < 0.3:
        m = min(m, 1)  # a decode step
    causal = rng.random() < 0.6
    prefix_batch = rng.choice([1, max(b, 1)]) if b else 1
    keep_prob = rng.choice([None, None, 1.0, 0.7, 0.3, 0.0])
    layouts = []
    for name in ATTENTION_TENSORS:
        if name == "gate":
            layouts.append((name, draw_layout(rng, 1, 0.7)))
        elif name in ("q", "k", "v") and rng.random() < 0.3:
            layouts.append((name, "heads_last"))  # (B, M, H, D).transpose(1, 2), as in models
        else:
            layouts.append((name, draw_layout(rng, 4)))
    flags = draw_requires_grad(rng, ATTENTION_TENSORS, 0.8)
    return AttentionCase(
        b, h, h_kv, m, n, p, d, prefix_batch, rng.random() < 0.6, causal,
        rng.random() < 0.4, rng.choice([None, None, 0.3, rng.uniform(0.05, 1.0)]), keep_prob,
        rng.choice([1.0, 1.0, 2.0]), tuple(layouts),
        tuple(n for n, f in flags.items() if f), rng.getrandbits(62))


def attention_inputs(case: AttentionCase, dtype: torch.dtype, device: str) -> Inputs:
    """The tensors of ``case`` in ``dtype`` on ``device`` (and the padding mask), in their
    layouts."""
    gen = torch.Generator().manual_seed(case.value_seed)
    b, h_kv, d = case.b, case.h_kv, case.d
    shapes = {"q": (b, case.h, case.m, d), "k": (b, h_kv, case.n, d),
              "v": (b, h_kv, case.n, d), "prefix_k": (case.prefix_batch, h_kv, case.p, d),
              "prefix_v": (case.prefix_batch, h_kv, case.p, d),
              "gate": (case.h if case.gate_per_head else 1,)}
    scales = {"q": case.qk_scale, "k": case.qk_scale, "prefix_k": case.qk_scale, "gate": 0.7}
    inputs: Inputs = {}
    for name in ATTENTION_TENSORS:
        value = randn(gen, shapes[name], dtype, scales.get(name, 1.0))
        inputs[name] = laid_out(value, case.layout(name), name in case.requires_grad, device)
    mask = None
    if case.keep_prob is not None:
        mask = (torch.rand(b, case.n, generator=gen) < case.keep_prob).to(device)
    inputs["key_padding_mask"] = mask
    return inputs


def attention_cancel(case: AttentionCase, inputs: Inputs, dy: Tensor) -> dict[str, float]:
    """The size of the terms that the softmax backward sums and that may cancel.

    A score's gradient is ``P * (dO.v - D)`` with ``D = rowsum(dO * out)``: with one
    visible key (N = 1, a mask, a decode step) ``P = 1`` and d q, d k are exactly zero, as
    is d gate's ``dO.O_p`` summed over few rows when it cancels, while a kernel in ``eps``
    keeps ``eps * |dO| |v| sqrt(D)`` of each term (D from the rounded ``out``, as in
    flash-attention). These are those terms' sizes, summed over the rows each gradient
    reduces (in quadrature: the terms have random signs).
    """

    def amax(*names: str) -> float:
        ts = [inputs[n] for n in names if inputs[n] is not None and inputs[n].numel()]
        return max((t.detach().abs().max().item() for t in ts), default=0.0)

    d = case.d
    scale = d**-0.5 if case.scale is None else case.scale
    gate = max(1.0, amax("gate"))
    d_score = (dy.abs().max().item() if dy.numel() else 0.0) * gate * amax("v", "prefix_v")
    d_score *= math.sqrt(d)  # |dO . v| of one score
    group = case.h // case.h_kv
    rows = case.m * group  # the query rows that reach one key/value head
    prefix_rows = rows * case.b // case.prefix_batch
    gate_rows = case.b * case.m * (1 if case.gate_per_head else case.h)
    return {
        "d_q": scale * d_score * amax("k", "prefix_k"),
        "d_k": scale * d_score * amax("q") * math.sqrt(rows),
        "d_prefix_k": scale * d_score * amax("q") * math.sqrt(prefix_rows),
        "d_gate": d_score * math.sqrt(gate_rows),
    }


def max_logit(case: AttentionCase, inputs: Inputs) -> float:
    """The largest |score| of the call, sequence or prompt (in float64)."""
    q = inputs["q"].detach().double()
    if q.numel() == 0:
        return 0.0
    group = case.h // case.h_kv
    scale = case.d**-0.5 if case.scale is None else case.scale
    logit = 0.0
    for name in ("k", "prefix_k"):
        keys = inputs[name].detach().double().repeat_interleave(group, dim=1)
        if keys.numel():
            logit = max(logit, (q @ keys.transpose(-1, -2)).abs().max().item() * abs(scale))
    return logit


def check_attention(backend: str, device: str, dtype: torch.dtype,
                    case: AttentionCase) -> None:
    """gated_prefix_attention of ``case``: the output and the gradients of q, k, v,
    prefix_k, prefix_v and gate (those that require grad) against the reference."""
    inputs = attention_inputs(case, dtype, device)
    opts = {"causal": case.causal, "scale": case.scale, "gate_tanh": case.gate_tanh}

    def fused(t: Inputs) -> Tensor:
        return fastpeft.gated_prefix_attention(*(t[n] for n in ATTENTION_TENSORS),
                                               key_padding_mask=t["key_padding_mask"], **opts)

    def ref(t: Inputs, _seed: Tensor | None, lowp: bool) -> Tensor:
        # the low-precision run computes everything in dtype: PyTorch's own error there
        return reference.gated_prefix_attention(*(t[n] for n in ATTENTION_TENSORS),
                                                key_padding_mask=t["key_padding_mask"],
                                                upcast=not lowp, **opts)

    # As test_gated_prefix_attention.py: 4 ulps up to D = 32, growing with the head dim.
    # Plus, in ulps of the accumulation dtype: the kernels' P = exp(S - lse), recomputed
    # in backward, carries |S| ulps of relative error where the reference's exp(S - max S)
    # is exact at the largest score (with D = 1 and |q|, |k| ~ 2 the scores reach ~30);
    # and the sums over keys, query rows and D, in another order than PyTorch's,
    # sqrt(length) ulps each.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = case.b * case.m * case.h // case.h_kv
    sums = math.sqrt(case.n + case.p) + math.sqrt(rows) + math.sqrt(case.d)
    ulps = 4.0 * max(1, case.d // 32)
    ulps += (max_logit(case, inputs) + sums) * torch.finfo(acc).eps / torch.finfo(dtype).eps
    check_case(case, backend, dtype, inputs, fused, ref, False, ulps,
               keep=frozenset({"key_padding_mask"}),
               sizes=lambda dy, _seed: Sizes(cancel=attention_cancel(case, inputs, dy)))


@pytest.mark.parametrize(("backend", "device", "dtype", "key"), cases("gated_prefix_attention"))
def test_gated_prefix_attention(backend: str, device: str, dtype: torch.dtype,
                                key: str) -> None:
    """gated_prefix_attention (GQA, causal or not, masks, shared or per-batch prompts,
    q, k, v as models lay them out) against the reference."""
    case = draw_attention(random.Random(key), BUDGETS[backend])
    check_attention(backend, device, dtype, case)


# --- bottleneck_adapter -------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterCase:
    """One drawn call of ``bottleneck_adapter``."""

    lead: tuple[int, ...]
    d: int
    m: int
    activation: str
    layer_norm: str  # none, affine, weight_only
    residual: str  # none (x is the residual), tensor, x (x passed again as residual)
    down_bias: bool
    up_bias: bool
    scaling: float
    ln_eps: float
    x_shift: float
    layouts: tuple[tuple[str, str], ...]
    requires_grad: tuple[str, ...]
    value_seed: int

    def layout(self, name: str) -> str:
        return dict(self.layouts)[name]


ADAPTER_TENSORS = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "residual",
                   "ln_weight", "ln_bias")


def draw_adapter(rng: random.Random, budget: Budget) -> AdapterCase:
    """An adapter call within ``budget``: every activation, layer norm or not, a residual
    of its own, x again or none, both biases independently."""
    d, m = fit(rng, [draw_size(rng, budget.max_dim), draw_size(rng, min(256, budget.max_dim))],
               lambda s: 2 * s[0] * s[1], budget.work)
    layer_norm = rng.choice(["none", "affine", "weight_only"])
    residual = rng.choice(["none", "tensor", "x"])
    down_bias, up_bias = rng.random() < 0.6, rng.random() < 0.6
    lead = draw_lead(rng, budget.work // (2 * d * m))
    x_dims = len(lead) + 1
    layouts = tuple(
        (name, draw_layout(rng, x_dims if name in ("x", "residual") else
                           2 if name.endswith("weight") and not name.startswith("ln")
                           else 1, 0.6))
        for name in ADAPTER_TENSORS)
    present = {"down_bias": down_bias, "up_bias": up_bias, "residual": residual == "tensor",
               "ln_weight": layer_norm != "none", "ln_bias": layer_norm == "affine"}
    flags = draw_requires_grad(rng, [n for n in ADAPTER_TENSORS if present.get(n, True)], 0.8)
    return AdapterCase(
        lead, d, m, rng.choice(reference.ACTIVATIONS), layer_norm, residual, down_bias, up_bias,
        rng.choice([1.0, 0.5, 2.0, rng.uniform(-2.0, 2.0)]), rng.choice([1e-5, 1e-6, 1e-3]),
        rng.choice([0.0, 0.5, 3.0]), layouts, tuple(n for n, f in flags.items() if f),
        rng.getrandbits(62))


def adapter_inputs(case: AdapterCase, dtype: torch.dtype, device: str) -> Inputs:
    """The tensors of ``case`` in ``dtype`` on ``device``, in their layouts; absent ones
    are None, the residual may be x itself."""
    gen = torch.Generator().manual_seed(case.value_seed)
    d, m, lead = case.d, case.m, case.lead

    def make(name: str, shape: tuple[int, ...], scale: float = 1.0,
             shift: float = 0.0) -> Tensor:
        value = randn(gen, shape, dtype, scale, shift)
        return laid_out(value, case.layout(name), name in case.requires_grad, device)

    x = make("x", (*lead, d), shift=case.x_shift)
    residual = {"none": None, "x": x}.get(case.residual)
    if case.residual == "tensor":
        residual = make("residual", (*lead, d))
    ln = case.layer_norm
    return {
        "x": x,
        "down_weight": make("down_weight", (m, d), d**-0.5),
        "down_bias": make("down_bias", (m,), 0.5) if case.down_bias else None,
        "up_weight": make("up_weight", (d, m), m**-0.5),
        "up_bias": make("up_bias", (d,), 0.5) if case.up_bias else None,
        "residual": residual,
        "ln_weight": make("ln_weight", (d,), 0.2, 1.0) if ln != "none" else None,
        "ln_bias": make("ln_bias", (d,), 0.2) if ln == "affine" else None,
    }


# max |act'(z)| of the activations: gelu's 1.13 (erf or tanh), silu's 1.1, relu's 1
ACT_SLOPE = 1.13


def adapter_terms(case: AdapterCase, inputs: Inputs, dy: Tensor) -> Sizes:
    """``Sizes.terms`` of the adapter: its forward and backward formulas evaluated on
    |inputs| and |dy| in float64, each activation and its derivative bounded by |z| and
    ACT_SLOPE, the layer norm's centred x by |x| + |mean| (the terms its subtraction
    cancels) and its input gradient's three terms added instead of subtracted (with
    1 / sigma, which is 1 / sqrt(ln_eps) for a row of equal values)."""
    t = {n: v.detach().double().abs() for n, v in inputs.items() if v is not None}
    d = case.d
    x = inputs["x"].detach().double().reshape(-1, d)
    g = dy.abs().reshape(-1, d)
    s = abs(case.scaling)
    zero = torch.zeros((), dtype=torch.float64)
    down_w, up_w = t["down_weight"], t["up_weight"]
    if case.layer_norm != "none":
        var = (x - x.mean(-1, keepdim=True)).square().mean(-1, keepdim=True)
        rstd = (var + case.ln_eps).rsqrt()
        xhat = (x.abs() + x.mean(-1, keepdim=True).abs()) * rstd
        h = xhat * t["ln_weight"] + t.get("ln_bias", zero)
    else:
        h = x.abs()
    z = h @ down_w.T + t.get("down_bias", zero)  # |act(z)| <= |z| for all four
    residual = t["residual"].reshape(-1, d) if case.residual == "tensor" else x.abs()
    terms = {"out": residual + s * (z @ up_w.T + t.get("up_bias", zero)),
             "d_up_weight": s * g.T @ z, "d_up_bias": s * g.sum(0), "d_residual": g}
    dz = ACT_SLOPE * s * (g @ up_w)
    terms.update({"d_down_weight": dz.T @ h, "d_down_bias": dz.sum(0)})
    dh = dz @ down_w
    dx = dh
    if case.layer_norm != "none":
        terms.update({"d_ln_weight": (dh * xhat).sum(0), "d_ln_bias": dh.sum(0)})
        dxhat = dh * t["ln_weight"]
        dx = rstd * (dxhat + dxhat.mean(-1, keepdim=True)
                     + xhat * (dxhat * xhat).mean(-1, keepdim=True))
    terms["d_x"] = dx + (g if case.residual != "tensor" else 0.0)
    return Sizes(terms={n: v.max().item() if v.numel() else 0.0 for n, v in terms.items()})


def check_adapter(backend: str, device: str, dtype: torch.dtype, case: AdapterCase) -> None:
    """bottleneck_adapter of ``case``: the output and the gradients of x, both weights and
    biases, the residual and the layer norm's parameters (those that require grad)
    against the reference."""
    inputs = adapter_inputs(case, dtype, device)

    def call(fn: Callable[..., Tensor], t: Inputs) -> Tensor:
        return fn(t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"],
                  activation=case.activation, residual=t["residual"], scaling=case.scaling,
                  ln_weight=t["ln_weight"], ln_bias=t["ln_bias"], ln_eps=case.ln_eps)

    def ref(t: Inputs, _seed: Tensor | None, _lowp: bool) -> Tensor:
        return call(reference.bottleneck_adapter, t)

    # test_bottleneck_adapter.py's 8 ulps, and the sums of |terms| of adapter_terms
    check_case(case, backend, dtype, inputs, lambda t: call(fastpeft.bottleneck_adapter, t),
               ref, False, 8.0, sizes=lambda dy, _seed: adapter_terms(case, inputs, dy))


@pytest.mark.parametrize(("backend", "device", "dtype", "key"), cases("bottleneck_adapter"))
def test_bottleneck_adapter(backend: str, device: str, dtype: torch.dtype, key: str) -> None:
    """bottleneck_adapter (every activation, layer norm or not, residual given, x or
    none) against the reference."""
    case = draw_adapter(random.Random(key), BUDGETS[backend])
    check_adapter(backend, device, dtype, case)


# --- the smallest cases of what the properties found --------------------------------------


def _all_params(op: str) -> list:
    """``cases``' backends, each once in float32 (the regression tests pick their case)."""
    return [pytest.param(*bp.values[0], id=bp.id, marks=bp.marks) for bp in backend_params(op)]


def _vector_layouts(names: Sequence[str], vectors: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Every argument contiguous, the 1-D ``vectors`` columns of a 2-D tensor."""
    return tuple((n, "column" if n in vectors else "contiguous") for n in names)


@pytest.mark.parametrize(("backend", "device"), _all_params("lora_linear"))
@pytest.mark.parametrize("int8", [False, True], ids=["lora_linear", "int8_lora_linear"])
def test_column_bias_lora(backend: str, device: str, int8: bool) -> None:
    """bias = a column of a 2-D tensor (stride 3): once refused by the CPU kernels of both
    LoRA linears ("bias must be contiguous") although F.linear takes it."""
    names = ("x", "weight", "bias", "lora_A", "lora_B", *(("weight_scale",) if int8 else ()))
    case = LoraCase((3,), 5, 4, 2, True, 0.0, True, 1.0, _vector_layouts(names, ("bias",)),
                    ("x", "bias", "lora_A", "lora_B"), 0, 0)
    check_lora(backend, device, torch.float32, case, "int8" if int8 else "float")


@pytest.mark.parametrize(("backend", "device"), _all_params("bottleneck_adapter"))
@pytest.mark.parametrize("vector", ["down_bias", "up_bias", "ln_weight", "ln_bias"])
def test_column_vectors_adapter(backend: str, device: str, vector: str) -> None:
    """One of the adapter's 1-D parameters a column of a 2-D tensor (stride 3), m = 2, no
    ln_bias (but for ln_bias itself): the Triton kernels read such a float32 down_bias as
    if contiguous (NaN with gelu: they read the storage's NaN filler)."""
    layer_norm = "affine" if vector == "ln_bias" else "weight_only"
    case = AdapterCase((3,), 5, 2, "gelu", layer_norm, "none", True, True, 1.0, 1e-5, 0.0,
                       _vector_layouts(ADAPTER_TENSORS, (vector,)),
                       tuple(n for n in ADAPTER_TENSORS if n not in ("residual", "ln_bias")
                             or n == vector), 0)
    check_adapter(backend, device, torch.float32, case)


@pytest.mark.parametrize(("backend", "device"), _all_params("gated_prefix_attention"))
def test_column_gate_attention(backend: str, device: str) -> None:
    """The per-head gate a column of a 2-D tensor (stride 3)."""
    case = AttentionCase(1, 2, 1, 3, 3, 2, 4, 1, True, True, False, None, None, 1.0,
                         _vector_layouts(ATTENTION_TENSORS, ("gate",)), ATTENTION_TENSORS, 0)
    check_attention(backend, device, torch.float32, case)


@pytest.mark.parametrize(("backend", "device"), _all_params("multi_lora_linear"))
def test_unit_width_x_multi_lora(backend: str, device: str) -> None:
    """in = 1 and x one row, a (1, 1) view with last stride 2 (contiguous to
    ``is_contiguous()``, so ``.contiguous()`` keeps it), with dropout: the CPU kernels'
    ``lora_branch::dropout_rows`` asserts ``x.stride(1) == 1`` (an INTERNAL ASSERT from
    the forward; property id cpu-bfloat16-seed19)."""
    layouts = (("x", "strided"), *_vector_layouts(MULTI_TENSORS[1:], ()))
    case = MultiCase((1,), 1, 4, 1, 2, (1, 1), (1,), False, False, 0.5, True, (1.0, 2.0),
                     layouts, ("x", "lora_A", "lora_B"), 0)
    check_multi(backend, device, torch.float32, case)
