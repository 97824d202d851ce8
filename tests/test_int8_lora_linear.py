"""fastpeft.quantize_int8 / int8_lora_linear / Int8LoRALinear against the reference on the
dequantised weight, and against bitsandbytes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    TRITON_INTERPRETED,
    assert_close_to_ref,
    backend_params,
    dtypes_for,
    forced,
    skip_without_fp64_kernels,
)
from torch import nn

import fastpeft
from fastpeft import reference
from fastpeft.ops._linear import draw_seed

# (leading dims, in, out, r): the small-batch (decode) path at T = 1, 16 and 17 (on the
# CPU the GEMV, in 1, 4 and 5 passes; the tile kernel, used without it, stops at 16), the
# blocked path past it (T = 34, 3-D; the GEMV stops at 32), odd sizes that are no
# multiple of any tile, rank 1
SHAPES = [((1,), 123, 77, 3), ((16,), 64, 40, 8), ((17,), 33, 65, 1), ((2, 17), 48, 100, 16)]


def make_inputs(lead, d_in, d_out, r, dtype, device, bias=True):
    def t(*shape, scale=1.0):
        v = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
        return v.requires_grad_()

    q, s = fastpeft.quantize_int8(torch.randn(d_out, d_in, dtype=torch.float64) * d_in**-0.5)
    x = t(*lead, d_in)
    b = t(d_out) if bias else None
    a = t(r, d_in, scale=d_in**-0.5)
    bb = t(d_out, r, scale=r**-0.5)
    return x, q.to(device), s.to(device), b, a, bb


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    wrt = [i for i in inputs if i is not None and i.requires_grad]
    return torch.autograd.grad(out, wrt, dy)


def run_reference(inputs, scaling, p, seed, dtype):
    """The reference (dequantised weight) in float64 and in the test dtype."""
    x, q, s, b, a, bb = inputs
    outs = {}
    for name, dt in (("ref64", torch.float64), ("lowp", dtype)):
        xc, bc, ac, bbc = (None if i is None else i.detach().to(dt).requires_grad_()
                           for i in (x, b, a, bb))
        y = reference.int8_lora_linear(xc, q, s, bc, ac, bbc, scaling, p, True, seed)
        outs[name] = (y, grads(y, (xc, bc, ac, bbc)))
    return outs


def check_matches_reference(backend, device, shape, bias, dropout_p, dtypes, scaling=None):
    """y and every gradient (dx, d bias, dA, dB) of the fused op against the reference."""
    for dtype in dtypes:
        inputs = make_inputs(*shape, dtype, device, bias=bias)
        scaling = 16 / math.sqrt(shape[3]) if scaling is None else scaling
        torch.manual_seed(123)
        with forced(backend):
            y = fastpeft.int8_lora_linear(*inputs, scaling, dropout_p)
        torch.manual_seed(123)
        seed = draw_seed(torch.device(device)) if dropout_p else None
        x, _, _, b, a, bb = inputs
        fused = (y, *grads(y, (x, b, a, bb)))
        ref = run_reference(inputs, scaling, dropout_p, seed, dtype)
        names = ["y", "dx", *(["d_bias"] if bias else []), "dA", "dB"]
        for name, out, r64, rlow in zip(
            names, fused, (ref["ref64"][0], *ref["ref64"][1]), (ref["lowp"][0], *ref["lowp"][1]),
            strict=True,
        ):
            assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow)


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize(("bias", "dropout_p"), [(True, 0.0), (False, 0.25)],
                         ids=["bias-p0", "nobias-p0.25"])
def test_matches_reference(backend_device, shape, bias, dropout_p):
    backend, device = backend_device
    check_matches_reference(backend, device, shape, bias, dropout_p,
                            dtypes_for(backend, device))


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7])
def test_small_batches(backend_device, tokens):
    """Each small-T mode: the CPU decode path's GEMV for T = 1 .. 4 and in two passes at
    T = 7 (its fallback, the tile kernel, runs for float64 in the gradcheck), the Triton
    split-K GEMV's MODE 0 (T = 1) and MODE 1 / 2. in = 149 = 2 * 64 + 2 * 8 + 5 and out = 39 =
    4 * 9 + 3 leave a tail after every block width of the kernels."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((tokens,), 149, 39, 4), True, 0.25,
                            [torch.float32, torch.float16])


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("tokens", [3, 34], ids=["decode-T3", "blocked-T34"])
def test_many_ranks(backend_device, tokens):
    """R = 72 > 64: the LoRA branch in several rank blocks (both CPU forward paths: the
    blocked one past the GEMV's 32 rows)."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((tokens,), 40, 24, 72), True, 0.25,
                            [torch.float32, torch.float16])


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("scaling", [1e-39, -3e-30])
def test_tiny_scaling_with_many_ranks(backend_device, scaling):
    """A scaling far below 1 (fp32 subnormal, and one whose reciprocal times the GEMM
    accumulator would overflow) with R = 72: the GEMM epilogue adds the LoRA term over
    several rank blocks in place, which must not divide the accumulator by it."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((34,), 40, 24, 72), True, 0.0, [torch.float32],
                            scaling=scaling)


