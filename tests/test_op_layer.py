"""The op layer's contract beyond the math: backend choice per thread, empty inputs,
torch.func transforms, argument messages, and the notice when the kernels are missing
(issue 14's defects, one test each)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from helpers import backend_params, forced

import fastpeft
from fastpeft import _backend, reference


def test_available_backends():
    assert set(_backend.declared_ops()) == {"lora_linear", "int8_lora_linear",
                                            "multi_lora_linear", "gated_prefix_attention",
                                            "bottleneck_adapter", "nf4_lora_linear"}
    for op in _backend.declared_ops():
        found = fastpeft.available_backends(op)
        assert found[0] == "reference"
        assert set(found) <= {"reference", "cpu", "triton"}
    with pytest.raises(ValueError, match="op: unknown fastpeft op 'nope'"):
        fastpeft.available_backends("nope")


# --- 1. non-finite weights are not quantised ------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_quantize_int8_refuses_non_finite(bad):
    w = torch.randn(6, 8)
    w[4, 1] = bad
    with pytest.raises(ValueError, match=r"weight: expected finite values.*row 4"):
        fastpeft.quantize_int8(w)
    linear = torch.nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight.copy_(w)
    with pytest.raises(ValueError, match="weight: expected finite values"):
        fastpeft.Int8LoRALinear.from_linear(linear, 2, 4)


def test_quantize_int8_of_a_weight_without_columns():
    q, s = fastpeft.quantize_int8(torch.randn(3, 0))
    assert q.shape == (3, 0) and q.dtype == torch.int8
    torch.testing.assert_close(s, torch.zeros(3))


# --- 2. use_backend holds in its own thread only ------------------------------------------


def test_use_backend_is_per_thread():
    inside, checked = threading.Event(), threading.Event()
    seen = {}

    def forcing():
        with fastpeft.use_backend("reference"):
            seen["forcing"] = _backend.current()
            inside.set()
            checked.wait(10)
        seen["after"] = _backend.current()

    def other():
        inside.wait(10)
        seen["other"] = _backend.current()
        checked.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    default = _backend._ENV_BACKEND
    assert seen == {"forcing": "reference", "other": default, "after": default}
    with fastpeft.use_backend("reference"), fastpeft.use_backend("auto"):
        assert _backend.current() == "auto"


def test_use_backend_after_compiling_recompiles():
    """torch.compile guards on use_backend's per-thread choice: a function compiled (and
    compiled again once its first call memoised the choice) in a thread that never
    entered use_backend runs the reference inside it. A default read through the class
    had kept the compiled kernels' graph there."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(any("fastpeft" in str(n.target) for n in gm.graph.nodes))
        return gm.forward

    seen = {}

    def run():
        torch._dynamo.reset()
        f = torch.compile(lambda x, w, a, b: fastpeft.lora_linear(x, w, None, a, b, 2.0),
                          backend=backend)
        x, w, a, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        f(x, w, a, b)
        f(x, w, a, b)
        seen["before"] = len(graphs)
        with fastpeft.use_backend("reference"):
            f(x, w, a, b)
        seen["inside"] = len(graphs)

    thread = threading.Thread(target=run)  # a thread whose per-thread state is fresh
    thread.start()
    thread.join(120)
    assert seen["inside"] == seen["before"] + 1 and graphs[-1] is False
    assert graphs[0] is _backend.native_available()


def test_dropout_seed_follows_the_inputs_not_the_default_device():
    """The seed a dropout call draws is on x's device whatever torch.set_default_device or
    a ``with torch.device(...)`` block says (a seed on "meta" had sent a CPU call to the
    fake kernel, which returns uninitialised memory)."""
    x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    torch.manual_seed(0)
    expected = fastpeft.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.5)
    torch.manual_seed(0)
    with torch.device("meta"):
        y = fastpeft.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.5)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, expected)


# --- 4. zero-size dimensions give the empty result and its gradients ------------------------


def _linear_case(t: int, d_in: int, d_out: int):
    x, w = torch.randn(t, d_in), torch.randn(d_out, d_in)
    a, b = torch.randn(2, d_in), torch.randn(d_out, 2)
    return x, w, torch.randn(d_out), a, b


