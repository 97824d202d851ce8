"""fastpeft.quantize_nf4 / dequantize_nf4 / nf4_lora_linear against the reference on the
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

import fastpeft
from fastpeft import reference
from fastpeft.ops._linear import draw_seed
from fastpeft.ops.nf4_lora_linear import BLOCKSIZES

# (leading dims, in, out, r, blocksize): the CPU's small-batch (decode) paths at T = 1 (both
# directions) and 8 (the forward's last row count; dx by tiles), the tiled paths past them
# (T = 17, and 34 rows in 3-D); blocks that cross rows (80 % 64, 34 % 16
# != 0) and rows of whole blocks (one absmax per row and tile in the interpreter's 32-wide
# tiles: 64 % 64, 96 % 32 == 0); odd out, rank 1 and 20 (> 16: the fp32 epilogue's rank
# blocks)
SHAPES = [((1,), 80, 77, 3, 64), ((8,), 64, 40, 8, 64), ((17,), 34, 65, 1, 16),
          ((2, 17), 96, 100, 20, 32)]


def _id(shape) -> str:
    return "x".join(map(str, (*shape[0], *shape[1:4]))) + f"-bs{shape[4]}"


def make_inputs(lead, d_in, d_out, r, blocksize, dtype, device, bias=True):
    def t(*shape, scale=1.0):
        v = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
        return v.requires_grad_()

    q, absmax = fastpeft.quantize_nf4(torch.randn(d_out, d_in) * d_in**-0.5, blocksize)
    x = t(*lead, d_in)
    b = t(d_out) if bias else None
    a = t(r, d_in, scale=d_in**-0.5)
    bb = t(d_out, r, scale=r**-0.5)
    return x, q.to(device), absmax.to(device), b, a, bb


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    wrt = [i for i in inputs if i is not None and i.requires_grad]
    return torch.autograd.grad(out, wrt, dy)


def run_reference(inputs, scaling, p, seed, dtype, blocksize):
    """The reference (dequantised weight) in float64 and in the test dtype."""
    x, q, absmax, b, a, bb = inputs
    outs = {}
    for name, dt in (("ref64", torch.float64), ("lowp", dtype)):
        xc, bc, ac, bbc = (None if i is None else i.detach().to(dt).requires_grad_()
                           for i in (x, b, a, bb))
        y = reference.nf4_lora_linear(xc, q, absmax, bc, ac, bbc, scaling, p, True, seed,
                                      blocksize)
        outs[name] = (y, grads(y, (xc, bc, ac, bbc)))
    return outs


def check_matches_reference(backend, device, shape, bias, dropout_p, dtypes, scaling=None):
    """y and every gradient (dx, d bias, dA, dB) of the fused op against the reference,
    the dropout mask the same through the seed the op drew."""
    blocksize = shape[4]
    for dtype in dtypes:
        inputs = make_inputs(*shape, dtype, device, bias=bias)
        scaling = 16 / math.sqrt(shape[3]) if scaling is None else scaling
        torch.manual_seed(123)
        with forced(backend):
            y = fastpeft.nf4_lora_linear(*inputs, scaling, dropout_p, blocksize=blocksize)
        torch.manual_seed(123)
        seed = draw_seed(torch.device(device)) if dropout_p else None
        x, _, _, b, a, bb = inputs
        fused = (y, *grads(y, (x, b, a, bb)))
        ref = run_reference(inputs, scaling, dropout_p, seed, dtype, blocksize)
        names = ["y", "dx", *(["d_bias"] if bias else []), "dA", "dB"]
        for name, out, r64, rlow in zip(
            names, fused, (ref["ref64"][0], *ref["ref64"][1]), (ref["lowp"][0], *ref["lowp"][1]),
            strict=True,
        ):
            assert_close_to_ref(f"{name} [{dtype}]", out, r64, rlow)


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize(("bias", "dropout_p"), [(True, 0.0), (False, 0.25)],
                         ids=["bias-p0", "nobias-p0.25"])
def test_matches_reference(backend_device, shape, bias, dropout_p):
    backend, device = backend_device
    check_matches_reference(backend, device, shape, bias, dropout_p,
                            dtypes_for(backend, device))


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("tokens", [1, 2, 5, 16])
def test_small_batches(backend_device, tokens):
    """The Triton split-K GEMV's modes (fp32: MODE 0 at T = 1, the FMA dot beyond; fp16:
    the padded tl.dot), in several K chunks (in = 150 = 4 * 32 + 22 under the interpreter,
    blocks of 32 crossing rows), out = 39 leaving a tail after every row block."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((tokens,), 150, 39, 4, 32), True, 0.25,
                            [torch.float32, torch.float16])


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("blocksize", BLOCKSIZES[1::2] + (4096,), ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("tokens", [3, 18], ids=["decode-T3", "tiled-T18"])
def test_every_blocksize(backend_device, blocksize, tokens):
    """Block sizes from 32 to 4096 (a block larger than the 2304-element weight: one short
    block), in = 96 and out = 24, in both forward paths and dx."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((tokens,), 96, 24, 4, blocksize), True, 0.0,
                            [torch.float32])


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("tokens", [3, 34], ids=["decode-T3", "tiled-T34"])
def test_many_ranks(backend_device, tokens):
    """R = 72 > 64: the LoRA branch in several rank blocks."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((tokens,), 40, 24, 72, 16), True, 0.25,
                            [torch.float32, torch.float16])


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("scaling", [1e-39, -3e-30])
def test_tiny_scaling_with_many_ranks(backend_device, scaling):
    """A scaling far below 1 (fp32 subnormal, and one whose reciprocal times the GEMM
    accumulator would overflow) with R = 72: the GEMM epilogue adds the LoRA term over
    several rank blocks in place, which must not divide the accumulator by it."""
    backend, device = backend_device
    check_matches_reference(backend, device, ((34,), 40, 24, 72, 16), True, 0.0, [torch.float32],
                            scaling=scaling)


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
def test_empty_batch(backend_device):
    backend, device = backend_device
    x, q, absmax, b, a, bb = make_inputs((0,), 16, 8, 4, 64, torch.float32, device)
    with forced(backend):
        y = fastpeft.nf4_lora_linear(x, q, absmax, b, a, bb, 2.0, 0.1)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("tokens", [2, 20])
