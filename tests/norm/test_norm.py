"""RMSNorm and residual-add + RMSNorm: bit for bit against transformers' LlamaRMSNorm, Qwen2RMSNorm and
GemmaRMSNorm, each backend against a float64 oracle (forward and every gradient), the in-place serving
variant, empty inputs, opcheck, torch.compile / torch.export, bad inputs, the module, and GPU shapes."""
import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, assert_close, gen, poison_allocator

import quickllm_kernels as qk
from quickllm_kernels import _library
from quickllm_kernels.norm import RMSNorm
from quickllm_kernels.norm import reference as ref

transformers = pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6
# Layouts of x [..., H] (and of the residual, the gradients): every one but the first has a leading
# stride other than H; the last two cannot be viewed as [B, S, H] rows with a unit last stride.
LAYOUTS = ["contiguous", "rows_of_wider", "transposed", "4d_unmergeable", "last_strided"]


def make(shape, dtype, layout="contiguous", seed=0, scale=1.0, device=DEVICE):
    """A fresh random tensor of `shape` [..., H] laid out as `layout` (a view of a larger or permuted
    tensor made in the final dtype and device, so the layout survives)."""
    h, lead = shape[-1], tuple(shape[:-1])

    def rand(*size):
        return (scale * torch.randn(*size, generator=gen(seed))).to(device=device, dtype=dtype)

    if layout == "contiguous":
        t = rand(*shape)
    elif layout == "rows_of_wider":  # rows of a wider projection output (leading stride H + 5)
        t = rand(*lead, h + 5)[..., 2:2 + h]
    elif layout == "transposed":  # [S, B, H] storage seen as [B, S, H]
        t = rand(*reversed(lead), h).transpose(0, len(lead) - 1) if len(lead) > 1 else rand(*shape)
    elif layout == "4d_unmergeable":  # [B, C, S, H] from [C, B, S, H] storage: B and C cannot merge
        t = rand(lead[1], lead[0], *lead[2:], h).transpose(0, 1)
    elif layout == "last_strided":
        t = rand(*lead, 2 * h)[..., ::2]
    else:
        raise ValueError(layout)
    assert tuple(t.shape) == tuple(shape)
    return t


def make_weight(h, dtype, offset, seed=1, device=DEVICE):
    """Trained-looking weights: about 1 for Llama (offset 0), about 0 for Gemma (stored as w - 1)."""
    return (0.2 * torch.randn(h, generator=gen(seed)) + (1.0 - offset)).to(device=device, dtype=dtype)


def oracle(z, w, offset, eps=EPS):
    """The formula in float64 from the (rounded) inputs: z * rsqrt(mean(z^2) + eps) * (offset + w)."""
    z, w = z.double(), w.double()
    rstd = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return z * rstd * (offset + w), rstd.squeeze(-1)


def formula(x, w, rstd, offset):
    """transformers' rounding, given the row's float32 rstd: Llama casts x * rstd to x's dtype and
    multiplies by the weight there; Gemma multiplies by (offset + w) in float32 and casts once."""
    h = x.float() * rstd.float()[..., None]
    if offset == 0:
        return w * h.to(x.dtype)
    return (h * (offset + w.float())).to(x.dtype)


def hf_module(kind, w, eps=EPS):
    cls = {"llama": LlamaRMSNorm, "qwen2": Qwen2RMSNorm, "gemma": GemmaRMSNorm}[kind]
    m = cls(w.shape[0], eps=eps).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
    return m


HF_KINDS = {"llama": 0.0, "qwen2": 0.0, "gemma": 1.0}


# ------------------------------------------------------------------------------------------------
# transformers, bit for bit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HF_KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,layout", [(1, "contiguous"), (7, "transposed"), (129, "rows_of_wider"),
                                      (1000, "last_strided"), (64, "4d_unmergeable")])
def test_reference_is_transformers_bit_for_bit(kind, dtype, h, layout):
    shape = (2, 3, 5, h) if layout == "4d_unmergeable" else (3, 5, h)
    x = make(shape, dtype, layout, device="cpu", scale=3.0)
    offset = HF_KINDS[kind]
    w = make_weight(h, dtype, offset, device="cpu")
    want = hf_module(kind, w)(x)
    with qk.use_backend("reference"):
        got = qk.rms_norm(x, w, EPS, weight_offset=offset)
        module = RMSNorm(h, EPS, weight_offset=offset).to(dtype)
        module.load_state_dict(hf_module(kind, w).state_dict())
        by_module = module(x)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(by_module, want)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", [1, 7, 129, 1000, 4096, 20000])
