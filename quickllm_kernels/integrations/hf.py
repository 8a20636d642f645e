"""quickllm ops inside a Hugging Face transformers model, for one model instance.

    import quickllm_kernels.integrations.hf as qk_hf
    model = AutoModelForCausalLM.from_pretrained(...)
    report = qk_hf.apply(model)      # RMSNorm, RoPE, MoE routing and experts now run on quickllm ops
    ...                              # forward, generate, backward as before
    qk_hf.revert(model)              # the model as it was

What `apply` routes, per module of the instance (transformers 5.x; families: llama, mistral, qwen2,
qwen3, mixtral, qwen3_moe, deepseek_v3):
  * RMSNorm modules (LlamaRMSNorm-style: `weight`, `variance_epsilon`, y = weight * normed.to(dtype))
    -> qk.rms_norm, same rounding. Where the weight's dtype differs from the input's, the module's own
    forward runs (transformers then promotes; the op keeps one dtype).
  * the attention's rotary embedding (Llama-family attention: q/k/v projections, optional per-head
    q_norm/k_norm, RoPE, the cache, the model's attention implementation, o_proj) -> qk.apply_rope
    on the projections' views, one launch for q and k. The cos/sin the model's rotary embedding
    computed are used as they are (any rope type, attention factor included).
  * MoE routers (Mixtral's and Qwen3-MoE's softmax top-k, renormalised or not; DeepSeek-V3's sigmoid,
    correction bias, group-limited choice, scaling) -> qk.moe_route.
  * MoE experts, through transformers' experts-implementation registry: "quickllm" is registered
    and set for this model (`set_experts_implementation`); it runs qk.moe_experts where the experts
    are concatenated gate/up, SiLU, without bias, not transposed and not expert-parallel, and the
    implementation the model had otherwise.
  * DeepSeek-V3's attention (transformers 5.x's latent-cache layout: the latent and rotary key are
    cached, then expanded by kv_b_proj) -> qk.apply_rope on q_pe and k_pe, interleaved pairs as
    DeepSeek lays them out; with an older layout its forward stays transformers'.

Nothing global is changed: each routed module gets an instance `forward` (its class is untouched, so
other models of the same class are not affected); the experts implementation is this model's config
setting; registering the "quickllm" name only adds an entry. `apply` twice is a no-op (with other
options: reverted, then applied), `revert` restores every module and the experts setting. Gradients
flow through every routed op (each has autograd). `qk.last_backends()` shows which backend each op
ran on. Needs no hub access and no `kernels` package.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import torch
from torch import nn

import quickllm_kernels as qk

__all__ = ["apply", "revert", "applied", "Report", "SUPPORTED"]

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3")
_LLAMA_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "MixtralAttention",
                    "Qwen3MoeAttention"}
_EXPERTS_NAME = "quickllm"
_STATE = "_quickllm_hf_state"


@dataclasses.dataclass
class Report:
    """What `apply` routed: module counts per kind, the experts implementation before and after, and
    the modules left to transformers (class name -> count) with why."""
    rms_norm: int = 0
    rope: int = 0
    router: int = 0
    experts: int = 0
    experts_implementation: tuple | None = None  # (before, after)
    left: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)


# ---- the routed forwards -----------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states):
    if hidden_states.dtype != self.weight.dtype or not hidden_states.is_floating_point():
        return type(self).forward(self, hidden_states)
    return qk.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _rope(q, k, cos, sin, style="neox"):
    """q, k [B, S, H, D] (views); cos, sin [B or 1, S, R] as transformers' rotary embeddings give them
    (cat(freqs, freqs), times the attention factor): rotated by apply_rope (neox halves, or gptj
    interleaved pairs)."""
    b, s = q.shape[:2]
    half = cos.shape[-1] // 2
    table = torch.cat([cos[..., :half], sin[..., :half]], -1).reshape(-1, 2 * half)  # one row per (b, s)
    pos = torch.arange(table.shape[0], device=q.device).view(cos.shape[0], s)
    return qk.apply_rope(q, k, pos.expand(b, s), table.float(), style=style)


def _llama_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    cos, sin = position_embeddings
    if args or cos.shape[-1] > self.head_dim or cos.dim() != 3:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = kwargs.pop("cache", None)
    past = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else past
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)  # [B, S, H, D]
    k = self.k_proj(hidden_states).view(shape)
    if getattr(self, "q_norm", None) is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = _rope(q, k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if cache is not None:
        k, v = _update_cache(self, cache, k, v, cos, sin, kwargs)
    modeling = sys.modules[type(self).__module__]
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    if hasattr(self, "sliding_window"):
        kwargs["sliding_window"] = self.sliding_window
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), weights


def _update_cache(self, cache, k, v, cos, sin, kwargs):
    if self._quickllm_cache_kwarg:  # transformers >= 5.2x: update(..., kwargs=...)
        return cache.update(k, v, self.layer_idx, kwargs=kwargs)
    return cache.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})


def _deinterleave(x):
    """Interleaved pairs (x0, x1), (x2, x3), ... -> [x0, x2, ... | x1, x3, ...]: the layout transformers'
    DeepSeek-V3 gives its rotated dims."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _deepseek_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args,
                                **kwargs):
    """DeepSeek-V3's attention as transformers 5.x writes it (the latent cache, then kv_b_proj), its
    rotary dims rotated by apply_rope (interleaved pairs: gptj, then laid out as transformers does)."""
    cos, sin = position_embeddings
    if args or cos.dim() != 3:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = kwargs.pop("cache", None)
    past = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else past
    b, s = hidden_states.shape[:-1]
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(b, s, -1, self.qk_head_dim)  # [B, S, H, dn + dr]
    q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                 dim=-1)
    kv_nope = self.kv_a_layernorm(kv_nope).view(b, 1, s, self.kv_lora_rank)
    interleave = bool(getattr(self.config, "rope_interleave", False))
    q_rot, k_rot = _rope(q_rot, k_rot.view(b, s, 1, self.qk_rope_head_dim), cos, sin,
                         style="gptj" if interleave else "neox")
    if interleave:
        q_rot, k_rot = _deinterleave(q_rot), _deinterleave(k_rot)
    q_pass, q_rot, k_rot = q_pass.transpose(1, 2), q_rot.transpose(1, 2), k_rot.transpose(1, 2)  # [B, H or 1, S, .]
    if cache is not None:
        kv_nope, k_rot = _update_cache(self, cache, kv_nope, k_rot, cos, sin, kwargs)
    query = torch.cat((q_pass, q_rot), dim=-1)
    key, value = self.expand_kv(kv_nope, k_rot)
    modeling = sys.modules[type(self).__module__]
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             **kwargs)
    return self.o_proj(out.reshape(b, s, -1).contiguous()), weights