def test_every_code_and_zero_blocks(backend_device, tokens):
    """A weight holding all 16 codes, -absmax and +absmax included, and an all-zero row
    (absmax 0, every code that of 0.0); with no LoRA term the output is x @ W^T exactly
    up to fp32 summation, in both forward paths and dx."""
    backend, device = backend_device
    w = torch.randn(24, 48)
    w[5] = 0.0
    w[7, :16] = torch.tensor(reference.NF4_VALUES) * 3.0  # one block holding every code
    q, absmax = fastpeft.quantize_nf4(w, 16)
    assert absmax[5 * 3: 6 * 3].eq(0).all() and q[5].eq(0x77).all()
    assert sorted(set((q[7, :8] >> 4).tolist()) | set((q[7, :8] & 15).tolist())) == [*range(16)]
    x = torch.randn(tokens, 48, device=device, requires_grad=True)
    a, bb = torch.zeros(2, 48, device=device), torch.zeros(24, 2, device=device)
    with forced(backend):
        y = fastpeft.nf4_lora_linear(x, q.to(device), absmax.to(device), None, a, bb, 1.0,
                                     blocksize=16)
    w64 = reference.dequantize_nf4(q, absmax, 16, torch.float64).to(device)
    torch.testing.assert_close(y.double(), x.double() @ w64.T, atol=2e-5, rtol=2e-5)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad.double(), w64.sum(0).expand(tokens, -1), atol=2e-5,
                               rtol=2e-5)


