"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache, in plain PyTorch: the CPU
kernel and the oracle of the Triton and CUDA kernels.

The cache holds, per token, the compressed KV latent kv_c (kv_lora_rank values, 512 in DeepSeek-V3)
followed by the rotary key k_pe (64): D = 576 values. With the up-projections absorbed into the query
(q_nope @ W_UK) and the output (@ W_UV, after attention), every head attends over the same cache rows:
keys are the whole D values, values the first head_dim_v. This is DeepSeek's own einsum formulation
of decode (scores = q_nope_absorbed . kv_c + q_pe . k_pe), read through a block table. No host syncs:
the pages of every sequence are gathered up to the table's capacity and masked by cache_seqlens.
"""
from __future__ import annotations

import torch


def cache_rows(kv_cache):
    """[num_blocks, page_size, D] view of a [num_blocks, page_size, D] or [.., 1, D] cache."""
    return kv_cache if kv_cache.dim() == 3 else kv_cache.squeeze(2)


def mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale: float, head_dim_v: int, causal: bool):
    """q [B, Sq, H, D] -> (out [B, Sq, H, head_dim_v] in q's dtype, lse float32 [B, H, Sq]).

    Query i of a sequence of length L sees positions < L - Sq + 1 + i (causal), else < L. A row that
    sees nothing gives zeros and lse -inf."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cache = cache_rows(kv_cache)
    nb, page, d = cache.shape
    b, sq, h, _ = q.shape
    cap = block_table.shape[1] * page
    table = block_table.long()
    bad = (table < 0) | (table >= nb)  # [B, max_blocks]
    k = cache[table.clamp(0, max(nb - 1, 0))].reshape(b, cap, d).to(acc)  # [B, cap, D]
    pos = torch.arange(cap, device=q.device)
    lens = cache_seqlens.long().clamp(0, cap)
    bad = bad.repeat_interleave(page, 1)  # [B, cap]: rows of pages outside the cache
    k = torch.where((pos[None, :] < lens[:, None])[..., None] & ~bad[..., None], k, 0.0)  # only real rows
    limit = lens[:, None].expand(b, sq)  # [B, Sq]
    if causal:
        limit = (limit - sq + 1 + torch.arange(sq, device=q.device)).clamp(min=0)
    visible = pos[None, None, :] < limit[:, :, None]  # [B, Sq, cap]
    s = torch.einsum("bqhd,bkd->bqhk", q.to(acc), k) * softmax_scale
    s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
    # a page outside the cache makes NaN for the rows that see it, never another page's values (the
    # value checks report it where they run)
    s = s.masked_fill((visible & bad[:, None, :])[:, :, None, :], float("nan"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Sq, H]; -inf where nothing is visible
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bqhk,bkd->bqhd", p, k[..., :head_dim_v])
    return out.to(q.dtype), lse.permute(0, 2, 1).contiguous().float()


def mla_cache_write(kv_cache, slot_mapping, kv_c, k_pe):
    """kv_cache[slot // page, slot % page] = [kv_c | k_pe] for every token with slot >= 0, in place."""
    cache = cache_rows(kv_cache)
    nb, page, d = cache.shape
    flat = cache.view(nb * page, d)
    slots = slot_mapping.long()
    keep = (slots >= 0) & (slots < nb * page)
    rows = torch.cat([kv_c, k_pe], dim=-1).to(cache.dtype)
    flat.index_copy_(0, slots[keep], rows[keep])
