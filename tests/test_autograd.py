"""Autograd behaviour shared by the ops, on every backend: one autograd per op, registered
on the native and the Triton variants alike (C++ for the LoRA linear ops,
csrc/linear_autograd.cpp; Python for the others, fastpeft/ops/<op>.py), which must behave
the same whichever kernels run under it."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params, forced

import fastpeft


def _rg(*shape, device="cpu"):
    return torch.randn(*shape).to(device).requires_grad_()


# Each case: the public call on fresh inputs (the tensors that require grad first) and the
# registered native op with the same arguments, whose outputs past the first are saved for
# the backward only.
def _lora_linear(dev):
    x, a, b, bias = _rg(3, 8, device=dev), _rg(2, 8, device=dev), _rg(6, 2, device=dev), \
        _rg(6, device=dev)
    w = torch.randn(6, 8, device=dev)
    return (x, a, b, bias), lambda: fastpeft.lora_linear(x, w, bias, a, b, 0.5, 0.25), \
        lambda: torch.ops.fastpeft.lora_linear(x, w, bias, a, b, 0.5, 0.0, None)


def _int8_lora_linear(dev):
    x, a, b, bias = _rg(3, 8, device=dev), _rg(2, 8, device=dev), _rg(6, 2, device=dev), \
        _rg(6, device=dev)
    q, s = fastpeft.quantize_int8(torch.randn(6, 8, device=dev))
    return (x, a, b, bias), lambda: fastpeft.int8_lora_linear(x, q, s, bias, a, b, 0.5, 0.25), \
        lambda: torch.ops.fastpeft.int8_lora_linear(x, q, s, bias, a, b, 0.5, 0.0, None)


def _nf4_lora_linear(dev):
    x, a, b, bias = _rg(3, 8, device=dev), _rg(2, 8, device=dev), _rg(6, 2, device=dev), \
        _rg(6, device=dev)
    q, am = fastpeft.quantize_nf4(torch.randn(6, 8, device=dev), 16)
    return (x, a, b, bias), \
        lambda: fastpeft.nf4_lora_linear(x, q, am, bias, a, b, 0.5, 0.25, blocksize=16), \
        lambda: torch.ops.fastpeft.nf4_lora_linear(x, q, am, bias, a, b, 0.5, 0.0, None, 16)


def _multi_lora_linear(dev):
    x, a, b, bias = _rg(4, 8, device=dev), _rg(3, 2, 8, device=dev), _rg(3, 6, 2, device=dev), \
        _rg(6, device=dev)
    w = torch.randn(6, 8, device=dev)
    s, ids = torch.tensor([0.5, 2.0, 1.0], device=dev), torch.tensor([2, -1, 0, 2], device=dev)
    return (x, a, b, bias), \
        lambda: fastpeft.multi_lora_linear(x, w, bias, a, b, s, ids, 0.25), \
        lambda: torch.ops.fastpeft.multi_lora_linear(x, w, bias, a, b, s, ids, 0.0, None)


def _gated_prefix_attention(dev):
    inputs = tuple(_rg(*shape, device=dev) for shape in
                   [(1, 2, 3, 16)] * 3 + [(1, 2, 2, 16)] * 2 + [(2,)])
    return inputs, lambda: fastpeft.gated_prefix_attention(*inputs), \
        lambda: torch.ops.fastpeft.gated_prefix_attention(*inputs, None, True, 0.25, False)


def _bottleneck_adapter(dev):
    inputs = tuple(_rg(*shape, device=dev) for shape in [(3, 8), (4, 8), (4,), (8, 4), (8,),
                                                         (8,)])
    x, dw, db, uw, ub, lw = inputs
    return inputs, \
        lambda: fastpeft.bottleneck_adapter(x, dw, db, uw, ub, activation="silu", ln_weight=lw), \
        lambda: torch.ops.fastpeft.bottleneck_adapter(x, dw, db, uw, ub, None, lw, None, "silu",
                                                      1.0, 1e-5)


CASES = {
    "lora_linear": _lora_linear,
    "int8_lora_linear": _int8_lora_linear,
    "nf4_lora_linear": _nf4_lora_linear,
    "multi_lora_linear": _multi_lora_linear,
    "gated_prefix_attention": _gated_prefix_attention,
    "bottleneck_adapter": _bottleneck_adapter,
}
PARAMS = [pytest.param(op, *bd.values, id=f"{op}-{bd.id}", marks=bd.marks)
          for op in CASES for bd in backend_params(op)]


class _NoGrad(torch.autograd.Function):
    """Passes y through and sends no gradient back (a stop-gradient inside a custom
    Function): the op's backward then sees an undefined gradient for y."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize(("op", "backend_device"), PARAMS)
