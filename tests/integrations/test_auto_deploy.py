"""quickllm_kernels.integrations.auto_deploy against TensorRT-LLM AutoDeploy's canonical ops, without
TensorRT-LLM installed.

The canonical ops are pinned below as stub torch.library ops: their names and Python signatures are
TensorRT-LLM's (the file and commit each was read from are named above it; the schema strings they
infer are pinned in SCHEMAS) and they compute what TensorRT-LLM's reference implementations compute.
Tiny Llama-, Mixtral- and DeepSeek-style blocks call them, go through torch.export, and each
transform must then leave no canonical node of its ops, put quickllm ops in their place, give the
eager outputs of the original (float32 on the CPU, 1e-5), leave the variants the quickllm ops cannot
take alone (and say so), and find nothing to do the second time. The AutoDeploy registration is
checked against a stub of AutoDeploy's transform interface, and, where tensorrt_llm is importable,
against the real one.
"""
from __future__ import annotations

import collections
import importlib.util
import math
import operator
import sys
import types
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quickllm_kernels as qk
import quickllm_kernels.integrations.auto_deploy as qk_ad
from conftest import KERNEL_BACKENDS

TOL = dict(rtol=1e-5, atol=1e-5)
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None

# The schemas torch.library infers from TensorRT-LLM's signatures (torch 2.13 and 2.14 alike).
SCHEMAS = {
    "torch_rope_with_explicit_cos_sin":
        "(Tensor q, Tensor k, Tensor cos, Tensor sin, SymInt unsqueeze_dim=1) -> (Tensor, Tensor)",
    "torch_rope_with_complex_freqs":
        "(Tensor xq, Tensor xk, Tensor freqs_cis, SymInt unsqueeze_dim=2) -> (Tensor, Tensor)",
    "torch_rope_with_qk_interleaving":
        "(Tensor q, Tensor k, Tensor cos, Tensor sin, SymInt unsqueeze_dim=1) -> (Tensor, Tensor)",
    "torch_rmsnorm": "(Tensor input, Tensor weight, float eps) -> Tensor",
    "torch_moe": "(Tensor x, Tensor selected_experts, Tensor routing_weights, Tensor[] w1_weight, "
                 "Tensor[] w2_weight, Tensor[] w3_weight, bool is_gated_mlp=True, SymInt act_fn=4, "
                 "str mapping_config=\"\", SymInt max_num_tokens=0, bool apply_routing_on_input=False) -> Tensor",
    "torch_mla": "(Tensor q_nope, Tensor q_pe, Tensor compressed_kv, Tensor kpe, Tensor kv_b_proj_weight, "
                 "bool is_causal=True, float? scale=None, str layout=\"bsnd\", bool enable_sharding=False, "
                 "str layer_type=\"mla\") -> Tensor",
}
# tensorrt_llm._torch.utils.ActivationType (the order of TensorRT-LLM's C++ ActivationType:
# cpp/tensorrt_llm/kernels/cutlass_kernels/include/common.h @ 3585984b32cded5cc002d3087d3da4b0fd9fb8a5)
SILU, SWIGLU, RELU2 = 4, 5, 8