EMPTY_LINEAR = [(0, 8, 6), (5, 0, 6), (5, 8, 0), (0, 0, 0)]


@pytest.mark.parametrize("backend_device", backend_params("lora_linear"))
@pytest.mark.parametrize("shape", EMPTY_LINEAR, ids=str)
def test_lora_linear_empty_dims(backend_device, shape):
    backend, device = backend_device
    x, w, bias, a, b = (t.to(device).requires_grad_() for t in _linear_case(*shape))
    with forced(backend):
        y = fastpeft.lora_linear(x.unsqueeze(0), w, bias, a, b, 2.0, 0.1)
    ref = reference.lora_linear(x.unsqueeze(0), w, bias, a, b, 2.0)
    assert y.shape == ref.shape == (1, shape[0], shape[2])
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad(y.sum(), (x, w, bias, a, b))
    want = torch.autograd.grad(ref.sum(), (x, w, bias, a, b))
    for g, r in zip(grads, want, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("shape", EMPTY_LINEAR, ids=str)
def test_int8_lora_linear_empty_dims(backend_device, shape):
    backend, device = backend_device
    x, w, bias, a, b = _linear_case(*shape)
    q, s = (t.to(device) for t in fastpeft.quantize_int8(w))
    x, bias, a, b = (t.to(device).requires_grad_() for t in (x, bias, a, b))
    with forced(backend):
        y = fastpeft.int8_lora_linear(x, q, s, bias, a, b, 2.0)
    ref = reference.int8_lora_linear(x, q, s, bias, a, b, 2.0)
    assert y.shape == (shape[0], shape[2])
    torch.testing.assert_close(y, ref)
    for g, r in zip(torch.autograd.grad(y.sum(), (x, bias, a, b)),
                    torch.autograd.grad(ref.sum(), (x, bias, a, b)), strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("shape", EMPTY_LINEAR, ids=str)
def test_nf4_lora_linear_empty_dims(backend_device, shape):
    backend, device = backend_device
    x, w, bias, a, b = _linear_case(*shape)
    q, absmax = (t.to(device) for t in fastpeft.quantize_nf4(w, 16))
    x, bias, a, b = (t.to(device).requires_grad_() for t in (x, bias, a, b))
    with forced(backend):
        y = fastpeft.nf4_lora_linear(x, q, absmax, bias, a, b, 2.0, blocksize=16)
    ref = reference.nf4_lora_linear(x, q, absmax, bias, a, b, 2.0, blocksize=16)
    assert y.shape == (shape[0], shape[2])
    torch.testing.assert_close(y, ref)
    for g, r in zip(torch.autograd.grad(y.sum(), (x, bias, a, b)),
                    torch.autograd.grad(ref.sum(), (x, bias, a, b)), strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend_device", backend_params("bottleneck_adapter"))
@pytest.mark.parametrize(("t", "d"), [(0, 8), (4, 0)])
@pytest.mark.parametrize("ln", [False, True])
def test_bottleneck_adapter_empty_dims(backend_device, t, d, ln):
    backend, device = backend_device
    args = [torch.randn(t, d), torch.randn(3, d), torch.randn(3), torch.randn(d, 3),
            torch.randn(d)]
    args = [a.to(device).requires_grad_() for a in args]
    lnw = torch.randn(d, device=device, requires_grad=True) if ln else None
    with forced(backend):
        y = fastpeft.bottleneck_adapter(*args, ln_weight=lnw)
    ref = reference.bottleneck_adapter(*args, ln_weight=lnw)
    assert y.shape == (t, d)
    inputs = args + ([lnw] if ln else [])
    for g, r in zip(torch.autograd.grad(y.sum(), inputs, allow_unused=True),
                    torch.autograd.grad(ref.sum(), inputs, allow_unused=True), strict=True):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
@pytest.mark.parametrize(("b", "m", "n", "d"), [(0, 3, 5, 4), (1, 0, 5, 4), (1, 3, 5, 0),
                                                (1, 3, 0, 4)])
def test_gated_prefix_attention_empty_dims(backend_device, b, m, n, d):
    backend, device = backend_device
    q, k, v = torch.randn(b, 2, m, d), torch.randn(b, 2, n, d), torch.randn(b, 2, n, d)
    pk, pv, gate = torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, d), torch.randn(2)
    inputs = [t.to(device).requires_grad_() for t in (q, k, v, pk, pv, gate)]
    with forced(backend):
        y = fastpeft.gated_prefix_attention(*inputs)
    ref = reference.gated_prefix_attention(*inputs, scale=d**-0.5 if d else 1.0)
    assert y.shape == (b, 2, m, d)
    torch.testing.assert_close(y, ref)
    for g, r in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(ref.sum(), inputs),
                    strict=True):
        torch.testing.assert_close(g, r)


# --- 5. torch.func transforms ---------------------------------------------------------------


def test_torch_func_transforms_run_the_reference(monkeypatch):
    """The reference runs under every transform, with one warning per op and process."""
    monkeypatch.setattr(fastpeft._warn, "warned", set())
    x, w, bias, a, b = _linear_case(5, 8, 6)

    def loss(fn, a_):
        return fn(x, w, bias, a_, b, 2.0).square().sum()

    with pytest.warns(UserWarning, match="fastpeft.lora_linear: called under a torch.func"):
        g = torch.func.grad(lambda a_: loss(fastpeft.lora_linear, a_))(a)
    torch.testing.assert_close(g, torch.func.grad(lambda a_: loss(reference.lora_linear, a_))(a))
    batch = torch.randn(3, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        y = torch.func.vmap(lambda x_: fastpeft.lora_linear(x_, w, bias, a, b, 2.0))(batch)
        jac = torch.func.jacrev(lambda a_: fastpeft.lora_linear(x, w, bias, a_, b, 2.0))(a)
    torch.testing.assert_close(y, reference.lora_linear(batch, w, bias, a, b, 2.0))
    assert jac.shape == (5, 6, 2, 8)


@pytest.mark.parametrize("op", ["int8_lora_linear", "nf4_lora_linear",
                                "gated_prefix_attention", "bottleneck_adapter"])
def test_torch_func_grad_of_every_op(op, monkeypatch):
    monkeypatch.setattr(fastpeft._warn, "warned", set())
    if op == "int8_lora_linear":
        x, w, bias, a, b = _linear_case(5, 8, 6)
        q, s = fastpeft.quantize_int8(w)

        def call(mod, t):
            return mod.int8_lora_linear(x, q, s, bias, t, b, 2.0)

        arg = a
    elif op == "nf4_lora_linear":
        x, w, bias, a, b = _linear_case(5, 8, 6)
        q, absmax = fastpeft.quantize_nf4(w, 16)

        def call(mod, t):
            return mod.nf4_lora_linear(x, q, absmax, bias, t, b, 2.0, blocksize=16)

        arg = a
    elif op == "gated_prefix_attention":
        k, pk, gate = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(2)

        def call(mod, t):
            return mod.gated_prefix_attention(t, k, k, pk, pk, gate, scale=0.5)

        arg = torch.randn(1, 2, 3, 4)
    else:
        dw, uw = torch.randn(3, 8), torch.randn(8, 3)

        def call(mod, t):
            return mod.bottleneck_adapter(t, dw, None, uw, None)

        arg = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=f"fastpeft.{op}: called under a torch.func"):
        got = torch.func.grad(lambda t: call(fastpeft, t).square().sum())(arg)
    want = torch.func.grad(lambda t: call(reference, t).square().sum())(arg)
    torch.testing.assert_close(got, want)


# --- 6. messages ----------------------------------------------------------------------------


def test_scalar_messages():
    x = torch.randn(4, 8)
    dw, uw = torch.randn(3, 8), torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"ln_eps: expected a value > 0.0, got -1.0"):
        fastpeft.bottleneck_adapter(x, dw, None, uw, None, ln_weight=torch.ones(8), ln_eps=-1.0)
    with pytest.raises(ValueError, match=r"ln_eps: expected a value > 0.0, got 0.0"):
        fastpeft.bottleneck_adapter(x, dw, None, uw, None, ln_weight=torch.ones(8), ln_eps=0.0)
    _, w, bias, a, b = _linear_case(4, 8, 6)
    with pytest.raises(ValueError, match="scaling: expected a finite number, got nan"):
        fastpeft.lora_linear(x, w, bias, a, b, float("nan"))
    with pytest.raises(TypeError, match="scaling: expected a float, got str"):
        fastpeft.lora_linear(x, w, bias, a, b, "2")


