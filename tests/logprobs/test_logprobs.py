"""token_logprobs and linear_token_logprobs: vs log_softmax + gather in float64, each backend vs the
reference (forward and backward), gradients, opcheck, torch.compile, bad inputs, and GPU scale."""
import weakref

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, TOL, gen, poison_allocator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import quickllm_kernels as qk
from quickllm_kernels.logprobs import reference as ref

# Forward results are float32 reductions over V (running max, sums of exp in float32) compared with
# float64: a few float32 ulps of the row's largest |z| (~15 here), whatever the logits dtype.
F32 = dict(rtol=1e-5, atol=5e-5)


def grad_tol(dtype):
    """Gradients are rounded to the logits dtype, on top of the float32 error of p = exp(z - lse)."""
    return {k: max(TOL[dtype][k], 1e-5) for k in ("rtol", "atol")}



def _logits(rows, cols, vocab, dtype, seed=0, device=DEVICE):
    """[rows, cols - 1, V] as the slice logits[:, :-1] of a [rows, cols, V] tensor (non-contiguous)."""
    full = (3 * torch.randn(rows, cols, vocab, generator=gen(seed))).to(device=device, dtype=dtype)
    return full[:, :-1]


def _ids(shape, vocab, seed=1, ignore_every=0, device=DEVICE):
    ids = torch.randint(0, vocab, shape, generator=gen(seed))
    if ignore_every:
        ids.view(-1)[::ignore_every] = -100
    return ids.to(device)


