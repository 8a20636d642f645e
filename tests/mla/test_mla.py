"""MLA decode over a paged latent cache and the cache write: the kernels against the reference, the
reference against an independent per-sequence oracle (contiguous keys, SDPA-style softmax in
float64) and against the non-absorbed attention it stands for (kv_b_proj expanded per head);
page sizes, Sq > 1 causal, varying lengths, empty sequences, pages outside the cache, splits; bad
input; opcheck, torch.compile and torch.export."""
import math

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, gen

import quickllm_kernels as qk
from quickllm_kernels.mla import reference as ref

BACKENDS = ["reference"] + KERNEL_BACKENDS
# Relative RMS error against the float64 oracle: bf16 inputs and probabilities, float32 sums.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _rel(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _paged(lens, page, d, dtype=torch.float32, seed=0, spare=3):
    """A cache holding each sequence's rows at shuffled pages, the block table and the rows themselves."""
    b = len(lens)
    max_blocks = max(1, max(math.ceil(n / page) for n in lens) + 1)
    nb = b * max_blocks + spare
    cache = torch.randn(nb, page, d, generator=gen(seed)).to(dtype)
    perm = torch.randperm(nb, generator=gen(seed + 1))
    table = torch.full((b, max_blocks), -1, dtype=torch.int32)  # unused entries: garbage the kernels must not read
    rows = []
    for i, n in enumerate(lens):
        pages = perm[i * max_blocks:(i + 1) * max_blocks]
        table[i] = pages.int()
        rows.append(cache[pages].reshape(-1, d)[:n])
        table[i, math.ceil(n / page):] = -7
    return (cache.to(DEVICE), table.to(DEVICE), torch.tensor(lens, dtype=torch.int32).to(DEVICE), rows)


