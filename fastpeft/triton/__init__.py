"""Triton kernels of the fused ops, run on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``). ``fastpeft.ops`` registers them as the implementations of
``fastpeft::<op>_triton`` / ``<op>_backward_triton`` when Triton is installed.

Layout, the same for every op:

* ``<op>.py`` — the launchers: ``forward`` and ``backward``, plain functions with the
  arguments and results of the op's forward / backward schema (``fastpeft.ops._library``).
  Shapes, strides, grids, block heuristics and buffers live here.
* ``<op>_kernels.py`` — the op's ``@triton.jit`` kernels (named ``<op>_<part>_kernel``) and
  their autotune config tables. An op whose kernels are long splits them:
  ``<op>_kernels.py`` the forward kernels (and the jit helpers both directions use),
  ``<op>_backward_kernels.py`` the backward ones (today: ``gated_prefix_attention``). A
  backward module may import its op's forward kernel module; nothing on the forward path
  imports a backward module.
* Code used by more than one op lives in shared modules, never in a sibling op's:
  ``_common.py`` (Python helpers: configs, precision flags, block sizes, dropout
  arguments), ``_common_kernels.py`` (shared jit code: the grouped GEMM tile order, the rank-R
  epilogue product and the LoRA branch kernels of the LoRA linears), ``_dropout.py`` (the
  seeded dropout mask).

Dtypes: fp16 / bf16 / fp32 accumulate in fp32; fp64 (used by the gradchecks) runs the same
kernels accumulating in fp64. Two Triton versions matter for fp64:

* Every ``tl.dot`` that adds into an accumulator passes ``out_dtype=acc.dtype``: Triton 3.6
  (the GPU machine's version) defaults ``out_dtype`` to fp32 and asserts that it matches
  ``acc``, which rejects an fp64 accumulator; newer Triton infers it from ``acc``. With it,
  fp64 runs under the interpreter on every version.
* Compiled for a GPU, Triton before 3.9 cannot lower an fp64 dot whose operand is computed
  in registers (int8_lora_linear's and nf4_lora_linear's dequantised tiles,
  gated_prefix_attention's probabilities), so those ops' launchers refuse fp64 CUDA
  tensors there with an error that names the reference backend
  (``_common.check_fp64_register_dots``). lora_linear and bottleneck_adapter compile in
  fp64 on every version.
"""
