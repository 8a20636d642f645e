"""DeepSeek-V3 causal LM written with quickllm ops (apply_rope, mla_cache_write, mla_decode, mla_absorb,
moe_route, moe_experts; FP8Linear for block-FP8 checkpoints).

Reads like the architecture (DeepSeek-V3 Technical Report, 2024): token embedding, N pre-norm decoder
layers (RMSNorm, multi-head latent attention, RMSNorm, MLP), final RMSNorm, untied lm_head. The first
`first_k_dense_replace` layers have a dense SwiGLU MLP, the others a DeepSeekMoE block.

Multi-head latent attention (MLA). Per token: a query, either q_proj(x) or q_b(norm(q_a(x))) (a
low-rank query when q_lora_rank is set), split per head into q_nope [dn] and q_pe [dr]; one shared
latent kv_a_proj_with_mqa(x) = [kv_c | k_pe] with kv_c [r = kv_lora_rank] normed by kv_a_layernorm
and a single rotary key k_pe [dr]. Rotary embeddings act on q_pe and k_pe only (interleaved pairs
when rope_interleave, DeepSeek's layout). The cache holds only [kv_c | k_pe] per token (r + dr
values, 576 in DeepSeek-V3, against 2 * 128 * 192 for full keys and values). Two ways to attend:
  * expanded (prefill, a full forward): k_nope, v = kv_b_proj(kv_c) per head, keys [k_nope | k_pe],
    softmax(q k^T * scale) v with SDPA under the causal/padding mask. scale = qk_head_dim**-0.5 times
    YaRN's mscale**2 (rope_softmax_scale).
  * absorbed (decode): kv_b_proj = [W_UK; W_UV] per head (mla_absorb) folds into the query and the
    output: q_lat = q_nope @ W_UK [r], scores = q_lat . kv_c + q_pe . k_pe, out = (p @ kv_c) @ W_UV:
    every head attends over the same latent rows, read in place from the paged cache by mla_decode.
Both are the same function of the weights (test: equal within 1e-4 in float32).

DeepSeekMoE: router logits = x @ gate^T in float32, sigmoid scores; the choice adds the learnt
e_score_correction_bias and is limited to the topk_group best of n_group groups (a group scores the
sum of its two best); the k chosen weights are the unbiased scores, renormalised (norm_topk_prob) and
times routed_scaling_factor (moe_route, transformers' DeepseekV3TopkRouter); the routed experts run
through moe_experts; the shared experts (one SwiGLU MLP of n_shared_experts * moe_intermediate_size)
see every token and are added.

The paged latent cache (MLACache) stores only real tokens: a left-padded row's padding never enters
it, so rows hold different numbers of tokens (cache_seqlens), which mla_decode reads natively, and a
token's position is the count of real tokens before it (as the other models of quickllm_models and
transformers' generate number them).

Module names are transformers 5.x's, so the state dict is interchangeable with
`transformers.DeepseekV3ForCausalLM`'s; each MoE layer's experts are `mlp.experts.gate_up_proj`
(w13 [E, 2I, H]: gate rows then up rows) and `mlp.experts.down_proj` (w2 [E, H, I]).
`from_pretrained(dir)` reads config.json + safetensors (sharded or not) with either expert layout:
the stacked one (`save_pretrained(..., save_original_format=False)`), or per-expert
`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight` (DeepSeek's releases, transformers' default
`save_pretrained`), stacked on load. Layers past num_hidden_layers (the multi-token-prediction
module, `model.layers.61` in DeepSeek-V3) are not used and are skipped.

FP8 checkpoints (DeepSeek-V3 as released: linear weights float8_e4m3fn with a float32
`weight_scale_inv` per 128 x 128 block, `quantization_config.quant_method == "fp8"`): the linear
projections become qk.FP8Linear holding the tensors as stored, and each MoE layer's experts keep FP8
stacks with per-expert scales, `gate_up_proj_scale_inv` [E, ceil(2I/128), ceil(H/128)] and
`down_proj_scale_inv` [E, ceil(H/128), ceil(I/128)] for moe_experts' FP8 path. Where I is not a
multiple of 128 (tiny test models) the experts' I is padded with zero rows/columns so the gate and
up blocks stack (exact: silu(0) * 0 = 0). Embeddings, norms, router and lm_head stay in high
precision; the router stays float32 whatever dtype the model takes (transformers does the same).
`set_fp8_path("fp8" | "dequant" | "auto")` picks FP8 activations (quantised per token and 128-group)
or dequantised weights for every FP8 layer.

    model = DeepseekV3ForCausalLM.from_pretrained("DeepSeek-V3", dtype=torch.bfloat16, device="cuda")
    out = model(input_ids)                                                # out.logits [B, T, V]
    ids = model.generate(input_ids, attention_mask, max_new_tokens=32)   # greedy, paged latent cache
    model = DeepseekV3ForCausalLM(DeepseekV3Config.preset("tiny"), backend="reference")

A CPU debug walk-through (load a tiny checkpoint, prefill, one absorbed decode step beside the same
step expanded, the backend of each op) is in the README, under "MLA decode".

Not implemented: the multi-token-prediction module, training losses (auxiliary balance loss), and
gradients through FP8 layers (inference only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import quickllm_kernels as qk
from quickllm_kernels.fp8 import fp8_gemm_supported

from .qwen2 import (CausalLMOutput, DecoderForCausalLM, Qwen2MLP, Qwen2RMSNorm, attention_inputs, config_fields,
                    load_checkpoint_state, read_safetensors)

_YARN_V3 = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


@dataclasses.dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # of the dense MLP layers
    moe_intermediate_size: int = 2048  # of one routed expert (the shared MLP: n_shared_experts times it)
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: a full-rank q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = dataclasses.field(default_factory=lambda: dict(_YARN_V3))
    rope_interleave: bool = True  # rotary dims as interleaved pairs (GPT-J style), DeepSeek's layout
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # {"quant_method": "fp8", "weight_block_size": [128, 128], ...} for block-FP8 weights
    quantization_config: dict | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dim_head(self) -> int:  # the rotary dims: what the shell's cos/sin table spans
        return self.qk_rope_head_dim

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """(128, 128) for a block-FP8 model, None for plain weights."""
        q = self.quantization_config or {}
        if q.get("quant_method") != "fp8":
            return None
        return tuple(q.get("weight_block_size") or (128, 128))

    @classmethod
    def preset(cls, name: str) -> "DeepseekV3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, d: dict) -> "DeepseekV3Config":
        """From a Hugging Face config.json dict: transformers 5.x (`rope_parameters`) or DeepSeek's own
        4.x-style file (`rope_scaling`, `rope_theta`, scoring_func, topk_method)."""
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"DeepseekV3Config: hidden_act {act!r} (only 'silu' is supported)")
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise NotImplementedError(f"DeepseekV3Config: scoring_func {d['scoring_func']!r} (DeepSeek-V3 routes "
                                      "with 'sigmoid'; V2's softmax routing is a different model)")
        d = dict(d)
        if "num_local_experts" in d:  # transformers' alias
            d.setdefault("n_routed_experts", d.pop("num_local_experts"))
        kw = config_fields(cls, d)
        kw.pop("dim_head", None)
        return cls(**kw)


PRESETS = {
    "deepseek-v3": dict(),
    # DeepSeek-V2-Lite's shapes on the V3 architecture (V2 itself routes with softmax scores)
    "deepseek-v2-lite-shaped": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                                    q_lora_rank=None, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                                    first_k_dense_replace=1,
                                    rope_scaling=dict(_YARN_V3, mscale=0.707, mscale_all_dim=0.707)),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                 topk_group=1, first_k_dense_replace=1, max_position_embeddings=256,
                 rope_scaling=dict(_YARN_V3, factor=4.0, original_max_position_embeddings=64)),
}


# ---- the paged latent cache --------------------------------------------------------------------------


class MLACache:
    """The latent cache of every layer, paged: kv[layer] [num_blocks, page_size, kv_lora_rank +
    qk_rope_head_dim], rows [kv_c (normed) | k_pe (roped)]; block_table int32 [B, pages per row] (a
    row's pages are handed out round-robin over the rows, so they are not contiguous, as with a real
    page allocator); seqlens int32 [B], the real tokens each row holds (padding is never stored);
    length: the tokens fed per row so far, padding included (a host int: no syncs)."""

    def __init__(self, cfg: DeepseekV3Config, batch: int, max_len: int, dtype, device, page_size: int = 16):
        pages = max(1, math.ceil(max_len / page_size))
        self.page_size, self.max_len = page_size, max_len
        d = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv = torch.zeros(cfg.num_hidden_layers, batch * pages, page_size, d, dtype=dtype, device=device)
        self.block_table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(pages, batch).t()
        self.block_table = self.block_table.contiguous()
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = 0

    def gather(self, layer: int, n: int) -> torch.Tensor:
        """The first n cache rows of every sequence, [B, n, D] (rows past a sequence's length: stale)."""
        idx = torch.arange(n, device=self.kv.device)
        pages = self.block_table.long()[:, idx // self.page_size]  # [B, n]
        return self.kv[layer][pages, idx % self.page_size]

    def clone(self) -> "MLACache":
        new = object.__new__(MLACache)
        new.__dict__.update(self.__dict__)
        new.kv, new.seqlens = self.kv.clone(), self.seqlens.clone()
        return new


@dataclasses.dataclass
class _Step:
    """What every layer of one forward shares: rotary positions [B, T], how attention runs ("expanded":
    over this call's tokens; "gathered": expanded over the cache's rows; "absorbed": mla_decode), its
    boolean mask [B, 1, T, S] (expanded modes), and with a cache the slots the new tokens go to
    ([B*T], -1 for padding) and the rows' lengths after this call."""
    positions: torch.Tensor
    mode: str
    mask: torch.Tensor | None = None
    cache: MLACache | None = None
    slots: torch.Tensor | None = None
    seqlens: torch.Tensor | None = None
    keys: int = 0  # gathered: the cache rows read per sequence


# ---- FP8 helpers ------------------------------------------------------------------------------------


class _KeepDtypes(nn.Module):
    """A module whose own tensors keep their dtype under model.to(dtype) / .half() / ...: only device
    moves apply (the FP8 weights and their float32 scales; the float32 router). Integer views go
    through the conversion, which leaves integers alone, as qk.FP8Linear does."""
    _ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def _kept(self) -> list:
        return [t for t in list(self._parameters.values()) + list(self._buffers.values()) if t is not None]

    def _apply(self, fn, recurse=True):
        fixed = {id(t) for t in self._kept()}

        def keep(t):
            if id(t) not in fixed or not t.is_floating_point():
                return fn(t)
            raw = self._ints[t.element_size()]
            moved = fn(t.view(raw))
            return moved.view(t.dtype) if moved.dtype == raw else t.to(moved.device)

        return super()._apply(keep, recurse)


def _linear(cfg: DeepseekV3Config, n_in: int, n_out: int, bias: bool = False) -> nn.Module:
    block = cfg.fp8_block
    if block is None:
        return nn.Linear(n_in, n_out, bias=bias)
    return qk.FP8Linear(n_in, n_out, bias, block=block)


def _dense_weight(linear: nn.Module, dtype) -> torch.Tensor:
    return linear.dequantized_weight(dtype) if isinstance(linear, qk.FP8Linear) else linear.weight.to(dtype)


# ---- the layers ----------------------------------------------------------------------------------------


class DeepseekV3Attention(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer: int):
        super().__init__()
        self.layer, self.h = layer, cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dq, hs = cfg.qk_head_dim, cfg.hidden_size
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = _linear(cfg, hs, self.h * dq)
        else:
            self.q_a_proj = _linear(cfg, hs, cfg.q_lora_rank, cfg.attention_bias)
            self.q_a_layernorm = Qwen2RMSNorm(cfg.q_lora_rank, 1e-6)  # transformers' default eps, not the config's
            self.q_b_proj = _linear(cfg, cfg.q_lora_rank, self.h * dq)
        self.kv_a_proj_with_mqa = _linear(cfg, hs, self.r + self.dr, cfg.attention_bias)
        self.kv_a_layernorm = Qwen2RMSNorm(self.r, 1e-6)
        self.kv_b_proj = _linear(cfg, self.r, self.h * (self.dn + self.dv))
        self.o_proj = _linear(cfg, self.h * self.dv, hs, cfg.attention_bias)
        self.softmax_scale = qk.rope_softmax_scale(dq, cfg.rope_scaling)
        self.rope_style = "gptj" if cfg.rope_interleave else "neox"
        self._absorbed_key, self._absorbed_w = None, None

    def forward(self, x, rope, step: _Step):
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(b, t, self.h, self.dn + self.dr).split([self.dn, self.dr], -1)  # [B, T, H, dn], [.., dr]
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], -1)  # [B, T, r], [B, T, dr]
        kv_c = self.kv_a_layernorm(kv_c)
        q_pe, k_pe = qk.apply_rope(q_pe, k_pe[:, :, None], step.positions, rope, style=self.rope_style)
        k_pe = k_pe[:, :, 0]  # [B, T, dr]: one rotary key shared by the heads
        if step.cache is not None:
            qk.mla_cache_write(step.cache.kv[self.layer], step.slots, kv_c.reshape(b * t, self.r),
                               k_pe.reshape(b * t, self.dr))
        if step.mode == "absorbed":
            out = self._absorbed(q_nope, q_pe, step)
        else:
            if step.mode == "gathered":  # earlier tokens: from the cache
                kv_c, k_pe = step.cache.gather(self.layer, step.keys).split([self.r, self.dr], -1)
            out = self._expanded(q_nope, q_pe, kv_c, k_pe, step.mask)
        return self.o_proj(out.reshape(b, t, self.h * self.dv))

    def _expanded(self, q_nope, q_pe, kv_c, k_pe, mask):
        """Attention with per-head keys and values expanded from the latents: [B, T, H, dv]."""
        b, s, _ = kv_c.shape
        k_nope, v = self.kv_b_proj(kv_c).view(b, s, self.h, self.dn + self.dv).split([self.dn, self.dv], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, s, self.h, self.dr)], -1)  # [B, S, H, dq]
        q = torch.cat([q_nope, q_pe], -1)  # [B, T, H, dq]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=self.softmax_scale)  # [B, H, T, dv]
        return out.transpose(1, 2)

    def absorbed_weights(self, dtype):
        """(w_uk [H, dn, r], w_uv [H, r, dv]) of kv_b_proj (dequantised when FP8), kept until the
        weight changes."""
        w, s = self.kv_b_proj.weight, getattr(self.kv_b_proj, "weight_scale_inv", None)
        key = (w.data_ptr(), w._version, dtype, w.device) + ((s.data_ptr(), s._version) if s is not None else ())
        if self._absorbed_key != key:
            self._absorbed_w = qk.mla_absorb(_dense_weight(self.kv_b_proj, dtype).detach(), self.h, self.dn, self.dv)
            self._absorbed_key = key
        return self._absorbed_w

    def _absorbed(self, q_nope, q_pe, step: _Step):
        """Attention over the paged latent cache with W_UK in the query and W_UV after: [B, T, H, dv]."""
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        q = torch.cat([torch.einsum("bthn,hnr->bthr", q_nope, w_uk), q_pe], -1)  # [B, T, H, r + dr]
        cache = step.cache
        out, _ = qk.mla_decode(q, cache.kv[self.layer], cache.block_table, step.seqlens,
                               softmax_scale=self.softmax_scale, head_dim_v=self.r)  # [B, T, H, r]
        return torch.einsum("bthr,hrv->bthv", out, w_uv)


