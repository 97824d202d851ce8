"""What the modules keep between calls (MultiLoRALinear's stacked adapters, an adaption
prompt's projected keys and values) is kept under a key of the tensors it depends on, and
made outside inference mode."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import _backend

__all__ = ["outside_inference_mode", "weights_key"]


def outside_inference_mode() -> contextlib.AbstractContextManager:
    """Inference mode off for what is kept between calls: tensors made in it are inference
    tensors, which a later call outside it cannot save for backward."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() \
        else contextlib.nullcontext()


def weights_key(weights: list[Tensor]) -> object:
    """What a kept result depends on in ``weights``: each one's data pointer, version
    (bumped by every in-place write but those through ``.data``), dtype, device, shape and
    strides; None (no keeping) for inference tensors, which have no version. One C++ call
    where the compiled kernels are loaded (this lookup is on every serving call's path),
    else the same in Python."""
    native = _backend.native_module
    if native is not None:
        return native.weights_key(weights)
    if any(w.is_inference() for w in weights):
        return None
    return [(w.data_ptr(), w._version, w.dtype, w.device, w.shape, w.stride())
            for w in weights]
