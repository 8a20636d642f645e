"""Chosen-token log-probabilities and entropy in Triton: one program per row, one online pass over the
vocabulary (running max, sum of exp, sum of exp * z per lane), never a [rows, V] intermediate.
Same semantics as logprobs/reference.py. Logits come as [B, S, V] with any B and S strides and a unit
last stride; offsets are 64-bit (rows x V can pass 2**31)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch, on


@triton.jit
def _fwd_kernel(logits, ids, lp_out, ent_out, lse_out, S, sb, ss, V, temperature, ignore_index,
                BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // S
    base = logits + b * sb + (r - b * S) * ss
    neg_inf = float("-inf")
    m = tl.full([BLOCK_V], neg_inf, tl.float32)
    acc = tl.zeros([BLOCK_V], tl.float32)   # sum exp(z - m)
    tacc = tl.zeros([BLOCK_V], tl.float32)  # sum exp(z - m) * z
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=neg_inf).to(tl.float32) / temperature
        m_new = tl.maximum(m, z)
        alpha = tl.where(m_new == neg_inf, 0.0, tl.exp(m - m_new))
        e = tl.where(z == neg_inf, 0.0, tl.exp(z - m_new))
        acc = acc * alpha + e
        tacc = tacc * alpha + tl.where(e > 0, e * z, 0.0)
        m = m_new
    mx = tl.max(m, 0)
    scale = tl.where(m == neg_inf, 0.0, tl.exp(m - mx))
    s_sum = tl.sum(acc * scale, 0)
    t_sum = tl.sum(tacc * scale, 0)
    lse = mx + tl.log(s_sum)
    ent = lse - tl.where(s_sum > 0, t_sum / s_sum, 0.0)  # an all -inf row: -inf, as the reference
    tok = tl.load(ids + r)
    keep = tok != ignore_index
    in_range = (tok >= 0) & (tok < V)  # an id outside [0, V) reads nothing: NaN
    zy = tl.load(base + tl.where(keep & in_range, tok, 0)).to(tl.float32) / temperature
    tl.store(lp_out + r, tl.where(keep, tl.where(in_range, zy - lse, float("nan")), 0.0))
    tl.store(ent_out + r, tl.where(keep, ent, 0.0))
    tl.store(lse_out + r, lse)


@triton.jit
def _bwd_kernel(g_lp, g_ent, logits, ids, lse_in, ent_in, grad, S, sb, ss, V, temperature, ignore_index,
                BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // S
    base = logits + b * sb + (r - b * S) * ss
    out = grad + r * V
    tok = tl.load(ids + r)
    keep = tok != ignore_index
    glp = tl.where(keep, tl.load(g_lp + r), 0.0)
    gent = tl.where(keep, tl.load(g_ent + r), 0.0)
    lse = tl.load(lse_in + r)
    ent = tl.load(ent_in + r)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        p = tl.exp(z - lse)
        dent = tl.where(p > 0, p * (z - lse + ent), 0.0)
        g = glp * (tl.where(offs == tok, 1.0, 0.0) - p) - gent * dent
        g = tl.where(keep, g, 0.0)  # not 0 * g: non-finite logits of an ignored row must not leak NaN
        tl.store(out + offs, (g / temperature).to(grad.dtype.element_ty), mask=mask)



def _block(V):
    return min(4096, triton.next_power_of_2(max(V, 16)))


def token_logprobs(logits3, ids, temperature: float, ignore_index: int):
    """logits3 [B, S, V] (unit last stride), ids [B*S] int64 contiguous -> three float32 [B*S]."""
    B, S, V = logits3.shape
    n = B * S
    lp, ent, lse = (torch.empty(n, dtype=torch.float32, device=logits3.device) for _ in range(3))
    if n:
        with on(logits3.device):
            launch(_fwd_kernel, (n,), logits3, ids, lp, ent, lse, S, logits3.stride(0), logits3.stride(1), V,
                   float(temperature), ignore_index, BLOCK_V=_block(V))
    return lp, ent, lse


def token_logprobs_backward(g_lp, g_ent, logits3, ids, lse, ent, temperature: float, ignore_index: int):
    """-> grad [B*S, V] contiguous in logits' dtype."""
    B, S, V = logits3.shape
    n = B * S
    grad = torch.empty(n, V, dtype=logits3.dtype, device=logits3.device)
    if n:
        with on(logits3.device):
            launch(_bwd_kernel, (n,), g_lp, g_ent, logits3, ids, lse, ent, grad, S, logits3.stride(0),
                   logits3.stride(1), V, float(temperature), ignore_index, BLOCK_V=_block(V))
    return grad
