"""RMSNorm and residual-add + RMSNorm in plain PyTorch: the CPU kernel and the oracle of the other backends.

For a row x of H values, in float32 (float64 for float64 inputs):
    rstd = rsqrt(mean(x^2) + eps)
    weight_offset == 0 (LlamaRMSNorm, Qwen2RMSNorm):  y = weight * (x * rstd).to(dtype), the product in dtype
    otherwise (GemmaRMSNorm, offset 1):                y = (x * rstd * (offset + weight.float())).to(dtype)
The forward runs the same torch operations as transformers' modules, in the same order, so it gives
their results bit for bit. The backward is that of the exact math (the casts of the Llama variant
have no gradient of their own), as Apex and Liger define it.
"""
from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalise(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float):
    """-> (y in x's dtype, rstd [...] in the accumulation dtype)."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = xf * rstd
    if weight_offset == 0:
        y = weight * h.to(x.dtype)  # transformers' LlamaRMSNorm: cast first, multiply in x's dtype
    else:
        y = (h * (weight_offset + weight.to(acc))).to(x.dtype)  # GemmaRMSNorm: multiply in float32, cast
    return y.contiguous(), rstd.squeeze(-1).contiguous()


def rms_norm(x, weight, eps: float, weight_offset: float):
    """x [..., H], weight [H] -> (y [..., H] contiguous, rstd [...])."""
    return _normalise(x, weight, eps, weight_offset)


def add_rms_norm(x, residual, weight, eps: float, weight_offset: float):
    """-> (y, new_residual = x + residual in their dtype, rstd), y the norm of the rounded sum."""
    z = (x + residual).contiguous()
    y, rstd = _normalise(z, weight, eps, weight_offset)
    return y, z, rstd


def add_rms_norm_(x, residual, weight, eps: float, weight_offset: float) -> None:
    y, z, _ = add_rms_norm(x, residual, weight, eps, weight_offset)
    residual.copy_(z)
    x.copy_(y)


def rms_norm_backward(grad_y, grad_residual, x, weight, rstd, weight_offset: float):
    """-> (grad_x [..., H] contiguous in x's dtype, grad_weight [H] in weight's dtype)."""
    acc = _acc(x.dtype)
    r = rstd.to(acc)[..., None]
    xhat = x.to(acc) * r
    g = grad_y.to(acc)
    gw = g * (weight_offset + weight.to(acc))
    dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * r
    if grad_residual is not None:
        dx = dx + grad_residual.to(acc)
    dw = (g * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype)
