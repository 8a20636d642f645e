"""TensorRT-LLM's PyTorch backend running its own Qwen2, Mixtral and DeepSeek-V3 models with quickllm ops.

    from quickllm_kernels.integrations import trtllm_models
    trtllm_models.register()                              # then tensorrt_llm.LLM(model=...) as usual
    # trtllm-serve / trtllm-bench: --custom_module_dirs DIR, DIR/__init__.py holding the two lines above

The backend builds a model by looking its architecture (config.json's `architectures[0]`) up in the
registry that `@register_auto_model` fills. register() puts one class per architecture there:
QuickLLMQwen2ForCausalLM, QuickLLMMixtralForCausalLM and QuickLLMDeepseekV3ForCausalLM, subclasses of
TensorRT-LLM's own Qwen2ForCausalLM, MixtralForCausalLM and DeepseekV3ForCausalLM. Each builds the
backend's model unchanged (its ModelConfig, weight loading, Attention with the KV cache manager and
attention backend, Linear, GatedMLP, Embedding, LM head, parallelism) and then replaces, in that model
instance, only the layers a quickllm op computes:

  * RMSNorm (every one: input/post-attention norms, the final norm, MLA's q_a/kv_a norms): rms_norm;
    with a residual, add_rms_norm_ (in place, as the backend's flashinfer kernel: the residual gets the
    sum, the input its norm). Norms fused with an NVFP4 quantisation, Gemma norms, return_norm_out and
    inputs of another dtype than the weight keep the backend's forward; where DeepSeek-V3 fuses a norm
    into its all-reduce (tensor parallelism) the norm module is not called at all.
  * RoPE where the backend applies it outside its attention kernel (rope_fusion False): Attention's
    apply_rope rotates q and k in place inside the fused qkv projection (apply_rope, the cos/sin table
    TensorRT-LLM built for the rope type, neox or interleaved), so qkv stays fused; RotaryEmbedding's
    own forward (MLA's prefill on backends without fused RoPE) runs apply_rope in place too. Qwen2
    sets the backend's own `disable_fuse_rope` switch, so its RoPE always runs here; Mixtral and the
    rest keep RoPE inside TensorRT-LLM's attention kernel where the attention backend fuses it
    (TRTLLM), and get apply_rope where it does not (FLASHINFER, VANILLA). Qwen2 with YaRN (the
    backend's QK-norm-RoPE attention, its own fused kernel) keeps TensorRT-LLM's.
  * The routed experts of Mixtral and DeepSeek-V3 (the module create_moe made): routing with moe_route
    (Mixtral's top-k softmax; DeepSeek-V3's sigmoid scores, e_score_correction_bias for the choice,
    group-limited top-k, routed_scaling_factor), the experts with moe_experts (bf16/fp16/fp32, or
    DeepSeek-V3's FP8 weights with their 128 x 128 block scales). The module holds the weights in
    moe_experts' layout (w13 = [gate; up] per expert) and loads them from the checkpoint's per-expert
    w1/w3/w2 (gate/up/down) tensors, which the backend's loaders hand it. The router GEMM (the gate),
    the shared experts and any all-reduce stay the backend's. Only without tensor, expert or
    attention-data parallelism, LoRA or a MoE load balancer, and only for those routings and for no
    quantisation or FP8 block scales; elsewhere the backend's MoE module stays.
  * MLA decode (DeepSeek-V3): the generation tokens of MLA (forward_absorption_generation) run on
    quickllm: q_nope absorbed through k_b_proj_trans, RoPE on q_pe and k_pe (apply_rope, interleaved,
    the YaRN table of the model), the new [kv_c | k_pe] rows written into TensorRT-LLM's paged latent
    cache (mla_cache_write into kv_cache_manager.get_buffers(layer), the layout the backend's kernels
    read), attention over that cache (mla_decode, the kv_cache_manager's block ids and lengths), and
    the per-head value projection through v_b_proj (FP8 k_b_proj_trans / v_b_proj are dequantised with
    weight_dequant, as the backend does on Blackwell; on Hopper its bmm quantises q_nope to FP8
    instead). Prefill (context) attention and the cache it writes stay TensorRT-LLM's. The block table
    and lengths come from the backend's device-side FlashMLA metadata where it keeps them
    (enable_flash_mla: CUDA-graph safe), else from kv_cache_manager.get_block_ids_per_seq and the
    cached token counts, copied to the device once per step. Left to the backend at run time: an FP8
    KV cache, generation requests of unequal query length, a CUDA graph being captured without that
    device-side metadata, sparse MLA, Helix context parallelism.
  * FP8 block-scaled linear layers (DeepSeek-V3's checkpoint: weight float8_e4m3fn with 128 x 128
    weight_scale): the quant method's apply on act_quant + fp8_block_gemm, while the weights keep the
    plain [N, K] layout with float32 [N/128, K/128] scales; after the backend's Blackwell re-layout of
    the scales (UE8M0), its own GEMM runs.

Every model instance says what it did: `quickllm_layers` (kind -> number of layers on quickllm ops)
and `quickllm_left` (kind -> why the backend's layer stayed).

Registration. TensorRT-LLM's out-of-tree models register as an import side effect (their
`@register_auto_model` decorators), and its executor carries an external architecture to its worker
processes as the name of the module that registered it (modeling_utils' export_external_model_modules
in TensorRT-LLM main after 047098b74c51; older versions pickle the class, which resolves through this
module's attributes): the worker imports that module and expects the registration to happen then.
This module has to import without TensorRT-LLM, so it registers at import only when TensorRT-LLM's
model registry (tensorrt_llm._torch.models.modeling_utils) is already loaded in the process, as it is
in a worker resolving the architecture; elsewhere register() does it. register() is idempotent and
returns the process's Registration; a worker registers all three architectures.

The contracts relied on (class and method names, signatures, attribute names) were read from
TensorRT-LLM's main branch: models/modeling_qwen.py, modeling_mixtral.py, modeling_deepseekv3.py,
modeling_utils.py and attention/{attention,mla,rotary_embedding}.py at 047098b74c51, modules/rms_norm.py
at b35ac1b64368 (and a later version with nvfp4 fusion), modules/linear.py (FP8BlockScalesLinearMethod),
modules/fused_moe/routing.py at 0f3e29af15c4, pyexecutor/resource_manager.py (KVCacheManager);
tests/integrations/test_trtllm_models.py pins them as stubs. Nothing here has run inside a real
TensorRT-LLM engine.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import sys
import threading

import torch

import quickllm_kernels as qk

__all__ = ["register", "registered", "Registration", "QuickLLMExperts", "ARCHITECTURES", "TRTLLM_MODELS"]

_logger = logging.getLogger(__name__)

TRTLLM_MODELS = "tensorrt_llm._torch.models"
# architecture -> the TensorRT-LLM module (under TRTLLM_MODELS) and class our model subclasses
ARCHITECTURES = {
    "Qwen2ForCausalLM": ("modeling_qwen", "Qwen2ForCausalLM"),
    "MixtralForCausalLM": ("modeling_mixtral", "MixtralForCausalLM"),
    "DeepseekV3ForCausalLM": ("modeling_deepseekv3", "DeepseekV3ForCausalLM"),
}
_REGISTRY_MODULE = f"{TRTLLM_MODELS}.modeling_utils"
_CLASS_NAMES = {f"QuickLLM{cls}": arch for arch, (_, cls) in ARCHITECTURES.items()}


@dataclasses.dataclass
class Registration:
    """What register() did in this process: TensorRT-LLM's version and, per architecture, the class
    now registered for it."""
    trtllm_version: str
    classes: dict = dataclasses.field(default_factory=dict)


_REGISTRATION: Registration | None = None
_CLASSES: dict = {}  # our model classes by name (pickled classes resolve through __getattr__)
_LOCK = threading.RLock()


def registered() -> Registration | None:
    """The Registration of this process, or None before register()."""
    return _REGISTRATION


def register(architectures=None) -> Registration:
    """Register quickllm's model classes with TensorRT-LLM's PyTorch backend, for the given
    architectures (names of ARCHITECTURES; default: all). Idempotent: a second call registers only
    what the first did not and returns the same Registration."""
    global _REGISTRATION
    if architectures is None:
        names = tuple(ARCHITECTURES)
    elif isinstance(architectures, str):
        names = (architectures,)
    else:
        names = tuple(architectures)
    unknown = [a for a in names if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"trtllm_models.register: unknown architecture {', '.join(map(repr, unknown))} (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    with _LOCK:
        try:
            import tensorrt_llm
            from tensorrt_llm._torch.models.modeling_utils import register_auto_model
        except ImportError as e:
            raise ImportError(f"trtllm_models.register needs TensorRT-LLM's PyTorch backend "
                              f"(tensorrt_llm._torch), which does not import here: {e}") from e
        if _REGISTRATION is None:
            _REGISTRATION = Registration(trtllm_version=str(getattr(tensorrt_llm, "__version__", "unknown")))
        for arch in names:
            if arch in _REGISTRATION.classes:
                continue
            module_name, class_name = ARCHITECTURES[arch]
            base = getattr(importlib.import_module(f"{TRTLLM_MODELS}.{module_name}"), class_name)
            ours = _CLASSES.get(f"QuickLLM{class_name}")
            if ours is None or ours.__mro__[1] is not base:
                ours = _model_class(arch, base)
            register_auto_model(arch)(ours)
            _REGISTRATION.classes[arch] = ours
        _logger.info("quickllm: TensorRT-LLM %s builds %s with quickllm layers", _REGISTRATION.trtllm_version,
                     ", ".join(_REGISTRATION.classes))
    return _REGISTRATION


def __getattr__(name):
    """Our model classes by name (they subclass TensorRT-LLM's, so they exist once it is imported)."""
    arch = _CLASS_NAMES.get(name)
    if arch is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return register([arch]).classes[arch]


# ---- the model classes ---------------------------------------------------------------------------


def _model_class(arch, base):
    class Model(base):
        def __init__(self, model_config, *args, **kwargs):
            if arch == "Qwen2ForCausalLM":
                # the backend's own switch (QwenAttention's rope_fusion): RoPE outside the attention kernel
                model_config.pretrained_config.disable_fuse_rope = True
            super().__init__(model_config, *args, **kwargs)
            self.quickllm_layers = {}
            self.quickllm_left = {}
            if arch != "Qwen2ForCausalLM":
                _replace_experts(self, self.model_config)  # before __post_init__ creates the backend's weights

        def __post_init__(self):
            super().__post_init__()
            _replace_layers(self)
            _logger.info("quickllm: %s on quickllm ops: %s; left to TensorRT-LLM: %s", type(self).__name__,
                         ", ".join(f"{k} x{v}" for k, v in self.quickllm_layers.items()) or "nothing",
                         ", ".join(f"{k} ({v})" for k, v in self.quickllm_left.items()) or "nothing")

    Model.__doc__ = (f"TensorRT-LLM's {base.__name__} with its norms, RoPE, MoE, MLA decode and FP8 GEMMs on "
                     f"quickllm ops where they cover the layer (see {__name__}).")
    Model.__name__ = Model.__qualname__ = f"QuickLLM{base.__name__}"
    Model.__module__ = __name__
    _CLASSES[Model.__name__] = Model
    return Model


def _count(model, kind):
    model.quickllm_layers[kind] = model.quickllm_layers.get(kind, 0) + 1


def _leave(model, kind, why):
    model.quickllm_left.setdefault(kind, why)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    _logger.info(message)


_SUBCLASSES: dict = {}


def _swap(obj, build) -> bool:
    """Give obj a subclass of its class that build(cls) makes (once per class); False if done already."""
    cls = type(obj)
    if getattr(cls, "_quickllm", False):
        return False
    sub = _SUBCLASSES.get((build, cls))
    if sub is None:
        sub = build(cls)
        sub.__name__ = sub.__qualname__ = f"QuickLLM{cls.__name__}"
        sub.__module__ = __name__
        sub._quickllm = True
        _SUBCLASSES[(build, cls)] = sub
    obj.__class__ = sub
    return True


def _defined_by(cls, method, owner):
    """Whether cls's `method` is the one the class named `owner` in its MRO defines (not overridden)."""
    for c in cls.__mro__:
        if method in c.__dict__:
            return c.__name__ == owner
    return False


def _replace_layers(model):
    for module in model.modules():
        name = type(module).__name__
        if name == "RMSNorm" and hasattr(module, "variance_epsilon"):
            if _swap(module, _norm_class):
                _count(model, "rms_norm")
        elif name == "RotaryEmbedding" and hasattr(module, "rotary_cos_sin"):
            _swap(module, _rotary_class)
        method = getattr(module, "quant_method", None)
        if type(method).__name__ == "FP8BlockScalesLinearMethod" and _swap(method, _fp8_method_class):
            _count(model, "fp8_linear")
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_quickllm", False) or not hasattr(module, "rope_fusion"):
            continue
        if hasattr(cls, "forward_absorption_generation"):
            if _defined_by(cls, "forward_absorption_generation", "MLA"):
                _replace_mla(model, module)
            else:
                _leave(model, "mla_decode", f"{cls.__name__}'s own forward_absorption_generation")
        elif _defined_by(cls, "apply_rope", "Attention"):
            _replace_rope(model, module)
        elif hasattr(cls, "apply_rope"):
            _leave(model, "rope", f"{cls.__name__}'s own apply_rope (e.g. QK norm fused with RoPE)")


# ---- RMSNorm -----------------------------------------------------------------------------------


_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _norm_covers(norm, x, residual) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype in _NORM_DTYPES and norm.weight.dtype == x.dtype
            and (residual is None or residual is ...
                 or (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype))
            and not getattr(norm, "use_gemma", False) and not getattr(norm, "return_hp_output", False)
            and not (getattr(norm, "is_nvfp4", False) and getattr(norm, "nvfp4_scale", None) is not None))


