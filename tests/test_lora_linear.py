"""fastpeft.lora_linear / LoRALinear against the unfused reference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import HAS_CUDA, assert_close_to_ref, backend_params, dtypes_for, forced
from torch import nn

import fastpeft
from fastpeft import reference
from fastpeft.ops._linear import draw_seed, linear_args_ok

# (leading dims of x, in, out, r): the odd shape, a 3-D input, rank 1, rank > in/4
SHAPES = [((5,), 123, 77, 3), ((2, 3), 64, 40, 16), ((7,), 33, 65, 1), ((4,), 20, 24, 8)]


def make_inputs(lead, d_in, d_out, r, dtype, device, bias=True, grad_base=False):
    def t(*shape, scale=1.0, grad=True):
        v = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
        return v.requires_grad_(grad)

    x = t(*lead, d_in)
    w = t(d_out, d_in, scale=d_in**-0.5, grad=grad_base)
    b = t(d_out, grad=grad_base) if bias else None
    a = t(r, d_in, scale=d_in**-0.5)
    bb = t(d_out, r, scale=r**-0.5)
    return x, w, b, a, bb


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    return torch.autograd.grad(out, [i for i in inputs if i is not None and i.requires_grad], dy)


def run_reference(inputs, scaling, p, seed, dtype):
    """The reference in float64 (the truth) and in the test dtype (torch's own error)."""
    outs = {}
    for name, dt in (("ref64", torch.float64), ("lowp", dtype)):
        copies = [
            None if i is None else i.detach().to(dt).requires_grad_(i.requires_grad) for i in inputs
        ]
        y = reference.lora_linear(*copies, scaling, p, True, seed)
        outs[name] = (y, grads(y, copies))
    return outs


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_matches_reference(backend_device, shape, bias, dropout_p):
    backend, device = backend_device
    lead, d_in, d_out, r = shape
    for dtype in dtypes_for(backend, device):
        inputs = make_inputs(lead, d_in, d_out, r, dtype, device, bias=bias)
        scaling = 16 / math.sqrt(r)
        torch.manual_seed(123)
        with forced(backend):
            y = fastpeft.lora_linear(*inputs, scaling, dropout_p)
        torch.manual_seed(123)
        seed = draw_seed(torch.device(device)) if dropout_p else None
        fused_grads = grads(y, inputs)
        ref = run_reference(inputs, scaling, dropout_p, seed, dtype)
        names = ["y", "dx", "dA", "dB"]
        for name, out, r64, rlow in zip(
            names,
            (y, *fused_grads),
            (ref["ref64"][0], *ref["ref64"][1]),
            (ref["lowp"][0], *ref["lowp"][1]),
            strict=False,
        ):
            assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow)


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
@pytest.mark.parametrize("tokens", [5, 20], ids=["few-rows", "blocked"])
def test_high_rank(backend_device, tokens):
    """r = 72, past the rank from which the C++ branch takes ATen's GEMMs unless the fused
    kernels are forced (both paths run here), with and without the few-rows kernels."""
    backend, device = backend_device
    for dtype in dtypes_for(backend, device):
        inputs = make_inputs((tokens,), 40, 56, 72, dtype, device)
        torch.manual_seed(123)
        with forced(backend):
            y = fastpeft.lora_linear(*inputs, 2.0, 0.25)
        torch.manual_seed(123)
        seed = draw_seed(torch.device(device))
        ref = run_reference(inputs, 2.0, 0.25, seed, dtype)
        for name, out, r64, rlow in zip(["y", "dx", "dA", "dB"], (y, *grads(y, inputs)),
                                        (ref["ref64"][0], *ref["ref64"][1]),
                                        (ref["lowp"][0], *ref["lowp"][1]), strict=True):
            assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow)


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
def test_trainable_base_gets_gradients(backend_device):
    backend, device = backend_device
    inputs = make_inputs((6,), 32, 48, 4, torch.float32, device, grad_base=True)
    with forced(backend):
        y = fastpeft.lora_linear(*inputs, 0.5)
    got = grads(y, inputs)
    ref = run_reference(inputs, 0.5, 0.0, None, torch.float32)
    assert len(got) == 5  # x, weight, bias, A, B
    for name, g, r64, rlow in zip(
        ["dx", "dW", "db", "dA", "dB"], got, ref["ref64"][1], ref["lowp"][1], strict=False
    ):
        assert_close_to_ref(name, g, r64, rlow)