def _oracle(q, rows, scale, dv, causal):
    """Each sequence's attention over its contiguous rows, in float64."""
    b, sq, h, _ = q.shape
    out = torch.zeros(b, sq, h, dv, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    for i, k in enumerate(rows):
        k = k.double().cpu()
        n = k.shape[0]
        for j in range(sq):
            limit = max(0, n - sq + 1 + j) if causal else n
            if limit == 0:
                continue
            s = q[i, j].double().cpu() @ k[:limit].T * scale  # [H, limit]
            lse[i, :, j] = torch.logsumexp(s, -1)
            out[i, j] = torch.softmax(s, -1) @ k[:limit, :dv]
    return out, lse


CASES = [  # lens, page, Sq, H, D, dv
    ([5, 17, 1], 4, 1, 3, 24, 16),
    ([33, 8], 16, 2, 4, 40, 32),
    ([0, 9, 64], 8, 1, 16, 36, 32),
    ([3, 70], 64, 3, 2, 20, 20),  # no rope dims
    ([19], 5, 4, 5, 18, 10),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_decode_matches_the_per_sequence_oracle(backend_name, case, causal):
    lens, page, sq, h, d, dv = case
    cache, table, seqlens, rows = _paged(lens, page, d, seed=len(lens) + page)
    q = torch.randn(len(lens), sq, h, d, generator=gen(7)).to(DEVICE)
    scale = d ** -0.5
    with qk.use_backend(backend_name):
        out, lse = qk.mla_decode(q, cache, table, seqlens, softmax_scale=scale, head_dim_v=dv, causal=causal)
    assert out.shape == (len(lens), sq, h, dv) and out.dtype == q.dtype and lse.dtype == torch.float32
    want_out, want_lse = _oracle(q, rows, scale, dv, causal)
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_low_precision(backend_name, dtype):
    lens, page, sq, h, d, dv = [40, 7], 16, 2, 8, 48, 32
    cache, table, seqlens, rows = _paged(lens, page, d, dtype=dtype, seed=11)
    q = torch.randn(2, sq, h, d, generator=gen(12)).to(dtype).to(DEVICE)
    with qk.use_backend(backend_name):
        out, lse = qk.mla_decode(q, cache, table, seqlens, softmax_scale=0.2, head_dim_v=dv)
    want_out, want_lse = _oracle(q, rows, 0.2, dv, True)
    assert _rel(out, want_out) < RTOL[dtype]
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_split_counts_give_the_same_result(splits):
    from quickllm_kernels.mla import triton as tri

    cache, table, seqlens, rows = _paged([30, 2, 0], 4, 20, seed=13)
    q = torch.randn(3, 1, 4, 20, generator=gen(14)).to(DEVICE)
    out, lse = tri.mla_decode(q, cache, table, seqlens, 0.3, 16, True, num_splits=splits)
    want_out, want_lse = _oracle(q, rows, 0.3, 16, True)
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_sequences_give_zeros_and_minus_inf(backend_name):
    cache, table, seqlens, _ = _paged([0, 0], 4, 12, seed=15)
    q = torch.randn(2, 2, 3, 12, generator=gen(16)).to(DEVICE)
    with qk.use_backend(backend_name):
        out, lse = qk.mla_decode(q, cache, table, seqlens, softmax_scale=1.0, head_dim_v=8)
    assert torch.equal(out.cpu(), torch.zeros(2, 2, 3, 8)) and bool((lse == float("-inf")).all())


@pytest.mark.triton
def test_kernel_marks_pages_outside_the_cache():
    """Without sync checks a GPU call trusts the table: a page outside the cache is never read, and
    the rows that needed it come out NaN instead of another page's values."""
    from quickllm_kernels.mla import triton as tri

    cache, table, seqlens, _ = _paged([6, 5], 4, 12, seed=17)
    table[0, 1] = 10_000
    q = torch.randn(2, 1, 2, 12, generator=gen(18)).to(DEVICE)
    out, lse = tri.mla_decode(q, cache, table, seqlens, 0.5, 8, True)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    want = ref.mla_decode(q, cache, table, seqlens, 0.5, 8, True)[0]
    assert torch.isnan(want[0]).all()


def test_absorbed_decode_equals_non_absorbed_attention():
    """The absorbed form (q_nope @ W_UK against the latent, then @ W_UV) is the attention of the
    expanded per-head keys and values: DeepSeek-V3's identity, checked in float64."""
    h, nope, rope, dv, rank, n = 4, 16, 8, 12, 32, 11
    g = gen(19)
    kv_b = torch.randn(h * (nope + dv), rank, generator=g, dtype=torch.float64)
    w_uk, w_uv = qk.mla_absorb(kv_b, h, nope, dv)
    kv_c = torch.randn(n, rank, generator=g, dtype=torch.float64)
    k_pe = torch.randn(n, rope, generator=g, dtype=torch.float64)
    q_nope = torch.randn(h, nope, generator=g, dtype=torch.float64)
    q_pe = torch.randn(h, rope, generator=g, dtype=torch.float64)
    scale = (nope + rope) ** -0.5
    # non-absorbed: per-head keys [k_nope | k_pe] and values from kv_b_proj
    kv = (kv_c @ kv_b.T).view(n, h, nope + dv)
    k = torch.cat([kv[..., :nope], k_pe[:, None, :].expand(n, h, rope)], -1)  # [n, H, nope + rope]
    v = kv[..., nope:]
    s = torch.einsum("hd,nhd->hn", torch.cat([q_nope, q_pe], -1), k) * scale
    want = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    # absorbed: one latent cache, D = rank + rope
    cache = torch.cat([kv_c, k_pe], -1).view(1, n, rank + rope)
    q_abs = torch.cat([torch.einsum("hd,hdr->hr", q_nope, w_uk), q_pe], -1).view(1, 1, h, rank + rope)
    lat, _ = qk.mla_decode(q_abs, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                           softmax_scale=scale, head_dim_v=rank)
    got = torch.einsum("hr,hrd->hd", lat[0, 0], w_uv)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("four_d", [False, True])
def test_cache_write_then_decode(backend_name, four_d):
    """Tokens written by slot (some skipped with -1) land where decode reads them, in either cache layout."""
    nb, page, rank, rope = 6, 4, 16, 8
    cache = torch.zeros(nb, page, 1, rank + rope) if four_d else torch.zeros(nb, page, rank + rope)
    cache = cache.to(DEVICE)
    kv_c = torch.randn(7, rank, generator=gen(20)).to(DEVICE)
    k_pe = torch.randn(7, rope, generator=gen(21)).to(DEVICE)
    slots = torch.tensor([9, 10, 11, 12, -1, 2, 3], device=DEVICE)
    with qk.use_backend(backend_name):
        assert qk.mla_cache_write(cache, slots, kv_c, k_pe) is None
    rows = ref.cache_rows(cache).reshape(-1, rank + rope).cpu()
    want = torch.cat([kv_c, k_pe], -1).cpu()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(rows[s], want[t])
    assert int((rows.abs().sum(-1) > 0).sum()) == 6  # nothing else written
    table = torch.tensor([[2, 3, 0]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 1, 2, rank + rope, generator=gen(22)).to(DEVICE)
    with qk.use_backend(backend_name):
        out, _ = qk.mla_decode(q, cache, table, torch.tensor([6], dtype=torch.int32, device=DEVICE),
                               softmax_scale=0.3, head_dim_v=rank)
    seq = torch.cat([rows[8:12], rows[12:16]])[:6]  # pages 2 and 3 of the table: slots 8..13
    want_out, _ = _oracle(q.cpu(), [seq], 0.3, rank, True)
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda c, t, s, q: qk.mla_decode(q, c, t, s, softmax_scale=0.0, head_dim_v=8), "softmax_scale"),
    (lambda c, t, s, q: qk.mla_decode(q, c, t, s, softmax_scale=0.1, head_dim_v=13), "head_dim_v"),
    (lambda c, t, s, q: qk.mla_decode(q[..., :10], c, t, s, softmax_scale=0.1, head_dim_v=8), "D = 10"),
    (lambda c, t, s, q: qk.mla_decode(q.half(), c, t, s, softmax_scale=0.1, head_dim_v=8), "q's dtype"),
    (lambda c, t, s, q: qk.mla_decode(q, c, t.long(), s, softmax_scale=0.1, head_dim_v=8), "block_table"),
    (lambda c, t, s, q: qk.mla_decode(q, c, t, s + 100, softmax_scale=0.1, head_dim_v=8), "cache_seqlens"),
    (lambda c, t, s, q: qk.mla_decode(q, c, t.fill_(99), s, softmax_scale=0.1, head_dim_v=8), "outside the cache"),
    (lambda c, t, s, q: qk.mla_cache_write(c, torch.tensor([0, 999]), torch.randn(2, 8), torch.randn(2, 4)),
     "slots past"),
    (lambda c, t, s, q: qk.mla_cache_write(c, torch.tensor([0, 1]), torch.randn(2, 8), torch.randn(2, 5)),
     "add up"),
])
def test_bad_input_names_the_argument(call, match):
    cache, table, seqlens, _ = _paged([5, 3], 4, 12, seed=23)
    q = torch.randn(2, 1, 2, 12, generator=gen(24))
    with pytest.raises((ValueError, TypeError), match=match):
        call(cache.cpu(), table.cpu(), seqlens.cpu(), q)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck(backend_name):
    cache, table, seqlens, _ = _paged([5, 9], 4, 12, seed=25)
    q = torch.randn(2, 2, 3, 12, generator=gen(26)).to(DEVICE)
    with qk.use_backend(backend_name):
        torch.library.opcheck(torch.ops.quickllm.mla_decode.default, (q, cache, table, seqlens, 0.3, 8, True))
        torch.library.opcheck(torch.ops.quickllm.mla_cache_write.default,
                              (cache.clone(), torch.tensor([1, -1, 30], device=DEVICE),
                               torch.randn(3, 8, device=DEVICE), torch.randn(3, 4, device=DEVICE)))


