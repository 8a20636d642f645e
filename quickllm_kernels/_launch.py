"""Triton launches that torch.compile can trace.

Every Triton kernel of the package is launched through `launch(kernel, grid, *args)`. A direct call of
a Triton backend launches the kernel itself (no overhead). Inside the op's Triton twin
(`quickllm::_triton_<name>`, a `torch.library.triton_op` defined from the op's declaration), the
launch goes through `torch.library.wrap_triton`, so torch.compile's AOT tracing records the kernel as
a node of its graph and Inductor calls it straight from the compiled code, with no custom-op
boundary and none of the op's Python dispatch.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def traceable():
    """Launches inside the block go through wrap_triton (the Triton twins' bodies)."""
    prev = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = prev


def on(device):
    """Launch on the tensors' GPU, not whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    if getattr(_state, "on", False):
        from torch.library import wrap_triton  # noqa: PLC0415
        return wrap_triton(kernel)[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)
