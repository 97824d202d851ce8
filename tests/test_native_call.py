"""The LoRA linear ops' usual eager CPU call in C++ (``fastpeft._C.<op>_call``,
``fastpeft/csrc/calls.cpp``), which the public functions try before their Python path:

* for the usual call it gives the Python path's output and gradients, the same bits, with
  the same dropout masks from the same ``torch.manual_seed``, for every shape of x, with
  and without bias, in training and eval, for a transposed base weight;
* it declines (returns None) every call it does not take: anything unusual about an
  argument, a tensor subclass, a non-CPU tensor, an empty tensor, a torch.func transform
  or a torch function mode in force; the Python path then checks and names the argument;
* the public function asks it only when it is not compiled and the backend in force runs
  the native ops.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastpeft
from fastpeft import _backend

OPS = ("lora_linear", "int8_lora_linear", "nf4_lora_linear", "multi_lora_linear")
pytestmark = pytest.mark.skipif(
    _backend.native_call("lora_linear") is _backend._declined,
    reason="fastpeft._C (the C++ kernels) is not built",
)

IN, OUT, R = 64, 48, 4


def _args(op: str, lead: tuple[int, ...], dtype=torch.float32, bias=True, p=0.1,
          training=True, transposed=False) -> list:
    """A usual call's arguments of ``op`` (x, the base, bias, the adapters, the scalars)."""
    x = torch.randn(*lead, IN, dtype=dtype, requires_grad=True)
    w = torch.randn(OUT, IN, dtype=dtype) / IN**0.5
    if transposed:
        w = w.t().contiguous().t()
    b = torch.randn(OUT, dtype=dtype, requires_grad=True) if bias else None
    if op == "multi_lora_linear":
        n = 3
        a = (torch.randn(n, R, IN, dtype=dtype) / 8).requires_grad_()
        bb = (torch.randn(n, OUT, R, dtype=dtype) / 8).requires_grad_()
        ids = torch.randint(-1, n, lead)
        return [x, w, b, a, bb, torch.tensor([2.0, 0.5, 1.0]), ids, p, training]
    a = (torch.randn(R, IN, dtype=dtype) / 8).requires_grad_()
    bb = (torch.randn(OUT, R, dtype=dtype) / 8).requires_grad_()
    if op == "lora_linear":
        return [x, w, b, a, bb, 2.0, p, training]
    if op == "int8_lora_linear":
        q, scale = fastpeft.quantize_int8(w.float())
        return [x, q, scale, b, a, bb, 2.0, p, training]
    q, absmax = fastpeft.quantize_nf4(w.float(), 16)
    return [x, q, absmax, b, a, bb, 2.0, p, training, 16]


def _public(op: str):
    return getattr(fastpeft, op)


def _module(op: str):
    return importlib.import_module(f"fastpeft.ops.{op}")


def _run(op: str, args: list, seed: int = 7):
    """Output and gradients of the public function (whichever path it takes)."""
    torch.manual_seed(seed)
    y = _public(op)(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    return y.detach(), grads


CASES = {"dropout": {}, "eval": {"training": False}, "no-bias": {"bias": False, "p": 0.0},
         "transposed": {"transposed": True}, "bf16": {"dtype": torch.bfloat16}}
FLOAT_BASE = ("lora_linear", "multi_lora_linear")  # the ops whose base may be a view


@pytest.mark.parametrize(("op", "case"), [(op, case) for op in OPS for case in CASES
                                          if case != "transposed" or op in FLOAT_BASE])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)], ids=str)
def test_same_as_the_python_path(op, lead, case, monkeypatch):
    options = CASES[case]
    args = _args(op, lead, **options)
    native = _backend.native_call(op)
    torch.manual_seed(7)
    assert native(*args) is not None, "the usual call was declined"
    y, grads = _run(op, args)
    monkeypatch.setattr(_module(op), "_NATIVE_CALL", _backend._declined)
    y_py, grads_py = _run(op, args)
    assert y.shape == y_py.shape == (*lead, OUT)
    assert torch.equal(y, y_py)
    for g, g_py in zip(grads, grads_py, strict=True):
        assert torch.equal(g, g_py)


@pytest.mark.parametrize("op", OPS)
def test_the_public_function_takes_it(op, monkeypatch):
    calls = []
    native = _backend.native_call(op)

    def spy(*args):
        y = native(*args)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(_module(op), "_NATIVE_CALL", spy)
    args = _args(op, (3,))
    _public(op)(*args)
    assert calls == [True]
    with fastpeft.use_backend("reference"):  # not the native ops: not asked
        _public(op)(*args)
    assert calls == [True]