@pytest.mark.parametrize(("tokens", "out"), [(1, 600), (4, 601), (9, 601)])
def test_gemv_chunks(tokens, out):
    """The CPU GEMV over several chunks of rows (~1 MiB of Q each: 255 rows at in = 4109;
    256 KiB, 63 rows, past 4 rows, in passes of 4, 4 and 1 at T = 9), with tails of rows
    after its streams (4 at T = 1: 255 = 4 * 63 + 3; 3 at T = 4: the last chunk, 91 =
    3 * 30 + 1) and of columns."""
    if "cpu" not in fastpeft.available_backends("int8_lora_linear"):
        pytest.skip("fastpeft._C has no int8_lora_linear kernel (not built)")
    check_matches_reference("cpu", "cpu", ((tokens,), 4109, out, 8), True, 0.0,
                            dtypes_for("cpu", "cpu"))


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
def test_blocked_tiles(backend_device):
    """The blocked path over several tiles of W, the last one partial, in both directions.
    The 16-bit GEMM tiles of the C++ kAten path (~2 MiB, spanning the reduction) are
    2^20 / in = 64 rows wide in the forward (in = 16384: 80 = 64 + 16; 70 rows of bf16,
    past the bf16 GEMV's 64) and
    2^20 / out = 13104 columns in dx (16384 = 13104 + 3280); the fp32 tiles (256 rows by
    512 columns forward, 512 by 256 for dx) make 32 steps over in."""
    backend, device = backend_device
    if backend != "cpu":
        pytest.skip("tile sizes of the C++ kernels; the Triton tiles are covered by SHAPES")
    check_matches_reference(backend, device, ((70,), 16384, 80, 4), True, 0.25,
                            [torch.float32, torch.bfloat16, torch.float16])


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("tokens", [33, 50, 64])
def test_bf16_gemv_past_32_rows(backend_device, tokens):
    """bf16 x of 33 to 64 rows: on a CPU with AVX512_BF16 the forward's GEMV with its dot
    products runs past the fp32 GEMV's 32 rows (in passes of 16 rows, the last partial);
    elsewhere the tiles."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((tokens,), 300, 203, 8), True, 0.25,
                            [torch.bfloat16] if backend == "cpu" else [torch.float32])


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
def test_empty_batch(backend_device):
    backend, device = backend_device
    x, q, s, b, a, bb = make_inputs((0,), 16, 8, 4, torch.float32, device)
    with forced(backend):
        y = fastpeft.int8_lora_linear(x, q, s, b, a, bb, 2.0, 0.1)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
def test_extreme_int8_values(backend_device):
    """Rows holding -127 and 127 and an all-zero row (scale 0) dequantise exactly."""
    backend, device = backend_device
    w = torch.randn(24, 40)
    w[3] = 0.0
    w[5, 7], w[6, 0] = 50.0, -50.0
    q, s = fastpeft.quantize_int8(w)
    assert q[5, 7] == 127 and q[6, 0] == -127 and s[3] == 0 and not q[3].any()
    x = torch.randn(3, 40, device=device)
    a, bb = torch.zeros(2, 40, device=device), torch.zeros(24, 2, device=device)
    with forced(backend):
        y = fastpeft.int8_lora_linear(x, q.to(device), s.to(device), None, a, bb, 1.0)
    expected = x.double() @ reference.dequantize_int8(q, s, torch.float64).to(device).T
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=2e-5)


def _op(backend):
    ops = torch.ops.fastpeft
    return ops.int8_lora_linear if backend == "cpu" else ops.int8_lora_linear_triton


def _op_args(device, dtype=torch.float32, p=0.2, shape=((6,), 24, 20, 4)):
    x, q, s, b, a, bb = make_inputs(*shape, dtype, device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device) if p else None
    return (x, q, s, b, a, bb, 1.5, p, seed)


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize(("p", "tokens"), [(0.0, 3), (0.2, 34)], ids=["p0-T3", "p0.2-T34"])
def test_opcheck(backend_device, p, tokens):
    backend, device = backend_device
    torch.library.opcheck(_op(backend), _op_args(device, p=p, shape=((tokens,), 24, 20, 4)))


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize(("p", "tokens"), [(0.0, 1), (0.0, 2), (0.3, 18)],
                         ids=["p0-T1", "p0-T2", "p0.3-T18"])
def test_gradcheck_float64(backend_device, p, tokens):
    """dx through the dequantised weight, dA, dB, d bias against finite differences."""
    backend, device = backend_device
    skip_without_fp64_kernels(backend, device)
    x, q, s, b, a, bb, scaling, p, seed = _op_args(device, torch.float64, p,
                                                   ((tokens,), 12, 8, 2))
    op = _op(backend)

    def f(x, b, a, bb):
        return op(x, q, s, b, a, bb, scaling, p, seed)[0]

    fast = backend == "triton" and TRITON_INTERPRETED
    assert torch.autograd.gradcheck(f, (x, b, a, bb), fast_mode=fast)


# --- quantisation ---------------------------------------------------------------------


def test_quantize_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(96, 200) * torch.rand(96, 1) * 3
    q, s = fastpeft.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (96,)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)
    assert (q.int() - cb.int()).abs().max() <= 1
    torch.testing.assert_close(s * 127, scb.float(), rtol=1e-6, atol=0)
    # and the error is what int8 absmax promises: half a step per element
    err = (reference.dequantize_int8(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] * 0.5 + 1e-6).all()


def test_signal_to_quantisation_noise():
    """The int8 layer's output vs the float layer's: about 41 dB for Gaussian weights
    (step = absmax / 127 ~ 4 sigma / 127); anything below 35 dB is a bug."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 256)
    layer = fastpeft.Int8LoRALinear.from_linear(linear, r=4)
    x = torch.randn(64, 512)
    with torch.no_grad():
        ref, out = linear(x), layer(x)
    sqnr = 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 35, f"SQNR {sqnr:.1f} dB"


