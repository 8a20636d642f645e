"""Public entry points of every op; importing this registers all of them with torch.library
(quickllm_kernels._op.OPS lists their declarations)."""
from .fp8 import act_quant, fp8_block_gemm, weight_dequant
from .logprobs import linear_token_logprobs, token_logprobs
from .rope import apply_rope, rope_cache, rope_inv_freq, rope_softmax_scale

__all__ = ["apply_rope", "rope_cache", "rope_inv_freq", "rope_softmax_scale", "token_logprobs",
           "linear_token_logprobs", "weight_dequant", "act_quant", "fp8_block_gemm"]