def _norm_class(base):
    class Norm(base):
        """TensorRT-LLM's RMSNorm on rms_norm / add_rms_norm_ (in place, as its flashinfer path)."""

        def forward(self, hidden_states, residual=..., **kwargs):
            if any(kwargs.values()) or not _norm_covers(self, hidden_states, residual):
                return super().forward(hidden_states, residual, **kwargs)
            if not isinstance(residual, torch.Tensor):
                y = qk.rms_norm(hidden_states, self.weight, self.variance_epsilon)
                return y if residual is ... else (y, None)
            qk.add_rms_norm_(hidden_states, residual, self.weight, self.variance_epsilon)
            return hidden_states, residual

    return Norm


# ---- RoPE --------------------------------------------------------------------------------------


def _rope_table(emb, device):
    """RotaryEmbedding's table as [max_positions, rotary_dim]: cos half, then sin half (rope_cache's)."""
    table = emb.rotary_cos_sin.reshape(emb.max_positions, -1)
    return table if table.device == device else table.to(device)


def _rotary_covers(emb) -> bool:
    t = getattr(emb, "rotary_cos_sin", None)
    return (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == 2 and 2 * t.shape[2] <= emb.head_dim
            and not getattr(emb, "inverse", False))


def _rotate_(q, k, positions, emb, head_dim):
    """Rotate q [T, Hq * head_dim] and k [T, Hk * head_dim] in place with emb's table; False if they
    are not of that form (the caller then runs the backend's code)."""
    positions = positions.reshape(-1)
    if (q.dim() != 2 or k.dim() != 2 or q.shape[0] != k.shape[0] or positions.shape[0] != q.shape[0]
            or q.shape[-1] % head_dim or k.shape[-1] % head_dim or positions.dtype not in (torch.int32, torch.int64)
            or q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1):
        return False
    qk.apply_rope(q.unflatten(-1, (-1, head_dim)), k.unflatten(-1, (-1, head_dim)), positions,
                  _rope_table(emb, q.device), style="neox" if emb.is_neox else "gptj", inplace=True)
    return True


