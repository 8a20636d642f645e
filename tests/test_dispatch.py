"""How public functions reach their op (_op.call): in plain eager calls the op's implementation runs
directly (the dispatcher's round trip back into Python adds nothing there); wherever torch has
something to do (autograd, modes, transforms, tracing, profiling, other devices or tensor
subclasses) the call goes through torch.ops.quickllm."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import quickllm_kernels as qk
from quickllm_kernels import _op


def _rope_args(**kw):
    q = torch.randn(3, 2, 8, **kw)
    return q, torch.randn(3, 1, 8), torch.arange(3), qk.rope_cache(8, 4), True, False


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_plain_eager_runs_the_implementation_directly():
    assert _op._plain_eager(_rope_args())
    with torch.no_grad():
        assert _op._plain_eager(_rope_args(requires_grad=True))
    assert _op._plain_eager(_rope_args()[:1] + (torch.nn.Parameter(torch.randn(3, 1, 8), requires_grad=False),))


@pytest.mark.parametrize("context", ["grad", "function_mode", "dispatch_mode", "fake", "vmap", "profiler", "meta"])
def test_everything_else_goes_through_torch_ops(context):
    args = _rope_args(requires_grad=context == "grad")
    if context == "grad":
        assert not _op._plain_eager(args)
    elif context == "function_mode":
        with TorchFunctionMode():
            assert not _op._plain_eager(args)
    elif context == "dispatch_mode":
        with _Passthrough():
            assert not _op._plain_eager(args)
    elif context == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode:
            assert not _op._plain_eager(tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                              for a in args))
    elif context == "vmap":
        seen = []
        torch.vmap(lambda q: seen.append(_op._plain_eager((q,))) or q)(torch.randn(2, 3))
        assert seen == [False]
    elif context == "profiler":
        with torch.profiler.profile():
            assert not _op._plain_eager(args)
    elif context == "meta":
        assert not _op._plain_eager((torch.empty(3, 2, 8, device="meta"),))


def test_both_ways_give_the_same_results_and_record_the_backend():
    args = _rope_args()
    direct = qk.apply_rope(*args[:4])
    with _Passthrough():  # forces torch.ops
        dispatched = qk.apply_rope(*args[:4])
    for a, b in zip(direct, dispatched):
        assert torch.equal(a, b)
    assert qk.last_backends()["apply_rope"] == "reference"


def test_profiler_still_sees_the_op():
    args = _rope_args()
    with torch.profiler.profile() as prof:
        qk.apply_rope(*args[:4])
    assert any("quickllm::apply_rope" in e.name for e in prof.events())


def test_jit_trace_neg_views_and_forward_ad_go_through_torch_ops():
    args = _rope_args()
    seen = []
    traced = torch.jit.trace(lambda q, k: seen.append(_op._plain_eager((q, k))) or qk.apply_rope(q, k, args[2], args[3]),
                             (args[0], args[1]), check_trace=False)
    assert seen == [False] and "quickllm::apply_rope" in str(traced.graph)
    assert not _op._plain_eager((torch._neg_view(torch.randn(3)),))
    assert not _op._plain_eager((torch.randn(3, dtype=torch.complex64).conj(),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert not _op._plain_eager(args)


def test_use_backend_blocks_that_exit_out_of_order_leave_nothing_behind():
    """What torch.compile's traces read (a guarded global) follows the innermost open block, and
    blocks of two threads that close out of order each take only their own entry away."""
    import threading

    from quickllm_kernels import backend

    steps = {name: threading.Event() for name in ("a_in", "b_in", "a_out", "b_out")}
    seen = {}

    def thread_a():
        with qk.use_backend("triton"):
            steps["a_in"].set()
            steps["b_in"].wait(10)
        steps["a_out"].set()

    def thread_b():
        steps["a_in"].wait(10)
        with qk.use_backend("cuda"):
            steps["b_in"].set()
            steps["a_out"].wait(10)  # the outer block (thread a) has closed first
            seen["while_b_open"] = backend.traced_requested_backend()

    threads = [threading.Thread(target=f) for f in (thread_a, thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["while_b_open"] == "cuda"
    assert backend._traced_override is None and backend.traced_requested_backend() == "auto"
    assert backend.requested_backend() == "auto"  # this thread's own setting was never touched