def oracle(logits, ids, temperature):
    """The formula the op promises, in float64."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    keep = ids != -100
    lp = logp.gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).nan_to_num().sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


# ------------------------------------------------------------------------------------------------
# Reference vs the formula
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_reference_matches_log_softmax_gather(temperature):
    logits = _logits(3, 9, 37, torch.float64, device="cpu")
    ids = _ids((3, 8), 37, ignore_every=5, device="cpu")
    lp, ent = qk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True)
    want_lp, want_ent = oracle(logits, ids, temperature)
    torch.testing.assert_close(lp, want_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=1e-12, atol=1e-12)
    assert lp.dtype == torch.float64  # float64 in, float64 out (reference only)
    lp32 = qk.token_logprobs(logits.float(), ids, temperature=temperature)
    assert lp32.dtype == torch.float32


def test_masked_vocabulary_entries():
    """-inf logits (masked tokens) neither turn the entropy into NaN nor break the gradient."""
    logits = torch.randn(4, 10, dtype=torch.float64)
    logits[:, 3:6] = float("-inf")
    ids = torch.tensor([0, 1, 2, 9])
    x = logits.clone().requires_grad_()
    lp, ent = qk.token_logprobs(x, ids, return_entropy=True)
    want_lp, want_ent = oracle(logits, ids, 1.0)
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 3:6] == 0).all()


def test_gradcheck_float64():
    logits = _logits(2, 6, 11, torch.float64, device="cpu").detach().requires_grad_()
    ids = _ids((2, 5), 11, ignore_every=4, device="cpu")
    f = lambda x: qk.token_logprobs(x, ids, temperature=0.8, return_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits,))


# ------------------------------------------------------------------------------------------------
# Kernel backends vs the reference
# ------------------------------------------------------------------------------------------------

VOCABS = [1, 50, 257, 5003]  # none a multiple of a block; 5003 spans several 4096-wide blocks


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kernel_matches_reference(backend_name, vocab, dtype, nan_empty):
    logits = _logits(2, 4, vocab, dtype, seed=vocab)
    ids = _ids((2, 3), vocab, ignore_every=4)
    g_lp = torch.randn(2, 3, generator=gen(2)).to(DEVICE)
    g_ent = torch.randn(2, 3, generator=gen(3)).to(DEVICE)
    l64 = logits.double()  # the oracle: the reference in float64 on the same (rounded) logits
    want = ref.token_logprobs(l64, ids, 0.9, -100)
    want_grad = ref.token_logprobs_backward(g_lp.double(), g_ent.double(), l64, ids, want[2], want[1], 0.9, -100)
    with qk.use_backend(backend_name):
        x = logits.detach().clone().requires_grad_()
        lp, ent = qk.token_logprobs(x, ids, temperature=0.9, return_entropy=True)
        torch.autograd.backward((lp, ent), (g_lp, g_ent))
    assert qk.last_backends()["token_logprobs"] == backend_name
    assert lp.dtype == torch.float32 and lp.shape == ids.shape
    torch.testing.assert_close(lp.double(), want[0], **F32)
    torch.testing.assert_close(ent.double(), want[1], **F32)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), want_grad, **grad_tol(dtype))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_kernel_layouts(backend_name):
    """2-D rows, a 4-D batch, a transposed view and a non-unit last stride all give the reference."""
    base = torch.randn(5, 6, 7, 2 * 33, generator=gen(4)).to(DEVICE)
    cases = [base[0, 0, :, :33], base[..., :33], base.transpose(0, 1)[..., :33], base[..., ::2]]
    for logits in cases:
        ids = _ids(logits.shape[:-1], 33, seed=5)
        want = ref.token_logprobs(logits.double(), ids, 1.0, -100)
        with qk.use_backend(backend_name):
            got = qk.token_logprobs(logits, ids, return_entropy=True)
        torch.testing.assert_close(got[0].double(), want[0], **F32)
        torch.testing.assert_close(got[1].double(), want[1], **F32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_empty_rows(backend_name):
    logits = torch.randn(0, 3, 10, device=DEVICE)
    ids = torch.zeros(0, 3, dtype=torch.int64, device=DEVICE)
    with qk.use_backend(backend_name):
        x = logits.clone().requires_grad_()
        lp = qk.token_logprobs(x, ids)
        lp.sum().backward()
    assert lp.shape == (0, 3) and x.grad.shape == x.shape


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_non_finite_rows(backend_name):
    """An ignored row whose logits are all -inf (or NaN) gets a zero gradient, not NaN; an all -inf row
    has entropy -inf on every backend; NaN in a row makes that row NaN."""
    logits = torch.randn(4, 6, device=DEVICE)
    logits[0] = float("-inf")
    logits[1, 2] = float("nan")
    ids = torch.tensor([-100, -100, 3, 5], device=DEVICE)
    with qk.use_backend(backend_name):
        x = logits.clone().requires_grad_()
        lp, ent = qk.token_logprobs(x, ids, return_entropy=True)
        (lp.sum() + ent[2:].sum()).backward()
        zero = torch.tensor([0], device=DEVICE)
        _, ent_all, lse = torch.ops.quickllm.token_logprobs(logits[:1], zero, 1.0, -100)
        _, _, lse_nan = torch.ops.quickllm.token_logprobs(logits[1:2], zero, 1.0, -100)
    assert qk.last_backends()["token_logprobs"] == backend_name
    assert (x.grad[:2] == 0).all() and torch.isfinite(x.grad[2:]).all()
    assert lse[0] == float("-inf") and ent_all[0] == float("-inf")
    assert torch.isnan(lse_nan).all()


@pytest.mark.triton
def test_triton_out_of_range_ids_give_nan_without_reading():
    from quickllm_kernels.logprobs import triton as tri
    logits = torch.randn(1, 4, 20)
    ids = torch.tensor([0, 20, -3, 19])
    lp, ent, _ = tri.token_logprobs(logits, ids, 1.0, -100)
    assert torch.isnan(lp[1:3]).all() and torch.isfinite(lp[[0, 3]]).all()
    lp_ref, _, _ = ref.token_logprobs(logits[0], ids, 1.0, -100)
    assert torch.isnan(lp_ref[1:3]).all()


# ------------------------------------------------------------------------------------------------
# linear_token_logprobs vs the unfused path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("chunk_rows", [0, 1, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_unfused(backend_name, chunk_rows, with_bias, nan_empty):
    """Every row of lp, ent and grad_hidden is written (their buffers start as NaN here)."""
    n, h, v = 23, 16, 61
    g = gen(6)
    hidden = torch.randn(n, h, generator=g).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) / 4).to(DEVICE)
    bias = torch.randn(v, generator=g).to(DEVICE) if with_bias else None
    ids = _ids((n,), v, ignore_every=6)
    g_lp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
        lp, ent = fn(*leaves)
        torch.autograd.backward((lp, ent), (g_lp, g_ent))
        return (lp, ent), [t.grad for t in leaves]

    def unfused(hd, w, b=None):
        return ref.token_logprobs(torch.nn.functional.linear(hd, w, b), ids, 0.8, -100)[:2]

    want_out, want_grads = grads(unfused)
    with qk.use_backend(backend_name):
        got_out, got_grads = grads(lambda hd, w, b=None: qk.linear_token_logprobs(
            hd, w, ids, bias=b, temperature=0.8, return_entropy=True, chunk_rows=chunk_rows))
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, **F32)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_gradcheck_float64():
    g = gen(7)
    hidden = torch.randn(9, 5, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(13, 5, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(13, generator=g, dtype=torch.float64).requires_grad_()
    ids = _ids((9,), 13, ignore_every=4, device="cpu")
    f = lambda hd, w, b: qk.linear_token_logprobs(hd, w, ids, bias=b, chunk_rows=4, return_entropy=True)  # noqa
    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_linear_never_holds_full_logits(monkeypatch):
    """Every matmul output the fused path makes is one chunk of rows, never [N, V]."""
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    hidden = torch.randn(1000, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    ids = torch.randint(0, 50, (1000,))
    qk.linear_token_logprobs(hidden, weight, ids, chunk_rows=128).sum().backward()
    assert seen and max(s[0] for s in seen) == 128
    seen.clear()
    qk.linear_token_logprobs(hidden, weight, ids).sum().backward()  # auto chunk: max(256, N/32)
    assert max(s[0] for s in seen) == 256


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that the ops run inside it allocate and that are still alive,
    and their peak, as the CUDA caching allocator's memory_allocated would (storages are counted
    once, views and in-place results not at all). The quickllm ops are run through, so the aten ops
    inside them are counted; token_logprobs and its backward are replaced by what their cuda and
    triton kernels allocate (their outputs, nothing else), so that this emulates a GPU run on the
    CPU, where auto picks the reference backend and its float32 intermediates."""

    def __init__(self, *inputs):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.live, self.now, self.peak, self.at_peak = {}, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.quickllm.token_logprobs.default:
            out = tuple(torch.zeros(args[0].shape[:-1]) for _ in range(3))
        elif func is torch.ops.quickllm.token_logprobs_backward.default:
            out = torch.zeros(args[2].shape, dtype=args[2].dtype)
        elif func.namespace == "quickllm":
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self.live or key in self.known or st.nbytes() == 0:
                continue
            self.live[key] = (st.nbytes(), f"{func} {tuple(t.shape)} {t.dtype}")
            self.now += st.nbytes()
            if self.now > self.peak:
                self.peak, self.at_peak = self.now, sorted(self.live.values(), reverse=True)[:6]
            weakref.finalize(st, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key)[0]


