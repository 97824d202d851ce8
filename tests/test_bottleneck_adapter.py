"""fastpeft.bottleneck_adapter / BottleneckAdapter against the unfused reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import TRITON_INTERPRETED, assert_close_to_ref, backend_params, dtypes_for, forced

import fastpeft
from fastpeft import reference

# (leading dims, d, m): odd sizes that are not multiples of any block, a 3-D input,
# a bottleneck of 1, and a bottleneck wider than a 16-wide tile
SHAPES = [((5,), 33, 3), ((2, 7), 40, 17), ((3,), 130, 1), ((4,), 24, 36)]
LAYER_NORMS = ["none", "affine", "weight_only"]

# Every activation with every layer-norm variant; residual, biases and shapes rotate so
# each value of each appears several times without the full product.
CASES = [
    {
        "activation": act,
        "ln": ln,
        "residual": i % 2 == 1,
        "bias": i % 3 != 2,
        "shape": SHAPES[i % len(SHAPES)],
        "scaling": (1.0, 0.5, 2.0)[i % 3],
    }
    for i, (act, ln) in enumerate(itertools.product(reference.ACTIVATIONS, LAYER_NORMS))
]


def _case_id(c):
    lead, d, m = c["shape"]
    res = "res" if c["residual"] else "x"
    bias = "bias" if c["bias"] else "nobias"
    return f"{c['activation']}-ln_{c['ln']}-{res}-{bias}-{'x'.join(map(str, lead))}x{d}m{m}"


def make_inputs(lead, d, m, dtype, device, *, ln="none", residual=False, bias=True, up=True):
    """Tensors (x, down_w, down_b, up_w, up_b, residual, ln_w, ln_b); the up projection is
    non-zero (``up``) so the adapter branch counts, and x has a non-zero mean so the layer
    norm has something to remove."""

    def t(*shape, scale=1.0, shift=0.0, grad=True):
        v = (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)
        return v.requires_grad_(grad)

    x = t(*lead, d, shift=0.5)
    down_w = t(m, d, scale=d**-0.5)
    up_w = t(d, m, scale=m**-0.5 if up else 0.0)
    down_b = t(m, scale=0.5) if bias else None
    up_b = t(d, scale=0.5) if bias else None
    res = t(*lead, d) if residual else None
    ln_w = t(d, scale=0.2, shift=1.0) if ln != "none" else None
    ln_b = t(d, scale=0.2) if ln == "affine" else None
    return x, down_w, down_b, up_w, up_b, res, ln_w, ln_b


def call(fn, inputs, activation="relu", scaling=1.0, ln_eps=1e-5):
    x, dw, db, uw, ub, res, lw, lb = inputs
    return fn(x, dw, db, uw, ub, activation=activation, residual=res, scaling=scaling,
              ln_weight=lw, ln_bias=lb, ln_eps=ln_eps)


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    wrt = [i for i in inputs if i is not None and i.requires_grad]
    return torch.autograd.grad(out, wrt, dy)


GRAD_NAMES = ["dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_residual", "d_ln_w", "d_ln_b"]


def present_names(inputs):
    return [n for n, i in zip(GRAD_NAMES, inputs, strict=True) if i is not None]


def run_reference(inputs, dtype, **kw):
    """The reference in float64 (the truth) and in the test dtype (torch's own error)."""
    outs = {}
    for name, dt in (("ref64", torch.float64), ("lowp", dtype)):
        copies = [None if i is None else i.detach().to(dt).requires_grad_() for i in inputs]
        y = call(reference.bottleneck_adapter, copies, **kw)
        outs[name] = (y, grads(y, copies))
    return outs


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(backend_device, case):
    backend, device = backend_device
    kw = {"activation": case["activation"], "scaling": case["scaling"]}
    for dtype in dtypes_for(backend, device):
        inputs = make_inputs(*case["shape"], dtype, device, ln=case["ln"],
                             residual=case["residual"], bias=case["bias"])
        with forced(backend):
            y = call(fastpeft.bottleneck_adapter, inputs, **kw)
        fused = (y, *grads(y, inputs))
        ref = run_reference(inputs, dtype, **kw)
        names = ["y", *present_names(inputs)]
        assert len(fused) == len(names)
        for name, out, r64, rlow in zip(
            names, fused, (ref["ref64"][0], *ref["ref64"][1]), (ref["lowp"][0], *ref["lowp"][1]),
            strict=True,
        ):
            # weight gradients reduce over every row: a few more ulps of headroom
            assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow, atol_eps=8)