def test_decode_compiles_and_exports():
    cache, table, seqlens, _ = _paged([5, 9], 4, 12, seed=27)
    q = torch.randn(2, 1, 3, 12, generator=gen(28)).to(DEVICE)
    with qk.use_backend("reference"):
        want = qk.mla_decode(q, cache, table, seqlens, softmax_scale=0.3, head_dim_v=8)
        f = torch.compile(lambda *a: qk.mla_decode(*a, softmax_scale=0.3, head_dim_v=8), fullgraph=True)
        for a, b in zip(f(q, cache, table, seqlens), want):
            torch.testing.assert_close(a, b)

    class Step(torch.nn.Module):
        def forward(self, q, cache, table, seqlens):
            return qk.mla_decode(q, cache, table, seqlens, softmax_scale=0.3, head_dim_v=8)

    ep = torch.export.export(Step(), (q, cache, table, seqlens))
    assert any(n.target == torch.ops.quickllm.mla_decode.default for n in ep.graph.nodes)


@pytest.mark.parametrize("backend_name", ["reference"] + KERNEL_BACKENDS)
def test_a_bad_page_marks_only_the_rows_that_see_it(backend_name):
    """Causal Sq = 5 over 8 tokens whose second page is outside the cache: query 0 sees positions
    0..3 only and stays exact; the queries that reach position 4 come out NaN. (The kernels are
    called past the value checks, as a GPU call without QUICKLLM_SYNC_CHECKS runs them.)"""
    from quickllm_kernels import _library
    from quickllm_kernels._op import OPS

    cache, table, seqlens, rows = _paged([8], 4, 12, seed=29)
    table[0, 1] = -3
    q = torch.randn(1, 5, 2, 12, generator=gen(30)).to(DEVICE)
    op = OPS["mla_decode"]
    run = {"reference": op.reference, "triton": lambda *a: op.triton.fn(*a),
           "cuda": lambda *a: op.cuda.fn(_library.cuda_kernel("mla_decode"), *a)}[backend_name]
    out, lse = run(q, cache, table, seqlens, 0.5, 8, True)
    want_out, _ = _oracle(q[:, :1], [rows[0][:4]], 0.5, 8, False)
    torch.testing.assert_close(out[:, :1].double().cpu(), want_out, rtol=1e-5, atol=1e-5)
    assert torch.isnan(out[:, 1:]).all() and torch.isfinite(lse[:, :, :1]).all()
