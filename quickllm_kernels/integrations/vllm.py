"""quickllm ops inside vLLM 0.33, as a general plugin.

    pip install -e .                    # in vLLM's environment: vLLM finds the entry point `quickllm`
    vllm serve MODEL                    # every vLLM process calls register() (VLLM_PLUGINS=quickllm: only it)
    vllm serve DEEPSEEK --attention-backend QUICKLLM_MLA    # MLA decode on mla_decode (opt-in)

register() swaps vLLM's layer classes through `CustomOp.register_oot` (vLLM then builds ours wherever a
model builds its own) and names one attention backend through `register_backend`:

  * RotaryEmbedding, and its subclasses that differ from it only in their cos/sin table (Llama3, YaRN,
    linear, NTK and dynamic-NTK scaling, Gemma4's proportional): forward_native (what runs while
    vLLM's custom ops are off, its default under torch.compile) and forward_cuda on apply_rope, with
    the table vLLM built. vLLM lays it out as rope_cache does ([max_positions, rotary_dim], cos half
    then sin half), so it is used as it is: a float32 table or one in the query's dtype directly,
    another dtype or device converted once by vLLM's own `_match_cos_sin_cache_dtype`. query and key
    are vLLM's [T, H * head_size] (or [T, H, head_size]); rotary_dim < head_size leaves the other dims
    as they are; key None rotates the query alone. forward_native returns new tensors, forward_cuda
    rotates in place (as vLLM's kernels do).
  * DeepseekScalingRotaryEmbedding (DeepSeek's YaRN, interleaved pairs: is_neox_style=False):
    forward(positions, query [T, H, D], key, offsets) on apply_rope (style "gptj"), new tensors.
  * RMSNorm: rms_norm; with a residual, add_rms_norm_ (in place: vLLM's fused_add_rms_norm contract,
    the residual keeps the rounded sum and the norm is taken of it, as vLLM's CUDA kernel does).
    GemmaRMSNorm: the same with weight_offset 1, the residual path out of place as vLLM's. A norm
    with var_hidden_size, without a weight or with a weight of another dtype than its input runs
    vLLM's own forward. vLLM's compile passes that fuse its RMSNorm with a quantisation or an
    all-reduce do not see the replaced norms.
  * UnquantizedFusedMoEMethod (bf16/fp16/fp32 experts): moe_experts on vLLM's w13 [E, 2I, H] (gate
    rows, then up rows) and w2 [E, H, I], which are kept as created (vLLM's kernel set-up, which may
    pad or reorder them, is skipped). Where the layer's routing is one moe_route computes (softmax or
    sigmoid top-k, a correction bias, DeepSeek-V3's group-limited choice with it; no custom routing
    function, no hash routing, no routed-experts capture) the method takes the router logits
    (vLLM's "monolithic" path) and routes with moe_route; otherwise vLLM's router chooses and
    moe_experts computes. Left to vLLM entirely (its own method runs): a non-SiLU or non-gated
    activation, expert biases, SwiGLU limits, LoRA, expert parallelism, EPLB, data / context /
    sequence parallel MoE, a device other than CUDA or CPU. Tensor parallelism is covered (each rank
    computes its shard; vLLM's runner reduces). Quantized methods (FP8, ...) are not replaced.
  * the MLA decode backend QUICKLLM_MLA (chosen with --attention-backend QUICKLLM_MLA): vLLM's
    MLACommonBackend / MLACommonImpl, whose forward_mqa runs mla_decode on vLLM's paged latent cache
    ([num_blocks, block_size, kv_lora_rank + rope_dim], the layout mla_decode reads), uniform
    multi-token decode (speculative) causal or not, CUDA graphs of uniform batches. Prefill stays on
    vLLM's prefill backend. Refused by name: an FP8 KV cache (kv_cache_dtype), alibi_slopes,
    sliding_window, logits_soft_cap, non-decoder attention (attn_type), sparse MLA (indexer),
    decode and prefill context parallelism.

register() imports only the vLLM modules whose classes it subclasses or registers with (the engine
imports them anyway); a second call returns the first call's Registration (also `registered()`),
which lists what was replaced and what was left, and why. A vLLM other than 0.33.x gets a warning:
these contracts were read from vLLM 0.33.0's sources.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import torch

import quickllm_kernels as qk

__all__ = ["register", "registered", "Registration", "MLA_BACKEND", "VLLM_VERSION"]

VLLM_VERSION = "0.33"
MLA_BACKEND = "QUICKLLM_MLA"
_logger = logging.getLogger(__name__)

_ROPE_MODULE = "vllm.model_executor.layers.rotary_embedding"
# RotaryEmbedding's subclasses that only build another table (each is checked to keep its forward)
_ROPE_TABLES = ("RotaryEmbedding", "Llama3RotaryEmbedding", "YaRNScalingRotaryEmbedding",
                "LinearScalingRotaryEmbedding", "NTKScalingRotaryEmbedding", "DynamicNTKScalingRotaryEmbedding",
                "DynamicNTKAlphaRotaryEmbedding", "Gemma4RotaryEmbedding")
_FORWARDS = ("forward", "forward_native", "forward_cuda", "forward_static")


@dataclasses.dataclass
class Registration:
    """What register() did: vLLM class name -> the class vLLM now builds in its place, vLLM class
    name -> why it was left to vLLM, the attention backend's name (None if not registered)."""
    vllm_version: str
    replaced: dict = dataclasses.field(default_factory=dict)
    skipped: dict = dataclasses.field(default_factory=dict)
    attention_backend: str | None = None


