"""Triton kernels, one module per op, each registering ``fastpeft::<op>_triton`` ops with
``torch.library.triton_op``. Imported by ``fastpeft.ops`` only when Triton is installed."""