# ==== the pinned canonical ops ====================================================================


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _define_stubs():
    """Stub auto_deploy ops: TensorRT-LLM's names and signatures, its reference semantics."""
    lib = torch.library

    # -- tensorrt_llm/_torch/auto_deploy/custom_ops/rope/torch_rope.py @ 0b2cdb65782b3981cd562f6161cc3e19dd0dc21e
    @lib.custom_op("auto_deploy::torch_rope_with_explicit_cos_sin", mutates_args=())
    def explicit(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.type_as(q).unsqueeze(unsqueeze_dim), sin.type_as(q).unsqueeze(unsqueeze_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @lib.custom_op("auto_deploy::torch_rope_with_complex_freqs", mutates_args=())
    def complex_freqs(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor, unsqueeze_dim: int = 2
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = freqs_cis.unsqueeze(unsqueeze_dim)

        def rot(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs).flatten(3).type_as(x)
        return rot(xq), rot(xk)

    @lib.custom_op("auto_deploy::torch_rope_with_qk_interleaving", mutates_args=())
    def interleaving(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        q = q.unflatten(-1, (-1, 2)).transpose(-1, -2).reshape_as(q)
        k = k.unflatten(-1, (-1, 2)).transpose(-1, -2).reshape_as(k)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    for op in (explicit, complex_freqs, interleaving):
        op.register_fake(lambda q, k, *_: (torch.empty_like(q), torch.empty_like(k)))

    # -- tensorrt_llm/_torch/auto_deploy/custom_ops/normalization/rms_norm.py @ 187d50494900f8b26022e02d10111d336c986bbe
    @lib.custom_op("auto_deploy::torch_rmsnorm", mutates_args=())
    def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(input)
        x = input.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out.copy_(weight * x.to(out.dtype))
        return out

    rmsnorm.register_fake(lambda input, weight, eps: torch.empty_like(input))

    # -- tensorrt_llm/_torch/auto_deploy/custom_ops/fused_moe/torch_moe.py @ 0034d905731dcc8e637631fb7b02a186ca2d6b3c
    # (act_fn's default there is int(ActivationType.Silu))
    @lib.custom_op("auto_deploy::torch_moe", mutates_args=())
    def moe(x: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor,
            w1_weight: List[torch.Tensor], w2_weight: List[torch.Tensor], w3_weight: List[torch.Tensor],
            is_gated_mlp: bool = True, act_fn: int = SILU, mapping_config: str = "", max_num_tokens: int = 0,
            apply_routing_on_input: bool = False) -> torch.Tensor:
        if mapping_config:
            raise NotImplementedError("all-to-all expert parallelism is not part of the stub")
        act = F.silu if act_fn in (SILU, SWIGLU) else (lambda t: torch.square(F.relu(t)))
        shape, xf = x.shape, x.reshape(-1, x.shape[-1])
        out, e = torch.zeros_like(xf), len(w1_weight)
        valid = (selected_experts >= 0) & (selected_experts < e)
        for i in range(e):
            tok, choice = torch.where(valid & (selected_experts == i))
            if not tok.numel():
                continue
            inp, scale = xf[tok], routing_weights[tok, choice, None]
            if apply_routing_on_input:
                inp = inp * scale
            if is_gated_mlp:
                y = F.linear(act(F.linear(inp.to(w1_weight[i].dtype), w1_weight[i]))
                             * F.linear(inp.to(w3_weight[i].dtype), w3_weight[i]), w2_weight[i])
            else:
                y = F.linear(act(F.linear(inp, w1_weight[i])), w2_weight[i])
            out.index_add_(0, tok, (y if apply_routing_on_input else y * scale).to(out.dtype))
        return out.view(shape)

    moe.register_fake(lambda x, *_, **__: torch.empty_like(x))

    # -- tensorrt_llm/_torch/auto_deploy/custom_ops/mla/torch_mla.py @ 2974b047a91b5ec68e5889a06ab8427178f0e4f7
    @lib.custom_op("auto_deploy::torch_mla", mutates_args=())
    def mla(q_nope: torch.Tensor, q_pe: torch.Tensor, compressed_kv: torch.Tensor, kpe: torch.Tensor,
            kv_b_proj_weight: torch.Tensor, is_causal: bool = True, scale: Optional[float] = None,
            layout: str = "bsnd", enable_sharding: bool = False, layer_type: str = "mla") -> torch.Tensor:
        if layout == "bsnd":
            q_nope, q_pe, kpe = (t.transpose(1, 2) for t in (q_nope, q_pe, kpe))
        b, n, s_q, nope = q_nope.shape
        rope, s_k = q_pe.shape[-1], compressed_kv.shape[1]
        v_dim = kv_b_proj_weight.shape[0] // n - nope
        scale = 1.0 / math.sqrt(nope + rope) if scale is None else scale
        kv = torch.matmul(compressed_kv, kv_b_proj_weight.t()).view(b, s_k, n, nope + v_dim)
        k_nope, v = (t.transpose(1, 2) for t in torch.split(kv, [nope, v_dim], dim=-1))
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, kpe.expand(b, n, s_k, rope)], dim=-1)
        scores = torch.matmul(query, key.transpose(-2, -1)) * scale
        if is_causal and s_q == s_k:
            mask = torch.triu(torch.ones(s_q, s_k, dtype=torch.bool, device=q_nope.device), diagonal=1)
            scores = scores.masked_fill(mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype), v)
        return (out.transpose(1, 2) if layout == "bsnd" else out).contiguous()

    @mla.register_fake
    def _(q_nope, q_pe, compressed_kv, kpe, kv_b_proj_weight, is_causal=True, scale=None, layout="bsnd",
          enable_sharding=False, layer_type="mla"):
        n = q_nope.shape[2] if layout == "bsnd" else q_nope.shape[1]
        v_dim = kv_b_proj_weight.shape[0] // n - q_nope.shape[-1]
        return q_nope.new_empty(*q_nope.shape[:3], v_dim)


if HAS_TRTLLM:  # the real canonical ops (their own registration; stubs would collide with it)
    import tensorrt_llm._torch.auto_deploy.custom_ops  # noqa: F401
elif not hasattr(torch.ops.auto_deploy, "torch_moe"):
    _define_stubs()

AD = torch.ops.auto_deploy


# ==== helpers =====================================================================================


def _export(mod, args, dynamic=None):
    return torch.export.export(mod, args, dynamic_shapes=dynamic).module()


def _op_name(node):
    """namespace::name of the op a node calls (an overload, or a packet as AutoDeploy inserts them)."""
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverloadPacket):
        return node.target._qualified_op_name
    return node.target._schema.name if isinstance(node.target, torch._ops.OpOverload) else None


