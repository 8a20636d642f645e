"""Fused RoPE: cache builders and rotation vs transformers, each backend vs the reference, gradients,
opcheck, torch.compile / torch.export, bad inputs, and the CUDA extension's registration."""
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, assert_close, gen

import quickllm_kernels as qk
from quickllm_kernels import _library, backend
from quickllm_kernels.rope import rope_inv_freq
from quickllm_kernels.rope import reference as ref

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402




def make_qk(tokens, hq, hk, head_dim, dtype, *, batch=None, fused=True, seed=0, device=DEVICE):
    """q and k as views into one fused qkv projection output (the layout real models produce), or
    as separate contiguous tensors. [tokens, H, D], or [batch, tokens, H, D] when batch is given."""
    lead = (tokens,) if batch is None else (batch, tokens)
    g = gen(seed)
    if fused:
        qkv = torch.randn(*lead, (hq + 2 * hk) * head_dim, generator=g).to(device=device, dtype=dtype)
        q = qkv[..., : hq * head_dim].unflatten(-1, (hq, head_dim))
        k = qkv[..., hq * head_dim : (hq + hk) * head_dim].unflatten(-1, (hk, head_dim))
    else:
        q = torch.randn(*lead, hq, head_dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(*lead, hk, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k


def oracle(q, k, positions, cache, is_neox, inverse=False):
    """The reference in float32 from the same (rounded) inputs."""
    return ref.apply_rope(q.float(), k.float(), positions, cache.float(), is_neox, inverse)


# ------------------------------------------------------------------------------------------------
# Cache builders vs transformers' rope initialisation and rotary embedding modules
# ------------------------------------------------------------------------------------------------

SCALINGS = {
    "default": (None, {}),
    "linear": ({"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, {}),
    # DeepSeek-V3's configuration (factor 40 from 4096 to 163840 positions).
    "yarn_deepseek_v3": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, {}),
    # mscale != mscale_all_dim: the attention factor is not 1.
    "yarn_mscale": ({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128,
                     "mscale": 0.707, "mscale_all_dim": 1.0}, {}),
    "yarn_plain": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, {}),
}


def _hf_config(scaling, head_dim, rotary_dim, base, max_position_embeddings):
    params = {"rope_type": "default", "rope_theta": base}
    if scaling:
        params.update(scaling)
    if rotary_dim != head_dim:
        params["partial_rotary_factor"] = rotary_dim / head_dim
    return transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, num_hidden_layers=1,
        max_position_embeddings=max_position_embeddings, rope_parameters=params)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 64)])
