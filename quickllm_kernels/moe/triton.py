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


# --------------------------------------------------------------------------------------------
# Grouped GEMMs. offs [E] are cumulative row ends, read on the device: a program finds its expert
# and row tile from them, so nothing waits for the host. The grid has an upper bound of row tiles,
# cdiv(S, BM) + E (the segments of the E experts and the tail after offs[E-1] hold at most that many
# tiles); programs past the last tile exit. offs are clamped to [0, S] and made non-decreasing, so
# a malformed offs never takes a kernel out of bounds; rows past offs[E-1] (the tail) are written as
# zeros, so every row of the output is written once.
# --------------------------------------------------------------------------------------------


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _segments(offs, E, S, BLOCK_E: tl.constexpr):
    """(index, start, end) vectors of the E expert segments and the tail (slot E); BLOCK_E > E."""
    ei = tl.arange(0, BLOCK_E)
    ends = tl.load(offs + ei, mask=ei < E, other=S).to(tl.int32)
    prev = tl.load(offs + ei - 1, mask=(ei > 0) & (ei <= E), other=0).to(tl.int32)
    prev = tl.where(ei > E, S, prev)
    ends = tl.associative_scan(tl.minimum(tl.maximum(ends, 0), S), 0, _max2)
    starts = tl.associative_scan(tl.minimum(tl.maximum(prev, 0), S), 0, _max2)
    return ei, starts, tl.maximum(ends, starts)


@triton.jit
def _pick(ei, v, e):
    return tl.sum(tl.where(ei == e, v, 0), 0)


