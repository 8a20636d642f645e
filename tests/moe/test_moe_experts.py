"""The MoE expert layer and its pieces: grouped_mm (and its weight gradient), fp8_grouped_gemm,
moe_sort / moe_align_block_size (vLLM's contract), moe_permute, moe_combine, silu_mul and
moe_experts, on every backend against the reference and against independent oracles (a per-token
loop in float64, transformers' MixtralExperts); odd shapes, experts without rows, strided views,
empty batches; every gradient; malformed offsets and ids; bad input; opcheck, torch.compile and
torch.export."""
import math

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, assert_close, gen

import quickllm_kernels as qk
from quickllm_kernels.fp8 import reference as fp8_ref
from quickllm_kernels.moe import reference as ref

BACKENDS = ["reference"] + KERNEL_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen(seed))).to(dtype).to(DEVICE)


def _offs(counts):
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)


def _routing(t, k, e, seed=0):
    """Random distinct experts per token (float32 weights, int32 ids), on DEVICE."""
    ids = torch.stack([torch.randperm(e, generator=gen(seed + i))[:k] for i in range(t)]) if t else \
        torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(t, k, generator=gen(seed + 1000)) + 0.1
    return w.to(DEVICE), ids.int().to(DEVICE)


def _dense_experts(x, w13, w2, w, ids):
    """The layer token by token in float64: the oracle no kernel shares code with."""
    x, w13, w2, w = (v.double().cpu() for v in (x, w13, w2, w))
    out = torch.zeros_like(x)
    i = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            h = w13[e] @ x[t]
            out[t] += w[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:i]) * h[i:]))
    return out


# Relative RMS error of a layer against the float64 oracle: the GEMM inputs are rounded to the dtype
# (bf16: 2^-9 relative each), and sums of K products of such values keep that relative size.
LAYER_RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel_rms(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# grouped_mm
# --------------------------------------------------------------------------------------------

GMM_CASES = [  # (rows per expert, N, K)
    ([5, 0, 11, 3], 23, 37),
    ([1], 16, 16),
    ([0, 0, 19], 7, 3),
    ([40, 2, 0, 0, 9, 33], 65, 70),
]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GMM_CASES)
def test_grouped_mm_matches_reference(backend_name, dtype, case, nan_empty):
    counts, n, k = case
    s, e = sum(counts), len(counts)
    x = _rand(s, k, seed=1, dtype=dtype)
    w = _rand(e, n, k, seed=2, dtype=dtype, scale=k ** -0.5)
    offs = _offs(counts)
    with qk.use_backend(backend_name):
        y = qk.grouped_mm(x, w, offs)
    assert y.shape == (s, n) and y.dtype == dtype
    assert_close(y, ref.grouped_mm(x.float(), w.float(), offs).to(dtype), dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_grouped_mm_is_a_gemm_per_expert_in_float64_terms(backend_name):
    counts, n, k = [7, 0, 12], 9, 21
    x = _rand(19, k, seed=3)
    w = _rand(3, n, k, seed=4)
    with qk.use_backend(backend_name):
        y = qk.grouped_mm(x, w, _offs(counts))
    want = torch.cat([x[0:7].double() @ w[0].double().T, x[7:19].double() @ w[2].double().T])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_grouped_mm_strided_views(backend_name):
    """x a column slice of a wider tensor, w the transpose of a [E, K, N] tensor."""
    big = _rand(21, 50, seed=5)
    x = big[:, 3:33]  # [21, 30], row stride 50
    w_kn = _rand(4, 30, 17, seed=6)
    w = w_kn.transpose(1, 2)  # [4, 17, 30], stride(2) != 1
    offs = _offs([6, 6, 0, 9])
    with qk.use_backend(backend_name):
        y = qk.grouped_mm(x, w, offs)
    assert_close(y, ref.grouped_mm(x.contiguous(), w.contiguous(), offs))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_grouped_mm_empty(backend_name):
    with qk.use_backend(backend_name):
        y = qk.grouped_mm(_rand(0, 8), _rand(3, 5, 8), torch.zeros(3, dtype=torch.int32, device=DEVICE))
        assert y.shape == (0, 5)
        z = qk.grouped_mm(_rand(4, 0), _rand(2, 5, 0), _offs([1, 3]))
        assert torch.equal(z.cpu(), torch.zeros(4, 5))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_gradients(backend_name, dtype):
    counts, n, k = [4, 0, 9, 2], 13, 11
    x = _rand(15, k, seed=7, dtype=dtype).requires_grad_()
    w = _rand(4, n, k, seed=8, dtype=dtype).requires_grad_()
    g = _rand(15, n, seed=9, dtype=dtype)
    offs = _offs(counts)
    with qk.use_backend(backend_name):
        dx, dw = torch.autograd.grad(qk.grouped_mm(x, w, offs), (x, w), g)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(ref.grouped_mm(xr, wr, offs), (xr, wr), g.double())
    assert_close(dx, want[0], dtype)
    assert_close(dw, want[1], dtype)
    assert torch.equal(dw[1].float().cpu(), torch.zeros(n, k))  # an expert without rows gets no gradient


def test_grouped_mm_gradcheck():
    x = torch.randn(9, 5, dtype=torch.float64, generator=gen(10), requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen(11), requires_grad=True)
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)
    torch.autograd.gradcheck(lambda a, b: qk.grouped_mm(a, b, offs), (x, w))


