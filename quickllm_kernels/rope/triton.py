"""Rotary position embedding in Triton: one program per token rotates all q and k heads.

Same semantics as rope/reference.py, including NaN for positions outside the cache (the kernel
masks the cache read instead of reading out of bounds). Runs on CPU tensors under TRITON_INTERPRET=1.
Inputs need a unit stride on the last dim (the op's host code makes sure of it); every other stride
is free, so q and k can be views into one fused qkv tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch, on


@triton.jit
def _rotate_heads(in_ptr, out_ptr, in_sh, out_sh, cos, sin,
                  H: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  ROT: tl.constexpr, TAIL: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                  IS_NEOX: tl.constexpr, COPY_TAIL: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    ty = out_ptr.dtype.element_ty
    if IS_NEOX:
        d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < H) & (d < HALF)
        x1 = tl.load(in_ptr + h * in_sh + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_ptr + h * in_sh + HALF + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + h * out_sh + d, (x1 * cos - x2 * sin).to(ty), mask=mask)
        tl.store(out_ptr + h * out_sh + HALF + d, (x2 * cos + x1 * sin).to(ty), mask=mask)
    else:
        # Interleaved pairs: one contiguous (vectorisable) load of the rotary dims, split into
        # even and odd elements in registers, joined back for one contiguous store.
        e = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (h < H) & (e < 2 * HALF)
        x = tl.load(in_ptr + h * in_sh + e, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        tl.store(out_ptr + h * out_sh + e, tl.reshape(y, (BLOCK_H, 2 * BLOCK_HALF)).to(ty), mask=mask)
    if COPY_TAIL:
        e = tl.arange(0, BLOCK_TAIL)[None, :]
        tmask = (h < H) & (e < TAIL)
        x = tl.load(in_ptr + h * in_sh + ROT + e, mask=tmask)
        tl.store(out_ptr + h * out_sh + ROT + e, x, mask=tmask)


@triton.jit
def _rope_kernel(q_in, k_in, q_out, k_out, pos_ptr, cache_ptr, seq, max_positions, sin_sign,
                 q_in_sb, q_in_ss, q_in_sh, q_out_sb, q_out_ss, q_out_sh,
                 k_in_sb, k_in_ss, k_in_sh, k_out_sb, k_out_ss, k_out_sh,
                 HQ: tl.constexpr, BLOCK_HQ: tl.constexpr, HK: tl.constexpr, BLOCK_HK: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TAIL: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                 IS_NEOX: tl.constexpr, COPY_TAIL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # 64-bit: token * stride can pass 2**31
    b = t // seq
    s = t - b * seq
    pos = tl.load(pos_ptr + t).to(tl.int64)
    valid = (pos >= 0) & (pos < max_positions)
    row = tl.where(valid, pos, 0)
    d = tl.arange(0, BLOCK_HALF)
    # An invalid position reads nothing (the cache may even have no rows): its bound is 0. One vector
    # compare against a scalar, not `(d < HALF) & valid`: Triton 3.9's interpreter broadcasts a scalar
    # comparison result as integers, and the `&` then gives a mask that tl.load rejects.
    cmask = d < tl.where(valid, HALF, 0)
    cos = tl.load(cache_ptr + row * (2 * HALF) + d, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + row * (2 * HALF) + HALF + d, mask=cmask, other=0.0).to(tl.float32)
    nan = float("nan")
    cos = tl.where(valid, cos, nan)[None, :]
    sin = tl.where(valid, sin * sin_sign, nan)[None, :]
    _rotate_heads(q_in + b * q_in_sb + s * q_in_ss, q_out + b * q_out_sb + s * q_out_ss, q_in_sh, q_out_sh,
                  cos, sin, HQ, BLOCK_HQ, HALF, BLOCK_HALF, 2 * HALF, TAIL, BLOCK_TAIL, IS_NEOX, COPY_TAIL)
    _rotate_heads(k_in + b * k_in_sb + s * k_in_ss, k_out + b * k_out_sb + s * k_out_ss, k_in_sh, k_out_sh,
                  cos, sin, HK, BLOCK_HK, HALF, BLOCK_HALF, 2 * HALF, TAIL, BLOCK_TAIL, IS_NEOX, COPY_TAIL)


def _bsh(x: torch.Tensor):
    """Strides of (batch, seq, head) for [B, S, H, D] or [T, H, D] (batch stride 0)."""
    if x.dim() == 4:
        return x.stride(0), x.stride(1), x.stride(2)
    return 0, x.stride(0), x.stride(1)


def _launch(q, k, q_out, k_out, positions, cos_sin_cache, is_neox, inverse, copy_tail):
    tokens = positions.numel()
    if tokens == 0 or q.shape[-1] == 0:
        return
    seq = q.shape[1] if q.dim() == 4 else tokens
    half = cos_sin_cache.shape[1] // 2
    tail = q.shape[-1] - 2 * half
    hq, hk = q.shape[-2], k.shape[-2]
    with on(q.device):
        launch(
            _rope_kernel, (tokens,),
            q, k, q_out, k_out, positions.contiguous(), cos_sin_cache.contiguous(), seq,
            cos_sin_cache.shape[0], -1.0 if inverse else 1.0,
            *_bsh(q), *_bsh(q_out), *_bsh(k), *_bsh(k_out),
            HQ=hq, BLOCK_HQ=triton.next_power_of_2(max(hq, 1)),
            HK=hk, BLOCK_HK=triton.next_power_of_2(max(hk, 1)),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            TAIL=tail, BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
            IS_NEOX=is_neox, COPY_TAIL=copy_tail and tail > 0,
        )


def apply_rope(q, k, positions, cos_sin_cache, is_neox: bool, inverse: bool):
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, q_out, k_out, positions, cos_sin_cache, is_neox, inverse, copy_tail=True)
    return q_out, k_out


def apply_rope_(q, k, positions, cos_sin_cache, is_neox: bool, inverse: bool) -> None:
    _launch(q, k, q, k, positions, cos_sin_cache, is_neox, inverse, copy_tail=False)
