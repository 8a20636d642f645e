"""FP8 ops (weight_dequant, act_quant, fp8_block_gemm) and FP8Linear: the reference against the
formulas in float64, every kernel backend against the reference (bit for bit for the quantisers),
SQNR of the quantised paths, opcheck, torch.compile / torch.export, bad inputs, and GPU shapes."""
import math
import re

import pytest
import torch
from conftest import DEVICE, GPU_BACKENDS, HAS_CUDA, KERNEL_BACKENDS, TOL, gen, poison_allocator

import quickllm_kernels as qk
from quickllm_kernels import fp8 as fp8_ops
from quickllm_kernels.fp8 import reference as ref

FP8 = torch.float8_e4m3fn
# fp8_block_gemm against the float64 product of the same fp8 operands: the output rounding of the
# dtype (TOL's rtol) plus float32 accumulation, a few float32 ulps of the largest |C| of the row
# block, which is what atol (relative to max |C|) covers where outputs cancel to near zero.
GEMM_ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def gemm_refusal(backend_name, k, device=DEVICE):
    """The documented refusal (a pattern of its BackendUnavailable message) that an explicit request
    for `backend_name` meets with an fp8_block_gemm of this K on `device`, or None when it runs: no
    kernel on a GPU without FP8 tensor cores; the CUDA kernel needs K % 16 == 0 (16-byte loads)."""
    if backend_name == "reference":
        return None
    if torch.device(device).type == "cuda" and not fp8_ops.fp8_gemm_supported(device):
        return "FP8 tensor cores"
    if backend_name == "cuda" and k % 16:
        return re.escape(f"K = {k} or row strides")
    return None


def gemm_tolerance(out_dtype, on_gpu):
    """(rtol, atol relative to max |C|) of fp8_block_gemm against the float64 product. The
    interpreter sums each K block in float32, so float32 outputs agree to float32 rounding; the FP8
    tensor cores sum the 32 products of each instruction keeping about 14 bits (fp8/triton.py), so
    on a GPU no output is closer than bfloat16's tolerance."""
    if on_gpu and out_dtype == torch.float32:
        out_dtype = torch.bfloat16
    return TOL[out_dtype]["rtol"], GEMM_ATOL[out_dtype]



def _randn(*shape, seed=0, scale=1.0, dtype=torch.float32, device=DEVICE):
    return (scale * torch.randn(*shape, generator=gen(seed))).to(device=device, dtype=dtype)


def _fp8_weight(n, k, seed=0, device=DEVICE):
    """A [N, K] fp8 weight with DeepSeek-like scales (amax/448 of 128x128 blocks of varied magnitude)."""
    w = _randn(n, k, seed=seed, device="cpu")
    w *= torch.rand(math.ceil(n / 128), math.ceil(k / 128), generator=gen(seed + 1)).mul(4).add(0.1) \
        .repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    q, s = ref.weight_quant(w)
    return q.to(device), s.to(device)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t.view(torch.int16) if t.element_size() == 2 else \
        t.view(torch.int32)


def assert_same_bits(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = _bits(got.contiguous()), _bits(want.contiguous())
    if not torch.equal(g, w):
        bad = (g != w).nonzero()[:5].tolist()
        raise AssertionError(f"{int((g != w).sum())} elements differ, first at {bad}: "
                             f"got {got[tuple(zip(*bad))].float().tolist()} want {want[tuple(zip(*bad))].float().tolist()}")


def assert_dequantised(got, want, backend_name):
    """Bit for bit, except that the Triton interpreter truncates float32 -> bfloat16 where GPUs
    round to nearest (one bfloat16 ulp, TOL's rtol)."""
    if backend_name == "triton" and not HAS_CUDA and got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.double(), want.double(), rtol=TOL[torch.bfloat16]["rtol"], atol=0)
    else:
        assert_same_bits(got, want)


def sqnr_db(signal, approx):
    signal, approx = signal.double(), approx.double()
    return float(10 * torch.log10(signal.pow(2).sum() / (signal - approx).pow(2).sum()))