def test_undefined_output_gradient_gives_zero_gradients(op, backend_device):
    """As autograd.Function does (and so the Triton variants), the inputs get zero
    gradients, not none."""
    backend, device = backend_device
    inputs, call, _ = CASES[op](device)
    with forced(backend):
        y = call()
    grads = torch.autograd.grad(_NoGrad.apply(y).sum() + inputs[0].sum(), inputs)
    assert torch.equal(grads[0], torch.ones_like(inputs[0]))
    for g, t in zip(grads[1:], inputs[1:], strict=True):
        assert torch.equal(g, torch.zeros_like(t))


def _native_ops() -> list[str]:
    return [op for op in CASES if "cpu" in fastpeft.available_backends(op)]


@pytest.mark.parametrize("op", _native_ops())
def test_saved_only_outputs_need_no_gradient(op):
    """The outputs a native op returns for its backward (xa, log-sum-exps, layer-norm
    statistics) do not require grad, as with register_autograd's
    mark_non_differentiable."""
    _, _, raw = CASES[op]("cpu")
    outputs = raw()
    assert outputs[0].requires_grad
    assert not any(t.requires_grad for t in outputs[1:])


@pytest.mark.parametrize("op", _native_ops())
def test_compiled_autograd_matches_eager(op):
    """An eager forward with a compiled backward (compiled autograd) gives the eager
    gradients: compiled autograd traces the ops' Python backward and the backward ops."""
    inputs, call, _ = CASES[op]("cpu")
    torch.manual_seed(7)
    eager = torch.autograd.grad(call().square().sum(), inputs)
    torch.manual_seed(7)
    loss = call().square().sum()
    torch._dynamo.reset()

    def backward():
        return torch.autograd.grad(loss, inputs)

    with torch._dynamo.config.patch(compiled_autograd=True):
        compiled = torch.compile(backward, backend="eager")()
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize(("op", "backend_device"), PARAMS)
def test_double_backward_is_refused(op, backend_device):
    """The backward kernels have no derivative, so a second derivative must raise, not come
    out as zero: the native ops refuse the create_graph backward itself, the Triton
    variants the differentiation of its result."""
    backend, device = backend_device
    inputs, call, _ = CASES[op](device)
    with forced(backend):
        y = call()
    with pytest.raises(RuntimeError, match="backward"):
        grads = torch.autograd.grad(y.square().sum(), inputs, create_graph=True)
        torch.autograd.grad(grads[0].sum(), inputs[1])


@pytest.mark.parametrize(("op", "backend_device"), PARAMS)
def test_activation_checkpointing_matches_eager(op, backend_device):
    """torch.utils.checkpoint (non-reentrant) recomputes the forward in the backward and
    gives the eager gradients, dropout mask included (the seed is drawn from the
    generator state checkpoint restores)."""
    from torch.utils.checkpoint import checkpoint

    backend, device = backend_device
    inputs, call, _ = CASES[op](device)
    with forced(backend):
        torch.manual_seed(5)
        eager = torch.autograd.grad(call().square().sum(), inputs)
        torch.manual_seed(5)
        y = checkpoint(call, use_reentrant=False)
        ckpt = torch.autograd.grad(y.square().sum(), inputs)
    for e, c in zip(eager, ckpt, strict=True):
        torch.testing.assert_close(c, e)


