"""Multi-head latent attention (DeepSeek-V2/V3): absorbed decode over a paged latent cache.

mla_decode: FlashMLA's contract (q [B, Sq, H, D] absorbed queries, a paged cache of [kv_c | k_pe]
rows, block_table, cache_seqlens) -> (out [B, Sq, H, head_dim_v], lse [B, H, Sq]); split over the
cache and merged by LSE, deterministic, CUDA-graph safe, any page size, bf16/fp16/fp32, any GPU (not
only Hopper). mla_cache_write: vLLM's concat_and_cache_mla. mla_absorb: the per-head W_UK and W_UV
of transformers' kv_b_proj, for the absorbed query (q_nope @ W_UK) and output (@ W_UV).
Backends: cuda (csrc/mla/mla.cu), triton (mla/triton.py), reference (mla/reference.py, DeepSeek's
einsum formulation).
"""
from __future__ import annotations

import math

import torch

from .._op import Impl, Op, call, define, unit_last
from . import reference as ref

__all__ = ["mla_decode", "mla_cache_write", "mla_absorb"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t):
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_cache(op, kv_cache):
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() not in (3, 4) or \
            (kv_cache.dim() == 4 and kv_cache.shape[2] != 1):
        raise ValueError(f"{op}: kv_cache must be [num_blocks, page_size, D] or [num_blocks, page_size, 1, D], "
                         f"got {_shape(kv_cache)}")
    if kv_cache.dtype not in _FLOATS:
        raise TypeError(f"{op}: kv_cache must be float32, float16 or bfloat16, got {kv_cache.dtype}")