@pytest.mark.triton
def test_grouped_mm_kernels_stay_in_bounds_with_malformed_offs():
    """Without sync checks a GPU call never reads offs on the host: the kernels clamp them, write
    every row once and write zeros after offs[E-1]."""
    from quickllm_kernels.moe import triton as tri

    x, w = _rand(10, 6, seed=12), _rand(3, 5, 6, seed=13)
    short = _offs([2, 3, 1])  # ends at 6 of 10 rows
    y = tri.grouped_mm(x, w, short)
    assert_close(y[:6], ref.grouped_mm(x[:6], w, short))
    assert torch.equal(y[6:].cpu(), torch.zeros(4, 5))
    wild = torch.tensor([7, -4, 99], dtype=torch.int32, device=DEVICE)  # decreasing, negative, past S
    y = tri.grouped_mm(x, w, wild)  # as clamped: rows 0:7 expert 0, 7:7 expert 1, 7:10 expert 2
    assert_close(y, ref.grouped_mm(x, w, _offs([7, 0, 3])))
    dw = tri.grouped_mm_wgrad(_rand(10, 5, seed=14), x, wild, 3)
    assert torch.isfinite(dw).all()


# --------------------------------------------------------------------------------------------
# fp8_grouped_gemm
# --------------------------------------------------------------------------------------------


def _fp8_weights(e, n, k, seed):
    """[E, N, K] e4m3 weights with their 128 x 128 block scales, as DeepSeek-V3 stores experts."""
    w = _rand(e, n, k, seed=seed, scale=0.1)
    q, s = zip(*(fp8_ref.weight_quant(w[i]) for i in range(e)))
    return torch.stack(q), torch.stack(s)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [([3, 0, 20], 150, 200), ([1, 1], 64, 128)])
def test_fp8_grouped_gemm_matches_reference(backend_name, case, nan_empty):
    counts, n, k = case
    a, sa = qk.act_quant(_rand(sum(counts), k, seed=15))
    w, sw = _fp8_weights(len(counts), n, k, seed=16)
    offs = _offs(counts)
    with qk.use_backend(backend_name):
        y = qk.fp8_grouped_gemm(a, sa, w, sw, offs, out_dtype=torch.float32)
    want = ref.fp8_grouped_gemm(a, sa, w, sw, offs, torch.float32)
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)  # the tensor cores' sum inside a 128 block


def test_fp8_grouped_gemm_is_fp8_block_gemm_per_expert():
    counts, n, k = [5, 9], 40, 130
    a, sa = qk.act_quant(_rand(14, k, seed=17))
    w, sw = _fp8_weights(2, n, k, seed=18)
    with qk.use_backend("reference"):
        y = qk.fp8_grouped_gemm(a, sa, w, sw, _offs(counts), out_dtype=torch.float32)
        want = torch.cat([qk.fp8_block_gemm(a[:5], sa[:5], w[0], sw[0], out_dtype=torch.float32),
                          qk.fp8_block_gemm(a[5:], sa[5:], w[1], sw[1], out_dtype=torch.float32)])
    assert torch.equal(y, want)


# --------------------------------------------------------------------------------------------
# moe_sort and moe_align_block_size
# --------------------------------------------------------------------------------------------