def _mixtral_router_forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = nn.functional.linear(hidden_states, self.weight)
    weights, ids = qk.moe_route(logits, self.top_k, scoring="softmax", renormalize=True)
    return logits, weights, ids.long()


def _deepseek_router_forward(self, hidden_states):
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    logits = nn.functional.linear(hidden_states.float(), self.weight.float())
    weights, ids = qk.moe_route(logits, self.top_k, scoring="sigmoid", renormalize=self.norm_topk_prob,
                                correction_bias=self.e_score_correction_bias, n_group=self.num_group,
                                topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor)
    return logits, weights, ids.long()


def _qwen3_moe_router_forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = nn.functional.linear(hidden_states, self.weight)
    weights, ids = qk.moe_route(logits, self.top_k, scoring="softmax", renormalize=bool(self.norm_topk_prob))
    return logits, weights.to(logits.dtype), ids.long()


_ROUTERS = {"MixtralTopKRouter": _mixtral_router_forward, "DeepseekV3TopkRouter": _deepseek_router_forward,
            "Qwen3MoeTopKRouter": _qwen3_moe_router_forward}


def _experts_supported(self) -> str | None:
    if not getattr(self, "has_gate", True) or getattr(self, "has_bias", False):
        return "bias or no gate projection"
    if not getattr(self, "is_concatenated", True) or getattr(self, "is_transposed", False):
        return "interleaved or transposed expert weights"
    if getattr(self, "has_post_expert_norm", False) or getattr(self, "_is_expert_parallel", False):
        return "post-expert norm or expert parallelism"
    if getattr(self.config, "hidden_act", "silu") != "silu":
        return f"activation {self.config.hidden_act!r}"
    if not isinstance(getattr(self, "gate_up_proj", None), torch.Tensor):
        return "no gate_up_proj tensor"
    return None


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The "quickllm" experts implementation: qk.moe_experts, or the model's previous implementation
    for experts it does not cover."""
    if _experts_supported(self) is None and hidden_states.dtype == self.gate_up_proj.dtype:
        return qk.moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index.int())
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    before = getattr(self, "_quickllm_experts_before", "eager")
    eager = getattr(type(self).forward, "__wrapped__", None)
    fn = ALL_EXPERTS_FUNCTIONS.get_interface(before, eager) if before != "eager" else eager
    return fn(self, hidden_states, top_k_index, top_k_weights)


# ---- apply / revert ----------------------------------------------------------------------------


def _model_type(model) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _set_forward(state, module, fn):
    state["forwards"].append((module, module.__dict__.get("forward")))
    module.forward = types.MethodType(fn, module)


def apply(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, moe: bool = True) -> Report:
    """Route this model instance's RMSNorm, RoPE, MoE routing and experts to quickllm ops (each can be
    switched off). Returns a Report of what was routed. Raises ValueError for an architecture outside
    SUPPORTED (its name in the message)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    kind = _model_type(model)
    if kind not in SUPPORTED:
        raise ValueError(f"apply: model_type {kind!r} ({type(model).__name__}) is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")
    options = dict(rms_norm=rms_norm, rope=rope, moe=moe)
    current = getattr(model, _STATE, None)
    if current is not None:
        if current["report"].options == options:
            return current["report"]
        revert(model)
    state = {"forwards": [], "experts": None}
    report = Report(options=options)
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
                and isinstance(getattr(module, "weight", None), torch.Tensor):
            _set_forward(state, module, _rms_norm_forward)
            report.rms_norm += 1
        elif rope and name in _LLAMA_ATTENTION:
            params = inspect.signature(type(module).forward).parameters
            module._quickllm_cache_kwarg = "cache" in params
            _set_forward(state, module, _llama_attention_forward)
            report.rope += 1
        elif moe and name in _ROUTERS:
            _set_forward(state, module, _ROUTERS[name])
            report.router += 1
        elif rope and name == "DeepseekV3Attention":
            params = inspect.signature(type(module).forward).parameters
            if ("cache" in params or "past_key_values" in params) and hasattr(module, "expand_kv"):
                # the latent-cache layout it mirrors (transformers 5.17 names the cache past_key_values)
                module._quickllm_cache_kwarg = "cache" in params
                _set_forward(state, module, _deepseek_attention_forward)
                report.rope += 1
            else:
                key = f"{name} (this transformers version's layout)"
                report.left[key] = report.left.get(key, 0) + 1
    if moe and hasattr(model, "set_experts_implementation"):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")
                   and type(m).__name__.endswith("Experts")]
        if experts:
            if _EXPERTS_NAME not in ALL_EXPERTS_FUNCTIONS:
                ALL_EXPERTS_FUNCTIONS.register(_EXPERTS_NAME, _experts_forward)
            before = model.config._experts_implementation
            for m in experts:
                m._quickllm_experts_before = before
                why = _experts_supported(m)
                if why:
                    key = f"{type(m).__name__} ({why})"
                    report.left[key] = report.left.get(key, 0) + 1
                else:
                    report.experts += 1
            model.set_experts_implementation(_EXPERTS_NAME)
            state["experts"] = before
            report.experts_implementation = (before, _EXPERTS_NAME)
    state["report"] = report
    setattr(model, _STATE, state)
    return report


def revert(model: nn.Module) -> nn.Module:
    """Undo `apply` on this model (a model it was not applied to is returned unchanged)."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for module, old in reversed(state["forwards"]):
        if old is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = old
        module.__dict__.pop("_quickllm_cache_kwarg", None)
    if state["experts"] is not None:
        model.set_experts_implementation(state["experts"])
        for m in model.modules():
            m.__dict__.pop("_quickllm_experts_before", None)
    delattr(model, _STATE)
    return model


def applied(model: nn.Module) -> Report | None:
    """The Report of `apply` on this model, or None."""
    state = getattr(model, _STATE, None)
    return None if state is None else state["report"]
