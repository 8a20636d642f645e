"""quickllm_kernels.integrations.vllm against vLLM 0.33's layer contracts, without vLLM installed.

The contracts the plugin relies on are pinned below as stub modules put into sys.modules: the class
names, method signatures and attribute names are vLLM 0.33.0's (the file each was read from is
named above it), and their forwards compute what vLLM's native forwards compute. Each test installs
fresh stubs, imports the plugin anew and calls register(); the replaced layers must then give the
stubs' (vLLM's) results: float32 within 1e-5 on the CPU. The test at the end runs against a real
vLLM where one is installed (the signatures of the stubs against vLLM's own, and register()).
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import inspect
import math
import pickle
import sys
import types
from abc import ABC, abstractmethod

import pytest
from engine_stubs import stub_module
import torch
import torch.nn.functional as F
from torch import nn

import quickllm_kernels as qk
from conftest import DEVICE, KERNEL_BACKENDS

PLUGIN = "quickllm_kernels.integrations.vllm"
TOL = dict(rtol=1e-5, atol=1e-5)


# ==== the pinned contracts ========================================================================


def _stub_vllm() -> dict:
    """Fresh stub modules (name -> module) with vLLM 0.33.0's names and signatures."""
    mods = {}

    def module(name, **attrs):
        return stub_module(mods, name, **attrs)

    module("vllm", __version__="0.33.0")
    for pkg in ("vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.fused_moe",
                "vllm.model_executor.layers.attention", "vllm.v1", "vllm.v1.attention",
                "vllm.v1.attention.backends"):
        module(pkg)

    # -- vllm/config/__init__.py (get_current_vllm_config), vllm/config/aux_output.py (AuxOutputConfig)
    aux = types.SimpleNamespace(enable_return_routed_experts=False)
    current = types.SimpleNamespace(aux_output_config=aux)
    module("vllm.config", get_current_vllm_config=lambda: current)

    # -- vllm/model_executor/custom_op.py
    op_registry, op_registry_oot = {}, {}

    class CustomOp(nn.Module):
        def __new__(cls, *args, **kwargs):
            op_cls_to_instantiate = op_registry_oot.get(cls.__name__, cls)
            return super().__new__(op_cls_to_instantiate)

        def __init__(self, *, enforce_enable: bool = False, compile_native: bool = False):
            super().__init__()
            self._enforce_enable = enforce_enable
            self._forward_method = self.dispatch_forward(compile_native=compile_native)

        def forward(self, *args, **kwargs):
            return self._forward_method(*args, **kwargs)

        def forward_native(self, *args, **kwargs):
            raise NotImplementedError

        def forward_cuda(self, *args, **kwargs):
            raise NotImplementedError

        def dispatch_forward(self, compile_native: bool):
            return self.forward_native  # custom ops off: vLLM's default with Inductor

        @classmethod
        def register(cls, name: str, dynamic_arg_dims=None):
            def decorator(op_cls):
                assert name not in op_registry, f"Duplicate op name: {name}"
                op_cls.name = name
                op_cls._dynamic_arg_dims = dynamic_arg_dims
                op_registry[name] = op_cls
                return op_cls
            return decorator

        @classmethod
        def register_oot(cls, _decorated_op_cls=None, name: str | None = None):
            def decorator(op_cls):
                reg_name = name if name is not None else cls.__name__
                assert reg_name not in op_registry_oot, f"Duplicate op name: {reg_name}"
                op_cls.name = reg_name
                op_registry_oot[reg_name] = op_cls
                return op_cls
            if _decorated_op_cls is None:
                return decorator
            if isinstance(_decorated_op_cls, type):
                return decorator(_decorated_op_cls)
            raise TypeError("Decorator can only be applied to classes.")

    module("vllm.model_executor.custom_op", CustomOp=CustomOp, op_registry=op_registry,
           op_registry_oot=op_registry_oot)

    # -- vllm/model_executor/layers/rotary_embedding/{common,base,llama3_rope,fope,deepseek_scaling_rope}.py
    def apply_rotary_emb(x, cos, sin, is_neox_style):  # ApplyRotaryEmb.forward_static
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        x1, x2 = torch.chunk(x, 2, dim=-1) if is_neox_style else (x[..., ::2], x[..., 1::2])
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return torch.cat((o1, o2), dim=-1) if is_neox_style else torch.stack((o1, o2), dim=-1).flatten(-2)

    def rotate_neox(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def rotate_gptj(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    def yarn_get_mscale(scale=1, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    def yarn_find_correction_range(low_rot, high_rot, dim, base=10000, max_position_embeddings=2048, truncate=True):
        def corr(rot):
            return (dim * math.log(max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(base))
        low, high = corr(low_rot), corr(high_rot)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def yarn_linear_ramp_mask(low, high, dim, dtype):
        if low == high:
            high += 0.001
        return torch.clamp((torch.arange(dim, dtype=dtype) - low) / (high - low), 0, 1)

    @CustomOp.register("rotary_embedding")
    class RotaryEmbeddingBase(CustomOp):
        def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int, base: float,
                     is_neox_style: bool, dtype: torch.dtype, init_cache: bool = True) -> None:
            super().__init__()
            self.head_size, self.rotary_dim = head_size, rotary_dim
            self.max_position_embeddings, self.base = max_position_embeddings, base
            self.is_neox_style, self.dtype = is_neox_style, dtype
            if init_cache:
                self.register_buffer("cos_sin_cache", self._compute_cos_sin_cache().to(dtype), persistent=False)

        def _compute_inv_freq(self, base: float) -> torch.Tensor:
            return 1.0 / (base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim))

        def _compute_cos_sin_cache(self) -> torch.Tensor:
            inv_freq = self._compute_inv_freq(self.base)
            freqs = torch.einsum("i,j -> ij", torch.arange(self.max_position_embeddings, dtype=torch.float), inv_freq)
            return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

        def _match_cos_sin_cache_dtype(self, query: torch.Tensor) -> torch.Tensor:
            cache = self.cos_sin_cache
            if cache.device == query.device and cache.dtype == query.dtype:
                return cache
            self.cos_sin_cache = cache.to(query.device, dtype=query.dtype)
            return self.cos_sin_cache

    class RotaryEmbedding(RotaryEmbeddingBase):
        def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int, base: float,
                     is_neox_style: bool, dtype: torch.dtype, init_cache: bool = True) -> None:
            super().__init__(head_size=head_size, rotary_dim=rotary_dim,
                             max_position_embeddings=max_position_embeddings, base=base,
                             is_neox_style=is_neox_style, dtype=dtype, init_cache=init_cache)

        @staticmethod
        def forward_static(positions, query, key, head_size, rotary_dim, cos_sin_cache, is_neox_style):
            positions = positions.flatten()
            t = positions.shape[0]
            cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)

            def one(x):
                shape = x.shape
                x = x.view(t, -1, head_size)
                rot = apply_rotary_emb(x[..., :rotary_dim], cos, sin, is_neox_style)
                return torch.cat((rot, x[..., rotary_dim:]), dim=-1).reshape(shape)

            return one(query), None if key is None else one(key)

        def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
            cache = self._match_cos_sin_cache_dtype(query)
            return self.forward_static(positions, query, key, self.head_size, self.rotary_dim, cache,
                                       self.is_neox_style)

        def forward_cuda(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
            q, k = self.forward_native(positions, query, key)  # ops.rotary_embedding: in place
            query.copy_(q)
            if key is not None:
                key.copy_(k)
            return query, key

    class Llama3RotaryEmbedding(RotaryEmbedding):
        def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int, base: float,
                     is_neox_style: bool, dtype: torch.dtype, scaling_factor: float, low_freq_factor: float,
                     high_freq_factor: float, orig_max_position: int) -> None:
            self.scaling_factor, self.low_freq_factor = scaling_factor, low_freq_factor
            self.high_freq_factor, self.orig_max_position = high_freq_factor, orig_max_position
            super().__init__(head_size, rotary_dim, max_position_embeddings, base, is_neox_style, dtype)

        def _compute_inv_freq(self, base: float) -> torch.Tensor:
            inv = super()._compute_inv_freq(base)
            orig, low, high = self.orig_max_position, self.low_freq_factor, self.high_freq_factor
            low_wl, high_wl = orig / low, orig / high
            wl = 2 * math.pi / inv
            smooth = (orig / wl - low) / (high - low)
            return torch.where(wl < high_wl, inv, torch.where(wl > low_wl, inv / self.scaling_factor,
                                                              (1 - smooth) * inv / self.scaling_factor + smooth * inv))

    class FourierRotaryEmbedding(RotaryEmbedding):  # a subclass with its own forward: stays vLLM's
        def forward_native(self, positions, query, key=None):
            return query, key

    class DeepseekScalingRotaryEmbedding(RotaryEmbeddingBase):
        def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int, base: float,
                     is_neox_style: bool, scaling_factor: float, dtype: torch.dtype, *, beta_fast: int = 32,
                     beta_slow: int = 1, mscale: float = 1, mscale_all_dim: float = 0, init_cache: bool = True) -> None:
            self.scaling_factor, self.beta_fast, self.beta_slow = scaling_factor, beta_fast, beta_slow
            self.mscale = float(yarn_get_mscale(scaling_factor, float(mscale))
                                / yarn_get_mscale(scaling_factor, float(mscale_all_dim)))
            super().__init__(head_size, rotary_dim, max_position_embeddings, base, is_neox_style, dtype,
                             init_cache=init_cache)

        def _compute_inv_freq(self, scaling_factor: float) -> torch.Tensor:
            pos_freqs = self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim)
            low, high = yarn_find_correction_range(self.beta_fast, self.beta_slow, self.rotary_dim, self.base,
                                                   self.max_position_embeddings)
            mask = 1 - yarn_linear_ramp_mask(low, high, self.rotary_dim // 2, dtype=torch.float)
            return (1.0 / (scaling_factor * pos_freqs)) * (1 - mask) + (1.0 / pos_freqs) * mask

        def _compute_cos_sin_cache(self) -> torch.Tensor:
            inv_freq = self._compute_inv_freq(self.scaling_factor)
            t = torch.arange(self.max_position_embeddings * self.scaling_factor, dtype=torch.float32)
            freqs = torch.einsum("i,j -> ij", t, inv_freq)
            return torch.cat((freqs.cos() * self.mscale, freqs.sin() * self.mscale), dim=-1)

        def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                           offsets: torch.Tensor | None = None):
            return self.forward_static(positions, query, key, self.head_size, self.rotary_dim, self.cos_sin_cache,
                                       self.is_neox_style, offsets)

        @staticmethod
        def forward_static(positions, query, key, head_size, rotary_dim, cos_sin_cache, is_neox_style, offsets=None):
            assert key is not None
            cos, sin = cos_sin_cache[torch.add(positions, offsets) if offsets is not None else positions].chunk(2, -1)
            if is_neox_style:
                cos, sin = torch.cat((cos, cos), -1).unsqueeze(-2), torch.cat((sin, sin), -1).unsqueeze(-2)
            else:
                cos, sin = cos.repeat_interleave(2, -1).unsqueeze(-2), sin.repeat_interleave(2, -1).unsqueeze(-2)
            rotate = rotate_neox if is_neox_style else rotate_gptj

            def one(x):
                rot = x[..., :rotary_dim] * cos + rotate(x[..., :rotary_dim]) * sin
                return torch.cat((rot, x[..., rotary_dim:]), dim=-1) if rotary_dim < head_size else rot

            return one(query), one(key)

        def forward_cuda(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                         offsets: torch.Tensor | None = None):
            return self.forward_native(positions, query, key, offsets)

    module("vllm.model_executor.layers.rotary_embedding", RotaryEmbedding=RotaryEmbedding,
           Llama3RotaryEmbedding=Llama3RotaryEmbedding, FourierRotaryEmbedding=FourierRotaryEmbedding,
           DeepseekScalingRotaryEmbedding=DeepseekScalingRotaryEmbedding)

    # -- vllm/model_executor/layers/layernorm.py (native math: vllm/ir/ops/layernorm.py)
    def rms_norm(x, weight, epsilon, variance_size=None):
        orig = x.dtype
        x = x.to(torch.float32)
        x_var = x if variance_size is None else x[..., :variance_size]
        x = x * torch.rsqrt(x_var.pow(2).mean(dim=-1, keepdim=True) + epsilon)
        if weight is not None:
            x = x.to(weight.dtype) * weight
        return x.to(orig)

    def fused_add_rms_norm(x, x_residual, weight, epsilon, variance_size=None):
        orig = x.dtype
        x = x.to(torch.float32) + x_residual.to(torch.float32)
        return rms_norm(x, weight, epsilon, variance_size).to(orig), x.to(orig)

    @CustomOp.register("rms_norm")
    class RMSNorm(CustomOp):
        def __init__(self, hidden_size: int, eps: float = 1e-6, var_hidden_size: int | None = None,
                     has_weight: bool = True, dtype: torch.dtype | None = None) -> None:
            super().__init__()
            self.hidden_size, self.variance_epsilon = hidden_size, eps
            self.variance_size_override = None if var_hidden_size == hidden_size else var_hidden_size
            self.has_weight = has_weight
            self.weight = torch.ones(hidden_size, dtype=dtype or torch.get_default_dtype())
            if self.has_weight:
                self.weight = nn.Parameter(self.weight)
            self.pass_weight = self.pass_weight_add = self.has_weight

        def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
            if residual is None:
                return rms_norm(x, self.weight.data if self.pass_weight else None, self.variance_epsilon,
                                self.variance_size_override)
            return fused_add_rms_norm(x, residual, self.weight.data if self.pass_weight_add else None,
                                      self.variance_epsilon, self.variance_size_override)

        def forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None = None):
            return self.forward_native(x, residual)

    @CustomOp.register("gemma_rms_norm")
    class GemmaRMSNorm(CustomOp):
        def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(hidden_size))
            self.variance_epsilon = eps

        def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
            weight = self.weight.float() + 1.0
            if residual is None:
                return rms_norm(x, weight, self.variance_epsilon)
            return fused_add_rms_norm(x, residual, weight, self.variance_epsilon)

        def forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None = None):
            return self.forward_native(x, residual)

    module("vllm.model_executor.layers.layernorm", RMSNorm=RMSNorm, GemmaRMSNorm=GemmaRMSNorm)

    # -- vllm/model_executor/layers/fused_moe/{activation,config}.py
    class MoEActivation(enum.Enum):
        SILU = "silu"
        GELU = "gelu"

    class RoutingMethodType(enum.IntEnum):
        Default = 0
        Renormalize = 1
        DeepSeekV3 = 2
        Llama4 = 3
        RenormalizeNaive = 4
        TopK = 5
        SigmoidRenorm = 6
        MiniMax2 = 7
        Sigmoid = 8
        Unspecified = 9
        DeepseekV4 = 100
        Custom = 101
        Simulated = 102

    def get_routing_method_type(scoring_func, top_k, renormalize, num_expert_group, has_e_score_bias):
        if has_e_score_bias:
            if scoring_func == "sigmoid" and renormalize:
                return RoutingMethodType.DeepSeekV3 if (num_expert_group or 0) > 0 else RoutingMethodType.MiniMax2
            return RoutingMethodType.Unspecified
        if scoring_func == "sigmoid":
            return RoutingMethodType.SigmoidRenorm if renormalize else RoutingMethodType.Sigmoid
        if scoring_func == "softmax":
            return RoutingMethodType.RenormalizeNaive if renormalize else RoutingMethodType.Default
        return RoutingMethodType.Unspecified

    @dataclasses.dataclass
    class FusedMoEParallelConfig:
        tp_size: int = 1
        pcp_size: int = 1
        dp_size: int = 1
        ep_size: int = 1
        tp_rank: int = 0
        pcp_rank: int = 0
        dp_rank: int = 0
        ep_rank: int = 0
        sp_size: int = 1
        use_ep: bool = False
        all2all_backend: str = "allgather_reducescatter"
        enable_eplb: bool = False

    @dataclasses.dataclass
    class FusedMoEConfig:
        num_experts: int
        experts_per_token: int
        hidden_dim: int
        intermediate_size: int
        num_local_experts: int
        num_logical_experts: int
        activation: MoEActivation
        device: torch.device | str
        routing_method: RoutingMethodType
        moe_parallel_config: FusedMoEParallelConfig
        in_dtype: torch.dtype
        has_bias: bool = False
        is_lora_enabled: bool = False
        has_hash_routing: bool = False
        require_decomposed_backend: bool = False
        swiglu_limit: float | None = None
        swiglu_alpha: float | None = None
        swiglu_beta: float | None = None
        activation_situ_beta: float | None = None
        activation_situ_linear_beta: float | None = None

        @property
        def intermediate_size_per_partition(self):
            return self.intermediate_size

    module("vllm.model_executor.layers.fused_moe.activation", MoEActivation=MoEActivation)
    module("vllm.model_executor.layers.fused_moe.config", RoutingMethodType=RoutingMethodType,
           FusedMoEConfig=FusedMoEConfig, FusedMoEParallelConfig=FusedMoEParallelConfig,
           get_routing_method_type=get_routing_method_type)

    # -- vllm/model_executor/layers/quantization/base_config.py, fused_moe/fused_moe_method_base.py,
    #    fused_moe/unquantized_fused_moe_method.py, fused_moe/routed_experts.py
    class QuantizeMethodBase(ABC):
        @abstractmethod
        def create_weights(self, layer, *weight_args, **extra_weight_attrs):
            raise NotImplementedError

        def process_weights_after_loading(self, layer: nn.Module) -> None:
            return

    class FusedMoEMethodBase(QuantizeMethodBase):
        def __init__(self, moe: FusedMoEConfig):
            super().__init__()
            self.moe, self.moe_quant_config, self.moe_kernel = moe, None, None

        def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
            return hidden_size, intermediate_size_per_partition

        @property
        def is_monolithic(self) -> bool:
            if self.moe_kernel is None:
                return self.experts_cls.is_monolithic() if hasattr(self, "experts_cls") else False
            return self.moe_kernel.is_monolithic

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            raise NotImplementedError

        def apply_monolithic(self, layer, x, router_logits, input_ids=None):
            raise NotImplementedError

    class TritonExperts:  # (vLLM's fused_moe kernel: dense math here)
        is_monolithic = staticmethod(lambda: False)

    class FusedMoEKernel:
        is_monolithic = False

        def apply(self, hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
                  global_num_experts, expert_map, shared_experts, shared_experts_input):
            return reference_experts(hidden_states, w1, w2, topk_weights, topk_ids, apply_router_weight_on_input)

    @CustomOp.register("unquantized_fused_moe")
    class UnquantizedFusedMoEMethod(FusedMoEMethodBase, CustomOp):
        def __init__(self, moe: FusedMoEConfig):
            super().__init__(moe)
            self.unquantized_backend, self.experts_cls = "TRITON", TritonExperts

        def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                           params_dtype: torch.dtype, **extra_weight_attrs):
            i2 = 2 * intermediate_size_per_partition
            layer.register_parameter("w13_weight", nn.Parameter(
                torch.empty(num_experts, i2, hidden_size, dtype=params_dtype), requires_grad=False))
            layer.register_parameter("w2_weight", nn.Parameter(torch.empty(
                num_experts, hidden_size, intermediate_size_per_partition, dtype=params_dtype), requires_grad=False))

        def process_weights_after_loading(self, layer) -> None:
            super().process_weights_after_loading(layer)
            self.moe_kernel = FusedMoEKernel()  # (_setup_kernel: may pad or reorder the weights)
            layer.vllm_kernel_set_up = True

        def get_fused_moe_quant_config(self, layer):
            return None

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            return self.forward(layer=layer, x=x, topk_weights=topk_weights, topk_ids=topk_ids,
                                shared_experts=shared_experts, shared_experts_input=shared_experts_input)

        def forward_native(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            assert self.moe_kernel is not None
            return self.moe_kernel.apply(hidden_states=x, w1=layer.w13_weight, w2=layer.w2_weight,
                                         topk_weights=topk_weights, topk_ids=topk_ids, activation=layer.activation,
                                         apply_router_weight_on_input=layer.apply_router_weight_on_input,
                                         global_num_experts=layer.global_num_experts, expert_map=None,
                                         shared_experts=shared_experts, shared_experts_input=shared_experts_input)

        def forward_cuda(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            return self.forward_native(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)

        def apply_monolithic(self, layer, x, router_logits, input_ids=None):
            assert self.is_monolithic
            raise NotImplementedError

    class RoutedExperts(nn.Module):
        def __init__(self, layer_name, params_dtype, moe_config, quant_config=None, *, renormalize=True,
                     use_grouped_topk=False, num_expert_group=None, topk_group=None, custom_routing_function=None,
                     scoring_func="softmax", routed_scaling_factor=1.0, e_score_correction_bias=None,
                     apply_router_weight_on_input=False, hash_indices_table=None):
            super().__init__()
            self.layer_name, self.moe_config, self.params_dtype = layer_name, moe_config, params_dtype
            self.global_num_experts = moe_config.num_experts
            self.top_k, self.activation = moe_config.experts_per_token, moe_config.activation
            self.renormalize, self.use_grouped_topk = renormalize, use_grouped_topk
            self.num_expert_group, self.topk_group = num_expert_group, topk_group
            self.custom_routing_function, self.scoring_func = custom_routing_function, scoring_func
            self.routed_scaling_factor, self.e_score_correction_bias = routed_scaling_factor, e_score_correction_bias
            self.apply_router_weight_on_input = apply_router_weight_on_input
            self.hash_indices_table = hash_indices_table
            self.routing_sink = None
            self.quant_method = UnquantizedFusedMoEMethod(moe_config)
            self.hidden_size, self.intermediate_size_per_partition = self.quant_method.maybe_roundup_sizes(
                moe_config.hidden_dim, moe_config.intermediate_size_per_partition, moe_config.in_dtype,
                moe_config.moe_parallel_config)
            self.quant_method.create_weights(
                layer=self, num_experts=moe_config.num_local_experts, hidden_size=self.hidden_size,
                intermediate_size_per_partition=self.intermediate_size_per_partition, params_dtype=params_dtype,
                weight_loader=None, global_num_experts=moe_config.num_experts)

        def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            assert not self.quant_method.is_monolithic
            return self.quant_method.apply(layer=self, x=x, topk_weights=topk_weights, topk_ids=topk_ids,
                                           shared_experts=shared_experts, shared_experts_input=shared_experts_input)

        def forward_monolithic(self, x, router_logits=None, input_ids=None):
            assert self.quant_method.is_monolithic
            return self.quant_method.apply_monolithic(layer=self, x=x, router_logits=router_logits,
                                                      input_ids=input_ids)

    module("vllm.model_executor.layers.fused_moe.fused_moe_method_base", FusedMoEMethodBase=FusedMoEMethodBase)
    module("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
           UnquantizedFusedMoEMethod=UnquantizedFusedMoEMethod)
    module("vllm.model_executor.layers.fused_moe.routed_experts", RoutedExperts=RoutedExperts)

    # -- vllm/v1/attention/backend.py, model_executor/layers/attention/mla_attention.py
    class AttentionCGSupport(enum.Enum):
        ALWAYS = 3
        UNIFORM_BATCH = 2
        UNIFORM_SINGLE_TOKEN_DECODE = 1
        NEVER = 0

    class AttentionType(str, enum.Enum):
        DECODER = "decoder"
        ENCODER = "encoder"

    class AttentionBackend(ABC):
        supported_dtypes = [torch.float16, torch.bfloat16]
        supported_kv_cache_dtypes = ["auto", "float16", "bfloat16"]

        @staticmethod
        @abstractmethod
        def get_name() -> str:
            raise NotImplementedError

        @classmethod
        def get_supported_head_sizes(cls) -> list[int]:
            return []

        @classmethod
        def supports_non_causal(cls) -> bool:
            return False

    class QueryLenSupport(enum.Enum):
        SINGLE_ONLY = "single_only"
        UNIFORM = "uniform"
        VARLEN = "varlen"

    class MLACommonMetadataBuilder:
        _cudagraph_support = AttentionCGSupport.NEVER
        query_len_support = QueryLenSupport.SINGLE_ONLY
        supports_non_causal_multi_token_decode = False

    @dataclasses.dataclass
    class MLACommonDecodeMetadata:
        block_table: torch.Tensor
        seq_lens: torch.Tensor
        dcp_tot_seq_lens: torch.Tensor | None

    @dataclasses.dataclass
    class MLACommonMetadata:
        num_reqs: int
        max_query_len: int
        max_seq_len: int
        num_actual_tokens: int
        query_start_loc: torch.Tensor
        slot_mapping: torch.Tensor
        num_decodes: int
        num_decode_tokens: int
        num_prefills: int
        causal: bool = True
        head_dim: int | None = None
        prefill: object = None
        decode: MLACommonDecodeMetadata | None = None

    class MLACommonBackend(AttentionBackend):
        @staticmethod
        def get_name() -> str:
            return "TRITON_MLA"

        @staticmethod
        def get_builder_cls():
            return MLACommonMetadataBuilder

        @classmethod
        def get_supported_head_sizes(cls) -> list[int]:
            return [320, 512, 576]

        @classmethod
        def is_mla(cls) -> bool:
            return True

    class MLACommonImpl:
        supports_dcp = False
        supports_pcp = True

        def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                     alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                     logits_soft_cap: float | None, attn_type: str, kv_sharing_target_layer_name: str | None,
                     q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                     qk_head_dim: int, v_head_dim: int, kv_b_proj, indexer: object | None = None,
                     q_pad_num_heads: int | None = None) -> None:
            if kv_sharing_target_layer_name is not None:
                raise NotImplementedError("KV sharing is not supported for MLA")
            self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
            self.num_kv_heads = num_kv_heads
            self.kv_cache_dtype, self.kv_lora_rank = kv_cache_dtype, kv_lora_rank
            self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
            self.qk_head_dim, self.v_head_dim, self.kv_b_proj = qk_head_dim, v_head_dim, kv_b_proj
            self.q_lora_rank, self.indexer, self.q_pad_num_heads = q_lora_rank, indexer, q_pad_num_heads
            self.supports_quant_query_input = True

        @abstractmethod
        def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
            raise NotImplementedError

    module("vllm.v1.attention.backend", AttentionCGSupport=AttentionCGSupport, AttentionType=AttentionType,
           AttentionBackend=AttentionBackend)
    module("vllm.model_executor.layers.attention.mla_attention", MLACommonBackend=MLACommonBackend,
           MLACommonImpl=MLACommonImpl, MLACommonMetadata=MLACommonMetadata,
           MLACommonDecodeMetadata=MLACommonDecodeMetadata, MLACommonMetadataBuilder=MLACommonMetadataBuilder,
           QueryLenSupport=QueryLenSupport)

    # -- vllm/v1/attention/backends/registry.py
    overrides = {}

    class AttentionBackendEnum(enum.Enum):
        TRITON_MLA = "vllm.v1.attention.backends.mla.triton_mla.TritonMLABackend"
        CUSTOM = None

        @classmethod
        def register(cls, name: str, value: str):
            if name in cls._member_map_:
                raise ValueError(f"Backend {name} already exists in {cls.__name__}.")
            if not name.isidentifier() or hasattr(cls, name):
                raise ValueError(f"Invalid or reserved backend name: {name}")
            member = object.__new__(cls)
            member._name_, member._value_ = name, value
            setattr(cls, name, member)
            cls._member_map_[name] = member
            cls._value2member_map_[value] = member
            cls._member_names_.append(name)
            return member

        def get_path(self, include_classname: bool = True) -> str:
            return overrides.get(self, self.value)

        def get_class(self):
            module_name, _, attr = self.get_path().rpartition(".")
            return getattr(importlib.import_module(module_name), attr)

    def register_backend(backend, class_path: str | None = None, is_mamba: bool = False):
        if isinstance(backend, str):
            backend = AttentionBackendEnum.register(backend, class_path or "")

        def decorator(cls):
            overrides[backend] = f"{cls.__module__}.{cls.__qualname__}"
            return cls

        if class_path is not None:
            overrides[backend] = class_path
            return lambda x: x
        return decorator

    module("vllm.v1.attention.backends.registry", AttentionBackendEnum=AttentionBackendEnum,
           register_backend=register_backend, _ATTN_OVERRIDES=overrides)
    return mods


def reference_experts(x, w13, w2, topk_weights, topk_ids, apply_router_weight_on_input=False):
    """out[t] = sum_j w[t, j] * w2[e] @ (silu(gate) * up), [gate; up] = w13[e] @ x[t], token by token."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e, w = int(topk_ids[t, j]), float(topk_weights[t, j])
            xt = x[t].float() * (w if apply_router_weight_on_input else 1.0)
            gate, up = (w13[e].float() @ xt).chunk(2)
            out[t] += (1.0 if apply_router_weight_on_input else w) * (w2[e].float() @ (F.silu(gate) * up))
    return out.to(x.dtype)


# ==== fixtures ====================================================================================


@pytest.fixture
def vllm_stubs(monkeypatch):
    """The stub modules in sys.modules (restored afterwards) and the plugin imported anew."""
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    stubs = _stub_vllm()
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    plugin = importlib.import_module(PLUGIN)
    ns = types.SimpleNamespace(plugin=plugin, **{n.rsplit(".", 1)[-1]: m for n, m in stubs.items()})
    ns.vllm_config, ns.moe_config = stubs["vllm.config"], stubs["vllm.model_executor.layers.fused_moe.config"]
    yield ns
    sys.modules.pop(PLUGIN, None)


@pytest.fixture
def vllm(vllm_stubs):
    """The stubs with register() called."""
    vllm_stubs.report = vllm_stubs.plugin.register()
    return vllm_stubs


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ==== register() ==================================================================================


def test_imports_without_vllm_and_register_needs_it(monkeypatch):
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    plugin = importlib.import_module(PLUGIN)
    assert plugin.registered() is None
    with pytest.raises(ImportError):
        plugin.register()
    sys.modules.pop(PLUGIN, None)


def test_entry_point():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = {e.name: e for e in eps}.get("quickllm")
    assert ep is not None, "the vllm.general_plugins entry point is not installed (pip install -e .)"
    assert ep.value == f"{PLUGIN}:register"


def test_register_is_idempotent(vllm):
    registry = vllm.custom_op.op_registry_oot
    before = dict(registry)
    members = list(vllm.registry.AttentionBackendEnum.__members__)
    assert vllm.plugin.register() is vllm.report
    assert vllm.plugin.registered() is vllm.report
    assert registry == before and list(vllm.registry.AttentionBackendEnum.__members__) == members
    assert set(vllm.report.replaced) == {"RotaryEmbedding", "Llama3RotaryEmbedding", "DeepseekScalingRotaryEmbedding",
                                         "RMSNorm", "GemmaRMSNorm", "UnquantizedFusedMoEMethod"}
    assert all(registry[name] is cls for name, cls in vllm.report.replaced.items())
    assert vllm.report.attention_backend == "QUICKLLM_MLA"
    assert vllm.report.skipped["YaRNScalingRotaryEmbedding"].startswith("not in")  # (absent from the stubs)
    assert "FourierRotaryEmbedding" not in registry


def test_register_after_a_reimport_and_beside_another_plugin(vllm_stubs):
    class Theirs(vllm_stubs.layernorm.RMSNorm):
        pass
    vllm_stubs.layernorm.RMSNorm.register_oot(Theirs)
    report = vllm_stubs.plugin.register()
    assert "already replaced by" in report.skipped["RMSNorm"] and "Theirs" in report.skipped["RMSNorm"]
    assert vllm_stubs.custom_op.op_registry_oot["RMSNorm"] is Theirs
    sys.modules.pop(PLUGIN)  # a second import of the plugin in the same process registers nothing twice
    again = importlib.import_module(PLUGIN).register()
    assert again is not report and again.replaced.keys() == report.replaced.keys()
    assert again.attention_backend == "QUICKLLM_MLA"


# ==== RoPE ========================================================================================


def _rope_inputs(t, hq, hk, head_size, seed, max_pos, dtype=torch.float32, flat=True):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + hk + hk) * head_size, generator=g).to(dtype)  # a fused projection's output
    q, k = qkv[:, : hq * head_size], qkv[:, hq * head_size: (hq + hk) * head_size]
    if not flat:
        q, k = q.view(t, hq, head_size), k.view(t, hk, head_size)
    positions = torch.randint(0, max_pos, (t,), generator=g)
    return positions, q, k


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("shape", [(19, 3, 1, 10, 6), (5, 4, 2, 16, 16), (1, 1, 1, 8, 2)])
@pytest.mark.parametrize("with_key", [True, False])
def test_rotary_embedding(vllm, neox, shape, with_key):
    t, hq, hk, head_size, rot = shape
    rope = vllm.rotary_embedding.RotaryEmbedding(head_size, rot, 64, 10000.0, neox, torch.float32)
    assert type(rope) is vllm.report.replaced["RotaryEmbedding"]
    positions, q, k = _rope_inputs(t, hq, hk, head_size, seed=t, max_pos=64)
    k = k if with_key else None
    want_q, want_k = vllm.rotary_embedding.RotaryEmbedding.forward_native(rope, positions, q, k)
    got_q, got_k = rope(positions, q, k)  # forward -> forward_native (custom ops off)
    torch.testing.assert_close(got_q, want_q, **TOL)
    assert got_q.shape == q.shape and (got_k is None) == (k is None)
    if with_key:
        torch.testing.assert_close(got_k, want_k, **TOL)
    q2, k2 = q.clone(), None if k is None else k.clone()  # forward_cuda: in place, as vLLM's kernel
    out_q, out_k = rope.forward_cuda(positions, q2, k2)
    assert out_q is q2 and out_k is k2
    torch.testing.assert_close(q2, want_q, **TOL)
    if with_key:
        torch.testing.assert_close(k2, want_k, **TOL)


def test_rotary_embedding_3d_heads_bf16_and_llama3_table(vllm):
    rope = vllm.rotary_embedding.Llama3RotaryEmbedding(32, 32, 128, 500000.0, True, torch.bfloat16, 8.0, 1.0, 4.0, 16)
    assert type(rope) is vllm.report.replaced["Llama3RotaryEmbedding"]
    positions, q, k = _rope_inputs(11, 4, 2, 32, seed=3, max_pos=128, dtype=torch.bfloat16, flat=False)
    got_q, got_k = rope(positions, q, k)
    # vLLM rotates in bf16 with its bf16 table; apply_rope in float32 from the same table: compare with
    # the float32 rotation of the same inputs, one bf16 rounding apart
    want_q, want_k = vllm.rotary_embedding.RotaryEmbedding.forward_static(
        positions, q.float(), k.float(), 32, 32, rope.cos_sin_cache.float(), True)
    torch.testing.assert_close(got_q.float(), want_q, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(got_k.float(), want_k, rtol=2 ** -7, atol=1e-2)
    assert got_q.dtype == torch.bfloat16 and got_q.shape == q.shape


def test_subclass_with_its_own_forward_stays_vllms(vllm):
    rope = vllm.rotary_embedding.FourierRotaryEmbedding(8, 8, 16, 10000.0, True, torch.float32)
    assert type(rope) is vllm.rotary_embedding.FourierRotaryEmbedding


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_deepseek_scaling_rotary_embedding(vllm, neox, partial):
    rot = 8
    head = 12 if partial else rot
    rope = vllm.rotary_embedding.DeepseekScalingRotaryEmbedding(
        head, rot, 32, 10000.0, neox, 4.0, torch.float32, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.7)
    assert type(rope) is vllm.report.replaced["DeepseekScalingRotaryEmbedding"]
    t, h = 13, 3
    g = torch.Generator().manual_seed(7)
    q_full = torch.randn(t, h, 16 + head, generator=g)  # [T, H, nope + rope] as vLLM's MLA views it
    q = q_full[..., 16:]
    k = torch.randn(t, 1, head, generator=g)
    positions = torch.randint(0, 100, (t,), generator=g)
    offsets = torch.randint(0, 20, (t,), generator=g)
    want = vllm.rotary_embedding.DeepseekScalingRotaryEmbedding.forward_native(rope, positions, q, k, offsets)
    got = rope(positions, q, k, offsets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    got = rope.forward_cuda(positions, q, k)
    want = vllm.rotary_embedding.DeepseekScalingRotaryEmbedding.forward_native(rope, positions, q, k)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_rope_bad_input_names_the_argument(vllm):
    rope = vllm.rotary_embedding.RotaryEmbedding(8, 8, 16, 10000.0, True, torch.float32)
    positions, q, k = _rope_inputs(4, 2, 1, 8, seed=0, max_pos=16)
    with pytest.raises(TypeError, match="positions"):
        rope(positions.float(), q, k)
    with pytest.raises(ValueError, match="query"):
        rope(positions, q[:, :-3], k)
    with pytest.raises(ValueError, match="key"):
        rope(positions, q, k.double())
    with pytest.raises(IndexError, match="positions"):
        rope(positions + 16, q, k)


# ==== RMSNorm =====================================================================================


@pytest.mark.parametrize("shape", [(19, 40), (3, 5, 24), (1, 7)])
def test_rms_norm(vllm, shape):
    norm = vllm.layernorm.RMSNorm(shape[-1], eps=1e-5)
    assert type(norm) is vllm.report.replaced["RMSNorm"]
    with torch.no_grad():
        norm.weight.copy_(_randn(shape[-1], seed=1))
    x, residual = _randn(*shape, seed=2), _randn(*shape, seed=3)
    want = vllm.layernorm.RMSNorm.forward_native(norm, x)
    torch.testing.assert_close(norm(x), want, **TOL)
    torch.testing.assert_close(norm.forward_cuda(x), want, **TOL)
    want_y, want_r = vllm.layernorm.RMSNorm.forward_native(norm, x, residual)
    x2, r2 = x.clone(), residual.clone()
    y, r = norm(x2, r2)  # vLLM's fused_add_rms_norm contract: in place
    assert y is x2 and r is r2
    torch.testing.assert_close(y, want_y, **TOL)
    torch.testing.assert_close(r, want_r, **TOL)


def test_rms_norm_variants_vllm_keeps(vllm):
    x = _randn(6, 16, seed=4)
    norm = vllm.layernorm.RMSNorm(16, var_hidden_size=8)  # variance over the first 8 dims: vLLM's forward
    torch.testing.assert_close(norm(x), vllm.layernorm.RMSNorm.forward_native(norm, x), rtol=0, atol=0)
    norm = vllm.layernorm.RMSNorm(16, has_weight=False)
    torch.testing.assert_close(norm(x), vllm.layernorm.RMSNorm.forward_native(norm, x), rtol=0, atol=0)
    norm = vllm.layernorm.RMSNorm(16, dtype=torch.float64)  # a weight of another dtype
    torch.testing.assert_close(norm(x), vllm.layernorm.RMSNorm.forward_native(norm, x), rtol=0, atol=0)


def test_gemma_rms_norm(vllm):
    norm = vllm.layernorm.GemmaRMSNorm(24, eps=1e-6)
    assert type(norm) is vllm.report.replaced["GemmaRMSNorm"]
    with torch.no_grad():
        norm.weight.copy_(_randn(24, seed=5) * 0.1)
    x, residual = _randn(9, 24, seed=6), _randn(9, 24, seed=7)
    torch.testing.assert_close(norm(x), vllm.layernorm.GemmaRMSNorm.forward_native(norm, x), **TOL)
    x0, r0 = x.clone(), residual.clone()
    got = norm(x, residual)  # out of place, as vLLM's GemmaRMSNorm
    want = vllm.layernorm.GemmaRMSNorm.forward_native(norm, x0, r0)
    assert torch.equal(x, x0) and torch.equal(residual, r0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


# ==== MoE =========================================================================================


def _vllm_route(layer, logits):
    """The routing vLLM 0.33's create_fused_moe_router builds for this layer (CUDA platform), computed
    as its routers compute it: fused_topk, fused_topk_bias, grouped_topk, a custom routing function."""
    e, k = logits.shape[1], layer.top_k
    scores = logits.float().softmax(-1) if layer.scoring_func == "softmax" else logits.float().sigmoid()
    bias, rsf = layer.e_score_correction_bias, layer.routed_scaling_factor
    n_group, topk_group = layer.num_expert_group or 0, layer.topk_group or 0
    if layer.custom_routing_function is not None:
        return layer.custom_routing_function(None, logits, k, layer.renormalize)
    degenerate = n_group <= 1 and topk_group <= 1
    if layer.use_grouped_topk and not degenerate and e > n_group and e % n_group == 0:  # grouped_topk
        choice = scores + bias if bias is not None else scores
        grouped = choice.view(-1, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if bias is not None else grouped.max(-1).values
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(e // n_group, 1), float("-inf"))
        ids = choice.topk(k, dim=-1)[1]
        w = scores.gather(1, ids)
    elif bias is not None:  # fused_topk_bias
        ids = (scores + bias).topk(k, dim=-1)[1]
        w = scores.gather(1, ids)
    else:  # fused_topk: no routed_scaling_factor
        w, ids = scores.topk(k, dim=-1)
        rsf = 1.0
    if layer.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return (w * rsf).float(), ids.int()


def _moe_run(layer, x, logits):
    """MoERunner._apply_quant_method: the method's own routing if monolithic, else the router's."""
    if layer.quant_method.is_monolithic:
        return layer.forward_monolithic(x=x, router_logits=logits)
    w, ids = _vllm_route(layer, logits)
    return layer.forward_modular(x=x, topk_weights=w, topk_ids=ids)


def _moe_layer(vllm, *, e=8, k=2, h=24, i=16, scoring="softmax", renormalize=True, bias=False, n_group=None,
               topk_group=None, rsf=1.0, custom=None, on_input=False, activation="silu", has_bias=False, seed=0,
               **par):
    cfgm = vllm.moe_config
    routing = cfgm.get_routing_method_type(scoring, k, renormalize, n_group, bias)
    if custom is not None:
        routing = cfgm.RoutingMethodType.Custom
    moe = cfgm.FusedMoEConfig(num_experts=e, experts_per_token=k, hidden_dim=h, intermediate_size=i,
                              num_local_experts=e, num_logical_experts=e,
                              activation=vllm.activation.MoEActivation(activation), device="cpu",
                              routing_method=routing, moe_parallel_config=cfgm.FusedMoEParallelConfig(**par),
                              in_dtype=torch.float32, has_bias=has_bias)
    layer = vllm.routed_experts.RoutedExperts(
        "model.layers.0.mlp.experts", torch.float32, moe, renormalize=renormalize,
        use_grouped_topk=n_group is not None, num_expert_group=n_group, topk_group=topk_group,
        custom_routing_function=custom, scoring_func=scoring, routed_scaling_factor=rsf,
        e_score_correction_bias=nn.Parameter(_randn(e, seed=seed + 1) * 0.1, requires_grad=False) if bias else None,
        apply_router_weight_on_input=on_input)
    with torch.no_grad():
        layer.w13_weight.copy_(_randn(e, 2 * i, h, seed=seed + 2) * 0.2)
        layer.w2_weight.copy_(_randn(e, h, i, seed=seed + 3) * 0.2)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _top1_sigmoid(hidden_states, gating_output, topk, renormalize):  # Llama-4's custom routing function
    w, ids = gating_output.topk(topk, dim=-1)
    return w.float().sigmoid(), ids.int()


MOE_CASES = {  # name: (layer options, whether the method routes with moe_route)
    "mixtral softmax top-2": (dict(e=8, k=2), True),
    "qwen3-moe no renormalize": (dict(e=6, k=3, renormalize=False), True),
    "deepseek-v3 sigmoid, bias, groups, scaling": (
        dict(e=8, k=2, scoring="sigmoid", bias=True, n_group=4, topk_group=2, rsf=2.5), True),
    "sigmoid, bias, no groups": (dict(e=5, k=2, scoring="sigmoid", bias=True, rsf=1.5), True),
    "deepseek-v2 softmax groups without bias": (dict(e=8, k=2, n_group=4, topk_group=2), False),
    "llama-4 custom top-1, weight on the input": (dict(e=4, k=1, custom=_top1_sigmoid, on_input=True), False),
    "tensor parallel shard": (dict(e=4, k=2, tp_size=2, tp_rank=1), True),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_method(vllm, case):
    opts, routes = MOE_CASES[case]
    layer = _moe_layer(vllm, **opts)
    method = layer.quant_method
    assert type(method) is vllm.report.replaced["UnquantizedFusedMoEMethod"]
    assert method.quickllm_unsupported is None and method.is_monolithic == routes
    assert not hasattr(layer, "vllm_kernel_set_up") and method.moe_kernel is None
    x, logits = _randn(19, 24, seed=11), _randn(19, opts["e"], seed=12)
    got = _moe_run(layer, x, logits)
    w, ids = _vllm_route(layer, logits)
    want = reference_experts(x, layer.w13_weight, layer.w2_weight, w, ids, layer.apply_router_weight_on_input)
    torch.testing.assert_close(got, want, **TOL)
    # the modular path too (vLLM's router chose): forward_native and forward_cuda
    for fwd in (method.forward_native, method.forward_cuda):
        torch.testing.assert_close(fwd(layer, x, w, ids, None, None), want, **TOL)


def test_moe_routed_experts_capture_keeps_vllms_router(vllm):
    vllm.vllm_config.get_current_vllm_config().aux_output_config.enable_return_routed_experts = True
    layer = _moe_layer(vllm, e=8, k=2)
    assert layer.quant_method.quickllm_unsupported is None and not layer.quant_method.is_monolithic
    x, logits = _randn(7, 24, seed=1), _randn(7, 8, seed=2)
    w, ids = _vllm_route(layer, logits)
    torch.testing.assert_close(_moe_run(layer, x, logits), reference_experts(x, layer.w13_weight, layer.w2_weight, w,
                                                                             ids), **TOL)


@pytest.mark.parametrize("opts, why", [
    (dict(activation="gelu"), "activation 'gelu'"),
    (dict(has_bias=True), "has_bias"),
    (dict(use_ep=True, ep_size=2), "use_ep"),
    (dict(dp_size=2), "dp_size"),
])
def test_moe_layers_it_leaves_to_vllm(vllm, opts, why):
    layer = _moe_layer(vllm, e=4, k=2, **opts)
    method = layer.quant_method
    assert why in method.quickllm_unsupported
    assert layer.vllm_kernel_set_up and not method.is_monolithic  # vLLM's own set-up and kernel
    x, logits = _randn(5, 24, seed=1), _randn(5, 4, seed=2)
    w, ids = _vllm_route(layer, logits)
    want = method.moe_kernel.apply(x, layer.w13_weight, layer.w2_weight, w, ids, None, False, 4, None, None, None)
    torch.testing.assert_close(_moe_run(layer, x, logits), want, rtol=0, atol=0)


def test_moe_bad_input_names_the_argument(vllm):
    layer = _moe_layer(vllm, e=4, k=2)
    x, logits = _randn(5, 24, seed=1), _randn(5, 4, seed=2)
    with pytest.raises(ValueError, match="hidden"):
        layer.forward_monolithic(x=x[:, :20], router_logits=logits)
    with pytest.raises(ValueError, match="router_logits"):
        layer.forward_monolithic(x=x, router_logits=logits[0])


# ==== MLA decode ==================================================================================

L, R = 32, 8  # kv_lora_rank, rope dim


def _mla_impl(vllm, heads=4, **overrides):
    backend = vllm.registry.AttentionBackendEnum["QUICKLLM_MLA"].get_class()
    args = dict(num_heads=heads, head_size=L + R, scale=0.3, num_kv_heads=1, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None,
                q_lora_rank=None, kv_lora_rank=L, qk_nope_head_dim=16, qk_rope_head_dim=R, qk_head_dim=16 + R,
                v_head_dim=16, kv_b_proj=None)
    args.update(overrides)
    return backend.get_impl_cls()(**args)


def _mla_batch(vllm, seq_lens, sq, heads, block_size=5, causal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    pages = [-(-n // block_size) for n in seq_lens]
    width = max(pages) + 1
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(b, width, dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages):
        table[i, :p] = order[used: used + p]
        used += p
    cache = torch.randn(num_blocks, block_size, L + R, generator=g)
    q = torch.randn(b * sq, heads, L + R, generator=g)
    mla = vllm.mla_attention
    decode = mla.MLACommonDecodeMetadata(block_table=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                         dcp_tot_seq_lens=None)
    meta = mla.MLACommonMetadata(num_reqs=b, max_query_len=sq, max_seq_len=max(seq_lens), num_actual_tokens=b * sq,
                                 query_start_loc=torch.arange(0, b * sq + 1, sq), slot_mapping=torch.zeros(0),
                                 num_decodes=b, num_decode_tokens=b * sq, num_prefills=0, causal=causal,
                                 decode=decode)
    return q, cache, meta


def _mla_reference(q, cache, meta, scale, sq):
    """Each query row against its request's cached rows (keys: all L + R values, values: the first L);
    with causal and sq > 1, row i of a request sees its first seq_len - sq + 1 + i tokens."""
    block_size = cache.shape[1]
    out, lse = torch.zeros(q.shape[0], q.shape[1], L), torch.zeros(q.shape[0], q.shape[1])
    for r in range(q.shape[0]):
        b, i = divmod(r, sq)
        n = int(meta.decode.seq_lens[b])
        seen = n - sq + 1 + i if meta.causal else n
        rows = torch.stack([cache[int(meta.decode.block_table[b, p // block_size]), p % block_size]
                            for p in range(seen)])
        s = (q[r] @ rows.T) * scale  # [H, seen]
        out[r] = s.softmax(-1) @ rows[:, :L]
        lse[r] = torch.logsumexp(s, -1)
    return out, lse


@pytest.mark.parametrize("sq, causal", [(1, True), (2, True), (3, False)])
def test_mla_decode_backend(vllm, sq, causal):
    impl = _mla_impl(vllm)
    q, cache, meta = _mla_batch(vllm, [7, 3, 12, 5], sq, heads=4, causal=causal, seed=sq)
    out, lse = impl.forward_mqa(q, cache, meta, layer=None)
    want_out, want_lse = _mla_reference(q, cache, meta, impl.scale, sq)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)
    # the latent and rope parts as a pair, as vLLM passes them without an FP8 query
    out2, _ = impl.forward_mqa((q[..., :L].contiguous(), q[..., L:]), cache, meta, layer=None)
    torch.testing.assert_close(out2, want_out, **TOL)


def test_mla_backend_survives_pickling_into_a_fresh_process(vllm, monkeypatch):
    # a process vLLM spawns unpickles its config (which names the backend) before it loads plugins
    data = pickle.dumps(vllm.registry.AttentionBackendEnum["QUICKLLM_MLA"])
    fresh = _stub_vllm()
    for name, mod in fresh.items():
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules.pop(PLUGIN)
    member = pickle.loads(data)
    assert member is fresh["vllm.v1.attention.backends.registry"].AttentionBackendEnum["QUICKLLM_MLA"]
    assert member.get_class() is sys.modules[PLUGIN].QuickLLMMLABackend


def test_mla_backend_class(vllm):
    backend = vllm.registry.AttentionBackendEnum["QUICKLLM_MLA"].get_class()
    assert backend is getattr(vllm.plugin, "QuickLLMMLABackend")
    assert issubclass(backend, vllm.mla_attention.MLACommonBackend) and backend.is_mla()
    assert backend.get_name() == "QUICKLLM_MLA" and backend.supports_non_causal()
    assert backend.get_supported_head_sizes() == [] and "fp8" not in backend.supported_kv_cache_dtypes
    builder = backend.get_builder_cls()
    assert issubclass(builder, vllm.mla_attention.MLACommonMetadataBuilder)
    assert builder._cudagraph_support == vllm.backend.AttentionCGSupport.UNIFORM_BATCH
    assert builder.query_len_support == vllm.mla_attention.QueryLenSupport.UNIFORM
    assert issubclass(backend.get_impl_cls(), vllm.mla_attention.MLACommonImpl)


@pytest.mark.parametrize("overrides, error, name", [
    (dict(kv_cache_dtype="fp8"), ValueError, "kv_cache_dtype"),
    (dict(alibi_slopes=[0.5]), NotImplementedError, "alibi_slopes"),
    (dict(sliding_window=64), NotImplementedError, "sliding_window"),
    (dict(logits_soft_cap=30.0), NotImplementedError, "logits_soft_cap"),
    (dict(attn_type="encoder"), NotImplementedError, "attn_type"),
    (dict(indexer=object()), NotImplementedError, "indexer"),
])
def test_mla_refuses_by_name(vllm, overrides, error, name):
    with pytest.raises(error, match=name):
        _mla_impl(vllm, **overrides)


def test_mla_bad_input_names_the_argument(vllm):
    impl = _mla_impl(vllm)
    q, cache, meta = _mla_batch(vllm, [4, 6], 1, heads=4)
    with pytest.raises(ValueError, match="rows"):
        impl.forward_mqa(q[:1], cache, meta, layer=None)
    with pytest.raises(TypeError, match="kv_cache"):
        impl.forward_mqa(q, cache.double(), meta, layer=None)
    meta.decode.block_table = meta.decode.block_table.long()
    with pytest.raises(TypeError, match="block_table"):
        impl.forward_mqa(q, cache, meta, layer=None)


# ==== under vLLM's torch.compile (custom ops off: forward_native is traced, fullgraph) ===============


def test_forward_native_compiles_fullgraph(vllm):
    rotary = vllm.rotary_embedding
    rope = rotary.RotaryEmbedding(16, 8, 32, 10000.0, True, torch.float32)
    ds = rotary.DeepseekScalingRotaryEmbedding(8, 8, 16, 10000.0, False, 2.0, torch.float32)
    norm = vllm.layernorm.RMSNorm(24)

    def layer(positions, q, k, q_pe, k_pe, x, residual):
        q, k = rope(positions, q, k)
        q_pe, k_pe = ds(positions, q_pe, k_pe)
        y, residual = norm(x, residual)
        return q, k, q_pe, k_pe, norm(y), residual

    def inputs():
        positions, q, k = _rope_inputs(5, 3, 1, 16, seed=1, max_pos=32)
        return (positions, q, k, _randn(5, 2, 12, seed=2)[..., 4:], _randn(5, 1, 8, seed=3), _randn(5, 24, seed=4),
                _randn(5, 24, seed=5))

    with torch.inference_mode():  # (vLLM runs its model under inference mode)
        want = layer(*inputs())
        got = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")(*inputs())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


# ==== every layer on each kernel backend (Triton under the interpreter on a CPU) ====================


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layers_on_each_backend(vllm, backend_name):
    rotary = vllm.rotary_embedding
    rope = rotary.RotaryEmbedding(16, 8, 32, 10000.0, True, torch.float32).to(DEVICE)
    positions, q, k = (t.to(DEVICE) for t in _rope_inputs(5, 3, 1, 16, seed=1, max_pos=32))
    ds = rotary.DeepseekScalingRotaryEmbedding(8, 8, 16, 10000.0, False, 2.0, torch.float32).to(DEVICE)
    q_mla = _randn(5, 2, 12, seed=2).to(DEVICE)[..., 4:]  # a strided view, as vLLM's MLA passes it
    k_pe = _randn(5, 1, 8, seed=3).to(DEVICE)
    norm = vllm.layernorm.RMSNorm(24).to(DEVICE)
    x, residual = _randn(5, 24, seed=4).to(DEVICE), _randn(5, 24, seed=5).to(DEVICE)
    layer = _moe_layer(vllm, e=8, k=2, scoring="sigmoid", bias=True, n_group=4, topk_group=2, rsf=2.5).to(DEVICE)
    logits = _randn(5, 8, seed=6).to(DEVICE)
    impl = _mla_impl(vllm)
    mq, cache, meta = _mla_batch(vllm, [6, 9], 2, heads=4, seed=7)
    meta.decode.block_table, meta.decode.seq_lens = meta.decode.block_table.to(DEVICE), meta.decode.seq_lens.to(DEVICE)
    mq, cache = mq.to(DEVICE), cache.to(DEVICE)
    with qk.use_backend(backend_name):
        got_rope = rope(positions, q, k), rope(positions, q, None)
        got_ds = ds(positions, q_mla, k_pe)
        got_norm = norm(x.clone(), residual.clone())
        got_moe = _moe_run(layer, x, logits)
        got_mla = impl.forward_mqa(mq, cache, meta, layer=None)
        ran = qk.last_backends()
    assert all(ran[op] == backend_name for op in ("apply_rope", "add_rms_norm_", "moe_route", "grouped_mm",
                                                  "mla_decode")), ran
    tol = dict(rtol=2e-5, atol=2e-5)
    for got, want in ((got_rope[0], rotary.RotaryEmbedding.forward_native(rope, positions, q, k)),
                      (got_rope[1][0], rotary.RotaryEmbedding.forward_native(rope, positions, q, None)[0]),
                      (got_ds, rotary.DeepseekScalingRotaryEmbedding.forward_native(ds, positions, q_mla, k_pe)),
                      (got_norm, vllm.layernorm.RMSNorm.forward_native(norm, x, residual))):
        torch.testing.assert_close(got, want, **tol)
    w, ids = _vllm_route(layer, logits)
    want_moe = reference_experts(x.cpu(), layer.w13_weight.cpu(), layer.w2_weight.cpu(), w.cpu(), ids.cpu())
    torch.testing.assert_close(got_moe.cpu(), want_moe, **tol)
    meta.decode.block_table, meta.decode.seq_lens = meta.decode.block_table.cpu(), meta.decode.seq_lens.cpu()
    want_mla = _mla_reference(mq.cpu(), cache.cpu(), meta, impl.scale, 2)
    for got, want in zip(got_mla, want_mla):
        torch.testing.assert_close(got.cpu(), want, **tol)


# ==== against a real vLLM =========================================================================

PINNED = {  # module: {class: [methods whose signatures the plugin relies on]}
    "vllm.model_executor.custom_op": {"CustomOp": ["register_oot", "forward_native", "forward_cuda"]},
    "vllm.model_executor.layers.rotary_embedding": {
        "RotaryEmbedding": ["__init__", "forward_native", "forward_cuda", "_match_cos_sin_cache_dtype"],
        "Llama3RotaryEmbedding": ["__init__"],
        "DeepseekScalingRotaryEmbedding": ["__init__", "forward_native", "forward_cuda"]},
    "vllm.model_executor.layers.layernorm": {"RMSNorm": ["__init__", "forward_native", "forward_cuda"],
                                             "GemmaRMSNorm": ["__init__", "forward_native", "forward_cuda"]},
    "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method": {
        "UnquantizedFusedMoEMethod": ["__init__", "create_weights", "maybe_roundup_sizes",
                                      "process_weights_after_loading", "forward_native", "forward_cuda",
                                      "apply", "apply_monolithic"]},
    "vllm.model_executor.layers.attention.mla_attention": {"MLACommonImpl": ["__init__", "forward_mqa"]},
}


def _params(fn):
    return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]


def test_pinned_contracts_match_the_installed_vllm(monkeypatch):
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    real = pytest.importorskip("vllm")
    stubs = _stub_vllm()
    for module_name, classes in PINNED.items():
        module = importlib.import_module(module_name)
        for cls_name, methods in classes.items():
            for m in methods:
                want = getattr(getattr(stubs[module_name], cls_name), m)
                assert _params(getattr(getattr(module, cls_name), m)) == _params(want), f"{cls_name}.{m}"
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    report = importlib.import_module(PLUGIN).register()
    from vllm.model_executor.custom_op import op_registry_oot
    for name in ("RotaryEmbedding", "DeepseekScalingRotaryEmbedding", "RMSNorm", "UnquantizedFusedMoEMethod"):
        assert op_registry_oot[name] is report.replaced[name], (name, report.skipped.get(name))
    assert report.vllm_version == real.__version__
    sys.modules.pop(PLUGIN, None)
