"""Chosen-token log-probabilities and entropy in plain PyTorch: the CPU kernel and the oracle.

z = logits / T, lse = logsumexp(z), logprob = z[id] - lse, entropy = lse - sum(softmax(z) * z).
Backward: d logprob / dz = onehot(id) - p; d entropy / dz = -p * (z - lse + entropy); both / T.
Rows whose id equals ignore_index give 0 and get no gradient. Math in float32 (float64 for float64).
"""
from __future__ import annotations

import torch


def _z(logits, temperature):
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature


def token_logprobs(logits, token_ids, temperature: float, ignore_index: int):
    z = _z(logits, temperature)  # [..., V]
    lse = torch.logsumexp(z, dim=-1)
    keep = token_ids != ignore_index
    in_range = (token_ids >= 0) & (token_ids < z.shape[-1])
    ids = torch.where(keep & in_range, token_ids, 0)
    # an id outside [0, V) reads nothing and gives NaN (the GPU kernels do the same; on the CPU the op
    # raises before getting here)
    picked = torch.where(in_range, z.gather(-1, ids[..., None].long())[..., 0], float("nan"))
    p = torch.exp(z - lse[..., None])
    # p * z with p == 0 and z == -inf (masked vocabulary) counts as 0, not NaN
    entropy = lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)
    zero = torch.zeros_like(lse)
    out = torch.where(keep, picked - lse, zero), torch.where(keep, entropy, zero), lse
    return tuple(t.float() if logits.dtype != torch.float64 else t for t in out)


def token_logprobs_backward(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy,
                            temperature: float, ignore_index: int):
    z = _z(logits, temperature)
    keep = (token_ids != ignore_index)[..., None]
    p = torch.exp(z - lse[..., None].to(z.dtype))
    in_range = ((token_ids >= 0) & (token_ids < z.shape[-1]))[..., None]
    onehot = torch.zeros_like(z).scatter_(-1, torch.where(keep & in_range, token_ids[..., None], 0).long(), 1.0)
    onehot = torch.where(in_range, onehot, torch.zeros_like(onehot))
    dent = torch.where(p > 0, p * (z - lse[..., None].to(z.dtype) + entropy[..., None].to(z.dtype)),
                       torch.zeros_like(z))
    g = grad_logprobs[..., None].to(z.dtype) * (onehot - p) - grad_entropy[..., None].to(z.dtype) * dent
    g = torch.where(keep, g, torch.zeros_like(g)) / temperature
    return g.to(logits.dtype).contiguous()