def _ops(gm) -> collections.Counter:
    return collections.Counter(name for name in map(_op_name, gm.graph.nodes) if name)


def _check(gm, transform, canonical, quickllm, **options):
    """Run the transform: the canonical ops are gone, the quickllm ops there, the graph valid, and a
    second run finds nothing."""
    report = transform(gm, **options)
    ops = _ops(gm)
    gm.graph.lint()
    for name in canonical:
        assert ops[f"auto_deploy::{name}"] == 0, (name, report)
    for name, count in quickllm.items():
        assert ops[f"quickllm::{name}"] == count, (name, ops)
    code = gm.code
    again = transform(gm, **options)
    assert again.count == 0 and gm.code == code
    return report


def _rope_inv_freq(d, base=10000.0):
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed)) * scale


# ==== schemas =====================================================================================


def test_canonical_schemas_are_pinned():
    for name, schema in SCHEMAS.items():
        assert str(getattr(AD, name).default._schema) == f"auto_deploy::{name}{schema}"


def test_module_imports_without_tensorrt_llm():
    if HAS_TRTLLM:
        pytest.skip("tensorrt_llm is installed")
    assert "tensorrt_llm" not in sys.modules
    assert qk_ad.register() is False


# ==== Llama-style block: RoPE (explicit cos/sin) + RMSNorm ========================================


class LlamaBlock(nn.Module):
    """Pre-norm attention: RMSNorm, q/k/v, RoPE from the block's own cos/sin (cat(freqs, freqs), times an
    attention factor), GQA causal attention, o_proj, residual, RMSNorm."""

    H, NH, NKV, D = 32, 4, 2, 8

    def __init__(self, layout="bsnd", seed=0):
        super().__init__()
        h, nh, nkv, d = self.H, self.NH, self.NKV, self.D
        self.layout = layout
        shapes = ((nh * d, h), (nkv * d, h), (nkv * d, h), (h, nh * d))
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(_randn(o, i, seed=seed + j, scale=i ** -0.5))
                                             for j, (o, i) in enumerate(shapes))
        self.ln1 = nn.Parameter(1 + 0.1 * _randn(h, seed=seed + 5))
        self.ln2 = nn.Parameter(1 + 0.1 * _randn(h, seed=seed + 6))
        self.register_buffer("inv_freq", _rope_inv_freq(d))

    def rotary(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * 1.25).to(dtype), (emb.sin() * 1.25).to(dtype)

    def forward(self, x, position_ids, cos_sin=None):
        b, s, _ = x.shape
        h = AD.torch_rmsnorm(x, self.ln1, 1e-6)
        q = (h @ self.wq.T).view(b, s, self.NH, self.D)
        k = (h @ self.wk.T).view(b, s, self.NKV, self.D)
        v = (h @ self.wv.T).view(b, s, self.NKV, self.D)
        cos, sin = cos_sin or self.rotary(position_ids, x.dtype)
        if self.layout == "bsnd":
            q, k = AD.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = AD.torch_rope_with_explicit_cos_sin(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1)
        v = v.transpose(1, 2)
        rep = self.NH // self.NKV
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           is_causal=True)
        out = x + o.transpose(1, 2).reshape(b, s, -1) @ self.wo.T
        return AD.torch_rmsnorm(out, self.ln2, 1e-5)


def _llama_inputs(b, s, seed=1, offset=3):
    return _randn(b, s, LlamaBlock.H, seed=seed), torch.arange(offset, offset + s).expand(b, s).contiguous()


@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
def test_llama_block_rope_and_rms_norm(layout):
    mod = LlamaBlock(layout)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    gm = _export(mod, _llama_inputs(2, 5), dynamic=({0: batch, 1: seq}, {0: batch, 1: seq}))
    rope = _check(gm, qk_ad.retarget_rope, ["torch_rope_with_explicit_cos_sin"], {"apply_rope": 1})
    norm = _check(gm, qk_ad.retarget_rms_norm, ["torch_rmsnorm"], {"rms_norm": 2})
    assert (rope.replaced, rope.left, norm.replaced, norm.left) == (
        {"torch_rope_with_explicit_cos_sin": 1}, [], {"torch_rmsnorm": 2}, [])
    for b, s in ((2, 5), (3, 7), (1, 2)):  # the exported sizes, and others: the glue follows symbolic sizes
        x, pos = _llama_inputs(b, s, seed=b + s)
        torch.testing.assert_close(gm(x, pos), mod(x, pos), **TOL)


