"""RMSNorm and residual-add + RMSNorm in Triton: a tile of rows per program, each row whole in registers.

Same semantics and rounding as norm/reference.py. Rows of up to MAX_BLOCK_H values are loaded once
(several rows per program when they are short, so each program moves a few thousand elements); longer
rows take two passes over column blocks (the second reads the row again). Tensors come as [B, S, H]
with any B and S strides and a unit last stride (the op's host code makes sure of it); offsets are
64-bit. The backward keeps each program's partial weight gradient in float32 registers over the rows
it visits, writes one [H] row per program, and sums those rows with torch: deterministic, no atomics.
Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._launch import launch, on

MAX_BLOCK_H = 16384  # the longest row held in registers (64 KiB of float32 over 16 warps)
LOOP_BLOCK_H = 4096  # the column block of longer rows
TILE = 4096          # elements per program for short rows: BLOCK_R = TILE // BLOCK_H rows


@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 v in `dtype`, rounded to nearest even. The interpreter truncates float32 -> bfloat16
    (a GPU rounds): there the rounding is done on the bits. (INTERPRETED is False wherever a GPU
    compiles the kernel.)"""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return v.to(dtype)


@triton.jit
def _scale(h, w, offset, dtype: tl.constexpr, LLAMA: tl.constexpr, INTERPRETED: tl.constexpr):
    """The normalised h (float32) times the weight, rounded as transformers does: Llama casts h to
    the dtype and multiplies there (the product of two 16-bit values is exact in float32, rounded
    once); Gemma multiplies by (offset + w) in float32 and casts once."""
    if LLAMA:
        return _round(_round(h, dtype, INTERPRETED).to(tl.float32) * w, dtype, INTERPRETED)
    return _round(h * (offset + w), dtype, INTERPRETED)


@triton.jit
def _row_offsets(rows, S, sb, ss):
    b = rows // S
    return b * sb + (rows - b * S) * ss