# Which of (x, weight, bias, lora_A, lora_B) require grad: the first layer of a model (x
# does not), a trainable bias on a frozen weight, a frozen adapter with x needing dx.
GRAD_SUBSETS = {"lora": "AB", "x+bias": "xb", "weight+bias": "wb", "x": "x", "bias+B": "bB"}


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
@pytest.mark.parametrize("wrt", GRAD_SUBSETS.values(), ids=GRAD_SUBSETS.keys())
def test_gradients_only_where_required(backend_device, wrt):
    backend, device = backend_device
    inputs = make_inputs((5,), 24, 20, 3, torch.float32, device)
    for flag, t in zip("xwbAB", inputs, strict=True):
        t.requires_grad_(flag in wrt)
    torch.manual_seed(123)
    with forced(backend):
        y = fastpeft.lora_linear(*inputs, 0.5, 0.25)
    torch.manual_seed(123)
    seed = draw_seed(torch.device(device))
    ref = run_reference(inputs, 0.5, 0.25, seed, torch.float32)
    got = grads(y, inputs)
    assert len(got) == len(wrt)
    for flag, g, r64, rlow in zip(wrt, got, ref["ref64"][1], ref["lowp"][1], strict=True):
        assert_close_to_ref(f"d{flag}", g, r64, rlow)


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
def test_dropout_mask_is_regenerated_exactly(backend_device):
    """With weight = 0, A = B = I and x = 1 the output is keep/(1-p) itself, and with
    dy = 1 so is dx: backward must regenerate forward's mask bit for bit."""
    backend, device = backend_device
    t, d, p = 48, 64, 0.3
    x = torch.ones(t, d, device=device, requires_grad=True)
    eye = torch.eye(d, device=device)
    a = eye.clone().requires_grad_()
    b = eye.clone().requires_grad_()
    torch.manual_seed(7)
    with forced(backend):
        y = fastpeft.lora_linear(x, torch.zeros(d, d, device=device), None, a, b, 1.0, p)
    y.sum().backward()
    keep = y.detach() != 0
    torch.testing.assert_close(y.detach(), keep.float() / (1 - p))
    torch.testing.assert_close(x.grad, y.detach())
    torch.manual_seed(7)
    seed = draw_seed(torch.device(device))
    assert torch.equal(keep.cpu(), reference.dropout_keep_mask(seed, t, d, p))
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    # eval mode: no dropout at all
    with forced(backend):
        y_eval = fastpeft.lora_linear(
            x, torch.zeros(d, d, device=device), None, a, b, 1.0, p, training=False
        )
    torch.testing.assert_close(y_eval, torch.ones_like(y_eval))


def test_reference_philox_known_answer():
    """Random123's published Philox4x32-10 answer for counter 0, key 0."""
    words = reference.philox4x32(torch.zeros(1, dtype=torch.int64), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
def test_empty_batch(backend_device):
    backend, device = backend_device
    x, w, b, a, bb = make_inputs((0,), 16, 8, 4, torch.float32, device)
    with forced(backend):
        y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, 0.1)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