def test_numpy_scalars_are_numbers():
    x, w, bias, a, b = _linear_case(4, 8, 6)
    want = fastpeft.lora_linear(x, w, bias, a, b, 2.0)
    for value in (np.float32(2.0), np.float64(2.0), np.int64(2)):
        torch.testing.assert_close(fastpeft.lora_linear(x, w, bias, a, b, value), want)
    y = fastpeft.lora_linear(x, w, bias, a, b, 2.0, dropout_p=np.float32(0.25))
    assert y.shape == (4, 6)


def test_dtype_mismatch_names_the_odd_one_out():
    x, w, bias, a, b = _linear_case(4, 8, 6)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 \(like weight"):
        fastpeft.lora_linear(x.half(), w, bias, a, b, 2.0)
    with pytest.raises(TypeError, match=r"lora_B: expected dtype torch.float32"):
        fastpeft.lora_linear(x, w, bias, a, b.double(), 2.0)
    q, s = fastpeft.quantize_int8(w)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32"):
        fastpeft.int8_lora_linear(x.bfloat16(), q, s, bias, a, b, 2.0)


def test_flags_and_dtypes_are_checked():
    """A flag given a truthy str, a gated-attention tensor of another dtype (the odd one
    named, not the next checked), an integer dtype for a layer or a dequantisation."""
    x, w, bias, a, b = _linear_case(4, 8, 6)
    for op_training in ("no", None, 2):
        with pytest.raises(TypeError, match="training: expected a bool"):
            fastpeft.lora_linear(x, w, bias, a, b, 2.0, 0.5, op_training)
    q, s = fastpeft.quantize_int8(w)
    with pytest.raises(TypeError, match="training: expected a bool"):
        fastpeft.int8_lora_linear(x, q, s, bias, a, b, 2.0, 0.5, "yes")
    torch.testing.assert_close(fastpeft.lora_linear(x, w, bias, a, b, 2.0, 0.5, 0),
                               fastpeft.lora_linear(x, w, bias, a, b, 2.0))
    k, pk = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match=r"^q: expected dtype torch.float32 \(like k, v"):
        fastpeft.gated_prefix_attention(torch.randn(1, 2, 3, 4).bfloat16(), k, k, pk, pk,
                                        torch.zeros(2))
    with pytest.raises(TypeError, match="causal: expected a bool"):
        fastpeft.gated_prefix_attention(pk, k, k, pk, pk, torch.zeros(2), causal="no")
    for make in (lambda: fastpeft.LoRALinear(torch.nn.Linear(8, 6), 2, dtype=torch.int8),
                 lambda: fastpeft.BottleneckAdapter(8, 2, dtype=torch.int64),
                 lambda: fastpeft.dequantize_nf4(*fastpeft.quantize_nf4(w, 16), 16,
                                                 torch.int32)):
        with pytest.raises(TypeError, match=r"dtype: expected a floating-point torch.dtype"):
            make()


