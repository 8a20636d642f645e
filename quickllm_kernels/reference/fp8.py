"""DeepSeek-V3 FP8 block quantisation in plain PyTorch (float8_e4m3fn works on the CPU).

Weights: one float32 `scale_inv` per 128x128 block (edge blocks cover what is left), w = w_fp8 * s.
Activations: one float32 scale per group of 128 along the last dim, x = x_fp8 * s.
The e4m3 range is +-448: a block's scale is amax / 448, so its largest element maps to 448.
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12  # an all-zero block gets a tiny positive scale: zeros stay zeros, never 0/0


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
    return (w_fp8.float() * _expand(scale_inv.float(), m, n, block)).to(out_dtype)


def weight_quant(w: torch.Tensor, block=(128, 128)):
    """w [M, N] -> (w_fp8 [M, N], scale_inv [ceil(M/bm), ceil(N/bn)] float32)."""
    m, n = w.shape
    bm, bn = _blocks(m, n, block)
    wf = w.float()
    padded = torch.zeros(bm * block[0], bn * block[1], dtype=torch.float32, device=w.device)
    padded[:m, :n] = wf.abs()
    amax = padded.view(bm, block[0], bn, block[1]).amax(dim=(1, 3))
    scale = amax.clamp(min=_TINY) / FP8_MAX
    q = (wf / _expand(scale, m, n, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale
