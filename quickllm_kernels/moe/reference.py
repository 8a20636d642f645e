"""Mixture-of-experts routing in plain PyTorch: the CPU kernel and the oracle of the Triton and CUDA
kernels.

route: router logits [T, E] -> (weights float32 [T, k], expert ids int32 [T, k]), highest choice score
first. Scores are softmax (Mixtral, Qwen-MoE) or sigmoid (DeepSeek-V3) of the float32 logits; an
optional correction bias is added for the choice only (DeepSeek-V3's noaux_tc); with groups, each
group of E / n_group experts is scored by the sum of its two best choice scores and only the best
topk_group groups compete. Weights are the unbiased scores of the chosen experts, renormalised to sum
to one if asked (sigmoid adds 1e-20 to the sum, as transformers does), times routed_scaling_factor.
The k experts of a token come highest choice score first, the lower expert id first among equal
scores. A NaN logit is never chosen over a number; a row of NaNs gets valid ids and NaN weights.
"""
from __future__ import annotations

import torch

SIGMOID_EPS = 1e-20  # added to the sum of sigmoid weights before renormalising (transformers' DeepseekV3)


def scores_of(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    z = logits if logits.dtype == torch.float64 else logits.float()
    return z.sigmoid() if sigmoid else z.softmax(-1)


def choice_of(scores, bias, n_group: int, topk_group: int) -> torch.Tensor:
    """The scores the top-k runs over: biased, NaN as -inf, experts of unchosen groups at -inf."""
    choice = scores + bias.to(scores.dtype) if bias is not None else scores
    choice = torch.where(choice.isnan(), float("-inf"), choice)
    if n_group > 1:
        t, e = choice.shape
        g = choice.view(t, n_group, e // n_group)
        group_scores = g.topk(min(2, e // n_group), dim=-1).values.sum(-1)
        group_scores = torch.where(group_scores.isnan(), float("-inf"), group_scores)  # inf + -inf
        # the best groups, the lower group first among equal scores (a stable sort), as the kernels do
        best = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=choice.device)
        keep.scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, 1), float("-inf"))
    return choice


def weights_of(scores, ids, sigmoid: bool, renormalize: bool, routed_scaling_factor: float) -> torch.Tensor:
    w = scores.gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + (SIGMOID_EPS if sigmoid else 0.0))
    return w * routed_scaling_factor


def moe_route(router_logits, correction_bias, top_k: int, sigmoid: bool, renormalize: bool, n_group: int,
              topk_group: int, routed_scaling_factor: float):
    scores = scores_of(router_logits, sigmoid)
    # highest choice first, the lower expert id among equals (a stable sort), as the kernels do
    ids = choice_of(scores, correction_bias, n_group, topk_group).sort(dim=-1, descending=True, stable=True).indices
    ids = ids[:, :top_k]
    weights = weights_of(scores, ids, sigmoid, renormalize, routed_scaling_factor)
    return weights.float(), ids.int()
