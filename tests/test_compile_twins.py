"""The Triton twins: every op with a Triton kernel also exists as `quickllm::_triton_<name>`, a
torch.library.triton_op, which torch.compile reaches where a call would run on Triton, so the compiled
graph launches the kernels itself. On the CPU: the twins' schemas and eager results, and that the
routing decision traces without a graph break; on a GPU: the compiled code, its results, gradients,
and opcheck of every twin."""
import re

import pytest
import torch
from conftest import DEVICE

import quickllm_kernels as qk
from quickllm_kernels import _op
from quickllm_kernels._library import SCHEMAS
from quickllm_kernels._op import OPS, TRITON_TWINS
from quickllm_kernels.fp8 import reference as ref_fp8


def _example_args(name, device=DEVICE, m=64):
    """Arguments of one call of op `name` at small shapes (the op's schema order)."""
    g = torch.Generator().manual_seed(hash(name) % 1000)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    if name in ("apply_rope", "apply_rope_"):
        return (rnd(3, 2, 64).bfloat16(), rnd(3, 1, 64).bfloat16(), torch.tensor([0, 5, 9], device=device),
                qk.rope_cache(64, 16, device=device), True, False)
    if name == "token_logprobs":
        return rnd(4, 50).bfloat16(), torch.tensor([1, 7, -100, 49], device=device), 0.7, -100
    if name == "token_logprobs_backward":
        logits, ids, t, ig = _example_args("token_logprobs", device)
        _, ent, lse = OPS["token_logprobs"].reference(logits, ids, t, ig)
        return rnd(4), rnd(4), logits, ids, lse, ent, t, ig
    if name == "weight_dequant":
        return rnd(300, 260).to(torch.float8_e4m3fn), rnd(3, 3).abs(), 128, 128, torch.bfloat16
    if name == "act_quant":
        return rnd(5, 300).bfloat16(), 128, False
    if name == "fp8_block_gemm":
        a, sa = ref_fp8.act_quant(rnd(m, 256), 128)
        b, sb = ref_fp8.weight_quant(rnd(200, 256))
        return a, sa, b, sb, torch.bfloat16
    if name == "moe_route":
        return rnd(7, 64), rnd(64), 4, True, True, 8, 2, 2.5
    offs = torch.tensor([3, 3, 9, 12], dtype=torch.int32, device=device)  # 12 rows over 4 experts, one empty
    if name == "grouped_mm":
        return rnd(12, 40).bfloat16(), rnd(4, 24, 40).bfloat16(), offs
    if name == "grouped_mm_wgrad":
        return rnd(12, 24).bfloat16(), rnd(12, 40).bfloat16(), offs, 4
    if name == "fp8_grouped_gemm":
        a, sa = ref_fp8.act_quant(rnd(12, 256), 128)
        w = [ref_fp8.weight_quant(rnd(200, 256)) for _ in range(4)]
        return a, sa, torch.stack([q for q, _ in w]), torch.stack([s_ for _, s_ in w]), offs, torch.bfloat16
    ids = torch.tensor([[0, 2], [3, 2], [2, 0], [1, 3], [2, 3]], dtype=torch.int32, device=device)
    if name == "moe_sort":
        return ids, 4
    if name == "moe_align_block_size":
        return ids, 4, 4
    if name == "moe_permute":
        sorted_pairs = OPS["moe_sort"].reference(ids, 4)[0]
        return rnd(5, 40).bfloat16(), sorted_pairs, 2
    if name == "moe_combine":
        pair_rows = OPS["moe_sort"].reference(ids, 4)[1]
        return rnd(10, 40).bfloat16(), rnd(5, 2).abs(), pair_rows
    if name == "silu_mul":
        return (rnd(6, 48).bfloat16(),)
    if name == "silu_mul_backward":
        return rnd(6, 24).bfloat16(), rnd(6, 48).bfloat16()
    if name == "mla_decode":
        table = torch.tensor([[2, 0, 1], [3, 5, 4]], dtype=torch.int32, device=device)
        return (rnd(2, 1, 8, 80).bfloat16(), rnd(6, 16, 80).bfloat16(), table,
                torch.tensor([40, 17], dtype=torch.int32, device=device), 0.125, 64, True)
    if name == "mla_cache_write":
        return (torch.zeros(4, 16, 80, device=device).bfloat16(), torch.tensor([3, -1, 60], device=device),
                rnd(3, 64).bfloat16(), rnd(3, 16).bfloat16())
    if name == "rms_norm":
        return rnd(5, 96).bfloat16(), rnd(96).bfloat16(), 1e-6, 0.0
    if name in ("add_rms_norm", "add_rms_norm_"):
        return rnd(5, 96).bfloat16(), rnd(5, 96).bfloat16(), rnd(96).bfloat16(), 1e-6, 0.0
    if name == "rms_norm_backward":
        x, w = rnd(5, 96).bfloat16(), rnd(96).bfloat16()
        rstd = OPS["rms_norm"].reference(x, w, 1e-6, 0.0)[1]
        return rnd(5, 96).bfloat16(), rnd(5, 96).bfloat16(), x, w, rstd, 0.0
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(TRITON_TWINS))
def test_every_twin_has_example_args_the_op_takes(name):
    """The GPU opcheck below calls every twin with these arguments: each must exist and be accepted
    by the op (here on the reference backend)."""
    args = _example_args(name, "cpu")
    with qk.use_backend("reference"):
        getattr(torch.ops.quickllm, name)(*args)