def _bad_variants(op: str) -> dict[str, list]:
    """Arguments the C++ call must decline, by what is unusual about them."""
    base = _args(op, (3,))
    scalars = {"lora_linear": 5, "int8_lora_linear": 6, "nf4_lora_linear": 6}
    variants = {}

    def variant(name, i, value):
        args = list(base)
        args[i] = value
        variants[name] = args

    x = base[0]
    variant("x as a subclass", 0, x.detach().as_subclass(_Sub).requires_grad_())
    variant("x of ints", 0, torch.ones(3, IN, dtype=torch.int64))
    variant("x of the wrong width", 0, torch.randn(3, IN + 1))
    variant("x in float64 against a float32 layer", 0, torch.randn(3, IN, dtype=torch.float64))
    variant("empty x", 0, torch.randn(0, IN))
    variant("x on the meta device", 0, torch.randn(3, IN, device="meta"))
    variant("x a list", 0, [[0.0] * IN] * 3)
    with warnings.catch_warnings():  # (nested tensors are a prototype)
        warnings.simplefilter("ignore")
        variant("x nested", 0, torch.nested.nested_tensor([torch.randn(2, IN),
                                                           torch.randn(3, IN)]))
    bias_at = 3 if op in ("int8_lora_linear", "nf4_lora_linear") else 2
    variant("bias of the wrong length", bias_at, torch.randn(OUT + 1))
    training_at = len(base) - (2 if op == "nf4_lora_linear" else 1)
    variant("training an int", training_at, 1)
    variant("dropout_p an int", training_at - 1, 0)
    variant("dropout_p of 1", training_at - 1, 1.0)
    if op in scalars:
        variant("scaling an int", scalars[op], 2)
        variant("scaling infinite", scalars[op], float("inf"))
    if op == "nf4_lora_linear":
        variant("blocksize not a power of two", 9, 24)
        variant("blocksize a bool", 9, True)
        variant("absmax too short", 2, base[2][:-1])
    if op == "int8_lora_linear":
        variant("qweight as uint8", 1, base[1].view(torch.uint8))
    if op == "multi_lora_linear":
        variant("ids of the wrong shape", 6, base[6][:2])
        variant("ids as int32", 6, base[6].int())
        variant("scaling of the wrong length", 5, base[5][:2])
        variant("scaling a float", 5, 2.0)
    return variants


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("op", OPS)
def test_declines_every_unusual_call(op):
    native = _backend.native_call(op)
    for name, args in _bad_variants(op).items():
        assert native(*args) is None, name
    assert native(*_args(op, (3,))[:-1]) is None, "one argument short"


@pytest.mark.parametrize("op", OPS)
def test_declines_under_transforms_and_modes(op):
    native = _backend.native_call(op)
    args = _args(op, (3,))

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert native(*args) is None
    with torch.device("meta"):  # a torch function mode too
        assert native(*args) is None

    seen = []

    def f(x):
        seen.append(native(x, *args[1:]))
        return x.sum()

    torch.func.grad(f)(args[0].detach())
    assert seen == [None]
    assert native(*args) is not None


def test_declined_bad_arguments_are_still_named():
    x, w, b, a, bb = torch.randn(3, IN), torch.randn(OUT, IN), None, torch.randn(R, IN), \
        torch.randn(OUT, R + 1)
    with pytest.raises(ValueError, match="lora_B"):
        fastpeft.lora_linear(x, w, b, a, bb, 2.0)


def test_out_of_range_ids_are_refused_on_this_path():
    args = _args("multi_lora_linear", (3,))
    args[6] = torch.tensor([0, 3, -1])
    with pytest.raises(ValueError, match="adapter_ids"):
        _backend.native_call("multi_lora_linear")(*args)


def test_declines_when_the_kernels_lack_it(monkeypatch):
    monkeypatch.setattr(_backend, "native_module", None)
    assert _backend.native_call("lora_linear") is _backend._declined


# --- the bottleneck adapter ------------------------------------------------------------------
# bottleneck_adapter_call takes the public function's arguments positionally: x, down_weight,
# down_bias, up_weight, up_bias, activation, residual, scaling, ln_weight, ln_bias, ln_eps.

D, M = 24, 6
BOTTLENECK_CASES = {"plain": {}, "layer norm": {"ln": True}, "residual": {"residual": True},
                    "no biases": {"bias": False}, "bf16": {"dtype": torch.bfloat16},
                    "gelu_tanh + all": {"activation": "gelu_tanh", "ln": True,
                                        "residual": True}}


