"""Public entry points of every op; importing this registers all of them with torch.library."""
from .fp8 import act_quant, fp8_block_gemm, weight_dequant
from .logprobs import linear_token_logprobs, token_logprobs
from .rope import apply_rope, rope_cache, rope_inv_freq, rope_softmax_scale

# Op name -> the public function, for info() and the demo.
OPS = {"apply_rope": apply_rope, "token_logprobs": token_logprobs, "weight_dequant": weight_dequant,
       "act_quant": act_quant, "fp8_block_gemm": fp8_block_gemm}

__all__ = ["apply_rope", "rope_cache", "rope_inv_freq", "rope_softmax_scale", "token_logprobs",
           "linear_token_logprobs", "weight_dequant", "act_quant",
           "fp8_block_gemm", "OPS"]