def test_kernel_rounding_is_transformers(backend_name, offset, dtype, h):
    """Given the kernel's own float32 rstd, y is transformers' rounding of x * rstd * (offset + w) bit for
    bit; rstd is the float32 value up to summation order, so in 16-bit dtypes y equals transformers'
    module's output except where that order moves a rounding (a small fraction of elements)."""
    x = make((3, 5, h), dtype, seed=h, scale=3.0)
    w = make_weight(h, dtype, offset, seed=h + 1)
    with qk.use_backend(backend_name):
        y, rstd = torch.ops.quickllm.rms_norm(x, w, EPS, offset)
    assert qk.last_backends()["rms_norm"] == backend_name
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    assert torch.equal(y, formula(x, w, rstd, offset))
    want_y, want_rstd = oracle(x, w, offset)
    assert_close(rstd, want_rstd, torch.float32)
    if offset in (0.0, 1.0) and dtype != torch.float32:  # (in float32 a row's rstd shows in all its elements)
        hf = hf_module("llama" if offset == 0 else "gemma", w)(x)
        assert (y == hf).float().mean() >= 0.99


# ------------------------------------------------------------------------------------------------
# Each backend against the float64 oracle: forward and gradients
# ------------------------------------------------------------------------------------------------

CASES = [  # (leading shape, H, layout of x, layout of the other inputs)
    ((3, 5), 1, "contiguous", "rows_of_wider"),
    ((4, 5), 7, "transposed", "last_strided"),
    ((2, 3, 4), 129, "4d_unmergeable", "transposed"),
    ((11,), 1000, "rows_of_wider", "contiguous"),
    ((3, 4), 256, "last_strided", "transposed"),
    ((2, 3), 20000, "transposed", "rows_of_wider"),  # longer than a Triton tile: two passes over column blocks
]
CASE_IDS = [f"{c[1]}-{c[2]}" for c in CASES]


