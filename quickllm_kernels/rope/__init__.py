"""Fused rotary position embedding: `rope_cache` builds the table, `apply_rope` rotates q and k.

Ops: torch.ops.quickllm.apply_rope (functional, with autograd) and torch.ops.quickllm.apply_rope_
(in place, `Tensor(a!)` in its schema). Backends: cuda (csrc/rope/rope.cu), triton (rope/triton.py),
reference (rope/reference.py).
"""
from __future__ import annotations

import math

import torch

from .._op import Impl, Op, call, define, unit_last
from . import reference as ref

__all__ = ["rope_cache", "rope_inv_freq", "rope_softmax_scale", "apply_rope"]

_STYLES = {"neox": True, "gptj": False}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# --------------------------------------------------------------------------------------------
# Cache builders: the inverse frequencies of transformers' rope initialisation, per rope_type.
# --------------------------------------------------------------------------------------------


def _param(scaling: dict, key: str, rope_type: str, default=None, required=False):
    value = scaling.get(key, default)
    if required and value is None:
        raise ValueError(f"rope_cache: scaling[{key!r}] is required for rope_type {rope_type!r}")
    return value


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    # float32 throughout, in transformers' order of operations, so the table matches it bit for bit.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(rotary_dim: int, *, base: float = 10000.0, scaling: dict | None = None,
                  max_position_embeddings: int | None = None, seq_len: int | None = None):
    """Inverse frequencies [rotary_dim // 2] (float32) and the attention factor for cos and sin.

    `scaling` is a Hugging Face `rope_scaling` / `rope_parameters` dict. Supported rope_type values:
    default, linear, dynamic, llama3, yarn. `max_position_embeddings` is the model config's value
    (needed by dynamic, and by yarn when `factor` is absent); `seq_len` is the sequence length
    dynamic NTK scales for.
    """
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rope_cache: rotary_dim must be a positive even int, got {rotary_dim!r}")
    scaling = dict(scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    theta = scaling.get("rope_theta")
    if theta is not None and float(theta) != float(base):
        raise ValueError(f"rope_cache: scaling['rope_theta'] ({theta}) differs from base ({base}); "
                         f"pass base={theta}")
    dim = rotary_dim
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        factor = _param(scaling, "factor", rope_type, required=True)
        return _base_inv_freq(base, dim) / factor, 1.0
    if rope_type == "dynamic":
        factor = _param(scaling, "factor", rope_type, required=True)
        if max_position_embeddings is None:
            raise ValueError("rope_cache: max_position_embeddings (the model config's) is required "
                             "for rope_type 'dynamic'")
        seq = max(seq_len if seq_len is not None else max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        factor = _param(scaling, "factor", rope_type, required=True)
        low = _param(scaling, "low_freq_factor", rope_type, required=True)
        high = _param(scaling, "high_freq_factor", rope_type, required=True)
        old_len = _param(scaling, "original_max_position_embeddings", rope_type, required=True)
        inv_freq = _base_inv_freq(base, dim)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, scaling, max_position_embeddings)
    raise ValueError(f"rope_cache: unsupported rope_type {rope_type!r}; supported: "
                     "default, linear, dynamic, llama3, yarn")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim, base, scaling, max_position_embeddings):
    orig = _param(scaling, "original_max_position_embeddings", "yarn", required=True)
    factor = scaling.get("factor")
    if factor is None:
        # DeepSeek-style configs may give the extension as max_position_embeddings / original.
        if max_position_embeddings is None:
            raise ValueError("rope_cache: yarn needs scaling['factor'] or max_position_embeddings")
        factor = max_position_embeddings / orig
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: high-frequency dims keep their trained frequency; 0: fully interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rope_softmax_scale(head_dim: int, scaling: dict | None = None) -> float:
    """Softmax scale of attention with this rope: head_dim**-0.5, times mscale**2 for YaRN with
    `mscale_all_dim` (DeepSeek-V3's correction: 0.1 * mscale_all_dim * ln(factor) + 1, squared)."""
    scale = head_dim ** -0.5
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default" and scaling.get("mscale_all_dim"):
        m = _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale *= m * m
    return scale