SORT_CASES = [(1, 1, 1), (7, 2, 8), (37, 8, 256), (300, 8, 64), (0, 2, 4), (5, 3, 1000), (200, 1, 3), (700, 8, 60)]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", SORT_CASES)
def test_sort_matches_reference_bit_for_bit(backend_name, case):
    t, k, e = case
    ids = torch.randint(0, e, (t, k), generator=gen(t + e)).int().to(DEVICE)
    with qk.use_backend(backend_name):
        got = qk.moe_sort(ids, e)
    for g, w in zip(got, ref.moe_sort(ids, e)):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), w.cpu())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sort_contract(backend_name):
    t, k, e = 50, 4, 9
    ids = torch.randint(0, e, (t, k), generator=gen(20)).int().to(DEVICE)
    with qk.use_backend(backend_name):
        sorted_pairs, pair_rows, offs = (v.cpu().long() for v in qk.moe_sort(ids, e))
    flat = ids.cpu().reshape(-1).long()
    assert torch.equal(offs, torch.bincount(flat, minlength=e).cumsum(0))
    assert torch.equal(pair_rows[sorted_pairs], torch.arange(t * k))  # inverse permutations
    start = 0
    for ex, end in enumerate(offs.tolist()):
        run = sorted_pairs[start:end]
        assert (flat[run] == ex).all() and (run.diff() > 0).all()  # stable: increasing pair index
        start = end


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", SORT_CASES)
@pytest.mark.parametrize("block", [1, 16, 64])
def test_align_matches_reference_bit_for_bit(backend_name, case, block):
    t, k, e = case
    ids = torch.randint(0, e, (t, k), generator=gen(t * k + block)).int().to(DEVICE)
    with qk.use_backend(backend_name):
        got = qk.moe_align_block_size(ids, block, e)
    for g, w in zip(got, ref.moe_align_block_size(ids, e, block)):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), w.cpu())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_align_is_vllms_contract(backend_name):
    """Each expert's pairs in one run padded to the block size with T*k, the block's expert in
    expert_ids, -1 after the padded length; the buffer sizes vLLM allocates."""
    t, k, e, bs = 23, 2, 6, 8
    ids = torch.randint(0, e, (t, k), generator=gen(21)).int().to(DEVICE)
    with qk.use_backend(backend_name):
        sorted_ids, expert_ids, total = (v.cpu().long() for v in qk.moe_align_block_size(ids, bs, e))
    n = t * k
    assert sorted_ids.numel() == n + e * (bs - 1) and expert_ids.numel() == math.ceil(sorted_ids.numel() / bs)
    counts = torch.bincount(ids.cpu().reshape(-1).long(), minlength=e)
    assert int(total) == int(((counts + bs - 1) // bs * bs).sum())
    flat = ids.cpu().reshape(-1).long()
    for b in range(expert_ids.numel()):
        block = sorted_ids[b * bs:(b + 1) * bs]
        if b * bs >= int(total):
            assert expert_ids[b] == -1 and (block == n).all()
            continue
        real = block[block < n]
        assert (flat[real] == expert_ids[b]).all()
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))


@pytest.mark.triton
def test_sort_kernels_skip_ids_outside_the_experts():
    """On a GPU without sync checks a bad id is not an error: it sorts after every expert, gets
    pair row -1, is never computed, and align leaves it out; nothing is read out of bounds."""
    from quickllm_kernels.moe import triton as tri

    ids = torch.tensor([[0, 5], [-1, 2], [2, 9]], dtype=torch.int32, device=DEVICE)
    sorted_pairs, pair_rows, offs = tri.moe_sort(ids, 3)
    assert offs.tolist() == [1, 1, 3]
    assert sorted_pairs.tolist() == [0, 3, 4, 1, 2, 5]
    assert pair_rows.tolist() == [0, -1, -1, 1, 2, -1]
    want = ref.moe_sort(ids, 3)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip((sorted_pairs, pair_rows, offs), want))
    got = tri.moe_align_block_size(ids, 3, 2, ref.align_size(6, 3, 2))
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, ref.moe_align_block_size(ids, 3, 2)))


