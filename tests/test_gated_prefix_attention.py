"""fastpeft.gated_prefix_attention / AdaptionPrompt against the unfused reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close_to_ref,
    backend_params,
    dtypes_for,
    forced,
    skip_without_fp64_kernels,
)
from torch import nn

import fastpeft
from fastpeft import reference


def make_inputs(
    b=2,
    h=4,
    h_kv=2,
    m=9,
    n=9,
    d=16,
    p=3,
    pb=1,
    gate="per_head",
    dtype=torch.float32,
    device="cpu",
    qk_scale=1.0,
):
    def t(*shape, s=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * s).to(dtype).to(device).requires_grad_()

    q = t(b, h, m, d, s=qk_scale)
    k = t(b, h_kv, n, d, s=qk_scale)
    v = t(b, h_kv, n, d)
    pk, pv = t(pb, h_kv, p, d, s=qk_scale), t(pb, h_kv, p, d)
    g = t(h if gate == "per_head" else 1, s=0.7)  # non-zero: the prompt path must count
    return q, k, v, pk, pv, g


CASES = {
    "causal": {},
    "full": {"causal": False},
    "m_lt_n": {"m": 5, "n": 13},
    "decode_m1": {"m": 1, "n": 11},
    "gqa_6_1": {"h": 6, "h_kv": 1},
    "p1_scalar_gate": {"p": 1, "gate": "scalar"},
    "per_batch_prefix": {"pb": 2},
    "tanh": {"gate_tanh": True},
    "padding": {"padding": True},
    "scale": {"scale": 0.3, "d": 32},
    "d80_odd_lengths": {"d": 80, "m": 13, "n": 21, "h": 2, "h_kv": 1},
    "d128": {"d": 128, "m": 6, "n": 6, "h": 2, "h_kv": 2, "b": 1},
}


def _split(case):
    call = {k: case[k] for k in ("causal", "gate_tanh", "scale") if k in case}
    shape = {k: v for k, v in case.items() if k not in ("causal", "gate_tanh", "scale", "padding")}
    return shape, call


def _padding_mask(b, n, device):
    """Batch 0 keeps all keys; batch 1 drops its first 4, so with causal alignment its
    first rows see no sequence key at all (they must give 0 from that part, not NaN)."""
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask[1, :4] = False
    return mask


def _grads(out, inputs):
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, dy.to(out.dtype).to(out.device))


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(backend_device, case):
    backend, device = backend_device
    shape, call = _split(CASES[case])
    for dtype in dtypes_for(backend, device):
        inputs = make_inputs(dtype=dtype, device=device, **shape)
        if CASES[case].get("padding"):
            call["key_padding_mask"] = _padding_mask(inputs[0].shape[0], inputs[1].shape[2], device)
        with forced(backend):
            out = fastpeft.gated_prefix_attention(*inputs, **call)
        got = (out, *_grads(out, inputs))
        refs = {}
        for name, dt, upcast in (("64", torch.float64, True), ("lowp", dtype, False)):
            copies = [i.detach().to(dt).requires_grad_() for i in inputs]
            r = reference.gated_prefix_attention(*copies, upcast=upcast, **call)
            refs[name] = (r, *_grads(r, copies))
        for name, g, r64, rlow in zip(
            ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate"],
            got,
            refs["64"],
            refs["lowp"],
            strict=False,
        ):
            # fp32 rounding of the blocked kernels (P recomputed from an fp32 lse) grows
            # with the head dim: 6 ulps up to D = 32 (dk over 150 random D = 32 cases: up
            # to 3.7 ulps beyond 2x torch's error, 4.6 in this test's scale case), scaled
            # beyond (D = 128: dk measured at 2e-6 of max |dk|)
            ulps = 6 * max(1, inputs[0].shape[-1] // 32)
            assert_close_to_ref(f"{name} [{dtype}]", g, r64, rlow, atol_eps=ulps)


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
def test_gradients_only_where_required(backend_device):
    """LLaMA-Adapter on a frozen model: q, k, v need no gradient, the prompt and gate do
    (with a padding mask, which never has one)."""
    backend, device = backend_device
    inputs = make_inputs(device=device)
    for t in inputs[:3]:
        t.requires_grad_(False)
    mask = _padding_mask(inputs[0].shape[0], inputs[1].shape[2], device)
    with forced(backend):
        out = fastpeft.gated_prefix_attention(*inputs, key_padding_mask=mask)
    out.backward(torch.ones_like(out))
    assert all(t.grad is None for t in inputs[:3])
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = reference.gated_prefix_attention(*copies, key_padding_mask=mask)
    ref.backward(torch.ones_like(ref))
    for name, t, r in zip(["dprefix_k", "dprefix_v", "dgate"], inputs[3:], copies[3:],
                          strict=True):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
def test_fp16_large_logits_do_not_overflow(backend_device):
    backend, device = backend_device
    inputs = make_inputs(dtype=torch.float16, device=device, qk_scale=6.0)  # |q.k| ~ 600
    with forced(backend):
        out = fastpeft.gated_prefix_attention(*inputs)
    grads = _grads(out, inputs)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    ref = reference.gated_prefix_attention(*[i.detach().double() for i in inputs])
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
def test_log_sum_exps(backend_device):
    backend, device = backend_device
    q, k, v, pk, pv, g = (t.detach() for t in make_inputs(device=device, m=5, n=9))
    mask = _padding_mask(2, 9, device)
    op = (
        torch.ops.fastpeft.gated_prefix_attention
        if backend == "cpu"
        else (torch.ops.fastpeft.gated_prefix_attention_triton)
    )
    _, lse, prompt_lse, seq_out = op(q, k, v, pk, pv, g, mask, True, 0.25, False)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    visible = torch.ones(5, 9, dtype=torch.bool).tril(4) & mask[:, None, None, :]
    want = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)
    want = torch.where(visible.any(-1), want, float("inf"))  # no visible key: +inf
    torch.testing.assert_close(lse, want)
    # seq_out: the sequence part alone (0 for a row with no visible key)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num()
    torch.testing.assert_close(seq_out, weights @ v.repeat_interleave(2, 1))
    pscores = q @ pk.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    torch.testing.assert_close(prompt_lse, torch.logsumexp(pscores, -1))


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
def test_a_large_gate_keeps_the_sequence_gradients_precise(backend_device):
    """dq and dk against float64 at gate 20 (no tanh: PEFT's gate is unbounded), in each
    dtype: within a few times the error of the reference computed in that dtype. The
    backward's rowsum(dO * O_s) comes from the saved sequence part; from out minus g O_p it
    carried out's rounding of g O_p (17x the reference's dk error in fp32, 12x in bf16)."""
    backend, device = backend_device
    for dtype in dtypes_for(backend, device):
        inputs = make_inputs(b=1, h=4, h_kv=2, m=24, n=24, d=32, p=5, dtype=dtype,
                             device=device)
        with torch.no_grad():
            inputs[5].fill_(20.0)
        dout = torch.randn(inputs[0].shape, dtype=torch.float64)

        def grads(fn, tensors, dout=dout):
            y = fn(*tensors)
            return torch.autograd.grad(y, tensors[:2], dout.to(y.dtype).to(y.device))

        def fused(*t):
            return fastpeft.gated_prefix_attention(*t, causal=True)

        def unfused(*t):
            return reference.gated_prefix_attention(*t, causal=True, upcast=False)

        truth = grads(unfused, [t.detach().double().requires_grad_() for t in inputs])
        with forced(backend):
            got = grads(fused, list(inputs))
        same_dtype = grads(unfused, [t.detach().requires_grad_() for t in inputs])
        for name, g, r, t in zip(("dq", "dk"), got, same_dtype, truth, strict=True):
            err, ref_err = ((x.double() - t).abs().max().item() for x in (g, r))
            bound = 4 * ref_err + 8 * torch.finfo(dtype).eps * t.abs().max().item()
            assert err <= bound, (name, dtype, err, ref_err)


def _op_args(device, dtype=torch.float32, padding=True):
    q, k, v, pk, pv, g = make_inputs(device=device, dtype=dtype, m=5, n=7)
    mask = _padding_mask(2, 7, device) if padding else None
    return q, k, v, pk, pv, g, mask, True, 0.25, True


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
def test_opcheck(backend_device):
    backend, device = backend_device
    op = (
        torch.ops.fastpeft.gated_prefix_attention
        if backend == "cpu"
        else (torch.ops.fastpeft.gated_prefix_attention_triton)
    )
    torch.library.opcheck(op, _op_args(device))


@pytest.mark.parametrize("backend_device", backend_params("gated_prefix_attention"))
def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    skip_without_fp64_kernels(backend, device)
    op = (
        torch.ops.fastpeft.gated_prefix_attention
        if backend == "cpu"
        else (torch.ops.fastpeft.gated_prefix_attention_triton)
    )
    # every input element costs two op calls: tiny shapes (still GQA, a mask, tanh)
    q, k, v, pk, pv, g = make_inputs(
        b=2, h=2, h_kv=1, m=3, n=4, d=16, p=2, dtype=torch.float64, device=device
    )
    mask = torch.tensor([[True] * 4, [False, True, True, True]], device=device)

    def f(*tensors):
        return op(*tensors, mask, True, 0.25, True)[0]

    # The interpreter runs each launch in Python: check random directional derivatives
    # (fast_mode) there, every element on compiled kernels.
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(f, (q, k, v, pk, pv, g), fast_mode=fast)


# --- the module -----------------------------------------------------------------------


def _attention_layer(hidden=32, heads=4, kv_heads=2):
    d = hidden // heads
    return nn.Linear(hidden, kv_heads * d, bias=False), nn.Linear(hidden, kv_heads * d, bias=False)


def test_adaption_prompt_starts_as_plain_attention():
    k_proj, v_proj = _attention_layer()
    adapter = fastpeft.AdaptionPrompt(32, 4, 2, adapter_len=5, gate="per_head", gate_tanh=True)
    assert adapter.gate.shape == (4,) and torch.equal(adapter.gate, torch.zeros(4))
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out = adapter(q, k, v, k_proj, v_proj)
    plain = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    # the gate gets a gradient at zero, so training can open it
    out.square().sum().backward()
    assert adapter.gate.grad is not None and adapter.gate.grad.abs().sum() > 0
    assert adapter.prompt.grad is not None


def test_adaption_prompt_scalar_gate_and_compile():
    torch._dynamo.reset()
    k_proj, v_proj = _attention_layer()
    adapter = fastpeft.AdaptionPrompt(32, 4, 2, adapter_len=3, gate="scalar")
    nn.init.constant_(adapter.gate, 0.5)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    compiled = torch.compile(lambda *a: adapter(*a, k_proj, v_proj), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), adapter(q, k, v, k_proj, v_proj))


# --- bad input --------------------------------------------------------------------------


def _good():
    q, k, v, pk, pv, g = (t.detach() for t in make_inputs())
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, gate=g)


BAD = [
    ("q", torch.randn(2, 4, 9), ValueError, r"q: expected a 4-D"),
    ("k", torch.randn(2, 2, 9, 8), ValueError, r"k: expected shape \(2, \*, \*, 16\)"),
    ("k", torch.randn(2, 3, 9, 16), ValueError, r"multiple of the key/value heads"),
    ("v", torch.randn(2, 2, 8, 16), ValueError, r"v: expected shape \(2, 2, 9, 16\)"),
    ("prefix_k", torch.randn(3, 2, 3, 16), ValueError, r"prefix_k: expected a leading dim"),
    ("prefix_k", torch.randn(1, 2, 3, 8), ValueError, r"prefix_k: expected shape"),
    ("prefix_v", torch.randn(1, 2, 4, 16), ValueError, r"prefix_v: expected shape \(1, 2, 3, 16\)"),
    ("gate", torch.zeros(3), ValueError, r"gate: expected shape \(4,\)"),
    ("gate", torch.zeros(4, dtype=torch.float64), TypeError, r"gate: expected dtype"),
    ("key_padding_mask", torch.ones(2, 8, dtype=torch.bool), ValueError, r"key_padding_mask"),
    (
        "key_padding_mask",
        torch.ones(2, 9),
        TypeError,
        r"key_padding_mask: expected dtype torch.bool",
    ),
    ("scale", float("inf"), ValueError, r"scale: expected"),
]


@pytest.mark.parametrize(
    ("arg", "value", "exc", "match"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_names_the_argument(arg, value, exc, match):
    kwargs = _good()
    kwargs[arg] = value
    with pytest.raises(exc, match=match):
        fastpeft.gated_prefix_attention(**kwargs)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        fastpeft.AdaptionPrompt(32, 4, 3)
    with pytest.raises(ValueError, match="gate: expected"):
        fastpeft.AdaptionPrompt(32, 4, 2, gate="per_layer")
