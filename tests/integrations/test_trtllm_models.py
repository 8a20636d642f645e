"""quickllm_kernels.integrations.trtllm_models against TensorRT-LLM's PyTorch-backend contracts, without it.

The parts of TensorRT-LLM the model modules rely on are pinned below as stub modules put into
sys.modules: class names, __init__ / forward signatures and attribute names are those of TensorRT-LLM's
main branch (the file and commit each was read from are named above it), and their forwards compute
what TensorRT-LLM's PyTorch (non-kernel) paths compute. Each test installs fresh stubs and imports the
module anew (which registers its classes at import, as in an engine worker); the layers it replaces
must then give the stubs' (the backend's) results, float32 on the CPU within 1e-5 (FP8 paths within
bf16 rounding), whole tiny Qwen2 and Mixtral models built from the stubs must match transformers'
models, and DeepSeek-V3's MoE block transformers' block. The test at the end runs against a real
TensorRT-LLM where one is installed.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import math
import pickle
import re
import sys
import types
from typing import Dict, Generic, List, Optional, TypeVar

import pytest
from engine_stubs import stub_module
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import quickllm_kernels as qk
from conftest import DEVICE, KERNEL_BACKENDS

PLUGIN = "quickllm_kernels.integrations.trtllm_models"
TOL = dict(rtol=1e-5, atol=1e-5)
ARCHS = ("Qwen2ForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM")


# ==== the pinned contracts ========================================================================


def _stub_trtllm() -> dict:
    """Fresh stub modules (name -> module) with TensorRT-LLM main's names and signatures."""
    mods = {}

    def module(name, **attrs):
        return stub_module(mods, name, own=True, **attrs)

    module("tensorrt_llm", __version__="1.3.0rc0")
    for pkg in ("tensorrt_llm._torch", "tensorrt_llm._torch.attention", "tensorrt_llm._torch.attention_backend",
                "tensorrt_llm._torch.modules", "tensorrt_llm._torch.pyexecutor", "tensorrt_llm.models",
                "tensorrt_llm.quantization"):
        module(pkg)

    # -- tensorrt_llm/mapping.py (the fields and predicates the models read)
    class Mapping:
        def __init__(self, world_size=1, rank=0, gpus_per_node=8, *, cp_size=1, cp_config=None, tp_size=1,
                     pp_size=1, moe_tp_size=-1, moe_ep_size=-1, enable_attention_dp=False):
            self.world_size, self.rank, self.gpus_per_node = world_size, rank, gpus_per_node
            self.cp_size, self.cp_config, self.tp_size, self.pp_size = cp_size, cp_config or {}, tp_size, pp_size
            self.moe_ep_size = 1 if moe_ep_size == -1 else moe_ep_size
            self.moe_tp_size = tp_size // self.moe_ep_size if moe_tp_size == -1 else moe_tp_size
            self.enable_attention_dp = enable_attention_dp
            self.tp_rank, self.pp_rank, self.cp_rank = rank % tp_size, 0, 0

        def has_pp(self):
            return self.pp_size > 1

        def has_tp(self):
            return self.tp_size > 1

        def has_cp_helix(self):
            return self.cp_size > 1

        def is_first_pp_rank(self):
            return True

        def is_last_pp_rank(self):
            return True

        def is_multi_node(self):
            return False

    module("tensorrt_llm.mapping", Mapping=Mapping)

    # -- tensorrt_llm/quantization/mode.py (QuantAlgo), tensorrt_llm/models/modeling_utils.py (QuantConfig)
    class QuantAlgo(str, enum.Enum):
        FP8 = "FP8"
        FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
        NVFP4 = "NVFP4"

    @dataclasses.dataclass
    class QuantConfig:
        quant_algo: Optional[QuantAlgo] = None
        kv_cache_quant_algo: Optional[QuantAlgo] = None
        group_size: int = 128
        exclude_modules: Optional[List[str]] = None

        def is_module_excluded_from_quantization(self, name: str) -> bool:
            return any(name.endswith(m) for m in self.exclude_modules or [])

    module("tensorrt_llm.quantization.mode", QuantAlgo=QuantAlgo)
    module("tensorrt_llm.models.modeling_utils", QuantConfig=QuantConfig)

    # -- tensorrt_llm/_torch/model_config.py (the fields the modules read)
    @dataclasses.dataclass(kw_only=True)
    class ModelConfig:
        pretrained_config: object = None
        mapping: Mapping = dataclasses.field(default_factory=Mapping)
        quant_config: QuantConfig = dataclasses.field(default_factory=QuantConfig)
        quant_config_dict: Optional[Dict[str, QuantConfig]] = None
        attn_backend: str = "TRTLLM"
        moe_backend: str = "CUTLASS"
        skip_create_weights_in_init: bool = False
        spec_config: object = None
        lora_config: object = None
        moe_load_balancer: object = None
        extra_attrs: Dict = dataclasses.field(default_factory=dict)

        def get_quant_config(self, name: Optional[str] = None) -> QuantConfig:
            return self.quant_config

    module("tensorrt_llm._torch.model_config", ModelConfig=ModelConfig)

    # -- tensorrt_llm/functional.py (RopeEmbeddingUtils.create_sinusoidal_positions_yarn, torch version)
    def create_sinusoidal_positions_yarn(num_pos, dim, base=10000, scaling_factor=1.0,
                                         original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                                         mscale=1.0, mscale_all_dim=1.0, duplicate_data=True):
        def correction_dim(rot):
            return (dim * math.log(original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)

        def get_mscale(scale, m):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv_freq_mask = 1 - ramp
        inv_freq = (1.0 / (scaling_factor * pos_freqs)) * (1 - inv_freq_mask) + (1.0 / pos_freqs) * inv_freq_mask
        sinusoid = torch.einsum("i,j -> ij", torch.arange(num_pos, dtype=torch.float32), inv_freq).unsqueeze(-1)
        m = float(get_mscale(scaling_factor, mscale) / get_mscale(scaling_factor, mscale_all_dim))
        emb = torch.cat((sinusoid, sinusoid), dim=-2) if duplicate_data else sinusoid
        return inv_freq, torch.cat((torch.cos(emb) * m, torch.sin(emb) * m), dim=-1).reshape(1, -1)

    def create_sinusoidal_positions_for_attention_plugin(num_pos, dim, theta=10000.0, duplicate_data=False):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        sinusoid = torch.einsum("i,j -> ij", torch.arange(num_pos, dtype=torch.float32), inv_freq).unsqueeze(-1)
        emb = torch.cat((sinusoid, sinusoid), dim=-2) if duplicate_data else sinusoid
        return inv_freq, torch.cat((torch.cos(emb), torch.sin(emb)), dim=-1).reshape(1, -1)

    # -- tensorrt_llm/_torch/attention_backend/interface.py (RopeParams, PositionalEmbeddingParams,
    #    AttentionForwardArgs, AttentionMetadata), tensorrt_llm/_torch/metadata.py (KVCacheParams)
    class RotaryScalingType(enum.IntEnum):
        none = 0
        linear = 1
        dynamic = 2
        longrope = 3
        llama3 = 4
        yarn = 5

    class PositionEmbeddingType(enum.IntEnum):
        rope_gptj = 1
        rope_gpt_neox = 2
        yarn = 5

        def is_rope(self):
            return True

        def is_mrope(self):
            return False

    @dataclasses.dataclass(kw_only=True, unsafe_hash=True)
    class RopeParams:
        dim: int = 0
        theta: float = 10000.0
        alpha: float = 1.0
        scale_type: RotaryScalingType = RotaryScalingType.none
        scale: float = 1.0
        max_positions: int = 1024
        original_max_positions: int = 1024
        beta_fast: int = 32
        beta_slow: int = 1
        mscale: float = 1.0
        mscale_all_dim: float = 0.0
        duplicate_data: bool = False

        @staticmethod
        def from_config(config) -> "RopeParams":
            p = RopeParams()
            head_dim = getattr(config, "head_dim", None)
            if not isinstance(head_dim, int):
                head_dim = config.hidden_size // config.num_attention_heads
            scaling = getattr(config, "rope_scaling", None) or {}
            p.max_positions = config.max_position_embeddings
            p.theta = getattr(config, "rope_theta", None) or scaling.get("rope_theta", 10000.0)
            qk_rope = getattr(config, "qk_rope_head_dim", None)
            p.dim = qk_rope or int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
            p.duplicate_data = qk_rope is not None
            kind = scaling.get("type") or scaling.get("rope_type")
            if kind == "yarn":
                p.scale_type, p.scale = RotaryScalingType.yarn, scaling.get("factor", 1.0)
                p.original_max_positions = scaling.get("original_max_position_embeddings", None) or 1024
                p.beta_fast, p.beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
                p.mscale, p.mscale_all_dim = scaling.get("mscale", 1.0), scaling.get("mscale_all_dim", 0.0)
            return p

        def create_rope_const_params(self, interleave: bool = True):
            if self.scale_type == RotaryScalingType.yarn:
                inv_freq, cos_sin = create_sinusoidal_positions_yarn(
                    self.max_positions, self.dim, self.theta, self.scale, self.original_max_positions, self.beta_fast,
                    self.beta_slow, self.mscale, self.mscale_all_dim, self.duplicate_data)
            else:
                inv_freq, cos_sin = create_sinusoidal_positions_for_attention_plugin(
                    self.max_positions, self.dim, self.theta, duplicate_data=self.duplicate_data)
            if not interleave:
                cos_sin = cos_sin.reshape(self.max_positions, -1, 2)[:, : self.dim // 2, :]
                cos_sin = cos_sin.permute(0, 2, 1).reshape(1, -1)
            return inv_freq, cos_sin.contiguous()

    @dataclasses.dataclass(kw_only=True, frozen=True)
    class PositionalEmbeddingParams:
        type: PositionEmbeddingType
        embedder: object = None
        rope: Optional[RopeParams] = None
        is_neox: bool = True
        mrope_section: Optional[List[int]] = None
        mrope_interleaved: bool = False

    class PredefinedAttentionMask(str, enum.Enum):
        CAUSAL = "causal"
        FULL = "full"

    @dataclasses.dataclass(kw_only=True)
    class AttentionForwardArgs:
        attention_mask: PredefinedAttentionMask = PredefinedAttentionMask.CAUSAL
        output: Optional[torch.Tensor] = None

    @dataclasses.dataclass
    class KVCacheParams:
        use_cache: bool = True
        num_cached_tokens_per_seq: List[int] = dataclasses.field(default_factory=list)

    class AttentionMetadata:
        """seq_lens (host) in request order, contexts first; the counts derived from it, as in the source."""

        def __init__(self, *, seq_lens, num_contexts, request_ids=None, kv_cache_manager=None,
                     kv_cache_params=None, position_ids=None, all_rank_num_tokens=None):
            self.seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32)
            self.num_contexts = num_contexts
            self.num_generations = self.seq_lens.shape[0] - num_contexts
            self.num_ctx_tokens = int(self.seq_lens[:num_contexts].sum())
            self.num_tokens = int(self.seq_lens.sum())
            self.request_ids, self.kv_cache_manager = request_ids, kv_cache_manager
            self.kv_cache_params, self.position_ids = kv_cache_params, position_ids
            self.all_rank_num_tokens = all_rank_num_tokens

        @property
        def num_seqs(self):
            return self.seq_lens.shape[0]

    class TrtllmAttentionMetadata(AttentionMetadata):
        """kv_lens_cuda (cached + new tokens per request) and, with FlashMLA's metadata on,
        block_ids_per_seq: the generation requests' block ids, first rows (trtllm.py prepare_flash_mla)."""
        enable_flash_mla: bool = False
        kv_lens_cuda: Optional[torch.Tensor] = None
        block_ids_per_seq: Optional[torch.Tensor] = None

    module("tensorrt_llm._torch.attention_backend.interface", RopeParams=RopeParams,
           PositionalEmbeddingParams=PositionalEmbeddingParams, PredefinedAttentionMask=PredefinedAttentionMask,
           AttentionForwardArgs=AttentionForwardArgs, AttentionMetadata=AttentionMetadata,
           RotaryScalingType=RotaryScalingType, PositionEmbeddingType=PositionEmbeddingType)
    module("tensorrt_llm._torch.attention_backend.trtllm", TrtllmAttentionMetadata=TrtllmAttentionMetadata)
    module("tensorrt_llm._torch.metadata", KVCacheParams=KVCacheParams)

    # -- tensorrt_llm/_torch/pyexecutor/resource_manager.py (KVCacheManager: get_buffers,
    #    get_batch_cache_indices, get_block_ids_per_seq); the pool of one layer is
    #    [num_blocks, kv_factor, tokens_per_block, num_kv_heads, head_dim] (MLA: kv_factor 1, one head)
    class KVCacheManager:
        def __init__(self, *, num_blocks, tokens_per_block, head_dim, dtype, num_layers=1, kv_factor=1,
                     num_kv_heads=1, seed=0):
            self.tokens_per_block, self.head_dim, self.kv_factor = tokens_per_block, head_dim, kv_factor
            self.num_extra_kv_tokens = 0
            g = torch.Generator().manual_seed(seed)
            self.pools = [torch.randn(num_blocks, kv_factor, tokens_per_block, num_kv_heads, head_dim, generator=g)
                          .to(dtype) for _ in range(num_layers)]
            self._order = torch.randperm(num_blocks, generator=g).tolist()
            self._blocks = {}

        def add_sequence(self, request_id, num_tokens):  # (the resource manager's, before the forward)
            need = -(-num_tokens // self.tokens_per_block)
            self._blocks[request_id] = [self._order.pop() for _ in range(need)]

        def get_buffers(self, layer_idx: int) -> Optional[torch.Tensor]:
            return self.pools[layer_idx]

        def get_batch_cache_indices(self, request_ids: List[int]) -> List[List[int]]:
            return [list(self._blocks[r]) for r in request_ids]

        def get_block_ids_per_seq(self, request_ids: List[int]) -> torch.Tensor:
            rows = [torch.tensor(b, dtype=torch.int) for b in self.get_batch_cache_indices(request_ids)]
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)

    module("tensorrt_llm._torch.pyexecutor.resource_manager", KVCacheManager=KVCacheManager)

    # -- tensorrt_llm/_torch/modules/rms_norm.py (b35ac1b64368, with the later quantize_type /
    #    use_cuda_tile / return_hp_output / return_norm_out): the PyTorch path of forward
    class RMSNorm(nn.Module):
        _ARGUMENT_NOT_SPECIFIED_SENTINEL = ...

        def __init__(self, *, hidden_size: int, eps: float, dtype: Optional[torch.dtype] = None, device=None,
                     has_weights: bool = True, use_gemma: bool = False, quantize_type: Optional[str] = None,
                     use_cuda_tile: bool = False, return_hp_output: bool = False):
            super().__init__()
            init = torch.zeros if use_gemma else torch.ones
            if has_weights:
                self.weight = nn.Parameter(init(hidden_size, dtype=dtype, device=device))
            else:
                self.register_buffer("weight", torch.ones(hidden_size, dtype=dtype, device=device), persistent=False)
            self.variance_epsilon = eps
            self.use_gemma, self.use_cuda_tile = use_gemma, use_cuda_tile
            self.is_nvfp4 = quantize_type == "nvfp4"
            self.return_hp_output = return_hp_output

        def forward(self, hidden_states, residual=_ARGUMENT_NOT_SPECIFIED_SENTINEL, *, return_norm_out: bool = False):
            has_residual = residual is not self._ARGUMENT_NOT_SPECIFIED_SENTINEL
            if not has_residual:
                residual = None
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            if residual is not None:
                hidden_states = hidden_states + residual.to(torch.float32)
                residual = hidden_states.to(input_dtype)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            if not self.use_gemma:
                hidden_states = self.weight * hidden_states.to(input_dtype)
            else:
                hidden_states = (self.weight + 1) * hidden_states.to(input_dtype)
            return (hidden_states, residual) if has_residual else hidden_states

    module("tensorrt_llm._torch.modules.rms_norm", RMSNorm=RMSNorm)

    # -- tensorrt_llm/_torch/attention/rotary_embedding.py (047098b74c51): the PyTorch path of forward
    class RotaryEmbedding(nn.Module):
        def __init__(self, rope_params: RopeParams, *, head_dim: int, is_neox: bool = True, inverse: bool = False):
            super().__init__()
            self.rope_params, self.head_dim, self.is_neox, self.inverse = rope_params, head_dim, is_neox, inverse
            self.max_positions = rope_params.max_positions
            self.rotary_cos_sin = rope_params.create_rope_const_params(interleave=False)[1].reshape(
                rope_params.max_positions, 2, -1)

        def forward(self, position_ids: torch.Tensor, targets: List[torch.Tensor]) -> List[torch.Tensor]:
            q_or_k = targets[0]
            cos_sin = self.rotary_cos_sin[position_ids.view(-1)]
            cos, sin = cos_sin[:, 0, :].to(q_or_k.dtype).unsqueeze(0), cos_sin[:, 1, :].to(q_or_k.dtype).unsqueeze(0)
            seq_len = q_or_k.shape[0]

            def rope_target(target):
                target = target.view(1, seq_len, -1, self.head_dim).transpose(1, 2)
                target = RotaryEmbedding.apply_rotary_pos_emb(target, cos, sin, is_neox=self.is_neox,
                                                              inverse=self.inverse)
                return target.transpose(1, 2).contiguous().view(seq_len, -1)

            return [rope_target(t) for t in targets]

        @staticmethod
        def apply_rotary_pos_emb(q_or_k, cos, sin, unsqueeze_dim=1, is_neox=True, inverse=False):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            rot_dim = cos.shape[-1] * 2
            q_or_k, q_or_k_pass = q_or_k[..., :rot_dim], q_or_k[..., rot_dim:]
            if is_neox:
                x1, x2 = q_or_k[..., : q_or_k.shape[-1] // 2], q_or_k[..., q_or_k.shape[-1] // 2:]
            else:
                x1, x2 = q_or_k[..., ::2], q_or_k[..., 1::2]
            if inverse:
                o1, o2 = x1 * cos + x2 * sin, x2 * cos - x1 * sin
            else:
                o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            if is_neox:
                return torch.cat((o1, o2, q_or_k_pass), dim=-1)
            return torch.cat((torch.stack((o1, o2), dim=-1).flatten(-2), q_or_k_pass), dim=-1)

    class MRotaryEmbedding(RotaryEmbedding):
        def __init__(self, rope_params: RopeParams, *, head_dim: int, mrope_section: List[int], is_neox: bool = True,
                     mrope_interleaved: bool = False):
            super().__init__(rope_params, head_dim=head_dim, is_neox=is_neox)
            self.mrope_section, self.mrope_interleaved = mrope_section, mrope_interleaved

    module("tensorrt_llm._torch.attention.rotary_embedding", RotaryEmbedding=RotaryEmbedding,
           MRotaryEmbedding=MRotaryEmbedding)

    # -- tensorrt_llm/_torch/modules/linear.py (Linear.apply_linear -> quant_method.apply(module, input, bias);
    #    UnquantizedLinearMethod, FP8BlockScalesLinearMethod: weight fp8 [N, K], weight_scale float32
    #    [ceil(N/128), ceil(K/128)], the input quantised per 1x128 group (fp8_quantize_1x128, amax / 448))
    class TensorParallelMode(str, enum.Enum):
        ROW = "row"
        COLUMN = "column"

    class WeightMode(str, enum.Enum):
        VANILLA = "vanilla"
        FUSED_QKV_LINEAR = "fused_qkv_linear"
        FUSED_GATE_UP_LINEAR = "fused_gate_up_linear"

    @dataclasses.dataclass(kw_only=True)
    class WeightsLoadingConfig:
        weight_mode: WeightMode = WeightMode.VANILLA

    def quantize_1x128(x):
        g = x.float().unflatten(-1, (-1, 128))
        s = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
        return (g / s).clamp(-448, 448).to(torch.float8_e4m3fn).flatten(-2), s.squeeze(-1)

    def dequant_1x128(a, s):
        return (a.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2)

    def dequant_blocks(w, s):
        s = s.repeat_interleave(128, -2)[..., : w.shape[-2], :].repeat_interleave(128, -1)[..., : w.shape[-1]]
        return w.float() * s

    class UnquantizedLinearMethod:
        def create_weights(self, module, in_features, out_features, bias, dtype):
            module.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            module.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

        def apply(self, module, input, bias):
            return F.linear(input, module.weight, bias)

        def load_weights(self, module, weights, weight_mode):
            names = ["weight"] + (["bias"] if module.bias is not None else [])
            for name in names:
                getattr(module, name).data.copy_(torch.cat([w[name][:] for w in weights]))

    class FP8BlockScalesLinearMethod(UnquantizedLinearMethod):
        def create_weights(self, module, in_features, out_features, bias, dtype):
            module.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                         requires_grad=False)
            module.weight_scale = nn.Parameter(torch.empty(math.ceil(out_features / 128), math.ceil(in_features / 128),
                                                           dtype=torch.float32), requires_grad=False)
            module.input_scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
            module.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

        def apply(self, module, input, bias):
            a, s = quantize_1x128(input)
            out = (dequant_1x128(a, s)
                   @ dequant_blocks(module.weight, module.weight_scale).T).to(input.dtype)
            return out if bias is None else out + bias

        def load_weights(self, module, weights, weight_mode):
            module.weight.data.copy_(torch.cat([w["weight"][:] for w in weights]))
            module.weight_scale.data.copy_(torch.cat([w.get("weight_scale_inv", w.get("weight_scale"))[:]
                                                      for w in weights]))

    def get_quant_method(quant_config):
        algo = getattr(quant_config, "quant_algo", None)
        return FP8BlockScalesLinearMethod() if algo == QuantAlgo.FP8_BLOCK_SCALES else UnquantizedLinearMethod()

    class Linear(nn.Module):
        def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = None,
                     mapping: Optional[Mapping] = None, tensor_parallel_mode: Optional[TensorParallelMode] = None,
                     gather_output: bool = False, quant_config: Optional[QuantConfig] = None,
                     weights_loading_config: Optional[WeightsLoadingConfig] = None, reduce_output: bool = True,
                     skip_create_weights_in_init: bool = False, use_custom_cublas_mm: bool = False, lora=None,
                     **kwargs):
            super().__init__()
            self.in_features, self.out_features, self.has_bias, self.dtype = in_features, out_features, bias, dtype
            self.quant_config = quant_config
            self.weights_loading_config = weights_loading_config or WeightsLoadingConfig()
            self.tp_size, self.tp_mode = 1, tensor_parallel_mode
            self._weights_created = False
            if not skip_create_weights_in_init:
                self.create_weights()

        def create_weights(self):
            if self._weights_created:
                return
            self.quant_method = get_quant_method(self.quant_config)
            self.quant_method.create_weights(self, self.in_features, self.out_features, self.has_bias, self.dtype)
            self._weights_created = True

        def apply_linear(self, input, bias, lora_params: Optional[dict] = None, layer_idx: Optional[int] = None):
            return self.quant_method.apply(self, input, bias)

        def forward(self, input, *, all_reduce_params=None, lora_params=None, layer_idx=None):
            return self.apply_linear(input, self.bias, lora_params, layer_idx)

        def load_weights(self, weights: List[Dict], allow_partial_loading: bool = False):
            self.quant_method.load_weights(self, weights, self.weights_loading_config.weight_mode)

    module("tensorrt_llm._torch.modules.linear", Linear=Linear, TensorParallelMode=TensorParallelMode,
           WeightMode=WeightMode, WeightsLoadingConfig=WeightsLoadingConfig,
           UnquantizedLinearMethod=UnquantizedLinearMethod, FP8BlockScalesLinearMethod=FP8BlockScalesLinearMethod)

    # -- tensorrt_llm/_torch/modules/{gated_mlp,embedding,decoder_layer,logits_processor}.py
    class GatedMLP(nn.Module):
        def __init__(self, *, hidden_size: int, intermediate_size: int, bias: bool, activation=F.silu,
                     dtype: Optional[torch.dtype] = None, config: Optional[ModelConfig] = None,
                     overridden_tp_size: Optional[int] = None, reduce_output: bool = True, layer_idx=None, **kwargs):
            super().__init__()
            config = config or ModelConfig()
            self.activation = activation
            self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias, dtype=dtype,
                                       quant_config=config.get_quant_config(),
                                       weights_loading_config=WeightsLoadingConfig(
                                           weight_mode=WeightMode.FUSED_GATE_UP_LINEAR))
            self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype,
                                    quant_config=config.get_quant_config())

        def forward(self, x, all_rank_num_tokens=None, final_all_reduce_params=None, lora_params=None, **kwargs):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.activation(gate) * up)

    class Embedding(nn.Module):
        def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Optional[torch.dtype] = None,
                     mapping: Optional[Mapping] = None, tensor_parallel_mode=None, gather_output: bool = False,
                     **kwargs):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype))
            self.tp_size, self.tp_mode = 1, tensor_parallel_mode

        def forward(self, input):
            return F.embedding(input, self.weight)

    class LMHead(Embedding):
        def forward(self, input):
            return F.linear(input, self.weight)

    class DecoderLayer(nn.Module):
        pass

    class LogitsProcessor(nn.Module):
        def forward(self, hidden_states, lm_head, attn_metadata, return_context_logits: bool = False):
            return lm_head(hidden_states)

    module("tensorrt_llm._torch.modules.gated_mlp", GatedMLP=GatedMLP)
    module("tensorrt_llm._torch.modules.embedding", Embedding=Embedding, LMHead=LMHead)
    module("tensorrt_llm._torch.modules.decoder_layer", DecoderLayer=DecoderLayer)
    module("tensorrt_llm._torch.modules.logits_processor", LogitsProcessor=LogitsProcessor)

    # -- attention backends (tensorrt_llm/_torch/attention_backend/{trtllm,vanilla,flashinfer}.py): what
    #    Attention asks of them (support_fused_rope, support_fused_qkv, forward); TRTLLM applies RoPE itself
    #    when given pos_embd_params. Context requests only, causal attention per request (no KV cache).
    def backend_class(name, fused_rope, fused_qkv):
        class Backend:
            def __init__(self, layer_idx, num_heads, head_dim, num_kv_heads=None, quant_config=None, q_scaling=None,
                         pos_embd_params=None, **kwargs):
                self.layer_idx, self.num_heads, self.head_dim = layer_idx, num_heads, head_dim
                self.num_kv_heads = num_kv_heads or num_heads
                self.pos_embd_params, self.q_scaling = pos_embd_params, q_scaling or 1.0
                self.has_fp8_kv_cache = getattr(quant_config, "kv_cache_quant_algo", None) == QuantAlgo.FP8
                self.rope = None
                if pos_embd_params is not None and pos_embd_params.rope is not None:
                    self.rope = RotaryEmbedding(pos_embd_params.rope, head_dim=head_dim,
                                                is_neox=pos_embd_params.is_neox)

            @classmethod
            def support_fused_rope(cls):
                return fused_rope

            @classmethod
            def support_fused_qkv(cls):
                return fused_qkv

            def update_quant_config(self, quant_config):
                pass

            def forward(self, q, k, v, metadata, *, forward_args=None):
                qs, kvs = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
                if k is None:
                    q, k, v = q.split([qs, kvs, kvs], dim=-1)
                assert metadata.num_contexts == metadata.num_seqs, "stub backend: context requests only"
                if self.rope is not None:
                    positions = torch.cat([torch.arange(int(n)) for n in metadata.seq_lens])
                    q, k = self.rope(positions, [q, k])
                outs, start = [], 0
                for n in metadata.seq_lens.tolist():
                    qi = q[start: start + n].view(n, self.num_heads, self.head_dim).transpose(0, 1)
                    ki = k[start: start + n].view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
                    vi = v[start: start + n].view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
                    rep = self.num_heads // self.num_kv_heads
                    scale = 1 / (math.sqrt(self.head_dim) * self.q_scaling)
                    o = F.scaled_dot_product_attention(qi, ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0),
                                                       is_causal=True, scale=scale)
                    outs.append(o.transpose(0, 1).reshape(n, qs))
                    start += n
                return torch.cat(outs)

        Backend.__name__ = Backend.__qualname__ = name
        return Backend

    backends = {"TRTLLM": backend_class("TrtllmAttention", True, True),
                "VANILLA": backend_class("VanillaAttention", False, False),
                "FLASHINFER": backend_class("FlashInferAttention", False, True)}

    def get_attention_backend(backend_name, sparse_params=None):
        return backends[backend_name]

    def create_attention(backend_name, layer_idx, num_heads, head_dim, num_kv_heads=None, pos_embd_params=None,
                         quant_config=None, q_scaling=None, **kwargs):
        return backends[backend_name](layer_idx, num_heads, head_dim, num_kv_heads, quant_config=quant_config,
                                      q_scaling=q_scaling, pos_embd_params=pos_embd_params, **kwargs)

    module("tensorrt_llm._torch.attention_backend.utils", get_attention_backend=get_attention_backend,
           create_attention=create_attention)

    # -- tensorrt_llm/_torch/attention/attention.py (047098b74c51): the constructor's rope_fusion choice,
    #    split_qkv, preprocess_qkv, convert_qkv, apply_rope and forward (no LoRA, Helix, sparse attention)
    class Attention(nn.Module):
        def __init__(self, *, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                     max_position_embeddings: int, bias: bool,
                     pos_embd_params: Optional[PositionalEmbeddingParams] = None, rope_fusion: Optional[bool] = None,
                     layer_idx: Optional[int] = None, dtype: torch.dtype = None, dense_bias: Optional[bool] = None,
                     config: Optional[ModelConfig] = None, q_scaling: float = 1.0,
                     attention_chunk_size: Optional[int] = None, disable_deep_gemm: bool = False,
                     attn_output_gate: Optional[bool] = None, use_custom_cublas_mm: bool = False,
                     reduce_output: bool = True, mapping_with_cp: Optional[Mapping] = None,
                     head_dim: Optional[int] = None):
            super().__init__()
            config = config or ModelConfig()
            self.layer_idx = layer_idx
            self.hidden_size, self.num_heads = hidden_size, num_attention_heads
            self.head_dim = head_dim or getattr(config.pretrained_config, "head_dim", None)
            if not isinstance(self.head_dim, int):
                self.head_dim = hidden_size // num_attention_heads
            self.num_key_value_heads = num_key_value_heads
            self.pos_embd_params, self.q_scaling, self.attn_output_gate = pos_embd_params, q_scaling, attn_output_gate
            self.mapping = config.mapping
            self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias, dtype=dtype,
                                   quant_config=config.get_quant_config(),
                                   weights_loading_config=WeightsLoadingConfig(weight_mode=WeightMode.FUSED_QKV_LINEAR))
            self.o_proj = Linear(self.q_size, hidden_size, bias=bias if dense_bias is None else dense_bias,
                                 dtype=dtype, quant_config=config.get_quant_config())
            self.attn_backend = config.attn_backend
            attn_cls = get_attention_backend(self.attn_backend)
            self.rope_fusion = rope_fusion
            if self.rope_fusion and not attn_cls.support_fused_rope():
                self.rope_fusion = False
            if self.rope_fusion is None:
                self.rope_fusion = attn_cls.support_fused_rope()
            self.rotary_emb = None
            if not self.rope_fusion and self.pos_embd_params is not None:
                self.rotary_emb = RotaryEmbedding(self.pos_embd_params.rope, head_dim=self.head_dim,
                                                  is_neox=self.pos_embd_params.is_neox)
            self.attn = create_attention(self.attn_backend, self.layer_idx, self.num_heads, self.head_dim,
                                         self.num_key_value_heads,
                                         pos_embd_params=self.pos_embd_params if self.rope_fusion else None,
                                         quant_config=config.get_quant_config(), q_scaling=self.q_scaling)
            self.support_fused_qkv = self.attn.support_fused_qkv()

        def split_qkv(self, q, k=None, v=None):
            if k is None and v is None:
                q, k, v = q.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return q, k, v

        def preprocess_qkv(self, qkv, position_ids):
            q, k, v = qkv, None, None
            q, k, v = self.apply_rope(q, k, v, position_ids)
            return q, k, v, None

        def convert_qkv(self, q, k, v):
            if k is None and v is None and not self.support_fused_qkv:
                q, k, v = self.split_qkv(q)
            elif k is not None and v is not None and self.support_fused_qkv:
                q, k, v = torch.concat([q, k, v], dim=-1), None, None
            return q, k, v

        def forward(self, position_ids, hidden_states, attn_metadata, attention_mask=PredefinedAttentionMask.CAUSAL,
                    mrope_config=None, all_reduce_params=None, lora_params=None, attention_window_size=None,
                    attention_mask_data=None, attention_sinks=None, relative_attention_bias=None,
                    relative_attention_max_distance: int = 0, **kwargs):
            qkv = self.qkv_proj(hidden_states)
            q, k, v, gate = self.preprocess_qkv(qkv, position_ids)
            q, k, v = self.convert_qkv(q, k, v)
            out = self.attn.forward(q, k, v, attn_metadata,
                                    forward_args=AttentionForwardArgs(attention_mask=attention_mask))
            return self.o_proj(out, all_reduce_params=all_reduce_params)

        def apply_rope(self, q, k, v, position_ids):
            if not self.rope_fusion and position_ids is not None:
                q, k, v = self.split_qkv(q, k, v)
                q, k = self.rotary_emb(position_ids, [q, k])
            return q, k, v

    # -- tensorrt_llm/_torch/attention/qk_norm_attention.py: an Attention with its own apply_rope
    class QKNormRoPEAttention(Attention):
        def apply_rope(self, q, k, v, position_ids):
            return Attention.apply_rope(self, q, k, v, position_ids)

    module("tensorrt_llm._torch.attention.attention", Attention=Attention)
    module("tensorrt_llm._torch.attention.qk_norm_attention", QKNormRoPEAttention=QKNormRoPEAttention)

    # -- tensorrt_llm/_torch/attention/mla.py (047098b74c51): the constructor's weights and attributes, and
    #    forward_absorption_generation's contract: q [T, H (nope + rope)] (q_b_proj's output), compressed_kv
    #    [T, L] (normed), k_pe [T, rope] (before RoPE), output [T, H v] written in place; the backend ropes
    #    q_pe and k_pe, appends [kv_c | rope(k_pe)] to the paged cache and attends over it (a plain loop here).
    class MLA(nn.Module):
        def __init__(self, *, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                     qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int,
                     kv_lora_rank: int, predicted_tokens_per_seq: int, max_position_embeddings: int, bias: bool,
                     aux_stream_dict=None, pos_embd_params: Optional[PositionalEmbeddingParams] = None,
                     layer_idx: Optional[int] = None, dtype: torch.dtype = None, dense_bias: Optional[bool] = None,
                     config: Optional[ModelConfig] = None, mapping_with_cp: Optional[Mapping] = None,
                     reduce_output: bool = True, num_groups: int = 1, o_lora_rank: int = 1024,
                     fuse_qkv_a_proj: bool = True, rms_norm_eps: Optional[float] = None):
            super().__init__()
            config = config or ModelConfig()
            self.layer_idx, self.dtype = layer_idx, dtype
            self.num_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
            self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
            self.qk_head_dim, self.v_head_dim = qk_nope_head_dim + qk_rope_head_dim, v_head_dim
            self.q_lora_rank, self.kv_lora_rank, self.pos_embd_params = q_lora_rank, kv_lora_rank, pos_embd_params
            self.mapping = mapping_with_cp or config.mapping
            self.num_heads_tp = self.num_heads_tp_cp = num_attention_heads // self.mapping.tp_size
            self.sparse_attn_hooks = None
            self.llama_4_scaling = False
            qc = config.get_quant_config()
            eps = rms_norm_eps or getattr(config.pretrained_config, "rms_norm_eps", 1e-6)
            self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim + q_lora_rank, bias=bias,
                                             dtype=dtype, quant_config=qc)
            self.q_a_layernorm = RMSNorm(hidden_size=q_lora_rank, eps=eps, dtype=dtype)
            self.q_b_proj = Linear(q_lora_rank, self.num_heads_tp * self.qk_head_dim, bias=bias, dtype=dtype,
                                   quant_config=qc)
            self.kv_a_layernorm = RMSNorm(hidden_size=kv_lora_rank, dtype=dtype, eps=eps)
            self.kv_b_proj = Linear(kv_lora_rank, self.num_heads_tp * (qk_nope_head_dim + v_head_dim), bias=bias,
                                    dtype=dtype, quant_config=qc)
            self.v_b_proj = nn.Parameter(torch.empty(self.num_heads_tp, v_head_dim, kv_lora_rank, dtype=dtype),
                                         requires_grad=False)
            self.o_proj = Linear(self.num_heads_tp * v_head_dim, hidden_size, bias=bias, dtype=dtype, quant_config=qc)
            rope = pos_embd_params.rope
            mscale = 1.0 if rope.scale <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.scale) + 1.0
            q_scaling = 1.0 / (mscale * mscale)
            self.mqa = create_attention(config.attn_backend, self.layer_idx, self.num_heads_tp,
                                        head_dim=kv_lora_rank + qk_rope_head_dim, num_kv_heads=1,
                                        pos_embd_params=pos_embd_params, quant_config=qc, q_scaling=q_scaling,
                                        is_mla_enable=True)
            self.softmax_scale = 1.0 / (math.sqrt(self.qk_head_dim) * q_scaling)
            self.rope_fusion = self.mqa.support_fused_rope()
            self.apply_rotary_emb = not self.rope_fusion
            self.rotary_emb = None
            if self.apply_rotary_emb:
                self.rotary_emb = RotaryEmbedding(rope, head_dim=qk_rope_head_dim, is_neox=pos_embd_params.is_neox)
            self.quant_config = qc
            if not config.skip_create_weights_in_init:
                self.create_weights()

        def create_weights(self):
            fp8 = getattr(self.quant_config, "quant_algo", None) == QuantAlgo.FP8_BLOCK_SCALES
            h, lat, nope, v = self.num_heads_tp, self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
            kdtype = torch.float8_e4m3fn if fp8 else self.dtype
            self.k_b_proj_trans = nn.Parameter(torch.empty(h, lat, nope, dtype=kdtype), requires_grad=False)
            self.k_b_proj_trans_dequant = self.v_b_proj_dequant = None
            if fp8:
                self.k_b_proj_trans_scale = nn.Parameter(torch.empty(h, lat // 128, nope // 128), requires_grad=False)
                self.v_b_proj_scale = nn.Parameter(torch.empty(h, v // 128, lat // 128), requires_grad=False)
            else:
                self.k_b_proj_trans_scale = self.v_b_proj_scale = None

        def apply_rope(self, q, k_pe, position_ids):
            q = q.view(-1, self.num_heads_tp, self.qk_head_dim)
            q_pe = q[..., self.qk_nope_head_dim:].reshape(-1, self.num_heads_tp * self.qk_rope_head_dim)
            q_pe, k_pe = self.rotary_emb(position_ids, [q_pe, k_pe])
            q[..., self.qk_nope_head_dim:] = q_pe.view(-1, self.num_heads_tp, self.qk_rope_head_dim)
            return k_pe

        def forward_absorption_generation(self, q, compressed_kv, k_pe, attn_metadata, output, position_ids=None,
                                          latent_cache=None, **kwargs):
            self.backend_generation_calls = getattr(self, "backend_generation_calls", 0) + 1
            t, h, lat, r = q.shape[0], self.num_heads_tp, self.kv_lora_rank, self.qk_rope_head_dim
            q_nope, q_pe = q.view(t, h, self.qk_head_dim).split([self.qk_nope_head_dim, r], dim=-1)
            rope = RotaryEmbedding(self.pos_embd_params.rope, head_dim=r, is_neox=self.pos_embd_params.is_neox)
            gen_positions = position_ids[..., attn_metadata.num_ctx_tokens:]
            q_pe, k_pe = rope(gen_positions, [q_pe.reshape(t, h * r), k_pe])
            w_kc = self.k_b_proj_trans if self.k_b_proj_trans_scale is None else \
                dequant_blocks(self.k_b_proj_trans, self.k_b_proj_trans_scale)
            w_vc = self.v_b_proj if self.v_b_proj_scale is None else dequant_blocks(self.v_b_proj, self.v_b_proj_scale)
            q_full = torch.cat([torch.einsum("thn,hln->thl", q_nope.float(), w_kc.float()),
                                q_pe.view(t, h, r).float()], dim=-1)
            cache = attn_metadata.kv_cache_manager.get_buffers(self.layer_idx)  # [blocks, 1, page, 1, L + R]
            page = cache.shape[2]
            ctx, gens = attn_metadata.num_contexts, attn_metadata.num_generations
            out, tok = torch.zeros(t, h, self.v_head_dim), 0
            for g in range(gens):
                rid = attn_metadata.request_ids[ctx + g]
                blocks = attn_metadata.kv_cache_manager.get_batch_cache_indices([rid])[0]
                past = attn_metadata.kv_cache_params.num_cached_tokens_per_seq[ctx + g]
                n_new = int(attn_metadata.seq_lens[ctx + g])
                for i in range(n_new):
                    p = past + i
                    cache[blocks[p // page], 0, p % page, 0] = torch.cat([compressed_kv[tok + i], k_pe[tok + i]])
                for i in range(n_new):
                    rows = torch.stack([cache[blocks[p // page], 0, p % page, 0].float() for p in range(past + i + 1)])
                    scores = (q_full[tok + i] @ rows.T) * self.softmax_scale  # [H, seen]
                    latent = scores.softmax(-1) @ rows[:, :lat]  # [H, L]
                    out[tok + i] = torch.einsum("hl,hvl->hv", latent, w_vc.float())
                tok += n_new
            output.view(t, h, self.v_head_dim).copy_(out.to(output.dtype))
            return output

    module("tensorrt_llm._torch.attention.mla", MLA=MLA)

    # -- tensorrt_llm/_torch/modules/fused_moe/routing.py (0f3e29af15c4): the PyTorch paths (the fused
    #    kernels compute the same: Renormalize is top-k then softmax over k; DeepSeek-V3's noaux_tc)
    class BaseMoeRoutingMethod(nn.Module):
        def apply(self, router_logits):
            raise NotImplementedError

        def get_experts_per_token(self):
            return self.top_k

    class DefaultMoeRoutingMethod(BaseMoeRoutingMethod):
        def __init__(self, top_k: int, output_dtype: torch.dtype = torch.float32, force_enable_pytorch_op=False):
            super().__init__()
            self.top_k, self.output_dtype = top_k, output_dtype

        def apply(self, router_logits):
            values, indices = torch.topk(F.softmax(router_logits.to(self.output_dtype), dim=-1), k=self.top_k, dim=-1)
            return indices.to(torch.int32), values

    class RenormalizeMoeRoutingMethod(BaseMoeRoutingMethod):
        def __init__(self, top_k: int, output_dtype: torch.dtype = torch.float32, force_enable_pytorch_op=False):
            super().__init__()
            self.top_k, self.output_dtype = top_k, output_dtype

        def apply(self, router_logits):
            values, indices = torch.topk(router_logits, k=self.top_k, dim=-1)
            return indices.to(torch.int32), F.softmax(values.to(self.output_dtype), dim=-1)

    class Llama4RenormalizeMoeRoutingMethod(BaseMoeRoutingMethod):
        def __init__(self, top_k: int, output_dtype: torch.dtype = torch.float32):
            super().__init__()
            self.top_k, self.output_dtype = top_k, output_dtype

        def apply(self, router_logits):
            values, indices = torch.topk(router_logits, k=self.top_k, dim=-1)
            return indices.to(torch.int32), torch.sigmoid(values.float()).to(self.output_dtype)

    class Deepseekv3RoutingImpl:
        def __init__(self, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                     is_fused: bool = True):
            self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
            self.routed_scaling_factor, self.is_fused = routed_scaling_factor, is_fused

        def noaux_tc(self, logits, e_score_correction_bias):
            scores = torch.sigmoid(logits)
            scores_with_bias = scores + e_score_correction_bias
            if self.n_group == 1 and self.topk_group == 1:
                _, topk_indices = torch.topk(scores_with_bias, k=self.top_k, dim=1)
                topk_values = torch.gather(scores, dim=1, index=topk_indices).type_as(scores)
                topk_values = topk_values / (topk_values.sum(-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
                return topk_values, topk_indices
            shape = list(scores_with_bias.shape)
            grouped = scores_with_bias.view(shape[:-1] + [self.n_group, shape[-1] // self.n_group])
            group_scores = torch.topk(grouped, k=2, dim=-1, largest=True, sorted=True)[0].sum(-1)
            _, group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, largest=True, sorted=True)
            group_mask = torch.zeros_like(group_scores).scatter_(-1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(shape[:-1] + [self.n_group, shape[-1] // self.n_group])
            masked = torch.where(score_mask.reshape(shape).bool(), scores_with_bias, float("-inf"))
            _, topk_idx = torch.topk(masked, k=self.top_k, dim=-1, largest=True, sorted=True)
            scores = scores * torch.zeros_like(scores).scatter_(-1, topk_idx, 1)
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
            return torch.topk(scores, k=self.top_k, dim=-1, largest=True)

        def apply(self, logits, e_score_correction_bias):
            topk_values, topk_indices = self.noaux_tc(logits, e_score_correction_bias)
            return topk_indices.to(torch.int32), topk_values.to(torch.float32)

    class DeepSeekV3MoeRoutingMethod(BaseMoeRoutingMethod):
        def __init__(self, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                     callable_e_score_correction_bias, is_fused: bool = True):
            super().__init__()
            self.routing_impl = Deepseekv3RoutingImpl(top_k=top_k, n_group=n_group, topk_group=topk_group,
                                                      routed_scaling_factor=routed_scaling_factor, is_fused=is_fused)
            self.callable_e_score_correction_bias = callable_e_score_correction_bias

        def apply(self, logits):
            return self.routing_impl.apply(logits, self.e_score_correction_bias)

        @property
        def e_score_correction_bias(self):
            return self.callable_e_score_correction_bias()

        @property
        def top_k(self):
            return self.routing_impl.top_k

    # -- tensorrt_llm/_torch/modules/fused_moe/{create_moe,fused_moe_cutlass}.py: create_moe's signature and
    #    the MoE module's call (x, router_logits, do_finalize=, output_dtype=, all_rank_num_tokens=,
    #    use_dp_padding=) and load_weights([{"<e>.w1.weight", "<e>.w3.weight", "<e>.w2.weight", (FP8)
    #    "<e>.w*.weight_scale_inv"}]); weights w3_w1 (up, then gate) and w2; FP8 block scales quantise each
    #    GEMM's input per 1x128 group.
    class MoEWeightLoadingMode(enum.IntEnum):
        VANILLA = 0
        FUSED_GATE_UP_PROJ = 1

    class CutlassFusedMoE(nn.Module):
        def __init__(self, *, routing_method, num_experts: int, hidden_size: int, intermediate_size: int,
                     dtype: Optional[torch.dtype] = None, reduce_results: bool = False,
                     model_config: ModelConfig = ModelConfig(), aux_stream_dict=None,
                     weight_loading_mode=MoEWeightLoadingMode.VANILLA, bias: bool = False,
                     apply_router_weight_on_input: bool = False, layer_idx: Optional[int] = None, swiglu_alpha=None,
                     swiglu_beta=None, swiglu_limit=None, quant_config=None):
            super().__init__()
            self.routing_method, self.num_experts, self.layer_idx = routing_method, num_experts, layer_idx
            self.hidden_size, self.intermediate_size, self.dtype = hidden_size, intermediate_size, dtype
            self.quant_config = quant_config
            self.fp8 = getattr(quant_config, "quant_algo", None) == QuantAlgo.FP8_BLOCK_SCALES
            wdtype = torch.float8_e4m3fn if self.fp8 else dtype
            e, i, h = num_experts, intermediate_size, hidden_size
            self.w3_w1_weight = nn.Parameter(torch.empty(e, 2 * i, h, dtype=wdtype), requires_grad=False)
            self.w2_weight = nn.Parameter(torch.empty(e, h, i, dtype=wdtype), requires_grad=False)
            if self.fp8:
                self.w3_w1_scale = nn.Parameter(torch.empty(e, 2 * i // 128, h // 128), requires_grad=False)
                self.w2_scale = nn.Parameter(torch.empty(e, h // 128, i // 128), requires_grad=False)

        def load_weights(self, weights: List[Dict], allow_partial_loading: bool = False):
            w = weights[0]
            for e in range(self.num_experts):
                self.w3_w1_weight.data[e].copy_(torch.cat([w[f"{e}.w3.weight"][:], w[f"{e}.w1.weight"][:]]))
                self.w2_weight.data[e].copy_(w[f"{e}.w2.weight"][:])
                if self.fp8:
                    self.w3_w1_scale.data[e].copy_(torch.cat([w[f"{e}.w3.weight_scale_inv"][:],
                                                              w[f"{e}.w1.weight_scale_inv"][:]]))
                    self.w2_scale.data[e].copy_(w[f"{e}.w2.weight_scale_inv"][:])

        def forward(self, x, router_logits, do_finalize: bool = True, output_dtype=None, all_rank_num_tokens=None,
                    use_dp_padding=None, **kwargs):
            ids, scales = self.routing_method.apply(router_logits)
            out = torch.zeros(x.shape[0], self.hidden_size, dtype=torch.float32)
            for e in range(self.num_experts):
                w31, w2 = self.w3_w1_weight[e], self.w2_weight[e]
                xe = x.float()
                if self.fp8:
                    w31, w2 = dequant_blocks(w31, self.w3_w1_scale[e]), dequant_blocks(w2, self.w2_scale[e])
                    a, s = quantize_1x128(x)
                    xe = dequant_1x128(a, s)
                up, gate = (xe @ w31.float().T).chunk(2, dim=-1)
                act = (F.silu(gate) * up).to(x.dtype)
                if self.fp8:
                    a, s = quantize_1x128(act)
                    act = dequant_1x128(a, s)
                y = (act.float() @ w2.float().T).to(x.dtype).float()
                weight = (scales * (ids == e)).sum(-1, keepdim=True)
                out += weight * y
            return out.to(output_dtype or x.dtype)

    def create_moe(routing_method, num_experts: int, hidden_size: int, intermediate_size: int,
                   dtype: Optional[torch.dtype] = None, reduce_results: bool = False,
                   model_config: ModelConfig = ModelConfig(), override_quant_config: Optional[QuantConfig] = None,
                   aux_stream_dict=None, weight_loading_mode=MoEWeightLoadingMode.VANILLA, bias: bool = False,
                   apply_router_weight_on_input: bool = False, layer_idx: Optional[int] = None, swiglu_alpha=None,
                   swiglu_beta=None, swiglu_limit=None):
        return CutlassFusedMoE(routing_method=routing_method, num_experts=num_experts, hidden_size=hidden_size,
                               intermediate_size=intermediate_size, dtype=dtype, reduce_results=reduce_results,
                               model_config=model_config, layer_idx=layer_idx,
                               quant_config=override_quant_config or model_config.quant_config)

    fused_moe = dict(create_moe=create_moe, CutlassFusedMoE=CutlassFusedMoE, MoEWeightLoadingMode=MoEWeightLoadingMode,
                     BaseMoeRoutingMethod=BaseMoeRoutingMethod,
                     DefaultMoeRoutingMethod=DefaultMoeRoutingMethod,
                     RenormalizeMoeRoutingMethod=RenormalizeMoeRoutingMethod,
                     Llama4RenormalizeMoeRoutingMethod=Llama4RenormalizeMoeRoutingMethod,
                     Deepseekv3RoutingImpl=Deepseekv3RoutingImpl, DeepSeekV3MoeRoutingMethod=DeepSeekV3MoeRoutingMethod)
    module("tensorrt_llm._torch.modules.fused_moe", **fused_moe)
    module("tensorrt_llm._torch.modules.fused_moe.routing",
           **{k: v for k, v in fused_moe.items() if "Routing" in k})

    _stub_models(module, locals())
    return mods


def _stub_models(module, ns):
    """The model zoo's registry and the three models (tensorrt_llm/_torch/models/)."""
    (ModelConfig, Attention, QKNormRoPEAttention, MLA, RMSNorm, Linear, GatedMLP, Embedding, LMHead, DecoderLayer,
     LogitsProcessor, RopeParams, PositionalEmbeddingParams, PositionEmbeddingType, QuantAlgo, create_moe,
     RenormalizeMoeRoutingMethod, DeepSeekV3MoeRoutingMethod, Deepseekv3RoutingImpl, WeightMode,
     WeightsLoadingConfig) = (ns[k] for k in (
        "ModelConfig", "Attention", "QKNormRoPEAttention", "MLA", "RMSNorm", "Linear", "GatedMLP", "Embedding",
        "LMHead", "DecoderLayer", "LogitsProcessor", "RopeParams", "PositionalEmbeddingParams",
        "PositionEmbeddingType", "QuantAlgo", "create_moe", "RenormalizeMoeRoutingMethod",
        "DeepSeekV3MoeRoutingMethod", "Deepseekv3RoutingImpl", "WeightMode", "WeightsLoadingConfig"))
    zoo = "tensorrt_llm._torch.models"

    # -- tensorrt_llm/_torch/models/modeling_utils.py: register_auto_model (built-in registrations only fill
    #    empty slots; every registration is recorded per module), export_external_model_modules /
    #    register_external_model_modules / _ensure_model_registered (an external architecture reaches a
    #    worker as its module's name, imported there on lookup), DecoderModel, DecoderModelForCausalLM
    #    (PostInitCaller: __init__, then __post_init__ creating the weights, then __pp_init__) and the
    #    v1 weight loader (_load_weights_impl: a module with its own load_weights gets
    #    weights=[its subtree]; qkv_proj / gate_up_proj get the q/k/v or gate/up dicts)
    MODEL_CLASS_MAPPING = {}
    _MODULE_REGISTRATIONS = {}
    _EXTERNAL_ARCH_TO_MODULE = {}
    MODEL_ARCH_TO_MODULE = {"Qwen2ForCausalLM": "modeling_qwen", "MixtralForCausalLM": "modeling_mixtral",
                            "DeepseekV3ForCausalLM": "modeling_deepseekv3"}

    def is_builtin_zoo_module(name):
        return name == zoo or name.startswith(zoo + ".")

    def _apply_arch_registration(arch, value, module_name):
        existing = MODEL_CLASS_MAPPING.get(arch)
        if existing is not None and existing is not value and is_builtin_zoo_module(module_name):
            return
        MODEL_CLASS_MAPPING[arch] = value

    def register_auto_model(name: str):
        def decorator(cls):
            module_name = getattr(cls, "__module__", "")
            _MODULE_REGISTRATIONS.setdefault(module_name, []).append((name, cls))
            _apply_arch_registration(name, cls, module_name)
            return cls
        return decorator

    def export_external_model_modules():
        external = {a: c.__module__ for a, c in MODEL_CLASS_MAPPING.items() if not is_builtin_zoo_module(c.__module__)}
        for a, m in _EXTERNAL_ARCH_TO_MODULE.items():
            external.setdefault(a, m)
        return external

    def register_external_model_modules(arch_to_module):
        declared = dict(arch_to_module)
        _EXTERNAL_ARCH_TO_MODULE.clear()
        _EXTERNAL_ARCH_TO_MODULE.update(declared)
        MODEL_CLASS_MAPPING.clear()
        for module_name, regs in _MODULE_REGISTRATIONS.items():
            if is_builtin_zoo_module(module_name):
                for arch, cls in regs:
                    if declared.get(arch, module_name) == module_name:
                        _apply_arch_registration(arch, cls, module_name)
        for module_name in dict.fromkeys(declared.values()):
            for arch, cls in _MODULE_REGISTRATIONS.get(module_name, ()):
                _apply_arch_registration(arch, cls, module_name)

    def _ensure_model_registered(model_arch):
        full_name = _EXTERNAL_ARCH_TO_MODULE.get(model_arch)
        if full_name is None:
            module_name = MODEL_ARCH_TO_MODULE.get(model_arch)
            if module_name is None:
                return
            full_name = f"{zoo}.{module_name}"
        importlib.import_module(full_name)

    def get_registered_model_class(model_arch):
        if model_arch not in MODEL_CLASS_MAPPING:
            _ensure_model_registered(model_arch)
        return MODEL_CLASS_MAPPING.get(model_arch)

    def filter_weights(prefix, weights):
        return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}

    class PPInitCaller(type):
        pass

    class DecoderModel(nn.Module, metaclass=PPInitCaller):
        def __init__(self, model_config):
            super().__init__()
            self.dtype = model_config.pretrained_config.torch_dtype
            self.model_config = model_config
            self.prologue, self.epilogue, self.keep_embed_tokens = [], [], False

        def __pp_init__(self):
            pass

    class PostInitCaller(type):
        def __call__(cls, *args, **kwargs):
            obj = type.__call__(cls, *args, **kwargs)
            obj.__post_init__()
            obj.__pp_init__()
            return obj

    TModel, TConfig = TypeVar("TModel"), TypeVar("TConfig")

    class DecoderModelForCausalLM(nn.Module, Generic[TModel, TConfig], metaclass=PostInitCaller):
        def __init__(self, model, *, config, hidden_size: int, vocab_size: int):
            super().__init__()
            self.model_config, self.model = config, model
            self.lm_head = LMHead(vocab_size, hidden_size, dtype=config.pretrained_config.torch_dtype)
            if getattr(config.pretrained_config, "tie_word_embeddings", False):
                self.lm_head.weight = self.model.embed_tokens.weight
            self.logits_processor = LogitsProcessor()

        def __pp_init__(self):
            pass

        def __post_init__(self):
            for _, module in self.named_modules():
                if callable(getattr(module, "create_weights", None)):
                    module.create_weights()

        @property
        def config(self):
            return self.model_config.pretrained_config

        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None,
                    return_context_logits: bool = False, spec_metadata=None, lora_params=None, **kwargs):
            output = self.model(input_ids=input_ids, attn_metadata=attn_metadata, position_ids=position_ids,
                                inputs_embeds=inputs_embeds)
            return self.logits_processor.forward(output, self.lm_head, attn_metadata, return_context_logits)

        def load_weights(self, weights, weight_mapper=None, skip_modules=[], params_map=None,
                         allow_partial_loading: bool = False):
            _load_weights_impl(self, weights, skip_modules, allow_partial_loading=allow_partial_loading)

    def _load_weights_impl(model, weights, skip_modules=[], params_map=None, preload_weight_modules=None,
                           allow_partial_loading: bool = False):
        fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        for name, module in model.named_modules(remove_duplicate=False):
            if len(module._parameters) == 0 or any(s in name for s in skip_modules):
                continue
            if getattr(model.config, "tie_word_embeddings", False) and name.startswith("lm_head"):
                continue
            names = name.split(".")
            if names[-1] in fused:
                module.load_weights(weights=[filter_weights(".".join(names[:-1] + [n]), weights)
                                             for n in fused[names[-1]]], allow_partial_loading=allow_partial_loading)
                continue
            module_weights = filter_weights(name, weights)
            if not module_weights:
                continue
            if hasattr(module, "load_weights"):
                if "allow_partial_loading" in inspect.getfullargspec(module.load_weights).args:
                    module.load_weights(weights=[module_weights], allow_partial_loading=allow_partial_loading)
                else:
                    module.load_weights(weights=[module_weights])
            else:
                for n, p in module.named_parameters(recurse=False):
                    p.data.copy_(module_weights[n][:])

    module(f"{zoo}.modeling_utils", register_auto_model=register_auto_model, MODEL_CLASS_MAPPING=MODEL_CLASS_MAPPING,
           export_external_model_modules=export_external_model_modules,
           register_external_model_modules=register_external_model_modules,
           get_registered_model_class=get_registered_model_class, DecoderModel=DecoderModel,
           DecoderModelForCausalLM=DecoderModelForCausalLM, PostInitCaller=PostInitCaller,
           filter_weights=filter_weights, _load_weights_impl=_load_weights_impl)

    def rope_params(config, is_neox=True, kind=PositionEmbeddingType.rope_gpt_neox):
        return PositionalEmbeddingParams(type=kind, rope=RopeParams.from_config(config), is_neox=is_neox)

    def decoder_forward(layer, mlp, position_ids, hidden_states, attn_metadata, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = layer.input_layernorm(hidden_states)
        else:
            hidden_states, residual = layer.input_layernorm(hidden_states, residual)
        hidden_states = layer.self_attn(position_ids=position_ids, hidden_states=hidden_states,
                                        attn_metadata=attn_metadata)
        hidden_states, residual = layer.post_attention_layernorm(hidden_states, residual)
        return mlp(hidden_states), residual

    def layer_norms(layer, config):
        layer.input_layernorm = RMSNorm(hidden_size=config.hidden_size, eps=config.rms_norm_eps,
                                        dtype=config.torch_dtype)
        layer.post_attention_layernorm = RMSNorm(hidden_size=config.hidden_size, eps=config.rms_norm_eps,
                                                 dtype=config.torch_dtype)

    def model_body(model, model_config, make_layer):
        config = model_config.pretrained_config
        model.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=config.torch_dtype)
        model.layers = nn.ModuleList([make_layer(i) for i in range(config.num_hidden_layers)])
        model.norm = RMSNorm(hidden_size=config.hidden_size, eps=config.rms_norm_eps, dtype=config.torch_dtype)

    def causal_lm(name, decoder_model, **methods):
        """A DecoderModelForCausalLM subclass whose __init__(self, model_config) wraps decoder_model."""
        def __init__(self, model_config):
            config = model_config.pretrained_config
            DecoderModelForCausalLM.__init__(self, decoder_model(model_config), config=model_config,
                                             hidden_size=config.hidden_size, vocab_size=config.vocab_size)

        return types.new_class(name, (DecoderModelForCausalLM,), exec_body=lambda ns: ns.update(
            __init__=__init__, **methods))

    def model_forward(model, attn_metadata, input_ids, position_ids):
        hidden_states, residual = model.embed_tokens(input_ids), None
        for layer in model.layers:
            hidden_states, residual = layer(position_ids=position_ids, hidden_states=hidden_states,
                                            attn_metadata=attn_metadata, residual=residual)
        hidden_states, _ = model.norm(hidden_states, residual)
        return hidden_states

    def attention_args(model_config, layer_idx, **kw):
        """The Attention arguments the models take from their config (and their own, kw)."""
        config = model_config.pretrained_config
        return dict(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                    num_key_value_heads=config.num_key_value_heads,
                    max_position_embeddings=config.max_position_embeddings, pos_embd_params=rope_params(config),
                    layer_idx=layer_idx, dtype=config.torch_dtype, config=model_config, **kw)

    # -- tensorrt_llm/_torch/models/modeling_qwen.py (047098b74c51)
    class QwenAttention(Attention):
        def __init__(self, model_config, layer_idx: Optional[int] = None):
            config = model_config.pretrained_config
            super().__init__(**attention_args(model_config, layer_idx, bias=True, dense_bias=False,
                                              rope_fusion=not getattr(config, "disable_fuse_rope", False)))

    class QwenYarnAttention(QKNormRoPEAttention):
        def __init__(self, model_config, layer_idx: Optional[int] = None, fuse_qk_norm_rope: bool = True):
            super().__init__(**attention_args(model_config, layer_idx, bias=True, dense_bias=False, rope_fusion=False))

    class QwenDecoderLayer(DecoderLayer):
        def __init__(self, model_config, layer_idx: int):
            super().__init__()
            self.layer_idx = layer_idx
            config = model_config.pretrained_config
            rope_type = (config.rope_scaling or {}).get("rope_type") if isinstance(config.rope_scaling, dict) else None
            attention = QwenYarnAttention if rope_type == "yarn" else QwenAttention
            self.self_attn = attention(model_config, layer_idx=layer_idx)
            self.mlp = GatedMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                bias=getattr(config, "mlp_bias", False), dtype=config.torch_dtype, config=model_config)
            layer_norms(self, config)

        def forward(self, position_ids, hidden_states, attn_metadata, residual, mrope_config=None,
                    spec_metadata=None, **kwargs):
            return decoder_forward(self, self.mlp, position_ids, hidden_states, attn_metadata, residual)

    class QwenModel(DecoderModel):
        def __init__(self, model_config):
            super().__init__(model_config)
            model_body(self, model_config, lambda i: QwenDecoderLayer(model_config, i))

        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, mrope_config=None,
                    spec_metadata=None, **kwargs):
            return model_forward(self, attn_metadata, input_ids, position_ids)

    Qwen2ForCausalLM = causal_lm("Qwen2ForCausalLM", QwenModel)

    module(f"{zoo}.modeling_qwen", QwenAttention=QwenAttention, QwenYarnAttention=QwenYarnAttention,
           QwenDecoderLayer=QwenDecoderLayer, QwenModel=QwenModel, Qwen2ForCausalLM=Qwen2ForCausalLM)
    register_auto_model("Qwen2ForCausalLM")(Qwen2ForCausalLM)

    # -- tensorrt_llm/_torch/models/modeling_mixtral.py (047098b74c51), with _unfuse_mixtral_moe_weights
    #    (transformers 5's fused experts -> block_sparse_moe.experts.<e>.w1/w3/w2, mlp.gate -> block_sparse_moe.gate)
    class MixtralMoE(nn.Module):
        def __init__(self, model_config, aux_stream, layer_idx: Optional[int] = None):
            super().__init__()
            config = model_config.pretrained_config
            self.hidden_dim, self.ffn_dim = config.hidden_size, config.intermediate_size
            self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
            self.gate = Linear(self.hidden_dim, self.num_experts, bias=False, dtype=config.torch_dtype,
                               quant_config=None)
            self.experts = create_moe(num_experts=self.num_experts,
                                      routing_method=RenormalizeMoeRoutingMethod(top_k=self.top_k),
                                      hidden_size=self.hidden_dim, intermediate_size=self.ffn_dim,
                                      aux_stream_dict={}, dtype=config.torch_dtype, reduce_results=True,
                                      model_config=model_config, layer_idx=layer_idx)

        def forward(self, hidden_states, attn_metadata, lora_params=None):
            router_logits = self.gate(hidden_states)
            return self.experts(hidden_states, router_logits, all_rank_num_tokens=attn_metadata.all_rank_num_tokens,
                                use_dp_padding=False, lora_params=lora_params)

    class MixtralAttention(Attention):
        def __init__(self, model_config, layer_idx: Optional[int] = None):
            super().__init__(**attention_args(model_config, layer_idx, bias=False))

    class MixtralDecoderLayer(DecoderLayer):
        def __init__(self, model_config, layer_idx: int, aux_stream):
            super().__init__()
            config = model_config.pretrained_config
            self.self_attn = MixtralAttention(model_config, layer_idx=layer_idx)
            self.block_sparse_moe = MixtralMoE(model_config, aux_stream, layer_idx=layer_idx)
            layer_norms(self, config)
            self.layer_idx = layer_idx

        def forward(self, position_ids, hidden_states, attn_metadata, residual, lora_params=None, **kwargs):
            return decoder_forward(self, lambda h: self.block_sparse_moe(h, attn_metadata), position_ids,
                                   hidden_states, attn_metadata, residual)

    class MixtralModel(DecoderModel):
        def __init__(self, model_config):
            super().__init__(model_config)
            model_body(self, model_config, lambda i: MixtralDecoderLayer(model_config, i, None))

        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, lora_params=None,
                    **kwargs):
            return model_forward(self, attn_metadata, input_ids, position_ids)

    def _unfuse_mixtral_moe_weights(weights):
        add, drop = {}, []
        for key in list(weights):
            m = re.match(r"^(model\.layers\.\d+\.)mlp\.experts\.gate_up_proj$", key)
            if m:
                value, half = weights[key], weights[key].shape[1] // 2
                for i in range(value.shape[0]):
                    add[f"{m.group(1)}block_sparse_moe.experts.{i}.w1.weight"] = value[i, :half, :]
                    add[f"{m.group(1)}block_sparse_moe.experts.{i}.w3.weight"] = value[i, half:, :]
                drop.append(key)
                continue
            m = re.match(r"^(model\.layers\.\d+\.)mlp\.experts\.down_proj$", key)
            if m:
                for i in range(weights[key].shape[0]):
                    add[f"{m.group(1)}block_sparse_moe.experts.{i}.w2.weight"] = weights[key][i]
                drop.append(key)
                continue
            m = re.match(r"^(model\.layers\.\d+\.)mlp\.gate\.(.+)$", key)
            if m:
                add[f"{m.group(1)}block_sparse_moe.gate.{m.group(2)}"] = weights[key]
                drop.append(key)
        for key in drop:
            del weights[key]
        weights.update(add)
        return weights

    def load_weights(self, weights, weight_mapper=None, skip_modules=[], params_map=None,
                     allow_partial_loading: bool = False):
        _unfuse_mixtral_moe_weights(weights)
        DecoderModelForCausalLM.load_weights(self, weights, weight_mapper=weight_mapper, skip_modules=skip_modules,
                                             params_map=params_map, allow_partial_loading=allow_partial_loading)

    MixtralForCausalLM = causal_lm("MixtralForCausalLM", MixtralModel, load_weights=load_weights)

    module(f"{zoo}.modeling_mixtral", MixtralMoE=MixtralMoE, MixtralAttention=MixtralAttention,
           MixtralDecoderLayer=MixtralDecoderLayer, MixtralModel=MixtralModel,
           _unfuse_mixtral_moe_weights=_unfuse_mixtral_moe_weights, MixtralForCausalLM=MixtralForCausalLM)
    register_auto_model("MixtralForCausalLM")(MixtralForCausalLM)

    # -- tensorrt_llm/_torch/models/modeling_deepseekv3.py (047098b74c51): DeepseekV3Attention (MLA with
    #    YaRN on interleaved rope dims), DeepseekV3Gate (router GEMM in float32, e_score_correction_bias,
    #    routing_method), Deepseekv3MoE (gate, experts from create_moe, shared experts; the tp 1 forward),
    #    the decoder layer's modules and DeepseekV3ForCausalLM
    class DeepseekV3Attention(MLA):
        def __init__(self, model_config, layer_idx: Optional[int] = None, aux_stream_dict=None,
                     mapping_with_cp=None, reduce_output: bool = True):
            config = model_config.pretrained_config
            super().__init__(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                             num_key_value_heads=config.num_key_value_heads, qk_rope_head_dim=config.qk_rope_head_dim,
                             qk_nope_head_dim=config.qk_nope_head_dim, q_lora_rank=config.q_lora_rank,
                             kv_lora_rank=config.kv_lora_rank, v_head_dim=config.v_head_dim,
                             predicted_tokens_per_seq=1, max_position_embeddings=config.max_position_embeddings,
                             bias=False, pos_embd_params=rope_params(config, is_neox=False,
                                                                     kind=PositionEmbeddingType.yarn),
                             layer_idx=layer_idx, dtype=config.torch_dtype, config=model_config,
                             aux_stream_dict=aux_stream_dict, mapping_with_cp=mapping_with_cp,
                             reduce_output=reduce_output)

    class DeepseekV3Gate(nn.Module):
        def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                     routed_scaling_factor: float, dtype: Optional[torch.dtype] = None,
                     fuse_routing_kernel: bool = True, apply_routing: bool = False, moe_backend: str = "CUTLASS",
                     use_cute_dsl_bf16_gemm: bool = False):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False)
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
            self.routing_impl = Deepseekv3RoutingImpl(top_k=top_k, n_group=n_group, topk_group=topk_group,
                                                      routed_scaling_factor=routed_scaling_factor,
                                                      is_fused=fuse_routing_kernel)

        def forward(self, hidden_states):  # dsv3_router_gemm_op(..., out_dtype=torch.float32)
            return F.linear(hidden_states.float(), self.weight.float())

        def load_weights(self, weights: List[Dict], allow_partial_loading: bool = False):
            self.weight.copy_(weights[0]["weight"][:])
            self.e_score_correction_bias.copy_(weights[0]["e_score_correction_bias"][:].float())

        @property
        def routing_method(self):
            return DeepSeekV3MoeRoutingMethod(
                top_k=self.routing_impl.top_k, n_group=self.routing_impl.n_group,
                topk_group=self.routing_impl.topk_group, routed_scaling_factor=self.routing_impl.routed_scaling_factor,
                is_fused=self.routing_impl.is_fused,
                callable_e_score_correction_bias=lambda: self.e_score_correction_bias)

    class Deepseekv3MoE(nn.Module):
        def __init__(self, *, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                     shared_expert_intermediate_size: int, aux_stream_dict, dtype: Optional[torch.dtype] = None,
                     model_config=ModelConfig(), override_quant_config=None, layer_idx: Optional[int] = None):
            super().__init__()
            config = model_config.pretrained_config
            self.top_k = top_k
            self.gate = DeepseekV3Gate(hidden_size, num_experts, top_k=top_k, n_group=config.n_group,
                                       topk_group=config.topk_group, routed_scaling_factor=config.routed_scaling_factor,
                                       dtype=dtype, fuse_routing_kernel=True, apply_routing=False,
                                       moe_backend=model_config.moe_backend)
            self.experts = create_moe(num_experts=num_experts, routing_method=self.gate.routing_method,
                                      hidden_size=hidden_size, intermediate_size=intermediate_size, dtype=dtype,
                                      reduce_results=False, model_config=model_config,
                                      override_quant_config=override_quant_config, aux_stream_dict=aux_stream_dict,
                                      layer_idx=layer_idx)
            self.shared_experts = GatedMLP(hidden_size=hidden_size, intermediate_size=shared_expert_intermediate_size,
                                           bias=False, dtype=dtype, config=model_config, reduce_output=False)

        def forward(self, hidden_states, hidden_states_fp4=None, all_rank_num_tokens=None,
                    final_all_reduce_params=None, do_finalize: Optional[bool] = True):
            router_logits = self.gate(hidden_states)
            routed = self.experts(hidden_states, router_logits, do_finalize=do_finalize,
                                  output_dtype=hidden_states.dtype, all_rank_num_tokens=all_rank_num_tokens,
                                  use_dp_padding=False)
            return self.shared_experts(hidden_states) + routed

    class DeepseekV3DecoderLayer(DecoderLayer):
        def __init__(self, model_config, layer_idx: int, aux_stream_dict, is_separate_draft_engine: bool = False,
                     mapping_with_cp=None):
            super().__init__()
            config = model_config.pretrained_config
            self.layer_idx = layer_idx
            self.self_attn = DeepseekV3Attention(model_config, layer_idx=layer_idx, aux_stream_dict=aux_stream_dict)
            quant_config = model_config.quant_config
            if quant_config.is_module_excluded_from_quantization(f"model.layers.{layer_idx}"):
                quant_config = type(quant_config)(kv_cache_quant_algo=quant_config.kv_cache_quant_algo)
            if config.n_routed_experts is not None and layer_idx >= config.first_k_dense_replace:
                self.mlp = Deepseekv3MoE(num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                                         hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
                                         shared_expert_intermediate_size=config.moe_intermediate_size
                                         * config.n_shared_experts, aux_stream_dict=aux_stream_dict,
                                         dtype=config.torch_dtype, model_config=model_config,
                                         override_quant_config=quant_config, layer_idx=layer_idx)
            else:
                self.mlp = GatedMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                    bias=False, dtype=config.torch_dtype, config=model_config)
            layer_norms(self, config)

    class DeepseekV3Model(DecoderModel):
        def __init__(self, model_config):
            super().__init__(model_config)
            model_body(self, model_config, lambda i: DeepseekV3DecoderLayer(model_config, i, {}))

    DeepseekV3ForCausalLM = causal_lm("DeepseekV3ForCausalLM", DeepseekV3Model)

    module(f"{zoo}.modeling_deepseekv3", DeepseekV3Attention=DeepseekV3Attention, DeepseekV3Gate=DeepseekV3Gate,
           Deepseekv3MoE=Deepseekv3MoE, DeepseekV3DecoderLayer=DeepseekV3DecoderLayer,
           DeepseekV3Model=DeepseekV3Model, DeepseekV3ForCausalLM=DeepseekV3ForCausalLM)
    register_auto_model("DeepseekV3ForCausalLM")(DeepseekV3ForCausalLM)
    module(zoo)  # (the package, imported lazily in TensorRT-LLM)


# ==== fixtures and builders =======================================================================


def _install(monkeypatch, mods):
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)


def _namespace(mods, plugin):
    z = "tensorrt_llm._torch"
    return types.SimpleNamespace(
        plugin=plugin, mods=mods, utils=mods[f"{z}.models.modeling_utils"], qwen=mods[f"{z}.models.modeling_qwen"],
        mixtral=mods[f"{z}.models.modeling_mixtral"], ds=mods[f"{z}.models.modeling_deepseekv3"],
        norm=mods[f"{z}.modules.rms_norm"], rope=mods[f"{z}.attention.rotary_embedding"],
        attn=mods[f"{z}.attention.attention"], mla=mods[f"{z}.attention.mla"], linear=mods[f"{z}.modules.linear"],
        moe=mods[f"{z}.modules.fused_moe"], iface=mods[f"{z}.attention_backend.interface"],
        cfg=mods[f"{z}.model_config"], mapping=mods["tensorrt_llm.mapping"],
        quant=mods["tensorrt_llm.models.modeling_utils"], algo=mods["tensorrt_llm.quantization.mode"].QuantAlgo,
        kv=mods[f"{z}.pyexecutor.resource_manager"], meta=mods[f"{z}.metadata"],
        trtllm_meta=mods[f"{z}.attention_backend.trtllm"].TrtllmAttentionMetadata)


@pytest.fixture
def trt(monkeypatch):
    """Fresh stubs in sys.modules and the module imported anew: TensorRT-LLM's registry is loaded, so the
    import registers (as in a worker resolving the architecture)."""
    mods = _stub_trtllm()
    _install(monkeypatch, mods)
    yield _namespace(mods, importlib.import_module(PLUGIN))
    sys.modules.pop(PLUGIN, None)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _fill(module, seed):
    """Random float parameters (a norm's weight near one), so that no test passes on initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_floating_point() and p.dtype != torch.float8_e4m3fn:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.3)
                        + (1.0 if "norm" in name else 0.0))


def _fp8(shape, seed):
    """A float8_e4m3fn weight and float32 [rows/128, cols/128, ...] scales for it."""
    w = _randn(*shape, seed=seed).to(torch.float8_e4m3fn)
    s = _randn(*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128), seed=seed + 1).abs() * 0.05 + 0.02
    return w, s


def _hf_config(cls, **kw):
    config = cls(**kw)
    config.dtype = torch.float32
    return config


def _qwen_config(**kw):
    return _hf_config(transformers.Qwen2Config, vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, **kw)


def _mixtral_config(**kw):
    return _hf_config(transformers.MixtralConfig, vocab_size=64, hidden_size=32, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5, **kw)


def _deepseek_config(big=False, **kw):
    dims = dict(hidden_size=128, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128, v_head_dim=128,
                moe_intermediate_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2) if big \
        else dict(hidden_size=64, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16,
                  moe_intermediate_size=32, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4)
    dims.update(kw)
    return _hf_config(transformers.DeepseekV3Config, vocab_size=64, num_hidden_layers=2, qk_rope_head_dim=8,
                      n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                      first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
                      rms_norm_eps=1e-5,
                      rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                      **dims)


def _build(trt, arch, pretrained, **model_config):
    """TensorRT-LLM's model-loader step: the class registered for arch, built from a ModelConfig."""
    cls = trt.utils.get_registered_model_class(arch)
    return cls(trt.cfg.ModelConfig(pretrained_config=pretrained, **model_config))


def _packed(lengths, vocab, seed):
    """Token ids of requests packed one after another, their positions [1, T] and context metadata."""
    ids = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + i))
           for i, n in enumerate(lengths)]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(torch.int32)
    return ids, torch.cat(ids), positions


def _context_metadata(trt, lengths):
    return trt.iface.AttentionMetadata(seq_lens=lengths, num_contexts=len(lengths),
                                       request_ids=list(range(len(lengths))), all_rank_num_tokens=[sum(lengths)])


# ==== registration ================================================================================


def test_registers_the_three_architectures_at_import(trt):
    reg = trt.plugin.registered()
    assert reg is not None and set(reg.classes) == set(ARCHS) and reg.trtllm_version == "1.3.0rc0"
    bases = {"Qwen2ForCausalLM": trt.qwen.Qwen2ForCausalLM, "MixtralForCausalLM": trt.mixtral.MixtralForCausalLM,
             "DeepseekV3ForCausalLM": trt.ds.DeepseekV3ForCausalLM}
    for arch, base in bases.items():
        ours = reg.classes[arch]
        assert trt.utils.get_registered_model_class(arch) is ours
        assert ours.__bases__ == (base,) and ours.__module__ == PLUGIN and ours.__name__ == f"QuickLLM{base.__name__}"
        assert getattr(trt.plugin, ours.__name__) is ours  # (how a pickled class resolves)
    assert trt.plugin.register() is reg and trt.plugin.register(["MixtralForCausalLM"]) is reg  # idempotent
    assert all(trt.utils.MODEL_CLASS_MAPPING[a] is reg.classes[a] for a in ARCHS)
    # the lazily imported zoo running its decorators again keeps the external registration
    trt.utils.register_auto_model("Qwen2ForCausalLM")(trt.qwen.Qwen2ForCausalLM)
    assert trt.utils.MODEL_CLASS_MAPPING["Qwen2ForCausalLM"] is reg.classes["Qwen2ForCausalLM"]


def test_register_explicitly_and_bad_names(monkeypatch):
    mods = _stub_trtllm()
    _install(monkeypatch, mods)
    registry = mods.pop("tensorrt_llm._torch.models.modeling_utils")
    monkeypatch.delitem(sys.modules, registry.__name__)
    plugin = importlib.import_module(PLUGIN)  # the registry is not loaded: nothing registers on import
    try:
        assert plugin.registered() is None
        monkeypatch.setitem(sys.modules, registry.__name__, registry)
        reg = plugin.register("Qwen2ForCausalLM")
        assert set(reg.classes) == {"Qwen2ForCausalLM"} and registry.MODEL_CLASS_MAPPING["MixtralForCausalLM"] is \
            mods["tensorrt_llm._torch.models.modeling_mixtral"].MixtralForCausalLM
        assert plugin.QuickLLMDeepseekV3ForCausalLM is plugin.register().classes["DeepseekV3ForCausalLM"]
        assert set(plugin.registered().classes) == set(ARCHS)
        with pytest.raises(ValueError, match="unknown architecture 'LlamaForCausalLM'"):
            plugin.register(["Qwen2ForCausalLM", "LlamaForCausalLM"])
        with pytest.raises(AttributeError, match="no attribute 'QuickLLMLlama'"):
            plugin.QuickLLMLlama
    finally:
        sys.modules.pop(PLUGIN, None)


def test_imports_without_tensorrt_llm(monkeypatch):
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import tensorrt_llm raises ImportError
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    try:
        plugin = importlib.import_module(PLUGIN)
        assert plugin.registered() is None
        with pytest.raises(ImportError, match="tensorrt_llm._torch"):
            plugin.register()
        with pytest.raises(ImportError, match="tensorrt_llm._torch"):
            plugin.QuickLLMQwen2ForCausalLM
    finally:
        sys.modules.pop(PLUGIN, None)


def test_a_worker_resolves_the_architecture_by_module_name(trt, monkeypatch):
    exported = trt.utils.export_external_model_modules()  # what the driver sends its workers
    assert exported == {arch: PLUGIN for arch in ARCHS}
    worker = _stub_trtllm()  # a fresh process: TensorRT-LLM's modules, quickllm's not imported yet
    _install(monkeypatch, worker)
    utils = worker["tensorrt_llm._torch.models.modeling_utils"]
    utils.register_external_model_modules(exported)
    cls = utils.get_registered_model_class("MixtralForCausalLM")
    assert cls.__module__ == PLUGIN and cls.__name__ == "QuickLLMMixtralForCausalLM"
    assert issubclass(cls, worker["tensorrt_llm._torch.models.modeling_mixtral"].MixtralForCausalLM)
    assert utils.get_registered_model_class("Qwen2ForCausalLM") is sys.modules[PLUGIN].registered().classes[
        "Qwen2ForCausalLM"]


def test_a_pickled_class_resolves_in_a_fresh_process(trt, monkeypatch):
    data = pickle.dumps(trt.plugin.registered().classes["DeepseekV3ForCausalLM"])  # (older executors pickle classes)
    fresh = _stub_trtllm()
    _install(monkeypatch, fresh)
    cls = pickle.loads(data)
    assert cls is sys.modules[PLUGIN].registered().classes["DeepseekV3ForCausalLM"]
    assert issubclass(cls, fresh["tensorrt_llm._torch.models.modeling_deepseekv3"].DeepseekV3ForCausalLM)


# ==== whole tiny models against transformers =====================================================


def _hf_hidden(hf, ids):
    with torch.no_grad():
        return torch.cat([hf.model(input_ids=i[None]).last_hidden_state[0] for i in ids])


def _run(model, trt, lengths, flat, positions):
    with torch.no_grad():
        return model.model(attn_metadata=_context_metadata(trt, lengths), input_ids=flat, position_ids=positions)


def test_qwen2_matches_transformers(trt):
    config = _qwen_config()
    hf = transformers.Qwen2ForCausalLM(config).eval()
    _fill(hf, seed=1)
    model = _build(trt, "Qwen2ForCausalLM", _qwen_config())
    model.load_weights(dict(hf.state_dict()))
    assert model.model_config.pretrained_config.disable_fuse_rope  # RoPE outside the attention kernel
    assert model.quickllm_layers == {"rms_norm": 5, "rope": 2} and model.quickllm_left == {}
    attn = model.model.layers[0].self_attn
    assert type(attn).__name__ == "QuickLLMQwenAttention" and attn.support_fused_qkv
    assert type(attn.rotary_emb).__name__ == "QuickLLMRotaryEmbedding"
    lengths = [5, 3, 7]
    ids, flat, positions = _packed(lengths, config.vocab_size, seed=2)
    got = _run(model, trt, lengths, flat, positions)
    torch.testing.assert_close(got, _hf_hidden(hf, ids), **TOL)
    # and the backend's own model (its RMSNorm, RoPE) gives the same
    backend = trt.qwen.Qwen2ForCausalLM(trt.cfg.ModelConfig(pretrained_config=_qwen_config()))
    backend.load_weights(dict(hf.state_dict()))
    torch.testing.assert_close(got, _run(backend, trt, lengths, flat, positions), **TOL)


@pytest.mark.parametrize("attn_backend, rope", [("VANILLA", True), ("FLASHINFER", True), ("TRTLLM", False)])
def test_mixtral_matches_transformers(trt, attn_backend, rope):
    config = _mixtral_config()
    hf = transformers.MixtralForCausalLM(config).eval()
    _fill(hf, seed=3)
    model = _build(trt, "MixtralForCausalLM", _mixtral_config(), attn_backend=attn_backend)
    model.load_weights(dict(hf.state_dict()))  # transformers 5's fused experts, unfused by the backend's loader
    want_layers = {"rms_norm": 5, "moe": 2, **({"rope": 2} if rope else {})}
    assert model.quickllm_layers == want_layers
    assert model.quickllm_left == ({} if rope else {"rope": "fused into TensorRT-LLM's attention kernel (rope_fusion)"})
    experts = model.model.layers[1].block_sparse_moe.experts
    assert isinstance(experts, trt.plugin.QuickLLMExperts) and experts._routing == dict(scoring="softmax",
                                                                                        renormalize=True)
    lengths = [6, 4]
    ids, flat, positions = _packed(lengths, config.vocab_size, seed=4)
    torch.testing.assert_close(_run(model, trt, lengths, flat, positions), _hf_hidden(hf, ids), **TOL)


# ==== each replaced layer against the backend's forward ==========================================


def test_rms_norm(trt):
    model = _build(trt, "Qwen2ForCausalLM", _qwen_config())
    _fill(model, seed=5)
    norm = model.model.layers[1].post_attention_layernorm
    assert type(norm).__name__ == "QuickLLMRMSNorm"
    backend = trt.norm.RMSNorm.forward
    x, residual = _randn(7, 32, seed=6), _randn(7, 32, seed=7)
    torch.testing.assert_close(norm(x), backend(norm, x), **TOL)
    y, r = norm(x, None)
    torch.testing.assert_close(y, backend(norm, x)) and r is None
    want = backend(norm, x, residual)
    xi, ri = x.clone(), residual.clone()
    got = norm(xi, ri)
    assert got[0] is xi and got[1] is ri  # in place, as the backend's flashinfer kernel
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    # return_norm_out, Gemma norms and other dtypes run the backend's forward
    torch.testing.assert_close(norm(x, return_norm_out=True), backend(norm, x), rtol=0, atol=0)
    norm.use_gemma = True
    torch.testing.assert_close(norm(x, residual.clone())[0], backend(norm, x, residual)[0], rtol=0, atol=0)


def test_rope_rotates_inside_the_fused_qkv(trt):
    model = _build(trt, "Qwen2ForCausalLM", _qwen_config())
    attn = model.model.layers[0].self_attn
    t = 9
    qkv = _randn(t, attn.q_size + 2 * attn.kv_size, seed=8)
    positions = torch.randint(0, 64, (1, t), generator=torch.Generator().manual_seed(9), dtype=torch.int32)
    q, k, v = qkv.clone().split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    want_q, want_k = trt.rope.RotaryEmbedding.forward(attn.rotary_emb, positions, [q, k])  # the backend's RoPE
    fused = qkv.clone()
    got = attn.apply_rope(fused, None, None, positions)
    assert got[0] is fused and got[1] is None and got[2] is None  # stays fused, rotated in place
    torch.testing.assert_close(fused[:, : attn.q_size], want_q, **TOL)
    torch.testing.assert_close(fused[:, attn.q_size: attn.q_size + attn.kv_size], want_k, **TOL)
    torch.testing.assert_close(fused[:, attn.q_size + attn.kv_size:], v, rtol=0, atol=0)
    q2, k2, v2 = attn.apply_rope(q.clone(), k.clone(), v, positions)  # split q, k (an output-gated attention)
    torch.testing.assert_close(q2, want_q, **TOL)
    torch.testing.assert_close(k2, want_k, **TOL)
    # RoPE fused into the attention kernel is left there
    attn.rope_fusion = True
    assert attn.apply_rope(qkv, None, None, positions) == (qkv, None, None)


def test_rope_partial_rotary_dims(trt):
    config = _qwen_config()
    config.partial_rotary_factor = 0.5
    model = _build(trt, "Qwen2ForCausalLM", config)
    emb = model.model.layers[0].self_attn.rotary_emb
    assert emb.rotary_cos_sin.shape[-1] * 2 == 4 < emb.head_dim == 8
    positions = torch.arange(5, dtype=torch.int32)[None] + 3
    q, k = _randn(5, 32, seed=10), _randn(5, 16, seed=11)
    want = trt.rope.RotaryEmbedding.forward(emb, positions, [q.clone(), k.clone()])
    got = emb(positions, [q, k])
    assert got[0] is q and got[1] is k
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_deepseek_rope_is_yarn_on_interleaved_dims(trt):
    config = _deepseek_config()
    model = _build(trt, "DeepseekV3ForCausalLM", config, attn_backend="VANILLA")  # (RoPE outside the kernel)
    mla = model.model.layers[0].self_attn
    emb = mla.rotary_emb
    assert not emb.is_neox and type(emb).__name__ == "QuickLLMRotaryEmbedding"
    positions = torch.tensor([[0, 5, 63, 64, 130, 255]], dtype=torch.int32)
    q_pe, k_pe = _randn(6, 4 * 8, seed=12), _randn(6, 8, seed=13)
    want = trt.rope.RotaryEmbedding.forward(emb, positions, [q_pe.clone(), k_pe.clone()])
    for a, b in zip(emb(positions, [q_pe, k_pe]), want):
        torch.testing.assert_close(a, b, **TOL)
    # the backend's YaRN table is transformers' (with DeepSeek's mscale), in rope_cache's layout
    scaling = dict(config.rope_scaling)
    table = emb.rotary_cos_sin.reshape(256, -1)
    torch.testing.assert_close(table, qk.rope_cache(8, 256, base=10000.0, scaling=scaling), rtol=1e-6, atol=1e-6)


# ==== MoE ========================================================================================


def _routing_method(trt, kind, e, bias=None):
    m = trt.moe
    if kind == "renormalize":
        return m.RenormalizeMoeRoutingMethod(top_k=2)
    if kind == "default":
        return m.DefaultMoeRoutingMethod(top_k=3)
    n_group, topk_group = (1, 1) if kind == "deepseek" else (4, 2)
    return m.DeepSeekV3MoeRoutingMethod(top_k=3, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
                                        callable_e_score_correction_bias=lambda: bias)


def _expert_weights(e, h, i, fp8, seed):
    """The checkpoint's per-expert tensors as the backend's loaders hand them to the experts module."""
    w = {}
    for x in range(e):
        for k, (name, shape) in enumerate((("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i)))):
            if fp8:
                w[f"{x}.{name}.weight"], w[f"{x}.{name}.weight_scale_inv"] = _fp8(shape, seed + 10 * x + 2 * k)
            else:
                w[f"{x}.{name}.weight"] = _randn(*shape, seed=seed + 10 * x + k, scale=0.3)
    return w


@pytest.mark.parametrize("kind", ["renormalize", "default", "deepseek", "deepseek_grouped"])
def test_moe_routing_and_experts(trt, kind):
    e, h, i, t = 8, 24, 20, 11
    bias = _randn(e, seed=20, scale=0.5)
    method = _routing_method(trt, kind, e, bias)
    ours = trt.plugin.QuickLLMExperts(num_experts=e, hidden_size=h, intermediate_size=i, dtype=torch.float32,
                                      routing_method=method)
    backend = trt.moe.create_moe(routing_method=method, num_experts=e, hidden_size=h, intermediate_size=i,
                                 dtype=torch.float32)
    weights = _expert_weights(e, h, i, fp8=False, seed=21)
    ours.load_weights([weights])
    backend.load_weights([weights])
    x, logits = _randn(t, h, seed=22), _randn(t, e, seed=23)
    # routing: the same experts with the same weights per token as the backend's routing method
    route = dict(ours._routing)
    w, ids = qk.moe_route(logits, ours.top_k, correction_bias=bias if route["scoring"] == "sigmoid" else None, **route)
    want_ids, want_w = method.apply(logits)
    order, want_order = ids.long().argsort(-1), want_ids.long().argsort(-1)
    assert torch.equal(ids.long().gather(1, order), want_ids.long().gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), **TOL)
    torch.testing.assert_close(ours(x, logits), backend(x, logits), **TOL)
    out = ours(x, logits, do_finalize=True, output_dtype=torch.float64, all_rank_num_tokens=[t], use_dp_padding=False)
    assert out.dtype == torch.float64


def test_moe_fp8_block_scaled_experts(trt):
    e, h, i, t = 4, 256, 128, 5
    bias = _randn(e, seed=30, scale=0.5)
    method = _routing_method(trt, "deepseek", e, bias)
    method.routing_impl.top_k = 2
    ours = trt.plugin.QuickLLMExperts(num_experts=e, hidden_size=h, intermediate_size=i, dtype=torch.bfloat16,
                                      routing_method=method, fp8=True)
    assert ours.w13_weight.dtype == torch.float8_e4m3fn and ours.w13_weight_scale_inv.shape == (e, 2, 2)
    backend = trt.moe.create_moe(routing_method=method, num_experts=e, hidden_size=h, intermediate_size=i,
                                 dtype=torch.bfloat16,
                                 model_config=trt.cfg.ModelConfig(quant_config=trt.quant.QuantConfig(
                                     quant_algo=trt.algo.FP8_BLOCK_SCALES)))
    weights = _expert_weights(e, h, i, fp8=True, seed=31)
    ours.load_weights([weights])
    backend.load_weights([weights])
    x, logits = _randn(t, h, seed=32).to(torch.bfloat16), _randn(t, e, seed=33)
    got, want = ours(x, logits).float(), backend(x, logits).float()
    # bf16 outputs rounded at other points of the chain: within two bf16 steps of the largest value
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())


def test_deepseek_moe_block_matches_transformers(trt):
    config = _deepseek_config()
    model = _build(trt, "DeepseekV3ForCausalLM", _deepseek_config())
    block = model.model.layers[1].mlp
    assert isinstance(block.experts, trt.plugin.QuickLLMExperts)
    assert block.experts._routing == dict(scoring="sigmoid", renormalize=True, n_group=2, topk_group=1,
                                          routed_scaling_factor=2.5)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    hf = DeepseekV3MoE(config).eval()
    _fill(hf, seed=34)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(_randn(8, seed=35, scale=0.5))
    sd, i = hf.state_dict(), config.moe_intermediate_size
    weights = {"gate.weight": sd["gate.weight"], "gate.e_score_correction_bias": sd["gate.e_score_correction_bias"],
               "shared_experts.gate_proj.weight": sd["shared_experts.gate_proj.weight"],
               "shared_experts.up_proj.weight": sd["shared_experts.up_proj.weight"],
               "shared_experts.down_proj.weight": sd["shared_experts.down_proj.weight"]}
    for x in range(8):  # a DeepSeek checkpoint's per-expert tensors, renamed w1/w3/w2 by the backend's loader
        weights[f"experts.{x}.w1.weight"] = sd["experts.gate_up_proj"][x, :i]
        weights[f"experts.{x}.w3.weight"] = sd["experts.gate_up_proj"][x, i:]
        weights[f"experts.{x}.w2.weight"] = sd["experts.down_proj"][x]
    trt.utils._load_weights_impl(types.SimpleNamespace(named_modules=block.named_modules, config=config),
                                 weights)
    x = _randn(9, config.hidden_size, seed=36)
    with torch.no_grad():
        torch.testing.assert_close(block(x), hf(x), **TOL)


def test_moe_layers_left_to_the_backend(trt):
    model = _build(trt, "MixtralForCausalLM", _mixtral_config(), mapping=trt.mapping.Mapping(world_size=2, tp_size=2))
    assert "moe" not in model.quickllm_layers and model.quickllm_left["moe"] == "tensor parallelism (tp_size 2)"
    assert type(model.model.layers[0].block_sparse_moe.experts).__name__ == "CutlassFusedMoE"
    nvfp4 = trt.quant.QuantConfig(quant_algo=trt.algo.NVFP4)
    model = _build(trt, "DeepseekV3ForCausalLM", _deepseek_config(), quant_config=nvfp4)
    assert model.quickllm_left["moe"] == "NVFP4 experts"
    with pytest.raises(ValueError, match="routing Llama4RenormalizeMoeRoutingMethod"):
        trt.plugin.QuickLLMExperts(num_experts=4, hidden_size=8, intermediate_size=8, dtype=torch.float32,
                                   routing_method=trt.moe.Llama4RenormalizeMoeRoutingMethod(top_k=1))


def test_moe_bad_input_names_it(trt):
    ours = trt.plugin.QuickLLMExperts(num_experts=4, hidden_size=8, intermediate_size=6, dtype=torch.float32,
                                      routing_method=trt.moe.RenormalizeMoeRoutingMethod(top_k=2))
    x, logits = _randn(3, 8, seed=40), _randn(3, 4, seed=41)
    with pytest.raises(NotImplementedError, match="do_finalize"):
        ours(x, logits, do_finalize=False)
    with pytest.raises(NotImplementedError, match="lora_params"):
        ours(x, logits, lora_params={"layer": 0})
    with pytest.raises(NotImplementedError, match="option swiglu_limit"):
        ours(x, logits, swiglu_limit=7.0)
    with pytest.raises(ValueError, match="router_logits"):
        ours(x, logits[:2])
    with pytest.raises(TypeError, match="x must be a tensor"):
        ours((x, x), logits)
    weights = _expert_weights(4, 8, 6, fp8=False, seed=42)
    del weights["2.w3.weight"]
    with pytest.raises(KeyError, match="2.w3.weight"):
        ours.load_weights([weights])
    ours.load_weights([weights], allow_partial_loading=True)


# ==== MLA decode =================================================================================


def _mla_layer(trt, fp8=False, **model_config):
    config = _deepseek_config(big=fp8)
    qc = trt.quant.QuantConfig(quant_algo=trt.algo.FP8_BLOCK_SCALES) if fp8 else trt.quant.QuantConfig()
    model = _build(trt, "DeepseekV3ForCausalLM", config, quant_config=qc, **model_config)
    mla = model.model.layers[0].self_attn
    h, lat, nope, v = mla.num_heads_tp, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim
    with torch.no_grad():  # the absorbed weights the backend's loader derives from kv_b_proj
        if fp8:
            for name, shape in (("k_b_proj_trans", (h, lat, nope)), ("v_b_proj", (h, v, lat))):
                w, s = _fp8(shape, seed=50 + len(name))
                setattr(mla, name, nn.Parameter(w, requires_grad=False))
                setattr(mla, f"{name}_scale", nn.Parameter(s, requires_grad=False))
        else:
            mla.k_b_proj_trans.copy_(_randn(h, lat, nope, seed=51, scale=0.2))
            mla.v_b_proj.copy_(_randn(h, v, lat, seed=52, scale=0.2))
    return model, mla


def _mla_batch(trt, mla, ctx_len, past, sq, dtype=torch.float32, device_tables=False, page=4, seed=60):
    """A batch of one context request (ctx_len tokens, 0 for none) and generation requests with `past`
    cached tokens and sq new ones each (or sq[i]), over a KV cache manager holding random pages; the
    inputs of forward_absorption_generation for its generation tokens."""
    sqs = list(sq) if isinstance(sq, (list, tuple)) else [sq] * len(past)
    d = mla.kv_lora_rank + mla.qk_rope_head_dim
    manager = trt.kv.KVCacheManager(num_blocks=24, tokens_per_block=page, head_dim=d, dtype=dtype, seed=seed)
    ids = ([0] if ctx_len else []) + [10 + i for i in range(len(past))]
    cached = ([0] if ctx_len else []) + list(past)
    seq_lens = ([ctx_len] if ctx_len else []) + sqs
    for rid, c, n in zip(ids, cached, seq_lens):
        manager.add_sequence(rid, c + n)
    cls = trt.trtllm_meta if device_tables else trt.iface.AttentionMetadata
    meta = cls(seq_lens=seq_lens, num_contexts=1 if ctx_len else 0, request_ids=ids, kv_cache_manager=manager,
               kv_cache_params=trt.meta.KVCacheParams(num_cached_tokens_per_seq=cached))
    if device_tables:
        meta.enable_flash_mla = True
        meta.kv_lens_cuda = torch.tensor([c + n for c, n in zip(cached, seq_lens)], dtype=torch.int32)
        table = manager.get_block_ids_per_seq(ids[meta.num_contexts:])
        meta.block_ids_per_seq = torch.zeros(8, 16, dtype=torch.int32)  # [max batch, max blocks]
        meta.block_ids_per_seq[: table.shape[0], : table.shape[1]] = table
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, seq_lens)])[None].to(torch.int32)
    t = sum(sqs)
    h = mla.num_heads_tp
    q = _randn(t, h * (mla.qk_nope_head_dim + mla.qk_rope_head_dim), seed=seed + 1).to(dtype)
    kv_c = _randn(t, mla.kv_lora_rank, seed=seed + 2).to(dtype)
    k_pe = _randn(t, mla.qk_rope_head_dim, seed=seed + 3).to(dtype)
    return meta, manager, positions, q, kv_c, k_pe


def _mla_both(trt, mla, meta, manager, positions, q, kv_c, k_pe):
    """(ours, the backend's loop): outputs and the caches after the step."""
    import copy
    ref_meta = copy.copy(meta)
    ref_meta.kv_cache_manager = copy.deepcopy(manager)
    out = torch.full((q.shape[0], mla.num_heads_tp * mla.v_head_dim), float("nan"), dtype=q.dtype)
    ref = out.clone()
    calls = getattr(mla, "backend_generation_calls", 0)
    got = mla.forward_absorption_generation(q, kv_c, k_pe, meta, out, position_ids=positions)
    assert got is out
    ran_backend = getattr(mla, "backend_generation_calls", 0) != calls
    trt.mla.MLA.forward_absorption_generation(mla, q, kv_c, k_pe, ref_meta, ref, position_ids=positions)
    return out, ref, manager.pools[0], ref_meta.kv_cache_manager.pools[0], ran_backend


@pytest.mark.parametrize("ctx_len, past, sq, device_tables", [
    (0, [5, 1, 9], 1, False), (3, [4, 8], 2, False), (0, [7, 2, 12], 1, True), (2, [6, 3], 3, True)])
def test_mla_decode_over_the_paged_cache(trt, ctx_len, past, sq, device_tables):
    model, mla = _mla_layer(trt)
    assert model.quickllm_layers["mla_decode"] == 2 and type(mla).__name__ == "QuickLLMDeepseekV3Attention"
    batch = _mla_batch(trt, mla, ctx_len, past, sq, device_tables=device_tables)
    out, ref, cache, ref_cache, ran_backend = _mla_both(trt, mla, *batch)
    assert not ran_backend
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(cache, ref_cache, **TOL)  # the new [kv_c | rope(k_pe)] rows, nothing else


def test_mla_decode_fp8_absorbed_weights(trt):
    model, mla = _mla_layer(trt, fp8=True)
    assert mla.k_b_proj_trans.dtype == torch.float8_e4m3fn and model.quickllm_layers["fp8_linear"] > 0
    out, ref, cache, ref_cache, ran_backend = _mla_both(trt, mla, *_mla_batch(trt, mla, 0, [5, 11], 1))
    assert not ran_backend
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(cache, ref_cache, **TOL)


def test_mla_decode_left_to_the_backend(trt):
    _, mla = _mla_layer(trt)
    mla.mqa.has_fp8_kv_cache = True  # an FP8 KV cache
    *_, ran_backend = _mla_both(trt, mla, *_mla_batch(trt, mla, 0, [5, 2], 1))
    assert ran_backend
    mla.mqa.has_fp8_kv_cache = False
    *_, ran_backend = _mla_both(trt, mla, *_mla_batch(trt, mla, 0, [5, 2], [1, 3]))  # unequal query lengths
    assert ran_backend
    sparse = _build(trt, "DeepseekV3ForCausalLM", _deepseek_config(),
                    mapping=trt.mapping.Mapping(world_size=2, cp_size=2))
    assert "mla_decode" not in sparse.quickllm_layers
    assert sparse.quickllm_left["mla_decode"] == "context parallelism (Helix)"


# ==== FP8 block-scaled linear layers ============================================================


def test_fp8_block_scaled_linear(trt, monkeypatch):
    model, mla = _mla_layer(trt, fp8=True)
    linear = mla.kv_a_proj_with_mqa  # [128 + 128 + 8 = 264 rows: a partial scale block, K = 128]
    assert type(linear.quant_method).__name__ == "QuickLLMFP8BlockScalesLinearMethod"
    for lin, seed in ((linear, 70), (mla.q_b_proj, 72)):
        w, s = _fp8(tuple(lin.weight.shape), seed)
        lin.weight.data.copy_(w)
        lin.weight_scale.data.copy_(s)
        x = _randn(5, lin.in_features, seed=seed + 1).to(torch.bfloat16)
        want = trt.linear.FP8BlockScalesLinearMethod.apply(lin.quant_method, lin, x, None)
        torch.testing.assert_close(lin(x), want, rtol=2 ** -8, atol=1e-6)  # (one bf16 rounding of the same sum)
    # scales the backend re-laid out (its UE8M0 packing on Blackwell) and FP8 inputs keep its GEMM
    def boom(*args, **kwargs):
        raise AssertionError("fp8_block_gemm ran")

    monkeypatch.setattr(qk, "fp8_block_gemm", boom)
    lin = mla.q_b_proj
    lin.weight_scale = nn.Parameter(lin.weight_scale.data.view(torch.int32), requires_grad=False)
    torch.testing.assert_close(lin(x), trt.linear.FP8BlockScalesLinearMethod.apply(lin.quant_method, lin, x, None))


def test_deepseek_model_layers(trt):
    qc = trt.quant.QuantConfig(quant_algo=trt.algo.FP8_BLOCK_SCALES)
    model = _build(trt, "DeepseekV3ForCausalLM", _deepseek_config(big=True), quant_config=qc)
    # 2 layers x (input, post-attention, q_a, kv_a) + the final norm; experts of layer 1; MLA of both;
    # per layer q_b, kv_a, kv_b, o_proj + (layer 0) gate_up, down + (layer 1) shared gate_up, down
    assert model.quickllm_layers == {"rms_norm": 9, "fp8_linear": 12, "moe": 1, "mla_decode": 2}
    assert model.quickllm_left == {}
    experts = model.model.layers[1].mlp.experts
    assert experts.fp8 and experts.w13_weight.dtype == torch.float8_e4m3fn
    assert type(model.model.layers[0].mlp.gate_up_proj.quant_method).__name__.startswith("QuickLLM")
    # a layer the checkpoint leaves unquantised (exclude_modules) gets bf16 experts
    qc = trt.quant.QuantConfig(quant_algo=trt.algo.FP8_BLOCK_SCALES, exclude_modules=["model.layers.1"])
    model = _build(trt, "DeepseekV3ForCausalLM", _deepseek_config(big=True), quant_config=qc)
    experts = model.model.layers[1].mlp.experts
    assert not experts.fp8 and experts.w13_weight.dtype == torch.float32


# ==== the layers on each kernel backend (Triton under the interpreter on a CPU) =================


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layers_on_each_backend(trt, backend_name):
    model = _build(trt, "MixtralForCausalLM", _mixtral_config(), attn_backend="FLASHINFER")
    _fill(model, seed=80)
    lengths = [5, 3]
    _, flat, positions = _packed(lengths, 64, seed=81)
    with qk.use_backend("reference"):
        want = _run(model, trt, lengths, flat, positions)
    _, mla = _mla_layer(trt)
    import copy
    batch = _mla_batch(trt, mla, 2, [6, 3], 2)
    meta, manager, positions_g, q, kv_c, k_pe = batch
    device_meta = copy.copy(meta)
    device_meta.kv_cache_manager = copy.deepcopy(manager)
    want_mla = torch.empty(q.shape[0], mla.num_heads_tp * mla.v_head_dim)
    with qk.use_backend("reference"):
        mla.forward_absorption_generation(q, kv_c, k_pe, meta, want_mla, position_ids=positions_g)
    model.to(DEVICE)
    mla.to(DEVICE)
    device_meta.kv_cache_manager.pools = [p.to(DEVICE) for p in device_meta.kv_cache_manager.pools]
    got_mla = torch.empty_like(want_mla).to(DEVICE)
    with qk.use_backend(backend_name):
        got = _run(model, trt, lengths, flat.to(DEVICE), positions.to(DEVICE))
        mla.forward_absorption_generation(q.to(DEVICE), kv_c.to(DEVICE), k_pe.to(DEVICE), device_meta, got_mla,
                                          position_ids=positions_g.to(DEVICE))
        ran = qk.last_backends()
    ops = ("rms_norm", "add_rms_norm_", "apply_rope_", "moe_route", "grouped_mm", "mla_cache_write", "mla_decode")
    assert all(ran[op] == backend_name for op in ops), ran
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_mla.cpu(), want_mla, **tol)
    torch.testing.assert_close(device_meta.kv_cache_manager.pools[0].cpu(), manager.pools[0], **tol)


# ==== against a real TensorRT-LLM ==============================================================

PINNED = {  # (module paths, newest first): {class: [methods whose signatures the module relies on]}
    ("tensorrt_llm._torch.modules.rms_norm",): {"RMSNorm": ["__init__", "forward"]},
    ("tensorrt_llm._torch.attention.rotary_embedding", "tensorrt_llm._torch.modules.rotary_embedding"): {
        "RotaryEmbedding": ["__init__", "forward"]},
    ("tensorrt_llm._torch.attention.attention", "tensorrt_llm._torch.modules.attention"): {
        "Attention": ["__init__", "split_qkv", "convert_qkv", "apply_rope"]},
    ("tensorrt_llm._torch.attention.mla", "tensorrt_llm._torch.modules.attention"): {
        "MLA": ["__init__", "forward_absorption_generation"]},
    ("tensorrt_llm._torch.modules.linear",): {"Linear": ["apply_linear"], "FP8BlockScalesLinearMethod": ["apply"]},
    ("tensorrt_llm._torch.modules.fused_moe.routing",): {
        "RenormalizeMoeRoutingMethod": ["__init__"], "DefaultMoeRoutingMethod": ["__init__"],
        "Deepseekv3RoutingImpl": ["__init__"], "DeepSeekV3MoeRoutingMethod": ["__init__"]},
    ("tensorrt_llm._torch.models.modeling_qwen",): {"Qwen2ForCausalLM": ["__init__"]},
    ("tensorrt_llm._torch.models.modeling_mixtral",): {"MixtralForCausalLM": ["__init__", "load_weights"]},
    ("tensorrt_llm._torch.models.modeling_deepseekv3",): {"DeepseekV3ForCausalLM": ["__init__"]},
}


def _params(fn):
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def _first_module(paths, cls_name):
    for path in paths:
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        if hasattr(module, cls_name):
            return module
    raise AssertionError(f"{cls_name} is in none of {paths}")


def test_pinned_contracts_match_the_installed_tensorrt_llm(monkeypatch):
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    pytest.importorskip("tensorrt_llm")
    stubs = _stub_trtllm()
    for paths, classes in PINNED.items():
        for cls_name, methods in classes.items():
            real = getattr(_first_module(paths, cls_name), cls_name)
            stub = getattr(next(stubs[p] for p in paths if hasattr(stubs.get(p), cls_name)), cls_name)
            for m in methods:
                assert _params(getattr(real, m)) == _params(getattr(stub, m)), f"{cls_name}.{m}"
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
    for m in ("get_buffers", "get_block_ids_per_seq"):
        assert list(inspect.signature(getattr(KVCacheManager, m)).parameters)[:2] == \
            ["self", "layer_idx" if m == "get_buffers" else "request_ids"], m
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    reg = importlib.import_module(PLUGIN).register()
    from tensorrt_llm._torch.models.modeling_utils import MODEL_CLASS_MAPPING
    for arch in ARCHS:
        assert MODEL_CLASS_MAPPING[arch] is reg.classes[arch]
    sys.modules.pop(PLUGIN, None)
