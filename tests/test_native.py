"""Properties of the C++ CPU kernels (fastpeft/csrc/) that the reference comparisons do not pin:

* strided 1-D parameters (a bias that is a column of a matrix, every other element of a
  vector, ...) are accepted, as by the reference and Triton backends, with the same
  outputs and gradients as their contiguous copies;
* outputs and gradients are the same bits for every intra-op thread count;
* every vector ISA a kernel has (``FASTPEFT_CPU_ISA``) that this CPU can run gives the
  reference's results.

Everything runs through the public ops with ``fastpeft.use_backend("cpu")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

import fastpeft
from fastpeft import reference

OPS = ("lora_linear", "int8_lora_linear", "nf4_lora_linear", "gated_prefix_attention",
       "bottleneck_adapter")
pytestmark = pytest.mark.skipif(
    not all("cpu" in fastpeft.available_backends(op) for op in OPS),
    reason="fastpeft._C (the C++ kernels) is not built",
)

DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)


def _strided(v: torch.Tensor, how: str) -> torch.Tensor:
    """A view of the values of the 1-D ``v`` with a non-unit stride, as a leaf whose
    gradient lands in a larger tensor: a column of a matrix, or every other element."""
    n = v.numel()
    if how == "column":
        big = torch.randn(n, 5, dtype=v.dtype)
        big[:, 3] = v
        return big.requires_grad_()[:, 3]
    big = torch.randn(2 * n, dtype=v.dtype)
    big[::2] = v
    return big.requires_grad_()[::2]


def _leaf_grad(t: torch.Tensor) -> torch.Tensor:
    """The gradient of ``t``, read through its base when it is a strided view."""
    if t._base is None:
        return t.grad
    index = (slice(None), 3) if t._base.dim() == 2 else slice(None, None, 2)
    return t._base.grad[index]


def _run(fn: Callable, tensors: dict[str, torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Forward and backward of ``fn(**tensors)`` on the C++ backend: the output, then the
    gradient of every floating input that requires grad, in order."""
    torch.manual_seed(seed)  # the dropout seed
    with fastpeft.use_backend("cpu"):
        out = fn(**tensors)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return [out.detach()] + [_leaf_grad(t) for t in tensors.values() if t.requires_grad]