# --------------------------------------------------------------------------------------------
# permute, combine, silu_mul
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_combine_silu_match_reference(backend_name, dtype, nan_empty):
    t, k, e, h = 11, 3, 5, 37
    w, ids = _routing(t, k, e, seed=22)
    x = _rand(t + 4, h, seed=23, dtype=dtype)[2:2 + t]  # a row slice
    sp, pr, _ = ref.moe_sort(ids, e)
    y = _rand(t * k, h, seed=24, dtype=dtype)
    hh = _rand(t * k, 2 * 19, seed=25, dtype=dtype)
    g = _rand(t * k, 19, seed=26, dtype=dtype)
    with qk.use_backend(backend_name):
        assert torch.equal(qk.moe_permute(x, sp, k).cpu(), ref.moe_permute(x, sp, k).cpu())
        assert_close(qk.moe_combine(y, w, pr), ref.moe_combine(y.float(), w, pr).to(dtype), dtype)
        assert_close(qk.silu_mul(hh), ref.silu_mul(hh.float()).to(dtype), dtype)
        assert_close(torch.ops.quickllm.silu_mul_backward(g, hh), ref.silu_mul_backward(g.float(), hh.float()).to(dtype),
                     dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_combine_skips_unrouted_pairs(backend_name):
    y = _rand(4, 6, seed=27)
    y[3] = float("nan")  # the row of the skipped pair: must not leak in
    w = torch.tensor([[0.5, 2.0], [1.0, 3.0]], device=DEVICE)
    rows = torch.tensor([0, -1, 2, 1], dtype=torch.int32, device=DEVICE)
    with qk.use_backend(backend_name):
        out = qk.moe_combine(y, w, rows)
    assert_close(out, torch.stack([0.5 * y[0], 1.0 * y[2] + 3.0 * y[1]]))


def test_piece_gradcheck():
    t, k, e, h = 5, 2, 3, 4
    w, ids = _routing(t, k, e, seed=28)
    sp, pr, _ = ref.moe_sort(ids.cpu(), e)
    x = torch.randn(t, h, dtype=torch.float64, generator=gen(29), requires_grad=True)
    y = torch.randn(t * k, h, dtype=torch.float64, generator=gen(30), requires_grad=True)
    wt = w.cpu().double().requires_grad_()
    hh = torch.randn(6, 8, dtype=torch.float64, generator=gen(31), requires_grad=True)
    torch.autograd.gradcheck(lambda a: qk.moe_permute(a, sp, k), (x,))
    torch.autograd.gradcheck(lambda a, b: qk.moe_combine(a, b, pr), (y, wt))
    torch.autograd.gradcheck(qk.silu_mul, (hh,))


# --------------------------------------------------------------------------------------------
# moe_experts
# --------------------------------------------------------------------------------------------

LAYERS = [(13, 2, 4, 40, 24), (1, 8, 16, 32, 16), (29, 3, 7, 19, 11), (0, 2, 4, 16, 8)]  # T, k, E, H, I


def _layer(t, k, e, h, i, dtype=torch.float32, seed=32):
    x = _rand(t, h, seed=seed, dtype=dtype)
    w13 = _rand(e, 2 * i, h, seed=seed + 1, dtype=dtype, scale=h ** -0.5)
    w2 = _rand(e, h, i, seed=seed + 2, dtype=dtype, scale=i ** -0.5)
    w, ids = _routing(t, k, e, seed=seed + 3)
    return x, w13, w2, w, ids


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", LAYERS)
def test_experts_match_the_per_token_oracle(backend_name, dtype, layer):
    x, w13, w2, w, ids = _layer(*layer, dtype=dtype)
    with qk.use_backend(backend_name):
        out = qk.moe_experts(x, w13, w2, w, ids)
    assert out.shape == x.shape and out.dtype == dtype
    if x.shape[0]:
        assert _rel_rms(out, _dense_experts(x, w13, w2, w, ids)) < LAYER_RTOL[dtype]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_experts_match_transformers(backend_name):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=24, intermediate_size=20, num_local_experts=6, num_experts_per_tok=2)
    experts = MixtralExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2, generator=gen(33))
    torch.nn.init.normal_(experts.down_proj, std=0.2, generator=gen(34))
    x = torch.randn(17, 24, generator=gen(35), requires_grad=True)
    w, ids = _routing(17, 2, 6, seed=36)
    w = w.cpu().requires_grad_()
    want = experts(x, ids.cpu().long(), w)
    g = torch.randn(17, 24, generator=gen(37))
    want_grads = torch.autograd.grad(want, (x, w, experts.gate_up_proj, experts.down_proj), g)
    leaves = [v.detach().to(DEVICE).requires_grad_() for v in (x, w, experts.gate_up_proj, experts.down_proj)]
    with qk.use_backend(backend_name):
        out = qk.moe_experts(leaves[0], leaves[2], leaves[3], leaves[1], ids)
        grads = torch.autograd.grad(out, leaves, g.to(DEVICE))
    torch.testing.assert_close(out.cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu(), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_gradients_match_reference(backend_name, dtype):
    x, w13, w2, w, ids = _layer(9, 2, 4, 20, 12, dtype=dtype, seed=40)
    leaves = [v.detach().requires_grad_() for v in (x, w13, w2, w)]
    g = _rand(9, 20, seed=41, dtype=dtype)
    with qk.use_backend(backend_name):
        got = torch.autograd.grad(qk.moe_experts(leaves[0], leaves[1], leaves[2], leaves[3], ids), leaves, g)
    with qk.use_backend("reference"):
        f32 = [v.detach().float().requires_grad_() for v in leaves]
        want = torch.autograd.grad(qk.moe_experts(f32[0], f32[1], f32[2], f32[3], ids), f32, g.float())
    for a, b in zip(got, want):
        assert _rel_rms(a, b) < LAYER_RTOL[dtype]


def test_experts_gradcheck():
    x, w13, w2, w, ids = _layer(4, 2, 3, 5, 3, seed=42)
    leaves = [v.cpu().double().requires_grad_() for v in (x, w13, w2, w)]
    torch.autograd.gradcheck(lambda a, b, c, d: qk.moe_experts(a, b, c, d, ids.cpu()), leaves)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_experts_fp8(backend_name):
    """FP8 weights with 128 x 128 block scales: the same layer as the dequantised weights with the
    activations quantised per token and 128-group (the reference), and close to the bf16 layer."""
    t, k, e, h, i = 6, 2, 3, 160, 136
    x, _, _, w, ids = _layer(t, k, e, h, i, seed=43)
    w13, s13 = _fp8_weights(e, 2 * i, h, seed=44)
    w2, s2 = _fp8_weights(e, h, i, seed=45)
    with qk.use_backend(backend_name):
        out = qk.moe_experts(x, w13, w2, w, ids, w13_scale_inv=s13, w2_scale_inv=s2)
    with qk.use_backend("reference"):
        want = qk.moe_experts(x, w13, w2, w, ids, w13_scale_inv=s13, w2_scale_inv=s2)
    assert _rel_rms(out, want) < 1e-3
    deq = lambda q, s: torch.stack([qk.weight_dequant(q[j], s[j], out_dtype=torch.float32)  # noqa: E731
                                    for j in range(e)])
    dense = _dense_experts(x, deq(w13, s13), deq(w2, s2), w, ids)
    assert _rel_rms(out, dense) < 0.05  # e4m3 activations: 3 mantissa bits
    with pytest.raises(RuntimeError, match="inference only"):
        qk.moe_experts(x.requires_grad_(), w13, w2, w, ids, w13_scale_inv=s13, w2_scale_inv=s2)


def test_experts_memory_has_no_token_by_expert_by_hidden_buffer():
    """The layer's allocations scale with T*k, never T*E*H: checked through the sizes of every
    tensor the reference path creates, with many experts."""
    t, k, e, h, i = 8, 2, 64, 32, 8
    x, w13, w2, w, ids = _layer(t, k, e, h, i, seed=46)
    seen = []
    real_empty, real_zeros = torch.empty, torch.zeros

    def track(fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            seen.append(out.numel())
            return out
        return wrapped
    torch.empty, torch.zeros = track(real_empty), track(real_zeros)
    try:
        with qk.use_backend("reference"):
            qk.moe_experts(x, w13, w2, w, ids)
    finally:
        torch.empty, torch.zeros = real_empty, real_zeros
    assert seen and max(seen) <= t * k * max(h, 2 * i)


BAD = [
    (dict(topk_ids=torch.tensor([[0, 9]])), "topk_ids holds expert ids outside"),
    (dict(w2=torch.randn(4, 16, 7)), "w2 must be"),
    (dict(w13=torch.randn(4, 16, 12)), "w13 must be"),
    (dict(w13=torch.randn(4, 16, 16, dtype=torch.float64)), "w13 must have hidden's dtype"),
    (dict(topk_weights=torch.rand(2, 2)), "topk_weights and topk_ids must both be"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(w13_scale_inv=torch.ones(4, 1, 1)), "go together"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_experts_bad_input_names_the_argument(kwargs, match):
    args = dict(hidden=torch.randn(1, 16), w13=torch.randn(4, 16, 16), w2=torch.randn(4, 16, 8),
                topk_weights=torch.rand(1, 2), topk_ids=torch.tensor([[0, 3]]))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        qk.moe_experts(**args)


@pytest.mark.parametrize("call,match", [
    (lambda: qk.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 4), _offs([1, 3])), "w must be"),
    (lambda: qk.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([3, 1], dtype=torch.int32)), "non-decreasing"),
    (lambda: qk.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([1, 2], dtype=torch.int32)), "end at the number"),
    (lambda: qk.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([1, 4])), "int32"),
    (lambda: qk.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3), _offs([4]).cpu()), "one entry per expert"),
    (lambda: qk.grouped_mm(torch.randn(4, 3), torch.randn(2, 5, 3).half(), _offs([1, 3]).cpu()), "x's dtype"),
    (lambda: qk.moe_sort(torch.tensor([[1, 2]]), 0), "num_experts must be positive"),
    (lambda: qk.moe_align_block_size(torch.tensor([[1, 2]]), 0, 4), "block_size must be positive"),
    (lambda: qk.moe_combine(torch.randn(4, 3), torch.rand(2, 2), torch.tensor([0, 1, 2], dtype=torch.int32)),
     "pair_rows must be"),
    (lambda: qk.silu_mul(torch.randn(3, 5)), "odd width"),
    (lambda: qk.moe_permute(torch.randn(2, 3), torch.tensor([0, 4], dtype=torch.int32), 2), "outside"),
])
def test_pieces_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --------------------------------------------------------------------------------------------
# opcheck, torch.compile, torch.export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck(backend_name):
    ops = torch.ops.quickllm
    x, w13, w2, w, ids = _layer(7, 2, 3, 16, 8, seed=50)
    sp, pr, offs = ref.moe_sort(ids, 3)
    xp = ref.moe_permute(x, sp, 2)
    h = ref.grouped_mm(xp, w13, offs)
    with qk.use_backend(backend_name):
        torch.library.opcheck(ops.grouped_mm.default, (xp.requires_grad_(), w13.clone().requires_grad_(), offs))
        torch.library.opcheck(ops.grouped_mm_wgrad.default, (h, xp.detach(), offs, 3))
        torch.library.opcheck(ops.moe_sort.default, (ids, 3))
        torch.library.opcheck(ops.moe_align_block_size.default, (ids, 3, 4))
        torch.library.opcheck(ops.moe_permute.default, (x.clone().requires_grad_(), sp, 2))
        torch.library.opcheck(ops.moe_combine.default, (xp.detach().requires_grad_(), w.clone().requires_grad_(), pr))
        torch.library.opcheck(ops.silu_mul.default, (h.requires_grad_(),))
        torch.library.opcheck(ops.silu_mul_backward.default, (xp.detach()[:, :8], h.detach()))
        torch.library.opcheck(ops.moe_experts.default, (x, w13, w2, w, ids, "silu", None, None))


