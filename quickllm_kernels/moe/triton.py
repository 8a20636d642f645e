"""Triton kernel of MoE routing: one program per token, the experts of a row in registers laid out as
[groups, experts per group] (one group without grouping), the top-k found by k rounds of max and
lowest-index-of-the-max, so a tie goes to the lower expert id."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch, on


@triton.jit
def _route_kernel(logits, bias, w_out, id_out, E, stride_t, scale,
                  TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                  N_GROUP: tl.constexpr, GSIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_S)[None, :]
    flat = g * GSIZE + j
    valid = (g < N_GROUP) & (j < GSIZE)
    z = tl.load(logits + t * stride_t + flat, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-z))
    else:
        m = tl.max(tl.max(z, 1), 0)
        e = tl.where(valid, tl.exp(z - m), 0.0)
        s = e / tl.sum(tl.sum(e, 1), 0)
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias + flat, mask=valid, other=0.0).to(tl.float32)
    c = tl.where(valid & (c == c), c, float("-inf"))  # NaN is never chosen over a number
    if N_GROUP > 1:
        # a group's score: the sum of its two best choice scores
        best = tl.max(c, 1)
        first = tl.min(tl.where(c == best[:, None], j, BLOCK_S), 1)
        second = tl.max(tl.where(j == first[:, None], float("-inf"), c), 1)
        if GSIZE > 1:
            gs = best + second
        else:
            gs = best
        gi = tl.arange(0, BLOCK_G)
        gs = tl.where(gi < N_GROUP, gs, float("-inf"))
        gs = tl.where(gs == gs, gs, float("-inf"))
        gtaken = gi < 0
        for _ in tl.static_range(TOPK_GROUP):
            gm = tl.max(gs, 0)
            gsel = tl.min(tl.where((gs == gm) & (gi < N_GROUP) & (gtaken == 0), gi, BLOCK_G), 0)
            gtaken = gtaken | (gi == gsel)
            gs = tl.where(gi == gsel, float("-inf"), gs)
        c = tl.where(gtaken[:, None], c, float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    ws = tl.zeros([BLOCK_K], dtype=tl.float32)
    taken = flat < 0
    for i in tl.static_range(TOP_K):
        mx = tl.max(tl.max(tl.where(taken, float("-inf"), c), 1), 0)
        pick = tl.min(tl.min(tl.where((c == mx) & valid & (taken == 0), flat, 1 << 30), 1), 0)
        taken = taken | (flat == pick)
        w = tl.sum(tl.sum(tl.where(flat == pick, s, 0.0), 1), 0)
        ids = tl.where(kk == i, pick, ids)
        ws = tl.where(kk == i, w, ws)
    if RENORM:
        total = tl.sum(tl.where(kk < TOP_K, ws, 0.0), 0)
        if SIGMOID:
            total = total + 1e-20
        ws = ws / total
    ws = ws * scale
    tl.store(w_out + t * TOP_K + kk, ws, mask=kk < TOP_K)
    tl.store(id_out + t * TOP_K + kk, ids, mask=kk < TOP_K)


def moe_route(router_logits, correction_bias, top_k: int, sigmoid: bool, renormalize: bool, n_group: int,
              topk_group: int, routed_scaling_factor: float):
    """router_logits [T, E] (unit last stride) -> float32 weights and int32 ids [T, top_k], contiguous."""
    T, E = router_logits.shape
    w = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T == 0 or top_k == 0:
        return w, ids
    groups = n_group if n_group > 1 else 1
    gsize = E // groups
    with on(router_logits.device):
        launch(_route_kernel, (T,), router_logits, correction_bias if correction_bias is not None else w, w, ids, E,
               router_logits.stride(0), float(routed_scaling_factor), TOP_K=top_k, SIGMOID=sigmoid,
               RENORM=renormalize, HAS_BIAS=correction_bias is not None, N_GROUP=groups, GSIZE=gsize,
               TOPK_GROUP=topk_group if groups > 1 else 1, BLOCK_G=triton.next_power_of_2(groups),
               BLOCK_S=triton.next_power_of_2(gsize), BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return w, ids
