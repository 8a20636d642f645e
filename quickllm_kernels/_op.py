"""One declaration per op, and everything derived from it.

An op is declared once, as an `Op`: its argument checks (which run on real and fake tensors alike),
its fake kernel, its implementation on each backend with the conditions that backend's kernel puts
on a call, the value checks that need a host sync, and its autograd formula. `define(op)` registers
it with torch.library (the CPU/CUDA implementation that checks, chooses a backend and runs it; the
fake kernel, also for the `_cuda_` twin; autograd) and adds it to `OPS`, from which info(), the
smoke pass, the benchmarks and the Triton compile test take their op lists.

The schema itself lives in schemas.def, the one source C++ reads too.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Callable

import torch

from . import _library, backend


@dataclasses.dataclass(frozen=True)
class Impl:
    """A backend's implementation. fn(*args) runs the op after its checks; for the cuda backend it is
    fn(kernel, *args), kernel being the `_cuda_<name>` op. supports(*args): why this kernel cannot
    take this call (alignment, int32 limits, ...), or None."""
    fn: Callable
    supports: Callable | None = None


@dataclasses.dataclass
class Op:
    """An op of the quickllm library (its schema is schemas.def's entry of the same name).

    check(*args): raises with a message naming the argument; shapes, dtypes and devices only, so it
        also runs on fake tensors (torch.compile, torch.export) and before any launch.
    fake(*args): outputs with the right shapes, dtypes and devices (check has run).
    reference(*args): the PyTorch reference, float32 math (float64 too): the CPU kernel and the oracle.
    triton, cuda: the kernels, or None.
    sync_check(*args): checks of tensor values (index ranges). Free on the CPU, so always run there; on
        a GPU they cost a host sync, so only with QUICKLLM_SYNC_CHECKS=1 and never during CUDA-graph
        capture. Without them a kernel must stay in bounds and mark bad rows (NaN).
    kernel_limit(*args): why neither compiled kernel can take this call (float64, say), or None.
    device_limit(device): why no compiled kernel can run on this device at all, or None (info()).
    auto_order(device, args): the op's own order of backends on a GPU for this call (args None: a
        typical call, for info()), or None for cuda, triton, reference. Set from measurements where
        the kernels' strengths differ by shape (bench/results/).
    backward, setup_context: autograd (torch.library.register_autograd), or None.
    family: the op family (the package module that declares it): benchmarks and docs group by it.
    composite: the op has no kernels of its own: `reference` is its implementation on every backend
        (it calls other quickllm ops, which choose theirs), so no backend is chosen for it.
    """
    name: str
    check: Callable
    fake: Callable
    reference: Callable
    triton: Impl | None = None
    cuda: Impl | None = None
    sync_check: Callable | None = None
    kernel_limit: Callable | None = None
    device_limit: Callable | None = None
    auto_order: Callable | None = None
    backward: Callable | None = None
    setup_context: Callable | None = None
    family: str = ""
    composite: bool = False

    @property
    def schema(self) -> str:
        return _library.SCHEMAS[self.name]

    def device_of(self, args) -> torch.device:
        for a in args:
            if isinstance(a, torch.Tensor):
                return a.device
        raise TypeError(f"{self.name}: no tensor argument")

    def limits(self, args, device: torch.device) -> tuple[str | None, dict[str, str | None]]:
        """(why neither kernel can take this call, {backend: why this kernel cannot}) for these args."""
        limit = self.kernel_limit(*args) if self.kernel_limit else None
        if limit is None and self.device_limit is not None:
            limit = self.device_limit(device)
        per = {}
        for name, impl in (("cuda", self.cuda), ("triton", self.triton)):
            if impl is None:
                per[name] = "this op (no kernel of its own)"
            elif impl.supports is not None and limit is None:
                per[name] = impl.supports(*args)
        return limit, per

    def unavailable(self, backend_name: str, device: torch.device, *, build: bool = True) -> str | None:
        """Why `backend_name` cannot run this op on `device` whatever the arguments, or None."""
        if self.composite:
            return None
        limit = self.device_limit(device) if self.device_limit else None
        per = {b: "this op (no kernel of its own)" for b, impl in (("cuda", self.cuda), ("triton", self.triton))
               if impl is None}
        return backend.unavailable_reason(backend_name, self.name, device, limit, per, build=build)

    def would_use(self, device: torch.device) -> str:
        """The backend auto (or the requested backend) picks for a typical call on `device`; compiles
        nothing (info())."""
        if self.composite:
            return "composite (its inner ops choose)"
        return backend.choose(self.name, device, self.device_limit(device) if self.device_limit else None,
                              {b: self.unavailable(b, device, build=False) for b in ("cuda", "triton")},
                              self.auto_order(device, None) if self.auto_order else None, build=False)

    def choose(self, args) -> str:
        """Check the arguments (values too, where that is free or asked for) and pick the backend."""
        self.check(*args)
        device = self.device_of(args)
        if self.sync_check is not None and _sync_checks_wanted(device):
            self.sync_check(*args)
        limit, per = self.limits(args, device)
        order = self.auto_order(device, args) if self.auto_order else None
        return backend.select(self.name, device, limit, per, order)

    def run(self, *args):
        if self.composite:
            self.check(*args)
            return self.reference(*args)
        name = self.choose(args)
        if name == "reference":
            return self.reference(*args)
        if name == "cuda":
            return self.cuda.fn(_library.cuda_kernel(self.name), *args)
        return self.triton.fn(*args)

    def fake_run(self, *args):
        self.check(*args)
        return self.fake(*args)

    def compiles_to_triton(self, args) -> bool:
        """Under torch.compile: whether this call would run on the Triton backend, decided from what
        tracing knows (shapes, dtypes, devices, the requested backend). Where the answer depends on
        anything else (the CUDA kernel's alignment rules, say) it is False and the call stays the
        op itself, which chooses at run time as in eager mode."""
        if self.triton is None or self.composite:
            return False
        device = self.device_of(args)
        if device.type != "cuda" or (self.sync_check is not None and backend.settings()["sync_checks"]):
            return False  # (the op's own path runs the value checks asked for)
        want = backend.traced_requested_backend()
        if want not in ("auto", "triton"):
            return False
        self.check(*args)
        if self.kernel_limit is not None and self.kernel_limit(*args) is not None:
            return False
        index = device.index if device.index is not None else 0
        if want == "auto":
            order = (self.auto_order(device, args) if self.auto_order else None) or ("cuda", "triton", "reference")
            first = next(b for b in order if b == "reference" or _available(self.name, b, index))
            if first != "triton":
                return False
        elif not _available(self.name, "triton", index):
            return False
        return self.triton.supports is None or self.triton.supports(*args) is None


def _sync_checks_wanted(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if not backend.settings()["sync_checks"]:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has stride 1 (or at most one element), else a contiguous copy: the
    layout every kernel of the package reads rows in."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


OPS: dict[str, Op] = {}
TRITON_TWINS: dict[str, Callable] = {}  # name -> quickllm::_triton_<name>, a torch.library.triton_op


def _available(name: str, backend_name: str, index: int) -> bool:
    """Whether `backend_name` can run op `name` on cuda:`index` for some arguments (the build, the
    device's limits). Constant for the process: torch.compile evaluates it once while tracing."""
    key = (name, backend_name, index)
    if key not in _AVAILABLE:
        _AVAILABLE[key] = OPS[name].unavailable(backend_name, torch.device("cuda", index)) is None
    return _AVAILABLE[key]


_AVAILABLE: dict[tuple[str, str, int], bool] = {}
_available._dynamo_marked_constant = True  # torch.compiler.assume_constant_result, without importing dynamo


def call(name: str, *args):
    """torch.ops.quickllm.<name>(*args), the way every public function runs an op. In plain eager
    calls (see _plain_eager) the op's implementation runs directly, as the dispatcher would run it.
    Under torch.compile
    (not torch.export, whose graphs keep the op for engines to map), a call that would run on Triton
    goes to the op's Triton twin instead: a torch.library.triton_op whose kernels the compiled graph
    launches itself, with no custom-op boundary and none of the op's Python dispatch."""
    if torch.compiler.is_dynamo_compiling():  # (is_compiling() is process-wide while any thread compiles)
        if name in TRITON_TWINS and not torch.compiler.is_exporting() and OPS[name].compiles_to_triton(args):
            return TRITON_TWINS[name](*args)
    elif _plain_eager(args):
        return OPS[name].run(*args)
    return getattr(torch.ops.quickllm, name)(*args)


def _plain_eager(args) -> bool:
    """Whether dispatching through torch.ops would add nothing to running the op's implementation
    directly: no autograd to record, no torch function or dispatch mode (FakeTensorMode, tracing,
    schema checks), no functorch transform, no profiler, no torch.jit.trace, no forward-mode AD, plain
    strided CPU or CUDA tensors (no lazy negation or conjugation, no subclasses). Then `call` skips the
    dispatcher's round trip back into Python (about 10 microseconds of host time per call)."""
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled() \
            or torch._C._are_functorch_transforms_active() or torch._C._autograd._profiler_enabled() \
            or torch._C._get_tracing_state() is not None or torch.autograd.forward_ad._current_level >= 0:
        return False  # (a profiler keeps seeing the op as one event; torch.jit.trace records it)
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter:
                return False
            if (grad and a.requires_grad) or not (a.is_cuda or a.is_cpu) or a.layout != torch.strided \
                    or a.is_neg() or a.is_conj():  # the dispatcher resolves lazy negation / conjugation
                return False
    return True


def _mutated_args(schema: str) -> list[str]:
    """Names of the arguments a schema writes (`Tensor(a!) q`)."""
    return re.findall(r"Tensor\(\w+!\)\s+(\w+)", schema.split("->")[0])


_PY_TYPES = {"Tensor": torch.Tensor, "Tensor?": typing.Optional[torch.Tensor], "int": int, "float": float,
             "bool": bool, "str": str, "ScalarType": torch.dtype}


def _python_signature(signature: str) -> inspect.Signature:
    """The annotated Python signature of a schema signature `(Tensor(a!) q, int n) -> (Tensor, Tensor)`,
    from which torch.library.infer_schema gives that schema back."""
    args, ret = (part.strip() for part in signature.split("->"))
    params = []
    for arg in filter(None, (a.strip() for a in args[1:-1].split(","))):
        typ, name = arg.rsplit(" ", 1)
        typ = re.sub(r"\(\w+!?\)", "", typ)  # alias annotations: mutates_args says which are written
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_PY_TYPES[typ]))
    if ret == "()":
        returns = None
    elif ret.startswith("("):
        returns = tuple[tuple(_PY_TYPES[r.strip()] for r in ret[1:-1].split(","))]
    else:
        returns = _PY_TYPES[ret]
    return inspect.Signature(params, return_annotation=returns)