def _rotary_class(base):
    class Rotary(base):
        """TensorRT-LLM's RotaryEmbedding with forward(position_ids, [q, k]) on apply_rope, in place."""

        def forward(self, position_ids, targets):
            if (len(targets) == 2 and _rotary_covers(self)
                    and _rotate_(targets[0], targets[1], position_ids, self, self.head_dim)):
                return list(targets)
            return super().forward(position_ids, targets)

    return Rotary


def _attention_class(base):
    class Attention(base):
        """TensorRT-LLM's Attention with apply_rope rotating q and k in place inside the fused qkv."""

        def apply_rope(self, q, k, v, position_ids):
            if not self.rope_fusion and position_ids is not None and _rotary_covers(self.rotary_emb):
                if k is None and v is None:  # q is the fused [T, q_size + 2 kv_size] projection
                    if q.dim() == 2 and q.shape[-1] == self.q_size + 2 * self.kv_size and _rotate_(
                            q[:, : self.q_size], q[:, self.q_size: self.q_size + self.kv_size], position_ids,
                            self.rotary_emb, self.head_dim):
                        return q, None, None
                elif k is not None and _rotate_(q, k, position_ids, self.rotary_emb, self.head_dim):
                    return q, k, v
            return super().apply_rope(q, k, v, position_ids)

    return Attention