def test_linear_workspace_is_one_chunk_of_logits_and_its_gradient():
    """The peak of forward + backward, minus the outputs, is at most one chunk's logits and their
    gradient ([C, V] each, in the weight's dtype) plus per-row vectors: no [N, V] logits, no
    float32 copy of a chunk or of grad_weight, no [V, H] product per chunk, no second chunk alive.
    Sizes so that each of those would break the bound: C V = 1 M elements, V H = 1 M, N V = 4 M."""
    n, h, v = 1024, 256, 4000
    c = max(256, -(-n // 32))  # the auto chunk
    g = gen(10)
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 16).bfloat16().requires_grad_()
    ids = torch.randint(0, v, (n,), generator=g)
    mem = LiveBytes(hidden, weight, ids)
    with mem:
        qk.linear_token_logprobs(hidden, weight, ids).sum().backward()
    outputs = 3 * n * 4 + hidden.grad.nbytes + weight.grad.nbytes  # lp, ent, lse; the two grads
    extra, chunk = mem.peak - outputs, c * v * 2
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert chunk <= extra <= 2 * chunk + 16 * n, f"extra {extra} B; live at the peak: {mem.at_peak}"


def test_linear_bf16_grad_weight_one_rounding_per_chunk():
    """bf16 weights: grad_weight is the sum over chunks of g_c^T h_c, added in bf16 with one rounding
    per chunk (u = 2**-8 of each partial sum S_j), each chunk's product summed in float32 (at most
    c float32 roundings of sum |g||h|). Checked against the same chunks' gradients summed in float64."""
    n, h, v, c = 512, 32, 300, 16  # 32 chunks, the most auto chunking makes
    g = gen(11)
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 4).bfloat16().requires_grad_()
    ids = _ids((n,), v, seed=12, ignore_every=7, device="cpu")
    qk.linear_token_logprobs(hidden, weight, ids, chunk_rows=c).sum().backward()
    hd, w = hidden.detach(), weight.detach()
    _, ent, lse = torch.ops.quickllm.linear_token_logprobs(hd, w, None, ids, 1.0, -100, c)
    exact, bound = torch.zeros(v, h, dtype=torch.float64), torch.zeros(v, h, dtype=torch.float64)
    for r0 in range(0, n, c):
        rows = slice(r0, r0 + c)
        gc = torch.ops.quickllm.token_logprobs_backward(torch.ones(c), torch.zeros(c), torch.nn.functional.linear(
            hd[rows], w), ids[rows], lse[rows], ent[rows], 1.0, -100).double()
        exact += gc.t() @ hd[rows].double()
        bound += 2.0 ** -8 * exact.abs() + c * 2.0 ** -24 * (gc.abs().t() @ hd[rows].double().abs())
    err = (weight.grad.double() - exact).abs()
    assert (err <= bound).all(), f"worst error / bound {float((err / bound).max()):.3f}"