_REGISTRATION: Registration | None = None
_CLASSES: dict = {}  # our classes by name (the MLA backend's path resolves through __getattr__)


def registered() -> Registration | None:
    """The Registration of this process's register() call, or None before it."""
    return _REGISTRATION


def register() -> Registration:
    """The `vllm.general_plugins` entry point: put quickllm's layers in place of vLLM's (see the
    module docstring). Idempotent; vLLM calls it once in every process."""
    global _REGISTRATION
    if _REGISTRATION is not None:
        return _REGISTRATION
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    if not version.startswith(VLLM_VERSION + "."):
        _logger.warning("quickllm: vLLM %s; this plugin follows vLLM %s.x's layer contracts", version, VLLM_VERSION)
    report = Registration(vllm_version=version)
    rope = _module(_ROPE_MODULE, report, _ROPE_TABLES + ("DeepseekScalingRotaryEmbedding",))
    if rope is not None:
        for name in _ROPE_TABLES:
            _swap(rope, name, report, _rope_class)
        _swap(rope, "DeepseekScalingRotaryEmbedding", report, _deepseek_rope_class)
    norms = _module("vllm.model_executor.layers.layernorm", report, ("RMSNorm", "GemmaRMSNorm"))
    if norms is not None:
        _swap(norms, "RMSNorm", report, lambda cls: _norm_class(cls, 0.0, inplace=True))
        _swap(norms, "GemmaRMSNorm", report, lambda cls: _norm_class(cls, 1.0, inplace=False))
    moe = _module("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method", report,
                  ("UnquantizedFusedMoEMethod",))
    if moe is not None:
        _swap(moe, "UnquantizedFusedMoEMethod", report, _moe_class)
    report.attention_backend = _register_mla(report)
    _REGISTRATION = report
    _logger.info("quickllm: replaced %s; left %s", ", ".join(report.replaced) or "nothing",
                 ", ".join(f"{k} ({v})" for k, v in report.skipped.items()) or "nothing")
    return report


def _module(path, report, names):
    try:
        return importlib.import_module(path)
    except ImportError as e:
        for name in names:
            report.skipped[name] = f"{path} does not import ({e})"
        return None