def _replace_rope(model, attn):
    emb = getattr(attn, "rotary_emb", None)
    if attn.rope_fusion:
        _leave(model, "rope", "fused into TensorRT-LLM's attention kernel (rope_fusion)")
    elif emb is None:
        _leave(model, "rope", "no rotary embedding")
    elif type(emb).__name__ not in ("RotaryEmbedding", "QuickLLMRotaryEmbedding") or not _rotary_covers(emb):
        _leave(model, "rope", f"{type(emb).__name__} (mRoPE, inverse RoPE)")
    elif _swap(attn, _attention_class):
        _count(model, "rope")


# ---- MoE ---------------------------------------------------------------------------------------


def _routing(method):
    """moe_route's arguments (without the correction bias) for a TensorRT-LLM routing method, or a
    string saying why moe_route does not compute it."""
    name = type(method).__name__
    if name in ("RenormalizeMoeRoutingMethod", "RenormalizeNaiveMoeRoutingMethod"):  # top-k, softmax over k
        return dict(scoring="softmax", renormalize=True)
    if name == "DefaultMoeRoutingMethod":  # softmax over all, top-k
        return dict(scoring="softmax", renormalize=False)
    if name == "DeepSeekV3MoeRoutingMethod":
        impl = method.routing_impl
        grouped = impl.n_group > 1
        return dict(scoring="sigmoid", renormalize=True, n_group=impl.n_group if grouped else None,
                    topk_group=impl.topk_group if grouped else None,
                    routed_scaling_factor=float(impl.routed_scaling_factor))
    return f"routing {name}"