# ------------------------------------------------------------------------------------------------
# torch.library contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_opcheck(backend_name):
    dtype = torch.float64 if backend_name == "reference" else torch.float32
    logits = _logits(2, 5, 19, dtype)
    ids = _ids((2, 4), 19, ignore_every=3)
    with qk.use_backend(backend_name):
        torch.library.opcheck(torch.ops.quickllm.token_logprobs.default,
                              (logits.detach().requires_grad_(), ids, 0.9, -100))
        lp, ent, lse = torch.ops.quickllm.token_logprobs(logits, ids, 0.9, -100)
        torch.library.opcheck(torch.ops.quickllm.token_logprobs_backward.default,
                              (torch.randn_like(lp), torch.randn_like(lp), logits, ids, lse, ent, 0.9, -100))
        hidden = torch.randn(6, 4, dtype=dtype, device=DEVICE, requires_grad=True)
        weight = torch.randn(19, 4, dtype=dtype, device=DEVICE, requires_grad=True)
        lids = _ids((6,), 19)
        torch.library.opcheck(torch.ops.quickllm.linear_token_logprobs.default,
                              (hidden, weight, None, lids, 1.0, -100, 4))


def test_torch_compile_fullgraph_with_backward():
    torch._dynamo.reset()
    logits = _logits(2, 6, 31, torch.float32, device="cpu")
    ids = _ids((2, 5), 31, device="cpu")

    def loss(x):
        lp, ent = qk.token_logprobs(x, ids, temperature=0.7, return_entropy=True)
        return -(lp.mean() + 0.01 * ent.mean())

    a = logits.detach().requires_grad_()
    b = logits.detach().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(a).backward()
    loss(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _bad_args(**over):
    a = dict(logits=torch.randn(3, 10), token_ids=torch.tensor([1, 2, 3]), temperature=1.0)
    a.update(over)
    return a


BAD = [
    (dict(token_ids=torch.tensor([1, 10, 2])), IndexError, r"token_ids must lie in \[0, 10\)"),
    (dict(token_ids=torch.tensor([1, -5, 2])), IndexError, "found -5"),
    (dict(token_ids=torch.tensor([1, 2])), ValueError, "token_ids must have logits' leading shape"),
    (dict(logits=torch.zeros(3, 10, dtype=torch.int64)), TypeError, "logits must be float"),
    (dict(token_ids=torch.tensor([1.0, 2.0, 3.0])), TypeError, "token_ids must be int64"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive"),
    (dict(logits=torch.randn(10)), ValueError, "at least one leading dim"),
    (dict(logits=torch.randn(3, 0)), ValueError, "empty vocabulary"),
    (dict(token_ids=torch.tensor([1, 2, 3], device="meta")), ValueError, "token_ids must be on logits' device"),
]


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("over,exc,match", BAD, ids=[b[2][:28] for b in BAD])
def test_bad_input(backend_name, over, exc, match, monkeypatch):
    if backend_name == "triton":
        from quickllm_kernels.logprobs import triton as tri
        monkeypatch.setattr(tri, "_fwd_kernel", None)  # any launch would fail: errors must come first
    a = _bad_args(**over)
    with qk.use_backend(backend_name), pytest.raises(exc, match=match):
        qk.token_logprobs(a["logits"], a["token_ids"], temperature=a["temperature"])


def test_linear_bad_input():
    h, w, ids = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"weight must be \[V, H\]"):
        qk.linear_token_logprobs(h, torch.randn(10, 7), ids)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        qk.linear_token_logprobs(h, w.double(), ids)
    with pytest.raises(ValueError, match="bias must be"):
        qk.linear_token_logprobs(h, w, ids, bias=torch.randn(9))
    with pytest.raises(ValueError, match=r"token_ids must be \[N\]"):
        qk.linear_token_logprobs(h, w, ids[:3])
    with pytest.raises(IndexError, match="token_ids must lie"):
        qk.linear_token_logprobs(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="temperature"):
        qk.linear_token_logprobs(h, w, ids, temperature=0)


def test_int32_ids_accepted():
    logits = torch.randn(3, 10)
    ids = torch.tensor([1, 2, 3], dtype=torch.int32)
    torch.testing.assert_close(qk.token_logprobs(logits, ids), qk.token_logprobs(logits, ids.long()))


# ------------------------------------------------------------------------------------------------
# GPU: real vocabularies, and rows x V beyond 2**31
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("vocab", [151936, 129280, 32000])
def test_gpu_real_vocabularies(backend_name, vocab):
    logits = _logits(4, 257, vocab, torch.bfloat16, device="cuda")
    ids = _ids((4, 256), vocab, ignore_every=9, device="cuda")
    want = ref.token_logprobs(logits, ids, 1.0, -100)
    g = torch.randn(4, 256, device="cuda")
    want_grad = ref.token_logprobs_backward(g, torch.zeros_like(g), logits, ids, want[2], want[1], 1.0, -100)
    with qk.use_backend(backend_name):
        x = logits.detach().clone().requires_grad_()
        poison_allocator(*[4 * 256 * 4] * 3)  # lp, ent, lse: an unwritten element reads NaN
        lp, ent = qk.token_logprobs(x, ids, return_entropy=True)
        poison_allocator(4 * 256 * vocab * 2)  # the gradient
        lp.backward(g)
    assert qk.last_backends()["token_logprobs"] == backend_name
    torch.testing.assert_close(lp, want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, want[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), want_grad.double(), **grad_tol(torch.bfloat16))


def _all_finite(t, rows=4096):
    """torch.isfinite(t).all() without a bool copy of all of t."""
    return all(bool(torch.isfinite(t[r:r + rows]).all()) for r in range(0, t.shape[0], rows))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gpu_beyond_int32_elements(backend_name):
    """65536 rows x 151936 (about 1e10 elements): rows past 2**31 elements are right, fwd and bwd, and
    every element of both outputs is written."""
    rows, vocab = 65536, 151936
    need = rows * vocab * 2 * 2 + (4 << 30)  # logits + grad in bf16 (19.9 GB each), plus headroom
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory")
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (rows,), device="cuda")
    with qk.use_backend(backend_name):
        x = logits.requires_grad_()
        poison_allocator(*[rows * 4] * 3)
        lp = qk.token_logprobs(x, ids)
        poison_allocator(rows * vocab * 2)
        lp.sum().backward()
    assert _all_finite(lp) and _all_finite(x.grad)  # randn logits: finite everywhere, NaN where unwritten
    tail = slice(rows - 8, rows)  # offsets > 2**31 elements
    want = ref.token_logprobs(logits[tail].detach(), ids[tail], 1.0, -100)
    torch.testing.assert_close(lp[tail], want[0], rtol=1e-5, atol=1e-4)
    want_grad = ref.token_logprobs_backward(torch.ones(8, device="cuda"), torch.zeros(8, device="cuda"),
                                            logits[tail].detach(), ids[tail], want[2], want[1], 1.0, -100)
    torch.testing.assert_close(x.grad[tail].double(), want_grad.double(), **grad_tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gpu_linear_extra_memory_is_one_chunk_of_logits_and_its_gradient(backend_name):
    """Qwen2-7B's lm_head (V = 151936, H = 3584) over N = 16384 bf16 rows, forward + backward.
    Peak memory_allocated minus what was allocated before the call (hidden, weight, ids) minus the
    outputs (lp, ent, lse: 3 N float32, ent and lse saved for backward; grad_hidden [N, H] and
    grad_weight [V, H] in bf16, 1.09 GB) is workspace. Chunks have C = max(256, N/32) = 512 rows, and
    the workspace is one chunk's logits and their gradient: 2 C V bf16 = 297 MiB, 1/16 of the full
    logits' 4.64 GiB, plus small pieces ([N] and [C] vectors, a cuBLAS workspace in case one is
    allocated per call): 64 MiB, less than one more [C, V] chunk (148 MiB). A float32 grad_weight
    accumulator (2.03 GiB), a [V, H] product per chunk (1.01 GiB), a chunk kept alive into the next
    one or the full logits would each break the bound. The same accounting runs on the CPU in
    test_linear_workspace_is_one_chunk_of_logits_and_its_gradient."""
    n, h, v = 16384, 3584, 151936
    c = max(256, -(-n // 32))
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / 60).requires_grad_()
    ids = torch.randint(0, v, (n,), device="cuda")
    with qk.use_backend(backend_name):  # warm-up: cuBLAS workspaces and kernel compilation happen here
        qk.linear_token_logprobs(hidden[:8].detach().requires_grad_(), weight.detach(), ids[:8]).sum().backward()
    poison_allocator(n * h * 2, *[n * 4] * 3)  # grad_hidden (torch.empty_like), lp, ent, lse
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with qk.use_backend(backend_name):
        lp = qk.linear_token_logprobs(hidden, weight, ids)
        lp.sum().backward()
    torch.cuda.synchronize()
    assert qk.last_backends()["token_logprobs"] == backend_name
    outputs = 3 * n * 4 + hidden.grad.nbytes + weight.grad.nbytes
    extra = torch.cuda.max_memory_allocated() - base - outputs
    chunk = c * v * 2
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert chunk <= extra <= 2 * chunk + (64 << 20), \
        f"workspace {extra / 2**20:.0f} MiB, want <= {(2 * chunk + (64 << 20)) / 2**20:.0f} MiB"
    assert _all_finite(lp) and _all_finite(hidden.grad) and _all_finite(weight.grad)


def test_linear_zero_rows():
    """N = 0 is a valid batch: empty outputs and gradients of the right shapes, no reshape errors."""
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    lp, ent = qk.linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.int64), return_entropy=True)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros(11, 8))