@triton.jit
def _row_tile(offs, E, S, pid, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """(segment e (E: the tail), first row, end row, has a tile) of row-tile program `pid`."""
    ei, starts, ends = _segments(offs, E, S, BLOCK_E)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pid).to(tl.int32), 0)
    first = _pick(ei, cum - tiles, e)
    row0 = _pick(ei, starts, e) + (pid - first) * BM
    return e, row0, _pick(ei, ends, e), pid < tl.sum(tiles, 0)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b. The interpreter's bfloat16 dot misreads its operands (Triton 3.8, 3.9), so there
    the tiles go in as float32: the same numbers, as 16-bit float products are exact in float32.
    (INTERPRETED is False wherever a GPU compiles the kernel.)"""
    if INTERPRETED:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _grouped_mm_kernel(x, w, offs, y, S, N, K, E, sxm, swe, swn, swk,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr,
                       PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    e, row0, row_end, live = _row_tile(offs, E, S, tl.program_id(0), BM, BLOCK_E)
    if live:
        rm = row0 + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < row_end
        n_ok = rn < N
        x_ptr = x + rm.to(tl.int64)[:, None] * sxm + rk[None, :]
        w_ptr = w + e.to(tl.int64) * swe + rn.to(tl.int64)[None, :] * swn + rk.to(tl.int64)[:, None] * swk
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        steps = tl.where(e < E, tl.cdiv(K, BK), 0)  # the tail is zeros
        for kb in range(0, steps):
            k_ok = rk < K - kb * BK
            a = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, INTERPRETED)
            x_ptr += BK
            w_ptr += BK * swk
        tl.store(y + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _precision(t):
    """tl.dot's input_precision for t's dtype (float32: exact, IEEE, not TF32, as the reference), and
    whether the kernel runs in the interpreter (CPU tensors), which takes the _mma workaround."""
    return dict(PRECISION="ieee" if t.dtype == torch.float32 else None, INTERPRETED=t.device.type == "cpu")


def _gemm_tiles(S: int, E: int, dtype) -> dict:
    """Row tiles sized to the rows an expert gets on average (decode: a few; prefill: hundreds)."""
    avg = S / max(E, 1)
    bm = 16 if avg <= 16 else 32 if avg <= 32 else 64 if avg <= 64 else 128
    bn = 64 if bm <= 32 else 128
    bk = 32 if dtype == torch.float32 else 64
    return dict(BM=bm, BN=bn, BK=bk, num_warps=4 if bm * bn <= 64 * 64 else 8, num_stages=3)


def _block_e(E: int) -> int:
    return triton.next_power_of_2(E + 1)


def grouped_mm(x, w, offs):
    """x [S, K] (unit last stride), w [E, N, K] any strides, offs int32 [E] -> y [S, N] contiguous."""
    S, K = x.shape
    E, N, _ = w.shape
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if S == 0 or N == 0:
        return y
    cfg = _gemm_tiles(S, E, x.dtype)
    grid = (triton.cdiv(S, cfg["BM"]) + E, triton.cdiv(N, cfg["BN"]))
    with on(x.device):
        launch(_grouped_mm_kernel, grid, x, w, offs, y, S, N, K, E, x.stride(0), w.stride(0), w.stride(1),
               w.stride(2), BLOCK_E=_block_e(E), **_precision(x), **cfg)
    return y


@triton.jit
def _wgrad_kernel(dy, x, offs, dw, S, N, K, E, sdm, sxm,
                  BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BLOCK_E: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # program (tile of [N, K], expert): dw[e] tile = sum over the expert's rows of dy^T x
    e = tl.program_id(1)
    n_tiles_k = tl.cdiv(K, BK)
    rn = (tl.program_id(0) // n_tiles_k) * BN + tl.arange(0, BN)
    rk = (tl.program_id(0) % n_tiles_k) * BK + tl.arange(0, BK)
    ei, starts, ends = _segments(offs, E, S, BLOCK_E)
    r0 = _pick(ei, starts, e)
    r1 = _pick(ei, ends, e)
    n_ok = rn < N
    k_ok = rk < K
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for r in range(r0, r1, BR):
        rr = r + tl.arange(0, BR)
        r_ok = rr < r1
        g = tl.load(dy + rr.to(tl.int64)[:, None] * sdm + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(x + rr.to(tl.int64)[:, None] * sxm + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(tl.trans(g), a, acc, PRECISION, INTERPRETED)
    base = dw + e.to(tl.int64) * N * K
    tl.store(base + rn.to(tl.int64)[:, None] * K + rk[None, :], acc.to(dw.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


def grouped_mm_wgrad(dy, x, offs, num_experts: int):
    """dy [S, N], x [S, K] (unit last strides), offs int32 [E] -> dw [E, N, K] contiguous."""
    S, N = dy.shape
    K = x.shape[1]
    dw = torch.empty(num_experts, N, K, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    BN, BK = 64, 64
    BR = 16 if S / num_experts <= 16 else 32 if x.dtype == torch.float32 else 64
    grid = (triton.cdiv(N, BN) * triton.cdiv(K, BK), num_experts)
    with on(x.device):
        launch(_wgrad_kernel, grid, dy, x, offs, dw, S, N, K, num_experts, dy.stride(0), x.stride(0), BN=BN, BK=BK,
               BR=BR, BLOCK_E=_block_e(num_experts), **_precision(x), num_warps=4, num_stages=3)
    return dw


@triton.jit
def _fp8_grouped_kernel(a, a_s, w, w_s, offs, y, S, N, K, E, sam, sasm, swe, swn, swse, swsn,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr,
                        IMPRECISE: tl.constexpr):
    e, row0, row_end, live = _row_tile(offs, E, S, tl.program_id(0), BM, BLOCK_E)
    if live:
        pid_n = tl.program_id(1)
        rm = row0 + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < row_end
        n_ok = rn < N
        a_ptr = a + rm.to(tl.int64)[:, None] * sam + rk[None, :]
        w_ptr = w + e.to(tl.int64) * swe + rn.to(tl.int64)[:, None] * swn + rk[None, :]
        # BN divides 128 and tiles start at multiples of BN: one w_scales row per tile
        ws_ptr = w_s + e.to(tl.int64) * swse + ((pid_n * BN) // 128).to(tl.int64) * swsn
        as_ptr = a_s + rm.to(tl.int64) * sasm
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        steps = tl.where(e < E, tl.cdiv(K, BK), 0)
        for kb in range(0, steps):
            k_ok = rk < K - kb * BK
            A = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            B = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(A, tl.trans(B), max_num_imprecise_acc=IMPRECISE)  # one 128-wide block, from zero
            sa = tl.load(as_ptr + kb, mask=m_ok, other=0.0)
            sb = tl.load(ws_ptr + kb)
            acc += part * (sa * sb)[:, None]
            a_ptr += BK
            w_ptr += BK
        tl.store(y + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def fp8_grouped_gemm(a, a_scales, w, w_scales, offs, out_dtype):
    """a [S, K] fp8 (unit last stride), a_scales float32 [S, Kb] (unit last stride), w [E, N, K] fp8
    contiguous, w_scales float32 [E, Nb, Kb] contiguous, offs int32 [E] -> y [S, N] out_dtype."""
    from ..fp8.triton import IMPRECISE_ACC  # noqa: PLC0415
    S, K = a.shape
    E, N, _ = w.shape
    y = torch.empty(S, N, dtype=out_dtype, device=a.device)
    if S == 0 or N == 0:
        return y
    avg = S / E
    BM = 16 if avg <= 16 else 64 if avg <= 64 else 128
    BN = 64 if BM <= 64 else 128
    grid = (triton.cdiv(S, BM) + E, triton.cdiv(N, BN))
    with on(a.device):
        launch(_fp8_grouped_kernel, grid, a, a_scales, w, w_scales, offs, y, S, N, K, E, a.stride(0),
               a_scales.stride(0), w.stride(0), w.stride(1), w_scales.stride(0), w_scales.stride(1), BM=BM, BN=BN,
               BK=128, BLOCK_E=_block_e(E), IMPRECISE=IMPRECISE_ACC.value, num_warps=4 if BM <= 64 else 8,
               num_stages=4 if BM <= 64 else 3)
    return y


# --------------------------------------------------------------------------------------------
# Dispatch: a stable counting sort of the (token, choice) pairs by expert, in three steps with no
# host sync: counts per (chunk of pairs, expert), their exclusive scan in expert-major order (so
# each chunk's pairs of an expert follow the earlier chunks'), then each pair's place: its chunk's
# base for its expert plus its rank among the chunk's earlier pairs of that expert.
# --------------------------------------------------------------------------------------------

_SORT_CHUNK = 128


@triton.jit
def _keys(ids, n, E, c, CHUNK: tl.constexpr):
    p = c * CHUNK + tl.arange(0, CHUNK)
    ok = p < n
    e = tl.load(ids + p, mask=ok, other=0)
    valid = ok & (e >= 0) & (e < E)
    return p, ok, valid, tl.where(valid, e, E)  # bad ids: bucket E, after every expert


@triton.jit
def _count_kernel(ids, counts, n, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    p, ok, valid, key = _keys(ids, n, E, c, CHUNK)
    b = tl.arange(0, BLOCK_E)
    hist = tl.sum(((key[:, None] == b[None, :]) & ok[:, None]).to(tl.int32), 0)
    tl.store(counts + c.to(tl.int64) * BLOCK_E + b, hist)


@triton.jit
def _place_kernel(ids, base, sorted_pairs, pair_rows, n, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    p, ok, valid, key = _keys(ids, n, E, c, CHUNK)
    i = tl.arange(0, CHUNK)
    before = (key[:, None] == key[None, :]) & (i[None, :] < i[:, None]) & ok[None, :]
    rank = tl.sum(before.to(tl.int32), 1)
    row = tl.load(base + c.to(tl.int64) * BLOCK_E + key, mask=ok, other=0) + rank
    tl.store(sorted_pairs + row, p, mask=ok)
    tl.store(pair_rows + p, tl.where(valid, row, -1), mask=ok)


def moe_sort(topk_ids, num_experts: int):
    """topk_ids int32 [T, k] (contiguous) -> (sorted_pairs, pair_rows, offs), int32."""
    ids = topk_ids.reshape(-1)
    n, E = ids.numel(), num_experts
    device = ids.device
    sorted_pairs = torch.empty(n, dtype=torch.int32, device=device)
    pair_rows = torch.empty(n, dtype=torch.int32, device=device)
    if n == 0:
        return sorted_pairs, pair_rows, torch.zeros(E, dtype=torch.int32, device=device)
    chunks = triton.cdiv(n, _SORT_CHUNK)
    block_e = _block_e(E)
    counts = torch.empty(chunks, block_e, dtype=torch.int32, device=device)
    with on(device):
        launch(_count_kernel, (chunks,), ids, counts, n, E, CHUNK=_SORT_CHUNK, BLOCK_E=block_e, num_warps=4)
        flat = counts.t().reshape(-1)  # expert-major: [bucket, chunk]
        base = (flat.cumsum(0, dtype=torch.int32) - flat).view(block_e, chunks).t().contiguous()
        offs = counts[:, :E].sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        launch(_place_kernel, (chunks,), ids, base, sorted_pairs, pair_rows, n, E, CHUNK=_SORT_CHUNK,
               BLOCK_E=block_e, num_warps=4)
    return sorted_pairs, pair_rows, offs


@triton.jit
def _align_kernel(sorted_pairs, offs, sorted_ids, expert_ids, total, E, size, n_blocks,
                  BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program c: sorted rows c*CHUNK.. go to their padded places; blocks c*CHUNK.. get their expert."""
    ei = tl.arange(0, BLOCK_E)
    ends = tl.load(offs + ei, mask=ei < E, other=0)
    ends = tl.where(ei < E, ends, tl.max(ends, 0))
    starts = tl.load(offs + ei - 1, mask=(ei > 0) & (ei < E), other=0)
    starts = tl.where(ei < E, starts, tl.max(ends, 0))
    padded = (ends - starts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    pad_ends = tl.cumsum(padded, 0)
    pad_starts = pad_ends - padded
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    n_valid = tl.max(ends, 0)
    ok = i < n_valid
    e = tl.sum(((ends[None, :] <= i[:, None]) & (ei[None, :] < E)).to(tl.int32), 1)  # the expert of row i
    dest = tl.sum(tl.where(ei[None, :] == e[:, None], pad_starts[None, :] - starts[None, :], 0), 1) + i
    tl.store(sorted_ids + dest, tl.load(sorted_pairs + i, mask=ok, other=0), mask=ok)
    b = c * CHUNK + tl.arange(0, CHUNK)
    grand = tl.sum(padded, 0)
    be = tl.sum(((pad_ends[None, :] <= b[:, None] * BLOCK_SIZE) & (ei[None, :] < E)).to(tl.int32), 1)
    tl.store(expert_ids + b, tl.where(b * BLOCK_SIZE < grand, be, -1), mask=b < n_blocks)
    if c == 0:
        tl.store(total, grand)


def moe_align_block_size(topk_ids, num_experts: int, block_size: int, size: int):
    """vLLM's moe_align_block_size from the stable sort: (sorted_token_ids [size], expert_ids, total [1])."""
    n = topk_ids.numel()
    device = topk_ids.device
    n_blocks = triton.cdiv(size, block_size)
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=device)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=device)
    total = torch.zeros(1, dtype=torch.int32, device=device)
    if n == 0:
        return sorted_ids, expert_ids.fill_(-1), total
    sorted_pairs, _, offs = moe_sort(topk_ids, num_experts)
    chunk = 128
    with on(device):
        launch(_align_kernel, (triton.cdiv(max(n, n_blocks), chunk),), sorted_pairs, offs, sorted_ids, expert_ids,
               total, num_experts, size, n_blocks, BLOCK_SIZE=block_size, CHUNK=chunk,
               BLOCK_E=triton.next_power_of_2(num_experts), num_warps=4)
    return sorted_ids, expert_ids, total


