"""Qwen2 / Qwen2.5 causal LM written with quickllm ops (apply_rope; token_logprobs for training).

Reads like the architecture: token embedding, N pre-norm decoder layers (RMSNorm, grouped-query
attention with biased q/k/v projections and rotary embeddings, RMSNorm, SwiGLU MLP), final RMSNorm,
lm_head (tied to the embedding in the small models). Module names match Hugging Face checkpoints, so
`Qwen2ForCausalLM.from_pretrained(dir)` loads config.json + safetensors (sharded or not) directly.

    model = Qwen2ForCausalLM.from_pretrained("Qwen2.5-0.5B-Instruct")    # a local directory
    out = model(input_ids)                                                # out.logits [B, T, V]
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), backend="reference")
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import quickllm_kernels as qk


@dataclasses.dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "Qwen2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2Config":
        """From a Hugging Face config.json dict (transformers 4.x `rope_scaling`/`rope_theta` or 5.x
        `rope_parameters`)."""
        if d.get("use_sliding_window"):
            raise NotImplementedError("Qwen2Config: sliding-window attention layers are not supported")
        return cls(**config_fields(cls, d))


def rope_from_hf(d: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None for plain RoPE) of a Hugging Face config dict: transformers 4.x
    `rope_theta` + `rope_scaling`, or 5.x `rope_parameters` (which holds rope_theta)."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or default_theta
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    return theta, rope or None


def config_fields(cls, d: dict, default_theta: float = 10000.0) -> dict:
    """The keyword arguments of config dataclass `cls` found in Hugging Face config dict `d`, RoPE
    parsed by rope_from_hf."""
    theta, rope = rope_from_hf(d, default_theta)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields and k not in ("rope_scaling", "rope_theta")}
    return dict(kw, rope_theta=theta, rope_scaling=rope)


PRESETS = {
    "qwen2.5-0.5b": dict(),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                     tie_word_embeddings=False),
    "tiny": dict(vocab_size=64, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
}


@dataclasses.dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when hidden states were asked for instead)
    hidden_states: torch.Tensor | None = None  # [B, T, H] after the final norm


class KVCache:
    """Keys and values of every layer for up to `max_len` positions: [L, B, Hk, max_len, D] each."""

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # which slots hold keys
        self.length = 0


class Qwen2RMSNorm(qk.RMSNorm):
    """qk.RMSNorm: transformers' RMSNorm of Llama, Qwen2, Mixtral and DeepSeek-V3 (statistics in float32,
    weight * normed.to(x.dtype)), on the rms_norm op; `add` fuses the residual add before it."""

    def add(self, x, residual):
        """(norm(x + residual), x + residual) in one pass (qk.add_rms_norm)."""
        return self(x, residual)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int, *, bias: bool = True, o_bias: bool = False):
        """bias: q/k/v projections with a bias (Qwen2) or without (Llama, Mistral, Mixtral); o_bias: the
        output projection's (Llama's attention_bias sets both)."""
        super().__init__()
        self.layer, self.hq, self.hk, self.d = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hk * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hk * self.d, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=o_bias)

    def forward(self, x, positions, rope, attn_mask, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.hq, self.d)  # [B, T, Hq, D]
        k = self.k_proj(x).view(b, t, self.hk, self.d)  # [B, T, Hk, D]
        v = self.v_proj(x).view(b, t, self.hk, self.d)
        q, k = qk.apply_rope(q, k, positions, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if cache is not None:
            s = cache.length
            cache.k[self.layer, :, :, s : s + t] = k
            cache.v[self.layer, :, :, s : s + t] = v
            k, v = cache.k[self.layer, :, :, : s + t], cache.v[self.layer, :, :, : s + t]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.hq != self.hk)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.hq * self.d))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int, *, bias: bool = True, o_bias: bool = False):
        """bias, o_bias: the attention projections' biases (Qwen2Attention; Llama sets both from
        attention_bias)."""
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg, layer, bias=bias, o_bias=o_bias)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, positions, rope, attn_mask, cache):
        h, x = self.post_attention_layernorm.add(self.self_attn(self.input_layernorm(x), positions, rope, attn_mask, cache), x)
        return x + self.mlp(h)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """The causal-LM shell every model of quickllm_models shares: token embedding and decoder layers
    (`model_class`, built from the config), final norm, lm_head (tied when the config says so), the
    cos/sin table, the KV cache, forward and greedy generation."""
    model_class: type

    def __init__(self, cfg, *, backend: str | None = None, max_positions: int | None = None):
        """max_positions: rows of the cos/sin table (default cfg.max_position_embeddings), fixed here
        so that a forward never syncs with the host or replaces a buffer (CUDA graphs); a position
        past it raises on the CPU and gives NaN on a GPU (apply_rope's contract)."""
        super().__init__()
        self.config, self.backend = cfg, backend
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.model = self.model_class(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # cos/sin table as transformers builds it, float32 (dynamic scaling: as for a sequence of
        # max_positions tokens)
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self):
        c = self.config
        return qk.rope_cache(c.dim_head, self.max_positions, base=c.rope_theta, scaling=c.rope_scaling,
                             max_position_embeddings=c.max_position_embeddings)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.lm_head.weight
        return KVCache(self.config, batch, max_len, w.dtype, w.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                return_hidden: bool = False) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = real token, 0 = padding, e.g. left padding);
        position_ids [B, T] (default: count of real tokens before each one). With a cache, the T new
        tokens follow the cache.length already stored."""
        ctx = qk.use_backend(self.backend) if self.backend else contextlib.nullcontext()
        with ctx:
            return self._forward(input_ids, attention_mask, position_ids, cache, return_hidden)

    def _forward(self, input_ids, attention_mask, position_ids, cache, return_hidden):
        start = cache.length if cache is not None else 0
        t = input_ids.shape[1]
        position_ids, attn_mask = attention_inputs(input_ids, attention_mask, position_ids, cache,
                                                   sliding_window=getattr(self.config, "sliding_window", None))
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        for layer in self.model.layers:
            x = layer(x, position_ids, self.rope, attn_mask, cache)
        x = self.model.norm(x)
        if cache is not None:
            cache.length = start + t
        if return_hidden:
            return CausalLMOutput(logits=None, hidden_states=x)
        return CausalLMOutput(logits=self.lm_head(x))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache: the prompt ids [B, P] (left padded, `attention_mask`
        [B, P]) followed by up to max_new_tokens argmax tokens, [B, P + n]. After its eos_token_id a row
        gets pad_token_id (default: eos_token_id); decoding stops early once every row has ended, as
        transformers' generate(do_sample=False) does."""
        b, p = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        cache = self.new_cache(b, p + max_new_tokens)
        logits = self(input_ids, attention_mask=attention_mask, cache=cache).logits[:, -1]  # [B, V]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for i in range(max_new_tokens):
            tok = logits.argmax(-1)  # [B]
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, pad), tok)
                done = done | (tok == eos_token_id)
            out.append(tok)
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(tok[:, None], attention_mask=torch.ones_like(tok)[:, None], cache=cache).logits[:, -1]
        return torch.cat([input_ids, torch.stack(out, 1)], 1) if out else input_ids