# --- the module -----------------------------------------------------------------------


def test_from_linear_starts_as_the_quantised_base():
    linear = nn.Linear(40, 24)
    layer = fastpeft.Int8LoRALinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.1)
    assert layer.qweight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert set(dict(layer.named_buffers())) == {"qweight", "weight_scale", "bias"}
    assert {n for n, _ in layer.named_parameters()} == {"lora_A.weight", "lora_B.weight"}
    assert layer.scaling == 2.0 and torch.equal(layer.lora_B.weight, torch.zeros(24, 8))
    x = torch.randn(3, 5, 40)
    expected = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(layer.eval()(x), expected)
    # the float layer is within int8 quantisation error
    assert (layer(x) - linear(x)).abs().max() < 0.05


def test_from_bnb_matches_bitsandbytes_forward():
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(64, 48)
    l8 = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=0.0)
    l8.load_state_dict(linear.state_dict())
    l8 = l8.to("cpu")  # quantises
    layer = fastpeft.Int8LoRALinear.from_bnb(l8, r=4, lora_alpha=8)
    assert torch.equal(layer.qweight, l8.weight.CB)
    x = torch.randn(7, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), l8(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match=r"layer: expected a bitsandbytes\.nn\.Linear8bitLt"):
        fastpeft.Int8LoRALinear.from_bnb(linear, r=4)