def rope_cache(rotary_dim: int, max_positions: int, *, base: float = 10000.0, scaling: dict | None = None,
               dtype: torch.dtype = torch.float32, device=None, max_position_embeddings: int | None = None,
               seq_len: int | None = None) -> torch.Tensor:
    """cos_sin_cache [max_positions, rotary_dim]: cos(p * inv_freq) in [:, :R/2], sin in [:, R/2:],
    both times the attention factor, as transformers' rotary embedding computes them (float32).

    scaling: Hugging Face rope_scaling dict (see rope_inv_freq). For rope_type "dynamic" the table is
    the one transformers uses for a sequence of `seq_len` tokens (default: max_positions).
    """
    if not isinstance(max_positions, int) or max_positions < 0:
        raise ValueError(f"rope_cache: max_positions must be a non-negative int, got {max_positions!r}")
    if seq_len is None:
        seq_len = max_positions
    inv_freq, attention_factor = rope_inv_freq(rotary_dim, base=base, scaling=scaling,
                                               max_position_embeddings=max_position_embeddings,
                                               seq_len=seq_len)
    pos = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(pos, inv_freq)  # [P, R/2], float32 as in transformers
    table = torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)
    return table.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# The op: validation, fake kernel, backend dispatch, autograd.
# --------------------------------------------------------------------------------------------