def _swap(module, name, report, build):
    """Register build(vllm_cls) out of tree in place of module.name, unless it is missing, is not a
    class this plugin covers, or another plugin has replaced it already."""
    from vllm.model_executor.custom_op import op_registry_oot

    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        report.skipped[name] = f"not in {module.__name__}"
        return
    if name != "RotaryEmbedding" and name in _ROPE_TABLES:
        base = module.RotaryEmbedding
        changed = [m for m in _FORWARDS if getattr(cls, m, None) is not getattr(base, m, None)]
        if changed:
            report.skipped[name] = f"its own {', '.join(changed)}"
            return
    existing = op_registry_oot.get(cls.__name__)
    if existing is not None:
        if existing.__module__ == __name__:  # ours, from an earlier import of this module
            report.replaced[name] = existing
        else:
            report.skipped[name] = f"already replaced by {existing.__module__}.{existing.__qualname__}"
        return
    ours = build(cls)
    ours.__name__ = ours.__qualname__ = f"QuickLLM{cls.__name__}"
    ours.__module__ = __name__
    _CLASSES[ours.__name__] = ours
    cls.register_oot(ours)
    report.replaced[name] = ours


# ---- RoPE --------------------------------------------------------------------------------------


def _rope(module, positions, query, key, head_size, inplace):
    """vLLM's rotary forward on apply_rope: positions [T] (any shape of T tokens), query and key
    [T, H * head_size] or [..., H, head_size] views; the table is module.cos_sin_cache."""
    name = type(module).__name__
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: positions must be int32 or int64, got {positions.dtype}")
    if query.shape[-1] % head_size:
        raise ValueError(f"{name}: query's last dim ({query.shape[-1]}) is not a multiple of head_size ({head_size})")
    if key is not None and (key.dtype != query.dtype or key.shape[-1] % head_size):
        raise ValueError(f"{name}: key must have query's dtype ({query.dtype}) and whole heads of {head_size}, got "
                         f"{key.dtype} {tuple(key.shape)}")
    positions = positions.flatten()
    t = positions.shape[0]
    cache = module.cos_sin_cache
    if cache.device != query.device or cache.dtype not in (torch.float32, query.dtype):
        cache = module._match_cos_sin_cache_dtype(query)  # vLLM's conversion, kept on the module
    style = "neox" if module.is_neox_style else "gptj"
    q = query.view(t, -1, head_size)
    k = key.view(t, -1, head_size) if key is not None else q.new_empty(t, 0, head_size)
    q_out, k_out = qk.apply_rope(q, k, positions, cache, style=style, inplace=inplace)
    if inplace:
        return query, key
    return q_out.view(query.shape), None if key is None else k_out.view(key.shape)


def _rope_class(vllm_cls):
    class Rope(vllm_cls):
        """vLLM's rotary embedding with forward_native and forward_cuda on quickllm's apply_rope."""

        def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
            return _rope(self, positions, query, key, self.head_size, inplace=False)

        def forward_cuda(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
            return _rope(self, positions, query, key, self.head_size, inplace=True)

    return Rope


def _deepseek_rope_class(vllm_cls):
    class Rope(vllm_cls):
        """DeepSeek's YaRN rotary embedding on apply_rope: query [T, H, D], key [T, Hk, D], rotary dims
        first; positions + offsets index vLLM's table."""

        def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                           offsets: torch.Tensor | None = None):
            if offsets is not None:
                positions = positions + offsets
            return _rope(self, positions, query, key, query.shape[-1], inplace=False)

        def forward_cuda(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                         offsets: torch.Tensor | None = None):
            return self.forward_native(positions, query, key, offsets)

    return Rope


# ---- RMSNorm -----------------------------------------------------------------------------------


def _norm_covers(module, x, residual) -> bool:
    """Whether rms_norm / add_rms_norm take this call; otherwise vLLM's own forward runs it."""
    return (getattr(module, "variance_size_override", None) is None and getattr(module, "has_weight", True)
            and x.dtype == module.weight.dtype and (residual is None or residual.dtype == x.dtype))


