"""One backend registry for every op.

A call of an op runs on one of three backends:

  cuda       the compiled kernels of csrc/ (CUDA tensors; built ahead of time, or for the local GPU
             on first use and cached: see _library.py)
  triton     the Triton kernels (CUDA tensors; CPU tensors when TRITON_INTERPRET=1)
  reference  pure PyTorch, fp32 math: the CPU kernel and the test oracle (any device)

The choice, innermost first: `use_backend(...)` around the call, then QUICKLLM_BACKEND for the
process, then "auto". Auto picks per op and per call, by what is available for the tensors' device:
cuda, then triton, then reference on a GPU; reference on the CPU. It falls back quietly; an explicit
choice that cannot run raises BackendUnavailable with the reason. `last_backends()` (and `info()`)
tell which backend each op actually ran.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

from . import _library

BACKENDS = ("cuda", "triton", "reference")
_CHOICES = BACKENDS + ("auto",)

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("quickllm_backend", default=None)
_last: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name


# The innermost open use_backend() of the process, as torch.compile's traces read it: Dynamo before
# torch 2.14 cannot read a ContextVar, and it guards on a module global (a compiled function is traced
# again when the block around it asks for another backend). Eager calls read the ContextVar.
# Blocks that exit out of order (threads, generators) each remove their own entry, so none leaves a
# stale value behind.
_traced_override: str | None = None
_open_blocks: list[tuple[object, str]] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the block on backend `name` ("cuda", "triton", "reference" or "auto")."""
    global _traced_override
    name = _check_name(name, "use_backend(name)")
    token, entry = _override.set(name), (object(), name)
    _open_blocks.append(entry)
    _traced_override = name
    try:
        yield
    finally:
        _override.reset(token)
        for i in range(len(_open_blocks) - 1, -1, -1):
            if _open_blocks[i] is entry:
                del _open_blocks[i]
                break
        _traced_override = _open_blocks[-1][1] if _open_blocks else None


def _read_settings() -> dict[str, str | bool]:
    return {"backend": os.environ.get("QUICKLLM_BACKEND", "auto"),
            "sync_checks": os.environ.get("QUICKLLM_SYNC_CHECKS", "0") == "1",
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}


_settings: dict[str, str | bool] | None = None


def settings() -> dict[str, str | bool]:
    """The process's settings from the environment, read once, at the first op call (not on every
    call): QUICKLLM_BACKEND, QUICKLLM_SYNC_CHECKS, TRITON_INTERPRET. After changing one of them in a
    running process, call reload_settings(); use_backend() is the way to switch backends for a block.
    Treat the dict as read-only: each reading is a new dict, so a reader never sees a half-filled one."""
    global _settings
    current = _settings
    if current is None:
        current = _settings = _read_settings()
    return current


def reload_settings() -> None:
    """Read QUICKLLM_BACKEND, QUICKLLM_SYNC_CHECKS and TRITON_INTERPRET again."""
    global _settings
    _settings = None


def requested_backend() -> str:
    """The backend asked for at this point: the innermost use_backend, else QUICKLLM_BACKEND, else auto."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(settings()["backend"], "QUICKLLM_BACKEND")


def traced_requested_backend() -> str:
    """requested_backend() as torch.compile's traces see it (process-wide: see _traced_override)."""
    if _traced_override is not None:
        return _traced_override
    return _check_name(settings()["backend"], "QUICKLLM_BACKEND")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return True, f"triton {triton.__version__}"


def triton_interpret() -> bool:
    return settings()["triton_interpret"]


def unavailable_reason(backend: str, op: str, device: torch.device, kernel_limit: str | None = None,
                       limits: dict[str, str | None] | None = None, *, build: bool = True) -> str | None:
    """Why `backend` cannot run `op` on tensors on `device`, or None when it can.

    kernel_limit: the op's reason why its compiled kernels (cuda, triton) cannot take this call's
    inputs (for example "float64 inputs"), or None. limits: the same per backend, for conditions
    only one kernel has (for example the alignment a CUDA kernel's vector loads need).
    build: whether asking about "cuda" on a GPU may compile the CUDA kernels (first use); info() asks
    without, so a report never waits for nvcc.
    """
    if backend == "reference":
        return None
    if kernel_limit is not None:
        return f"the {backend} kernels do not support {kernel_limit} (the reference backend does)"
    if limits and limits.get(backend):
        return f"the {backend} kernel does not support {limits[backend]}"
    if backend == "cuda":
        if device.type != "cuda":
            if not _library.CUDA_EXT_LOADED:
                return f"the CUDA kernels are not loaded ({_library.CUDA_EXT_STATUS})"
            return f"the cuda backend needs CUDA tensors; got tensors on {device}"
        # First CUDA use: load the kernels (compiled once for this GPU, then from the cache), and the
        # sm_90a library after them (also when the ahead-of-time _C was loaded at import).
        if not (_library.CUDA_EXT_LOADED and _library._sm90a_done) and not _library.ensure_cuda_extension(build=build):
            return f"the CUDA kernels are not loaded ({_library.CUDA_EXT_STATUS})"
        if not _library.has_cuda_kernel(op):
            return f"the CUDA kernels include none for {op}"
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return (f"the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
                f"got tensors on {device}")
    raise ValueError(f"unknown backend {backend!r}")


def choose(op: str, device: torch.device, kernel_limit: str | None = None,
           limits: dict[str, str | None] | None = None, order: tuple[str, ...] | None = None, *,
           build: bool = True) -> str:
    """The backend that would run this call of `op` on `device`; BackendUnavailable if an explicit
    request cannot run. order: the op's own auto order on a GPU, where its kernels' strengths differ
    from the default. build: see unavailable_reason."""
    want = requested_backend()
    if want == "auto":
        candidates = (order or ("cuda", "triton", "reference")) if device.type == "cuda" else ("reference",)
        for name in candidates:
            if unavailable_reason(name, op, device, kernel_limit, limits, build=build) is None:
                return name
        raise AssertionError("the reference backend is always available")
    why = unavailable_reason(want, op, device, kernel_limit, limits, build=build)
    if why is not None:
        raise BackendUnavailable(f"{op}: backend {want!r} was requested but cannot run: {why}")
    return want


def select(op: str, device: torch.device, kernel_limit: str | None = None,
           limits: dict[str, str | None] | None = None, order: tuple[str, ...] | None = None) -> str:
    """choose(), for a call that runs now: recorded for last_backends() and info()."""
    name = choose(op, device, kernel_limit, limits, order)
    if _last.get(op) != name:
        _last[op] = name
    return name


def last_backends() -> dict[str, str]:
    """Op name -> the backend its most recent call ran on, in this process."""
    return dict(_last)
