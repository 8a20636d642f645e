"""The `quickllm` operator library: loads the CUDA extension, or defines the schemas without it.

Every schema lives in ops/schemas.def. When `quickllm_kernels._C` loads, its TORCH_LIBRARY block has
already defined them (and the `_cuda_<name>` kernel ops); otherwise this module defines the public
ones from the same file, so `torch.ops.quickllm.*` exists on every install.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

_SCHEMA_LINE = re.compile(r'^QUICKLLM_(OP|COMPOSITE)\((\w+),\s*"(.*)"\)\s*$')


COMPOSITE: set[str] = set()  # ops with no CUDA kernel of their own (no `_cuda_` twin)


def read_schemas() -> dict[str, str]:
    """Op name -> full schema string, parsed from ops/schemas.def."""
    text = (Path(__file__).resolve().parent / "ops" / "schemas.def").read_text()
    out = {}
    for line in text.splitlines():
        m = _SCHEMA_LINE.match(line.strip())
        if m:
            out[m.group(2)] = m.group(2) + m.group(3)
            if m.group(1) == "COMPOSITE":
                COMPOSITE.add(m.group(2))
    return out


SCHEMAS = read_schemas()


def _load_extension():
    try:
        importlib.import_module("quickllm_kernels._C")
    except ImportError as e:
        return False, f"{type(e).__name__}: {e}"
    except OSError as e:  # a library it links against is missing
        return False, f"{type(e).__name__}: {e}"
    return True, "loaded"


CUDA_EXT_LOADED, CUDA_EXT_STATUS = _load_extension()

# Fragment that holds the Python-side registrations (fake kernels, CPU/CUDA dispatch, autograd);
# when _C is absent it also holds the schemas.
LIB = torch.library.Library("quickllm", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    # Without _C every schema is defined here; with an extension built from older sources, the ops
    # it does not know are (and run on Triton and the reference).
    if not (CUDA_EXT_LOADED and hasattr(torch.ops.quickllm, _name)):
        LIB.define(_schema)


def has_cuda_kernel(name: str) -> bool:
    """Whether the compiled extension provides a CUDA kernel for op `name`."""
    return CUDA_EXT_LOADED and name not in COMPOSITE and hasattr(torch.ops.quickllm, f"_cuda_{name}")


def cuda_kernel(name: str):
    return getattr(torch.ops.quickllm, f"_cuda_{name}").default
