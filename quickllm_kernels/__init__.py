"""quickllm_kernels: fused LLM ops with CUDA, Triton and PyTorch reference backends.

Every op is also `torch.ops.quickllm.<name>`, traceable by torch.compile and torch.export.
"""
from . import _library  # noqa: F401  (loads the CUDA extension or defines the schemas)
from .backend import BackendUnavailable, last_backends, reload_settings, use_backend
from .grpo import GRPOLossConfig, group_advantages, grpo_loss, grpo_loss_from_hidden, vllm_importance_sampling_ratio
from .info import info
from .fp8 import act_quant, fp8_block_gemm, weight_dequant
from .fp8.linear import FP8Linear
from .logprobs import linear_token_logprobs, token_logprobs
from .mla import mla_absorb, mla_cache_write, mla_decode
from .moe import (fp8_grouped_gemm, grouped_mm, moe_align_block_size, moe_combine, moe_experts, moe_permute,
                  moe_route, moe_sort, silu_mul)
from .norm import RMSNorm, add_rms_norm, add_rms_norm_, rms_norm
from .rope import apply_rope, rope_cache, rope_inv_freq, rope_softmax_scale

__version__ = "0.1.0"

__all__ = [
    "apply_rope", "rope_cache", "rope_inv_freq", "rope_softmax_scale", "token_logprobs", "linear_token_logprobs",
    "weight_dequant", "act_quant", "fp8_block_gemm", "FP8Linear", "moe_route",
    "grouped_mm", "fp8_grouped_gemm", "moe_sort", "moe_align_block_size", "moe_permute", "moe_combine", "silu_mul",
    "moe_experts", "mla_decode", "mla_cache_write", "mla_absorb",
    "group_advantages", "grpo_loss", "grpo_loss_from_hidden", "GRPOLossConfig", "vllm_importance_sampling_ratio", "rms_norm", "add_rms_norm", "add_rms_norm_",
    "RMSNorm",
    "use_backend", "BackendUnavailable", "last_backends", "reload_settings", "info", "__version__",
]