def test_trains_like_the_float_base():
    """A few SGD steps on the int8 base follow the float-base LoRA layer closely: the same
    LoRA gradients at every step (up to the weight's quantisation), the same losses."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    float_layer = fastpeft.LoRALinear(linear, r=4, lora_alpha=8)
    nn.init.normal_(float_layer.lora_B.weight, std=0.1)
    int8_layer = fastpeft.Int8LoRALinear.from_linear(linear, r=4, lora_alpha=8)
    int8_layer.load_state_dict(float_layer.state_dict(), strict=False)
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses, grads = {}, {}
    for name, layer in (("float", float_layer), ("int8", int8_layer)):
        trainable = [p for p in layer.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        losses[name], grads[name] = [], []
        for _ in range(5):
            loss = (layer(x) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grads[name].append([p.grad.clone() for p in trainable])
            opt.step()
            losses[name].append(loss.item())
    assert losses["int8"][-1] < 0.95 * losses["int8"][0]
    for a, b in zip(losses["float"], losses["int8"], strict=True):
        assert abs(a - b) < 0.01 * a
    for step, (want, got) in enumerate(zip(grads["float"], grads["int8"], strict=True)):
        for w, g in zip(want, got, strict=True):
            assert (g - w).norm() <= 0.02 * w.norm(), f"step {step}"


@pytest.mark.parametrize("module", ["int8", "nf4"])
def test_scales_stay_float32_through_dtype_conversions(module):
    """``Module.to(dtype)`` / ``.half()`` / ``.double()`` cast every float buffer; the
    weight scales (int8's weight_scale, NF4's absmax) stay float32, bit for bit (a bf16
    copy moved each by up to 2^-9 of itself), the LoRA weights and bias take the dtype,
    and the bf16 layer computes with the float32 layer's quantised weight."""
    linear = nn.Linear(64, 24)
    cls = fastpeft.Int8LoRALinear if module == "int8" else fastpeft.NF4LoRALinear
    layer = cls.from_linear(linear, 4, 8)
    name = "weight_scale" if module == "int8" else "absmax"
    scales = getattr(layer, name).clone()
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                    lambda m: m.double(), lambda m: m.to("cpu", torch.bfloat16),
                    lambda m: m.float()):
        layer = convert(layer)
        assert torch.equal(getattr(layer, name), scales) \
            and getattr(layer, name).dtype == torch.float32
    bf16 = layer.to(torch.bfloat16)
    assert bf16.lora_A.weight.dtype == bf16.bias.dtype == torch.bfloat16
    assert bf16.state_dict()[name].dtype == torch.float32
    x = torch.randn(3, 64)
    w = bf16.dequantized_weight(torch.float64)
    want = x.double() @ w.T + bf16.bias.double()  # (B = 0: no LoRA part)
    err = (bf16(x.bfloat16()).double() - want).abs().max() / want.abs().max()
    assert err < 1e-2
    meta = cls(64, 24, r=4, device="meta").to(torch.bfloat16).to_empty(device="cpu")
    assert getattr(meta, name).dtype == torch.float32 and not getattr(meta, name).is_meta