def _decode_check(q, kv_cache, block_table, cache_seqlens, scale, head_dim_v, causal):
    op = "mla_decode"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be [batch, q_len, heads, D], got {_shape(q)}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}")
    _check_cache(op, kv_cache)
    if kv_cache.dtype != q.dtype:
        raise TypeError(f"{op}: kv_cache must have q's dtype {q.dtype}, got {kv_cache.dtype}")
    b, _, _, d = q.shape
    if kv_cache.shape[-1] != d:
        raise ValueError(f"{op}: kv_cache rows must hold D = {d} values (q's last dim), got {kv_cache.shape[-1]}")
    if not 1 <= head_dim_v <= d:
        raise ValueError(f"{op}: head_dim_v must lie in [1, D = {d}], got {head_dim_v}")
    for name, t, dims in (("block_table", block_table, 2), ("cache_seqlens", cache_seqlens, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dims or t.shape[0] != b:
            want = "[batch, max_blocks]" if dims == 2 else "[batch]"
            raise TypeError(f"{op}: {name} must be an int32 {want} tensor with batch = {b}, got "
                            f"{getattr(t, 'dtype', '?')} {_shape(t)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    if kv_cache.device != q.device:
        raise ValueError(f"{op}: kv_cache must be on q's device {q.device}, got {kv_cache.device}")
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: softmax_scale must be a positive finite float, got {scale!r}")


def _decode_sync(q, kv_cache, block_table, cache_seqlens, *_):
    nb, page = kv_cache.shape[0], kv_cache.shape[1]
    cap = block_table.shape[1] * page
    if cache_seqlens.numel() and (bool((cache_seqlens < 0).any()) or bool((cache_seqlens > cap).any())):
        raise ValueError(f"mla_decode: cache_seqlens must lie in [0, max_blocks * page_size = {cap}]")
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] * page < cache_seqlens[:, None].long()
    if bool((used & ((block_table < 0) | (block_table >= nb))).any()):
        raise ValueError(f"mla_decode: block_table holds pages outside the cache [0, {nb}) for a sequence's tokens")


def _decode_fake(q, kv_cache, block_table, cache_seqlens, scale, head_dim_v, causal):
    b, sq, h, _ = q.shape
    return q.new_empty((b, sq, h, head_dim_v)), q.new_empty((b, h, sq), dtype=torch.float32)


def _decode_triton(q, kv_cache, block_table, cache_seqlens, scale, head_dim_v, causal):
    from . import triton as tri
    return tri.mla_decode(unit_last(q), unit_last(ref.cache_rows(kv_cache)), unit_last(block_table),
                          cache_seqlens.contiguous(), scale, head_dim_v, causal)


def _decode_cuda(kernel, q, kv_cache, block_table, cache_seqlens, scale, head_dim_v, causal):
    return tuple(kernel(unit_last(q), unit_last(ref.cache_rows(kv_cache)), block_table, cache_seqlens, scale,
                        head_dim_v, causal))


define(Op(name="mla_decode", family="mla", check=_decode_check, fake=_decode_fake, reference=ref.mla_decode,
          triton=Impl(_decode_triton), cuda=Impl(_decode_cuda), sync_check=_decode_sync,
          kernel_limit=lambda q, *_: "float64 inputs" if q.dtype == torch.float64 else None))


def _write_check(kv_cache, slot_mapping, kv_c, k_pe):
    op = "mla_cache_write"
    _check_cache(op, kv_cache)
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be [tokens, dims], got {_shape(t)}")
        if t.dtype != kv_cache.dtype:
            raise TypeError(f"{op}: {name} must have kv_cache's dtype {kv_cache.dtype}, got {t.dtype}")
        if t.device != kv_cache.device:
            raise ValueError(f"{op}: {name} must be on kv_cache's device {kv_cache.device}, got {t.device}")
    t = kv_c.shape[0]
    if k_pe.shape[0] != t:
        raise ValueError(f"{op}: kv_c and k_pe must have the same tokens, got {kv_c.shape[0]} and {k_pe.shape[0]}")
    if kv_c.shape[1] + k_pe.shape[1] != kv_cache.shape[-1]:
        raise ValueError(f"{op}: kv_c and k_pe widths ({kv_c.shape[1]} + {k_pe.shape[1]}) must add up to the "
                         f"cache's D = {kv_cache.shape[-1]}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int32, torch.int64) or \
            tuple(slot_mapping.shape) != (t,):
        raise TypeError(f"{op}: slot_mapping must be an int32 or int64 [{t}] tensor, got "
                        f"{getattr(slot_mapping, 'dtype', '?')} {_shape(slot_mapping)}")
    if slot_mapping.device != kv_cache.device:
        raise ValueError(f"{op}: slot_mapping must be on kv_cache's device {kv_cache.device}, got {slot_mapping.device}")


def _write_sync(kv_cache, slot_mapping, kv_c, k_pe):
    n = kv_cache.shape[0] * kv_cache.shape[1]
    if slot_mapping.numel() and bool((slot_mapping >= n).any()):
        raise ValueError(f"mla_cache_write: slot_mapping holds slots past the cache's {n} (num_blocks * page_size)")


def _write_triton(kv_cache, slot_mapping, kv_c, k_pe):
    from . import triton as tri
    cache = ref.cache_rows(kv_cache)
    if cache.shape[-1] > 1 and cache.stride(-1) != 1:
        ref.mla_cache_write(kv_cache, slot_mapping, kv_c, k_pe)  # (a cache with strided rows: rare)
        return
    tri.mla_cache_write(cache, slot_mapping.contiguous(), unit_last(kv_c), unit_last(k_pe))


def _write_cuda_supports(kv_cache, slot_mapping, kv_c, k_pe):
    cache = ref.cache_rows(kv_cache)
    return "a cache with strided rows" if cache.shape[-1] > 1 and cache.stride(-1) != 1 else None


define(Op(name="mla_cache_write", family="mla", check=_write_check, fake=lambda *args: None,
          reference=ref.mla_cache_write, triton=Impl(_write_triton),
          cuda=Impl(lambda kernel, kv_cache, slots, kv_c, k_pe: kernel(kv_cache, slots, unit_last(kv_c), unit_last(k_pe)),
                    supports=_write_cuda_supports), sync_check=_write_sync,
          kernel_limit=lambda kv_cache, *_: "float64 inputs" if kv_cache.dtype == torch.float64 else None))


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor, *,
               softmax_scale: float, head_dim_v: int, causal: bool = True):
    """softmax(q k^T * softmax_scale) v over each sequence's cached tokens, for every head and query:
    (out [B, Sq, H, head_dim_v] in q's dtype, lse float32 [B, H, Sq]).

    q: [B, Sq, H, D], the absorbed query (q_nope @ W_UK, then q_pe; DeepSeek-V3: D = 576 = 512 + 64).
    kv_cache: [num_blocks, page_size, D] or [num_blocks, page_size, 1, D] in q's dtype, [kv_c | k_pe]
    per token; keys are all D values, values the first head_dim_v. block_table: int32 [B, max_blocks],
    the pages of each sequence; cache_seqlens: int32 [B]. softmax_scale has no default (DeepSeek-V3:
    192**-0.5 times YaRN's mscale**2, see rope_softmax_scale). With causal and Sq > 1, query i sees
    positions < cache_seqlens - Sq + 1 + i. Any page size. A sequence of length 0 gives zeros and
    lse -inf. Nothing is read on the host; a page outside the cache makes NaN, never another page's
    values (an error on the CPU and with QUICKLLM_SYNC_CHECKS=1).
    """
    if isinstance(softmax_scale, int) and not isinstance(softmax_scale, bool):
        softmax_scale = float(softmax_scale)
    return tuple(call("mla_decode", q, kv_cache, block_table, cache_seqlens, softmax_scale, int(head_dim_v),
                      bool(causal)))


def mla_cache_write(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> None:
    """kv_cache[slot // page_size, slot % page_size] = [kv_c | k_pe] for each token (in place; vLLM's
    concat_and_cache_mla). slot_mapping: int32/int64 [T], slot = block * page_size + offset, < 0
    skips a token. kv_c [T, kv_lora_rank], k_pe [T, rope_dim], in the cache's dtype."""
    call("mla_cache_write", kv_cache, slot_mapping, kv_c, k_pe)


def mla_absorb(kv_b_proj_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int):
    """(w_uk [H, qk_nope_head_dim, kv_lora_rank], w_uv [H, kv_lora_rank, v_head_dim]) from
    transformers' kv_b_proj.weight [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank] (bf16, or an
    FP8 weight dequantised first): q_absorbed = q_nope @ w_uk, out_head = attn_latent @ w_uv."""
    w = kv_b_proj_weight
    if w.dim() != 2 or w.shape[0] != num_heads * (qk_nope_head_dim + v_head_dim):
        raise ValueError(f"mla_absorb: kv_b_proj_weight must be [num_heads * (qk_nope_head_dim + v_head_dim), "
                         f"kv_lora_rank] = [{num_heads * (qk_nope_head_dim + v_head_dim)}, r], got {_shape(w)}")
    if w.dtype == torch.float8_e4m3fn:
        raise TypeError("mla_absorb: dequantise an FP8 kv_b_proj first (weight_dequant with its weight_scale_inv)")
    w = w.view(num_heads, qk_nope_head_dim + v_head_dim, w.shape[1])
    return w[:, :qk_nope_head_dim].contiguous(), w[:, qk_nope_head_dim:].transpose(1, 2).contiguous()
