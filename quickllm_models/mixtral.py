"""Mixtral (sparse mixture of experts) causal LM written with quickllm ops (apply_rope, moe_route,
moe_experts).

Reads like the architecture (Mixtral of Experts, Jiang et al. 2024): token embedding, N pre-norm
decoder layers (RMSNorm, grouped-query attention without biases with rotary embeddings, RMSNorm,
sparse MoE block), final RMSNorm, untied lm_head. The MoE block routes each token to the top 2 of 8
SwiGLU experts: router logits = x @ gate^T, softmax over all experts (float32), the top k kept and
renormalised to sum to one; out = sum over the k choices of weight * expert(x).

Attention, RMSNorm, the KV cache and the checkpoint reader are Qwen2's (quickllm_models/qwen2.py).
Module names are transformers 5.x's, so the state dict is interchangeable with
`transformers.MixtralForCausalLM`'s; each layer's experts are two stacked tensors,
`mlp.experts.gate_up_proj` (w13 [E, 2I, H]: gate rows then up rows) and `mlp.experts.down_proj`
(w2 [E, H, I]). `from_pretrained(dir)` reads config.json + safetensors (sharded or not) in either
layout: transformers 5.x's stacked tensors (`save_pretrained(..., save_original_format=False)`), or
the original per-expert `block_sparse_moe.experts.{e}.w1/w2/w3.weight` (w1 = gate, w3 = up,
w2 = down) with `block_sparse_moe.gate.weight`, which Mistral's releases and transformers'
default `save_pretrained` write; these are stacked on load.

    model = MixtralForCausalLM.from_pretrained("Mixtral-8x7B-v0.1", dtype=torch.bfloat16, device="cuda")
    out = model(input_ids)                                                # out.logits [B, T, V]
    ids = model.generate(input_ids, attention_mask, max_new_tokens=32)   # greedy, with the KV cache
    model = MixtralForCausalLM(MixtralConfig.preset("tiny"), backend="reference")

Not implemented: the load-balancing auxiliary loss (transformers' output_router_logits) and router
jitter noise (a training-time option, 0.0 in the released configs; ignored).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

import quickllm_kernels as qk

from .qwen2 import (DecoderForCausalLM, Qwen2Attention, Qwen2RMSNorm, config_fields, load_checkpoint_state,
                    read_safetensors)


@dataclasses.dataclass
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # of one expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    # None: full causal attention (the released Mixtral configs). An int W: a query sees the keys of
    # the last W slots, itself included, as transformers masks (the cache still keeps every key).
    sliding_window: int | None = None
    tie_word_embeddings: bool = False

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "MixtralConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, d: dict) -> "MixtralConfig":
        """From a Hugging Face config.json dict (transformers 4.x `rope_scaling`/`rope_theta` or 5.x
        `rope_parameters`)."""
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"MixtralConfig: experts with hidden_act {act!r} (only 'silu' is supported)")
        d = dict(d)
        if "num_experts" in d:  # transformers' alias
            d.setdefault("num_local_experts", d.pop("num_experts"))
        return cls(**config_fields(cls, d, default_theta=1000000.0))


PRESETS = {
    "mixtral-8x7b": dict(),
    "mixtral-8x22b": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
                          max_position_embeddings=65536),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, max_position_embeddings=256),
}


class MixtralExperts(nn.Module):
    """E SwiGLU experts as two stacked tensors (transformers 5.x names)."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # w13 [E, 2I, H]: gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # w2 [E, H, I]
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)  # the router
        self.experts = MixtralExperts(cfg)

    def forward(self, x):
        b, t, h = x.shape
        x = x.reshape(b * t, h)  # [T, H]
        logits = self.gate(x)  # [T, E]
        # softmax over all E in float32, top k, renormalised (transformers' MixtralTopKRouter)
        weights, ids = qk.moe_route(logits, self.top_k, scoring="softmax", renormalize=True)  # [T, k] f32, i32
        out = qk.moe_experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)  # [T, H]
        return out.view(b, t, h)


class MixtralDecoderLayer(nn.Module):
    def __init__(self, cfg: MixtralConfig, layer: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg, layer, bias=False)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MixtralSparseMoeBlock(cfg)

    def forward(self, x, positions, rope, attn_mask, cache):
        h, x = self.post_attention_layernorm.add(self.self_attn(self.input_layernorm(x), positions, rope, attn_mask, cache), x)
        return x + self.mlp(h)


class MixtralModel(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MixtralDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MixtralForCausalLM(DecoderForCausalLM):
    model_class = MixtralModel

    # ---- checkpoints ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None,
                        max_positions=None) -> "MixtralForCausalLM":
        """Load a Hugging Face Mixtral directory: config.json and model.safetensors, or shards listed in
        model.safetensors.index.json, with stacked (transformers 5.x) or per-expert (original) expert
        weights. Weights keep their stored dtype unless `dtype` is given."""
        cfg = MixtralConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))
        state = stack_legacy_experts(read_safetensors(path), cfg.num_local_experts)
        with torch.device("meta"):
            model = cls(cfg, backend=backend, max_positions=max_positions)
        return load_checkpoint_state(model, state, path, dtype=dtype, device=device)


_LEGACY = re.compile(r"(.*\.layers\.\d+\.)block_sparse_moe\.(.*)")


def stack_legacy_experts(state: dict, num_experts: int) -> dict:
    """Rename the original layout in place: `block_sparse_moe.gate.weight` -> `mlp.gate.weight`, and per
    layer the E experts' w1 (gate) and w3 (up) [I, H] -> `mlp.experts.gate_up_proj` [E, 2I, H], w2 (down)
    [H, I] -> `mlp.experts.down_proj` [E, H, I]. A layer with experts missing is left as it is (the
    loader then names the keys that do not match)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in state if _LEGACY.fullmatch(k)]:
        prefix, rest = _LEGACY.fullmatch(key).groups()
        layers.setdefault(prefix, {})[rest] = key
    for prefix, keys in layers.items():
        if "gate.weight" in keys:
            state[prefix + "mlp.gate.weight"] = state.pop(keys.pop("gate.weight"))
        names = {f"experts.{e}.{w}.weight": (e, w) for e in range(num_experts) for w in ("w1", "w2", "w3")}
        if set(keys) != set(names):
            continue
        w = {names[rest]: state.pop(key) for rest, key in keys.items()}
        gate = torch.stack([w[e, "w1"] for e in range(num_experts)])  # [E, I, H]
        up = torch.stack([w[e, "w3"] for e in range(num_experts)])  # [E, I, H]
        state[prefix + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], 1)  # [E, 2I, H]
        state[prefix + "mlp.experts.down_proj"] = torch.stack([w[e, "w2"] for e in range(num_experts)])  # [E, H, I]
    return state