def test_to_linear_and_requantising_merge():
    linear = nn.Linear(48, 32)
    layer = fastpeft.Int8LoRALinear.from_linear(linear, r=4, lora_alpha=8).eval()
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 48)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(layer.to_linear()(x), y, atol=1e-5, rtol=1e-5)
        plain = layer.to_linear(merge_lora=False)
        torch.testing.assert_close(plain.weight, layer.dequantized_weight())
        err = layer.merge()
        assert layer.merged and 0 < err < 0.01
        # re-quantisation moved each weight by at most half a new step
        assert (layer(x) - y).abs().max() < 0.05
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    layer = fastpeft.Int8LoRALinear.from_linear(nn.Linear(32, 24), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)

    def step(module):
        x.grad = None
        layer.zero_grad()
        y = module(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone()

    compiled = step(torch.compile(layer, fullgraph=True))
    eager = step(layer)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


# --- bad input --------------------------------------------------------------------------


# Which of (x, bias, lora_A, lora_B) require grad: the first layer of a model (x does
# not), a trainable bias, a frozen adapter with x needing dx.
GRAD_SUBSETS = {"lora": "AB", "x+bias": "xb", "x": "x", "bias+B": "bB"}


@pytest.mark.parametrize("backend_device", backend_params("int8_lora_linear"))
@pytest.mark.parametrize("wrt", GRAD_SUBSETS.values(), ids=GRAD_SUBSETS.keys())
def test_gradients_only_where_required(backend_device, wrt):
    backend, device = backend_device
    x, q, s, b, a, bb = make_inputs((3,), 24, 20, 3, torch.float32, device)
    for flag, t in zip("xbAB", (x, b, a, bb), strict=True):
        t.requires_grad_(flag in wrt)
    torch.manual_seed(123)
    with forced(backend):
        y = fastpeft.int8_lora_linear(x, q, s, b, a, bb, 0.5, 0.25)
    torch.manual_seed(123)
    seed = draw_seed(torch.device(device))
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, b, a, bb)]
    ref = reference.int8_lora_linear(copies[0], q, s, *copies[1:], 0.5, 0.25, True, seed)
    got = grads(y, (x, b, a, bb))
    want = grads(ref, copies)
    assert len(got) == len(wrt)
    for flag, g, r in zip(wrt, got, want, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=f"d{flag}")


def _good():
    q, s = fastpeft.quantize_int8(torch.randn(6, 10))
    return dict(
        x=torch.randn(3, 10),
        qweight=q,
        weight_scale=s,
        bias=torch.randn(6),
        lora_A=torch.randn(2, 10),
        lora_B=torch.randn(6, 2),
        scaling=1.0,
    )


BAD = [
    ("x", torch.randn(3, 9), ValueError, r"x: expected last dimension 10 \(qweight is"),
    ("x", torch.randint(0, 3, (3, 10)), TypeError, r"x: expected dtype float32"),
    ("qweight", torch.randn(6, 10), TypeError, r"qweight: expected dtype torch.int8"),
    ("qweight", torch.zeros(6, 10, 1, dtype=torch.int8), ValueError, r"qweight: expected a 2-D"),
    ("weight_scale", torch.ones(5), ValueError, r"weight_scale: expected shape \(6\)"),
    ("weight_scale", torch.ones(6).half(), TypeError, r"weight_scale: expected dtype"),
    ("bias", torch.randn(5), ValueError, r"bias: expected shape \(6\)"),
    ("bias", torch.randn(6).double(), TypeError, r"bias: expected dtype"),
    ("lora_A", torch.randn(2, 11), ValueError, r"lora_A: expected shape \(\*, 10\)"),
    ("lora_B", torch.randn(6, 3), ValueError, r"lora_B: expected shape \(6, 2\)"),
    ("scaling", float("nan"), ValueError, r"scaling: expected"),
    ("dropout_p", 1.0, ValueError, r"dropout_p: expected a value in \[0.0, 1.0\)"),
]


@pytest.mark.parametrize(
    ("arg", "value", "exc", "match"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_names_the_argument(arg, value, exc, match):
    kwargs = _good()
    kwargs[arg] = value
    with pytest.raises(exc, match=match):
        fastpeft.int8_lora_linear(**kwargs)


def test_quantize_and_module_bad_arguments():
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        fastpeft.quantize_int8(torch.randn(4))
    with pytest.raises(TypeError, match="weight: expected dtype"):
        fastpeft.quantize_int8(torch.ones(2, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match=r"linear: expected an nn\.Linear"):
        fastpeft.Int8LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2)
    with pytest.raises(ValueError, match="r: expected a positive int"):
        fastpeft.Int8LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.Int8LoRALinear(4, 4, r=1, lora_dropout=1.0)
