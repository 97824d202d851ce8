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
  arguments), ``_common_kernels.py`` (shared jit code: the grouped GEMM tile order and the
  LoRA branch kernels of ``lora_linear`` and ``int8_lora_linear``), ``_dropout.py`` (the
  seeded dropout mask).
"""