def _check_layer_norm_rows(backend, device, rows: int, d: int, x: torch.Tensor) -> None:
    """The op with a layer norm on input ``x (rows, d)``: output and every gradient against
    the float64 reference, within float32 torch's own error."""
    inputs = list(make_inputs((rows,), d, 8, torch.float32, device, ln="affine"))
    inputs[0] = x.requires_grad_()
    with forced(backend):
        y = call(fastpeft.bottleneck_adapter, inputs, activation="gelu")
    fused = (y, *grads(y, inputs))
    ref = run_reference(inputs, torch.float32, activation="gelu")
    for name, out, r64, rlow in zip(
        ["y", *present_names(inputs)], fused, (ref["ref64"][0], *ref["ref64"][1]),
        (ref["lowp"][0], *ref["lowp"][1]), strict=True,
    ):
        assert_close_to_ref(name, out, r64, rlow, atol_eps=8)


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
def test_large_mean_input_with_layer_norm(backend_device):
    """x = 300 + noise: the layer norm must subtract the mean before squaring (no
    E[x^2] - E[x]^2 cancellation) in forward and backward alike."""
    backend, device = backend_device
    _check_layer_norm_rows(backend, device, 9, 48, torch.randn(9, 48, device=device) + 300.0)


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
def test_constant_rows_with_layer_norm(backend_device):
    """Rows whose entries are all equal (zero variance, a constant padding embedding): the
    mean must be the value itself, to the last ulp, for rstd = 1/sqrt(eps) multiplies what
    is left of x - mean."""
    backend, device = backend_device
    scale = torch.tensor([1, 3, 300, 1e-3, 7, 2, 0.5], device=device)[:, None]
    rows = torch.randn(7, 1, device=device) * scale
    _check_layer_norm_rows(backend, device, 7, 37, rows.expand(7, 37).contiguous())


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
def test_empty_batch(backend_device):
    backend, device = backend_device
    inputs = make_inputs((0,), 16, 4, torch.float32, device, ln="affine")
    with forced(backend):
        y = call(fastpeft.bottleneck_adapter, inputs)
    assert y.shape == (0, 16)
    y.sum().backward()
    x, dw, db, uw, ub, _, lw, lb = inputs
    assert x.grad.shape == (0, 16)
    for p in (dw, db, uw, ub, lw, lb):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
def test_frozen_inputs_get_no_gradient(backend_device):
    """Only what requires grad gets one; d residual is dy itself."""
    backend, device = backend_device
    x, dw, db, uw, ub, res, lw, lb = make_inputs((6,), 20, 5, torch.float32, device,
                                                 residual=True, ln="affine")
    for frozen in (x, db, lw, lb):
        frozen.requires_grad_(False)
    with forced(backend):
        y = fastpeft.bottleneck_adapter(x, dw, db, uw, ub, residual=res, ln_weight=lw,
                                        ln_bias=lb)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad is None and db.grad is None and lw.grad is None
    assert dw.grad is not None and uw.grad is not None and ub.grad is not None
    assert torch.equal(res.grad, dy)


def _op(backend):
    ops = torch.ops.fastpeft
    return ops.bottleneck_adapter if backend == "cpu" else ops.bottleneck_adapter_triton


def _op_args(device, dtype=torch.float32, ln=True, residual=False, shape=((6,), 20, 5),
             activation="gelu_tanh"):
    x, dw, db, uw, ub, res, lw, lb = make_inputs(*shape, dtype, device,
                                                 ln="affine" if ln else "none", residual=residual)
    return (x, dw, db, uw, ub, res, lw, lb, activation, 1.5, 1e-5)


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
@pytest.mark.parametrize(("ln", "residual"), [(True, False), (False, True)],
                         ids=["ln-x", "noln-residual"])
def test_opcheck(backend_device, ln, residual):
    backend, device = backend_device
    torch.library.opcheck(_op(backend), _op_args(device, ln=ln, residual=residual))


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_gradcheck_float64(backend_device, activation):
    """The backward formulas (activation derivative, layer norm, residual) against finite
    differences."""
    backend, device = backend_device
    args = _op_args(device, torch.float64, ln=True, shape=((3,), 7, 2), activation=activation)
    tensors, rest = args[:8], args[8:]
    op = _op(backend)

    def f(*ts):
        return op(*ts, *rest)[0]

    # the interpreter is slow: a random projection of the Jacobian there (fast_mode)
    fast = backend == "triton" and TRITON_INTERPRETED
    assert torch.autograd.gradcheck(f, tensors, fast_mode=fast)


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
def test_gradcheck_separate_residual_no_ln(backend_device):
    backend, device = backend_device
    args = _op_args(device, torch.float64, ln=False, residual=True, shape=((4,), 6, 3),
                    activation="silu")
    op = _op(backend)
    x, dw, db, uw, ub, res = args[:6]

    def f(x, dw, db, uw, ub, res):
        return op(x, dw, db, uw, ub, res, None, None, *args[8:])[0]

    fast = backend == "triton" and TRITON_INTERPRETED
    assert torch.autograd.gradcheck(f, (x, dw, db, uw, ub, res), fast_mode=fast)


