"""The `quickllm` operator library: the schemas, and the CUDA kernels loaded when they are wanted.

Every schema lives in schemas.def and is defined here, on every install. The CUDA kernels come as
a library that adds `_cuda_<name>` ops (csrc/ops.cpp):
  - the ahead-of-time module `quickllm_kernels._C` (setup.py), loaded at import when it was built;
  - otherwise the just-in-time build (_build.py), compiled for the local GPU the first time a CUDA
    tensor reaches an op whose backend could be "cuda", and loaded from the cache after that.
QUICKLLM_BUILD_CUDA=0 turns the just-in-time build off; =1 makes a failed build an error.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from pathlib import Path

import torch

from . import _build

_ENTRY = re.compile(r'^QUICKLLM_(OP|COMPOSITE)\((\w+),\s*"(.*)"\)\s*$')

COMPOSITE: set[str] = set()  # ops with no CUDA kernel of their own (no `_cuda_` twin)


def read_schemas(text: str | None = None) -> dict[str, str]:
    """Op name -> full schema string, parsed from schemas.def (one entry per line; a line that
    starts like an entry but does not parse raises, so no schema can silently go missing)."""
    if text is None:
        text = (Path(__file__).resolve().parent / "schemas.def").read_text()
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("QUICKLLM_"):
            continue
        m = _ENTRY.match(line)
        if not m:
            raise ValueError(f"schemas.def:{lineno}: cannot parse {line[:80]!r}: write each entry as "
                             f'QUICKLLM_OP(name, "(args) -> returns") on one line')
        if m.group(2) in out:
            raise ValueError(f"schemas.def:{lineno}: {m.group(2)} is declared twice")
        out[m.group(2)] = m.group(2) + m.group(3)
        if m.group(1) == "COMPOSITE":
            COMPOSITE.add(m.group(2))
    return out


SCHEMAS = read_schemas()

# Fragment that holds the Python-side registrations: the schemas, fake kernels, CPU/CUDA dispatch
# and autograd.
LIB = torch.library.Library("quickllm", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    if not hasattr(torch.ops.quickllm, _name):  # a standalone library loaded first defined it already
        LIB.define(_schema)


# ------------------------------------------------------------------------------------------------
# The CUDA kernels
# ------------------------------------------------------------------------------------------------

CUDA_EXT_LOADED = False
CUDA_EXT_STATUS = "not loaded"
CUDA_EXT_PATH: str | None = None
_tried_jit = False
_lock = threading.Lock()
_twin_fakes: dict[str, object] = {}


def _build_mode() -> str:
    mode = os.environ.get("QUICKLLM_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"QUICKLLM_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    return mode


def _loaded(path: str, how: str) -> None:
    global CUDA_EXT_LOADED, CUDA_EXT_STATUS, CUDA_EXT_PATH
    CUDA_EXT_LOADED, CUDA_EXT_STATUS, CUDA_EXT_PATH = True, f"loaded ({how}: {path})", path
    _register_twin_fakes()


def _register_twin_fakes() -> None:
    _has_kernel.clear()
    for name, fake in list(_twin_fakes.items()):
        if has_cuda_kernel(name) and name not in _fakes_registered:
            torch.library.register_fake(f"quickllm::_cuda_{name}", fake, lib=LIB)
            _fakes_registered.add(name)


_fakes_registered: set[str] = set()

# The Hopper-only library (build.json's sources_sm90a, sm_90a machine code): registrations of
# `_cuda_` ops that the main library defines, loaded after it on an sm_90 GPU.
SM90A_STATUS = "not loaded"
_sm90a_done = False


def _load_sm90a(build: bool, log) -> None:
    global SM90A_STATUS, _sm90a_done
    arch = _build.local_arch()
    if arch != "90":
        SM90A_STATUS = f"not loaded: sm_90a code runs on sm_90 GPUs only (here: {'sm_' + arch if arch else 'no GPU'})"
        _sm90a_done = True
        return
    try:
        mod = importlib.import_module("quickllm_kernels._C_sm90a")
    except (ImportError, OSError):
        mod = None
    if mod is not None:
        SM90A_STATUS, _sm90a_done = f"loaded (ahead-of-time build: {getattr(mod, '__file__', mod.__name__)})", True
        _register_twin_fakes()
        return
    root = _build.source_root()
    if root is None or not _build.config(root).get("sources_sm90a"):
        SM90A_STATUS, _sm90a_done = "not loaded: this version has no sm_90a kernels", True
        return
    plan = _build.jit_plan(variant="sm90a", root=root)
    if not build and not plan["library"].is_file():
        SM90A_STATUS = "not built yet: compiled on first CUDA use (or `python -m quickllm_kernels build`)"
        return
    _sm90a_done = True
    try:
        path = _build.jit_build(variant="sm90a", root=root, log=log)
        torch.ops.load_library(str(path))
    except Exception as e:  # its ops fall back like any CUDA kernel that is missing
        SM90A_STATUS = f"sm_90a build failed: {e}"
        if _build_mode() == "1":
            raise
        print(f"quickllm_kernels: {SM90A_STATUS}", file=sys.stderr)
        return
    SM90A_STATUS = f"loaded (just-in-time build: {path})"
    _register_twin_fakes()


def _load_ahead_of_time() -> None:
    global CUDA_EXT_STATUS
    try:
        mod = importlib.import_module("quickllm_kernels._C")
    except (ImportError, OSError) as e:  # not built, or a library it links against is missing
        CUDA_EXT_STATUS = f"ahead-of-time quickllm_kernels._C not built ({type(e).__name__}: {e})"
        return
    _loaded(getattr(mod, "__file__", "quickllm_kernels._C"), "ahead-of-time build")


def ensure_cuda_extension(*, build: bool = True, log=None) -> bool:
    """Load the CUDA kernels if they are not loaded yet: from the just-in-time cache, or by compiling
    them there when `build` (a minute or two, once per source version and GPU architecture).
    Returns whether they are loaded; CUDA_EXT_STATUS says why not."""
    global CUDA_EXT_STATUS, _tried_jit
    if CUDA_EXT_LOADED or _tried_jit:  # (after a failed build, its reason stays in CUDA_EXT_STATUS)
        if CUDA_EXT_LOADED and not _sm90a_done:
            with _lock:
                if not _sm90a_done:
                    _load_sm90a(build, log or _stderr)
        return CUDA_EXT_LOADED
    with _lock:
        if CUDA_EXT_LOADED or _tried_jit:
            return CUDA_EXT_LOADED
        mode = _build_mode()
        if mode == "0":
            CUDA_EXT_STATUS = "not loaded: QUICKLLM_BUILD_CUDA=0 (no just-in-time build)"
            _tried_jit = True
            return False
        why = _build.build_unavailable()
        if why is not None:
            CUDA_EXT_STATUS = f"not available: {why}"
            _tried_jit = True
            if mode == "1":
                raise RuntimeError(f"QUICKLLM_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
            return False
        try:
            plan = _build.jit_plan()
            if not build and not plan["library"].is_file():
                CUDA_EXT_STATUS = (f"not built yet for sm_{', sm_'.join(plan['archs'])}: compiled on first CUDA "
                                   f"use (or `python -m quickllm_kernels build`)")
                return False
            _tried_jit = True
            path = _build.jit_build(log=log or _stderr)
            torch.ops.load_library(str(path))
        except Exception as e:  # a failed build leaves the Triton and reference backends working
            CUDA_EXT_STATUS = f"just-in-time build failed: {e}"
            if mode == "1":
                raise
            print(f"quickllm_kernels: {CUDA_EXT_STATUS}\nquickllm_kernels: continuing without the CUDA "
                  f"backend (QUICKLLM_BUILD_CUDA=0 skips the build)", file=sys.stderr)
            return False
        _loaded(str(path), "just-in-time build")
        _load_sm90a(build, log or _stderr)
        return True


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register_twin_fake(name: str, fake) -> None:
    """Fake kernel of `_cuda_<name>`, registered now or whenever the CUDA kernels load."""
    _twin_fakes[name] = fake
    _register_twin_fakes()


def has_cuda_kernel(name: str) -> bool:
    """Whether the loaded CUDA kernels (either library) include one for op `name`."""
    if not CUDA_EXT_LOADED or name in COMPOSITE:
        return False
    if name not in _has_kernel:
        _has_kernel[name] = (hasattr(torch.ops.quickllm, f"_cuda_{name}") and
                             torch._C._dispatch_has_kernel_for_dispatch_key(f"quickllm::_cuda_{name}", "CUDA"))
    return _has_kernel[name]


_has_kernel: dict[str, bool] = {}  # cleared whenever a library loads


def cuda_kernel(name: str):
    return getattr(torch.ops.quickllm, f"_cuda_{name}").default


def _initial_status() -> None:
    global CUDA_EXT_STATUS
    _load_ahead_of_time()
    if CUDA_EXT_LOADED:
        return
    aot = CUDA_EXT_STATUS
    why = "QUICKLLM_BUILD_CUDA=0" if os.environ.get("QUICKLLM_BUILD_CUDA", "").strip() == "0" else \
        _build.build_unavailable()
    CUDA_EXT_STATUS = (f"not loaded: {aot}; no just-in-time build ({why})" if why else
                       f"not loaded yet: compiled for the GPU (or loaded from the cache) on first CUDA use; {aot}")


# Nothing here touches the GPU at import: the just-in-time library is looked up on first CUDA use.
_initial_status()