def _experts_unsupported(model_config):
    mapping = model_config.mapping
    tp, ep = getattr(mapping, "tp_size", 1), getattr(mapping, "moe_ep_size", 1)
    for bad, why in ((tp > 1, f"tensor parallelism (tp_size {tp})"), (ep > 1, f"expert parallelism (moe_ep_size {ep})"),
                     (getattr(mapping, "enable_attention_dp", False), "attention data parallelism"),
                     (getattr(model_config, "lora_config", None) is not None, "LoRA"),
                     (bool(getattr(model_config, "moe_load_balancer", None)), "a MoE load balancer")):
        if bad:
            return why
    return None


def _quant_algo(old, model_config, layer_idx):
    """The quantisation of a MoE layer's experts: the module's own quant_config (create_moe gives it the
    layer's, overrides included), else the model's for model.layers.<i>.mlp.experts."""
    qc = getattr(old, "quant_config", None)
    if qc is None:
        qc = (getattr(model_config, "quant_config_dict", None) or {}).get(f"model.layers.{layer_idx}.mlp.experts",
                                                                            model_config.quant_config)
        excluded = getattr(qc, "is_module_excluded_from_quantization", None)
        if excluded is not None and (excluded(f"model.layers.{layer_idx}")
                                     or excluded(f"model.layers.{layer_idx}.mlp.experts")):
            return None
    algo = getattr(qc, "quant_algo", None)
    return None if algo is None else str(getattr(algo, "value", algo))