@pytest.mark.triton
def test_backward_runs_on_the_forward_backend():
    """Autograd runs the backward of CUDA tensors on its own threads, which do not see use_backend():
    the backward keeps the backend the forward was asked for, wherever and whenever it runs."""
    logits = torch.randn(3, 50, requires_grad=True)
    ids = torch.randint(0, 50, (3,))
    with qk.use_backend("triton"):
        lp = qk.token_logprobs(logits, ids)
    import threading
    t = threading.Thread(target=lambda: lp.sum().backward())  # another thread, outside the block
    t.start()
    t.join()
    assert qk.last_backends()["token_logprobs_backward"] == "triton"
    assert logits.grad is not None


@pytest.mark.parametrize("block_bytes", [1, 4 * 29 * 3, 1 << 24])
def test_reference_in_row_blocks(monkeypatch, block_bytes):
    """The CPU kernel of the fused path makes exp(z - max) a few rows at a time (one row, three rows,
    all rows here): the same log-probs, entropies and gradients, masked vocabulary entries and an all
    -inf row included."""
    monkeypatch.setattr(ref, "_BLOCK_BYTES", block_bytes)
    logits = torch.randn(7, 29, generator=torch.Generator().manual_seed(22), dtype=torch.float64) * 3
    logits[1, 4:9] = float("-inf")
    logits[5] = float("-inf")
    ids = torch.tensor([0, 1, 2, 28, -100, -100, 3])
    x = logits.clone().requires_grad_()
    lp, ent = qk.token_logprobs(x, ids, temperature=0.8, return_entropy=True)
    (lp * torch.arange(7.0, dtype=torch.float64)).sum().backward()
    rows = [0, 1, 2, 3, 6]  # 4 and 5 are ignored (5 is all -inf)
    logp = torch.log_softmax(logits[rows] / 0.8, -1)
    torch.testing.assert_close(lp[rows], logp.gather(-1, ids[rows, None])[:, 0])
    torch.testing.assert_close(ent[rows], -(logp.exp() * logp).nan_to_num().sum(-1))
    assert lp[4] == lp[5] == 0 and ent[4] == ent[5] == 0
    jac = torch.autograd.functional.jacobian(lambda z: torch.log_softmax(z / 0.8, -1), logits[rows])  # [5, V, 5, V]
    want = torch.stack([jac[i, ids[r], i] for i, r in enumerate(rows)])  # d lp[r] / d logits[r]
    torch.testing.assert_close(x.grad[rows], want * torch.tensor(rows, dtype=torch.float64)[:, None])
    assert (x.grad[[4, 5]] == 0).all()
    _, ent_all, lse = torch.ops.quickllm.token_logprobs(logits[5:6], torch.tensor([0]), 1.0, -100)
    assert lse[0] == ent_all[0] == float("-inf")


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_reference_in_place_pair(entropy_grad):
    """The CPU kernel's in-place pair (the logits buffer becomes z - max, then their gradient; the
    one-pass GRPO loss uses it) gives the out-of-place kernels' log-probs, entropies, lse and gradient
    bit for bit: temperature, ignored rows, -inf vocabulary entries and an all -inf row."""
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(6, 41, generator=g) * 4
    logits[2, :7] = float("-inf")
    logits[4] = float("-inf")
    ids = torch.tensor([3, 40, 9, -100, -100, 0])
    glp, gent = torch.randn(6, generator=g), torch.randn(6, generator=g) * entropy_grad
    lp, ent, lse = ref.token_logprobs(logits, ids, 0.7, -100)
    want = ref.token_logprobs_backward(glp, gent, logits, ids, lse, ent, 0.7, -100)
    buf = logits.clone()
    lp2, ent2, lse2, log_s = ref.token_logprobs_inplace(buf, ids, 0.7, -100)
    for a, b in ((lp2, lp), (ent2, ent), (lse2, lse)):
        assert torch.equal(a, b)
    got = ref.token_logprobs_backward_inplace(glp, gent, buf, log_s, ids, ent2, 0.7, -100)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
