"""Triton kernels of MLA decode over a paged latent cache, and of the cache write.

Decode splits each sequence's cache into chunks (the work of a batch spread over the SMs, as
FlashMLA and vLLM's Triton MLA do). A program takes BLOCK_R query rows (a row: one query position of
one head; all heads read the same cache rows) and one chunk, streams its cache rows through an online
softmax, and writes the chunk's normalised output and log-sum-exp. A second kernel merges the chunks
of each row by their LSEs. The split depends on the shapes only (never on cache_seqlens), so a decode
step is CUDA-graph safe and the result deterministic. Scores are kv_c . q_c + k_pe . q_r in float32
(the tensor cores' products, float32 sums); probabilities go into the value product in the cache's
dtype, as FlashAttention does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch, on


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b (the interpreter's bfloat16 dot misreads its operands: float32 there)."""
    if INTERPRETED:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _split_kernel(q, cache, table, lens, part_out, part_lse, Sq, H, DV, DR, n_blocks, page, max_blocks, chunk,
                  sqb, sqs, sqh, scb, scp, stb, scale, n_splits,
                  CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_DR: tl.constexpr, HAS_ROPE: tl.constexpr, PRECISION: tl.constexpr,
                  INTERPRETED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < Sq * H
    qi = rows // H
    qh = rows % H
    cap = max_blocks * page
    L = tl.minimum(tl.maximum(tl.load(lens + b), 0), cap)
    if CAUSAL:
        limit = tl.maximum(L - Sq + 1 + qi, 0)
    else:
        limit = tl.zeros([BLOCK_R], dtype=tl.int32) + L
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    dv = tl.arange(0, BLOCK_DV)
    q_row = q + b * sqb + qi.to(tl.int64) * sqs + qh.to(tl.int64) * sqh
    qc = tl.load(q_row[:, None] + dv[None, :], mask=r_ok[:, None] & (dv < DV)[None, :], other=0.0)
    if HAS_ROPE:
        dr = tl.arange(0, BLOCK_DR)
        qr = tl.load(q_row[:, None] + DV + dr[None, :], mask=r_ok[:, None] & (dr < DR)[None, :], other=0.0)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_ok = pos < end
        blk = tl.load(table + b * stb + pos // page, mask=p_ok, other=0)
        blk_ok = (blk >= 0) & (blk < n_blocks)  # a page outside the cache is read as nothing, and marks NaN
        use = p_ok & blk_ok
        row = cache + tl.where(use, blk, 0).to(tl.int64) * scb + (pos % page).to(tl.int64) * scp
        kc = tl.load(row[:, None] + dv[None, :], mask=use[:, None] & (dv < DV)[None, :], other=0.0)
        s = _mma(qc, tl.trans(kc), tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32), PRECISION, INTERPRETED)
        if HAS_ROPE:
            kr = tl.load(row[:, None] + DV + dr[None, :], mask=use[:, None] & (dr < DR)[None, :], other=0.0)
            s = _mma(qr, tl.trans(kr), s, PRECISION, INTERPRETED)
        s = s * scale
        visible = p_ok[None, :] & (pos[None, :] < limit[:, None])
        s = tl.where(visible, s, float("-inf"))
        s = tl.where(visible & (blk_ok == 0)[None, :], float("nan"), s)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible row yet: nothing to rescale
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = _mma(p.to(kc.dtype), kc, acc * alpha[:, None], PRECISION, INTERPRETED)
        m = m_new
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    base = (b * n_splits + split) * Sq * H + rows
    tl.store(part_out + base.to(tl.int64)[:, None] * BLOCK_DV + dv[None, :], out, mask=r_ok[:, None])
    tl.store(part_lse + base, lse, mask=r_ok)


@triton.jit
def _merge_kernel(part_out, part_lse, out, lse_out, Sq, H, DV, n_splits,
                  BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < Sq * H
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < n_splits
    idx = (b * n_splits + sp[None, :]) * Sq * H + rows[:, None]  # [BLOCK_R, BLOCK_S]
    lse = tl.load(part_lse + idx, mask=r_ok[:, None] & s_ok[None, :], other=float("-inf"))
    mx = tl.max(lse, 1)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx_safe[:, None])  # [BLOCK_R, BLOCK_S], 0 for empty chunks
    total = tl.sum(w, 1)
    dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for s in range(0, n_splits):
        ws = tl.sum(tl.where(sp[None, :] == s, w, 0.0), 1)
        part = tl.load(part_out + ((b * n_splits + s) * Sq * H + rows).to(tl.int64)[:, None] * BLOCK_DV + dv[None, :],
                       mask=r_ok[:, None], other=0.0)
        acc += tl.where(ws[:, None] > 0, part * ws[:, None], 0.0)
    empty = total == 0.0
    o = acc / tl.where(empty, 1.0, total)[:, None]
    qi = rows // H
    qh = rows % H
    tl.store(out + (b * Sq * H + rows).to(tl.int64)[:, None] * DV + dv[None, :], o.to(out.dtype.element_ty),
             mask=r_ok[:, None] & (dv < DV)[None, :])
    lse = tl.where(empty, float("-inf"), mx_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(lse_out + (b * H + qh) * Sq + qi, lse, mask=r_ok)


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the merge is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale: float, head_dim_v: int, causal: bool,
               num_splits: int | None = None):
    """q [B, Sq, H, D] (unit last stride), kv_cache [nb, page, D] (unit last stride), block_table int32
    [B, max_blocks] (unit last stride), cache_seqlens int32 [B] -> (out, lse). num_splits: chunks per
    sequence (default: enough programs for two waves over the SMs)."""
    B, Sq, H, D = q.shape
    nb, page, _ = kv_cache.shape
    max_blocks = block_table.shape[1]
    DV, DR = head_dim_v, D - head_dim_v
    device = q.device
    out = torch.empty(B, Sq, H, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    cap = max_blocks * page
    BLOCK_DV = triton.next_power_of_2(max(DV, 16))
    # a program's float32 output tile is BLOCK_R x BLOCK_DV: 16 rows of DeepSeek's 512 latent dims
    # (32 KiB of registers over 8 warps); narrower latents take more rows per pass over the cache
    BLOCK_R = 16 if Sq * H <= 16 or BLOCK_DV >= 512 else 32 if Sq * H <= 32 or BLOCK_DV >= 256 else 64
    BLOCK_N = 32 if device.type == "cuda" else 16
    row_blocks = triton.cdiv(Sq * H, BLOCK_R)
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(cap, BLOCK_N), triton.cdiv(2 * _sm_count(device), B * row_blocks)))
    chunk = triton.cdiv(triton.cdiv(max(cap, 1), num_splits), BLOCK_N) * BLOCK_N
    num_splits = max(1, triton.cdiv(cap, chunk))
    part_out = torch.empty(B, num_splits, Sq * H, BLOCK_DV, dtype=torch.float32, device=device)
    part_lse = torch.empty(B, num_splits, Sq * H, dtype=torch.float32, device=device)
    interp = device.type == "cpu"
    with on(device):
        launch(_split_kernel, (B, row_blocks, num_splits), q, kv_cache, block_table, cache_seqlens, part_out,
               part_lse, Sq, H, DV, DR, nb, page, max_blocks, chunk, q.stride(0), q.stride(1), q.stride(2),
               kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0), float(softmax_scale), num_splits,
               CAUSAL=causal, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_DV=BLOCK_DV,
               BLOCK_DR=triton.next_power_of_2(max(DR, 16)), HAS_ROPE=DR > 0,
               PRECISION="ieee" if q.dtype == torch.float32 else None, INTERPRETED=interp,
               num_warps=4 if BLOCK_DV <= 256 else 8, num_stages=2)
        launch(_merge_kernel, (B, row_blocks), part_out, part_lse, out, lse, Sq, H, DV, num_splits,
               BLOCK_R=BLOCK_R, BLOCK_DV=BLOCK_DV, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out, lse


@triton.jit
def _cache_write_kernel(cache, slots, kv_c, k_pe, n_slots, DC, DR, scb, scp, page, skc, skp,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    ok = (slot >= 0) & (slot < n_slots)  # skipped (< 0) or outside the cache: nothing written
    slot = tl.where(ok, slot, 0)
    row = cache + (slot // page) * scb + (slot % page) * scp
    c = tl.arange(0, BLOCK_C)
    v = tl.load(kv_c + t * skc + c, mask=c < DC, other=0.0)
    tl.store(row + c, v.to(cache.dtype.element_ty), mask=(tl.where(ok, c, DC) < DC))
    r = tl.arange(0, BLOCK_R)
    v = tl.load(k_pe + t * skp + r, mask=r < DR, other=0.0)
    tl.store(row + DC + r, v.to(cache.dtype.element_ty), mask=(tl.where(ok, r, DR) < DR))


def mla_cache_write(kv_cache, slot_mapping, kv_c, k_pe):
    """kv_cache [nb, page, D] (unit last stride), slot_mapping [T] contiguous, kv_c [T, DC] and k_pe
    [T, DR] with unit last strides; writes in place."""
    nb, page, _ = kv_cache.shape
    T, DC = kv_c.shape
    DR = k_pe.shape[1]
    if T == 0:
        return
    with on(kv_cache.device):
        launch(_cache_write_kernel, (T,), kv_cache, slot_mapping, kv_c, k_pe, nb * page, DC, DR, kv_cache.stride(0),
               kv_cache.stride(1), page, kv_c.stride(0), k_pe.stride(0), BLOCK_C=triton.next_power_of_2(max(DC, 1)),
               BLOCK_R=triton.next_power_of_2(max(DR, 1)), num_warps=4)