@pytest.mark.parametrize("path", ["fused", "aten"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(("ln", "residual"), [("affine", False), ("none", True)],
                         ids=["ln-x", "noln-residual"])
def test_many_blocks_match_reference(path, threads, ln, residual, monkeypatch):
    """Rows enough for several blocks on either C++ path (at d = 2048 the aten path's
    fp16 / bf16 blocks hold 512 rows, their number a multiple of the thread count), with
    the block sums and the whole-T weight-gradient GEMMs over all of them."""
    if "cpu" not in fastpeft.available_backends("bottleneck_adapter"):
        pytest.skip("fastpeft._C has no bottleneck_adapter kernel (not built)")
    monkeypatch.setenv("FASTPEFT_CPU_PATH", path)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            inputs = make_inputs((1100,), 2048, 8, dtype, "cpu", ln=ln, residual=residual)
            with forced("cpu"):
                y = call(fastpeft.bottleneck_adapter, inputs, activation="gelu", scaling=0.5)
            fused = (y, *grads(y, inputs))
            ref = run_reference(inputs, dtype, activation="gelu", scaling=0.5)
            for name, out, r64, rlow in zip(
                ["y", *present_names(inputs)], fused, (ref["ref64"][0], *ref["ref64"][1]),
                (ref["lowp"][0], *ref["lowp"][1]), strict=True,
            ):
                assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow, atol_eps=8)
    finally:
        torch.set_num_threads(saved)


def test_reference_backend_is_the_reference():
    inputs = make_inputs((4,), 12, 3, torch.float64, "cpu", ln="affine", residual=True)
    with forced("reference"):
        y = call(fastpeft.bottleneck_adapter, inputs, activation="silu", scaling=0.7)
    assert torch.equal(y, call(reference.bottleneck_adapter, inputs, activation="silu",
                               scaling=0.7))


# --- the module -----------------------------------------------------------------------


@pytest.mark.parametrize("layer_norm", [False, True])
def test_module_starts_as_exact_identity(layer_norm):
    adapter = fastpeft.BottleneckAdapter(48, 6, activation="gelu", layer_norm=layer_norm,
                                         scaling=3.0)
    x = torch.randn(2, 5, 48)
    assert torch.equal(adapter(x), x)
    res = torch.randn(2, 5, 48)
    assert torch.equal(adapter(x, res), res)
    # and it trains: the up projection gets a gradient at step 0
    adapter(x).square().sum().backward()
    assert adapter.up_weight.grad.abs().sum() > 0
    assert torch.equal(adapter.down_weight.grad, torch.zeros_like(adapter.down_weight))


def test_module_parameters_and_presets():
    adapter = fastpeft.BottleneckAdapter(64, 8, layer_norm=True, dtype=torch.float64)
    shapes = {n: tuple(p.shape) for n, p in adapter.named_parameters()}
    assert shapes == {
        "down_weight": (8, 64), "up_weight": (64, 8), "down_bias": (8,), "up_bias": (64,),
        "ln_weight": (64,), "ln_bias": (64,),
    }
    assert all(p.dtype == torch.float64 for p in adapter.parameters())
    no_bias = fastpeft.BottleneckAdapter(64, 8, bias=False)
    assert no_bias.down_bias is None and no_bias.up_bias is None

    houlsby = fastpeft.BottleneckAdapter.from_preset("houlsby", 768)
    assert (houlsby.bottleneck_size, houlsby.activation) == (48, "silu")
    assert fastpeft.ADAPTER_PRESETS["houlsby"].placements == ("attention", "feed_forward")
    pfeiffer = fastpeft.BottleneckAdapter.from_preset("pfeiffer", 768, scaling=0.5)
    assert (pfeiffer.bottleneck_size, pfeiffer.activation, pfeiffer.scaling) == (48, "relu", 0.5)
    assert fastpeft.ADAPTER_PRESETS["pfeiffer"].placements == ("feed_forward",)
    with pytest.raises(ValueError, match="preset: expected one of"):
        fastpeft.BottleneckAdapter.from_preset("lora", 768)


def test_module_matches_unfused_layers():
    """The module is nn.LayerNorm -> nn.Linear -> act -> nn.Linear, plus the residual."""
    adapter = fastpeft.BottleneckAdapter(40, 7, activation="gelu_tanh", layer_norm=True,
                                         scaling=0.5)
    torch.nn.init.normal_(adapter.up_weight, std=0.2)
    ln = torch.nn.LayerNorm(40)
    down, up = torch.nn.Linear(40, 7), torch.nn.Linear(7, 40)
    with torch.no_grad():
        for mod, w, b in ((ln, adapter.ln_weight, adapter.ln_bias),
                          (down, adapter.down_weight, adapter.down_bias),
                          (up, adapter.up_weight, adapter.up_bias)):
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    x = torch.randn(3, 4, 40)
    expected = x + 0.5 * up(torch.nn.functional.gelu(down(ln(x)), approximate="tanh"))
    torch.testing.assert_close(adapter(x), expected)


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    adapter = fastpeft.BottleneckAdapter(32, 4, activation="silu", layer_norm=True)
    torch.nn.init.normal_(adapter.up_weight, std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)

    def step(module):
        x.grad = None
        adapter.zero_grad()
        y = module(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), adapter.down_weight.grad.clone()

    compiled = step(torch.compile(adapter, fullgraph=True))
    eager = step(adapter)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


# --- bad input --------------------------------------------------------------------------


def _good():
    return dict(
        x=torch.randn(3, 10),
        down_weight=torch.randn(4, 10),
        down_bias=torch.randn(4),
        up_weight=torch.randn(10, 4),
        up_bias=torch.randn(10),
    )


BAD = [
    ("x", torch.randint(0, 3, (3, 10)), TypeError, r"x: expected dtype float32"),
    # x in another dtype than the weights: x named, not the first weight
    ("x", torch.randn(3, 10).bfloat16(), TypeError,
     r"x: expected dtype torch.float32 \(like down_weight, down_bias, up_weight, up_bias\)"),
    ("down_weight", torch.randn(4, 9), ValueError, r"down_weight: expected shape \(m, 10\)"),
    ("down_weight", torch.randn(4, 10, 1), ValueError, r"down_weight: expected a 2-D"),
    ("down_weight", torch.randn(0, 10), ValueError, r"down_weight: expected at least one"),
    ("down_weight", torch.randn(4, 10).double(), TypeError, r"down_weight: expected dtype"),
    ("down_bias", torch.randn(5), ValueError, r"down_bias: expected shape \(4\)"),
    ("up_weight", torch.randn(4, 10), ValueError, r"up_weight: expected shape \(10, 4\)"),
    ("up_weight", torch.randn(10, 5), ValueError, r"up_weight: expected shape \(10, 4\)"),
    ("up_bias", torch.randn(4), ValueError, r"up_bias: expected shape \(10\)"),
    ("activation", "tanh", ValueError, r"activation: expected one of"),
    ("activation", None, ValueError, r"activation: expected one of"),
    ("residual", torch.randn(3, 11), ValueError, r"residual: expected shape \(3, 10\)"),
    ("residual", torch.randn(10), ValueError, r"residual: expected a 2-D"),
    ("residual", torch.randn(3, 10).half(), TypeError, r"residual: expected dtype"),
    ("ln_weight", torch.randn(9), ValueError, r"ln_weight: expected shape \(10\)"),
    ("ln_bias", torch.randn(10), ValueError, r"ln_bias: given without ln_weight"),
    ("scaling", float("inf"), ValueError, r"scaling: expected"),
    ("ln_eps", 0.0, ValueError, r"ln_eps: expected a value > 0"),
    ("ln_eps", -1e-5, ValueError, r"ln_eps"),
]


@pytest.mark.parametrize(
    ("arg", "value", "exc", "match"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_names_the_argument(arg, value, exc, match):
    kwargs = _good()
    kwargs[arg] = value
    with pytest.raises(exc, match=match):
        fastpeft.bottleneck_adapter(**kwargs)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="bottleneck_size: expected a positive int"):
        fastpeft.BottleneckAdapter(16, 0)
    with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
        fastpeft.BottleneckAdapter(16.0, 4)
    with pytest.raises(ValueError, match="activation: expected one of"):
        fastpeft.BottleneckAdapter(16, 4, activation="swish")