def test_meta_tensors_give_shapes():
    """On the meta device (shape inference, memory estimates) every op and module gives
    its output's shape, forward and backward: the registered ops' fakes run (the
    reference could not draw a dropout seed there)."""
    m = {"device": "meta"}
    x = torch.randn(3, 8, **m, requires_grad=True)
    w, a, b = torch.randn(10, 8, **m), torch.randn(2, 8, **m), torch.randn(10, 2, **m)
    ids = torch.tensor([0, 2, -1], **m)
    calls = {
        "lora_linear": lambda: fastpeft.lora_linear(x, w, None, a, b, 2.0, 0.1),
        "int8_lora_linear": lambda: fastpeft.int8_lora_linear(
            x, torch.zeros(10, 8, dtype=torch.int8, **m), torch.ones(10, **m), None, a, b,
            2.0, 0.1),
        "nf4_lora_linear": lambda: fastpeft.nf4_lora_linear(
            x, torch.zeros(10, 4, dtype=torch.uint8, **m), torch.ones(2, **m), None, a, b,
            2.0, 0.1, True, 64),
        "multi_lora_linear": lambda: fastpeft.multi_lora_linear(
            x, w, None, torch.randn(3, 2, 8, **m), torch.randn(3, 10, 2, **m),
            torch.ones(3, **m), ids, 0.1),
        "bottleneck_adapter": lambda: fastpeft.bottleneck_adapter(
            x, torch.randn(4, 8, **m), None, torch.randn(8, 4, **m), None),
        "LoRALinear": lambda: fastpeft.LoRALinear(torch.nn.Linear(8, 10, **m), 2,
                                                  lora_dropout=0.1)(x),
        "BottleneckAdapter": lambda: fastpeft.BottleneckAdapter(8, 4, **m)(x),
    }
    for name, call in calls.items():
        y = call()
        assert y.is_meta and y.shape[:-1] == (3,), name
        y.sum().backward()
    q = torch.randn(1, 2, 3, 4, **m, requires_grad=True)
    k, p = torch.randn(1, 2, 5, 4, **m), torch.randn(1, 2, 3, 4, **m)
    y = fastpeft.gated_prefix_attention(q, k, k, p, p, torch.zeros(2, **m))
    assert y.is_meta and y.shape == q.shape
    y.sum().backward()


