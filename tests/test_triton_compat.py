"""What fp64 means on every supported Triton: the same kernels, accumulating in fp64.

Triton 3.6 (the GPU machine's version) gives ``tl.dot(a, b, acc)`` an fp32 ``out_dtype`` by
default and asserts that ``acc`` has that type, so an fp64 accumulator fails there unless
the call names ``out_dtype``; newer Triton infers it from ``acc``. The fp64 gradchecks of
each op (``test_gradcheck_float64``) run these kernels under whatever Triton is installed
(CI: the newest and 3.6); this test catches a new accumulating ``tl.dot`` without
``out_dtype`` on any Triton, without running a kernel.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

TRITON_DIR = Path(__file__).resolve().parent.parent / "fastpeft" / "triton"


def _dot_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "dot"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"]


@pytest.mark.parametrize("path", sorted(TRITON_DIR.glob("*.py")), ids=lambda p: p.name)
def test_accumulating_dots_name_their_out_dtype(path):
    missing = []
    for call in _dot_calls(path):
        keywords = {k.arg for k in call.keywords}
        accumulates = len(call.args) >= 3 or "acc" in keywords
        if accumulates and "out_dtype" not in keywords:
            missing.append(f"{path.name}:{call.lineno}")
    assert not missing, ("tl.dot with an accumulator but no out_dtype=acc.dtype (fails for "
                         f"fp64 on Triton 3.6): {', '.join(missing)}")


def test_the_check_sees_the_kernels():
    assert sum(len(_dot_calls(p)) for p in TRITON_DIR.glob("*.py")) > 20


# --- fp64 on a GPU: int8_lora_linear and gated_prefix_attention need Triton >= 3.9 ------
# Triton 3.6 to 3.8 cannot lower an fp64 tl.dot with an operand computed in registers (the
# dequantised int8 tile, the attention probabilities) for sm_90; their launchers refuse
# fp64 CUDA tensors there with an error naming the reference backend.


def test_fp64_refusal_names_the_way_out(monkeypatch):
    common = pytest.importorskip("fastpeft.triton._common")
    import torch

    # The check reads only .dtype and .device: a stand-in for a CUDA tensor on a CPU machine.
    on_gpu = SimpleNamespace(dtype=torch.float64, device=torch.device("cuda"))
    monkeypatch.setattr(common, "FP64_REGISTER_DOTS", False)
    with pytest.raises(RuntimeError, match=r"fastpeft\.int8_lora_linear: float64 CUDA tensors "
                       r"need Triton >= 3\.9.*use_backend\('reference'\)"):
        common.check_fp64_register_dots("int8_lora_linear", on_gpu)
    for allowed in (torch.empty(0, dtype=torch.float64), SimpleNamespace(
            dtype=torch.float32, device=torch.device("cuda"))):
        common.check_fp64_register_dots("int8_lora_linear", allowed)
    monkeypatch.setattr(common, "FP64_REGISTER_DOTS", True)
    common.check_fp64_register_dots("int8_lora_linear", on_gpu)


def test_triton_version_parsing():
    common = pytest.importorskip("fastpeft.triton._common")
    assert common._version("3.6.0") == (3, 6)
    assert common._version("3.9.0+git1a2b3c") == (3, 9)
    assert common._version("3.10.0rc1") == (3, 10)
    assert common._version("4") == (4, 0)


def test_fp64_int8_lora_linear_on_a_gpu():
    """On a GPU: refused before Triton 3.9, computed (in fp64) from 3.9 on."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    common = pytest.importorskip("fastpeft.triton._common")
    from fastpeft.triton import int8_lora_linear as launchers

    x = torch.randn(20, 32, dtype=torch.float64, device="cuda")
    q = torch.randint(-127, 128, (24, 32), dtype=torch.int8, device="cuda")
    scale = torch.rand(24, device="cuda") / 127
    a = torch.randn(4, 32, dtype=torch.float64, device="cuda")
    b = torch.randn(24, 4, dtype=torch.float64, device="cuda")
    if not common.FP64_REGISTER_DOTS:
        with pytest.raises(RuntimeError, match=r"need Triton >= 3\.9"):
            launchers.forward(x, q, scale, None, a, b, 2.0, 0.0, None)
        return
    y, _ = launchers.forward(x, q, scale, None, a, b, 2.0, 0.0, None)
    expected = x @ (q.double() * scale.double()[:, None]).T + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(y, expected)