def test_every_triton_op_has_a_twin_with_its_schema():
    assert set(TRITON_TWINS) == {n for n, op in OPS.items() if op.triton is not None and not op.composite}
    # alias set names are free, and torch < 2.14 infers the schema from the Python signature (int -> SymInt)
    alias = lambda s: re.sub(r"\((\w+)!\)", "(!)", s).replace("SymInt", "int")  # noqa: E731
    for name in TRITON_TWINS:
        twin = getattr(torch.ops.quickllm, f"_triton_{name}").default._schema
        assert alias(str(twin)) == alias("quickllm::_triton_" + SCHEMAS[name]), name
        assert _op._python_signature(SCHEMAS[name][SCHEMAS[name].index("("):]) is not None
    assert _op._mutated_args(SCHEMAS["apply_rope_"]) == ["q", "k"]
    assert _op._mutated_args(SCHEMAS["apply_rope"]) == []


@pytest.mark.triton
@pytest.mark.parametrize("name", ["apply_rope", "apply_rope_", "act_quant", "token_logprobs"])
def test_twin_runs_the_triton_kernel(name):
    args = _example_args(name)
    clone = lambda a: tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a)  # noqa: E731
    got_args, want_args = clone(args), clone(args)
    got = getattr(torch.ops.quickllm, f"_triton_{name}")(*got_args)
    with qk.use_backend("triton"):
        want = getattr(torch.ops.quickllm, name)(*want_args)
    flat = lambda r, a: [t for t in ((r if isinstance(r, tuple) else (r,)) if r is not None else ()) + a  # noqa: E731
                         if isinstance(t, torch.Tensor)]
    for g_, w_ in zip(flat(got, got_args), flat(want, want_args)):
        assert torch.equal(g_.view(torch.uint8) if g_.dtype == torch.float8_e4m3fn else g_,
                           w_.view(torch.uint8) if w_.dtype == torch.float8_e4m3fn else w_)


def test_twin_checks_its_arguments():
    q, k, pos, cache, neox, inv = _example_args("apply_rope")
    with pytest.raises((ValueError, TypeError, RuntimeError), match="positions|cos_sin_cache"):
        torch.ops.quickllm._triton_apply_rope(q, k, pos[:2], cache, neox, inv)