# ------------------------------------------------------------------------------------------------
# The reference against the formulas
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,n", [(200, 300), (256, 384)])  # edge blocks on both dims; whole blocks only
def test_reference_weight_dequant_is_the_block_formula(m, n):
    q, s = _fp8_weight(m, n, device="cpu")
    want = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for bj in range(math.ceil(n / 128)):
            cols = slice(bj * 128, min(n, bj * 128 + 128))
            want[i, cols] = q[i, cols].double() * s[i // 128, bj].double()
    got = ref.weight_dequant(q, s, out_dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(ref.weight_dequant(q.t().contiguous().t(), s, out_dtype=torch.float64), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_reference_act_quant_formula(ue8m0):
    x = _randn(6, 300, seed=2, scale=3.0, device="cpu")
    x[1] = 0  # zero row: zeros out, finite scales
    x[2, 128:256] = 1e-14  # below the 1e-10 floor
    q, s = ref.act_quant(x, 128, ue8m0)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (6, 3)
    amax = torch.stack([x[:, g * 128:(g + 1) * 128].abs().amax(1) for g in range(3)], 1).clamp(min=1e-10)
    if ue8m0:
        assert torch.equal(s, torch.exp2(torch.ceil(torch.log2(amax.double() / 448))).float())
        assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()
    else:
        assert torch.equal(s, amax / 448)
    assert (q[1].float() == 0).all() and torch.isfinite(s).all()
    deq = ref.act_dequant(q, s, 128, torch.float64)
    # e4m3 keeps 3 mantissa bits: within half an ulp (2**-4 relative) of each value, or of the
    # subnormal spacing 2**-9 * s near zero
    err = (deq - x.double()).abs()
    bound = torch.maximum(x.double().abs() * 2.0 ** -4, 2.0 ** -10 * s.double().repeat_interleave(128, 1)[:, :300])
    assert (err <= bound * (1 + 1e-6)).all()
    if not ue8m0:  # each group's largest |x| maps to 448 exactly
        assert (q.float().abs().view(6, -1)[:, :256].view(6, 2, 128).amax(-1)[[0, 3, 4, 5]] == 448).all()


def test_reference_pow2_ceil_bits():
    s = torch.tensor([1.0, 1.0000001, 0.75, 0.5, 3.0, 2.0 ** -40 * 1.3, 448.0, 1e-10 / 448])
    want = torch.exp2(torch.ceil(torch.log2(s.double()))).float()
    assert torch.equal(ref.pow2_ceil(s), want)
    special = torch.tensor([float("nan"), float("inf")])
    got = ref.pow2_ceil(special)
    assert torch.isnan(got[0]) and got[1] == float("inf")  # NaN stays NaN, not a rounded-up -0.0


def test_reference_gemm_is_the_blocked_formula():
    q, s = _fp8_weight(150, 260, seed=3, device="cpu")
    aq, as_ = ref.act_quant(_randn(9, 260, seed=4, device="cpu"), 128)
    want = torch.zeros(9, 150, dtype=torch.float64)
    for kb in range(3):
        ks = slice(kb * 128, min(260, kb * 128 + 128))
        part = aq[:, ks].double() @ q[:, ks].double().t()
        sb = s[:, kb].double().repeat_interleave(128)[:150]
        want += part * as_[:, kb:kb + 1].double() * sb[None, :]
    got = ref.fp8_block_gemm(aq, as_, q, s, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_weight_quant_act_quant_sqnr():
    """Block FP8 keeps about 3 mantissa bits: SQNR of Gaussian data is ~31 dB (25 dB is the floor
    where a wrong scale or a lost block would show)."""
    w = _randn(300, 520, seed=5, device="cpu")
    q, s = ref.weight_quant(w)
    assert sqnr_db(w, ref.weight_dequant(q, s, out_dtype=torch.float32)) > 28
    x = _randn(64, 520, seed=6, device="cpu")
    for fmt in (False, True):
        aq, as_ = ref.act_quant(x, 128, fmt)
        assert sqnr_db(x, ref.act_dequant(aq, as_)) > (28 if not fmt else 25)


# ------------------------------------------------------------------------------------------------
# Kernel backends against the reference
# ------------------------------------------------------------------------------------------------

DEQUANT_CASES = [  # (M, N, block)
    (1, 1, (128, 128)), (200, 64, (128, 128)), (64, 130, (128, 128)), (140, 300, (128, 128)),
    (128, 256, (128, 128)), (77, 90, (32, 64)), (19, 111, (1, 128)),
]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("m,n,block", DEQUANT_CASES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_dequant_matches_reference(backend_name, m, n, block, out_dtype, nan_empty):
    w = _randn(m, n, seed=m + n, device="cpu")
    q, s = ref.weight_quant(w, block)
    q, s = q.to(DEVICE), s.to(DEVICE)
    want = ref.weight_dequant(q, s, block, out_dtype)
    with qk.use_backend(backend_name):
        got = qk.weight_dequant(q, s, block=block, out_dtype=out_dtype)
    assert qk.last_backends()["weight_dequant"] == backend_name
    assert_dequantised(got, want, backend_name)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_weight_dequant_every_byte(backend_name):
    """All 256 e4m3 bytes (subnormals, -0.0, the largest normals, both NaNs) decode as torch decodes them."""
    w = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(2, 128).to(DEVICE)
    s = torch.full((1, 1), 0.5, device=DEVICE)
    with qk.use_backend(backend_name):
        got = qk.weight_dequant(w, s, out_dtype=torch.float32).cpu()
    want = w.float().cpu() * 0.5
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and int(torch.isnan(want).sum()) == 2
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_weight_dequant_strided_views(backend_name):
    """A column slice (row stride > N), a transposed weight, and strided scales."""
    big, s_big = _fp8_weight(256, 400, seed=7)
    cases = [(big[:, 128:328], s_big[:, 1:3]),  # starts on a block boundary: its own scales are a slice
             (big.t().contiguous().t(), s_big),
             (big, s_big.t().contiguous().t())]
    for q, s in cases:
        with qk.use_backend(backend_name):
            got = qk.weight_dequant(q, s)
        assert_dequantised(got, ref.weight_dequant(q.contiguous(), s.contiguous()), backend_name)


ACT_CASES = [  # (shape, group)
    ((1, 128), 128), ((3, 5, 300), 128), ((19, 256), 128), ((7, 100), 64), ((4, 300), 100),
    ((2, 3, 7), 128), ((5, 1), 128), ((0, 128), 128), ((4, 0), 128),
]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,group", ACT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_act_quant_matches_reference(backend_name, shape, group, dtype, scale_format, nan_empty):
    x = _randn(*shape, seed=sum(shape) + group, scale=2.5, dtype=dtype)
    if x.numel():
        x.view(-1, shape[-1])[0] = 0  # a zero row: zeros, not NaN
    if x.dim() >= 2 and shape[-1] > 64 and x.shape[0] > 1:
        x.view(-1, shape[-1])[1, :64] *= 300  # one loud group beside quiet ones
    want_q, want_s = ref.act_quant(x, group, scale_format == "ue8m0")
    with qk.use_backend(backend_name):
        q, s = qk.act_quant(x, group=group, scale_format=scale_format)
    assert qk.last_backends()["act_quant"] == backend_name
    assert_same_bits(q, want_q)
    assert_same_bits(s, want_s)
    assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("backend_name", ["reference"] + KERNEL_BACKENDS)
def test_act_quant_rounds_ties_to_even(backend_name):
    """448 in the group makes the scale exactly 1, so each value below is quantised as it is: exact
    ties between two e4m3 values (normal and subnormal) go to the even mantissa, the sign is kept
    (including -0.0), and 448 itself is not rounded up past the range."""
    ties = [1.0625, 1.1875, -1.0625, 3.25 + 0.125, 2.0 ** -9 * 1.5, 2.0 ** -9 * 2.5, -(2.0 ** -9) * 0.5, -0.0,
            0.015625 * (1 + 1 / 16), 447.9, 240.0 + 8.0]
    want = [1.0, 1.25, -1.0, 3.5, 2.0 ** -9 * 2, 2.0 ** -9 * 2, -0.0, -0.0, 0.015625, 448.0, 256.0]
    x = torch.zeros(1, 128)
    x[0, 0] = 448.0
    x[0, 1:1 + len(ties)] = torch.tensor(ties)
    with qk.use_backend(backend_name):
        q, s = qk.act_quant(x.to(DEVICE))
    assert float(s) == 1.0
    got = q.float().cpu()[0, 1:1 + len(ties)]
    assert got.tolist() == want
    assert torch.equal(torch.signbit(got), torch.signbit(torch.tensor(want)))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_act_quant_strided_and_extreme(backend_name):
    base = _randn(6, 2, 600, seed=11, dtype=torch.bfloat16)
    x = base[:, 1, 50:350]  # row stride 1200, offset start
    extreme = torch.cat([_randn(2, 256, seed=12) * 1e30, _randn(2, 256, seed=13) * 1e-30,
                         _randn(2, 256, seed=14) * 1e-8]).to(DEVICE)  # overflow-free scale, floor, subnormal fp8
    for t in (x, x.t().contiguous().t(), extreme):
        want = ref.act_quant(t, 128, False)
        with qk.use_backend(backend_name):
            got = qk.act_quant(t)
        assert_same_bits(got[0], want[0])
        assert_same_bits(got[1], want[1])


@pytest.mark.parametrize("backend_name", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_act_quant_nan_and_inf_poison_their_group_only(backend_name, scale_format):
    """A NaN or inf input makes its own group's scale NaN / inf and its values NaN (as x / s does in
    the reference), and leaves the other groups of the row alone."""
    x = _randn(3, 384, seed=15)
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    with qk.use_backend(backend_name):
        q, s = qk.act_quant(x, scale_format=scale_format)
    q, s = q.float().cpu(), s.cpu()
    assert torch.isnan(s[0, 0]) and torch.isnan(q[0, :128]).all()
    assert s[1, 1] == float("inf") and torch.isnan(q[1, 200])
    finite = torch.ones(3, 3, dtype=torch.bool)
    finite[0, 0] = finite[1, 1] = False
    assert torch.isfinite(s[finite]).all()
    assert torch.isfinite(q.view(3, 3, 128)[finite]).all()
    if backend_name != "reference":
        want_q, want_s = ref.act_quant(x, 128, scale_format == "ue8m0")
        assert_same_bits(s, want_s.cpu())
        # finite values agree to the bit; NaN bytes may differ in sign between devices
        both_nan = torch.isnan(q) & torch.isnan(want_q.float().cpu())
        assert torch.equal(torch.isnan(q), torch.isnan(want_q.float().cpu()))
        assert torch.equal(q[~both_nan], want_q.float().cpu()[~both_nan])


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,group", [((3, 300), 1 << 21), ((2, 9000), 8192), ((2, 9000), 5000)])
def test_act_quant_wide_groups(backend_name, shape, group):
    """Groups wider than K (one group per row) or wider than one tile (two passes over the group)."""
    x = _randn(*shape, seed=16, scale=4.0)
    x[1, -3] = 77.0
    want_q, want_s = ref.act_quant(x, group, False)
    with qk.use_backend(backend_name):
        q, s = qk.act_quant(x, group=group)
    assert s.shape == (shape[0], math.ceil(shape[1] / group))
    assert_same_bits(q, want_q)
    assert_same_bits(s, want_s)


GEMM_CASES = [  # (M, N, K): decode rows, odd edges, partial last K block, several N blocks
    (1, 64, 128), (19, 200, 300), (111, 130, 256), (3, 576, 512), (40, 128, 144), (2, 1, 16),
]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("m,n,k", GEMM_CASES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gemm_matches_float64(backend_name, m, n, k, out_dtype):
    bq, bs = _fp8_weight(n, k, seed=n + k)
    aq, as_ = ref.act_quant(_randn(m, k, seed=m + k, scale=2.0), 128)
    want = ref.fp8_block_gemm(aq, as_, bq, bs, torch.float64)
    why = gemm_refusal(backend_name, k)
    if why:  # an explicit request names the limit instead of falling back
        with qk.use_backend(backend_name), pytest.raises(qk.BackendUnavailable, match=why):
            qk.fp8_block_gemm(aq, as_, bq, bs, out_dtype=out_dtype)
        return
    with qk.use_backend(backend_name):
        c = qk.fp8_block_gemm(aq, as_, bq, bs, out_dtype=out_dtype)
    assert qk.last_backends()["fp8_block_gemm"] == backend_name
    assert c.shape == (m, n) and c.dtype == out_dtype
    rtol, atol = gemm_tolerance(out_dtype, on_gpu=c.is_cuda)
    torch.testing.assert_close(c.double(), want, rtol=rtol, atol=atol * float(want.abs().max()))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gemm_leading_dims_views_and_empty(backend_name, nan_empty):
    bq, bs = _fp8_weight(96, 256, seed=21)
    aq, as_ = ref.act_quant(_randn(2, 3, 256, seed=22), 128)
    want = ref.fp8_block_gemm(aq.view(6, 256), as_.view(6, 2), bq, bs, torch.float32).view(2, 3, 96)
    with qk.use_backend(backend_name):
        got = qk.fp8_block_gemm(aq, as_, bq, bs, out_dtype=torch.float32)
        got_t = qk.fp8_block_gemm(aq, as_.transpose(-1, -2).contiguous().transpose(-1, -2), bq,
                                  bs.t().contiguous().t(), out_dtype=torch.float32)  # strided scales
        empty_m = qk.fp8_block_gemm(aq[:0, 0], as_[:0, 0], bq, bs)
        empty_n = qk.fp8_block_gemm(aq[0], as_[0], bq[:0], bs[:0])
    assert_same_bits(got_t, got)  # the same sums, whatever the scales' strides
    rtol, atol = gemm_tolerance(torch.float32, on_gpu=HAS_CUDA)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max()))
    assert empty_m.shape == (0, 96) and empty_n.shape == (3, 0)


def test_gemm_k_zero_gives_zeros():
    a = torch.zeros(3, 0, dtype=FP8)
    b = torch.zeros(5, 0, dtype=FP8)
    out = qk.fp8_block_gemm(a, torch.zeros(3, 0), b, torch.zeros(1, 0), out_dtype=torch.float32)
    assert torch.equal(out, torch.zeros(3, 5))


def test_gemm_sqnr_against_unquantised_matmul():
    """The whole FP8 path (act_quant + block GEMM on a quantised weight) against x @ w.T in float64:
    about 26 dB for Gaussian data (two 3-bit-mantissa operands)."""
    w = _randn(256, 640, seed=31, device="cpu")
    x = _randn(48, 640, seed=32, device="cpu")
    bq, bs = ref.weight_quant(w)
    aq, as_ = qk.act_quant(x)
    c = qk.fp8_block_gemm(aq, as_, bq, bs, out_dtype=torch.float32)
    assert sqnr_db(x.double() @ w.double().t(), c) > 22


# ------------------------------------------------------------------------------------------------
# torch.library contract
# ------------------------------------------------------------------------------------------------


# opcheck's test_schema compares inputs before and after with torch.allclose, which float8 tensors
# do not implement; for the ops with fp8 inputs the same check (inputs unchanged) is made on their bits.
NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_opcheck(backend_name):
    """K = 200: a partial last K block, and not a multiple of 16, which the CUDA GEMM refuses (an
    explicit request raises BackendUnavailable, checked here); so the GEMM is also checked at K = 208."""
    bq, bs = _fp8_weight(70, 200, seed=41)
    x = _randn(5, 200, seed=42)
    aq, as_ = ref.act_quant(x, 128)
    bq16, bs16 = _fp8_weight(70, 208, seed=43)
    aq16, as16 = ref.act_quant(_randn(5, 208, seed=44), 128)
    before = [t.clone() for t in (bq, bs, aq, as_, bq16, bs16, aq16, as16)]
    with qk.use_backend(backend_name):
        torch.library.opcheck(torch.ops.quickllm.weight_dequant.default, (bq, bs, 128, 128, torch.bfloat16),
                              test_utils=NO_SCHEMA)
        torch.library.opcheck(torch.ops.quickllm.act_quant.default, (x, 128, False))
        torch.library.opcheck(torch.ops.quickllm.act_quant.default, (x, 64, True))
        torch.ops.quickllm.weight_dequant(bq, bs, 128, 128, torch.float32)
        for a, a_s, b, b_s in ((aq, as_, bq, bs), (aq16, as16, bq16, bs16)):
            why = gemm_refusal(backend_name, a.shape[1])
            if why:
                with pytest.raises(qk.BackendUnavailable, match=why):
                    torch.ops.quickllm.fp8_block_gemm(a, a_s, b, b_s, torch.float32)
                continue
            torch.library.opcheck(torch.ops.quickllm.fp8_block_gemm.default, (a, a_s, b, b_s, torch.float32),
                                  test_utils=NO_SCHEMA)
            torch.ops.quickllm.fp8_block_gemm(a, a_s, b, b_s, torch.bfloat16)
    for t, b in zip((bq, bs, aq, as_, bq16, bs16, aq16, as16), before):
        assert_same_bits(t, b)


def test_compile_and_export_fp8_linear():
    torch._dynamo.reset()
    lin = torch.nn.Linear(300, 140, bias=True)
    layer = qk.FP8Linear.from_linear(lin, path="fp8")
    x = _randn(2, 5, 300, seed=43, device="cpu")
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    ep = torch.export.export(layer, (x,))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"quickllm.act_quant.default", "quickllm.fp8_block_gemm.default"} <= names
    torch.testing.assert_close(ep.module()(x), eager, rtol=0, atol=0)


def test_compile_inductor_dequant_path():
    torch._dynamo.reset()
    layer = qk.FP8Linear.from_linear(torch.nn.Linear(256, 130), path="dequant")
    x = _randn(7, 256, seed=44, device="cpu")
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel launch
# ------------------------------------------------------------------------------------------------


def _no_launch(monkeypatch):
    from quickllm_kernels.fp8 import triton as tri
    for kernel in ("_dequant_kernel", "_act_quant_kernel", "_gemm_kernel"):
        monkeypatch.setattr(tri, kernel, None)


def _bad_cases():
    q, s = _fp8_weight(130, 256, device="cpu")
    aq, as_ = ref.act_quant(_randn(4, 256, seed=51, device="cpu"), 128)
    dq = lambda **kw: qk.weight_dequant(**{"w": q, "scale_inv": s, **kw})  # noqa: E731
    gm = lambda **kw: qk.fp8_block_gemm(**{"a_fp8": aq, "a_scales": as_, "b_fp8": q, "b_scales": s,  # noqa: E731
                                            **kw})
    return [
        (lambda: dq(w=q.float()), TypeError, "w must be torch.float8_e4m3fn"),
        (lambda: dq(w=q[0]), ValueError, "w must be 2-D"),
        (lambda: dq(scale_inv=s[:1]), ValueError, r"scale_inv must have shape \[2, 2\]"),
        (lambda: dq(scale_inv=s.double()), TypeError, "scale_inv must be float32"),
        (lambda: dq(block=(0, 128)), ValueError, "block must be two positive"),
        (lambda: dq(out_dtype=torch.int32), TypeError, "out_dtype must be"),
        (lambda: dq(scale_inv=s.to("meta")), ValueError, "scale_inv must be on the same device"),
        (lambda: qk.act_quant(torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must be float32"),
        (lambda: qk.act_quant(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: qk.act_quant(torch.ones(4, 8), group=0), ValueError, "group must be a positive"),
        (lambda: qk.act_quant(torch.ones(4, 8), scale_format="e8m0"), ValueError, "scale_format must be"),
        (lambda: gm(a_fp8=aq.float()), TypeError, "a must be torch.float8_e4m3fn"),
        (lambda: gm(b_fp8=q[:, :128], b_scales=s[:, :1]), ValueError, "same K"),
        (lambda: gm(a_scales=as_[:, :1]), ValueError, r"a_scales must have shape \[4, 2\]"),
        (lambda: gm(b_scales=s[:1]), ValueError, r"b_scales must have shape \[2, 2\]"),
        (lambda: gm(a_scales=as_.half()), TypeError, "a_scales must be float32"),
        (lambda: gm(a_scales=as_[:3]), ValueError, "a_scales must be"),
        (lambda: gm(out_dtype=torch.float8_e4m3fn), TypeError, "out_dtype must be"),
        (lambda: gm(b_fp8=q.to("meta")), ValueError, "b must be on a's device"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("case", range(len(BAD)), ids=[b[2][:30] for b in BAD])
def test_bad_input(backend_name, case, monkeypatch):
    call, exc, match = BAD[case]
    _no_launch(monkeypatch)
    with qk.use_backend(backend_name), pytest.raises(exc, match=match):
        call()


def test_gemm_backend_limits_on_cpu(monkeypatch):
    bq, bs = _fp8_weight(64, 256, device="cpu")
    aq, as_ = ref.act_quant(_randn(4, 256, seed=52, device="cpu"), 128)
    with qk.use_backend("cuda"), pytest.raises(qk.BackendUnavailable, match="fp8_block_gemm"):
        qk.fp8_block_gemm(aq, as_, bq, bs)
    with qk.use_backend("triton"), pytest.raises(qk.BackendUnavailable, match="float64"):
        qk.fp8_block_gemm(aq, as_, bq, bs, out_dtype=torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qk.reload_settings()
    with qk.use_backend("triton"), pytest.raises(qk.BackendUnavailable, match="TRITON_INTERPRET=1"):
        qk.act_quant(torch.ones(2, 128))


# ------------------------------------------------------------------------------------------------
# FP8Linear
# ------------------------------------------------------------------------------------------------


def test_fp8_linear_roundtrip_and_paths():
    lin = torch.nn.Linear(300, 200, bias=True)
    layer = qk.FP8Linear.from_linear(lin)
    assert layer.weight.dtype == FP8 and layer.weight_scale_inv.shape == (2, 3)
    assert not any(p.requires_grad for p in layer.parameters())
    back = layer.to_linear(torch.float32)
    assert sqnr_db(lin.weight.detach(), back.weight.detach()) > 28
    torch.testing.assert_close(back.bias, lin.bias, rtol=0, atol=0)
    x = _randn(3, 4, 300, seed=61, device="cpu")
    with torch.no_grad():
        y = layer(x)
        assert layer.last_path == "dequant"  # no FP8 tensor cores on a CPU
        torch.testing.assert_close(y, back(x), rtol=1e-5, atol=1e-5)  # exactly dequant + matmul
        layer.path = "fp8"
        y8 = layer(x)
        assert layer.last_path == "fp8"
        aq, as_ = ref.act_quant(x, 128)
        want = ref.fp8_block_gemm(aq.view(12, 300), as_.view(12, 3), layer.weight, layer.weight_scale_inv,
                                  torch.float32).view(3, 4, 200) + lin.bias
        torch.testing.assert_close(y8, want, rtol=1e-6, atol=1e-5)
        assert sqnr_db(lin(x), y8) > 22 and sqnr_db(lin(x), y) > 25


def test_fp8_linear_keeps_its_format_through_dtype_casts():
    """module.bfloat16() / .half() / .to(dtype) convert the bias, never the fp8 weight or its float32
    scales (a float32 -> bfloat16 -> float32 trip would change the scales' bits)."""
    layer = qk.FP8Linear.from_linear(torch.nn.Linear(300, 200, bias=True))
    w, s = _bits(layer.weight), _bits(layer.weight_scale_inv)
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.float32),
                 lambda m: m.to("cpu", torch.bfloat16), lambda m: m.double(), lambda m: m.type(torch.float32),
                 lambda m: m.type(torch.float16)):
        layer = cast(layer)
        assert layer.weight.dtype == FP8 and layer.weight_scale_inv.dtype == torch.float32
        assert isinstance(layer.weight, torch.nn.Parameter)
        assert torch.equal(_bits(layer.weight), w) and torch.equal(_bits(layer.weight_scale_inv), s)
    assert layer.bias.dtype == torch.float16
    x = _randn(2, 300, seed=63, dtype=torch.bfloat16, device="cpu")
    with torch.no_grad():
        y = layer.bfloat16()(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.gpu
def test_gpu_fp8_linear_moves_to_the_gpu_and_back():
    layer = qk.FP8Linear.from_linear(torch.nn.Linear(256, 128))
    w, s = _bits(layer.weight), _bits(layer.weight_scale_inv)
    layer = layer.to("cuda", torch.bfloat16)
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == FP8
    layer = layer.cpu()
    assert torch.equal(_bits(layer.weight), w) and torch.equal(_bits(layer.weight_scale_inv), s)


def test_fp8_linear_loads_checkpoint_tensors():
    """A DeepSeek-V3 layer's `weight` / `weight_scale_inv` load with load_state_dict as they are stored."""
    q, s = _fp8_weight(576, 300, seed=62, device="cpu")  # kv_a_proj-like: 576 rows, edge blocks
    layer = qk.FP8Linear(300, 576)
    layer.load_state_dict({"weight": q, "weight_scale_inv": s})
    assert_same_bits(layer.weight.data, q)
    x = _randn(2, 300, seed=63, dtype=torch.bfloat16, device="cpu")
    want = torch.nn.functional.linear(x, ref.weight_dequant(q, s, out_dtype=torch.bfloat16))
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    wrapped = qk.FP8Linear.from_fp8(q, s, scale_format="ue8m0")
    assert "ue8m0" in repr(wrapped)
    with pytest.raises(ValueError, match="scale_inv must have shape"):
        qk.FP8Linear.from_fp8(q, s[:, :1])
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 300\]"):
        layer(torch.randn(2, 299))
    with pytest.raises(ValueError, match="path must be one of"):
        qk.FP8Linear(8, 8, path="fast")
    with pytest.raises(ValueError, match="needs 128 x 128"):
        qk.FP8Linear(8, 8, block=(64, 64), path="fp8")(torch.randn(1, 8))


def test_fp8_linear_matches_converter_scheme(tmp_path):
    """from_linear quantises exactly as `python -m quickllm_kernels.fp8 convert --to fp8` does."""
    from quickllm_kernels.fp8.checkpoint import QUANTISED
    assert QUANTISED.search("model.layers.0.mlp.down_proj.weight")
    w = _randn(130, 260, seed=64, device="cpu")
    lin = torch.nn.Linear(260, 130, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = qk.FP8Linear.from_linear(lin)
    q, s = ref.weight_quant(w)
    assert_same_bits(layer.weight.data, q)
    assert_same_bits(layer.weight_scale_inv.data, s)


# ------------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3 shapes, FP8 path choice
# ------------------------------------------------------------------------------------------------

DSV3_NK = [(576, 7168), (7168, 2048), (24576, 1536), (2048, 7168), (7168, 18432), (32768, 512)]


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("n,k", DSV3_NK)
def test_gpu_deepseek_quantisers(backend_name, n, k):
    """Bit for bit; every output starts in NaN-filled memory (poison_allocator), so an element a
    kernel leaves unwritten differs."""
    q, s = _fp8_weight(n, k, seed=71)
    x = _randn(1000, k, seed=72, dtype=torch.bfloat16)
    quant_sizes = (1000 * k, 1000 * math.ceil(k / 128) * 4)  # x_fp8, scales
    with qk.use_backend(backend_name):
        poison_allocator(n * k * 2)
        d = qk.weight_dequant(q, s)
        poison_allocator(*quant_sizes)
        aq, as_ = qk.act_quant(x)
        poison_allocator(*quant_sizes)
        aq8, as8 = qk.act_quant(x, scale_format="ue8m0")
    assert_same_bits(d, ref.weight_dequant(q, s))
    for got, want in zip((aq, as_, aq8, as8), (*ref.act_quant(x, 128, False), *ref.act_quant(x, 128, True))):
        assert_same_bits(got, want)


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 7, 64, 300, 2048])
@pytest.mark.parametrize("n,k", DSV3_NK)
def test_gpu_deepseek_gemm(backend_name, m, n, k):
    if not fp8_ops.fp8_gemm_supported(DEVICE):
        pytest.skip("needs FP8 tensor cores (sm_89+)")
    q, s = _fp8_weight(n, k, seed=73)
    aq, as_ = ref.act_quant(_randn(m, k, seed=74, dtype=torch.bfloat16), 128)
    want = ref.fp8_block_gemm(aq, as_, q, s, torch.float64)
    # the output, and a split-K workspace (float32 [splits, M, N], splits <= K / 256) if one is made
    poison_allocator(m * n * 2, min(m * n * 4 * max(1, k // 256), 1 << 30))
    with qk.use_backend(backend_name):
        c = qk.fp8_block_gemm(aq, as_, q, s, out_dtype=torch.bfloat16)
    assert qk.last_backends()["fp8_block_gemm"] == backend_name
    torch.testing.assert_close(c.double(), want, rtol=TOL[torch.bfloat16]["rtol"],
                               atol=GEMM_ATOL[torch.bfloat16] * float(want.abs().max()))


@pytest.mark.gpu
def test_gpu_fp8_linear_takes_fp8_path():
    lin = torch.nn.Linear(7168, 576, dtype=torch.bfloat16, device=DEVICE)
    layer = qk.FP8Linear.from_linear(lin)
    x = _randn(4, 7168, seed=75, dtype=torch.bfloat16)
    poison_allocator(4 * 576 * 2)
    y = layer(x)
    assert layer.last_path == ("fp8" if fp8_ops.fp8_gemm_supported(DEVICE) else "dequant")
    assert sqnr_db(lin(x), y) > 22


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_cuda_gemm_unaligned_k_falls_back():
    if not fp8_ops.fp8_gemm_supported(DEVICE):
        pytest.skip("needs FP8 tensor cores (sm_89+)")
    q, s = _fp8_weight(64, 200, seed=76)  # K = 200: not a multiple of 16
    aq, as_ = ref.act_quant(_randn(3, 200, seed=77), 128)
    with qk.use_backend("cuda"), pytest.raises(qk.BackendUnavailable, match="K % 16"):
        qk.fp8_block_gemm(aq, as_, q, s)
    qk.fp8_block_gemm(aq, as_, q, s)
    assert qk.last_backends()["fp8_block_gemm"] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [4, 16, 17, 300])
def test_gpu_gemm_auto_order(m):
    """Auto: no kernel without FP8 tensor cores; on sm_90 and sm_100 (FP8 MMA through wgmma /
    tcgen05 only, which Triton emits) Triton first, but the CUDA kernel for decode-sized calls
    (M <= 16, memory-bound); the CUDA kernel first where mma.sync FP8 is native (sm_89, sm_120)."""
    from quickllm_kernels import _library
    q, s = _fp8_weight(128, 256, seed=78)
    aq, as_ = ref.act_quant(_randn(m, 256, seed=79), 128)
    qk.fp8_block_gemm(aq, as_, q, s)
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        want = typical = "reference"
    elif not _library.CUDA_EXT_LOADED:
        want = typical = "triton"
    elif cap[0] in (9, 10):
        want, typical = ("cuda" if m <= 16 else "triton"), "triton"
    else:
        want = typical = "cuda"
    assert qk.last_backends()["fp8_block_gemm"] == want
    assert qk.info()["ops"]["fp8_block_gemm"]["would_use"] == typical


def test_info_lists_fp8_ops():
    ops = qk.info()["ops"]
    assert {"weight_dequant", "act_quant", "fp8_block_gemm"} <= set(ops)
    if not HAS_CUDA:
        assert ops["fp8_block_gemm"]["would_use"] == "reference"
        assert ops["fp8_block_gemm"]["unavailable"]["cuda"]  # CPU tensors, or no extension