def _op_args(device, dtype=torch.float32, p=0.2, shape=((6,), 24, 20, 4)):
    x, w, b, a, bb = make_inputs(*shape, dtype, device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device) if p else None
    return (x, w, b, a, bb, 1.5, p, seed)


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("layout", ["out_in", "transposed"])
def test_opcheck(backend_device, p, layout):
    backend, device = backend_device
    op = (
        torch.ops.fastpeft.lora_linear
        if backend == "cpu"
        else torch.ops.fastpeft.lora_linear_triton
    )
    args = _op_args(device, p=p)
    if layout == "transposed":  # weight = the .t() view of an (in, out) storage
        args = (args[0], transposed(args[1])[1], *args[2:])
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(backend_device, p):
    """The backward formulas, dropout included, against finite differences (fixed seed)."""
    backend, device = backend_device
    # every input element costs two op calls: keep it tiny for the Triton interpreter
    x, w, b, a, bb, s, p, seed = _op_args(device, torch.float64, p, ((3,), 12, 8, 2))
    op = (
        torch.ops.fastpeft.lora_linear
        if backend == "cpu"
        else torch.ops.fastpeft.lora_linear_triton
    )
    w.requires_grad_(True)
    b.requires_grad_(True)

    def f(x, w, b, a, bb):
        return op(x, w, b, a, bb, s, p, seed)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))


# --- a transposed weight: GPT-2's Conv1D stores (in, out), PEFT's fan_in_fan_out ---------


def with_reference(op: str) -> list:
    """The fused backends plus the reference path (FASTPEFT_BACKEND=reference)."""
    return [*backend_params(op), pytest.param(("reference", "cpu"), id="reference")]