def _bottleneck_args(lead: tuple[int, ...], dtype=torch.float32, ln=False, residual=False,
                     bias=True, activation="silu") -> list:
    def rg(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()

    return [rg(*lead, D), rg(M, D, scale=D**-0.5), rg(M) if bias else None,
            rg(D, M, scale=M**-0.5), rg(D) if bias else None, activation,
            rg(*lead, D) if residual else None, 0.5, rg(D) if ln else None,
            rg(D) if ln else None, 1e-5]


def _bottleneck_public(args: list) -> torch.Tensor:
    x, dw, db, uw, ub, act, res, s, lw, lb, eps = args
    return fastpeft.bottleneck_adapter(x, dw, db, uw, ub, activation=act, residual=res,
                                       scaling=s, ln_weight=lw, ln_bias=lb, ln_eps=eps)


def _bottleneck_module():
    return importlib.import_module("fastpeft.ops.bottleneck_adapter")


@pytest.mark.parametrize("case", BOTTLENECK_CASES)
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)], ids=str)
def test_bottleneck_same_as_the_python_path(lead, case, monkeypatch):
    args = _bottleneck_args(lead, **BOTTLENECK_CASES[case])
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    assert _backend.native_call("bottleneck_adapter")(*args) is not None, "declined"
    outputs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(_bottleneck_module(), "_NATIVE_CALL", _backend._declined)
        y = _bottleneck_public(args)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        outputs.append((y.detach(), grads))
    (y, grads), (y_py, grads_py) = outputs
    assert y.shape == y_py.shape == (*lead, D)
    assert torch.equal(y, y_py)
    for g, g_py in zip(grads, grads_py, strict=True):
        assert torch.equal(g, g_py)


def test_bottleneck_the_public_function_and_the_module_take_it(monkeypatch):
    calls = []
    native = _backend.native_call("bottleneck_adapter")

    def spy(*args):
        y = native(*args)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(_bottleneck_module(), "_NATIVE_CALL", spy)
    _bottleneck_public(_bottleneck_args((3,)))
    layer = fastpeft.BottleneckAdapter(D, M, "silu", layer_norm=True)
    layer(torch.randn(2, 3, D))
    assert calls == [True, True]
    with fastpeft.use_backend("reference"):  # not the native ops: not asked
        _bottleneck_public(_bottleneck_args((3,)))
    assert calls == [True, True]


def test_bottleneck_declines_every_unusual_call():
    native = _backend.native_call("bottleneck_adapter")
    base = _bottleneck_args((3,), ln=True, residual=True)
    variants = {
        "x as a subclass": (0, base[0].detach().as_subclass(_Sub)),
        "x of the wrong width": (0, torch.randn(3, D + 1)),
        "x in float64 against float32 weights": (0, torch.randn(3, D, dtype=torch.float64)),
        "empty x": (0, torch.randn(0, D)),
        "x on the meta device": (0, torch.randn(3, D, device="meta")),
        "down_weight without rows": (1, torch.randn(0, D)),
        "down_weight 1-D": (1, torch.randn(D)),
        "down_bias of the wrong length": (2, torch.randn(M + 1)),
        "up_weight transposed": (3, torch.randn(M, D)),
        "up_bias of the wrong length": (4, torch.randn(D - 1)),
        "an unknown activation": (5, "tanh"),
        "activation not a str": (5, None),
        "residual of another shape": (6, torch.randn(2, D)),
        "residual of another dtype": (6, torch.randn(3, D, dtype=torch.float64)),
        "scaling an int": (7, 2),
        "scaling infinite": (7, float("inf")),
        "ln_weight of the wrong length": (8, torch.randn(D + 2)),
        "ln_bias without ln_weight": (8, None),
        "ln_eps zero": (10, 0.0),
        "ln_eps an int": (10, 1),
    }
    for name, (i, value) in variants.items():
        args = list(base)
        args[i] = value
        assert native(*args) is None, name
    assert native(*base[:-1]) is None, "one argument short"
    assert native(*base) is not None


def test_bottleneck_declined_bad_arguments_are_still_named():
    args = _bottleneck_args((3,))
    args[3] = torch.randn(M, D)  # up_weight transposed
    with pytest.raises(ValueError, match="up_weight"):
        _bottleneck_public(args)
    args = _bottleneck_args((3,))
    args[9] = torch.randn(D)  # ln_bias without ln_weight
    with pytest.raises(ValueError, match="ln_bias"):
        _bottleneck_public(args)


def test_bottleneck_autograd_gives_each_subset_its_gradients():
    """The C++ autograd (csrc/bottleneck_autograd.cpp): each tensor that requires grad gets
    the reference's gradient and the others none, whichever optional tensors are given."""
    torch.manual_seed(0)
    full = _bottleneck_args((4,), dtype=torch.float64, ln=True, residual=True)
    tensors = [i for i, a in enumerate(full) if isinstance(a, torch.Tensor)]
    for mask in range(1, 1 << len(tensors), 7):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in full]
        wanted = [i for k, i in enumerate(tensors) if mask >> k & 1]
        for i in wanted:
            args[i].requires_grad_()
        leaves = [args[i] for i in wanted]
        y = _bottleneck_public(args)
        got = torch.autograd.grad(y, leaves, torch.ones_like(y))
        with fastpeft.use_backend("reference"):
            want = torch.autograd.grad(_bottleneck_public(args), leaves, torch.ones_like(y))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
