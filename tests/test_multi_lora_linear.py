"""fastpeft.multi_lora_linear (many adapters, one per row) against the per-row reference,
against lora_linear adapter by adapter, and its checks."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_ref, backend_params, dtypes_for, forced

import fastpeft
from fastpeft import reference
from fastpeft.nn.multi_lora_linear import stack_adapters
from fastpeft.ops._linear import draw_seed

# (leading dims of x, in, out, r, n adapters)
SHAPES = [((9,), 37, 20, 3, 3), ((2, 5), 24, 33, 16, 4), ((1,), 20, 12, 1, 2), ((6,), 16, 8, 4, 1)]


def make_inputs(lead, d_in, d_out, r, n, dtype, device, bias=True, grad_base=False, ids=None,
                seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=True):
        v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        return v.requires_grad_(grad)

    x = t(*lead, d_in)
    w = t(d_out, d_in, scale=max(d_in, 1)**-0.5, grad=grad_base)
    b = t(d_out, grad=grad_base) if bias else None
    a = t(n, r, d_in, scale=max(d_in, 1)**-0.5)
    bb = t(n, d_out, r, scale=r**-0.5)
    scaling = (torch.rand(n, generator=g) * 3 + 0.5).to(device)
    if ids is None:  # every id from -1 to n - 1, in a shuffled order
        ids = torch.randint(-1, n, lead, generator=g)
    return x, w, b, a, bb, scaling, ids.to(device)


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    return torch.autograd.grad(out, [i for i in inputs if isinstance(i, torch.Tensor)
                                     and i.requires_grad], dy)


def run_reference(inputs, p, seed, dtype):
    """The reference in float64 (the truth) and in the test dtype (torch's own error)."""
    outs = {}
    for name, dt in (("ref64", torch.float64), ("lowp", dtype)):
        copies = [None if i is None else i.detach().to(dt).requires_grad_(i.requires_grad)
                  for i in inputs[:5]]
        y = reference.multi_lora_linear(*copies, inputs[5], inputs[6], p, True, seed)
        outs[name] = (y, grads(y, copies))
    return outs


def check_against_reference(backend, device, inputs, dtype, dropout_p):
    torch.manual_seed(123)
    with forced(backend):
        y = fastpeft.multi_lora_linear(*inputs, dropout_p)
    torch.manual_seed(123)
    seed = draw_seed(torch.device(device)) if dropout_p else None
    fused = grads(y, inputs)
    ref = run_reference(inputs, dropout_p, seed, dtype)
    names = ["y", "dx", "dW", "dbias", "dA", "dB"]
    names = [n for n, i in zip(names, (None, *inputs[:5]), strict=False)
             if n == "y" or (i is not None and i.requires_grad)]
    for name, out, r64, rlow in zip(names, (y, *fused), (ref["ref64"][0], *ref["ref64"][1]),
                                    (ref["lowp"][0], *ref["lowp"][1]), strict=True):
        assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow)


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_matches_reference(backend_device, shape, bias, dropout_p):
    backend, device = backend_device
    for dtype in dtypes_for(backend, device):
        inputs = make_inputs(*shape, dtype, device, bias=bias)
        check_against_reference(backend, device, inputs, dtype, dropout_p)