@pytest.mark.parametrize("name,m,backend_name,want", [
    ("fp8_block_gemm", 64, "auto", True),     # Hopper: Triton first from 17 rows
    ("fp8_block_gemm", 4, "auto", False),     # decode rows: the CUDA kernel first
    ("apply_rope", 0, "auto", False),          # CUDA first
    ("apply_rope", 0, "triton", True),
    ("apply_rope_", 0, "triton", True),
    ("token_logprobs_backward", 0, "triton", True),
    ("act_quant", 0, "reference", False),
])
def test_routing_decision_traces_without_graph_breaks(monkeypatch, name, m, backend_name, want):
    """compiles_to_triton runs inside torch.compile's trace: on the CPU, with the device and the
    availability of a GPU build stood in, it must compile with fullgraph=True and decide as eager would."""
    from quickllm_kernels import fp8

    monkeypatch.setattr(_op.Op, "device_of", lambda self, args: torch.device("cuda", 0))
    monkeypatch.setattr(_op, "_available", lambda n, b, i: True)
    monkeypatch.setattr(fp8, "_capability", lambda i: (9, 0))
    args = _example_args(name, device="cpu", m=m or 64)
    op = OPS[name]
    decide = torch.compile(lambda *a: torch.tensor(op.compiles_to_triton(a)), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with qk.use_backend(backend_name):
        assert bool(decide(*args)) is want
        assert op.compiles_to_triton(args) is want


# ------------------------------------------------------------------------------------------------
# GPU: the compiled graph launches the Triton kernels itself
# ------------------------------------------------------------------------------------------------


def test_compiled_routing_follows_use_backend():
    """The traced routing reads the requested backend through a global that torch.compile guards on:
    a compiled function asked for under another backend is traced again, not replayed."""
    from quickllm_kernels import backend

    f = torch.compile(lambda x: x + (1 if backend.traced_requested_backend() == "triton" else 2),
                      fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with qk.use_backend("triton"):
        assert f(x).tolist() == [1, 1]
    with qk.use_backend("reference"):
        assert f(x).tolist() == [2, 2]
    assert f(x).tolist() == [2, 2]  # auto
    with qk.use_backend("triton"):
        assert f(x).tolist() == [1, 1]


# opcheck's test_schema compares inputs before and after with torch.allclose, which float8 tensors do
# not implement: for the twins with fp8 inputs the same check (inputs unchanged) is made on their bits.
_FP8_INPUTS = {"weight_dequant", "fp8_block_gemm", "fp8_grouped_gemm"}


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("name", sorted(TRITON_TWINS))
def test_gpu_opcheck_twins(name):
    if name in ("fp8_block_gemm", "fp8_grouped_gemm") and not qk.fp8.fp8_gemm_supported("cuda"):
        pytest.skip("needs FP8 tensor cores")
    args = _example_args(name, "cuda")
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    before = [bits(a).clone() for a in args if isinstance(a, torch.Tensor)]
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") \
        if name in _FP8_INPUTS else None
    kwargs = {"test_utils": utils} if utils else {}
    torch.library.opcheck(getattr(torch.ops.quickllm, f"_triton_{name}").default, args, **kwargs)
    if name in _FP8_INPUTS:
        for a, b in zip((a for a in args if isinstance(a, torch.Tensor)), before):
            assert torch.equal(bits(a), b)


def _compiled_gemm(backend_name, m=64):
    from torch._inductor.utils import run_and_get_code

    if not qk.fp8.fp8_gemm_supported("cuda"):
        pytest.skip("needs FP8 tensor cores")
    a, sa, b, sb, _ = _example_args("fp8_block_gemm", "cuda", m=m)
    with qk.use_backend(backend_name):
        want = qk.fp8_block_gemm(a, sa, b, sb)
        torch._dynamo.reset()
        got, (code, *_) = run_and_get_code(torch.compile(qk.fp8_block_gemm, fullgraph=True), a, sa, b, sb)
    return got, want, code


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_compiled_gemm_launches_triton_kernel():
    _, _, code = _compiled_gemm("triton")
    assert "_gemm_kernel" in code, code[-3000:]
    assert "quickllm._triton_fp8_block_gemm" not in code and "quickllm.fp8_block_gemm" not in code, code[-3000:]


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("backend_name,m", [("triton", 64), ("auto", 64), ("auto", 4)])
def test_gpu_compiled_gemm_matches_eager(backend_name, m):
    got, want, code = _compiled_gemm(backend_name, m)
    assert torch.equal(got, want)
    # the compiled graph launches the Triton kernel exactly where eager ran Triton (auto: the CUDA
    # kernel for decode rows on Hopper), else it calls the op
    on_triton = qk.last_backends()["fp8_block_gemm"] == "triton"
    assert ("_gemm_kernel" in code) is on_triton and ("quickllm.fp8_block_gemm" in code) is not on_triton


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_compiled_gemm_follows_use_backend():
    a, sa, b, sb, _ = _example_args("fp8_block_gemm", "cuda", m=64)
    compiled = torch.compile(qk.fp8_block_gemm, fullgraph=True)
    with qk.use_backend("triton"):
        want = compiled(a, sa, b, sb)
    with qk.use_backend("reference"):  # another backend asked for: traced again, the op itself runs
        got = compiled(a, sa, b, sb)
        assert qk.last_backends()["fp8_block_gemm"] == "reference"
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_compiled_rope_forward_backward():
    q, k, pos, cache, _, _ = _example_args("apply_rope", "cuda")
    q, k = q.float().requires_grad_(), k.float().requires_grad_()

    def f(q, k):
        qo, ko = qk.apply_rope(q, k, pos, cache)
        return (qo * qo).sum() + ko.sum()

    with qk.use_backend("triton"):
        want = torch.autograd.grad(f(q, k), (q, k))
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k), (q, k))
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)