_LINEAR_PARAMS = [p for p in PARAMS if p.values[0] in
                  ("lora_linear", "int8_lora_linear", "nf4_lora_linear", "multi_lora_linear")]


@pytest.mark.parametrize(("op", "backend_device"),
                         [p for p in _LINEAR_PARAMS
                          if p.values[0] in ("int8_lora_linear", "multi_lora_linear")])
def test_linear_ops_refuse_a_frozen_argument_that_requires_grad(op, backend_device):
    """The LoRA linear ops' C++ autograd gives gradients to x, weight, bias, lora_A and
    lora_B only: int8's weight scales or multi_lora_linear's per-adapter scaling requiring
    grad would silently get none, so the registered op refuses it by name (the NF4 absmax
    has the same check; lora_linear has no such argument)."""
    backend, device = backend_device
    suffix = "_triton" if backend == "triton" else ""
    x = torch.randn(3, 8, device=device, requires_grad=True)
    a, b = torch.randn(2, 8, device=device), torch.randn(6, 2, device=device)
    if op == "int8_lora_linear":
        q, scale = fastpeft.quantize_int8(torch.randn(6, 8, device=device))
        args, name = (x, q, scale.requires_grad_(), None, a, b, 0.5, 0.0, None), "weight_scale"
    else:
        w = torch.randn(6, 8, device=device)
        scaling = torch.tensor([0.5], device=device, requires_grad=True)
        ids = torch.zeros(3, dtype=torch.int64, device=device)
        args, name = (x, w, None, a[None], b[None], scaling, ids, 0.0, None), "scaling"
    with pytest.raises(RuntimeError, match=f"{name} gets no gradient"):
        getattr(torch.ops.fastpeft, op + suffix)(*args)


def _linear_call(op: str, device: str):
    """``f(x, bias, lora_A, lora_B)``: ``op`` on a fixed frozen base (6 x 8, rank 2)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 8, generator=g).to(device)
    if op == "lora_linear":
        return lambda x, bias, a, b: fastpeft.lora_linear(x, w, bias, a, b, 0.5)
    if op == "int8_lora_linear":
        q, s = fastpeft.quantize_int8(w)
        return lambda x, bias, a, b: fastpeft.int8_lora_linear(x, q, s, bias, a, b, 0.5)
    if op == "nf4_lora_linear":
        q, am = fastpeft.quantize_nf4(w, 16)
        return lambda x, bias, a, b: fastpeft.nf4_lora_linear(x, q, am, bias, a, b, 0.5,
                                                              blocksize=16)
    s = torch.tensor([0.5, 2.0, 1.0], device=device)
    ids = torch.tensor([2, -1, 0, 2], device=device)
    return lambda x, bias, a, b: fastpeft.multi_lora_linear(
        x, w, bias, a.expand(3, -1, -1), b.expand(3, -1, -1), s, ids)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize(("op", "backend_device"), _LINEAR_PARAMS)
def test_linear_ops_gradients_of_each_subset(op, backend_device, has_bias):
    """Every subset of x, bias, lora_A, lora_B requiring grad (with and without a bias,
    whose absence shifts the autograd edges) gets the reference's gradients, and the
    others none."""
    backend, device = backend_device
    f = _linear_call(op, device)
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(shape, generator=g).to(device) for shape in [(4, 8), (6,), (2, 8), (6, 2)]]
    if not has_bias:
        base[1] = None
    names = ["x", "bias", "lora_A", "lora_B"]
    for mask in range(1, 16):
        wanted = [bool(mask >> i & 1) and t is not None for i, t in enumerate(base)]
        if not any(wanted):
            continue
        grads = {}
        for name in (backend, "reference"):
            ts = [None if t is None else t.clone().requires_grad_(w)
                  for t, w in zip(base, wanted, strict=True)]
            with forced(name):
                f(*ts).square().sum().backward()
            grads[name] = [None if t is None else t.grad for t in ts]
        for n, w, got, ref in zip(names, wanted, grads[backend], grads["reference"],
                                  strict=True):
            if not w:
                assert got is None, n
            else:
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=n)