def test_experts_compile_and_export():
    x, w13, w2, w, ids = _layer(9, 2, 4, 16, 8, seed=51)
    with qk.use_backend("reference"):
        want = qk.moe_experts(x, w13, w2, w, ids)
        f = torch.compile(lambda *a: qk.moe_experts(*a), fullgraph=True)
        torch.testing.assert_close(f(x, w13, w2, w, ids), want)

    class Layer(torch.nn.Module):
        def forward(self, x, w13, w2, w, ids):
            return qk.moe_experts(x, w13, w2, w, ids)

    ep = torch.export.export(Layer(), (x, w13, w2, w, ids))
    assert any(n.target == torch.ops.quickllm.moe_experts.default for n in ep.graph.nodes)  # one node for engines
    torch.testing.assert_close(ep.module()(x, w13, w2, w, ids), want)


def test_experts_training_compiles():
    x, w13, w2, w, ids = _layer(6, 2, 3, 16, 8, seed=52)
    leaves = [v.detach().requires_grad_() for v in (x, w13, w2, w)]
    with qk.use_backend("reference"):
        want = torch.autograd.grad(qk.moe_experts(leaves[0], leaves[1], leaves[2], leaves[3], ids).square().sum(),
                                   leaves)
        f = torch.compile(lambda a, b, c, d: qk.moe_experts(a, b, c, d, ids).square().sum(), fullgraph=True)
        got = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