def transposed(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage, view): a contiguous (in, out) leaf holding w's values, and its transposed
    view, the (out, in) weight passed to lora_linear (as conv1d.weight.t())."""
    storage = w.detach().t().contiguous().requires_grad_(w.requires_grad)
    return storage, storage.t()


@pytest.mark.parametrize("backend_device", with_reference("lora_linear"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("grad_base", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_transposed_weight_matches_reference(backend_device, shape, grad_base, dropout_p):
    """weight = (in, out) storage .t(): output and every gradient (d weight reaching the
    (in, out) storage) as the reference computes them with a contiguous (out, in) weight."""
    backend, device = backend_device
    lead, d_in, d_out, r = shape
    for dtype in dtypes_for("cpu" if backend == "reference" else backend, device):
        inputs = make_inputs(lead, d_in, d_out, r, dtype, device, grad_base=grad_base)
        x, w, b, a, bb = inputs
        w_store, w_t = transposed(w)
        assert w_t.stride() == (1, d_out) and torch.equal(w_t, w)
        scaling = 16 / math.sqrt(r)
        torch.manual_seed(123)
        with forced(backend):
            y = fastpeft.lora_linear(x, w_t, b, a, bb, scaling, dropout_p)
        torch.manual_seed(123)
        seed = draw_seed(torch.device(device)) if dropout_p else None
        fused = grads(y, (x, w_store, b, a, bb))
        ref = run_reference(inputs, scaling, dropout_p, seed, dtype)
        names = ["dx", "dW", "db", "dA", "dB"] if grad_base else ["dx", "dA", "dB"]
        assert len(fused) == len(names)
        assert_close_to_ref(f"y [{dtype}]", y, ref["ref64"][0], ref["lowp"][0])
        for name, g, r64, rlow in zip(names, fused, ref["ref64"][1], ref["lowp"][1],
                                      strict=True):
            if name == "dW":  # the storage is (in, out)
                assert g.shape == (d_in, d_out)
                r64, rlow = r64.t(), rlow.t()
            assert_close_to_ref(f"{name} [{dtype}]", g, r64, rlow)


class _WeightArgs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the weight argument (data_ptr, strides) of every fastpeft op called."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastpeft":
            w = args[2] if "backward" in func.name() else args[1]
            self.seen.append((func.name(), w.data_ptr(), w.stride()))
        return func(*args, **(kwargs or {}))


def _weight_sized_copies(prof, shapes) -> list[str]:
    """Profiled ops that copy or allocate like a tensor of one of ``shapes``."""
    copying = ("aten::clone", "aten::contiguous", "aten::copy_", "aten::empty_like",
               "aten::empty_strided", "aten::new_empty_strided", "aten::_to_copy")
    return [
        f"{e.name}{e.input_shapes}" for e in prof.events()
        if e.name in copying and any(list(s) in shapes for s in e.input_shapes if s)
    ]


@pytest.mark.parametrize("backend_device", with_reference("lora_linear"))
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_conv1d_weight_is_not_copied(backend_device, trainable):
    """A GPT-2 Conv1D's weight (in, out) passed as weight.t() reaches the kernels as that
    very view (same data_ptr, transposed strides), forward and backward, and no op of the
    call copies or allocates a weight-sized tensor (weight.contiguous(), a copy inside the
    op or ATen's GEMM, or a d weight that autograd must re-lay out would all show)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.pytorch_utils import Conv1D

    backend, device = backend_device
    d_in, d_out, r = 123, 77, 3
    conv = Conv1D(d_out, d_in).to(device)  # weight (in, out)
    conv.weight.requires_grad_(trainable)
    conv.bias.requires_grad_(trainable)
    x = torch.randn(5, d_in, device=device, requires_grad=True)
    a = (torch.randn(r, d_in, device=device) * d_in**-0.5).requires_grad_()
    bb = torch.randn(d_out, r, device=device).requires_grad_()
    weight = conv.weight.t()
    assert linear_args_ok(x, weight, None, conv.bias, a, bb, 2.0, 0.1)  # the one-pass check
    with _WeightArgs() as seen, profile(activities=[ProfilerActivity.CPU],
                                        record_shapes=True) as prof, forced(backend):
        y = fastpeft.lora_linear(x, weight, conv.bias, a, bb, 2.0, 0.1)
        y.square().sum().backward()
    assert _weight_sized_copies(prof, ([d_out, d_in], [d_in, d_out])) == []
    if backend != "reference":  # the reference calls no fastpeft op
        suffix = "" if backend == "cpu" else "_triton"
        ptr = conv.weight.data_ptr()
        assert seen.seen == [(f"fastpeft::lora_linear{suffix}", ptr, (1, d_out)),
                             (f"fastpeft::lora_linear_backward{suffix}", ptr, (1, d_out))]
    if trainable:
        assert conv.weight.grad.shape == (d_in, d_out) and conv.weight.grad.is_contiguous()
    with torch.no_grad():  # with lora_B = 0 the layer is the Conv1D
        bb.zero_()
        with forced(backend):
            y0 = fastpeft.lora_linear(x, weight, conv.bias, a, bb, 2.0, 0.1, training=False)
        torch.testing.assert_close(y0, conv(x))


@pytest.mark.parametrize("backend_device", with_reference("lora_linear"))
def test_strided_weight_is_copied(backend_device):
    """Any layout other than (out, in) or (in, out).t() (here a strided column slice) is
    copied to a contiguous (out, in) weight by lora_linear: still the right results."""
    backend, device = backend_device
    x, w, b, a, bb = make_inputs((5,), 24, 20, 3, torch.float32, device, grad_base=True)
    wide = torch.zeros(20, 48, device=device)
    wide[:, ::2] = w.detach()
    w_slice = wide[:, ::2].requires_grad_()  # a leaf view: strides (48, 2)
    torch.manual_seed(5)
    with forced(backend):
        y = fastpeft.lora_linear(x, w_slice, b, a, bb, 0.5, 0.25)
    torch.manual_seed(5)
    seed = draw_seed(torch.device(device))
    ref = run_reference((x, w, b, a, bb), 0.5, 0.25, seed, torch.float32)
    got = grads(y, (x, w_slice, b, a, bb))
    assert_close_to_ref("y", y, ref["ref64"][0], ref["lowp"][0])
    for name, g, r64, rlow in zip("xWbAB", got, ref["ref64"][1], ref["lowp"][1], strict=True):
        assert_close_to_ref(f"d{name}", g, r64, rlow)


def test_native_op_refuses_other_weight_layouts():
    """The native CPU op (called directly, without lora_linear's copy) reads (out, in)
    and (in, out).t() in place and refuses other layouts with an error naming weight."""
    if "cpu" not in fastpeft.available_backends("lora_linear"):
        pytest.skip("fastpeft._C has no lora_linear kernel (not built)")
    x, w, b, a, bb, s, p, seed = _op_args("cpu", p=0.0)
    op = torch.ops.fastpeft.lora_linear
    torch.testing.assert_close(op(x, transposed(w)[1], b, a, bb, s, p, seed)[0],
                               op(x, w, b, a, bb, s, p, seed)[0])
    w_slice = torch.zeros(w.shape[0], 2 * w.shape[1])[:, ::2]
    with pytest.raises(RuntimeError, match=r"weight must be contiguous \(out, in\) or the "
                                           r"transpose of a contiguous \(in, out\) tensor"):
        op(x, w_slice, b, a, bb, s, p, seed)


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
def test_gradcheck_float64_transposed_weight(backend_device, p=0.3):
    """gradcheck through weight = storage.t(), the gradient checked on the (in, out)
    storage (with dropout: the layout only changes the base GEMMs, which it leaves alone;
    one p and a smaller shape than test_gradcheck_float64's keep the interpreted run short)."""
    backend, device = backend_device
    x, w, b, a, bb, s, p, seed = _op_args(device, torch.float64, p, ((3,), 7, 5, 2))
    w_store = w.detach().t().contiguous().requires_grad_()
    b.requires_grad_(True)
    op = (
        torch.ops.fastpeft.lora_linear
        if backend == "cpu"
        else torch.ops.fastpeft.lora_linear_triton
    )

    def f(x, w_store, b, a, bb):
        return op(x, w_store.t(), b, a, bb, s, p, seed)[0]

    assert torch.autograd.gradcheck(f, (x, w_store, b, a, bb))


# --- the module -----------------------------------------------------------------------


def test_module_starts_as_base_and_shares_weight():
    base = nn.Linear(40, 24)
    layer = fastpeft.LoRALinear(base, r=8, lora_alpha=16, lora_dropout=0.1)
    assert layer.base_layer is base and layer.weight is base.weight
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.scaling == 2.0
    assert torch.equal(layer.lora_B.weight, torch.zeros(24, 8))
    x = torch.randn(3, 5, 40)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x))
    keys = set(layer.state_dict())
    assert {"lora_A.weight", "lora_B.weight", "base_layer.weight", "base_layer.bias"} == keys
    assert fastpeft.LoRALinear(nn.Linear(4, 4), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


def test_module_device_dtype_kwargs():
    layer = fastpeft.LoRALinear(nn.Linear(8, 8), r=2, dtype=torch.float64)
    assert layer.lora_A.weight.dtype == torch.float64
    assert layer.base_layer.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_merge_unmerge_round_trip(dtype):
    base = nn.Linear(48, 32).to(dtype)
    w0 = base.weight.detach().clone()
    layer = fastpeft.LoRALinear(base, r=4, lora_alpha=8).eval()
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 48, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    tol = {torch.float32: {"atol": 1e-5, "rtol": 1e-5},
           torch.float64: {"atol": 1e-12, "rtol": 1e-12},
           torch.bfloat16: {"atol": 0.05, "rtol": 0.02}}[dtype]
    torch.testing.assert_close(layer(x), y, **tol)
    layer.unmerge()
    eps = torch.finfo(dtype).eps  # (float64: computed in float64, not through float32)
    assert (base.weight - w0).abs().max() <= 2 * eps * w0.abs().max() + min(1e-7, eps)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_module_compiles_fullgraph():
    """One graph, no breaks; with inductor's eager-compatible RNG the compiled training
    step (dropout on) reproduces eager's output and gradients."""
    torch._dynamo.reset()
    layer = fastpeft.LoRALinear(nn.Linear(32, 24), r=4, lora_alpha=8, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)

    def step(module):
        torch.manual_seed(3)
        x.grad = None
        layer.zero_grad()
        y = module(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone()

    with torch._inductor.config.patch(fallback_random=True):
        compiled = step(torch.compile(layer, fullgraph=True))
    eager = step(layer)
    for c, e in zip(compiled, eager, strict=False):
        torch.testing.assert_close(c, e)


# --- bad input --------------------------------------------------------------------------


def _good():
    return dict(
        x=torch.randn(3, 10),
        weight=torch.randn(6, 10),
        bias=torch.randn(6),
        lora_A=torch.randn(2, 10),
        lora_B=torch.randn(6, 2),
        scaling=1.0,
    )


BAD = [
    ("x", torch.randn(3, 9), ValueError, r"x: expected last dimension 10"),
    ("x", torch.randint(0, 3, (3, 10)), TypeError, r"x: expected dtype float32"),
    ("x", [1.0, 2.0], TypeError, r"x: expected a torch.Tensor"),
    ("weight", torch.randn(6, 10, 1), ValueError, r"weight: expected a 2-D"),
    ("weight", torch.randn(6, 10, dtype=torch.float64), TypeError, r"weight: expected dtype"),
    ("bias", torch.randn(5), ValueError, r"bias: expected shape \(6\)"),
    ("lora_A", torch.randn(2, 11), ValueError, r"lora_A: expected shape \(\*, 10\)"),
    ("lora_A", torch.randn(0, 10), ValueError, r"lora_A: expected rank"),
    ("lora_B", torch.randn(6, 3), ValueError, r"lora_B: expected shape \(6, 2\)"),
    ("lora_B", torch.randn(7, 2), ValueError, r"lora_B: expected shape \(6, 2\)"),
    ("lora_B", torch.randn(6, 2).half(), TypeError, r"lora_B: expected dtype"),
    ("scaling", float("nan"), ValueError, r"scaling: expected"),
    ("scaling", "2", TypeError, r"scaling: expected a float"),
    ("dropout_p", 1.0, ValueError, r"dropout_p: expected a value in \[0.0, 1.0\)"),
    ("dropout_p", -0.1, ValueError, r"dropout_p"),
]


@pytest.mark.parametrize(
    ("arg", "value", "exc", "match"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_names_the_argument(arg, value, exc, match):
    kwargs = _good()
    kwargs[arg] = value
    with pytest.raises(exc, match=match):
        fastpeft.lora_linear(**kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU for a second device")
def test_mixed_devices_refused():
    kwargs = _good()
    kwargs["lora_A"] = kwargs["lora_A"].cuda()
    with pytest.raises(ValueError, match="lora_A: expected a tensor on cpu"):
        fastpeft.lora_linear(**kwargs)


def test_mixed_devices_refused_meta():
    """A second device without a GPU: the meta device."""
    kwargs = _good()
    kwargs["lora_B"] = kwargs["lora_B"].to("meta")
    with pytest.raises(ValueError, match="lora_B: expected a tensor on cpu"):
        fastpeft.lora_linear(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_calls_take_the_one_pass_check(dtype):
    """The modules' usual calls pass linear_args_ok, so the per-argument checks (which a
    bad call still gets, see test_bad_input_names_the_argument) stay off a decode step."""
    layer = fastpeft.LoRALinear(nn.Linear(8, 6, dtype=dtype), r=2, lora_alpha=4,
                                lora_dropout=0.1)
    q8 = fastpeft.Int8LoRALinear.from_linear(nn.Linear(8, 6, dtype=dtype), 2, 4, 0.1)
    x = torch.randn(3, 8, dtype=dtype)
    base = layer.base_layer
    assert linear_args_ok(x, base.weight, None, base.bias, layer.lora_A.weight,
                          layer.lora_B.weight, layer.scaling, layer.lora_dropout)
    assert linear_args_ok(x, q8.qweight, q8.weight_scale, q8.bias, q8.lora_A.weight,
                          q8.lora_B.weight, q8.scaling, q8.lora_dropout)


def test_module_bad_arguments():
    with pytest.raises(TypeError, match=r"base: expected an nn.Linear"):
        fastpeft.LoRALinear(nn.Conv1d(2, 2, 1), r=2)
    with pytest.raises(ValueError, match="r: expected a positive int"):
        fastpeft.LoRALinear(nn.Linear(2, 2), r=0)
    with pytest.raises(ValueError, match=r"lora_dropout"):
        fastpeft.LoRALinear(nn.Linear(2, 2), r=1, lora_dropout=1.5)
