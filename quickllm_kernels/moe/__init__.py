"""Mixture-of-experts ops.

moe_route: router logits -> (weights, expert ids) for Mixtral (softmax, top-k, renormalised),
Qwen-MoE (softmax, top-k, optionally renormalised) and DeepSeek-V3 (sigmoid, correction bias for the
choice, group-limited top-k, renormalised, scaled). Backends: cuda (csrc/moe/moe.cu), triton
(moe/triton.py), reference (moe/reference.py). The weights are differentiable in the logits (the
router trains); the ids are not.
"""
from __future__ import annotations

import torch

from .._op import Impl, Op, call, define, unit_last
from . import reference as ref

__all__ = ["moe_route"]

_SCORING = {"softmax": False, "sigmoid": True}
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_EXPERTS = 1024  # experts of one router the kernels hold in registers (DeepSeek-V3: 256)
MAX_TOP_K = 32


def _check(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"moe_route: router_logits must be [tokens, experts], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"moe_route: router_logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    e = logits.shape[1]
    if e == 0:
        raise ValueError("moe_route: router_logits has no experts (shape[1] == 0)")
    if not 1 <= top_k <= e:
        raise ValueError(f"moe_route: top_k must lie in [1, {e}] (the number of experts), got {top_k}")
    if bias is not None:
        if bias.shape != (e,):
            raise ValueError(f"moe_route: correction_bias must be [{e}] (one per expert), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"moe_route: correction_bias must be a float tensor, got {bias.dtype}")
        if bias.device != logits.device:
            raise ValueError(f"moe_route: correction_bias must be on router_logits' device {logits.device}, "
                             f"got {bias.device}")
    if n_group < 0 or topk_group < 0:
        raise ValueError(f"moe_route: n_group and topk_group must not be negative, got {n_group} and {topk_group}")
    if n_group > 1:
        if e % n_group:
            raise ValueError(f"moe_route: the number of experts ({e}) must be divisible by n_group ({n_group})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"moe_route: topk_group must lie in [1, n_group = {n_group}], got {topk_group}")
        if top_k > topk_group * (e // n_group):
            raise ValueError(f"moe_route: top_k ({top_k}) is more than the experts of topk_group ({topk_group}) "
                             f"groups of {e // n_group}")
    if scale != scale:
        raise ValueError("moe_route: routed_scaling_factor is NaN")


def _kernel_limit(logits, bias, top_k, *_):
    if logits.dtype == torch.float64 or (bias is not None and bias.dtype == torch.float64):
        return "float64 inputs"
    if logits.shape[1] > MAX_EXPERTS or top_k > MAX_TOP_K:
        return f"more than {MAX_EXPERTS} experts or top_k > {MAX_TOP_K}"
    return None


def _triton(logits, bias, *args):
    from . import triton as tri
    return tri.moe_route(unit_last(logits), None if bias is None else bias.float().contiguous(), *args)


def _cuda_supports(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale):
    return f"n_group = {n_group} (at most 64 groups)" if n_group > 64 else None


def _cuda(kernel, logits, bias, *args):
    return kernel(unit_last(logits), None if bias is None else bias.float().contiguous(), *args)


def _fake(logits, bias, top_k, *_):
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t, top_k), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _, _, sigmoid, renormalize, _, _, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.args = (sigmoid, renormalize, scale)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g_w, _g_ids):
    """The weights are a smooth function of the logits for the chosen ids (the choice itself is
    piecewise constant): differentiate that function, in PyTorch, whatever backend chose."""
    logits, ids = ctx.saved_tensors
    sigmoid, renormalize, scale = ctx.args
    if g_w is None or not ctx.needs_input_grad[0]:
        return (None,) * 8
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        w = ref.weights_of(ref.scores_of(z, sigmoid), ids, sigmoid, renormalize, scale)
        (grad,) = torch.autograd.grad(w, z, g_w.to(w.dtype))
    return (grad.to(logits.dtype),) + (None,) * 7


define(Op(name="moe_route", family="moe", check=_check, fake=_fake, reference=ref.moe_route,
          triton=Impl(_triton), cuda=Impl(_cuda, supports=_cuda_supports), kernel_limit=_kernel_limit,
          backward=_backward, setup_context=_setup_context))


def moe_route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
              correction_bias: torch.Tensor | None = None, n_group: int | None = None,
              topk_group: int | None = None, routed_scaling_factor: float = 1.0):
    """Route each token to its top_k experts: (topk_weights float32 [T, k], topk_ids int32 [T, k]).

    router_logits: [T, E] (any float dtype, any strides; scores are computed in float32).
    scoring: "softmax" (Mixtral, Qwen-MoE: softmax over all E, then top-k) or "sigmoid" (DeepSeek-V3).
    correction_bias: [E], added to the scores for the choice only (DeepSeek-V3's e_score_correction_bias).
    n_group, topk_group: group-limited routing: the E experts form n_group groups, each scored by the
        sum of its two best (biased) scores; only the topk_group best groups compete.
    renormalize: the k weights sum to one (sigmoid: divided by their sum + 1e-20).
    routed_scaling_factor: the weights are multiplied by it last.

    The k choices of a token come highest choice score first, the lower expert id first among equal
    scores, on every backend. Matches transformers' MixtralTopKRouter, Qwen3MoeTopKRouter and
    DeepseekV3TopkRouter as sets of (id, weight) per token (their torch.topk breaks ties its own way). The weights are
    differentiable in router_logits. T = 0 gives empty outputs.
    """
    if scoring not in _SCORING:
        raise ValueError(f"moe_route: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if (n_group is None) != (topk_group is None):
        raise ValueError("moe_route: n_group and topk_group go together (both or neither)")
    return tuple(call("moe_route", router_logits, correction_bias, int(top_k), _SCORING[scoring], bool(renormalize),
                      int(n_group or 0), int(topk_group or 0), float(routed_scaling_factor)))
