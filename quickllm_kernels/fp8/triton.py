"""DeepSeek-V3 FP8 block quantisation and the block-scaled FP8 GEMM in Triton.

Same semantics as fp8/reference.py: weight_dequant and act_quant agree with it bit for bit (one
float32 multiply; IEEE float32 division with div_rn, never the approximate `/`; round to nearest
even onto the e4m3 grid). fp8_block_gemm computes each 128-wide K block of A B^T on the FP8 tensor
cores, then scales it by a_scales[m, kb] * b_scales[n // 128, kb] into a float32 accumulator, as
DeepGEMM does. Inside a block the sum is the tensor cores', not IEEE float32 (DeepSeek-V3 reports
about 14 bits for FP8 on Hopper); across blocks it is float32: on sm_90 the four wgmma (k32) of a
block chain in the tensor-core accumulator, the first starting from zero, and the block's sum is
promoted to float32 by the scale-and-add (IMPRECISE_ACC = 128, the promotion interval of DeepGEMM
and of DeepSeek-V3's training recipe); on sm_89 the four mma.sync of a block do the same. Offsets
are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from .._launch import launch, on

FP8_MAX = tl.constexpr(448.0)
ACT_EPS = tl.constexpr(1e-10)
# FP8 products summed on the tensor cores before a float32 add: one scale block (4 wgmma k32). 32
# (one wgmma) would add float32 precision inside a block too, but ptxas then serialises the wgmmas
# and the 128x128 tile spills (ptxas 12.9, sm_90): a cost no GPU run has weighed yet.
IMPRECISE_ACC = tl.constexpr(128)



@triton.jit
def _round_e4m3(r):
    """float32 r with |r| <= 448 -> the nearest e4m3 value (ties to even), still as float32.

    Rounding here rather than in the float32 -> fp8 cast gives one exact result everywhere: the
    interpreter's cast loses the carry when the mantissa rounds up into the exponent. Normal range
    (|r| >= 2**-6): round the float32 mantissa to 3 bits by adding half an ulp (+1 on odd). Below
    it, e4m3 subnormals are multiples of 2**-9: adding and removing 1.5 * 2**14, where float32's
    spacing is 2**-9, rounds to them. The sign is put back last, so -0.0 stays -0.0.
    """
    bits = r.to(tl.uint32, bitcast=True)
    a = tl.abs(r)
    u = a.to(tl.uint32, bitcast=True)
    normal = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
    sub = ((a + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)
    u = tl.where(a >= 0.015625, normal, sub)
    return (u | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_value(b):
    """float32 value of a float8_e4m3fn byte, by its bits: Triton has no e4m3 type below sm_89, and
    dequantising checkpoints is wanted on every GPU. Normal: exponent rebiased 7 -> 127; subnormal:
    mantissa * 2**-9; 0x7F / 0xFF: NaN. The sign bit goes onto either magnitude last, so 0x80 is
    -0.0 (negating the float would not be: Triton 3.6 computes -x as 0 - x, which gives +0.0)."""
    b = b.to(tl.uint32)
    e = (b >> 3) & 0xF
    m = b & 7
    normal = ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)
    v = (tl.where(e == 0, sub, normal) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _dequant_kernel(w, s, out, M, N, swm, ssm, ssn, block_m, block_n, BM: tl.constexpr, BN: tl.constexpr):
    # one flat grid axis (axis 1 holds at most 65535 programs): column tiles vary fastest
    n_tiles = tl.cdiv(N, BN)
    pid = tl.program_id(0).to(tl.int64)
    rm = (pid // n_tiles) * BM + tl.arange(0, BM)
    rn = (pid % n_tiles) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    x = _e4m3_value(tl.load(w + rm[:, None] * swm + rn[None, :], mask=mask, other=0))
    # per-row and per-column block indices: BM + BN divisions, not BM * BN
    sc = tl.load(s + (rm // block_m)[:, None] * ssm + (rn // block_n)[None, :] * ssn, mask=mask, other=0.0)
    tl.store(out + rm[:, None] * N + rn[None, :], (x * sc).to(out.dtype.element_ty), mask=mask)


def weight_dequant(w, scale_inv, block, out_dtype):
    """w [M, N] fp8 (unit last stride), scale_inv float32 -> [M, N] contiguous out_dtype."""
    M, N = w.shape
    out = torch.empty(M, N, dtype=out_dtype, device=w.device)
    if out.numel():
        BM, BN = 32, 128
        with on(w.device):
            launch(_dequant_kernel, (triton.cdiv(M, BM) * triton.cdiv(N, BN),), w.view(torch.uint8), scale_inv, out,
                   M, N, w.stride(0), scale_inv.stride(0), scale_inv.stride(1), block[0], block[1], BM=BM, BN=BN,
                   num_warps=4)
    return out


@triton.jit
def _group_scale(amax, nan, UE8M0: tl.constexpr):
    """Scale of a group from its amax (NaN where the group holds a NaN): max(amax, 1e-10) / 448 by IEEE
    division, for UE8M0 rounded up to a power of two by the bits (a nonzero mantissa bumps the
    exponent); NaN and inf pass through, as in the reference."""
    amax = tl.where(nan, float("nan"), tl.maximum(amax, ACT_EPS))
    sc = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
    if UE8M0:
        u = sc.to(tl.uint32, bitcast=True)
        bump = ((u & 0x7FFFFF) != 0) & ((u & 0x7F800000) != 0x7F800000)
        sc = tl.where(bump, (u & 0xFF800000) + 0x800000, u).to(tl.float32, bitcast=True)
    return sc


@triton.jit
def _e4m3_byte(r):
    """The float8_e4m3fn byte of float32 r, which is already on the e4m3 grid (or NaN), by its bits:
    the interpreter's float32 -> fp8 cast turns NaN into 384. NaN is 0x7F with r's sign, as torch
    writes it."""
    u = r.to(tl.uint32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = tl.abs(r)
    au = a.to(tl.uint32, bitcast=True)
    normal = (((au >> 23) - 120) << 3) | ((au >> 20) & 7)  # exponent rebiased 127 -> 7, 3 mantissa bits
    sub = (a * 512.0).to(tl.uint32)  # subnormals: multiples of 2**-9, exactly 0 .. 7 of them
    byte = tl.where(a >= 0.015625, normal, sub)
    byte = tl.where(r != r, 0x7F, byte)
    return (byte | sign).to(tl.uint8)


@triton.jit
def _quant_e4m3(v, sc):
    """Byte of e4m3(clamp(v / sc, +-448)), NaN kept (plain tl.minimum / maximum would drop it)."""
    y = tl.math.div_rn(v, sc)
    y = tl.minimum(tl.maximum(y, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    return _e4m3_byte(_round_e4m3(y))


@triton.jit
def _act_quant_kernel(x, q, s, R, K, G, sxr, group, UE8M0: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr,
                      ONE_TILE: tl.constexpr):
    # one flat grid axis: groups vary fastest, so a program's neighbours read the same rows
    pid = tl.program_id(0).to(tl.int64)
    g = pid % G
    rows = (pid // G) * BR + tl.arange(0, BR)
    rmask = rows < R
    k0 = g * group
    if ONE_TILE:  # the whole group in one tile: read x once
        cols = k0 + tl.arange(0, BG)
        mask = rmask[:, None] & ((cols < K) & (tl.arange(0, BG) < group))[None, :]
        v = tl.load(x + rows[:, None] * sxr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # tl.max skips NaN: look for it separately so that a NaN group gets a NaN scale
        nan = tl.max((v != v).to(tl.int32), 1) > 0
        sc = _group_scale(tl.max(tl.abs(v), 1), nan, UE8M0)
        y = _quant_e4m3(v, tl.broadcast_to(sc[:, None], [BR, BG]))
        tl.store(q + rows[:, None] * K + cols[None, :], y, mask=mask)
    else:  # a group wider than a tile: one pass for amax, one to quantise
        end = tl.minimum(k0 + group, K)
        amax = tl.zeros([BR], tl.float32)
        nan = tl.zeros([BR], tl.int32)
        for c in range(k0, end, BG):
            cols = c + tl.arange(0, BG)
            mask = rmask[:, None] & (cols < end)[None, :]
            v = tl.load(x + rows[:, None] * sxr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(v), 1))
            nan = tl.maximum(nan, tl.max((v != v).to(tl.int32), 1))
        sc = _group_scale(amax, nan > 0, UE8M0)
        for c in range(k0, end, BG):
            cols = c + tl.arange(0, BG)
            mask = rmask[:, None] & (cols < end)[None, :]
            v = tl.load(x + rows[:, None] * sxr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = _quant_e4m3(v, tl.broadcast_to(sc[:, None], [BR, BG]))
            tl.store(q + rows[:, None] * K + cols[None, :], y, mask=mask)
    tl.store(s + rows * G + g, sc, mask=rmask)


_MAX_GROUP_TILE = 4096


def act_quant(x2, group: int, ue8m0: bool):
    """x2 [R, K] (unit last stride) -> (q [R, K] fp8, scales [R, ceil(K/group)] float32), contiguous."""
    R, K = x2.shape
    G = triton.cdiv(K, group)
    q = torch.empty(R, K, dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty(R, G, dtype=torch.float32, device=x2.device)
    if R and K:
        width = min(group, K)  # a group never holds more than K values
        BG = min(triton.next_power_of_2(width), _MAX_GROUP_TILE)
        BR = max(1, min(64, 2048 // BG))
        with on(x2.device):
            launch(_act_quant_kernel, (triton.cdiv(R, BR) * G,), x2, q.view(torch.uint8), s, R, K, G, x2.stride(0),
                   group, UE8M0=ue8m0, BR=BR, BG=BG, ONE_TILE=BG >= width, num_warps=4)
    return q, s


@triton.jit
def _gemm_kernel(a, a_s, b, b_s, c, M, N, K, sam, sbn, sasm, sask, sbsn, sbsk,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each column tile while it is in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptr = a + rm[:, None] * sam + rk[None, :]
    b_ptr = b + rn[:, None] * sbn + rk[None, :]
    m_ok = rm < M
    n_ok = rn < N
    # BN divides 128 and tiles start at multiples of BN, so one tile has one b_scales row
    bs_ptr = b_s + ((pid_n * BN) // 128).to(tl.int64) * sbsn
    as_ptr = a_s + rm * sasm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        k_ok = rk < K - kb * BK  # the last K block may be partial: zeros contribute nothing
        A = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        B = tl.load(b_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        # This K block alone, from zero: the tensor cores sum its 128 products, float32 the blocks
        # (explicit on sm_90, where Triton's default would allow 2**30 products before promoting;
        # sm_89's mma.sync path and the interpreter ignore it).
        part = tl.dot(A, tl.trans(B), max_num_imprecise_acc=IMPRECISE_ACC)
        sa = tl.load(as_ptr + kb * sask, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + kb * sbsk)
        acc += part * (sa * sb)[:, None]
        a_ptr += BK
        b_ptr += BK
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm_config(M: int) -> dict:
    """The rule where no tuned table says otherwise: small M (decode) is a stream over b, so it takes
    narrow column tiles to give every SM some of b; large M takes 128 x 128 tiles for reuse."""
    if M <= 16:
        return dict(BM=16, BN=64, num_warps=4, num_stages=5)
    if M <= 64:
        return dict(BM=64, BN=64, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, num_warps=8, num_stages=3)


def gemm_keys(M: int, N: int, K: int) -> tuple[str, str]:
    """Tuned-table keys of a GEMM shape, the most specific first: M rounded up to a power of two
    (at least 16, at most 16384) with N and K, then that M bucket alone."""
    mb = min(16384, max(16, 1 << max(0, M - 1).bit_length()))
    return f"M{mb}_N{N}_K{K}", f"M{mb}"


def _check_gemm_config(cfg: dict) -> dict:
    for k in ("BM", "BN"):
        if cfg[k] not in (16, 32, 64, 128, 256):
            raise ValueError(f"fp8_block_gemm: tuned {k} must be 16, 32, 64, 128 or 256, got {cfg[k]}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16) or not 1 <= cfg["num_stages"] <= 8:
        raise ValueError(f"fp8_block_gemm: tuned num_warps / num_stages out of range: {cfg}")
    return cfg


def fp8_block_gemm(a, a_scales, b, b_scales, out_dtype, config: dict | None = None):
    """a [M, K], b [N, K] fp8 (unit last strides), scales float32 -> c [M, N] out_dtype contiguous.
    config: the tile configuration (BM, BN, num_warps, num_stages); default: this device's tuned
    table (quickllm_kernels.tuning), else the rule of _gemm_config."""
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    if config is None:
        config = tuning.lookup("fp8_block_gemm", a.device, gemm_keys(M, N, K), _gemm_config(M))
    cfg = _check_gemm_config(config)
    BM, BN, warps, stages = cfg["BM"], cfg["BN"], cfg["num_warps"], cfg["num_stages"]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    with on(a.device):
        launch(_gemm_kernel, grid, a, a_scales, b, b_scales, c, M, N, K, a.stride(0), b.stride(0), a_scales.stride(0),
               a_scales.stride(1), b_scales.stride(0), b_scales.stride(1), BM=BM, BN=BN, BK=128, GROUP_M=8,
               num_warps=warps, num_stages=stages)
    return c