IDS = {
    "all-base": lambda n, T: torch.full((T,), -1),
    "one-adapter": lambda n, T: torch.full((T,), n - 1),
    "sorted": lambda n, T: torch.arange(T) * n // T,
    "alternating": lambda n, T: torch.arange(T) % 2 * (n - 1),
    "one-row-each": lambda n, T: torch.arange(T) % (n + 1) - 1,
}


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
@pytest.mark.parametrize("pattern", IDS.values(), ids=IDS.keys())
def test_id_patterns(backend_device, pattern):
    """Segments of every kind: none, one, sorted, interleaved, single rows; adapters that
    no row names get zero gradients (even with an infinite scaling)."""
    backend, device = backend_device
    n, T = 4, 11
    ids = pattern(n, T)
    inputs = make_inputs((T,), 21, 18, 5, n, torch.float32, device, ids=ids, grad_base=True)
    check_against_reference(backend, device, inputs, torch.float32, 0.2)
    scaling = inputs[5].clone()  # zeros whatever an unused adapter's scaling (not 0 * inf)
    scaling[[i for i in range(n) if not (ids == i).any()]] = float("inf")
    inputs = (*inputs[:5], scaling, inputs[6])
    with forced(backend):
        y = fastpeft.multi_lora_linear(*inputs, 0.2)
    *_, d_a, d_b = grads(y, inputs)
    for i in range(n):
        if not (ids == i).any():
            assert torch.equal(d_a[i], torch.zeros_like(d_a[i]))
            assert torch.equal(d_b[i], torch.zeros_like(d_b[i]))


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_each_adapter_as_lora_linear(backend_device, dropout_p):
    """Row by row, the op is lora_linear with that row's adapter (the same dropout mask for
    the same seed), and each adapter's gradients are those of training its own rows alone."""
    backend, device = backend_device
    n, T = 3, 14
    x, w, b, a, bb, scaling, ids = make_inputs((T,), 24, 20, 4, n, torch.float32, device)
    dy = torch.randn(T, 20, device=device)
    torch.manual_seed(5)
    with forced(backend):
        y = fastpeft.multi_lora_linear(x, w, b, a, bb, scaling, ids, dropout_p)
    dx, d_a, d_b = torch.autograd.grad(y, (x, a, bb), dy)
    dx_sum = torch.zeros_like(x)
    for i in range(-1, n):
        rows = ids == i
        torch.manual_seed(5)
        with forced(backend):
            if i < 0:
                y_i = torch.nn.functional.linear(x, w, b)
            else:
                y_i = fastpeft.lora_linear(x, w, b, a[i], bb[i], float(scaling[i]), dropout_p)
        torch.testing.assert_close(y[rows], y_i[rows], rtol=1e-5, atol=1e-5)
        wrt = (x,) if i < 0 else (x, a, bb)
        g = torch.autograd.grad(y_i, wrt, dy * rows[:, None])
        dx_sum += g[0]
        if i >= 0:
            torch.testing.assert_close(d_a[i], g[1][i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(d_b[i], g[2][i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
def test_transposed_weight(backend_device):
    """The weight as GPT-2's Conv1D stores it, the (in, out) tensor's transposed view."""
    backend, device = backend_device
    x, w, b, a, bb, scaling, ids = make_inputs((7,), 16, 12, 4, 2, torch.float32, device,
                                               grad_base=True)
    storage = w.detach().t().contiguous().requires_grad_(True)
    inputs = (x, storage.t(), b, a, bb, scaling, ids)
    check_against_reference(backend, device, inputs, torch.float32, 0.1)


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
def test_empty_batch(backend_device):
    backend, device = backend_device
    x, w, b, a, bb, scaling, ids = make_inputs((0,), 16, 8, 2, 3, torch.float32, device)
    with forced(backend):
        y = fastpeft.multi_lora_linear(x, w, b, a, bb, scaling, ids)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
@pytest.mark.parametrize(("d_in", "d_out"), [(0, 5), (4, 0)], ids=["in0", "out0"])
def test_empty_feature_dims(backend_device, d_in, d_out):
    """Zero input or output features: the right empty or zero results, zero gradients."""
    backend, device = backend_device
    x, w, b, a, bb, scaling, ids = make_inputs((3,), d_in, d_out, 2, 2, torch.float32, device,
                                               ids=torch.tensor([0, -1, 1]))
    with forced(backend):
        y = fastpeft.multi_lora_linear(x, w, b, a, bb, scaling, ids)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(a.grad) == 0 \
        and torch.count_nonzero(bb.grad) == 0


def _op(backend):
    ops = torch.ops.fastpeft
    return ops.multi_lora_linear if backend == "cpu" else ops.multi_lora_linear_triton


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("layout", ["out_in", "transposed"])
def test_opcheck(backend_device, p, layout):
    backend, device = backend_device
    x, w, b, a, bb, scaling, ids = make_inputs((6,), 24, 20, 4, 3, torch.float32, device)
    if layout == "transposed":
        w = w.detach().t().contiguous().t()
    seed = torch.tensor([1234], dtype=torch.int64, device=device) if p else None
    torch.library.opcheck(_op(backend), (x, w, b, a, bb, scaling, ids, p, seed))


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(backend_device, p):
    """The backward formulas, dropout included, against finite differences (fixed seed)."""
    backend, device = backend_device
    x, w, b, a, bb, scaling, _ = make_inputs((4,), 6, 5, 2, 3, torch.float64, device,
                                             grad_base=True)
    ids = torch.tensor([2, -1, 0, 2], device=device)  # adapter 1 unused
    seed = torch.tensor([99], dtype=torch.int64, device=device) if p else None
    op = _op(backend)

    def f(x, w, b, a, bb):
        return op(x, w, b, a, bb, scaling, ids, p, seed)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
def test_float64_dropout_keeps_float64_precision(backend_device):
    """With dropout, fp64 results to fp64 precision: the float32 scalings are widened before
    they scale (Triton rounded the product to float32: errors of 4e-8)."""
    backend, device = backend_device
    x, w, b, a, bb, scaling, _ = make_inputs((6,), 17, 12, 3, 2, torch.float64, device)
    ids = torch.tensor([1, 0, 1, 1, -1, 0], device=device)
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    y = _op(backend)(x, w, b, a, bb, scaling, ids, 0.1, seed)[0]
    want = reference.multi_lora_linear(x, w, b, a, bb, scaling, ids, 0.1, True, seed)
    dy = torch.randn_like(y)
    for got, expected in zip(torch.autograd.grad(y, (x, a, bb), dy),
                             torch.autograd.grad(want, (x, a, bb), dy), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_compiles_fullgraph():
    """One graph, no breaks, the same output and gradients as eager."""
    torch._dynamo.reset()
    x, w, b, a, bb, scaling, ids = make_inputs((2, 5), 32, 24, 4, 3, torch.float32, "cpu")

    def f(x, a, bb):
        return fastpeft.multi_lora_linear(x, w, b, a, bb, scaling, ids)

    def step(fn):
        y = fn(x, a, bb)
        return (y.detach(), *torch.autograd.grad(y.square().sum(), (x, a, bb)))

    compiled = step(torch.compile(f, fullgraph=True))
    for c, e in zip(compiled, step(f), strict=True):
        torch.testing.assert_close(c, e)


# --- bad input --------------------------------------------------------------------------


def _good():
    return dict(
        x=torch.randn(3, 10),
        weight=torch.randn(6, 10),
        bias=torch.randn(6),
        lora_A=torch.randn(4, 2, 10),
        lora_B=torch.randn(4, 6, 2),
        scaling=torch.ones(4),
        adapter_ids=torch.tensor([0, -1, 3]),
    )


BAD = [
    ("x", torch.randn(3, 9), ValueError, r"x: expected last dimension 10"),
    ("x", torch.randint(0, 3, (3, 10)), TypeError, r"x: expected dtype float32"),
    ("weight", torch.randn(6, 10, 1), ValueError, r"weight: expected a 2-D"),
    ("bias", torch.randn(5), ValueError, r"bias: expected shape \(6\)"),
    ("lora_A", torch.randn(2, 10), ValueError, r"lora_A: expected a 3-D"),
    ("lora_A", torch.randn(4, 2, 11), ValueError, r"lora_A: expected shape \(\*, \*, 10\)"),
    ("lora_A", torch.randn(4, 0, 10), ValueError, r"lora_A: expected \(n, r, in\)"),
    ("lora_B", torch.randn(4, 6, 3), ValueError, r"lora_B: expected shape \(4, 6, 2\)"),
    ("lora_B", torch.randn(3, 6, 2), ValueError, r"lora_B: expected shape \(4, 6, 2\)"),
    ("lora_B", torch.randn(4, 6, 2).half(), TypeError, r"lora_B: expected dtype"),
    ("scaling", 2.0, TypeError, r"scaling: expected a torch.Tensor"),
    ("scaling", torch.ones(3), ValueError, r"scaling: expected shape \(4\)"),
    ("scaling", torch.ones(4, dtype=torch.float64), TypeError, r"scaling: expected dtype"),
    ("scaling", torch.ones(4, requires_grad=True), ValueError, r"scaling: .*requires grad"),
    ("adapter_ids", torch.tensor([0, 1, 4]), ValueError, r"adapter_ids: expected values in "
     r"\[-1, 4\).*got 4"),
    ("adapter_ids", torch.tensor([0, -2, 1]), ValueError, r"adapter_ids: .*got -2"),
    ("adapter_ids", torch.tensor([0, 1, 2], dtype=torch.int32), TypeError,
     r"adapter_ids: expected dtype torch.int64"),
    ("adapter_ids", torch.tensor([0, 1]), ValueError, r"adapter_ids: expected shape \(3,\)"),
    ("adapter_ids", [0, 1, 2], TypeError, r"adapter_ids: expected a torch.Tensor"),
    ("dropout_p", 1.0, ValueError, r"dropout_p: expected a value in \[0.0, 1.0\)"),
]


@pytest.mark.parametrize(
    ("arg", "value", "exc", "match"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_names_the_argument(arg, value, exc, match):
    kwargs = _good() | {arg: value}
    with pytest.raises(exc, match=match):
        fastpeft.multi_lora_linear(**kwargs)


@pytest.mark.skipif("cpu" not in fastpeft.available_backends("multi_lora_linear"),
                    reason="fastpeft._C has no multi_lora_linear kernel (not built)")
def test_native_op_refuses_bad_ids():
    """The C++ op checks the ids itself (compiled code, and the public function on CPU
    tensors, skip the Python check), raising what the public function would."""
    args = _good()
    with pytest.raises(ValueError, match=r"adapter_ids: expected values in \[-1, 4\).*got 7"):
        torch.ops.fastpeft.multi_lora_linear(args["x"], args["weight"], args["bias"],
                                             args["lora_A"], args["lora_B"], args["scaling"],
                                             torch.tensor([0, 7, 1]), 0.0, None)


# --- the module ---------------------------------------------------------------------------


def _module(gpt2_layout: bool = False, dropout: float = 0.0) -> fastpeft.MultiLoRALinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20)
    if gpt2_layout:
        conv1d = pytest.importorskip("transformers").pytorch_utils.Conv1D(20, 24)
        with torch.no_grad():
            conv1d.weight.copy_(base.weight.t())
            conv1d.bias.copy_(base.bias)
        base = conv1d
    layer = fastpeft.MultiLoRALinear(base)
    for name, r, alpha, rslora in (("sql", 4, 8, False), ("chat", 8, 4, False),
                                   ("math", 2, 6, True)):
        layer.add_adapter(name, r, alpha, dropout, use_rslora=rslora)
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    return layer


@pytest.mark.parametrize("gpt2_layout", [False, True], ids=["linear", "conv1d"])
def test_module_rows_match_single_adapter_layers(gpt2_layout):
    """Each sample as a LoRALinear holding that sample's adapter alone; gradients reach each
    adapter from its own rows only; state-dict keys in PEFT's layout."""
    layer = _module(gpt2_layout)
    names = ["chat", "__base__", "sql", "math", "chat"]
    x = torch.randn(5, 3, 24, requires_grad=True)
    y = layer(x, adapter_names=names)
    y.square().sum().backward()
    for row, name in enumerate(names):
        if name == "__base__":
            expected = layer.base_layer(x[row])
        else:
            single = fastpeft.LoRALinear(layer.base_layer, layer.r[name], layer.lora_alpha[name],
                                         use_rslora=layer.use_rslora[name])
            single.lora_A.weight.data = layer.lora_A[name].weight.data
            single.lora_B.weight.data = layer.lora_B[name].weight.data
            expected = single(x[row])
        torch.testing.assert_close(y[row], expected, rtol=1e-5, atol=1e-5)
    rows = {n: [i for i, m in enumerate(names) if m == n] for n in layer.adapter_names}
    base_w = layer.weight.t() if gpt2_layout else layer.weight
    for name in layer.adapter_names:  # each adapter's gradient: that of its own rows alone
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        a_own, b_own = (t.detach().clone().requires_grad_() for t in (a, b))
        xd = x.detach()[rows[name]]
        y_own = torch.nn.functional.linear(xd, base_w, layer.bias) \
            + layer.scaling[name] * (xd @ a_own.t()) @ b_own.t()
        y_own.square().sum().backward()
        torch.testing.assert_close(a.grad, a_own.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.grad, b_own.grad, rtol=1e-4, atol=1e-5)
    keys = set(layer.state_dict())
    assert {"lora_A.sql.weight", "lora_B.chat.weight", "base_layer.weight"} <= keys


def test_module_adapter_ids_and_refusals():
    layer = _module()
    x = torch.randn(4, 24)
    ids = torch.tensor([2, -1, 0, 1])
    by_name = layer(x, adapter_names=["math", "__base__", "sql", "chat"])
    torch.testing.assert_close(layer(x, adapter_ids=ids), by_name)
    with pytest.raises(ValueError, match="adapter_names: no adapter \\['nope'\\]"):
        layer(x, adapter_names=["sql", "nope", "sql", "sql"])
    with pytest.raises(ValueError, match="adapter_names: expected a list of 4 names"):
        layer(x, adapter_names=["sql"])
    with pytest.raises(ValueError, match="pass exactly one"):
        layer(x)
    with pytest.raises(ValueError, match="name: adapter 'sql' exists"):
        layer.add_adapter("sql", 2)
    layer.lora_dropout["chat"] = 0.3
    with pytest.raises(ValueError, match="lora_dropout: one fused batch"):
        layer.train()(x, adapter_ids=ids)
    with pytest.raises(ValueError, match="lora_dropout: one fused batch"):
        layer(x, adapter_names=["math", "__base__", "sql", "chat"])
    # only the batch's adapters must agree: "chat" idle, by names, ids or names set
    layer(x, adapter_names=["math", "__base__", "sql", "sql"]).sum().backward()
    layer(x, adapter_ids=torch.tensor([2, -1, 0, 0])).sum().backward()
    layer.active_names = ("sql", "sql", "math", "__base__")
    layer(x).sum().backward()
    layer.active_names = None
    layer.eval()
    layer.delete_adapter("chat")
    assert layer.adapter_names == ["sql", "math"]


def test_module_saves_and_copies_after_serving(tmp_path):
    """The stack kept between serving calls (with the weights' storages) is left out of the
    module's pickled state: ``torch.save`` works after serving (it refused the storages
    next to the same data typed), ``deepcopy`` copies no stale stack, and both serve as the
    original does."""
    layer = _module().eval()
    x, names = torch.randn(4, 24), ["math", "__base__", "sql", "chat"]
    with torch.no_grad():
        want = layer(x, adapter_names=names)
    assert "_fastpeft_stack" in layer.__dict__
    torch.save(layer, tmp_path / "layer.pt")
    copied = copy.deepcopy(layer)
    assert "_fastpeft_stack" not in copied.__dict__
    for other in (torch.load(tmp_path / "layer.pt", weights_only=False), copied):
        with torch.no_grad():
            torch.testing.assert_close(other(x, adapter_names=names), want)


def test_module_serving_reuses_the_stack_until_a_weight_changes():
    """Without gradients the stacked adapters are kept between calls, and made again when a
    weight changes in place (an optimizer step, a load) or an adapter is added."""
    layer = _module().eval()
    x = torch.randn(4, 24)
    ids = torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        first = layer(x, adapter_ids=ids)
        stack = layer.stacked(torch.float32)
        assert layer.stacked(torch.float32)[0] is stack[0]  # kept
        layer.lora_B["chat"].weight.mul_(2.0)
        changed = layer(x, adapter_ids=ids)
    expected = layer(x, adapter_ids=ids)  # with grad: stacked per call
    torch.testing.assert_close(changed, expected)
    assert not torch.allclose(changed[1], first[1]) and torch.equal(changed[0], first[0])
    layer.add_adapter("new", 2, 4)
    with torch.no_grad():
        assert layer.stacked(torch.float32)[0].shape[0] == 4


def test_module_frozen_adapters_keep_one_stack_with_and_without_grad():
    """Frozen adapters (requires_grad False) need no gradient with grad mode on either: the
    same kept stack serves calls with and without it, and adapters that train get a
    differentiable stack per call."""
    layer = _module().eval().requires_grad_(False)
    x, ids = torch.randn(4, 24), torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        kept = layer.stacked(torch.float32)
    assert layer.stacked(torch.float32)[0] is kept[0]
    with torch.no_grad():
        assert layer.stacked(torch.float32)[0] is kept[0]
    layer.lora_A["sql"].weight.requires_grad_(True)
    trained = layer.stacked(torch.float32)
    assert trained[0] is not kept[0] and trained[0].requires_grad
    (layer(x, adapter_ids=ids) ** 2).sum().backward()
    assert layer.lora_A["sql"].weight.grad is not None


@pytest.mark.parametrize("helpers", ["compiled", "python"])
@pytest.mark.parametrize("change", ["data", "replace", "scaling", "dtype", "transpose",
                                    "reorder_B", "scaling_in_place", "readd"])
def test_module_serving_restacks_after_every_kind_of_change(change, helpers, monkeypatch):
    """The kept stack is made again when a weight's storage is swapped (``.data =``, as
    ``Module.to`` does) or relaid out, a weight is replaced by another Parameter, the B
    modules are put in another order than the A ones, a scaling changes (also in place,
    a 0-d array), an adapter is deleted and added again (its new weights could take the
    old ones' addresses if the stack did not keep them alive), or the input's dtype
    changes; each result as a fresh module computes it. With the compiled key helpers and
    with their Python stand-in (no compiled kernels)."""
    if helpers == "python":
        monkeypatch.setattr(fastpeft._backend, "native_module", None)
    elif fastpeft._backend.native_module is None:
        pytest.skip("needs the compiled kernels")
    layer = _module().eval()
    x = torch.randn(4, 24)
    ids = torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        layer(x, adapter_ids=ids)
        if change == "data":
            layer.lora_A["sql"].weight.data = torch.randn(4, 24)
        elif change == "replace":
            layer.lora_B["math"].weight = torch.nn.Parameter(torch.randn(20, 2))
        elif change == "scaling":
            layer.scaling["chat"] = 3.0
        elif change == "transpose":  # the same storage, shape and version, read otherwise
            w = layer.lora_A["chat"].weight
            w.data = w.data.as_strided((8, 24), (1, 8))
        elif change == "reorder_B":  # sql's and chat's B swapped, listed in A's old order
            b_sql, b_chat, b_math = (layer.lora_B.pop(a) for a in ("sql", "chat", "math"))
            layer.lora_B["chat"] = b_sql
            layer.lora_B["sql"] = b_chat
            layer.lora_B["math"] = b_math
        elif change == "scaling_in_place":
            import numpy as np

            layer.scaling["chat"] = np.array(layer.scaling["chat"])
            layer(x, adapter_ids=ids)
            layer.scaling["chat"] *= 3
        elif change == "readd":
            for _ in range(3):
                layer.delete_adapter("math")
                layer.add_adapter("math", 2, 6, use_rslora=True)
                torch.nn.init.normal_(layer.lora_B["math"].weight, std=0.3)
                layer(x, adapter_ids=ids)
        else:
            layer.double()
            x = x.double()
        got = layer(x, adapter_ids=ids)
    expected = layer(x, adapter_ids=ids)  # with grad: stacked per call
    torch.testing.assert_close(got, expected)


def test_module_serving_with_inference_tensors():
    """Weights made under inference_mode have no version counter: the stack is then made
    per call, not kept (and nothing raises)."""
    with torch.inference_mode():
        layer = _module().eval()
        x = torch.randn(4, 24)
        ids = torch.tensor([0, 1, 2, -1])
        first = layer(x, adapter_ids=ids)
        layer.lora_B["chat"].weight.mul_(2.0)
        second = layer(x, adapter_ids=ids)
    assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])


def test_module_grad_calls_after_an_inference_mode_call():
    """What an inference-mode call keeps (the stacked frozen adapters; the ids of
    set_adapter_names) is made outside inference mode: a later call's backward can save
    it. Frozen adapters with x requiring grad (attribution, training the layers before),
    and trainable adapters on a 2-D input of one row per sequence (a head)."""
    x, ids = torch.randn(4, 24), torch.tensor([0, 1, 2, -1])
    grads = []
    for warm in (False, True):
        layer = _module().requires_grad_(False)
        if warm:
            with torch.inference_mode():
                layer(x, adapter_ids=ids)
        x2 = x.clone().requires_grad_()
        layer(x2, adapter_ids=ids).square().sum().backward()
        grads.append(x2.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    grads = []
    for warm in (False, True):
        layer = _module()
        model = torch.nn.Sequential(layer)
        fastpeft.set_adapter_names(model, ["chat", "__base__", "sql", "chat"])
        if warm:
            with torch.inference_mode():
                model(x)
        model(x).square().sum().backward()
        grads.append(layer.lora_A["chat"].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("target", ["weight", "bias", "adapter"])
def test_module_with_parametrised_weights(target):
    """A parametrised tensor is no parameter of its module: the layer then reads the
    attribute (the parametrisation's value), for the base's weight or bias and for an
    adapter's weight, with and without gradients."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, t):
            return 2.0 * t

    layer = _module().eval()
    x, ids = torch.randn(4, 24), torch.tensor([0, 1, 2, -1])
    module = layer.lora_A["chat"] if target == "adapter" else layer.base_layer
    parametrize.register_parametrization(module, "weight" if target == "adapter" else target,
                                         Double())
    base = layer.base_layer
    expected = reference.multi_lora_linear(
        x, base.weight, base.bias, *stack_adapters(
            [layer.lora_A[a].weight for a in layer.adapter_names],
            [layer.lora_B[a].weight for a in layer.adapter_names],
            [layer.scaling[a] for a in layer.adapter_names], x.dtype), ids, 0.0, False)
    torch.testing.assert_close(layer(x, adapter_ids=ids), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_ids=ids), expected)


@pytest.mark.skipif(fastpeft._backend.native_module is None, reason="needs the compiled kernels")
def test_weights_key_tells_every_change():
    """The compiled helpers behind the kept stack: equal keys exactly while no tensor was
    written, swapped, reshaped or relaid out; adapters_key reads the same off the
    modules, with each adapter's scaling before its two weights."""
    import struct

    from fastpeft import _backend

    native = _backend.native_module
    a, b = torch.randn(3, 4), torch.randn(5)
    key = native.weights_key([a, b])
    assert native.weights_key((a, b)) == key
    a.add_(1.0)
    assert native.weights_key([a, b]) != key
    key = native.weights_key([a, b])
    b.data = torch.randn(5)
    assert native.weights_key([a, b]) != key
    key = native.weights_key([a, b])
    a.resize_(4, 3)
    assert native.weights_key([a, b]) != key
    square = torch.randn(3, 3)
    key = native.weights_key([square])
    square.data = square.data.t()  # same storage, shape and version; other strides
    assert native.weights_key([square]) != key
    with torch.inference_mode():
        assert native.weights_key([torch.randn(2)]) is None
    with pytest.raises(TypeError, match="item 1 is a int"):
        native.weights_key([a, 1])
    a_mods = {"x": torch.nn.Linear(4, 2, bias=False), "y": torch.nn.Linear(4, 2)}
    b_mods = {"y": torch.nn.Linear(2, 3), "x": torch.nn.Linear(2, 3)}  # lora_A's order counts
    scalings = {"y": 0.5, "x": 2}
    expected = b"".join(struct.pack("d", float(scalings[k]))
                        + native.weights_key([a_mods[k].weight, b_mods[k].weight])
                        for k in a_mods)
    assert native.adapters_key(a_mods, b_mods, scalings, "weight") == expected
    assert native.adapters_key(a_mods, b_mods, scalings, "bias") is None  # x's A has none
    assert native.adapters_key(a_mods, {"x": b_mods["x"]}, scalings, "weight") is None
    assert native.adapters_key(a_mods, b_mods, {"x": 2.0}, "weight") is None
    with pytest.raises(TypeError, match="must be real number"):
        native.adapters_key(a_mods, b_mods, {"x": 2.0, "y": "0.5"}, "weight")
    torch.nn.utils.parametrize.register_parametrization(a_mods["y"], "weight",
                                                        torch.nn.Identity())
    assert native.adapters_key(a_mods, b_mods, scalings, "weight") is None


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    layer = _module(dropout=0.1).train()
    x = torch.randn(6, 24, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 1, 1, 0])

    def step(module):
        torch.manual_seed(3)
        layer.zero_grad()
        y = module(x, adapter_ids=ids)
        gx, = torch.autograd.grad(y.square().sum(), x, retain_graph=False)
        return y.detach(), gx

    with torch._inductor.config.patch(fallback_random=True):
        compiled = step(torch.compile(layer, fullgraph=True))
    for c, e in zip(compiled, step(layer), strict=True):
        torch.testing.assert_close(c, e)


def test_bad_ids_refused_with_an_empty_weight():
    """With out_features = 0 the reference runs (no kernel call), so the ids' values are
    checked in Python there, as on every path that does not reach the C++ op."""
    x, s = torch.randn(3, 8), torch.ones(2)
    with pytest.raises(ValueError, match=r"adapter_ids: expected values in \[-1, 2\).*got 5"):
        fastpeft.multi_lora_linear(x, torch.randn(0, 8), None, torch.randn(2, 2, 8),
                                   torch.randn(2, 0, 2), s, torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("backend_device", backend_params("multi_lora_linear"))
def test_small_segments_over_many_outputs_are_accurate(backend_device):
    """Segments of a few rows (each adapter's rows summed by the small-segment kernels) over
    N = 4096 outputs, fp32: dx's LoRA term and dA come from s * dy @ B, a sum over N,
    which one chain of fp32 adds made ~3x less accurate than the reference (relative
    Frobenius error against float64); it is summed in chunks now."""
    backend, device = backend_device
    if backend != "cpu":
        pytest.skip("the C++ small-segment kernels")
    ids = torch.randint(-1, 4, (17,), generator=torch.Generator().manual_seed(5))
    inputs = make_inputs((17,), 96, 4096, 16, 4, torch.float32, device, ids=ids)
    with forced(backend):
        y = fastpeft.multi_lora_linear(*inputs)
    fused = dict(zip(["dx", "dA", "dB"], grads(y, (inputs[0], inputs[3], inputs[4])),
                     strict=True))
    ref = run_reference(inputs, 0.0, None, torch.float32)
    picked = {"dx": 0, "dA": 1, "dB": 2}  # the frozen base: the gradients are x's, A's, B's
    for name, k in picked.items():
        truth, lowp = ref["ref64"][1][k], ref["lowp"][1][k]
        err = (fused[name].double() - truth).norm() / truth.norm()
        ref_err = (lowp.double() - truth).norm() / truth.norm()
        assert err <= 1.5 * ref_err, f"{name}: relative error {err:.2e}, reference {ref_err:.2e}"