def _config_dtype(cfg):
    dtype = getattr(cfg, "torch_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def _replace_experts(model, model_config):
    cfg = model_config.pretrained_config
    unsupported = _experts_unsupported(model_config)
    for idx, layer in enumerate(model.model.layers):
        holder = getattr(layer, "block_sparse_moe", None)
        if holder is None:
            holder = getattr(layer, "mlp", None)
        old = getattr(holder, "experts", None)
        if old is None or not hasattr(old, "routing_method"):
            continue  # a dense layer
        if unsupported:
            _leave(model, "moe", unsupported)
            continue
        layer_idx = getattr(layer, "layer_idx", idx)
        routing = _routing(old.routing_method)
        algo = _quant_algo(old, model_config, layer_idx)
        mixtral = type(holder).__name__ == "MixtralMoE"
        e = getattr(old, "num_experts", None) or (cfg.num_local_experts if mixtral else cfg.n_routed_experts)
        inter = getattr(old, "intermediate_size", None) or (cfg.intermediate_size if mixtral
                                                            else cfg.moe_intermediate_size)
        hidden = getattr(old, "hidden_size", None) or cfg.hidden_size
        fp8 = algo == "FP8_BLOCK_SCALES"
        if isinstance(routing, str):
            why = routing
        elif algo not in (None, "FP8_BLOCK_SCALES"):
            why = f"{algo} experts"
        elif fp8 and (inter % 128 or hidden % 128):
            why = "FP8 experts whose sizes are not multiples of 128"
        else:
            why = None
        if why:
            _leave(model, "moe", why)
            continue
        holder.experts = QuickLLMExperts(num_experts=e, hidden_size=hidden, intermediate_size=inter,
                                         dtype=getattr(old, "dtype", None) or _config_dtype(cfg),
                                         routing_method=old.routing_method, fp8=fp8,
                                         layer_idx=getattr(old, "layer_idx", layer_idx))
        _count(model, "moe")


class QuickLLMExperts(torch.nn.Module):
    """The routed experts of a TensorRT-LLM MoE layer on moe_route + moe_experts, in place of the module
    create_moe makes; called as that module is: experts(x [T, H], router_logits [T, E], ...) -> [T, H].

    w13_weight [E, 2I, H] (each expert's gate rows, then its up rows), w2_weight [E, H, I]; with FP8
    block scales they are float8_e4m3fn and w13_weight_scale_inv [E, 2I/128, H/128], w2_weight_scale_inv
    [E, H/128, I/128] float32 come with them. load_weights takes the checkpoint's per-expert tensors as
    TensorRT-LLM's loaders hand them to the experts module: {"<e>.w1.weight" (gate), "<e>.w3.weight"
    (up), "<e>.w2.weight" (down), and "<e>.w*.weight_scale_inv" (or weight_scale) for FP8}.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 routing_method, fp8: bool = False, layer_idx=None):
        super().__init__()
        routing = _routing(routing_method)
        if isinstance(routing, str):
            raise ValueError(f"QuickLLMExperts: {routing} is not one moe_route computes")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.dtype, self.layer_idx, self.fp8 = dtype, layer_idx, fp8
        self.top_k = int(routing_method.top_k)
        self.routing_method = routing_method  # TensorRT-LLM's (top_k; DeepSeek-V3's correction bias)
        self._routing = routing
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        e, i, h = num_experts, intermediate_size, hidden_size
        self.w13_weight = torch.nn.Parameter(torch.empty(e, 2 * i, h, dtype=wdtype), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.empty(e, h, i, dtype=wdtype), requires_grad=False)
        if fp8:
            blocks = lambda r, c: (e, math.ceil(r / 128), math.ceil(c / 128))  # noqa: E731
            self.w13_weight_scale_inv = torch.nn.Parameter(torch.empty(blocks(2 * i, h), dtype=torch.float32),
                                                           requires_grad=False)
            self.w2_weight_scale_inv = torch.nn.Parameter(torch.empty(blocks(h, i), dtype=torch.float32),
                                                          requires_grad=False)
        else:
            self.register_parameter("w13_weight_scale_inv", None)
            self.register_parameter("w2_weight_scale_inv", None)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"top_k={self.top_k}, {'fp8 block-scaled' if self.fp8 else self.dtype}, routing={self._routing}")

    def forward(self, x, router_logits, *, do_finalize: bool = True, output_dtype=None, all_rank_num_tokens=None,
                use_dp_padding=None, lora_params=None, **kwargs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuickLLMExperts: x must be a tensor [tokens, hidden] (a pre-quantised input such as "
                            f"{type(x).__name__} is not supported)")
        if not do_finalize:
            raise NotImplementedError("QuickLLMExperts: do_finalize=False (an unfinalised MoE output) is not supported")
        if lora_params:
            raise NotImplementedError("QuickLLMExperts: lora_params (LoRA on the experts) is not supported")
        extra = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if extra:
            raise NotImplementedError(f"QuickLLMExperts: option {', '.join(extra)} is not supported")
        if router_logits.dim() != 2 or router_logits.shape[0] != x.shape[0]:
            raise ValueError(f"QuickLLMExperts: router_logits must be [tokens = {x.shape[0]}, experts], got "
                             f"{list(router_logits.shape)}")
        bias = getattr(self.routing_method, "e_score_correction_bias", None) \
            if self._routing["scoring"] == "sigmoid" else None
        weights, ids = qk.moe_route(router_logits, self.top_k, correction_bias=bias, **self._routing)
        out = qk.moe_experts(x, self.w13_weight, self.w2_weight, weights, ids, w13_scale_inv=self.w13_weight_scale_inv,
                             w2_scale_inv=self.w2_weight_scale_inv)
        return out if output_dtype is None else out.to(output_dtype)

    def load_weights(self, weights, allow_partial_loading: bool = False):
        if len(weights) != 1:
            raise ValueError(f"QuickLLMExperts.load_weights: expected one dict of this module's tensors, got "
                             f"{len(weights)}")
        w = weights[0]
        i, sb = self.intermediate_size, self.intermediate_size // 128

        def take(key):
            if key in w:
                return w[key][:]
            if allow_partial_loading:
                return None
            raise KeyError(f"QuickLLMExperts.load_weights (layer {self.layer_idx}): the checkpoint has no {key}")

        def scale(e, name):
            for suffix in ("weight_scale_inv", "weight_scale"):
                if f"{e}.{name}.{suffix}" in w:
                    return w[f"{e}.{name}.{suffix}"][:]
            return take(f"{e}.{name}.weight_scale_inv")

        with torch.no_grad():
            for e in range(self.num_experts):
                for name, rows, srows in (("w1", slice(0, i), slice(0, sb)),
                                          ("w3", slice(i, 2 * i), slice(sb, 2 * sb))):
                    t = take(f"{e}.{name}.weight")
                    if t is not None:
                        self.w13_weight.data[e, rows].copy_(t)
                    s = scale(e, name) if self.fp8 else None
                    if s is not None:
                        self.w13_weight_scale_inv.data[e, srows].copy_(s)
                t = take(f"{e}.w2.weight")
                if t is not None:
                    self.w2_weight.data[e].copy_(t)
                s = scale(e, "w2") if self.fp8 else None
                if s is not None:
                    self.w2_weight_scale_inv.data[e].copy_(s)


# ---- FP8 block-scaled linear -------------------------------------------------------------------


def _fp8_covers(module, x) -> bool:
    w, s = getattr(module, "weight", None), getattr(module, "weight_scale", None)
    if not (isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16)
            and isinstance(w, torch.Tensor) and w.dtype == torch.float8_e4m3fn and w.dim() == 2
            and isinstance(s, torch.Tensor) and s.dtype == torch.float32):
        return False
    n, k = w.shape
    return tuple(s.shape) == (math.ceil(n / 128), math.ceil(k / 128)) and x.shape[-1] == k


def _fp8_method_class(base):
    class Fp8(base):
        """TensorRT-LLM's FP8 block-scales linear method with apply on act_quant + fp8_block_gemm."""

        def apply(self, module, input, bias, *args, **kwargs):
            if args or kwargs or not _fp8_covers(module, input):
                return super().apply(module, input, bias, *args, **kwargs)
            a, a_scales = qk.act_quant(input)
            out = qk.fp8_block_gemm(a, a_scales, module.weight, module.weight_scale, out_dtype=input.dtype)
            return out if bias is None else out + bias

    return Fp8


# ---- MLA decode --------------------------------------------------------------------------------

_ROPE_TABLES: dict = {}  # (RopeParams, device) -> [max_positions, rope_dim]: one table for all layers


def _mla_rope_table(rope, device):
    key = (rope, str(device))
    table = _ROPE_TABLES.get(key)
    if table is None:
        _, cos_sin = rope.create_rope_const_params(interleave=False)  # [1, P * 2 * rope_dim / 2]
        table = torch.as_tensor(cos_sin, dtype=torch.float32).reshape(rope.max_positions, -1).to(device)
        _ROPE_TABLES[key] = table
    return table


def _mla_unsupported(mla):
    mapping = getattr(mla, "mapping", None)
    for bad, why in ((getattr(mla, "sparse_attn_hooks", None) is not None, "sparse MLA"),
                     (getattr(mapping, "cp_size", 1) > 1, "context parallelism (Helix)"),
                     (getattr(mla, "llama_4_scaling", False), "Llama-4 attention scaling"),
                     (not hasattr(mla, "k_b_proj_trans"), "no absorbed k_b_proj_trans")):
        if bad:
            return why
    return None


def _replace_mla(model, mla):
    why = _mla_unsupported(mla)
    if why:
        _leave(model, "mla_decode", why)
    elif _swap(mla, _mla_class):
        _count(model, "mla_decode")


def _mla_inputs(mla, q, attn_metadata, position_ids):
    """(kv_cache [blocks, page, L + R], block_table int32 [G, pages], cache_seqlens int32 [G], positions
    [G * Sq], Sq) of the generation requests, or why the backend's path has to run."""
    if getattr(mla.mqa, "has_fp8_kv_cache", False):
        return "an FP8 KV cache"
    manager = getattr(attn_metadata, "kv_cache_manager", None)
    if manager is None or position_ids is None:
        return "no KV cache manager or no position ids"
    ctx, gens = attn_metadata.num_contexts, attn_metadata.num_generations
    t = q.shape[0]
    if gens == 0 or t % gens:
        return "generation tokens that do not split evenly over the generation requests"
    sq = t // gens
    if bool((attn_metadata.seq_lens[ctx: ctx + gens] != sq).any()):
        return "generation requests of unequal query length"
    cache = manager.get_buffers(mla.layer_idx)
    if cache.dim() != 5 or cache.shape[1] != 1 or cache.shape[3] != 1:
        return f"a KV cache of shape {list(cache.shape)} (not [blocks, 1, page, 1, D])"
    cache = cache[:, 0, :, 0, :]  # [blocks, page, L + R], a view of the pool
    if cache.dtype != q.dtype or cache.shape[-1] != mla.kv_lora_rank + mla.qk_rope_head_dim:
        return f"a {cache.dtype} cache of {cache.shape[-1]} values per token"
    table = getattr(attn_metadata, "block_ids_per_seq", None)
    lens = getattr(attn_metadata, "kv_lens_cuda", None)
    if (getattr(attn_metadata, "enable_flash_mla", False) and isinstance(table, torch.Tensor)
            and isinstance(lens, torch.Tensor) and table.device == q.device
            and not getattr(manager, "num_extra_kv_tokens", 0)):
        # the backend's device-side metadata (its FlashMLA prepare): the generation requests' pages first
        block_table, seqlens = table[:gens].to(torch.int32), lens[ctx: ctx + gens].to(torch.int32)
    elif torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph capture without the device-side block table (FlashMLA metadata)"
    else:
        ids = list(attn_metadata.request_ids[ctx: ctx + gens])
        cached = [int(c) for c in attn_metadata.kv_cache_params.num_cached_tokens_per_seq[ctx: ctx + gens]]
        key = (tuple(ids), tuple(cached), sq, q.device)
        memo = getattr(attn_metadata, "_quickllm_mla_tables", None)  # one host-to-device copy per step
        if memo is not None and memo[0] == key:
            block_table, seqlens = memo[1]
        else:
            block_table = torch.as_tensor(manager.get_block_ids_per_seq(ids), dtype=torch.int32).to(q.device)
            seqlens = torch.tensor([c + sq for c in cached], dtype=torch.int32, device=q.device)
            try:
                attn_metadata._quickllm_mla_tables = (key, (block_table, seqlens))
            except AttributeError:  # (a metadata class with __slots__)
                pass
    positions = position_ids.reshape(-1)[attn_metadata.num_ctx_tokens: attn_metadata.num_ctx_tokens + t]
    return cache, block_table, seqlens, positions, sq


def _absorbed(mla, name, dtype):
    """MLA's per-head k_b_proj_trans [H, L, nope] or v_b_proj [H, v, L] in dtype (FP8 dequantised)."""
    w = getattr(mla, name)
    if w.dtype != torch.float8_e4m3fn:
        return w.to(dtype)
    dequant = getattr(mla, f"{name}_dequant", None)
    if dequant is not None:
        return dequant.to(dtype)
    s = getattr(mla, f"{name}_scale")
    return qk.weight_dequant(w.reshape(-1, w.shape[-1]), s.reshape(-1, s.shape[-1]), out_dtype=dtype).view(w.shape)


def _mla_decode(mla, inputs, q, compressed_kv, k_pe, output):
    cache, block_table, seqlens, positions, sq = inputs
    t, h = q.shape[0], mla.num_heads_tp
    nope, r, lat, v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank, mla.v_head_dim
    q_nope, q_pe = q.view(t, h, nope + r).split([nope, r], dim=-1)
    style = "neox" if mla.pos_embd_params.is_neox else "gptj"
    table = _mla_rope_table(mla.pos_embd_params.rope, q.device)
    q_pe, k_pe = qk.apply_rope(q_pe, k_pe.reshape(t, 1, r), positions, table, style=style)
    fused = torch.empty(t, h, lat + r, dtype=q.dtype, device=q.device)  # [q_nope W_UK | rope(q_pe)]
    fused[..., :lat] = torch.einsum("thn,hln->thl", q_nope, _absorbed(mla, "k_b_proj_trans", q.dtype))
    fused[..., lat:] = q_pe
    # the new tokens' rows: position p of request b is slot block_table[b, p // page] * page + p % page
    page = cache.shape[1]
    pos = seqlens.long()[:, None] - sq + torch.arange(sq, device=q.device)  # [G, Sq]
    slots = (torch.gather(block_table.long(), 1, pos // page) * page + pos % page).reshape(-1)
    qk.mla_cache_write(cache, slots, compressed_kv, k_pe.reshape(t, r))
    out, _ = qk.mla_decode(fused.view(-1, sq, h, lat + r), cache, block_table, seqlens,
                           softmax_scale=mla.softmax_scale, head_dim_v=lat)
    out = torch.einsum("thl,hvl->thv", out.reshape(t, h, lat), _absorbed(mla, "v_b_proj", q.dtype))
    output.view(t, h, v).copy_(out)
    return output


def _mla_class(base):
    class MLA(base):
        """TensorRT-LLM's MLA with its generation tokens on mla_decode over the backend's paged latent cache."""

        def forward_absorption_generation(self, q, compressed_kv, k_pe, attn_metadata, output, position_ids=None,
                                          latent_cache=None, **kwargs):
            inputs = _mla_inputs(self, q, attn_metadata, position_ids) if not kwargs else "extra arguments"
            if isinstance(inputs, str):
                _log_once(f"quickllm: MLA decode with {inputs} runs TensorRT-LLM's kernels")
                return super().forward_absorption_generation(q, compressed_kv, k_pe, attn_metadata, output,
                                                             position_ids=position_ids, latent_cache=latent_cache,
                                                             **kwargs)
            return _mla_decode(self, inputs, q, compressed_kv, k_pe, output)

    return MLA


# A worker process that resolves an architecture imports the module that registered it, with
# TensorRT-LLM's model registry loaded; that is when this module registers on import (see above).
if _REGISTRY_MODULE in sys.modules:
    register()