class Qwen2ForCausalLM(DecoderForCausalLM):
    model_class = Qwen2Model

    # ---- checkpoints ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None,
                        max_positions=None) -> "Qwen2ForCausalLM":
        """Load a Hugging Face Qwen2 directory: config.json and model.safetensors, or shards listed in
        model.safetensors.index.json. Weights keep their stored dtype unless `dtype` is given."""
        cfg = Qwen2Config.from_hf(json.loads((Path(path) / "config.json").read_text()))
        state = read_safetensors(path)
        with torch.device("meta"):
            model = cls(cfg, backend=backend, max_positions=max_positions)
        return load_checkpoint_state(model, state, path, dtype=dtype, device=device)


# ---- shared with the other models of quickllm_models ------------------------------------------------


def attention_inputs(input_ids, attention_mask, position_ids, cache: KVCache | None, sliding_window: int | None = None):
    """(position_ids [B, T], boolean attention mask [B, 1, T, S]) for T new tokens after cache.length.

    attention_mask [B, T]: 1 = real token, 0 = padding (None: all real). Positions count the real tokens
    before each one. A query sees the real keys at its slot and before it (within `sliding_window`
    slots: key slot > query slot - sliding_window, as transformers masks); every query sees at least
    itself, so padded queries never get an empty row. Records the new tokens' mask in the cache."""
    b, t = input_ids.shape
    dev = input_ids.device
    start = cache.length if cache is not None else 0
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.bool, device=dev)
    attention_mask = attention_mask.bool()
    if cache is not None:
        cache.key_mask[:, start : start + t] = attention_mask
        key_mask = cache.key_mask[:, : start + t]
    else:
        key_mask = attention_mask
    if position_ids is None:  # real tokens are numbered from 0, padding does not count
        position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    # causal over absolute slots, only real keys
    q_slot = torch.arange(start, start + t, device=dev)[:, None]
    k_slot = torch.arange(start + t, device=dev)[None, :]
    causal = k_slot <= q_slot
    if sliding_window is not None:
        causal = causal & (k_slot > q_slot - sliding_window)
    allowed = causal[None] & key_mask[:, None, :]
    allowed = allowed | (k_slot == q_slot)[None]
    return position_ids, allowed[:, None]  # [B, 1, T, S]


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's model.safetensors, or of the shards listed in
    model.safetensors.index.json, on the CPU in its stored dtype."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def load_checkpoint_state(model, state: dict, path, *, dtype=None, device=None):
    """Assign checkpoint tensors (names as the model's state_dict) to a model built on the meta device:
    every name must match; lm_head is tied again when the config ties it; the RoPE table is rebuilt
    (float32 whatever `dtype` the weights take)."""
    tie = model.config.tie_word_embeddings
    if tie:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (tie and k == "lm_head.weight")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match {type(model).__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope = model._rope_table()
    if dtype is not None:
        model.to(dtype)
        model.rope = model.rope.float()
    return model.to(device) if device is not None else model