@triton.jit
def _fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, z_ptr, rstd_ptr, R, S, H,
                x_sb, x_ss, r_sb, r_ss, y_sb, y_ss, z_sb, z_ss, inv_h, eps, offset,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SINGLE: tl.constexpr, ADD: tl.constexpr,
                LLAMA: tl.constexpr, INTERPRETED: tl.constexpr):
    dt = y_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    xo = _row_offsets(rows, S, x_sb, x_ss)[:, None]
    yo = _row_offsets(rows, S, y_sb, y_ss)[:, None]
    if ADD:
        ro = _row_offsets(rows, S, r_sb, r_ss)[:, None]
        zo = _row_offsets(rows, S, z_sb, z_ss)[:, None]
    if SINGLE:
        cols = tl.arange(0, BLOCK_H)[None, :]
        mask = rmask[:, None] & (cols < H)
        x = tl.load(x_ptr + xo + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            r = tl.load(r_ptr + ro + cols, mask=mask, other=0.0).to(tl.float32)
            z = _round(x + r, dt, INTERPRETED)  # the new residual, in its dtype: what is normalised
            x = z.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) * inv_h + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        if ADD:  # stores after every load of the row: in place, z and y overwrite residual and x
            tl.store(z_ptr + zo + cols, z, mask=mask)
        tl.store(y_ptr + yo + cols, _scale(x * rstd[:, None], w, offset, dt, LLAMA, INTERPRETED), mask=mask)
    else:
        # One row (BLOCK_R == 1), two passes over column blocks. The second pass reads x (and the
        # residual) again and recomputes their sum: in place, nothing is written before it is read.
        acc = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
        for c0 in range(0, H, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)[None, :]
            mask = rmask[:, None] & (cols < H)
            x = tl.load(x_ptr + xo + cols, mask=mask, other=0.0).to(tl.float32)
            if ADD:
                r = tl.load(r_ptr + ro + cols, mask=mask, other=0.0).to(tl.float32)
                x = _round(x + r, dt, INTERPRETED).to(tl.float32)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) * inv_h + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        for c0 in range(0, H, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)[None, :]
            mask = rmask[:, None] & (cols < H)
            x = tl.load(x_ptr + xo + cols, mask=mask, other=0.0).to(tl.float32)
            if ADD:
                r = tl.load(r_ptr + ro + cols, mask=mask, other=0.0).to(tl.float32)
                z = _round(x + r, dt, INTERPRETED)
                x = z.to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
            if ADD:
                tl.store(z_ptr + zo + cols, z, mask=mask)
            tl.store(y_ptr + yo + cols, _scale(x * rstd[:, None], w, offset, dt, LLAMA, INTERPRETED), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, gr_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, R, S, H,
                g_sb, g_ss, gr_sb, gr_ss, x_sb, x_ss, inv_h, offset, num_programs,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SINGLE: tl.constexpr, RESID: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """dx = rstd (g w' - xhat mean(g w' xhat)) (+ grad_residual), w' = offset + w, xhat = x rstd;
    program p visits rows p, p + P, ... (tiles of BLOCK_R) and writes sum of g xhat over them to
    dw_ptr[p] (float32 [P, H])."""
    pid = tl.program_id(0)
    dt = dx_ptr.dtype.element_ty
    if SINGLE:
        cols = tl.arange(0, BLOCK_H)[None, :]
        cmask = cols < H
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK_H], tl.float32)
        for r0 in range(pid * BLOCK_R, R, num_programs * BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = rows < R
            mask = rmask[:, None] & cmask
            x = tl.load(x_ptr + _row_offsets(rows, S, x_sb, x_ss)[:, None] + cols, mask=mask, other=0.0)
            g = tl.load(g_ptr + _row_offsets(rows, S, g_sb, g_ss)[:, None] + cols, mask=mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
            xhat = x.to(tl.float32) * rstd
            g = g.to(tl.float32)
            gw = g * w
            c = tl.sum(gw * xhat, axis=1)[:, None] * inv_h
            dx = (gw - xhat * c) * rstd
            if RESID:
                dx += tl.load(gr_ptr + _row_offsets(rows, S, gr_sb, gr_ss)[:, None] + cols, mask=mask,
                              other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * H + cols, _round(dx, dt, INTERPRETED), mask=mask)
            dw += tl.sum(g * xhat, axis=0)
        c1 = tl.arange(0, BLOCK_H)
        tl.store(dw_ptr + pid.to(tl.int64) * H + c1, dw, mask=c1 < H)
    else:
        # One row at a time (BLOCK_R == 1), two passes over column blocks; the program's row of dw
        # (zeroed by the host) accumulates in global memory, read and written by this program only.
        for r in range(pid, R, num_programs):
            rows = r + tl.arange(0, BLOCK_R).to(tl.int64)
            rstd = tl.load(rstd_ptr + rows)[:, None]
            xo = _row_offsets(rows, S, x_sb, x_ss)[:, None]
            go = _row_offsets(rows, S, g_sb, g_ss)[:, None]
            acc = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
            for c0 in range(0, H, BLOCK_H):
                cols = c0 + tl.arange(0, BLOCK_H)[None, :]
                mask = cols < H
                x = tl.load(x_ptr + xo + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + go + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
                acc += g * w * x
            c = tl.sum(acc, axis=1)[:, None] * rstd * inv_h
            for c0 in range(0, H, BLOCK_H):
                cols = c0 + tl.arange(0, BLOCK_H)[None, :]
                mask = cols < H
                x = tl.load(x_ptr + xo + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + go + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
                xhat = x * rstd
                dx = (g * w - xhat * c) * rstd
                if RESID:
                    dx += tl.load(gr_ptr + _row_offsets(rows, S, gr_sb, gr_ss)[:, None] + cols, mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows[:, None] * H + cols, _round(dx, dt, INTERPRETED), mask=mask)
                part = dw_ptr + pid.to(tl.int64) * H + cols
                tl.store(part, tl.load(part, mask=mask, other=0.0) + g * xhat, mask=mask)
            tl.debug_barrier()  # this row's dw updates are seen by every thread before the next row's


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def rows3(t: torch.Tensor) -> torch.Tensor:
    """t [..., H] as [B, S, H] with a unit last stride: a view where the strides allow, else a copy."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t[None, None]
    if t.dim() == 2:
        return t[None]
    return t.flatten(0, -3) if t.dim() > 3 else t


def _bs(t3: torch.Tensor):
    return t3.stride(0), t3.stride(1)


def _config(h: int):
    """(BLOCK_R, BLOCK_H, SINGLE, num_warps) for rows of h values."""
    if h <= MAX_BLOCK_H:
        block_h = triton.next_power_of_2(h)
        block_r = max(1, TILE // block_h)
        single = True
    else:
        block_h, block_r, single = LOOP_BLOCK_H, 1, False
    tile = block_r * block_h
    return block_r, block_h, single, (4 if tile <= 2048 else 8 if tile <= 8192 else 16)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _forward(x3, r3, weight, y3, z3, rstd, eps: float, offset: float):
    B, S, H = x3.shape
    rows = B * S
    if rows == 0:
        return
    block_r, block_h, single, warps = _config(H)
    add = r3 is not None
    r3, z3 = (r3, z3) if add else (x3, y3)  # (unread and unwritten without ADD)
    with on(x3.device):
        launch(_fwd_kernel, (triton.cdiv(rows, block_r),), x3, r3, weight, y3, z3, rstd, rows, S, H,
               *_bs(x3), *_bs(r3), *_bs(y3), *_bs(z3), 1.0 / H, float(eps), float(offset),
               BLOCK_R=block_r, BLOCK_H=block_h, SINGLE=single, ADD=add, LLAMA=offset == 0,
               INTERPRETED=_interpreted(x3), num_warps=warps)


def rms_norm(x, weight, eps: float, offset: float):
    x3 = rows3(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _forward(x3, None, weight.contiguous(), y.view(x3.shape), None, rstd, eps, offset)
    return y, rstd


def add_rms_norm(x, residual, weight, eps: float, offset: float):
    x3, r3 = rows3(x), rows3(residual)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    z = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _forward(x3, r3, weight.contiguous(), y.view(x3.shape), z.view(x3.shape), rstd, eps, offset)
    return y, z, rstd


def add_rms_norm_(x3, r3, weight, eps: float, offset: float) -> None:
    """x3, r3: [B, S, H] views of the tensors written in place."""
    rstd = torch.empty(x3.shape[:-1], dtype=torch.float32, device=x3.device)
    _forward(x3, r3, weight.contiguous(), x3, r3, rstd, eps, offset)


def rms_norm_backward(grad_y, grad_residual, x, weight, rstd, offset: float):
    x3, g3 = rows3(x), rows3(grad_y)
    gr3 = rows3(grad_residual) if grad_residual is not None else g3
    B, S, H = x3.shape
    rows = B * S
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block_r, block_h, single, warps = _config(H)
    tiles = triton.cdiv(rows, block_r)
    per_device = 2 * _sm_count(x.device.index or 0) if x.device.type == "cuda" else 4
    programs = min(tiles, per_device)
    partial = (torch.empty if single else torch.zeros)((programs, H), dtype=torch.float32, device=x.device)
    with on(x.device):
        launch(_bwd_kernel, (programs,), g3, gr3, x3, weight.contiguous(), rstd.reshape(-1).contiguous().float(),
               dx, partial, rows, S, H, *_bs(g3), *_bs(gr3), *_bs(x3), 1.0 / H, float(offset), programs,
               BLOCK_R=block_r, BLOCK_H=block_h, SINGLE=single, RESID=grad_residual is not None,
               INTERPRETED=_interpreted(x3), num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype)