class DeepseekV3MLP(Qwen2MLP):
    """SwiGLU MLP: the dense layers (intermediate_size) and the shared experts."""

    def __init__(self, cfg: DeepseekV3Config, intermediate_size: int):
        nn.Module.__init__(self)
        self.gate_proj = _linear(cfg, cfg.hidden_size, intermediate_size)
        self.up_proj = _linear(cfg, cfg.hidden_size, intermediate_size)
        self.down_proj = _linear(cfg, intermediate_size, cfg.hidden_size)


class DeepseekV3TopkRouter(_KeepDtypes):
    """Sigmoid scores in float32; the weight and the correction bias stay float32."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x):  # x [T, H] -> (weights float32 [T, k], ids int32 [T, k])
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return qk.moe_route(logits, c.num_experts_per_tok, scoring="sigmoid",
                            correction_bias=self.e_score_correction_bias, n_group=c.n_group,
                            topk_group=c.topk_group if c.n_group is not None else None,
                            routed_scaling_factor=c.routed_scaling_factor, renormalize=c.norm_topk_prob)


class DeepseekV3Experts(_KeepDtypes):
    """E SwiGLU experts as two stacked tensors (transformers 5.x names); block-FP8 with per-expert
    scales when the config is FP8 (then I is padded to a multiple of 128, see the module docstring)."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.fp8 = cfg.fp8_block is not None
        self.path = "auto"
        if not self.fp8:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # w13 [E, 2I, H]: gate rows, then up rows
            self.down_proj = nn.Parameter(torch.empty(e, h, i))  # w2 [E, H, I]
            nn.init.normal_(self.gate_up_proj, std=0.02)
            nn.init.normal_(self.down_proj, std=0.02)
            return
        if cfg.fp8_block != (128, 128):
            raise NotImplementedError(f"DeepseekV3Experts: FP8 experts need 128 x 128 blocks, got {cfg.fp8_block}")
        i = fp8_padded(i)
        fp8 = dict(dtype=torch.float8_e4m3fn)
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h, **fp8), requires_grad=False)
        self.down_proj = nn.Parameter(torch.zeros(e, h, i, **fp8), requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(torch.ones(e, 2 * i // 128, math.ceil(h / 128)),
                                                   requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(torch.ones(e, math.ceil(h / 128), i // 128), requires_grad=False)

    def _kept(self) -> list:
        return super()._kept() if self.fp8 else []  # plain experts take the model's dtype

    def forward(self, x, weights, ids):  # x [T, H] -> [T, H]
        if not self.fp8:
            return qk.moe_experts(x, self.gate_up_proj, self.down_proj, weights, ids)
        path = self.path
        if path == "auto":
            path = "fp8" if fp8_gemm_supported(x.device) else "dequant"
        if path == "fp8":
            return qk.moe_experts(x, self.gate_up_proj, self.down_proj, weights, ids,
                                  w13_scale_inv=self.gate_up_proj_scale_inv, w2_scale_inv=self.down_proj_scale_inv)
        w13 = torch.stack([qk.weight_dequant(w, s, out_dtype=x.dtype)
                           for w, s in zip(self.gate_up_proj, self.gate_up_proj_scale_inv)])
        w2 = torch.stack([qk.weight_dequant(w, s, out_dtype=x.dtype)
                          for w, s in zip(self.down_proj, self.down_proj_scale_inv)])
        return qk.moe_experts(x, w13, w2, weights, ids)


def fp8_padded(i: int) -> int:
    return math.ceil(i / 128) * 128


def _zero_pad(w: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """w [R, C] with zero rows and columns appended (through a byte view: float8 has few CPU kernels;
    all-zero bits are +0.0)."""
    if not rows and not cols:
        return w
    return F.pad(w.view(torch.uint8), (0, cols, 0, rows)).view(w.dtype)


class DeepseekV3MoE(nn.Module):
    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.experts = DeepseekV3Experts(cfg)
        self.gate = DeepseekV3TopkRouter(cfg)
        self.shared_experts = DeepseekV3MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x):
        b, t, h = x.shape
        flat = x.reshape(b * t, h)  # [T, H]
        weights, ids = self.gate(flat)  # [T, k] float32, int32
        routed = self.experts(flat, weights, ids).view(b, t, h)
        return routed + self.shared_experts(x)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DeepseekV3Attention(cfg, layer)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        dense = layer < cfg.first_k_dense_replace
        self.mlp = DeepseekV3MLP(cfg, cfg.intermediate_size) if dense else DeepseekV3MoE(cfg)

    def forward(self, x, rope, step):
        h, x = self.post_attention_layernorm.add(self.self_attn(self.input_layernorm(x), rope, step), x)
        return x + self.mlp(h)


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(DecoderForCausalLM):
    """The shell's embedding, lm_head, cos/sin table (qk_rope_head_dim wide) and greedy generate, with
    MLA's paged latent cache."""
    model_class = DeepseekV3Model

    def new_cache(self, batch: int, max_len: int, page_size: int = 16) -> MLACache:
        w = self.lm_head.weight
        return MLACache(self.config, batch, max_len, w.dtype, w.device, page_size=page_size)

    def set_fp8_path(self, path: str) -> "DeepseekV3ForCausalLM":
        """"fp8" (activations quantised per token and 128-group, FP8 GEMMs), "dequant" (dequantised
        weights, unquantised activations) or "auto" (fp8 where the device has FP8 tensor cores) for
        every FP8 linear layer and expert stack."""
        if path not in ("auto", "fp8", "dequant"):
            raise ValueError(f"set_fp8_path: path must be 'auto', 'fp8' or 'dequant', got {path!r}")
        for m in self.modules():
            if isinstance(m, qk.FP8Linear) or (isinstance(m, DeepseekV3Experts) and m.fp8):
                m.path = path
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: MLACache | None = None,
                return_hidden: bool = False, absorb: bool | None = None) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = real token, 0 = padding); position_ids [B, T]
        (default: the count of real tokens before each one). With a cache the T new tokens follow what
        it holds. absorb: attention over the cache by absorbed MLA (mla_decode) or expanded; default:
        absorbed for one-token steps after a prefill, expanded otherwise. absorb=True with T > 1 takes
        every new token as real (no padding among them)."""
        ctx = qk.use_backend(self.backend) if self.backend else contextlib.nullcontext()
        with ctx:
            step = self._plan(input_ids, attention_mask, position_ids, cache, absorb)
            x = self.model.embed_tokens(input_ids)  # [B, T, H]
            for layer in self.model.layers:
                x = layer(x, self.rope, step)
            x = self.model.norm(x)
            if cache is not None:
                cache.seqlens, cache.length = step.seqlens, cache.length + input_ids.shape[1]
            if return_hidden:
                return CausalLMOutput(logits=None, hidden_states=x)
            return CausalLMOutput(logits=self.lm_head(x))

    def _plan(self, input_ids, attention_mask, position_ids, cache, absorb) -> _Step:
        b, t = input_ids.shape
        if cache is None:
            if absorb:
                raise ValueError("DeepseekV3ForCausalLM: absorbed attention reads the latent cache: pass cache=")
            positions, mask = attention_inputs(input_ids, attention_mask, position_ids, None)
            return _Step(positions, "expanded", mask)
        if cache.length + t > cache.max_len:
            raise ValueError(f"MLACache: {cache.length} + {t} tokens exceed max_len = {cache.max_len}")
        real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        # cache row of each new token: the real tokens before it in its sequence (padding: -1 or its
        # predecessor's, never written)
        idx = cache.seqlens[:, None].long() + real.long().cumsum(1) - 1  # [B, T]
        at = idx.clamp(min=0)
        pages = cache.block_table.long().gather(1, at // cache.page_size)
        slots = torch.where(real, pages * cache.page_size + at % cache.page_size, -1).reshape(b * t)
        seqlens = cache.seqlens + real.sum(1, dtype=torch.int32)
        positions = at if position_ids is None else position_ids
        step = _Step(positions, "expanded", cache=cache, slots=slots, seqlens=seqlens)
        if absorb is None:
            absorb = t == 1 and cache.length > 0
        if absorb:
            step.mode = "absorbed"
        elif cache.length == 0:  # a prefill: attend over this call's tokens, as without a cache
            step.positions, step.mask = attention_inputs(input_ids, attention_mask, position_ids, None)
        else:  # more tokens after a prefill: expanded attention over the gathered cache rows
            n = cache.length + t  # >= every row's length after this call
            k = torch.arange(n, device=input_ids.device)
            allowed = (k[None, None] <= idx[:, :, None]) & (k[None, None] < seqlens[:, None, None])
            step.mode, step.keys = "gathered", n
            step.mask = (allowed | (k == 0)[None, None])[:, None]  # [B, 1, T, n]; padding queries see row 0
        return step

    # ---- checkpoints ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None,
                        max_positions=None) -> "DeepseekV3ForCausalLM":
        """Load a Hugging Face DeepSeek-V3 directory: config.json and model.safetensors, or shards
        listed in model.safetensors.index.json; stacked or per-expert expert weights; bf16/fp32 or
        block-FP8 (`weight_scale_inv` beside each FP8 weight). Weights keep their stored dtype unless
        `dtype` is given (FP8 weights, their scales and the router never change dtype)."""
        d = json.loads((Path(path) / "config.json").read_text())
        state = read_safetensors(path)
        if d.get("quantization_config") is None and any(k.endswith(".weight_scale_inv") for k in state):
            d["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        cfg = DeepseekV3Config.from_hf(d)
        state = prepare_state(state, cfg)
        with torch.device("meta"):
            model = cls(cfg, backend=backend, max_positions=max_positions)
        return load_checkpoint_state(model, state, path, dtype=dtype, device=device)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\."
                     r"(weight|weight_scale_inv)")


def prepare_state(state: dict, cfg: DeepseekV3Config) -> dict:
    """A checkpoint's tensors under this module's names, in place: layers past num_hidden_layers (the
    MTP module) dropped; per-expert `experts.{e}.gate_proj/up_proj/down_proj.weight` stacked into
    `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; FP8 experts' scales stacked
    likewise into `*_scale_inv` (I padded to a multiple of 128 first when needed). A layer with
    experts missing is left as it is (the loader then names the keys that do not match)."""
    for key in [k for k in state if _LAYER.match(k) and int(_LAYER.match(k).group(1)) >= cfg.num_hidden_layers]:
        del state[key]
    layers: dict[str, dict] = {}
    for key in [k for k in state if _EXPERT.fullmatch(k)]:
        prefix, e, proj, kind = _EXPERT.fullmatch(key).groups()
        layers.setdefault(prefix, {})[int(e), proj, kind] = key
    e_all = cfg.n_routed_experts
    for prefix, keys in layers.items():
        fp8 = any(kind == "weight_scale_inv" for _, _, kind in keys)
        kinds = ("weight", "weight_scale_inv") if fp8 else ("weight",)
        want = {(e, p, k) for e in range(e_all) for p in ("gate_proj", "up_proj", "down_proj") for k in kinds}
        if set(keys) != want:
            continue
        t = {name: state.pop(key) for name, key in keys.items()}
        gate = [t[e, "gate_proj", "weight"] for e in range(e_all)]  # [I, H] each
        up = [t[e, "up_proj", "weight"] for e in range(e_all)]
        down = [t[e, "down_proj", "weight"] for e in range(e_all)]  # [H, I]
        if not fp8:
            state[prefix + "gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], 1)  # [E, 2I, H]
            state[prefix + "down_proj"] = torch.stack(down)  # [E, H, I]
            continue
        i = gate[0].shape[0]
        pad = fp8_padded(i) - i
        s_gate = [t[e, "gate_proj", "weight_scale_inv"] for e in range(e_all)]  # [ceil(I/128), ceil(H/128)]
        s_up = [t[e, "up_proj", "weight_scale_inv"] for e in range(e_all)]
        # zero rows (gate, up) and columns (down) up to a multiple of 128, so the gate and up blocks stack
        state[prefix + "gate_up_proj"] = torch.stack([torch.cat([_zero_pad(g, rows=pad), _zero_pad(u, rows=pad)])
                                                      for g, u in zip(gate, up)])  # [E, 2I', H]
        state[prefix + "gate_up_proj_scale_inv"] = torch.stack([torch.cat([g, u]) for g, u in zip(s_gate, s_up)])
        state[prefix + "down_proj"] = torch.stack([_zero_pad(w, cols=pad) for w in down])  # [E, H, I']
        state[prefix + "down_proj_scale_inv"] = torch.stack([t[e, "down_proj", "weight_scale_inv"]
                                                             for e in range(e_all)])
    return state
