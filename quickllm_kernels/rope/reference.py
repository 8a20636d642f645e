"""Rotary position embedding in plain PyTorch: the CPU kernel and the oracle of the other backends.

For a pair (x1, x2) at rotary frequency i and angle a = position * inv_freq[i]:
    y1 = x1 cos a - x2 sin a,    y2 = x2 cos a + x1 sin a
"neox" pairs dim j with dim j + R/2 (rotate halves); "gptj" pairs dims 2i and 2i + 1. Dims R..D of
each head pass through unchanged. Math in float32 (float64 for float64 inputs), results in the
input dtype.
"""
from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x [..., H, D] float32; cos, sin [..., 1, R/2] float32 -> rotated x (new contiguous tensor)."""
    r = 2 * cos.shape[-1]
    rot, tail = x[..., :r], x[..., r:]
    if is_neox:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, tail), dim=-1)


def cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor, inverse: bool, dtype=torch.float32):
    """Rows of the cache for each position, as `dtype` [..., 1, R/2] each.

    A position outside [0, max_positions) gives NaN (the GPU kernels do the same rather than read
    out of bounds; on the CPU the op raises before getting here).
    """
    max_positions, r = cos_sin_cache.shape
    pos = positions.long()
    valid = (pos >= 0) & (pos < max_positions)
    rows = cos_sin_cache.to(dtype)[pos.clamp(0, max(max_positions - 1, 0))]  # [..., R]
    rows = torch.where(valid[..., None], rows, torch.full_like(rows, float("nan")))
    cos, sin = rows[..., None, : r // 2], rows[..., None, r // 2 :]
    return cos, (-sin if inverse else sin)


def apply_rope(q, k, positions, cos_sin_cache, is_neox: bool, inverse: bool):
    """q [..., Hq, D], k [..., Hk, D], positions [...] -> (q_rot, k_rot), contiguous, input dtypes."""
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32 math; float64 stays float64 (gradcheck)
    cos, sin = cos_sin(positions, cos_sin_cache, inverse, dtype)
    q_out = rotate(q.to(dtype), cos, sin, is_neox).to(q.dtype)
    k_out = rotate(k.to(dtype), cos, sin, is_neox).to(k.dtype)
    return q_out.contiguous(), k_out.contiguous()


def apply_rope_(q, k, positions, cos_sin_cache, is_neox: bool, inverse: bool) -> None:
    q_out, k_out = apply_rope(q, k, positions, cos_sin_cache, is_neox, inverse)
    q.copy_(q_out)
    k.copy_(k_out)
