"""DeepSeek-V3 FP8 block quantisation in plain PyTorch (float8_e4m3fn works on the CPU).

Weights: one float32 `scale_inv` per 128x128 block (edge blocks cover what is left), w = w_fp8 * s.
Activations: one float32 scale per group of 128 along the last dim, x = x_fp8 * s.
The e4m3 range is +-448: a block's scale is amax / 448, so its largest element maps to 448.

These functions are the CPU kernels and the oracle of the CUDA and Triton kernels, which reproduce
weight_dequant and act_quant bit for bit: one float32 multiply (dequant), IEEE float32 divisions
and round-to-nearest-even to e4m3 (quant).
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12  # an all-zero weight block gets a tiny positive scale: zeros stay zeros, never 0/0
ACT_EPS = 1e-10  # the same for activation groups (the floor sglang and vLLM use for per-token-group quant)


def _blocks(m, n, block):
    return math.ceil(m / block[0]), math.ceil(n / block[1])


def _expand(scale, m, n, block):
    """[ceil(M/bm), ceil(N/bn)] -> [M, N], each scale repeated over its block (edges cut)."""
    return scale.repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128), out_dtype=torch.bfloat16):
    m, n = w_fp8.shape
    if tuple(scale_inv.shape) != _blocks(m, n, block):
        raise ValueError(f"weight_dequant: scale_inv must be {list(_blocks(m, n, block))} for a [{m}, {n}] weight "
                         f"with {list(block)} blocks, got {list(scale_inv.shape)}")
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    (gm, gn), (bm, bn) = _blocks(m, n, block), block
    if m == gm * bm and n == gn * bn:  # whole blocks: broadcast the scales, no [M, N] scale tensor
        blocks = w_fp8.to(acc).reshape(gm, bm, gn, bn) * scale_inv.to(acc)[:, None, :, None]
        return blocks.reshape(m, n).to(out_dtype)
    return (w_fp8.to(acc) * _expand(scale_inv.to(acc), m, n, block)).to(out_dtype)


def weight_quant(w: torch.Tensor, block=(128, 128)):
    """w [M, N] -> (w_fp8 [M, N], scale_inv [ceil(M/bm), ceil(N/bn)] float32)."""
    m, n = w.shape
    bm, bn = _blocks(m, n, block)
    wf = w.float()
    padded = torch.zeros(bm * block[0], bn * block[1], dtype=torch.float32, device=w.device)
    padded[:m, :n] = wf.abs()
    amax = padded.view(bm, block[0], bn, block[1]).amax(dim=(1, 3))
    scale = _div448(amax.clamp(min=_TINY))
    q = (wf / _expand(scale, m, n, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Positive normal float32 s rounded up to a power of two (UE8M0 scales), exactly, by its bits:
    a nonzero mantissa bumps the exponent and is cleared. NaN and inf pass through unchanged."""
    u = s.contiguous().view(torch.int32)
    mant = u & 0x7FFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    up = (u & -0x800000) + 0x800000  # -0x800000 == 0xFF800000 as int32: sign and exponent bits
    return torch.where((mant != 0) & finite, up, u).view(torch.float32)


def _div448(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 as a true, correctly rounded division on every device: a Python-scalar divisor
    becomes a multiply by the reciprocal on CUDA, which differs from the kernels in the last bit."""
    return amax / torch.full_like(amax, FP8_MAX)


def act_quant(x: torch.Tensor, group: int = 128, ue8m0: bool = False):
    """x [..., K] -> (x_fp8 [..., K], scales float32 [..., ceil(K/group)]), per group of `group` along K:
    s = max(amax, 1e-10) / 448 (ue8m0: rounded up to a power of two), x_fp8 = e4m3(clamp(x / s, +-448))."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    g = math.ceil(k / group)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = torch.nn.functional.pad(x.to(acc), (0, g * group - k)).reshape(*lead, g, group)
    amax = xf.abs().amax(-1).float().clamp(min=ACT_EPS) if g else xf.new_zeros((*lead, 0)).float()
    s = _div448(amax)
    if ue8m0:
        s = pow2_ceil(s)
    q = (xf / s.to(acc).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).reshape(*lead, g * group)[..., :k]
    return q.to(FP8).contiguous(), s.contiguous()


def act_dequant(x_fp8: torch.Tensor, scales: torch.Tensor, group: int = 128, out_dtype=torch.float32):
    """Inverse of act_quant: x_fp8 * scales, each scale repeated over its group."""
    k = x_fp8.shape[-1]
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    return (x_fp8.to(acc) * scales.to(acc).repeat_interleave(group, -1)[..., :k]).to(out_dtype)


def fp8_block_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                   out_dtype=torch.bfloat16):
    """C [M, N] = dequant(a, a_scales per 128-group) @ dequant(b, b_scales per 128x128 block)^T,
    in float32 (float64 when out_dtype is float64), rounded once to out_dtype."""
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    a_deq = act_dequant(a, a_scales, 128, acc)
    b_deq = weight_dequant(b, b_scales, (128, 128), acc)
    return (a_deq @ b_deq.t()).to(out_dtype)