def _norm_class(vllm_cls, weight_offset, inplace):
    def norm(self, x, residual):
        w = self.weight.data
        if residual is None:
            return qk.rms_norm(x, w, self.variance_epsilon, weight_offset=weight_offset)
        if inplace:
            return qk.add_rms_norm_(x, residual, w, self.variance_epsilon, weight_offset)
        return qk.add_rms_norm(x, residual, w, self.variance_epsilon, weight_offset=weight_offset)

    class Norm(vllm_cls):
        """vLLM's RMSNorm on quickllm's rms_norm; with a residual, add_rms_norm."""

        def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
            if not _norm_covers(self, x, residual):
                return super().forward_native(x, residual)
            return norm(self, x, residual)

        def forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None = None):
            if not _norm_covers(self, x, residual):
                return super().forward_cuda(x, residual)
            return norm(self, x, residual)

    return Norm


# ---- MoE ---------------------------------------------------------------------------------------

_MOE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# vLLM's RoutingMethodType names whose routing moe_route computes (others keep vLLM's router)
_ROUTINGS = ("Default", "RenormalizeNaive", "Sigmoid", "SigmoidRenorm", "DeepSeekV3", "MiniMax2")


def _moe_unsupported(moe) -> str | None:
    """Why moe_experts cannot run a layer of this FusedMoEConfig (the field named), or None."""
    par = moe.moe_parallel_config
    activation = getattr(moe.activation, "value", moe.activation)
    device = torch.device(moe.device).type if moe.device is not None else "cuda"
    for bad, why in (
            (activation != "silu", f"activation {activation!r} (SiLU-gated experts only)"),
            (moe.has_bias, "has_bias (expert biases)"),
            (any(getattr(moe, f, None) is not None for f in ("swiglu_limit", "swiglu_alpha", "swiglu_beta",
                                                            "activation_situ_beta", "activation_situ_linear_beta")),
             "swiglu_limit / swiglu_alpha / swiglu_beta / activation_situ_*"),
            (moe.is_lora_enabled, "is_lora_enabled (LoRA on the experts)"),
            (par.use_ep, "use_ep (expert parallelism)"),
            (par.enable_eplb, "enable_eplb"),
            (par.dp_size > 1 or par.pcp_size > 1 or par.sp_size > 1, "dp_size / pcp_size / sp_size > 1"),
            (moe.in_dtype not in _MOE_DTYPES, f"in_dtype {moe.in_dtype} (bf16, fp16, fp32 only)"),
            (device not in ("cuda", "cpu"), f"device {moe.device!r}")):
        if bad:
            return why
    return None


def _captures_routed_experts() -> bool:
    from vllm.config import get_current_vllm_config

    aux = getattr(get_current_vllm_config(), "aux_output_config", None)
    return bool(getattr(aux, "enable_return_routed_experts", False))


def _routing(layer, moe, num_experts) -> dict | None:
    """moe_route's arguments for the routing vLLM's router would do for this layer, or None where
    that routing is not one moe_route computes (then vLLM's router runs)."""
    if moe.require_decomposed_backend or moe.has_hash_routing or _captures_routed_experts():
        return None
    if getattr(moe.routing_method, "name", None) not in _ROUTINGS:
        return None
    if layer.custom_routing_function is not None or getattr(layer, "hash_indices_table", None) is not None:
        return None
    if layer.scoring_func not in ("softmax", "sigmoid") or num_experts != layer.global_num_experts:
        return None  # (more weights than routed experts: fused shared experts)
    bias = layer.e_score_correction_bias
    n_group, topk_group = layer.num_expert_group or 0, layer.topk_group or 0
    grouped = layer.use_grouped_topk and n_group > 1 and num_experts > n_group and num_experts % n_group == 0
    # vLLM scores a group by its two best biased scores only with a correction bias (without one, by its
    # best score); its plain top-k router (no bias, no groups) does not apply routed_scaling_factor.
    if bias is None and (grouped or layer.routed_scaling_factor != 1.0):
        return None
    return dict(scoring=layer.scoring_func, renormalize=bool(layer.renormalize), correction_bias=bias,
                n_group=n_group if grouped else None, topk_group=topk_group if grouped else None,
                routed_scaling_factor=float(layer.routed_scaling_factor))


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    _logger.info(message)