# --------------------------------------------------------------------------------------------
# Permute, combine, SiLU-and-multiply: memory-bound, one program per row (block of columns).
# --------------------------------------------------------------------------------------------


@triton.jit
def _permute_kernel(x, sorted_pairs, out, n_pairs, H, sxt, top_k, BH: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    p = tl.load(sorted_pairs + i)
    ok = (p >= 0) & (p < n_pairs)  # a corrupt index reads nothing and marks its row
    t = tl.where(ok, p // top_k, 0).to(tl.int64)
    # (a vector compare, not (cols < H) & ok: the 3.9 interpreter rejects a block & scalar mask)
    v = tl.load(x + t * sxt + cols, mask=tl.where(ok, cols, H) < H, other=0.0)
    v = tl.where(ok, v.to(tl.float32), float("nan"))
    tl.store(out + i * H + cols, v.to(out.dtype.element_ty), mask=cols < H)


def _row_block(H: int) -> int:
    return min(triton.next_power_of_2(max(H, 1)), 1024)


def moe_permute(x, sorted_pairs, top_k: int):
    n, H = sorted_pairs.numel(), x.shape[1]
    out = torch.empty(n, H, dtype=x.dtype, device=x.device)
    if out.numel():
        BH = _row_block(H)
        with on(x.device):
            launch(_permute_kernel, (n, triton.cdiv(H, BH)), x, sorted_pairs, out, x.shape[0] * top_k, H, x.stride(0),
                   top_k, BH=BH, num_warps=4)
    return out


@triton.jit
def _combine_kernel(y, w, pair_rows, out, n_rows, H, syr, swt, TOP_K: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    c_ok = cols < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        r = tl.load(pair_rows + t * TOP_K + j)
        wt = tl.load(w + t * swt + j).to(tl.float32)
        use = (r >= 0) & (r < n_rows)
        v = tl.load(y + tl.where(use, r, 0).to(tl.int64) * syr + cols, mask=tl.where(use, cols, H) < H,
                    other=0.0).to(tl.float32)
        acc += tl.where(use, wt * v, tl.where(r >= n_rows, float("nan"), 0.0))  # rows < 0 add nothing
    tl.store(out + t * H + cols, acc.to(out.dtype.element_ty), mask=c_ok)


def moe_combine(y, topk_weights, pair_rows):
    T, k = topk_weights.shape
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if out.numel():
        BH = _row_block(H)
        with on(y.device):
            launch(_combine_kernel, (T, triton.cdiv(H, BH)), y, topk_weights, pair_rows, out, y.shape[0], H,
                   y.stride(0), topk_weights.stride(0), TOP_K=k, BH=BH, num_warps=4)
    return out


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _silu_mul_kernel(h, out, I, sh, BI: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    ok = cols < I
    g = tl.load(h + r * sh + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h + r * sh + I + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + r * I + cols, (g * _sigmoid(g) * u).to(out.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_bwd_kernel(d, h, out, I, sd, sh, BI: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    ok = cols < I
    dv = tl.load(d + r * sd + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(h + r * sh + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h + r * sh + I + cols, mask=ok, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(out + r * 2 * I + cols, (dv * u * s * (1 + g * (1 - s))).to(out.dtype.element_ty), mask=ok)
    tl.store(out + r * 2 * I + I + cols, (dv * g * s).to(out.dtype.element_ty), mask=ok)


def silu_mul(h):
    S, I = h.shape[0], h.shape[1] // 2
    out = torch.empty(S, I, dtype=h.dtype, device=h.device)
    if out.numel():
        BI = _row_block(I)
        with on(h.device):
            launch(_silu_mul_kernel, (S, triton.cdiv(I, BI)), h, out, I, h.stride(0), BI=BI, num_warps=4)
    return out


def silu_mul_backward(grad, h):
    S, I = h.shape[0], h.shape[1] // 2
    out = torch.empty(S, 2 * I, dtype=h.dtype, device=h.device)
    if out.numel():
        BI = _row_block(I)
        with on(h.device):
            launch(_silu_mul_bwd_kernel, (S, triton.cdiv(I, BI)), grad, h, out, I, grad.stride(0), h.stride(0),
                   BI=BI, num_warps=4)
    return out