def _check(q, k, positions, cos_sin_cache):
    """Shape, dtype and device checks; they work on fake tensors too."""
    if q.dim() not in (3, 4):
        raise ValueError("apply_rope: q must be [tokens, heads, head_dim] or [batch, seq, heads, head_dim], "
                         f"got shape {tuple(q.shape)}")
    if k.dim() != q.dim():
        raise ValueError(f"apply_rope: k must have q's number of dims ({q.dim()}), got shape {tuple(k.shape)}")
    lead = tuple(q.shape[:-2])
    if tuple(k.shape[:-2]) != lead:
        raise ValueError(f"apply_rope: k must have q's leading shape {lead}, got {tuple(k.shape[:-2])}")
    if tuple(positions.shape) != lead:
        raise ValueError(f"apply_rope: positions must have q's leading shape {lead}, got {tuple(positions.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"apply_rope: k's head_dim ({k.shape[-1]}) must equal q's head_dim ({q.shape[-1]})")
    if cos_sin_cache.dim() != 2:
        raise ValueError("apply_rope: cos_sin_cache must be [max_positions, rotary_dim], "
                         f"got shape {tuple(cos_sin_cache.shape)}")
    rot = cos_sin_cache.shape[1]
    if rot <= 0 or rot % 2:
        raise ValueError(f"apply_rope: rotary_dim (cos_sin_cache.shape[-1]) must be even and positive, got {rot}")
    if cos_sin_cache.shape[0] == 0 and positions.numel() > 0:
        raise ValueError("apply_rope: cos_sin_cache has no rows (max_positions = 0) but positions is not empty")
    if rot > q.shape[-1]:
        raise ValueError(f"apply_rope: rotary_dim (cos_sin_cache.shape[-1] = {rot}) must not exceed "
                         f"head_dim ({q.shape[-1]})")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError("apply_rope: q must be float32, float16 or bfloat16 (float64 on the reference "
                        f"backend), got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"apply_rope: k must have q's dtype ({q.dtype}), got {k.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"apply_rope: positions must be int32 or int64, got {positions.dtype}")
    if cos_sin_cache.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"apply_rope: cos_sin_cache must be float32 or q's dtype ({q.dtype}), "
                        f"got {cos_sin_cache.dtype}")
    for name, t in (("k", k), ("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        if t.device != q.device:
            raise ValueError(f"apply_rope: {name} must be on q's device ({q.device}), got {t.device}")


def _check_positions(q, k, positions, cos_sin_cache, is_neox, inverse):
    """Range check of the position values (a sync check: always on the CPU, on a GPU only with
    QUICKLLM_SYNC_CHECKS=1); without it, out-of-range positions give NaN in the rotated dims of
    their tokens and the kernels never read outside the cache."""
    if positions.numel() == 0:
        return
    max_positions = cos_sin_cache.shape[0]
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= max_positions:
        raise IndexError(f"apply_rope: positions must lie in [0, {max_positions}) (cos_sin_cache.shape[0]); "
                         f"got values in [{lo}, {hi}]")


def _kernel_limit(q, k, positions, cos_sin_cache, is_neox, inverse):
    return "float64 inputs" if q.dtype == torch.float64 else None


def _kernel_args(q, k, positions, cos_sin_cache, is_neox, inverse):
    """What the kernels take: unit last strides (any other strides), contiguous positions and table."""
    return (unit_last(q), unit_last(k), positions.contiguous(), cos_sin_cache.contiguous(),
            is_neox, inverse)


def _inplace(functional, inplace):
    """An in-place kernel call; where q or k has a non-unit last stride (which the kernels cannot
    write), rotate out of place and copy back."""
    def run(*args):
        q, k = args[0], args[1]
        kargs = _kernel_args(*args)
        if kargs[0] is q and kargs[1] is k:
            inplace(*kargs)
        else:
            q_out, k_out = functional(*kargs)
            q.copy_(q_out)
            k.copy_(k_out)
    return run


def _triton(inplace):
    def run(*args):
        from . import triton as tri
        return _inplace(tri.apply_rope, tri.apply_rope_)(*args) if inplace else tri.apply_rope(*_kernel_args(*args))
    return run


def _cuda_inplace(kernel, *args):
    return _inplace(torch.ops.quickllm._cuda_apply_rope.default, kernel)(*args)


def _apply_rope_fake(q, k, positions, cos_sin_cache, is_neox, inverse):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _, _, positions, cos_sin_cache, is_neox, inverse = inputs
    ctx.save_for_backward(positions, cos_sin_cache)
    ctx.is_neox, ctx.inverse = is_neox, inverse


def _backward(ctx, grad_q, grad_k):
    # A rotation's adjoint is the rotation by the negative angle: the same op with `inverse` flipped.
    positions, cos_sin_cache = ctx.saved_tensors
    gq, gk = call("apply_rope", grad_q, grad_k, positions, cos_sin_cache,
                  ctx.is_neox, not ctx.inverse)
    return gq, gk, None, None, None, None


_COMMON = dict(family="rope", check=lambda q, k, positions, cache, *flags: _check(q, k, positions, cache),
               sync_check=_check_positions, kernel_limit=_kernel_limit)
define(Op(name="apply_rope", fake=_apply_rope_fake, reference=ref.apply_rope, triton=Impl(_triton(False)),
          cuda=Impl(lambda kernel, *args: kernel(*_kernel_args(*args))),
          backward=_backward, setup_context=_setup_context, **_COMMON))
define(Op(name="apply_rope_", fake=lambda *args: None, reference=ref.apply_rope_, triton=Impl(_triton(True)),
          cuda=Impl(_cuda_inplace), **_COMMON))


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *,
               style: str = "neox", inplace: bool = False):
    """Rotate q and k by their positions' angles, in one launch.

    y1 = x1 cos(p f_i) - x2 sin(p f_i), y2 = x2 cos(p f_i) + x1 sin(p f_i) for each rotary pair.

    q: [tokens, Hq, D] or [batch, seq, Hq, D]; k: same leading shape, its own head count Hk.
       float32, float16 or bfloat16 (math in float32); any strides (views of a fused qkv are fine).
    positions: int32/int64 with q's leading shape; any values in [0, max_positions).
    cos_sin_cache: [max_positions, R] from rope_cache (float32 or q's dtype); R = rotary_dim <= D,
       even; dims R..D pass through.
    style: "neox" rotates halves (Llama, Qwen, Mixtral); "gptj" rotates interleaved pairs
       (GPT-J, DeepSeek's rope dims in the original layout).
    inplace: write into q and k (torch.ops.quickllm.apply_rope_) and return them.

    Returns (q_rot, k_rot): new contiguous tensors, or q and k themselves when inplace.
    Differentiable in q and k. Out-of-range positions raise on the CPU; on a GPU they give NaN in
    the rotated dims of their tokens unless QUICKLLM_SYNC_CHECKS=1 asks for a checked (syncing) call.
    """
    if style not in _STYLES:
        raise ValueError(f"apply_rope: style must be 'neox' or 'gptj', got {style!r}")
    is_neox = _STYLES[style]
    if cos_sin_cache.requires_grad and torch.is_grad_enabled():
        raise ValueError("apply_rope: cos_sin_cache gets no gradient; pass cos_sin_cache.detach()")
    if not inplace:
        return tuple(call("apply_rope", q, k, positions, cos_sin_cache, is_neox, False))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # The in-place kernel has no autograd formula of its own: rotate out of place, then copy_
        # (which autograd tracks) so gradients still flow.
        q_rot, k_rot = call("apply_rope", q, k, positions, cos_sin_cache, is_neox, False)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    call("apply_rope_", q, k, positions, cos_sin_cache, is_neox, False)
    return q, k