def test_float64_activations_need_a_float64_layer():
    linear = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8, dtype=torch.float64)
    for layer in (fastpeft.LoRALinear(linear, 2, 4),
                  fastpeft.Int8LoRALinear.from_linear(linear, 2, 4)):
        with pytest.raises(TypeError, match="x: expected"):
            layer(x)
        assert layer.double()(x).dtype == torch.float64


# --- 7. a trainable weight_scale is refused -------------------------------------------------


def test_trainable_weight_scale_is_refused():
    x, w, bias, a, b = _linear_case(4, 8, 6)
    q, s = fastpeft.quantize_int8(w)
    with pytest.raises(ValueError, match="weight_scale: the quantised base is frozen"):
        fastpeft.int8_lora_linear(x, q, s.requires_grad_(), bias, a, b, 2.0)


# --- 9. the notice when the compiled kernels are missing ------------------------------------

_HIDE_C = """
import importlib.util, warnings
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "fastpeft._C" else find(name, *a)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastpeft
mine = [str(w.message) for w in caught if "fastpeft" in str(w.message)]
print(len(mine)); print(mine[0] if mine else "")
print(fastpeft.available_backends("lora_linear"))
"""


def _import_without_prebuilt(**env: str) -> list[str]:
    """Import fastpeft in a fresh process that cannot see the prebuilt ``fastpeft._C``."""
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", _HIDE_C], capture_output=True, text=True,
                          check=True, timeout=120, env=full).stdout.splitlines()


def test_missing_kernels_notice_without_jit():
    out = _import_without_prebuilt(FASTPEFT_NO_JIT="1")
    assert out[0] == "1", out
    assert "no prebuilt fastpeft._C is installed" in out[1]
    assert "FASTPEFT_NO_JIT=1" in out[1] and "pip install --no-build-isolation" in out[1]
    assert "circular" not in out[1]
    assert "'cpu'" not in out[2]


def test_missing_kernels_notice_without_compiler(tmp_path):
    out = _import_without_prebuilt(CXX=str(tmp_path / "no-such-compiler"), PATH=str(tmp_path),
                                   FASTPEFT_CACHE_DIR=str(tmp_path / "cache"))
    assert out[0] == "1", out
    assert "no C++ compiler found" in out[1] and "reference path" in out[1]
    assert "'cpu'" not in out[2]