def _op(backend):
    ops = torch.ops.fastpeft
    return ops.nf4_lora_linear if backend == "cpu" else ops.nf4_lora_linear_triton


def _op_args(device, dtype=torch.float32, p=0.2, shape=((6,), 24, 20, 4, 16)):
    x, q, absmax, b, a, bb = make_inputs(*shape, dtype, device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device) if p else None
    return (x, q, absmax, b, a, bb, 1.5, p, seed, shape[4])


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize(("p", "tokens"), [(0.0, 3), (0.2, 34)], ids=["p0-T3", "p0.2-T34"])
def test_opcheck(backend_device, p, tokens):
    backend, device = backend_device
    torch.library.opcheck(_op(backend),
                          _op_args(device, p=p, shape=((tokens,), 24, 20, 4, 16)))


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize(("p", "tokens"), [(0.0, 1), (0.0, 2), (0.3, 18)],
                         ids=["p0-T1", "p0-T2", "p0.3-T18"])
def test_gradcheck_float64(backend_device, p, tokens):
    """dx through the dequantised weight, dA, dB, d bias against finite differences
    (in = 12 with blocks of 16: they cross rows)."""
    backend, device = backend_device
    skip_without_fp64_kernels(backend, device)
    x, q, absmax, b, a, bb, scaling, p, seed, bs = _op_args(device, torch.float64, p,
                                                            ((tokens,), 12, 8, 2, 16))
    op = _op(backend)

    def f(x, b, a, bb):
        return op(x, q, absmax, b, a, bb, scaling, p, seed, bs)[0]

    fast = backend == "triton" and TRITON_INTERPRETED
    assert torch.autograd.gradcheck(f, (x, b, a, bb), fast_mode=fast)


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
def test_compiles_fullgraph(backend_device):
    """The public op under torch.compile(fullgraph=True): one graph, forward and backward,
    dropout on (inductor's eager-compatible RNG draws the same seed), eager's results."""
    backend, device = backend_device
    torch._dynamo.reset()
    x, q, absmax, b, a, bb = make_inputs((2, 5), 32, 24, 4, 32, torch.float32, device)

    def step(fn):
        torch.manual_seed(3)
        for t in (x, b, a, bb):
            t.grad = None
        y = fn(x, q, absmax, b, a, bb)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), a.grad.clone(), bb.grad.clone()

    def call(x, q, absmax, b, a, bb):
        return fastpeft.nf4_lora_linear(x, q, absmax, b, a, bb, 2.0, 0.1, blocksize=32)

    with forced(backend), torch._inductor.config.patch(fallback_random=True):
        compiled = step(torch.compile(call, fullgraph=True))
        eager = step(call)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


# Which of (x, bias, lora_A, lora_B) require grad: the first layer of a model (x does
# not), a trainable bias, a frozen adapter with x needing dx.
GRAD_SUBSETS = {"lora": "AB", "x+bias": "xb", "x": "x", "bias+B": "bB"}


@pytest.mark.parametrize("backend_device", backend_params("nf4_lora_linear"))
@pytest.mark.parametrize("wrt", GRAD_SUBSETS.values(), ids=GRAD_SUBSETS.keys())
def test_gradients_only_where_required(backend_device, wrt):
    backend, device = backend_device
    x, q, absmax, b, a, bb = make_inputs((3,), 24, 20, 3, 64, torch.float32, device)
    for flag, t in zip("xbAB", (x, b, a, bb), strict=True):
        t.requires_grad_(flag in wrt)
    torch.manual_seed(123)
    with forced(backend):
        y = fastpeft.nf4_lora_linear(x, q, absmax, b, a, bb, 0.5, 0.25)
    torch.manual_seed(123)
    seed = draw_seed(torch.device(device))
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, b, a, bb)]
    ref = reference.nf4_lora_linear(copies[0], q, absmax, *copies[1:], 0.5, 0.25, True, seed)
    got = grads(y, (x, b, a, bb))
    want = grads(ref, copies)
    assert len(got) == len(wrt)
    for flag, g, r in zip(wrt, got, want, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=f"d{flag}")


