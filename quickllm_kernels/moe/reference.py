"""Mixture-of-experts ops in plain PyTorch: the CPU kernels and the oracle of the Triton and CUDA
kernels. Routing first, then the grouped GEMMs and the dispatch ops (see their sections).

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


# --------------------------------------------------------------------------------------------
# Grouped GEMMs. offs [E] are cumulative row ends: expert e owns rows offs[e-1]:offs[e] (offs[-1] = 0).
# The reference reads offs on the host (a sync on a GPU); the kernels never do.
# --------------------------------------------------------------------------------------------


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(offs, rows: int):
    """(expert, first row, end row) of each expert; offs clamped to [0, rows] and made non-decreasing,
    as the kernels read a malformed offs (which the value checks report where they run)."""
    start = 0
    for e, end in enumerate(offs.tolist()):
        end = max(start, min(max(end, 0), rows))
        yield e, start, end
        start = end


def grouped_mm(x, w, offs):
    """y[rows of e] = x[rows of e] @ w[e]^T, float32 accumulation, in x's dtype."""
    acc = _acc(x.dtype)
    y = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    for e, r0, r1 in _segments(offs, x.shape[0]):
        if r1 > r0:
            y[r0:r1] = (x[r0:r1].to(acc) @ w[e].to(acc).T).to(x.dtype)
    return y


def grouped_mm_wgrad(dy, x, offs, num_experts: int):
    """dw[e] = dy[rows of e]^T @ x[rows of e] -> [E, N, K] in x's dtype, zero for an expert without rows."""
    acc = _acc(x.dtype)
    dw = torch.zeros(num_experts, dy.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    for e, r0, r1 in _segments(offs, x.shape[0]):
        if r1 > r0:
            dw[e] = (dy[r0:r1].to(acc).T @ x[r0:r1].to(acc)).to(x.dtype)
    return dw


def fp8_grouped_gemm(a, a_scales, w, w_scales, offs, out_dtype):
    """fp8_block_gemm of each expert's rows with its weight and block scales."""
    from ..fp8 import reference as fp8_ref  # noqa: PLC0415
    y = torch.zeros(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)
    for e, r0, r1 in _segments(offs, a.shape[0]):
        if r1 > r0:
            y[r0:r1] = fp8_ref.fp8_block_gemm(a[r0:r1], a_scales[r0:r1], w[e], w_scales[e], out_dtype)
    return y


# --------------------------------------------------------------------------------------------
# Dispatch and combine: the (token, choice) pairs of topk_ids [T, k] in expert order and back.
# Pair p = t * k + j is choice j of token t. No host syncs (these run on any device as they are).
# --------------------------------------------------------------------------------------------


def _sorted(topk_ids, num_experts: int):
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # bad ids sort after every expert
    keys, order = key.sort(stable=True)
    experts = torch.arange(num_experts, device=flat.device)
    ends = torch.searchsorted(keys, experts, right=True)
    return flat, valid, keys, order, ends


def moe_sort(topk_ids, num_experts: int):
    """(sorted_pairs, pair_rows, offs), int32: the pairs stably sorted by expert."""
    flat, valid, _, order, ends = _sorted(topk_ids, num_experts)
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=order.device)
    rows = torch.where(valid, rows, -1)
    return order.int(), rows.int(), ends.int()


def align_size(numel: int, num_experts: int, block_size: int) -> int:
    """Length of sorted_token_ids: every expert's run padded to a multiple of block_size (at most
    block_size - 1 pads each, and no more blocks than pairs when there are fewer pairs than experts)."""
    size = numel + num_experts * (block_size - 1)
    return min(size, numel * block_size) if numel < num_experts else size


def moe_align_block_size(topk_ids, num_experts: int, block_size: int):
    """vLLM's contract: (sorted_token_ids, expert_ids, num_tokens_post_pad), int32."""
    numel = topk_ids.numel()
    size = align_size(numel, num_experts, block_size)
    n_blocks = -(-size // block_size)
    device = topk_ids.device
    flat, valid, keys, order, ends = _sorted(topk_ids, num_experts)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + block_size - 1) // block_size * block_size
    pad_ends = padded.cumsum(0)
    pad_starts = pad_ends - padded
    starts = ends - counts
    i = torch.arange(numel, device=device)
    e_of = keys.clamp(max=num_experts - 1)
    dest = pad_starts[e_of] + (i - starts[e_of])
    dest = torch.where(keys < num_experts, dest, size)  # bad ids go nowhere
    sorted_ids = torch.full((size + 1,), numel, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, dest, order)
    total = pad_ends[-1:]
    b = torch.arange(n_blocks, device=device) * block_size
    expert_ids = torch.searchsorted(pad_ends, b, right=True)
    expert_ids = torch.where(b < total, expert_ids, -1)
    return sorted_ids[:size].int(), expert_ids.int(), total.int()


def moe_permute(x, sorted_pairs, top_k: int):
    return x.index_select(0, torch.div(sorted_pairs.long(), top_k, rounding_mode="floor"))


def moe_combine(y, topk_weights, pair_rows):
    """out[t] = sum_j w[t, j] * y[pair_rows[t * k + j]], rows < 0 adding nothing."""
    t, k = topk_weights.shape
    acc = _acc(y.dtype)
    rows = pair_rows.view(t, k).long()
    valid = (rows >= 0)[..., None]
    g = y.index_select(0, rows.clamp(min=0).view(-1)).view(t, k, y.shape[1]).to(acc)
    g = torch.where(valid, g * topk_weights.to(acc)[..., None], 0.0)
    return g.sum(1).to(y.dtype)


def silu_mul(h):
    acc = _acc(h.dtype)
    i = h.shape[-1] // 2
    g, u = h[..., :i].to(acc), h[..., i:].to(acc)
    return (torch.nn.functional.silu(g) * u).to(h.dtype)


def silu_mul_backward(grad, h):
    acc = _acc(h.dtype)
    i = h.shape[-1] // 2
    g, u, d = h[..., :i].to(acc), h[..., i:].to(acc), grad.to(acc)
    s = torch.sigmoid(g)
    dg = d * u * s * (1 + g * (1 - s))
    du = d * g * s
    return torch.cat([dg, du], -1).to(h.dtype)