_FALLBACK = """
import importlib.util
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "fastpeft._C" else find(name, *a)
import torch, fastpeft
assert not fastpeft._backend.native_available()
g = torch.Generator().manual_seed(0)
w = torch.randn(6, 8, generator=g)
q8, s8 = fastpeft.quantize_int8(w)
q4, am = fastpeft.quantize_nf4(w, 16)
ids = torch.tensor([1, -1, 0, 1])
calls = {
    "lora_linear": lambda x, b, a, bb: fastpeft.lora_linear(x, w, b, a, bb, 0.5, 0.25),
    "int8_lora_linear": lambda x, b, a, bb: fastpeft.int8_lora_linear(x, q8, s8, b, a, bb, 0.5),
    "nf4_lora_linear": lambda x, b, a, bb: fastpeft.nf4_lora_linear(x, q4, am, b, a, bb, 0.5,
                                                                    blocksize=16),
    "multi_lora_linear": lambda x, b, a, bb: fastpeft.multi_lora_linear(
        x, w, b, a.expand(2, -1, -1), bb.expand(2, -1, -1), torch.tensor([0.5, 2.0]), ids),
}
inputs = [torch.randn(shape, generator=g) for shape in [(4, 8), (6,), (2, 8), (6, 2)]]
for name, call in calls.items():
    assert "triton" in fastpeft.available_backends(name), name
    grads = {}
    for backend in ("triton", "reference"):
        ts = [t.clone().requires_grad_() for t in inputs]
        with fastpeft.use_backend(backend):
            torch.manual_seed(3)
            y = call(*ts)
            y.square().sum().backward()
        grads[backend] = [y.detach()] + [t.grad for t in ts]
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print(name, "ok")
# the bottleneck adapter's Python formulas (its C++ autograd is the library's too), with a
# layer norm and a residual of its own, then without either
bottleneck = [torch.randn(shape, generator=g) for shape in
              [(5, 8), (3, 8), (3,), (8, 3), (8,), (8,), (8,), (5, 8)]]
for ln in (True, False):
    grads = {}
    for backend in ("triton", "reference"):
        ts = [t.clone().requires_grad_() for t in bottleneck]
        x, dw, db, uw, ub, lw, lb, res = ts
        with fastpeft.use_backend(backend):
            y = fastpeft.bottleneck_adapter(
                x, dw, db, uw, ub, activation="silu", scaling=0.5,
                residual=res if ln else None, ln_weight=lw if ln else None,
                ln_bias=lb if ln else None)
            y.square().sum().backward()
        grads[backend] = [y.detach()] + [t.grad for t in ts]
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
print("bottleneck_adapter", "ok")
"""


def test_linear_ops_train_on_triton_without_the_compiled_library():
    """Where fastpeft._C could not be built (and so the LoRA linear ops' C++ autograd is
    missing), their Triton variants still run, with the same convention's Python autograd
    (_library._linear_fallback): output and every gradient as the reference's; so does the
    bottleneck adapter's, with its spec's Python formulas."""
    pytest.importorskip("triton")
    env = dict(os.environ, FASTPEFT_NO_JIT="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _FALLBACK],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["lora_linear", "ok", "int8_lora_linear", "ok",
                                  "nf4_lora_linear", "ok", "multi_lora_linear", "ok",
                                  "bottleneck_adapter", "ok"]


def test_double_backward_names_the_op():
    if "cpu" not in fastpeft.available_backends("lora_linear"):
        pytest.skip("fastpeft._C not built (the reference is differentiable twice)")
    x, w, bias, a, b = (t.requires_grad_() for t in _linear_case(4, 8, 6))
    with forced("cpu"):
        y = fastpeft.lora_linear(x, w.detach(), bias, a, b, 2.0)
    (ga,) = torch.autograd.grad(y.square().sum(), (a,), create_graph=True)
    with pytest.raises(RuntimeError, match=r"fastpeft.lora_linear: its backward has no"):
        torch.autograd.grad(ga.sum(), (b,))


# --- modules under autocast ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "int8"])
def test_modules_follow_autocast(kind):
    """Under CPU autocast (bf16), as nn.Linear: bf16 or fp32 activations into an fp32 layer
    compute in bf16 and return bf16, with gradients for the fp32 LoRA weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 12)
    layer = (fastpeft.LoRALinear(linear, 4, 8) if kind == "lora"
             else fastpeft.Int8LoRALinear.from_linear(linear, 4, 8))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    want = layer(x)
    for given in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(given)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, atol=0.1, rtol=0.05)
        y.float().sum().backward()
        assert layer.lora_A.weight.grad is not None
        assert layer.lora_A.weight.grad.dtype == torch.float32
        layer.zero_grad()