def test_inv_freq_matches_transformers(name, head_dim, rotary_dim):
    scaling, _ = SCALINGS[name]
    base, mpe = 10000.0, 256
    if scaling is None:
        head_dim = rotary_dim  # Llama's default init ignores partial_rotary_factor; the formula is dim's
    cfg = _hf_config(scaling, head_dim, rotary_dim, base, mpe)
    rope_type = cfg.rope_parameters["rope_type"]
    fn = ROPE_INIT_FUNCTIONS.get(rope_type) or transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
        .compute_default_rope_parameters
    seq_len = 3 * mpe if rope_type == "dynamic" else None
    want_inv, want_factor = fn(cfg, device="cpu", seq_len=seq_len)
    got_inv, got_factor = rope_inv_freq(rotary_dim, base=base, scaling=scaling, max_position_embeddings=mpe,
                                        seq_len=seq_len)
    assert got_inv.dtype == torch.float32 and got_inv.shape == (rotary_dim // 2,)
    torch.testing.assert_close(got_inv, want_inv.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cache_matches_transformers_rotary_embedding(name):
    """The cos/sin the HF rotary module hands to attention, for positions 0..P-1, equal our table rows."""
    scaling, _ = SCALINGS[name]
    head_dim, base, mpe = 32, 500000.0, 64
    positions = 3 * mpe if name == "dynamic" else 2 * mpe  # dynamic: beyond the trained length
    cfg = _hf_config(scaling, head_dim, head_dim, base, mpe)
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, positions, head_dim)
    cos, sin = rot(x, torch.arange(positions)[None])
    cache = qk.rope_cache(head_dim, positions, base=base, scaling=scaling, max_position_embeddings=mpe)
    torch.testing.assert_close(cache[:, : head_dim // 2], cos[0, :, : head_dim // 2], rtol=0, atol=2e-6)
    torch.testing.assert_close(cache[:, head_dim // 2 :], sin[0, :, : head_dim // 2], rtol=0, atol=2e-6)


def test_deepseek_v3_softmax_scale_and_attention_factor():
    scaling = SCALINGS["yarn_deepseek_v3"][0]
    _, factor = rope_inv_freq(64, scaling=scaling)
    assert factor == 1.0  # mscale == mscale_all_dim: cos and sin are not scaled
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    want = yarn_apply_mscale(scaling, 192 ** -0.5)
    assert qk.rope_softmax_scale(192, scaling) == pytest.approx(want, rel=1e-12)
    assert qk.rope_softmax_scale(192, scaling) == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert qk.rope_softmax_scale(128) == 128 ** -0.5


def test_cache_dtype_device_and_layout():
    c = qk.rope_cache(16, 10, base=100.0, dtype=torch.bfloat16)
    assert c.shape == (10, 16) and c.dtype == torch.bfloat16
    c32 = qk.rope_cache(16, 10, base=100.0)
    inv = 1.0 / (100.0 ** (torch.arange(0, 16, 2).double() / 16))
    ang = torch.arange(10).double()[:, None] * inv
    torch.testing.assert_close(c32.double(), torch.cat((ang.cos(), ang.sin()), -1), rtol=0, atol=1e-6)
    assert qk.rope_cache(16, 0).shape == (0, 16)


@pytest.mark.parametrize("bad,match", [
    (dict(rotary_dim=15), "rotary_dim"),
    (dict(scaling={"rope_type": "su"}), "unsupported rope_type 'su'"),
    (dict(scaling={"rope_type": "linear"}), r"scaling\['factor'\]"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0}), "max_position_embeddings"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
    (dict(scaling={"rope_type": "default", "rope_theta": 1e6}), "rope_theta"),
    (dict(max_positions=-1), "max_positions"),
])
def test_cache_bad_arguments(bad, match):
    kw = dict(rotary_dim=16, max_positions=8)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        qk.rope_cache(kw.pop("rotary_dim"), kw.pop("max_positions"), **kw)


# ------------------------------------------------------------------------------------------------
# Rotation vs transformers' own functions
# ------------------------------------------------------------------------------------------------


def test_neox_matches_transformers_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    b, s, hq, hk, d = 2, 13, 4, 2, 32
    q, k = make_qk(s, hq, hk, d, torch.float32, batch=b, device="cpu")
    pos = torch.randint(0, 100, (b, s), generator=gen(1))
    cache = qk.rope_cache(d, 100, base=10000.0)
    cos = torch.cat((cache[pos, : d // 2],) * 2, -1)
    sin = torch.cat((cache[pos, d // 2 :],) * 2, -1)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    with qk.use_backend("reference"):
        got_q, got_k = qk.apply_rope(q, k, pos, cache)
    torch.testing.assert_close(got_q, want_q.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_gptj_matches_transformers_rotate_every_two():
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb
    b, s, h, d, r = 2, 11, 3, 32, 16  # GPT-J rotates a partial rotary_dim
    q, k = make_qk(s, h, h, d, torch.float32, batch=b, device="cpu")
    pos = torch.randint(0, 64, (b, s), generator=gen(2))
    cache = qk.rope_cache(r, 64)
    cos, sin = cache[pos, : r // 2], cache[pos, r // 2 :]
    want_q = torch.cat((apply_rotary_pos_emb(q[..., :r], sin, cos), q[..., r:]), -1)
    want_k = torch.cat((apply_rotary_pos_emb(k[..., :r], sin, cos), k[..., r:]), -1)
    got_q, got_k = qk.apply_rope(q, k, pos, cache, style="gptj")
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


def test_gptj_matches_deepseek_v3_interleaved_rope():
    """transformers' DeepSeek-V3 rotates interleaved pairs and returns them de-interleaved."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    b, s, h, d = 1, 9, 4, 64
    q, k = make_qk(s, h, 1, d, torch.float32, batch=b, device="cpu")  # MLA: one shared k_pe head
    scaling = SCALINGS["yarn_deepseek_v3"][0]
    cache = qk.rope_cache(d, 32, scaling=scaling)
    pos = torch.arange(s)[None] + 7
    cos = torch.cat((cache[pos, : d // 2],) * 2, -1)
    sin = torch.cat((cache[pos, d // 2 :],) * 2, -1)
    want_q, want_k = apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got_q, got_k = qk.apply_rope(q, k, pos, cache, style="gptj")
    deinterleave = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))
    torch.testing.assert_close(got_q[..., deinterleave], want_q.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k[..., deinterleave], want_k.transpose(1, 2), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Each kernel backend vs the reference
# ------------------------------------------------------------------------------------------------

# (tokens, batch, hq, hk, head_dim, rotary_dim): odd token counts, GQA and MQA, partial rotary.
SHAPES = [
    (1, None, 1, 1, 8, 8),
    (19, None, 3, 1, 16, 16),
    (111, None, 5, 2, 24, 16),
    (7, 3, 4, 2, 32, 32),
    (5, 2, 2, 1, 40, 8),
    (3, None, 2, 3, 40, 24),  # rotary half (12) not a power of two
]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kernel_matches_reference(backend_name, shape, style, dtype):
    tokens, batch, hq, hk, d, r = shape
    q, k = make_qk(tokens, hq, hk, d, dtype, batch=batch, fused=(tokens % 2 == 1), seed=tokens)
    lead = q.shape[:-2]
    pos = torch.randint(0, 4 * tokens + 3, lead, generator=gen(3), dtype=torch.int64).to(DEVICE)
    cache = qk.rope_cache(r, 4 * tokens + 3, base=100.0, device=DEVICE)
    q0, k0 = q.clone(), k.clone()
    with qk.use_backend(backend_name):
        got_q, got_k = qk.apply_rope(q, k, pos, cache, style=style)
    assert qk.last_backends()["apply_rope"] == backend_name
    want_q, want_k = oracle(q, k, pos, cache, style == "neox")
    assert got_q.dtype == dtype and got_q.shape == q.shape and got_q.is_contiguous()
    assert_close(got_q, want_q, dtype)
    assert_close(got_k, want_k, dtype)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # functional: inputs untouched
    assert torch.equal(got_q[..., r:], q[..., r:])  # pass-through dims are copied exactly


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_on_fused_qkv_views(backend_name, style, dtype):
    """In place on views of one qkv buffer: q and k rotate, v and the pass-through dims are untouched."""
    tokens, hq, hk, d, r = 13, 4, 2, 24, 16
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen(4)).to(device=DEVICE, dtype=dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    before = qkv.clone()
    pos = torch.randint(0, 50, (tokens,), generator=gen(5), dtype=torch.int32).to(DEVICE)
    cache = qk.rope_cache(r, 50, device=DEVICE, dtype=dtype)
    want_q, want_k = oracle(q, k, pos, cache, style == "neox")
    with qk.use_backend(backend_name):
        out_q, out_k = qk.apply_rope(q, k, pos, cache, style=style, inplace=True)
    assert out_q is q and out_k is k
    assert_close(q, want_q, dtype)
    assert_close(k, want_k, dtype)
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :])  # v
    assert torch.equal(q[..., r:], before[:, : hq * d].view(tokens, hq, d)[..., r:])


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_non_unit_last_stride_and_transposed_views(backend_name):
    """Views whose last dim is strided (the kernels need unit stride; the host copies) and [B, S] views
    whose batch and sequence strides do not merge."""
    base = torch.randn(6, 5, 3, 16, 2, generator=gen(6)).to(DEVICE)
    q = base[..., 0]  # last-dim stride 2
    k = base[:, :, :1, :, 1]
    qt = torch.randn(5, 6, 3, 16, generator=gen(7)).to(DEVICE).transpose(0, 1)  # [6, 5, 3, 16], seq-major
    kt = torch.randn(5, 6, 1, 16, generator=gen(8)).to(DEVICE).transpose(0, 1)
    pos = torch.randint(0, 40, (6, 5), generator=gen(9)).to(DEVICE)
    cache = qk.rope_cache(16, 40, device=DEVICE)
    for qq, kk in ((q, k), (qt, kt)):
        want = oracle(qq, kk, pos, cache, True)
        with qk.use_backend(backend_name):
            got = qk.apply_rope(qq, kk, pos, cache)
            assert_close(got[0], want[0])
            assert_close(got[1], want[1])
            qk.apply_rope(qq, kk, pos, cache, inplace=True)
        assert_close(qq, want[0])
        assert_close(kk, want[1])


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_empty_inputs(backend_name):
    cache = qk.rope_cache(8, 4, device=DEVICE)
    for lead in ((0,), (0, 3), (2, 0)):
        q = torch.randn(*lead, 2, 8, device=DEVICE)
        k = torch.randn(*lead, 1, 8, device=DEVICE)
        pos = torch.zeros(lead, dtype=torch.int64, device=DEVICE)
        with qk.use_backend(backend_name):
            a, b = qk.apply_rope(q, k, pos, cache)
            qk.apply_rope(q, k, pos, cache, inplace=True)
        assert a.shape == q.shape and b.shape == k.shape


@pytest.mark.triton
def test_triton_kernel_out_of_range_positions_give_nan_not_out_of_bounds_reads():
    """The kernels' contract when no host check runs (GPU default): NaN in rotated dims, tail intact."""
    from quickllm_kernels.rope import triton as tri
    q, k = make_qk(4, 2, 1, 12, torch.float32, fused=False)
    cache = qk.rope_cache(8, 10, device=DEVICE)
    pos = torch.tensor([0, 10, -1, 9], device=DEVICE)
    for fn in (tri.apply_rope, ref.apply_rope):
        got_q, _ = fn(q, k, pos, cache, True, False)
        assert torch.isnan(got_q[[1, 2], :, :8]).all()
        assert not torch.isnan(got_q[[0, 3]]).any()
        assert torch.equal(got_q[..., 8:], q[..., 8:])
    # Even a cache with no rows is never read: every position is out of range.
    got_q, _ = tri.apply_rope(q, k, pos, torch.empty(0, 8, device=DEVICE), True, False)
    assert torch.isnan(got_q[..., :8]).all() and torch.equal(got_q[..., 8:], q[..., 8:])


def test_out_of_range_positions_raise_on_cpu():
    q, k = make_qk(4, 2, 1, 8, torch.float32, device="cpu")
    cache = qk.rope_cache(8, 10)
    for bad in ([0, 1, 10, 2], [0, -1, 3, 3]):
        with pytest.raises(IndexError, match=r"positions must lie in \[0, 10\)"):
            qk.apply_rope(q, k, torch.tensor(bad), cache)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_gradcheck_float64(style):
    q, k = make_qk(5, 2, 1, 12, torch.float64, batch=2, device="cpu")
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    pos = torch.randint(0, 20, (2, 5), generator=gen(10))
    cache = qk.rope_cache(8, 20, dtype=torch.float64)
    f = lambda a, b: qk.apply_rope(a, b, pos, cache, style=style)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k))
    assert torch.autograd.gradgradcheck(f, (q, k))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_backward_matches_reference_autograd(backend_name):
    q, k = make_qk(9, 3, 1, 16, torch.float32, fused=True)
    pos = torch.randint(0, 30, (9,), generator=gen(11)).to(DEVICE)
    cache = qk.rope_cache(16, 30, device=DEVICE)
    gq, gk = torch.randn(9, 3, 16, generator=gen(12)).to(DEVICE), torch.randn(9, 1, 16, generator=gen(13)).to(DEVICE)

    def grads(name):
        a, b = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        with qk.use_backend(name):
            oq, ok = qk.apply_rope(a, b, pos, cache)
            torch.autograd.backward((oq, ok), (gq, gk))
        return a.grad, b.grad

    for got, want in zip(grads(backend_name), grads("reference")):
        assert_close(got, want)


def test_inplace_with_grad_flows_through_copy():
    q0, k0 = make_qk(6, 2, 1, 8, torch.float64, device="cpu", fused=False)
    a, b = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qq, kk = a * 1.0, b * 1.0  # non-leaf, so in-place is allowed
    pos = torch.arange(6)
    cache = qk.rope_cache(8, 6, dtype=torch.float64)
    qk.apply_rope(qq, kk, pos, cache, inplace=True)
    (qq.sum() + kk.square().sum()).backward()
    a2, b2 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    oq, ok = ref.apply_rope(a2, b2, pos, cache, True, False)
    (oq.sum() + ok.square().sum()).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


# ------------------------------------------------------------------------------------------------
# torch.library contract: opcheck, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_opcheck(backend_name):
    dtype = torch.float64 if backend_name == "reference" else torch.float32
    q, k = make_qk(5, 2, 1, 12, dtype, batch=2, fused=True)
    pos = torch.randint(0, 20, (2, 5), generator=gen(14)).to(DEVICE)
    cache = qk.rope_cache(8, 20, dtype=dtype, device=DEVICE)
    with qk.use_backend(backend_name):
        for is_neox in (True, False):
            torch.library.opcheck(torch.ops.quickllm.apply_rope.default,
                                  (q.detach().requires_grad_(), k.detach().requires_grad_(), pos, cache,
                                   is_neox, False))
            torch.library.opcheck(torch.ops.quickllm.apply_rope_.default,
                                  (q.clone(), k.clone(), pos, cache, is_neox, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k = make_qk(7, 3, 1, 16, torch.float32, device="cpu")
    pos = torch.randint(0, 20, (7,), generator=gen(15))
    cache = qk.rope_cache(16, 20)

    def f(q, k):
        q2, k2 = qk.apply_rope(q * 2, k, pos, cache)
        return (q2 * k2.sum()).sum()

    want = f(q, k)
    for compiler in ("aot_eager", "inductor"):
        got = torch.compile(f, fullgraph=True, backend=compiler)(q, k)
        torch.testing.assert_close(got, want)
    qq = q.detach().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(qq, k).backward()
    qr = q.detach().requires_grad_()
    f(qr, k).backward()
    torch.testing.assert_close(qq.grad, qr.grad)


def test_torch_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", qk.rope_cache(8, 32))

        def forward(self, q, k, pos):
            q, k = qk.apply_rope(q, k, pos, self.cache, style="gptj")
            return q + 1, k

    q, k = make_qk(4, 2, 1, 8, torch.float32, device="cpu")
    pos = torch.tensor([3, 1, 4, 1])
    ep = torch.export.export(M(), (q, k, pos))
    assert any(n.target is torch.ops.quickllm.apply_rope.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(q, k, pos)[0], M()(q, k, pos)[0])


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any kernel runs
# ------------------------------------------------------------------------------------------------


def _args(**over):
    q, k = make_qk(4, 2, 1, 8, torch.float32, device="cpu", fused=False)
    a = dict(q=q, k=k, positions=torch.arange(4), cos_sin_cache=qk.rope_cache(8, 16))
    a.update(over)
    return a


BAD = [
    (dict(k=torch.randn(4, 1, 6)), ValueError, r"k's head_dim \(6\) must equal q's head_dim \(8\)"),
    (dict(cos_sin_cache=torch.randn(16, 7)), ValueError, "rotary_dim .* must be even"),
    (dict(cos_sin_cache=torch.randn(16, 10)), ValueError, r"rotary_dim .* must not exceed head_dim \(8\)"),
    (dict(cos_sin_cache=torch.randn(16)), ValueError, "cos_sin_cache must be"),
    (dict(q=torch.randn(4, 8)), ValueError, "q must be"),
    (dict(k=torch.randn(4, 1, 1, 8)), ValueError, "k must have q's number of dims"),
    (dict(k=torch.randn(5, 1, 8)), ValueError, "k must have q's leading shape"),
    (dict(positions=torch.arange(5)), ValueError, "positions must have q's leading shape"),
    (dict(q=torch.zeros(4, 2, 8, dtype=torch.int32)), TypeError, "q must be float32"),
    (dict(k=torch.randn(4, 1, 8, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(positions=torch.arange(4).float()), TypeError, "positions must be int32 or int64"),
    (dict(cos_sin_cache=torch.randn(16, 8, dtype=torch.float16)), TypeError, "cos_sin_cache must be float32 or q's dtype"),
    (dict(positions=torch.arange(4, device="meta")), ValueError, "positions must be on q's device"),
    (dict(positions=torch.tensor([0, 1, 2, 16])), IndexError, r"positions must lie in \[0, 16\)"),
    (dict(cos_sin_cache=torch.empty(0, 8)), ValueError, "cos_sin_cache has no rows"),
]


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("over,exc,match", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input(backend_name, over, exc, match, monkeypatch):
    if backend_name == "triton":
        # Any launch would fail loudly: the error must come from validation, before it.
        from quickllm_kernels.rope import triton as tri
        monkeypatch.setattr(tri, "_launch", lambda *a, **k: pytest.fail("kernel launched on bad input"))
    a = _args(**over)
    with qk.use_backend(backend_name), pytest.raises(exc, match=match):
        qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"])
    with qk.use_backend(backend_name), pytest.raises(exc, match=match):
        qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"], inplace=True)


def test_bad_keywords():
    a = _args()
    with pytest.raises(ValueError, match="style must be 'neox' or 'gptj'"):
        qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"], style="llama")
    with pytest.raises(ValueError, match="cos_sin_cache gets no gradient"):
        qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"].requires_grad_())


def test_fake_tensor_validation():
    """Shape errors surface while tracing, not only at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k = torch.empty(4, 2, 8), torch.empty(4, 1, 6)
        with pytest.raises(ValueError, match="head_dim"):
            torch.ops.quickllm.apply_rope(q, k, torch.zeros(4, dtype=torch.int64), torch.empty(16, 8), True, False)


# ------------------------------------------------------------------------------------------------
# Backend registry
# ------------------------------------------------------------------------------------------------


def test_backend_choice_and_errors(monkeypatch):
    a = _args()
    call = lambda: qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"])  # noqa: E731
    call()
    assert qk.last_backends()["apply_rope"] == "reference"
    with pytest.raises(qk.BackendUnavailable, match="cuda.*(CUDA tensors|CUDA kernels are not loaded)"):
        with qk.use_backend("cuda"):
            call()
    with pytest.raises(ValueError, match="use_backend"):
        with qk.use_backend("cudnn"):
            pass
    monkeypatch.setenv("QUICKLLM_BACKEND", "nonsense")
    call()  # read once: a change takes effect at reload_settings()
    qk.reload_settings()
    with pytest.raises(ValueError, match="QUICKLLM_BACKEND"):
        call()
    monkeypatch.setenv("QUICKLLM_BACKEND", "reference")
    qk.reload_settings()
    with qk.use_backend("auto"):  # the context manager wins over the process setting
        assert backend.requested_backend() == "auto"
    assert backend.requested_backend() == "reference"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qk.reload_settings()
    why = backend.unavailable_reason("triton", "apply_rope", torch.device("cpu"))
    if backend.triton_status()[0]:
        assert "TRITON_INTERPRET=1" in why
    a = _args()
    with qk.use_backend("triton"), pytest.raises(qk.BackendUnavailable, match="triton"):
        qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"])


def test_float64_runs_on_reference_only():
    a = _args(q=torch.randn(4, 2, 8, dtype=torch.float64), k=torch.randn(4, 1, 8, dtype=torch.float64))
    qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"])
    assert qk.last_backends()["apply_rope"] == "reference"
    with qk.use_backend("triton"), pytest.raises(qk.BackendUnavailable):
        qk.apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"])


def test_info_and_cli():
    r = qk.info()
    assert r["torch"] == torch.__version__
    assert set(r["ops"]["apply_rope"]) == {"family", "would_use", "unavailable", "last_ran"}
    assert set(r["ops"]) == set(_library.SCHEMAS)  # every op, derived from the declarations
    assert r["cuda_extension"] == _library.CUDA_EXT_STATUS
    out = subprocess.run([sys.executable, "-m", "quickllm_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "apply_rope" in out and "CUDA extension" in out


# ------------------------------------------------------------------------------------------------
# The CUDA extension: builds here (CI has nvcc), registers the right schemas
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda_ext
def test_extension_registers_schemas():
    for name, schema in _library.SCHEMAS.items():
        public = getattr(torch.ops.quickllm, name).default._schema
        assert str(public) == f"quickllm::{schema}"
        if name in _library.COMPOSITE:  # no kernel of its own: no `_cuda_` twin
            assert not hasattr(torch.ops.quickllm, f"_cuda_{name}")
            continue
        kernel = getattr(torch.ops.quickllm, f"_cuda_{name}").default._schema
        assert str(kernel) == f"quickllm::_cuda_{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quickllm::_cuda_{name}", "CUDA")
    assert torch.ops.quickllm.apply_rope_.default._schema.is_mutable
    assert not torch.ops.quickllm.apply_rope.default._schema.is_mutable


@pytest.mark.cuda_ext
def test_extension_kernel_rejects_cpu_tensors():
    a = _args()
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.quickllm._cuda_apply_rope(a["q"], a["k"], a["positions"], a["cos_sin_cache"], True, False)


def test_schemas_without_extension():
    """Without the CUDA kernels (QUICKLLM_BUILD_CUDA=0: no ahead-of-time module, no just-in-time build) the
    package defines the same public schemas from schemas.def and runs."""
    code = ("import sys; sys.modules['quickllm_kernels._C'] = None\n"
            "import torch, quickllm_kernels as qk\n"
            "from quickllm_kernels import _library\n"
            "assert not _library.CUDA_EXT_LOADED\n"
            "for n, s in _library.SCHEMAS.items():\n"
            "    assert str(getattr(torch.ops.quickllm, n).default._schema) == 'quickllm::' + s\n"
            "q = torch.randn(3, 2, 8); k = torch.randn(3, 1, 8)\n"
            "qk.apply_rope(q, k, torch.arange(3), qk.rope_cache(8, 4))\n"
            "print(qk.info()['cuda_extension'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "QUICKLLM_BUILD_CUDA": "0"})
    assert out.returncode == 0, out.stderr
    assert "QUICKLLM_BUILD_CUDA=0" in out.stdout  # info() keeps the reason they did not load


# ------------------------------------------------------------------------------------------------
# GPU: realistic shapes, both kernel backends
# ------------------------------------------------------------------------------------------------

GPU_CASES = {
    # name: (tokens, batch, hq, hk, head_dim, rotary_dim, style)
    "qwen2_7b": (4096, None, 28, 4, 128, 128, "neox"),
    "qwen2_7b_batched": (1000, 3, 28, 4, 128, 128, "neox"),
    "deepseek_v3_mla_rope": (2048, None, 128, 1, 64, 64, "gptj"),
    "partial_rotary": (777, None, 8, 8, 128, 64, "neox"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_realistic_shapes(backend_name, case, dtype):
    tokens, batch, hq, hk, d, r, style = GPU_CASES[case]
    q, k = make_qk(tokens, hq, hk, d, dtype, batch=batch, fused=True, device="cuda")
    pos = torch.randint(0, 32768, q.shape[:-2], device="cuda")
    cache = qk.rope_cache(r, 32768, base=1e6, device="cuda")
    want = oracle(q, k, pos, cache, style == "neox")
    with qk.use_backend(backend_name):
        got = qk.apply_rope(q, k, pos, cache, style=style)
        assert_close(got[0], want[0], dtype)
        assert_close(got[1], want[1], dtype)
        q2, k2 = q.clone(), k.clone()
        qk.apply_rope(q2, k2, pos, cache, style=style, inplace=True)
    assert_close(q2, want[0], dtype)
    assert_close(k2, want[1], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gpu_unaligned_views_use_the_scalar_path(backend_name):
    qkv = torch.randn(33, 1 + 6 * 64, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, 1 : 1 + 4 * 64].view(33, 4, 64)  # 2-byte offset: no 16-byte vector access
    k = qkv[:, 1 + 4 * 64 : 1 + 5 * 64].view(33, 1, 64)
    pos = torch.randint(0, 100, (33,), device="cuda", dtype=torch.int32)
    cache = qk.rope_cache(64, 100, device="cuda", dtype=torch.bfloat16)
    for style in ("neox", "gptj"):
        want = oracle(q, k, pos, cache, style == "neox")
        with qk.use_backend(backend_name):
            got = qk.apply_rope(q, k, pos, cache, style=style)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS + ["reference"])
def test_gpu_out_of_range_positions(backend_name, monkeypatch):
    q, k = make_qk(4, 2, 1, 16, torch.float32, device="cuda")
    cache = qk.rope_cache(16, 10, device="cuda")
    pos = torch.tensor([0, 10, -3, 9], device="cuda")
    with qk.use_backend(backend_name):
        got_q, got_k = qk.apply_rope(q, k, pos, cache)  # no sync, no OOB read: NaN rows
        assert torch.isnan(got_q[[1, 2]]).all() and not torch.isnan(got_q[[0, 3]]).any()
        monkeypatch.setenv("QUICKLLM_SYNC_CHECKS", "1")
        qk.reload_settings()
        with pytest.raises(IndexError, match="positions must lie in"):
            qk.apply_rope(q, k, pos, cache)


@pytest.mark.gpu
def test_gpu_auto_prefers_compiled_kernels():
    q, k = make_qk(8, 2, 1, 16, torch.bfloat16, device="cuda")
    qk.apply_rope(q, k, torch.arange(8, device="cuda"), qk.rope_cache(16, 8, device="cuda"))
    expected = "cuda" if _library.CUDA_EXT_LOADED else ("triton" if backend.triton_status()[0] else "reference")
    assert qk.last_backends()["apply_rope"] == expected