@pytest.mark.parametrize("block", ["llama", "moe", "mla"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rewritten_graphs_run_on_the_kernels(backend, block):
    """The rewritten blocks on the Triton (the interpreter on the CPU) and CUDA kernels."""
    device = "cuda" if backend == "cuda" else "cpu"
    mod, args, ops = {"llama": (LlamaBlock, _llama_inputs(2, 5), ("apply_rope", "rms_norm")),
                      "moe": (MoeBlock, (_randn(2, 5, MoeBlock.H, seed=1),), ("moe_route", "grouped_mm")),
                      "mla": (MlaBlock, _mla_inputs(2, 5), ("apply_rope", "mla_decode"))}[block]
    mod, args = mod().to(device), tuple(t.to(device) for t in args)
    gm = _export(mod, args)
    qk_ad.retarget_all(gm)
    with qk.use_backend(backend):
        got = gm(*args)
    assert all(qk.last_backends()[op] == backend for op in ops), qk.last_backends()
    torch.testing.assert_close(got, mod(*args), **TOL)


def test_layers_share_one_table():
    class TwoLayers(nn.Module):
        """cos/sin computed once for the model and used by both layers, as transformers does."""

        def __init__(self):
            super().__init__()
            self.a, self.b = LlamaBlock(seed=0), LlamaBlock(seed=10)

        def forward(self, x, pos):
            cos_sin = self.a.rotary(pos, x.dtype)
            return self.b(self.a(x, pos, cos_sin), pos, cos_sin)

    mod = TwoLayers()
    gm = _export(mod, _llama_inputs(2, 5))
    report = qk_ad.retarget_rope(gm)
    assert report.replaced == {"torch_rope_with_explicit_cos_sin": 2}
    ops = _ops(gm)  # one table and one set of positions for both layers
    assert ops["quickllm::apply_rope"] == 2 and ops["aten::cumsum"] == 1 and ops["aten::cat"] == 2  # freqs, table
    torch.testing.assert_close(gm(*_llama_inputs(2, 5)), mod(*_llama_inputs(2, 5)), **TOL)


# ==== RoPE variants ===============================================================================


class RopeOnly(nn.Module):
    """One canonical RoPE op on given q, k (and cos/sin or freqs): the variants' contracts."""

    def __init__(self, op, unsqueeze_dim, table=None):
        super().__init__()
        self.op, self.unsqueeze_dim = op, unsqueeze_dim
        if table is not None:
            self.register_buffer("table", table)

    def forward(self, q, k, *rest):
        if self.op == "complex":
            q, k = AD.torch_rope_with_complex_freqs(q, k, self.table[rest[0]], self.unsqueeze_dim)
        elif self.op == "interleaving_cached":
            cos, sin = self.table[0][rest[0]], self.table[1][rest[0]]
            q, k = AD.torch_rope_with_qk_interleaving(q, k, cos, sin, self.unsqueeze_dim)
        elif self.op == "interleaving":
            q, k = AD.torch_rope_with_qk_interleaving(q, k, *rest, self.unsqueeze_dim)
        else:
            q, k = AD.torch_rope_with_explicit_cos_sin(q, k, *rest, self.unsqueeze_dim)
        return q * 1.0, k * 1.0


def _cos_sin(pos, d, dtype=torch.float32):
    freqs = pos[..., None].float() * _rope_inv_freq(d)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_rope_complex_freqs():
    d, maxpos = 8, 32
    freqs = torch.outer(torch.arange(maxpos).float(), _rope_inv_freq(d))
    mod = RopeOnly("complex", 2, torch.polar(torch.ones_like(freqs), freqs))  # complex64 [P, D/2]
    args = (_randn(2, 5, 4, d, seed=1), _randn(2, 5, 2, d, seed=2), torch.randint(0, maxpos, (2, 5), generator=gen(3)))
    gm = _export(mod, args)
    _check(gm, qk_ad.retarget_rope, ["torch_rope_with_complex_freqs"], {"apply_rope": 1})
    torch.testing.assert_close(gm(*args), mod(*args), **TOL)


def test_rope_qk_interleaving_tokens_layout():
    """DeepSeek's form: q [T, N, D], k [T, 1, D], cos/sin rows of cached tables [P, D] at each token."""
    d, maxpos = 8, 32
    cos, sin = _cos_sin(torch.arange(maxpos), d)
    mod = RopeOnly("interleaving_cached", 1, torch.stack((cos, sin)))
    args = (_randn(7, 3, d, seed=1), _randn(7, 1, d, seed=2), torch.randint(0, maxpos, (7,), generator=gen(3)))
    gm = _export(mod, args)
    _check(gm, qk_ad.retarget_rope, ["torch_rope_with_qk_interleaving"], {"apply_rope": 1})
    torch.testing.assert_close(gm(*args), mod(*args), **TOL)


def test_rope_cos_broadcast_over_the_batch():
    """cos/sin [1, S, D] for q [B, S, N, D]: positions expand, the table keeps S rows."""
    d = 8
    mod = RopeOnly("explicit", 2)

    class WithTable(nn.Module):
        def forward(self, q, k, pos):
            cos, sin = _cos_sin(pos, d)
            return mod(q, k, cos, sin)

    outer = WithTable()
    args = (_randn(3, 5, 4, d, seed=1), _randn(3, 5, 2, d, seed=2), torch.arange(5)[None])
    gm = _export(outer, args)
    _check(gm, qk_ad.retarget_rope, ["torch_rope_with_explicit_cos_sin"], {"apply_rope": 1})
    assert _ops(gm)["aten::expand"] == 1
    torch.testing.assert_close(gm(*args), outer(*args), **TOL)


def test_rope_left_alone_where_it_cannot_be_shown_exact():
    d = 8
    q, k = _randn(2, 5, 4, d, seed=1), _randn(2, 5, 2, d, seed=2)
    cos, sin = _cos_sin(torch.arange(5).expand(2, 5), d)
    # cos/sin handed in as graph inputs: their repeated halves cannot be read from the graph
    mod = RopeOnly("explicit", 2)
    gm = _export(mod, (q, k, cos, sin))
    code = gm.code
    report = qk_ad.retarget_rope(gm)
    assert report.count == 0 and gm.code == code
    [(_, op, why)] = report.left
    assert op == "torch_rope_with_explicit_cos_sin" and "second half repeats the first" in why
    # taken on trust, it is exact for cos/sin that do repeat
    report = qk_ad.retarget_rope(gm, assume_repeated_halves=True)
    assert report.count == 1 and _ops(gm)["quickllm::apply_rope"] == 1
    torch.testing.assert_close(gm(q, k, cos, sin), mod(q, k, cos, sin), **TOL)

    # qk interleaving does not cast cos/sin: float64 cos/sin would promote its outputs
    mod = RopeOnly("interleaving", 2)
    gm = _export(mod, (q, k, cos.double(), sin.double()))
    report = qk_ad.retarget_rope(gm, assume_repeated_halves=True)
    assert report.count == 0 and "must have q's dtype" in report.left[0][2]
    # q and k of different dtypes
    gm = _export(RopeOnly("explicit", 2), (q, k.double(), cos, sin))
    report = qk_ad.retarget_rope(gm, assume_repeated_halves=True)
    assert report.count == 0 and "share a float dtype" in report.left[0][2]


# ==== RMSNorm =====================================================================================


def test_nodes_as_autodeploy_inserts_them():
    """AutoDeploy's own passes insert canonical ops as packets (torch.ops.auto_deploy.torch_rmsnorm, no
    overload) and may pass arguments by keyword."""
    mod = LlamaBlock()
    gm = _export(mod, _llama_inputs(2, 5))
    for node in gm.graph.nodes:
        if _op_name(node) == "auto_deploy::torch_rmsnorm":
            node.target, node.args, node.kwargs = AD.torch_rmsnorm, node.args[:2], {"eps": node.args[2]}
    gm.recompile()
    _check(gm, qk_ad.retarget_rms_norm, ["torch_rmsnorm"], {"rms_norm": 2})
    torch.testing.assert_close(gm(*_llama_inputs(2, 5)), mod(*_llama_inputs(2, 5)), **TOL)


def test_rms_norm_left_alone_with_a_weight_of_another_dtype():
    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(16))  # float32 weight, bfloat16 input: promoted products

        def forward(self, x):
            return AD.torch_rmsnorm(x, self.w, 1e-6)

    x = _randn(3, 16).bfloat16()
    gm = _export(Norm(), (x,))
    report = qk_ad.retarget_rms_norm(gm)
    assert report.count == 0 and report.left[0][1] == "torch_rmsnorm" and "dtype" in report.left[0][2]
    assert _ops(gm)["auto_deploy::torch_rmsnorm"] == 1


# ==== Mixtral-style MoE ===========================================================================


class MoeBlock(nn.Module):
    """transformers' Mixtral routing (softmax in float32, top-k, renormalised, cast) into torch_moe."""

    H, I, E, K = 16, 24, 4, 2

    def __init__(self, renormalize=True, **moe_options):
        super().__init__()
        h, i, e = self.H, self.I, self.E
        self.renormalize, self.moe_options = renormalize, moe_options
        self.gate = nn.Parameter(_randn(e, h, seed=20))
        self.w1 = nn.ParameterList([nn.Parameter(_randn(i, h, seed=21 + j, scale=h ** -0.5)) for j in range(e)])
        self.w2 = nn.ParameterList([nn.Parameter(_randn(h, i, seed=31 + j, scale=i ** -0.5)) for j in range(e)])
        self.w3 = nn.ParameterList([nn.Parameter(_randn(i, h, seed=41 + j, scale=h ** -0.5)) for j in range(e)])

    def forward(self, x):
        logits = x.view(-1, self.H) @ self.gate.T
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.K, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        return AD.torch_moe(x, selected, weights, list(self.w1), list(self.w2), list(self.w3), **self.moe_options)


@pytest.mark.parametrize("renormalize", [True, False])
def test_mixtral_moe(renormalize):
    mod = MoeBlock(renormalize)
    x = _randn(2, 5, MoeBlock.H, seed=1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    gm = _export(mod, (x,), dynamic=({0: batch, 1: seq},))
    report = _check(gm, qk_ad.retarget_moe, ["torch_moe"], {"moe_route": 1, "moe_experts": 1})
    assert report.replaced == {"torch_moe": 1, "moe_route": 1} and report.left == [] and report.notes == []
    assert _ops(gm)["aten::topk"] == 0  # the old routing is gone
    # the experts were stacked once into new parameters, and the per-expert ones dropped
    params = dict(gm.named_parameters())
    assert not any(name.startswith(("w1", "w2", "w3")) for name in params)
    assert params["_quickllm_moe_w13"].shape == (4, 48, 16) and params["_quickllm_moe_w2"].shape == (4, 16, 24)
    for b, s in ((2, 5), (3, 4)):
        x = _randn(b, s, MoeBlock.H, seed=b * s)
        torch.testing.assert_close(gm(x), mod(x), **TOL)


def test_moe_routing_kept_where_it_is_not_softmax_top_k():
    class SigmoidRouted(MoeBlock):
        def forward(self, x):
            weights, selected = torch.topk(torch.sigmoid(x @ self.gate.T), self.K, dim=-1)
            return AD.torch_moe(x, selected, weights, list(self.w1), list(self.w2), list(self.w3))

    mod = SigmoidRouted()
    x = _randn(6, MoeBlock.H, seed=1)
    gm = _export(mod, (x,))
    report = _check(gm, qk_ad.retarget_moe, ["torch_moe"], {"moe_route": 0, "moe_experts": 1})
    assert "routing kept" in report.notes[0] and "softmax" in report.notes[0]
    torch.testing.assert_close(gm(x), mod(x), **TOL)


@pytest.mark.parametrize("options,why", [
    (dict(is_gated_mlp=False, act_fn=RELU2), "is_gated_mlp=False"),
    (dict(act_fn=RELU2), "not SiLU-gated"),
    (dict(apply_routing_on_input=True), "apply_routing_on_input"),
])
def test_moe_variants_left_alone(options, why):
    mod = MoeBlock(**options)
    x = _randn(2, 3, MoeBlock.H, seed=1)
    gm = _export(mod, (x,))
    code = gm.code
    report = qk_ad.retarget_moe(gm)
    assert report.count == 0 and gm.code == code
    assert len(report.left) == 1 and report.left[0][1] == "torch_moe" and why in report.left[0][2]
    torch.testing.assert_close(gm(x), mod(x), **TOL)


# ==== DeepSeek-style MLA ==========================================================================


class MlaBlock(nn.Module):
    """DeepSeek-V3 attention at tiny sizes: q and the latent from projections, interleaved RoPE on
    q_pe and k_pe from cached cos/sin tables, torch_mla, o_proj."""

    H, N, NOPE, ROPE, V, R, P = 32, 4, 8, 4, 6, 16, 64

    def __init__(self, layout="bsnd", scale=None, seed=0):
        super().__init__()
        h, n, nope, rope, v, r = self.H, self.N, self.NOPE, self.ROPE, self.V, self.R
        self.layout, self.scale = layout, scale
        self.q_proj = nn.Parameter(_randn(n * (nope + rope), h, seed=seed, scale=h ** -0.5))
        self.kv_a = nn.Parameter(_randn(r + rope, h, seed=seed + 1, scale=h ** -0.5))
        self.kv_b = nn.Parameter(_randn(n * (nope + v), r, seed=seed + 2, scale=r ** -0.5))
        self.o_proj = nn.Parameter(_randn(h, n * v, seed=seed + 3, scale=(n * v) ** -0.5))
        cos, sin = _cos_sin(torch.arange(self.P), rope)
        self.register_buffer("cos_cached", cos)
        self.register_buffer("sin_cached", sin)

    def forward(self, x, pos):
        b, s, _ = x.shape
        q = (x @ self.q_proj.T).view(b, s, self.N, self.NOPE + self.ROPE)
        q_nope, q_pe = torch.split(q, [self.NOPE, self.ROPE], dim=-1)
        ckv, k_pe = torch.split(x @ self.kv_a.T, [self.R, self.ROPE], dim=-1)
        k_pe = k_pe.view(b, s, 1, self.ROPE)
        q_pe, k_pe = AD.torch_rope_with_qk_interleaving(q_pe, k_pe, self.cos_cached[pos], self.sin_cached[pos], 2)
        if self.layout == "bnsd":
            q_nope, q_pe, k_pe = (t.transpose(1, 2) for t in (q_nope, q_pe, k_pe))
        out = AD.torch_mla(q_nope, q_pe, ckv, k_pe, self.kv_b, True, self.scale, self.layout)
        if self.layout == "bnsd":
            out = out.transpose(1, 2)
        return out.reshape(b, s, -1) @ self.o_proj.T


def _mla_inputs(b, s, seed=1):
    return _randn(b, s, MlaBlock.H, seed=seed), torch.randint(0, MlaBlock.P, (b, s), generator=gen(seed + 1))


@pytest.mark.parametrize("layout,scale", [("bsnd", None), ("bnsd", 0.3)])
def test_deepseek_mla_block(layout, scale):
    mod = MlaBlock(layout, scale)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    gm = _export(mod, _mla_inputs(2, 5), dynamic=({0: batch, 1: seq}, {0: batch, 1: seq}))
    reports = qk_ad.retarget_all(gm)
    assert {k: r.replaced for k, r in reports.items()} == {
        "rope": {"torch_rope_with_qk_interleaving": 1}, "rms_norm": {}, "moe": {}, "mla": {"torch_mla": 1}}
    ops = _ops(gm)
    assert ops["quickllm::apply_rope"] == 1 and ops["quickllm::mla_decode"] == 1
    assert not any(name.startswith("auto_deploy::") for name in ops)
    params = dict(gm.named_parameters())  # kv_b_proj absorbed once into W_UK, W_UV
    assert "kv_b" not in params and params["_quickllm_mla_w_uk"].shape == (4, 8, 16)
    assert all(r.count == 0 for r in qk_ad.retarget_all(gm).values())
    for b, s in ((2, 5), (1, 6), (3, 2)):
        x, pos = _mla_inputs(b, s, seed=b + s)
        torch.testing.assert_close(gm(x, pos), mod(x, pos), **TOL)


def test_mla_with_a_shorter_query_and_a_weight_input():
    """q of 3 tokens over 5 latents (the op then masks nothing), kv_b_proj_weight a graph input (its
    W_UK and W_UV are views of it in the graph)."""

    class Cross(nn.Module):
        def forward(self, q_nope, q_pe, ckv, kpe, w):
            return AD.torch_mla(q_nope, q_pe, ckv, kpe, w, True, None, "bsnd")

    n, nope, rope, v, r = 2, 8, 4, 6, 16
    args = (_randn(2, 3, n, nope, seed=1), _randn(2, 3, n, rope, seed=2), _randn(2, 5, r, seed=3),
            _randn(2, 5, 1, rope, seed=4), _randn(n * (nope + v), r, seed=5, scale=0.25))
    mod = Cross()
    gm = _export(mod, args)
    _check(gm, qk_ad.retarget_mla, ["torch_mla"], {"mla_decode": 1})
    torch.testing.assert_close(gm(*args), mod(*args), **TOL)


def test_mla_left_alone_with_a_negative_scale():
    mod = MlaBlock(scale=-0.5)
    gm = _export(mod, _mla_inputs(2, 4))
    report = qk_ad.retarget_mla(gm)
    assert report.count == 0 and "scale" in report.left[0][2] and _ops(gm)["auto_deploy::torch_mla"] == 1


# ==== AutoDeploy's transform registry =============================================================


def _stub_interface(monkeypatch):
    """tensorrt_llm/_torch/auto_deploy/transform/interface.py, the parts register() and AutoDeploy's
    optimizer use, as in its recent versions (with run_per_gm and _apply_to_full_model); the
    _apply(gm, cm, factory, shared_config) -> (gm, TransformInfo) contract, TransformConfig's mandatory
    stage and TransformRegistry.register/get/has are the same in 01f08360acada08c22e9a57c75f6b559d4f764f2."""
    pydantic = pytest.importorskip("pydantic")
    import enum

    class Stages(enum.Enum):
        PATTERN_MATCHER = "pattern_matcher"
        POST_LOAD_FUSION = "post_load_fusion"
        CACHE_INIT = "cache_init"

    class TransformConfig(pydantic.BaseModel):
        model_config = {"extra": "allow"}
        stage: Stages
        run_per_gm: bool = True
        enabled: bool = True
        skip_on_error: bool = False
        run_graph_cleanup: bool = True
        run_shape_prop: bool = False
        requires_clean_graph: bool = True
        requires_shape_prop: bool = False

    class TransformInfo(pydantic.BaseModel):
        model_config = {"frozen": True}
        skipped: bool = True
        num_matches: int = 0
        is_clean: bool = False
        has_valid_shapes: bool = False

    class BaseTransform:
        def __init__(self, config):
            if not isinstance(config, self.get_config_class()):
                config = self.get_config_class()(**config.model_dump())
            self.config = config

        @classmethod
        def get_config_class(cls):
            return TransformConfig

        @classmethod
        def from_kwargs(cls, **kwargs):
            return cls(config=cls.get_config_class()(**kwargs))

        def _apply(self, gm, cm, factory, shared_config):
            raise NotImplementedError

    class TransformRegistry:
        _registry = {}

        @classmethod
        def register(cls, name):
            def inner(fn):
                cls._registry[name] = fn
                fn._transform_key = name
                return fn
            return inner

        @classmethod
        def get(cls, name):
            return cls._registry[name]

        @classmethod
        def has(cls, name):
            return name in cls._registry

    names = ["tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.auto_deploy",
             "tensorrt_llm._torch.auto_deploy.transform", "tensorrt_llm._torch.auto_deploy.transform.interface"]
    for name in names:
        mod = types.ModuleType(name)
        mod.__path__ = []
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules[names[-1]].__dict__.update(BaseTransform=BaseTransform, TransformConfig=TransformConfig,
                                           TransformInfo=TransformInfo, TransformRegistry=TransformRegistry)
    return TransformRegistry


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed: the test below uses the real interface")
def test_register_with_the_stub_interface(monkeypatch):
    registry = _stub_interface(monkeypatch)
    assert qk_ad.register() is True and qk_ad.register() is True  # twice: no-op
    assert set(registry._registry) == set(qk_ad.TRANSFORMS)

    gm = _export(MlaBlock(), _mla_inputs(2, 4))
    rope = registry.get("quickllm_rope").from_kwargs(stage="post_load_fusion")
    assert rope.config.assume_repeated_halves is False
    out, info = rope._apply(gm, None, None, None)
    assert out is gm and (info.skipped, info.num_matches, info.is_clean) == (False, 1, False)
    mla = registry.get("quickllm_mla").from_kwargs(stage="post_load_fusion")
    assert mla._apply(gm, None, None, None)[1].skipped and _ops(gm)["auto_deploy::torch_mla"] == 1
    mla = registry.get("quickllm_mla").from_kwargs(stage="post_load_fusion", allow_uncached=True)
    assert mla._apply(gm, None, None, None)[1].num_matches == 1 and _ops(gm)["quickllm::mla_decode"] == 1
    norm = registry.get("quickllm_rms_norm").from_kwargs(stage="post_load_fusion")
    info = norm._apply(gm, None, None, None)[1]
    assert (info.skipped, info.num_matches, info.is_clean, info.has_valid_shapes) == (True, 0, True, True)


def test_register_with_tensorrt_llm():
    pytest.importorskip("tensorrt_llm")
    from tensorrt_llm._torch.auto_deploy.transform.interface import TransformRegistry

    for name, schema in SCHEMAS.items():
        assert str(getattr(AD, name).default._schema).split("(", 1)[1] == schema.split("(", 1)[1], name
    assert qk_ad.register() is True
    for name in qk_ad.TRANSFORMS:
        assert TransformRegistry.has(name)
        transform = TransformRegistry.get(name).from_kwargs(stage="post_load_fusion")
        gm = _export(LlamaBlock(), _llama_inputs(2, 5))
        _, info = transform._apply(gm, None, None, None)
        assert info.num_matches == {"quickllm_rope": 1, "quickllm_rms_norm": 2}.get(name, 0)