def _define_triton_twin(op: Op) -> None:
    """quickllm::_triton_<name>: the op's Triton implementation as a torch.library.triton_op (its
    launches go through wrap_triton while torch.compile traces it), with the op's checks, fake and
    autograd."""
    from . import _launch  # noqa: PLC0415

    def run(*args):
        op.check(*args)
        with _launch.traceable():
            return op.triton.fn(*args)

    signature = op.schema[op.schema.index("("):]  # SCHEMAS holds "name(...) -> ..."
    run.__signature__ = _python_signature(signature)  # triton_op of torch < 2.14 infers the schema from it
    twin = torch.library.triton_op(f"quickllm::_triton_{op.name}", run, mutates_args=_mutated_args(signature),
                                   schema=signature)
    twin.register_fake(op.fake_run)
    if op.backward is not None:
        twin.register_autograd(_same_backend_backward(op.backward), setup_context=_remember_backend(op.setup_context))
    TRITON_TWINS[op.name] = twin


def _remember_backend(setup_context):
    """The backend asked for around the forward call, kept for the backward: autograd runs the
    backward of CUDA tensors on its own threads, which do not see the caller's use_backend()."""
    def setup(ctx, inputs, output):
        ctx.quickllm_backend = backend.requested_backend()
        return setup_context(ctx, inputs, output)
    return setup


def _same_backend_backward(fn):
    def run(ctx, *grads):
        with backend.use_backend(ctx.quickllm_backend):
            return fn(ctx, *grads)
    return run


def define(op: Op) -> Op:
    """Register `op` with torch.library and add it to OPS."""
    if op.name in OPS:
        raise ValueError(f"op {op.name} is defined twice")
    if op.name not in _library.SCHEMAS:
        raise ValueError(f"op {op.name} has no entry in schemas.def")
    qualname = f"quickllm::{op.name}"
    torch.library.impl(qualname, ("CPU", "CUDA"), op.run, lib=_library.LIB)
    torch.library.register_fake(qualname, op.fake_run, lib=_library.LIB)
    if op.backward is not None:
        torch.library.register_autograd(qualname, _same_backend_backward(op.backward),
                                        setup_context=_remember_backend(op.setup_context), lib=_library.LIB)
    if op.cuda is not None:
        _library.register_twin_fake(op.name, op.fake_run)
    OPS[op.name] = op
    if op.triton is not None and not op.composite:
        _define_triton_twin(op)
    return op