def _assert_all_equal(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"{what}: result {i}: shape {a.shape} != {b.shape}"
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert torch.equal(a, b), f"{what}: result {i} differs, max |diff| = {diff:.3e}"


# ---------------------------------------------------------------------------------------
# Cases: (op function, tensors) builders. Parameters are the leaves that require grad.


def _lora_case(T: int, K: int, N: int, R: int, dtype: torch.dtype, *, p: float = 0.1,
               zero_weight: bool = False):
    weight = torch.zeros(N, K, dtype=dtype) if zero_weight else _randn(N, K, dtype=dtype)
    tensors = {
        "x": _randn(T, K, dtype=dtype).requires_grad_(),
        "weight": weight,
        "bias": _randn(N, dtype=dtype).requires_grad_(),
        "lora_A": _randn(R, K, dtype=dtype, scale=0.1).requires_grad_(),
        "lora_B": _randn(N, R, dtype=dtype, scale=0.1).requires_grad_(),
    }
    return lambda **t: fastpeft.lora_linear(**t, scaling=0.5, dropout_p=p), tensors


def _int8_case(T: int, K: int, N: int, R: int, dtype: torch.dtype, *, p: float = 0.1):
    qweight, weight_scale = fastpeft.quantize_int8(torch.randn(N, K))
    tensors = {
        "x": _randn(T, K, dtype=dtype).requires_grad_(),
        "bias": _randn(N, dtype=dtype).requires_grad_(),
        "lora_A": _randn(R, K, dtype=dtype, scale=0.1).requires_grad_(),
        "lora_B": _randn(N, R, dtype=dtype, scale=0.1).requires_grad_(),
        "weight_scale": weight_scale,
    }

    def fn(*, x, bias, lora_A, lora_B, weight_scale):
        return fastpeft.int8_lora_linear(x, qweight, weight_scale, bias, lora_A, lora_B, 0.5, p)

    fn.weight64 = reference.dequantize_int8(qweight, weight_scale, torch.float64)
    return fn, tensors


def _nf4_case(T: int, K: int, N: int, R: int, dtype: torch.dtype, *, p: float = 0.1,
              blocksize: int = 64):
    qweight, absmax = fastpeft.quantize_nf4(torch.randn(N, K), blocksize)
    tensors = {
        "x": _randn(T, K, dtype=dtype).requires_grad_(),
        "bias": _randn(N, dtype=dtype).requires_grad_(),
        "lora_A": _randn(R, K, dtype=dtype, scale=0.1).requires_grad_(),
        "lora_B": _randn(N, R, dtype=dtype, scale=0.1).requires_grad_(),
    }

    def fn(*, x, bias, lora_A, lora_B):
        return fastpeft.nf4_lora_linear(x, qweight, absmax, bias, lora_A, lora_B, 0.5, p,
                                        blocksize=blocksize)

    fn.weight64 = reference.dequantize_nf4(qweight, absmax, blocksize, torch.float64)
    return fn, tensors


def _attention_case(B: int, H: int, Hkv: int, M: int, N: int, P: int, D: int,
                    dtype: torch.dtype):
    tensors = {
        "q": _randn(B, H, M, D, dtype=dtype).requires_grad_(),
        "k": _randn(B, Hkv, N, D, dtype=dtype).requires_grad_(),
        "v": _randn(B, Hkv, N, D, dtype=dtype).requires_grad_(),
        "prefix_k": _randn(1, Hkv, P, D, dtype=dtype).requires_grad_(),
        "prefix_v": _randn(1, Hkv, P, D, dtype=dtype).requires_grad_(),
        "gate": _randn(H, dtype=dtype).requires_grad_(),
    }
    return lambda **t: fastpeft.gated_prefix_attention(**t, gate_tanh=True), tensors


def _adapter_case(T: int, d: int, m: int, dtype: torch.dtype, *, ln: bool = True,
                  residual: bool = False):
    tensors = {
        "x": _randn(T, d, dtype=dtype).requires_grad_(),
        "down_weight": _randn(m, d, dtype=dtype, scale=d**-0.5).requires_grad_(),
        "down_bias": _randn(m, dtype=dtype).requires_grad_(),
        "up_weight": _randn(d, m, dtype=dtype, scale=m**-0.5).requires_grad_(),
        "up_bias": _randn(d, dtype=dtype).requires_grad_(),
    }
    if ln:
        tensors["ln_weight"] = _randn(d, dtype=dtype).requires_grad_()
        tensors["ln_bias"] = _randn(d, dtype=dtype).requires_grad_()
    if residual:
        tensors["residual"] = _randn(T, d, dtype=dtype).requires_grad_()
    return lambda **t: fastpeft.bottleneck_adapter(**t, activation="silu", scaling=0.5), tensors


# ---------------------------------------------------------------------------------------
# Strided 1-D parameters


def _fresh(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous leaf copies of the tensors (same requires_grad)."""
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in tensors.items()}


STRIDED_CASES = {
    "lora_linear": (lambda dt: _lora_case(7, 24, 20, 4, dt), ["bias"]),
    "int8_lora_linear-decode": (lambda dt: _int8_case(3, 40, 20, 4, dt), ["bias", "weight_scale"]),
    "nf4_lora_linear-decode": (lambda dt: _nf4_case(3, 40, 20, 4, dt), ["bias"]),
    "nf4_lora_linear-blocked": (lambda dt: _nf4_case(40, 40, 20, 4, dt), ["bias"]),
    "int8_lora_linear-blocked": (lambda dt: _int8_case(40, 40, 20, 4, dt),
                                 ["bias", "weight_scale"]),
    "gated_prefix_attention": (lambda dt: _attention_case(2, 4, 2, 5, 9, 3, 16, dt), ["gate"]),
    "bottleneck_adapter": (lambda dt: _adapter_case(9, 24, 5, dt),
                           ["down_bias", "up_bias", "ln_weight", "ln_bias"]),
}


@pytest.mark.parametrize("how", ["column", "every_other"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(STRIDED_CASES))
def test_strided_vector_parameters(case: str, dtype: torch.dtype, how: str):
    """A strided 1-D parameter gives the output and gradients of its contiguous copy."""
    build, names = STRIDED_CASES[case]
    fn, tensors = build(dtype)
    want = _run(fn, _fresh(tensors))
    strided = _fresh(tensors)
    for name in names:
        view = _strided(strided[name].detach(), how)
        strided[name] = view if tensors[name].requires_grad else view.detach()
        assert not strided[name].is_contiguous()
    _assert_all_equal(_run(fn, strided), want, f"{case} with strided {', '.join(names)}")


@pytest.mark.parametrize("how", ["column", "every_other"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "aten"])
def test_bottleneck_adapter_strided_vector_parameters_per_path(path, dtype, how, monkeypatch):
    """test_strided_vector_parameters on each C++ path of the adapter (that test runs the
    path this CPU picks)."""
    monkeypatch.setenv("FASTPEFT_CPU_PATH", path)
    test_strided_vector_parameters("bottleneck_adapter", dtype, how)


# ---------------------------------------------------------------------------------------
# Thread-count independence


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _assert_thread_count_independent(build: Callable, what: str) -> None:
    fn, tensors = build()
    results = {}
    for n in (1, 2, 3):
        with _num_threads(n):
            results[n] = _run(fn, _fresh(tensors))
    for n in (2, 3):
        _assert_all_equal(results[n], results[1], f"{what}: {n} threads against 1")


ROWS = [1, 7, 333]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T, d, m, ln, residual",
    [(T, 96, 16, True, False) for T in ROWS]
    + [(333, 40, 8, False, True),  # no layer norm, a separate residual
       (333, 8192, 8, True, False),  # chunks of several blocks, GEMMs with K = 8192
       (2100, 64, 8, False, False)],  # the most chunks, partials summed over 8
)
def test_bottleneck_adapter_thread_count_independent(T, d, m, ln, residual, dtype, monkeypatch):
    """The fused path (FASTPEFT_CPU_PATH=fused), whose blocks and chunks depend on the
    shapes alone. The aten path's blocks follow the thread count and its weight gradients
    are ATen-threaded GEMMs, so its last bits may change with the thread count, as
    nn.Linear's do (it also runs fp32 inputs of few rows next to the bottleneck)."""
    monkeypatch.setenv("FASTPEFT_CPU_PATH", "fused")
    _assert_thread_count_independent(
        lambda: _adapter_case(T, d, m, dtype, ln=ln, residual=residual),
        f"bottleneck_adapter T={T} d={d} m={m} ln={ln} residual={residual} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T, K, N, R",
    [(T, 300, 520, 16) for T in ROWS] + [(1100, 64, 2048, 64)],  # the last: chunks of rows
)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_thread_count_independent(T, K, N, R, p, dtype, monkeypatch):
    """The fused kernels' results, with a zero base weight: the base GEMMs (x @ W^T,
    dy @ W) are ATen's, which MKL threads itself and whose last bits may change with the
    thread count, as torch.mm's do; with W = 0 they add exact zeros, and y, dx are the
    LoRA branch's alone. d lora_A and d lora_B never involve the base GEMM. The fused
    path (FASTPEFT_CPU_PATH=fused): the aten path's rank-R products are ATen GEMMs too
    (but for the forward of up to 8 rows, which runs the fused path's kernels)."""
    monkeypatch.setenv("FASTPEFT_CPU_PATH", "fused")
    _assert_thread_count_independent(
        lambda: _lora_case(T, K, N, R, dtype, p=p, zero_weight=True),
        f"lora_linear T={T} K={K} N={N} R={R} p={p} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T, K, N",
    [(T, 600, 300) for T in ROWS]
    + [(20, 600, 300),  # the forward's GEMV path (T <= 32), the blocked backward
       (333, 600, 200),  # one output tile: the blocked GEMMs in a region of their own
       (40, 600, 99)],  # bf16: dx with the dots (runs of 256 columns)
)
def test_int8_lora_linear_thread_count_independent(T, K, N, dtype, monkeypatch):
    """Every path of the int8 op (decode kernels, GEMV, dequantised tiles + GEMM), with
    the LoRA branch's fused kernels (see test_lora_linear_thread_count_independent)."""
    monkeypatch.setenv("FASTPEFT_CPU_PATH", "fused")
    _assert_thread_count_independent(
        lambda: _int8_case(T, K, N, 8, dtype),
        f"int8_lora_linear T={T} K={K} N={N} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T, K, N",
    [(T, 600, 300) for T in ROWS]
    + [(333, 600, 200),
       (7, 640, 99),  # rows of whole blocks: the chunked forward, bf16's dots for dx
       (20, 640, 99)],
)
def test_nf4_lora_linear_thread_count_independent(T, K, N, dtype, monkeypatch):
    """Every path of the NF4 op (the decode path's row dots and dx, dequantised tiles +
    GEMM); K = 600 is no multiple of the block size: blocks cross rows."""
    monkeypatch.setenv("FASTPEFT_CPU_PATH", "fused")
    _assert_thread_count_independent(
        lambda: _nf4_case(T, K, N, 8, dtype),
        f"nf4_lora_linear T={T} K={K} N={N} {dtype}")


# ---------------------------------------------------------------------------------------
# Vector ISAs (FASTPEFT_CPU_ISA, csrc/cpu/cpu_path.h)

# torch's own reading of the CPU: AVX512 implies AVX-512 F / BW / VL / DQ
_ISAS = {"AVX512": ["avx512", "avx2", "generic"], "AVX2": ["avx2", "generic"]}.get(
    torch.backends.cpu.get_cpu_capability(), ["generic"])


def _cpu_has_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


if "avx512" in _ISAS and _cpu_has_flag("avx512_bf16"):
    _ISAS.insert(0, "avx512bf16")  # AVX-512 with the bf16 dot products


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("T, K, N, blocksize", [
    (1, 600, 30, 64),   # blocks cross rows (600 % 64 != 0); masked / scalar tails
    (3, 600, 30, 64),   # dx's decode path at its last row count
    (5, 96, 17, 16),    # 8-byte blocks: shorter than the AVX-512 step; rows decoded once
    (8, 256, 9, 256),   # the decode forward's last row count, one pass of 8 rows
    (40, 130, 11, 64),  # the dequantised tiles
    # rows of whole blocks: AVX-512's chunked decode forward (64-byte steps, each lane's
    # block scale), with a short last step (K % 128 != 0) and 1 to 4 rows of x
    (1, 384, 13, 64),
    (2, 448, 7, 16),    # 8-byte blocks: eight scales a step
    (4, 320, 9, 32),
    (2, 512, 5, 128),   # a step inside one block
    (1, 1024, 6, 512),
    # bf16 with AVX512_BF16: the chunked decode forward up to 16 rows, in passes of 8
    (11, 256, 6, 64),
    (16, 192, 5, 32),
    # rows longer than a panel of x (j0 > 0), the last one short, K % 128 != 0
    (6, 1088, 4, 64),
    (11, 1152, 3, 32),
    # bf16 dx with AVX512_BF16 (4 rows on, 11 and 16 above too): several runs of columns
    # (the last a short step), two panels of pairs of rows of W (bf16_dx::kPanelPairs =
    # 32), the last with an odd last row, three passes over the rows of dy, the last short
    (40, 704, 69, 64),
])
@pytest.mark.parametrize("isa", _ISAS)
def test_nf4_lora_linear_every_isa(isa, T, K, N, blocksize, dtype, monkeypatch):
    """Each NF4 decoder this CPU runs gives the reference's output and gradients."""
    monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
    fn, tensors = _nf4_case(T, K, N, 4, dtype, blocksize=blocksize)
    _assert_isa_matches_reference(fn, tensors, dtype, f"{isa} T={T} K={K} N={N}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("T", [1, 5, 16, 20, 40])
@pytest.mark.parametrize("isa", _ISAS)
def test_int8_lora_linear_every_isa(isa, T, dtype, monkeypatch):
    """Each int8 path this CPU runs, by ISA: the GEMV (AVX2, or AVX512_BF16's dots for bf16)
    and, with FASTPEFT_CPU_ISA=generic, the multi-versioned tile kernel, up to 16 rows (and
    the GEMV to 32); the dequantised tiles past them; K = 300, N = 69: tails."""
    monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
    fn, tensors = _int8_case(T, 300, 69, 4, dtype)
    _assert_isa_matches_reference(fn, tensors, dtype, f"{isa} T={T}")


def _assert_isa_matches_reference(fn, tensors, dtype, what):
    """The C++ run's output and gradients against the reference backend's (bf16: also
    against float64 within bf16 rounding's bound)."""
    got = _run(fn, _fresh(tensors))
    tensors = _fresh(tensors)  # the reference's gradients in tensors of their own
    with fastpeft.use_backend("reference"):
        torch.manual_seed(0)
        out = fn(**tensors)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    want = [out.detach()] + [t.grad for t in tensors.values() if t.requires_grad]
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for i, (a, b) in enumerate(zip(got, want[: len(got)], strict=True)):
        scale = b.double().abs().max().item() or 1.0
        diff = (a.double() - b.double()).abs().max().item()
        assert diff <= tol * scale, f"{what} result {i}: max |diff| {diff:.3e} (scale {scale:.3g})"
    if dtype == torch.bfloat16:
        _assert_bf16_within_rounding(fn, tensors, got, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocksize", [2, 4, 8])
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("isa", _ISAS)
def test_nf4_op_takes_the_smallest_blocks(isa, T, blocksize, dtype, monkeypatch):
    """The registered op takes blocks of 2 and 4 weights, which the modules do not make: a
    64-byte step of codes then spans more blocks than a vector holds scales, so the AVX-512
    chunked kernels must not run them (they did, and gave wrong sums)."""
    monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
    K, N = 256, 9
    qweight, absmax = reference.quantize_nf4(torch.randn(N, K), blocksize)
    x, a, b = _randn(T, K, dtype=dtype), _randn(4, K, dtype=dtype), _randn(N, 4, dtype=dtype)
    dy = _randn(T, N, dtype=dtype)
    y, xa = torch.ops.fastpeft.nf4_lora_linear(x, qweight, absmax, None, a, b, 0.5, 0.0, None,
                                                blocksize)
    dx, _, _ = torch.ops.fastpeft.nf4_lora_linear_backward(
        dy, x, qweight, absmax, a, b, xa, 0.5, 0.0, None, blocksize, True)
    w = reference.dequantize_nf4(qweight, absmax, blocksize, torch.float64)
    want_y = x.double() @ w.T + 0.5 * (x.double() @ a.double().T) @ b.double().T
    want_dx = dy.double() @ w + 0.5 * (dy.double() @ b.double()) @ a.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, got, want in (("y", y, want_y), ("dx", dx, want_dx)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= tol, f"{isa} blocksize {blocksize} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("T", [1, 3, 4, 6, 16, 17, 40])
@pytest.mark.parametrize("isa", _ISAS)
def test_int8_lora_linear_bf16_within_rounding(isa, T, monkeypatch):
    """bf16 int8_lora_linear on each ISA: the decode and tile paths; with AVX512_BF16's
    dots the forward's GEMV from 2 rows (4, 2 and 1 streams of rows of Q at 3-4, 6 and
    8-row passes; K = 300: a full and a masked 32-column tail; 69 rows of Q: rows past the
    streams) and the bf16 dx from 9 rows (runs of 256 columns, the last short; two panels
    of pairs of rows of W, an odd last row)."""
    monkeypatch.setenv("FASTPEFT_CPU_ISA", isa)
    fn, tensors = _int8_case(T, 300, 69, 4, torch.bfloat16)
    _assert_bf16_within_rounding(fn, tensors, _run(fn, _fresh(tensors)), f"{isa} T={T}")


def _assert_bf16_within_rounding(fn, tensors, got, what):
    """y and dx of a bf16 quantised LoRA linear (fn.weight64: its W in float64) against
    float64, element by element, within what bf16 rounding allows: of each result
    (u = 2^-8), of W (or of dy times int8's scale) where a kernel rounds it to bf16, and of
    the LoRA branch's intermediates (2u of the sums of absolute products). One wrong code
    or scale in a product is far outside it, where a tolerance relative to the largest
    element is not."""
    t64 = {k: v.detach().double().requires_grad_() if v.requires_grad else v
           for k, v in tensors.items()}
    with fastpeft.use_backend("reference"):
        torch.manual_seed(0)  # the same dropout seed as the run under test
        y = fn(**t64)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16).double()
    y.backward(dy)
    W = fn.weight64.abs()
    x, b = t64["x"].detach().abs(), t64["bias"].detach().abs()
    A, B = t64["lora_A"].detach().abs(), t64["lora_B"].detach().abs()
    s, u = 0.5 / (1 - 0.1), 2.0 ** -8  # scaling over dropout's keep rate (its largest)
    y_bound = u * y.detach().abs() + 2 * u * (x @ W.T + s * (x @ A.T) @ B.T + b)
    dx_bound = u * t64["x"].grad.abs() + 2 * u * (dy.abs() @ W + s * (dy.abs() @ B) @ A)
    for name, a, want, bound in (("y", got[0], y.detach(), y_bound),
                                 ("dx", got[1], t64["x"].grad, dx_bound)):
        excess = ((a.double() - want).abs() - bound).max().item()
        assert excess <= 0, f"{what} {name}: an element off by {excess:.3g} past its bound"


def test_info_names_the_decoder_isa(monkeypatch):
    """python -m fastpeft.info says which ISA the NF4 decoder runs: the one forced, else
    the widest this CPU has (the first of the ISAs the test above runs)."""
    from fastpeft import info

    monkeypatch.delenv("FASTPEFT_CPU_ISA", raising=False)
    assert info.cpu_isa().startswith(f"{_ISAS[0]} (auto")
    assert f"NF4 decoder ISA: {_ISAS[0]} (auto" in info.report()
    monkeypatch.setenv("FASTPEFT_CPU_ISA", "generic")
    assert info.cpu_isa() == "generic (FASTPEFT_CPU_ISA)"


def test_cpu_isa_refuses_unknown_names(monkeypatch):
    monkeypatch.setenv("FASTPEFT_CPU_ISA", "sse9")
    fn, tensors = _nf4_case(2, 64, 8, 4, torch.float32)
    with fastpeft.use_backend("cpu"), pytest.raises(RuntimeError, match="FASTPEFT_CPU_ISA"):
        fn(**tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("B, H, Hkv", [(2, 4, 2), (1, 2, 1), (2, 8, 4)])
def test_gated_prefix_attention_thread_count_independent(B, H, Hkv, T, dtype):
    """Grouped-query heads; B * Hkv = 4, 1 and 8: the backward splits the query blocks
    into chunks (the first two) or not (the last)."""
    _assert_thread_count_independent(
        lambda: _attention_case(B, H, Hkv, T, T, 5, 40, dtype),
        f"gated_prefix_attention B={B} H={H} Hkv={Hkv} M=N={T} {dtype}")