def _oracle_grads(z, w, offset, g, g_res=None):
    """Gradients of the float64 formula (through z = the rounded sum, for add_rms_norm)."""
    zz = z.detach().double().requires_grad_()
    ww = w.detach().double().requires_grad_()
    y, _ = oracle(zz, ww, offset)
    outs, grads = [y], [g.double()]
    if g_res is not None:
        outs.append(zz)
        grads.append(g_res.double())
    dz, dw = torch.autograd.grad(outs, (zz, ww), grads)
    return dz, dw


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,h,layout,other", CASES, ids=CASE_IDS)
def test_rms_norm_matches_oracle(backend_name, offset, dtype, lead, h, layout, other, nan_empty):
    """Every element of y, rstd, grad_x and grad_weight is written (their buffers start as NaN here)."""
    shape = (*lead, h)
    x = make(shape, dtype, layout, seed=h)
    w = make_weight(h, dtype, offset, seed=h + 1)
    g = make(shape, dtype, other, seed=h + 2)
    want_y, want_rstd = oracle(x, w, offset)
    want_dx, want_dw = _oracle_grads(x, w, offset, g)
    with qk.use_backend(backend_name):
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = qk.rms_norm(xx, ww, EPS, weight_offset=offset)
        y.backward(g)
        _, rstd = torch.ops.quickllm.rms_norm(x, w, EPS, offset)
    assert qk.last_backends()["rms_norm"] == backend_name
    assert qk.last_backends()["rms_norm_backward"] == backend_name
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want_y, dtype)
    assert_close(rstd, want_rstd, torch.float32)
    assert xx.grad.dtype == dtype and ww.grad.dtype == dtype
    assert_close(xx.grad, want_dx, dtype)
    assert_close(ww.grad, want_dw, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,h,layout,other", CASES, ids=CASE_IDS)
def test_add_rms_norm_matches_oracle(backend_name, offset, dtype, lead, h, layout, other, nan_empty):
    """new_residual is torch's own x + residual bit for bit; y is the norm of that rounded sum, exactly
    rms_norm's result on it; the gradients of both outputs reach x, residual and weight."""
    shape = (*lead, h)
    x = make(shape, dtype, layout, seed=h)
    r = make(shape, dtype, other, seed=h + 3, scale=4.0)
    w = make_weight(h, dtype, offset, seed=h + 1)
    g, g_res = make(shape, dtype, seed=h + 2), make(shape, dtype, other, seed=h + 4)
    z = x + r
    want_y, _ = oracle(z, w, offset)
    want_dz, want_dw = _oracle_grads(z, w, offset, g, g_res)
    with qk.use_backend(backend_name):
        xx, rr, ww = (t.detach().clone().requires_grad_() for t in (x, r, w))
        y, new_residual = qk.add_rms_norm(xx, rr, ww, EPS, weight_offset=offset)
        torch.autograd.backward((y, new_residual), (g, g_res))
        y_of_sum = qk.rms_norm(z, w, EPS, weight_offset=offset)
    assert qk.last_backends()["add_rms_norm"] == backend_name
    assert torch.equal(new_residual, z) and new_residual.is_contiguous()
    assert torch.equal(y, y_of_sum)
    assert_close(y, want_y, dtype)
    assert torch.equal(xx.grad, rr.grad) and xx.grad.data_ptr() != rr.grad.data_ptr()
    assert_close(xx.grad, want_dz, dtype)
    assert_close(ww.grad, want_dw, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_add_rms_norm_gradient_through_one_output(backend_name):
    """Only new_residual used: its gradient passes to x and residual unchanged, weight gets zero; only y
    used: the norm's gradient alone."""
    x, r = make((5, 24), torch.float32, seed=1), make((5, 24), torch.float32, seed=2)
    w = make_weight(24, torch.float32, 0.0)
    g = make((5, 24), torch.float32, seed=3)
    with qk.use_backend(backend_name):
        xx, rr, ww = (t.detach().clone().requires_grad_() for t in (x, r, w))
        _, new_residual = qk.add_rms_norm(xx, rr, ww, EPS)
        new_residual.backward(g)
        assert torch.equal(xx.grad, g) and torch.equal(rr.grad, g) and torch.equal(ww.grad, torch.zeros_like(w))
        xx, rr, ww = (t.detach().clone().requires_grad_() for t in (x, r, w))
        y, _ = qk.add_rms_norm(xx, rr, ww, EPS)
        y.backward(g)
    want_dz, want_dw = _oracle_grads(x + r, w, 0.0, g)
    assert_close(xx.grad, want_dz)
    assert_close(rr.grad, want_dz)
    assert_close(ww.grad, want_dw)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_op_matches_reference(backend_name, with_residual, dtype, nan_empty):
    """torch.ops.quickllm.rms_norm_backward itself, with and without grad_residual, strided inputs."""
    shape, h = (4, 6, 72), 72
    x = make(shape, dtype, "transposed", seed=5)
    w = make_weight(h, dtype, 1.0, seed=6)
    g = make(shape, dtype, "rows_of_wider", seed=7)
    g_res = make(shape, dtype, "last_strided", seed=8) if with_residual else None
    _, rstd = ref.rms_norm(x, w, EPS, 1.0)
    want = ref.rms_norm_backward(g.double(), None if g_res is None else g_res.double(), x.double(), w.double(),
                                 rstd.double(), 1.0)
    with qk.use_backend(backend_name):
        dx, dw = torch.ops.quickllm.rms_norm_backward(g, g_res, x, w, rstd, 1.0)
    assert qk.last_backends()["rms_norm_backward"] == backend_name
    assert dx.shape == x.shape and dx.is_contiguous() and dw.shape == (h,)
    assert_close(dx, want[0], dtype)
    assert_close(dw, want[1], dtype)


def test_gradcheck_float64():
    x = make((3, 4, 9), torch.float64, "transposed", device="cpu").requires_grad_()
    r = make((3, 4, 9), torch.float64, seed=2, device="cpu").requires_grad_()
    for offset in (0.0, 1.0):
        w = make_weight(9, torch.float64, offset, device="cpu").requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: qk.rms_norm(a, b, EPS, weight_offset=offset), (x, w))
        assert torch.autograd.gradcheck(lambda a, b, c: qk.add_rms_norm(a, b, c, EPS, weight_offset=offset),
                                        (x, r, w))


def test_float64_runs_on_reference_only():
    x, w = make((3, 8), torch.float64, device="cpu"), make_weight(8, torch.float64, 0.0, device="cpu")
    y, rstd = torch.ops.quickllm.rms_norm(x, w, EPS, 0.0)
    assert qk.last_backends()["rms_norm"] == "reference" and rstd.dtype == torch.float64
    torch.testing.assert_close(y, oracle(x, w, 0.0)[0], rtol=1e-12, atol=1e-12)
    with qk.use_backend("triton"), pytest.raises(qk.BackendUnavailable, match="float64"):
        qk.rms_norm(x, w)


# ------------------------------------------------------------------------------------------------
# The in-place serving variant (vLLM's fused_add_rms_norm)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("h,layout", [(40, layout) for layout in LAYOUTS] + [(20000, "rows_of_wider")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_add_rms_norm_inplace(backend_name, h, layout, dtype):
    """residual <- x + residual, x <- rms_norm(residual): the functional op's results exactly, written
    through any layout (the last two by the out-of-place fallback; H = 20000 by two passes over the
    row, the second reading what the first did not overwrite), nothing outside the views touched."""
    shape = (2, 3, 4, h) if layout == "4d_unmergeable" else (3, 4, h)
    x0 = make(shape, dtype, layout, seed=11)
    r0 = make(shape, dtype, layout, seed=12, scale=3.0)
    w = make_weight(h, dtype, 0.0)
    (x, x_base), (r, r_base) = _copy_with_storage(x0), _copy_with_storage(r0)
    with qk.use_backend(backend_name):
        want_y, want_z = qk.add_rms_norm(x0, r0, w, EPS)
        out = qk.add_rms_norm_(x, r, w, EPS)
    assert qk.last_backends()["add_rms_norm_"] == backend_name
    assert out[0] is x and out[1] is r
    assert torch.equal(r, want_z) and torch.equal(x, want_y)
    for base, orig in ((x_base, x0), (r_base, r0)):
        outside = torch.ones_like(base, dtype=torch.bool)
        outside.as_strided(orig.shape, orig.stride(), orig.storage_offset()).fill_(False)
        assert torch.equal(base[outside], (orig if orig._base is None else orig._base)[outside])


def _copy_with_storage(t):
    """(a copy of the view t with t's strides into a copy of its whole storage tensor, that tensor)."""
    base = (t if t._base is None else t._base).clone()
    return base.as_strided(t.shape, t.stride(), t.storage_offset()), base


def test_add_rms_norm_inplace_with_autograd_copies():
    """Where autograd records the call (a weight that needs grad), the functional op runs and its
    results are copied in, so gradients reach the weight and the tensors written."""
    x0, r0 = make((4, 16), torch.float64, device="cpu"), make((4, 16), torch.float64, seed=3, device="cpu")
    w = make_weight(16, torch.float64, 0.0, device="cpu").requires_grad_()
    a, b = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    x, r = a * 1.0, b * 1.0  # non-leaf, so they may be written in place
    qk.add_rms_norm_(x, r, w, EPS)
    (x.square().sum() + r.sum()).backward()
    a2, b2, w2 = (t.detach().clone().requires_grad_() for t in (x0, r0, w))
    y, z = qk.add_rms_norm(a2, b2, w2, EPS)
    (y.square().sum() + z.sum()).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


# ------------------------------------------------------------------------------------------------
# Empty inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_empty_rows(backend_name, shape):
    w = make_weight(16, torch.float32, 0.0).requires_grad_()
    with qk.use_backend(backend_name):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        r = torch.randn(shape, device=DEVICE, requires_grad=True)
        y, rstd = torch.ops.quickllm.rms_norm(x, w, EPS, 0.0)
        assert y.shape == shape and rstd.shape == shape[:-1]
        y.sum().backward()
        assert x.grad.shape == shape and torch.equal(w.grad, torch.zeros_like(w))
        w.grad = None
        y, z = qk.add_rms_norm(x, r, w, EPS)
        (y.sum() + z.sum()).backward()
        assert y.shape == z.shape == shape and r.grad.shape == shape
        assert torch.equal(w.grad, torch.zeros_like(w))
        qk.add_rms_norm_(x.detach(), r.detach(), w.detach(), EPS)


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_module_replaces_transformers(kind):
    offset = HF_KINDS[kind]
    hf = hf_module(kind, make_weight(48, torch.bfloat16, offset, device="cpu"), eps=1e-5)
    m = RMSNorm(48, eps=1e-5, weight_offset=offset).to(torch.bfloat16)
    fresh = RMSNorm(48, weight_offset=offset)
    assert torch.equal(fresh.weight, torch.zeros(48) if offset == 1 else torch.ones(48))  # as transformers inits
    assert set(m.state_dict()) == set(hf.state_dict()) == {"weight"}
    m.load_state_dict(hf.state_dict())
    assert m.variance_epsilon == m.eps == 1e-5 and isinstance(m.weight, torch.nn.Parameter)
    x = make((2, 5, 48), torch.bfloat16, device="cpu")
    r = make((2, 5, 48), torch.bfloat16, seed=4, device="cpu")
    assert torch.equal(m(x), hf(x))
    y, z = m(x, r)
    assert torch.equal(z, x + r) and torch.equal(y, hf(x + r))
    assert "eps=1e-05" in repr(m)


# ------------------------------------------------------------------------------------------------
# torch.library contract: opcheck, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_opcheck(backend_name):
    dtype = torch.float64 if backend_name == "reference" else torch.float32
    x = make((3, 4, 24), dtype, "transposed")
    r = make((3, 4, 24), dtype, seed=2)
    w = make_weight(24, dtype, 1.0)
    g = make((3, 4, 24), dtype, seed=3)
    with qk.use_backend(backend_name):
        for offset in (0.0, 1.0):
            torch.library.opcheck(torch.ops.quickllm.rms_norm.default,
                                  (x.detach().requires_grad_(), w.detach().requires_grad_(), EPS, offset))
            torch.library.opcheck(torch.ops.quickllm.add_rms_norm.default,
                                  (x.detach().requires_grad_(), r.detach().requires_grad_(),
                                   w.detach().requires_grad_(), EPS, offset))
            torch.library.opcheck(torch.ops.quickllm.add_rms_norm_.default,
                                  (x.clone(), r.clone(), w, EPS, offset))
            _, rstd = torch.ops.quickllm.rms_norm(x, w, EPS, offset)
            for g_res in (None, r):
                torch.library.opcheck(torch.ops.quickllm.rms_norm_backward.default, (g, g_res, x, w, rstd, offset))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    norm = RMSNorm(32, weight_offset=1.0)
    with torch.no_grad():
        norm.weight.copy_(make_weight(32, torch.float32, 1.0, device="cpu"))
    x = make((4, 32), torch.float32, device="cpu")
    r = make((4, 32), torch.float32, seed=2, device="cpu")

    def f(x, r):
        y, z = norm(x * 2, r)
        return (norm(y) * z).sum()

    want = f(x, r)
    for compiler in ("aot_eager", "inductor"):
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend=compiler)(x, r), want)
    grads = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        xx, rr = x.detach().requires_grad_(), r.detach().requires_grad_()
        norm.zero_grad()
        fn(xx, rr).backward()
        grads.append((xx.grad, rr.grad, norm.weight.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_torch_export():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(16)

        def forward(self, x, residual):
            y, residual = self.norm(x, residual)
            return self.norm(y) + 1, residual

    x, r = make((3, 16), torch.float32, device="cpu"), make((3, 16), torch.float32, seed=2, device="cpu")
    ep = torch.export.export(Block(), (x, r))
    targets = {n.target for n in ep.graph.nodes}
    assert torch.ops.quickllm.add_rms_norm.default in targets and torch.ops.quickllm.rms_norm.default in targets
    for got, want in zip(ep.module()(x, r), Block()(x, r)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any kernel runs
# ------------------------------------------------------------------------------------------------


def _bad(**over):
    a = dict(x=torch.randn(4, 8), residual=torch.randn(4, 8), weight=torch.ones(8), eps=EPS, weight_offset=0.0)
    a.update(over)
    return a


BAD = [
    (dict(weight=torch.ones(9)), ValueError, r"weight must be \[H\] = \[8\] \(x.shape\[-1\]\), got \(9,\)"),
    (dict(weight=torch.ones(1, 8)), ValueError, r"weight must be \[H\] = \[8\]"),
    (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError, r"weight must have x's dtype \(torch.float32\)"),
    (dict(weight=torch.ones(8, device="meta")), ValueError, "weight must be on x's device"),
    (dict(x=torch.zeros(4, 8, dtype=torch.int32), residual=torch.zeros(4, 8, dtype=torch.int32)), TypeError,
     "x must be float32, float16 or bfloat16"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must be a tensor \[..., H\]"),
    (dict(x=torch.randn(4, 0), residual=torch.randn(4, 0), weight=torch.ones(0)), ValueError, "x has no columns"),
    (dict(eps=0.0), ValueError, "eps must be a positive finite number, got 0.0"),
    (dict(eps=-1e-6), ValueError, "eps must be a positive finite number"),
    (dict(eps=float("inf")), ValueError, "eps must be a positive finite number"),
    (dict(eps=float("nan")), ValueError, "eps must be a positive finite number"),
    (dict(weight_offset=float("nan")), ValueError, "weight_offset must be finite"),
]
BAD_ADD = [
    (dict(residual=torch.randn(4, 7)), ValueError, r"residual must have shape \(4, 8\) \(x's\), got \(4, 7\)"),
    (dict(residual=torch.randn(2, 2, 8)), ValueError, "residual must have shape"),
    (dict(residual=torch.randn(4, 8, dtype=torch.bfloat16)), TypeError, "residual must have x's dtype"),
    (dict(residual=torch.randn(4, 8, device="meta")), ValueError, "residual must be on x's device"),
]


def _no_launch(monkeypatch):
    from quickllm_kernels.norm import triton as tri
    monkeypatch.setattr(tri, "launch", lambda *a, **k: pytest.fail("kernel launched on bad input"))


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("over,exc,match,add_only", [b + (False,) for b in BAD] + [b + (True,) for b in BAD_ADD],
                         ids=[b[2][:30] for b in BAD + BAD_ADD])
def test_bad_input(backend_name, over, exc, match, add_only, monkeypatch):
    _no_launch(monkeypatch)
    a = _bad(**over)
    calls = [lambda: qk.add_rms_norm(a["x"], a["residual"], a["weight"], a["eps"], weight_offset=a["weight_offset"]),
             lambda: qk.add_rms_norm_(a["x"], a["residual"], a["weight"], a["eps"], a["weight_offset"])]
    if not add_only:
        calls.append(lambda: qk.rms_norm(a["x"], a["weight"], a["eps"], weight_offset=a["weight_offset"]))
    for call in calls:
        with qk.use_backend(backend_name), pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_backward_bad_input(backend_name, monkeypatch):
    _no_launch(monkeypatch)
    x, w, g = torch.randn(4, 8), torch.ones(8), torch.randn(4, 8)
    rstd = torch.ones(4)
    bwd = torch.ops.quickllm.rms_norm_backward
    with qk.use_backend(backend_name):
        with pytest.raises(ValueError, match=r"grad_y must have shape \(4, 8\)"):
            bwd(g[:3], None, x, w, rstd, 0.0)
        with pytest.raises(TypeError, match="grad_residual must have x's dtype"):
            bwd(g, g.double(), x, w, rstd, 0.0)
        with pytest.raises(ValueError, match=r"rstd must have x's leading shape \(4,\)"):
            bwd(g, None, x, w, torch.ones(4, 1), 0.0)
        with pytest.raises(TypeError, match="rstd must be torch.float32"):
            bwd(g, None, x, w, rstd.half(), 0.0)
        with pytest.raises(ValueError, match=r"weight must be \[H\]"):
            bwd(g, None, x, torch.ones(7), rstd, 0.0)


def test_fake_tensor_validation():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.empty(4, 8), torch.empty(7)
        with pytest.raises(ValueError, match=r"weight must be \[H\] = \[8\]"):
            torch.ops.quickllm.rms_norm(x, w, EPS, 0.0)
        y, rstd = torch.ops.quickllm.rms_norm(x, torch.empty(8), EPS, 0.0)
        assert y.shape == (4, 8) and rstd.shape == (4,) and rstd.dtype == torch.float32


def test_module_bad_eps():
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        RMSNorm(8, eps=0.0)


# ------------------------------------------------------------------------------------------------
# The CUDA extension
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda_ext
def test_extension_registers_norm_kernels():
    for name in ("rms_norm", "add_rms_norm", "add_rms_norm_", "rms_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quickllm::_cuda_{name}", "CUDA")
    assert torch.ops.quickllm.add_rms_norm_.default._schema.is_mutable
    assert not torch.ops.quickllm.add_rms_norm.default._schema.is_mutable
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.quickllm._cuda_rms_norm(torch.randn(2, 8), torch.ones(8), EPS, 0.0)


# ------------------------------------------------------------------------------------------------
# GPU: model shapes, both kernel backends
# ------------------------------------------------------------------------------------------------

GPU_CASES = {  # name: (leading shape, H)
    "qwen2_7b": ((4096,), 3584),
    "deepseek_v3": ((2, 1000), 7168),
    "llama_8b_decode": ((3,), 4096),
    "qwen3_qk_norm": ((2048, 32), 128),  # per-head q norm over [T, heads, head_dim]
    "llama_405b": ((257,), 16384),
    "wide": ((33,), 40000),  # past both kernels' register tiles
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_model_shapes(backend_name, case, offset, dtype):
    lead, h = GPU_CASES[case]
    shape = (*lead, h)
    x, r = make(shape, dtype, seed=1, device="cuda"), make(shape, dtype, seed=2, device="cuda", scale=4.0)
    w = make_weight(h, dtype, offset, device="cuda")
    g, g_res = make(shape, dtype, seed=3, device="cuda"), make(shape, dtype, seed=4, device="cuda")
    z = x + r
    want_y, want_rstd = oracle(z, w, offset)
    want_dz, want_dw = _oracle_grads(z, w, offset, g, g_res)
    with qk.use_backend(backend_name):
        xx, rr, ww = (t.detach().clone().requires_grad_() for t in (x, r, w))
        poison_allocator(*[z.numel() * z.element_size()] * 2)  # y, new_residual
        y, new_residual = qk.add_rms_norm(xx, rr, ww, EPS, weight_offset=offset)
        torch.autograd.backward((y, new_residual), (g, g_res))
        y1, rstd = torch.ops.quickllm.rms_norm(z, w, EPS, offset)
        x2, r2 = x.clone(), r.clone()
        qk.add_rms_norm_(x2, r2, w, EPS, offset)
    assert qk.last_backends()["add_rms_norm"] == backend_name
    assert torch.equal(new_residual, z) and torch.equal(y, y1) and torch.equal(y, formula(z, w, rstd, offset))
    assert torch.equal(r2, z) and torch.equal(x2, y)
    assert_close(y, want_y, dtype)
    assert_close(rstd, want_rstd, torch.float32)
    assert_close(xx.grad, want_dz, dtype)
    assert_close(ww.grad, want_dw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gpu_unaligned_views_and_determinism(backend_name):
    """Rows at a 2-byte offset (scalar accesses on the CUDA path) give the oracle's values; the
    gradients over 20k rows are bitwise the same on every run (no atomics)."""
    base = torch.randn(20000, 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[:, 1:]
    w = make_weight(4096, torch.bfloat16, 0.0, device="cuda")
    g = torch.randn(20000, 4096, device="cuda", dtype=torch.bfloat16)
    with qk.use_backend(backend_name):
        y, rstd = torch.ops.quickllm.rms_norm(x, w, EPS, 0.0)
        runs = [torch.ops.quickllm.rms_norm_backward(g, None, x, w, rstd, 0.0) for _ in range(3)]
    assert_close(y, oracle(x, w, 0.0)[0], torch.bfloat16)
    assert torch.equal(y, formula(x, w, rstd, 0.0))
    assert all(torch.equal(a[1], runs[0][1]) and torch.equal(a[0], runs[0][0]) for a in runs)
    want = ref.rms_norm_backward(g.double(), None, x.double(), w.double(), rstd.double(), 0.0)
    assert_close(runs[0][1], want[1], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_auto_prefers_compiled_kernels():
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    qk.rms_norm(x, torch.ones(64, device="cuda", dtype=torch.bfloat16))
    expected = "cuda" if _library.CUDA_EXT_LOADED else "triton"
    assert qk.last_backends()["rms_norm"] == expected