# --- quantisation ---------------------------------------------------------------------

# (out, in): rows of whole blocks, blocks crossing rows, an odd row count with a last
# short block (7 * 50 = 350 elements)
QUANT_SHAPES = [(24, 128), (24, 80), (7, 50)]


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_quantize_matches_bitsandbytes(blocksize, shape, dtype):
    """quantize_nf4 is bitsandbytes' quantize_4bit(quant_type="nf4") bit for bit: its
    packed bytes viewed (out, in // 2), its absmax; dequantize_nf4 is its dequantize_4bit.
    (bitsandbytes 0.50 refuses blocksize 16.) bitsandbytes' CPU dequantize of a 2-D state
    restarts the blocks at each row when in % blocksize != 0 (its own default and CUDA
    paths, and the quantisation, run them over the flattened weight), so the dequantised
    weight is compared through the flattened 1-D state: the same bytes and absmax."""
    bnb = pytest.importorskip("bitsandbytes")
    w = (torch.randn(*shape) * torch.rand(shape[0], 1) * 3).to(dtype)
    w[0, :3] = 0.0
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    q, absmax = fastpeft.quantize_nf4(w, blocksize)
    assert q.dtype == torch.uint8 and q.shape == (shape[0], shape[1] // 2)
    assert absmax.dtype == torch.float32
    assert absmax.shape == (math.ceil(shape[0] * shape[1] / blocksize),)
    assert torch.equal(q, packed.view(shape[0], shape[1] // 2))
    assert torch.equal(absmax, state.absmax)
    flat_packed, flat_state = bnb.functional.quantize_4bit(w.reshape(-1), blocksize=blocksize,
                                                           quant_type="nf4")
    assert torch.equal(flat_packed, packed)
    want = bnb.functional.dequantize_4bit(flat_packed, flat_state).view(shape)
    got = fastpeft.dequantize_nf4(q, absmax, blocksize, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    if shape[1] % blocksize == 0:
        assert torch.equal(bnb.functional.dequantize_4bit(packed, state), want)


@pytest.mark.parametrize("blocksize", [16, 64])
def test_quantisation_error_is_half_a_step(blocksize):
    """Each weight dequantises to the NF4 value nearest w / absmax, times absmax: within
    half the widest gap of the table (0.304 / 2) of the block's absmax."""
    w = torch.randn(10, 40)
    q, absmax = fastpeft.quantize_nf4(w, blocksize)
    back = fastpeft.dequantize_nf4(q, absmax, blocksize)
    scale = absmax.repeat_interleave(blocksize)[: w.numel()].view_as(w)
    assert ((back - w).abs() <= scale * 0.1521 + 1e-6).all()
    # absmax itself is exact: the code of +-1.0 at each block's largest magnitude
    flat = w.reshape(-1)
    blocks = -(-flat.numel() // blocksize)
    largest = torch.stack([flat[i * blocksize:(i + 1) * blocksize].abs().max()
                           for i in range(blocks)])
    torch.testing.assert_close(absmax, largest, rtol=0, atol=0)


def test_signal_to_quantisation_noise():
    """The NF4 layer's output vs the float layer's: about 20 dB for Gaussian weights with
    blocks of 64 (NF4's ~0.1 sigma error per weight); below 17 dB is a bug."""
    torch.manual_seed(0)
    w, x = torch.randn(256, 512) * 0.05, torch.randn(64, 512)
    q, absmax = fastpeft.quantize_nf4(w)
    zeros_a, zeros_b = torch.zeros(4, 512), torch.zeros(256, 4)
    out = fastpeft.nf4_lora_linear(x, q, absmax, None, zeros_a, zeros_b, 1.0)
    ref = x @ w.T
    sqnr = 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 17, f"SQNR {sqnr:.1f} dB"


# --- bad input --------------------------------------------------------------------------


def _good():
    q, absmax = fastpeft.quantize_nf4(torch.randn(6, 10), 16)
    return dict(
        x=torch.randn(3, 10),
        qweight=q,
        absmax=absmax,
        bias=torch.randn(6),
        lora_A=torch.randn(2, 10),
        lora_B=torch.randn(6, 2),
        scaling=1.0,
        blocksize=16,
    )


BAD = [
    ("x", torch.randn(3, 9), ValueError, r"x: expected last dimension 10 \(qweight is"),
    ("x", torch.randint(0, 3, (3, 10)), TypeError, r"x: expected dtype float32"),
    ("qweight", torch.zeros(6, 5, dtype=torch.int8), TypeError,
     r"qweight: expected dtype torch.uint8"),
    ("qweight", torch.zeros(6, 5, 1, dtype=torch.uint8), ValueError, r"qweight: expected a 2-D"),
    ("qweight", torch.zeros(6, 4, dtype=torch.uint8), ValueError,
     r"x: expected last dimension 8 \(qweight is \(6, 4\)"),
    ("absmax", torch.ones(3), ValueError, r"absmax: expected shape \(4,\)"),
    ("absmax", torch.ones(4).half(), TypeError, r"absmax: expected dtype torch.float32"),
    ("absmax", torch.ones(2, 2), ValueError, r"absmax: expected a 1-D"),
    ("blocksize", 48, ValueError, r"blocksize: expected one of \(16, 32"),
    ("blocksize", 8, ValueError, r"blocksize: expected one of"),
    ("blocksize", 64.0, ValueError, r"blocksize: expected one of"),
    ("bias", torch.randn(5), ValueError, r"bias: expected shape \(6\)"),
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
        fastpeft.nf4_lora_linear(**kwargs)


def test_odd_in_features_is_refused():
    kwargs = _good()
    kwargs["x"] = torch.randn(3, 11)
    with pytest.raises(ValueError, match=r"x: expected last dimension 10.*even in_features"):
        fastpeft.nf4_lora_linear(**kwargs)
    with pytest.raises(ValueError, match="weight: NF4 packs two codes of a row per byte"):
        fastpeft.quantize_nf4(torch.randn(4, 11))


def test_trainable_quantised_base_is_refused():
    """The codes and absmax are frozen buffers: an absmax that requires grad is refused
    by name, and a trainable qweight can only be a float tensor (integer tensors cannot
    require grad), refused by its dtype."""
    kwargs = _good()
    kwargs["absmax"] = kwargs["absmax"].requires_grad_()
    with pytest.raises(ValueError, match="absmax: the quantised base is frozen"):
        fastpeft.nf4_lora_linear(**kwargs)
    kwargs = _good()
    kwargs["qweight"] = kwargs["qweight"].float().requires_grad_()
    with pytest.raises(TypeError, match=r"qweight: expected dtype torch\.uint8"):
        fastpeft.nf4_lora_linear(**kwargs)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_quantize_refuses_non_finite(bad):
    w = torch.randn(6, 8)
    w[4, 1] = bad
    with pytest.raises(ValueError, match=r"weight: expected finite values.*row 4"):
        fastpeft.quantize_nf4(w)


def test_quantize_and_dequantize_bad_arguments():
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        fastpeft.quantize_nf4(torch.randn(4))
    with pytest.raises(TypeError, match="weight: expected dtype"):
        fastpeft.quantize_nf4(torch.ones(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        fastpeft.quantize_nf4(torch.randn(4, 8), 100)
    q, absmax = fastpeft.quantize_nf4(torch.randn(4, 8), 16)
    with pytest.raises(TypeError, match=r"qweight: expected dtype torch\.uint8"):
        fastpeft.dequantize_nf4(q.to(torch.int16), absmax, 16)
    with pytest.raises(ValueError, match=r"absmax: expected shape \(2\)"):
        fastpeft.dequantize_nf4(q, absmax[:1], 16)
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        fastpeft.dequantize_nf4(q, absmax, 24)