def _experts(layer, x, topk_weights, topk_ids):
    if layer.apply_router_weight_on_input:  # (top_k = 1, Llama-4) the weight scales the token, not the output
        x = x * topk_weights.to(x.dtype)
        topk_weights = torch.ones_like(topk_weights)
    return qk.moe_experts(x, layer.w13_weight.data, layer.w2_weight.data, topk_weights, topk_ids)


def _moe_class(vllm_cls):
    class Method(vllm_cls):
        """vLLM's unquantized fused-MoE method on moe_experts (and moe_route where it routes); the
        layers it does not cover run vLLM's method unchanged (`quickllm_unsupported` says why)."""
        quickllm_unsupported: str | None = "not initialised"
        quickllm_routing: dict | None = None  # moe_route's arguments where this method routes

        def __init__(self, moe):
            super().__init__(moe)
            self.quickllm_unsupported = _moe_unsupported(moe)
            if self.quickllm_unsupported:
                _log_once(f"quickllm: MoE layers with {self.quickllm_unsupported} keep vLLM's method")

        def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
            if self.quickllm_unsupported:
                return super().maybe_roundup_sizes(hidden_size, intermediate_size_per_partition, act_dtype,
                                                   moe_parallel_config)
            return hidden_size, intermediate_size_per_partition  # moe_experts takes any sizes

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                           **extra_weight_attrs):
            super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                                   **extra_weight_attrs)
            if not self.quickllm_unsupported:
                self.quickllm_routing = _routing(layer, self.moe, num_experts)

        def process_weights_after_loading(self, layer):
            if self.quickllm_unsupported:
                return super().process_weights_after_loading(layer)
            # the base method's part only: no kernel of vLLM's is built, the weights keep their layout
            return super(vllm_cls, self).process_weights_after_loading(layer)

        @property
        def is_monolithic(self) -> bool:
            if self.quickllm_unsupported:
                return super().is_monolithic
            return self.quickllm_routing is not None

        def forward_native(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            if self.quickllm_unsupported:
                return super().forward_native(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
            return _experts(layer, x, topk_weights, topk_ids)  # (vLLM's runner runs the shared experts)

        def forward_cuda(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            if self.quickllm_unsupported:
                return super().forward_cuda(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
            return _experts(layer, x, topk_weights, topk_ids)

        def apply_monolithic(self, layer, x, router_logits, input_ids=None):
            if self.quickllm_unsupported:
                return super().apply_monolithic(layer, x, router_logits, input_ids)
            weights, ids = qk.moe_route(router_logits, layer.top_k, **self.quickllm_routing)
            return _experts(layer, x, weights, ids)

    return Method


# ---- MLA decode --------------------------------------------------------------------------------

_MLA_KV_DTYPES = ("auto", "float16", "bfloat16")


def _register_mla(report) -> str | None:
    try:
        return _mla_backend_member().name
    except ImportError as e:
        report.skipped[MLA_BACKEND] = f"vllm.v1.attention.backends.registry does not import ({e})"
        return None


def _mla_backend_member():
    """AttentionBackendEnum.QUICKLLM_MLA, registered in this process if it is not yet. Unpickling the
    member calls this too: a process vLLM spawns receives its config (which holds the member) before
    it loads its plugins."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if MLA_BACKEND not in AttentionBackendEnum.__members__:
        register_backend(MLA_BACKEND, f"{__name__}.QuickLLMMLABackend")
        AttentionBackendEnum[MLA_BACKEND].__reduce_ex__ = lambda protocol: (_mla_backend_member, ())
    return AttentionBackendEnum[MLA_BACKEND]


def _mla_decode(impl, q, kv_cache, attn_metadata):
    """forward_mqa's decode: q [B * Sq, H, L + R] (or the pair latent / rope), kv_cache [num_blocks,
    block_size, L + R] -> (out [B * Sq, H, L], lse float32 [B * Sq, H]); Sq query rows per request."""
    if isinstance(q, tuple):
        q = torch.cat(q, dim=-1)
    decode = attn_metadata.decode
    rows, heads, d = q.shape
    b = decode.seq_lens.shape[0]
    if b == 0 or rows % b:
        raise ValueError(f"{MLA_BACKEND}: {rows} decode query rows do not split evenly over {b} requests "
                         "(uniform decode batches only)")
    out, lse = qk.mla_decode(q.view(b, rows // b, heads, d), kv_cache, decode.block_table, decode.seq_lens,
                             softmax_scale=impl.scale, head_dim_v=impl.kv_lora_rank, causal=bool(attn_metadata.causal))
    return out.view(rows, heads, impl.kv_lora_rank), lse.transpose(1, 2).reshape(rows, heads)


def _mla_classes():
    if "QuickLLMMLABackend" in _CLASSES:
        return
    from vllm.model_executor.layers.attention.mla_attention import (MLACommonBackend, MLACommonImpl,
                                                                    MLACommonMetadataBuilder, QueryLenSupport)
    from vllm.v1.attention.backend import AttentionCGSupport

    class QuickLLMMLAMetadataBuilder(MLACommonMetadataBuilder):
        """vLLM's MLA metadata, with uniform multi-token decode batches in CUDA graphs."""
        _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH
        query_len_support = QueryLenSupport.UNIFORM
        supports_non_causal_multi_token_decode = True

    class QuickLLMMLAImpl(MLACommonImpl):
        """vLLM's MLA with its decode (forward_mqa) on quickllm's mla_decode."""
        can_return_lse_for_decode = True
        supports_dcp = False
        supports_pcp = False

        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                     logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args):
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                             logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args)
            for arg, value in (("alibi_slopes", alibi_slopes), ("sliding_window", sliding_window),
                               ("logits_soft_cap", logits_soft_cap), ("indexer (sparse MLA)", mla_args.get("indexer"))):
                if value is not None:
                    raise NotImplementedError(f"{MLA_BACKEND}: {arg} is not supported")
            if attn_type != "decoder":
                raise NotImplementedError(f"{MLA_BACKEND}: attn_type {attn_type!r} is not supported (decoder only)")
            if kv_cache_dtype not in _MLA_KV_DTYPES:
                raise ValueError(f"{MLA_BACKEND}: kv_cache_dtype {kv_cache_dtype!r} is not supported "
                                 f"(one of {', '.join(_MLA_KV_DTYPES)}: the cache in the model's dtype)")
            self.supports_quant_query_input = False

        def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
            return _mla_decode(self, q, kv_c_and_k_pe_cache, attn_metadata)

    class QuickLLMMLABackend(MLACommonBackend):
        """vLLM's MLA backend (prefill on vLLM's prefill backend) with quickllm's decode."""
        supported_dtypes = [torch.float16, torch.bfloat16]
        supported_kv_cache_dtypes = list(_MLA_KV_DTYPES)

        @staticmethod
        def get_name() -> str:
            return MLA_BACKEND

        @staticmethod
        def get_impl_cls():
            return QuickLLMMLAImpl

        @staticmethod
        def get_builder_cls():
            return QuickLLMMLAMetadataBuilder

        @classmethod
        def get_supported_head_sizes(cls) -> list[int]:
            return []  # mla_decode takes any kv_lora_rank + rope_dim

        @classmethod
        def supports_non_causal(cls) -> bool:
            return True

    for cls in (QuickLLMMLAMetadataBuilder, QuickLLMMLAImpl, QuickLLMMLABackend):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        _CLASSES[cls.__name__] = cls


def __getattr__(name):
    """The MLA backend's classes (vLLM resolves QUICKLLM_MLA to f"{__name__}.QuickLLMMLABackend"), made
    on first use since they subclass vLLM's; and the classes register() made."""
    if name.startswith("QuickLLMMLA"):
        _mla_classes()
    try:
        return _CLASSES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
