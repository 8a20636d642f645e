"""Mixture-of-experts ops: routing, dispatch, the grouped GEMMs and the whole expert layer.

moe_route: router logits -> (weights, expert ids) for Mixtral (softmax, top-k, renormalised),
Qwen-MoE (softmax, top-k, optionally renormalised) and DeepSeek-V3 (sigmoid, correction bias for the
choice, group-limited top-k, renormalised, scaled). The weights are differentiable in the logits.

moe_experts runs the layer as a chain of ops, each choosing its backend:
    moe_sort        (token, choice) pairs -> stable expert order, pair_rows (the inverse), offs
    moe_permute     hidden rows in that order                                  [T*k, H]
    grouped_mm      w13 of each expert over its rows                            [T*k, 2I]
    silu_mul        SiLU(gate) * up                                             [T*k, I]
    grouped_mm      w2                                                          [T*k, H]
    moe_combine     sum over the k choices, weighted                            [T, H]
with fp8_grouped_gemm (and act_quant) in place of grouped_mm for FP8 block-scaled weights. No op of
the chain reads a tensor on the host (CUDA-graph safe, no sync), and nothing of [T, E, H] size is
made. moe_align_block_size gives the same sort in vLLM's padded layout, for engines that use it.
Backends: cuda (csrc/moe/), triton (moe/triton.py), reference (moe/reference.py).
"""
from __future__ import annotations

import torch

import math

from .._op import Impl, Op, call, define, unit_last
from . import reference as ref

__all__ = ["moe_route", "grouped_mm", "fp8_grouped_gemm", "moe_sort", "moe_align_block_size", "moe_permute",
           "moe_combine", "silu_mul", "moe_experts"]

_SCORING = {"softmax": False, "sigmoid": True}
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_EXPERTS = 1024  # experts of one router the kernels hold in registers (DeepSeek-V3: 256)
MAX_TOP_K = 32


def _check(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"moe_route: router_logits must be [tokens, experts], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"moe_route: router_logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    e = logits.shape[1]
    if e == 0:
        raise ValueError("moe_route: router_logits has no experts (shape[1] == 0)")
    if not 1 <= top_k <= e:
        raise ValueError(f"moe_route: top_k must lie in [1, {e}] (the number of experts), got {top_k}")
    if bias is not None:
        if bias.shape != (e,):
            raise ValueError(f"moe_route: correction_bias must be [{e}] (one per expert), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"moe_route: correction_bias must be a float tensor, got {bias.dtype}")
        if bias.device != logits.device:
            raise ValueError(f"moe_route: correction_bias must be on router_logits' device {logits.device}, "
                             f"got {bias.device}")
    if n_group < 0 or topk_group < 0:
        raise ValueError(f"moe_route: n_group and topk_group must not be negative, got {n_group} and {topk_group}")
    if n_group > 1:
        if e % n_group:
            raise ValueError(f"moe_route: the number of experts ({e}) must be divisible by n_group ({n_group})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"moe_route: topk_group must lie in [1, n_group = {n_group}], got {topk_group}")
        if top_k > topk_group * (e // n_group):
            raise ValueError(f"moe_route: top_k ({top_k}) is more than the experts of topk_group ({topk_group}) "
                             f"groups of {e // n_group}")
    if scale != scale:
        raise ValueError("moe_route: routed_scaling_factor is NaN")


def _kernel_limit(logits, bias, top_k, *_):
    if logits.dtype == torch.float64 or (bias is not None and bias.dtype == torch.float64):
        return "float64 inputs"
    if logits.shape[1] > MAX_EXPERTS or top_k > MAX_TOP_K:
        return f"more than {MAX_EXPERTS} experts or top_k > {MAX_TOP_K}"
    return None


def _triton(logits, bias, *args):
    from . import triton as tri
    return tri.moe_route(unit_last(logits), None if bias is None else bias.float().contiguous(), *args)


def _cuda_supports(logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scale):
    return f"n_group = {n_group} (at most 64 groups)" if n_group > 64 else None


def _cuda(kernel, logits, bias, *args):
    return kernel(unit_last(logits), None if bias is None else bias.float().contiguous(), *args)


def _fake(logits, bias, top_k, *_):
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t, top_k), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _, _, sigmoid, renormalize, _, _, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.args = (sigmoid, renormalize, scale)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g_w, _g_ids):
    """The weights are a smooth function of the logits for the chosen ids (the choice itself is
    piecewise constant): differentiate that function, in PyTorch, whatever backend chose."""
    logits, ids = ctx.saved_tensors
    sigmoid, renormalize, scale = ctx.args
    if g_w is None or not ctx.needs_input_grad[0]:
        return (None,) * 8
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        w = ref.weights_of(ref.scores_of(z, sigmoid), ids, sigmoid, renormalize, scale)
        (grad,) = torch.autograd.grad(w, z, g_w.to(w.dtype))
    return (grad.to(logits.dtype),) + (None,) * 7


define(Op(name="moe_route", family="moe", check=_check, fake=_fake, reference=ref.moe_route,
          triton=Impl(_triton), cuda=Impl(_cuda, supports=_cuda_supports), kernel_limit=_kernel_limit,
          backward=_backward, setup_context=_setup_context))


def moe_route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
              correction_bias: torch.Tensor | None = None, n_group: int | None = None,
              topk_group: int | None = None, routed_scaling_factor: float = 1.0):
    """Route each token to its top_k experts: (topk_weights float32 [T, k], topk_ids int32 [T, k]).

    router_logits: [T, E] (any float dtype, any strides; scores are computed in float32).
    scoring: "softmax" (Mixtral, Qwen-MoE: softmax over all E, then top-k) or "sigmoid" (DeepSeek-V3).
    correction_bias: [E], added to the scores for the choice only (DeepSeek-V3's e_score_correction_bias).
    n_group, topk_group: group-limited routing: the E experts form n_group groups, each scored by the
        sum of its two best (biased) scores; only the topk_group best groups compete.
    renormalize: the k weights sum to one (sigmoid: divided by their sum + 1e-20).
    routed_scaling_factor: the weights are multiplied by it last.

    The k choices of a token come highest choice score first, the lower expert id first among equal
    scores, on every backend. Matches transformers' MixtralTopKRouter, Qwen3MoeTopKRouter and
    DeepseekV3TopkRouter as sets of (id, weight) per token (their torch.topk breaks ties its own way). The weights are
    differentiable in router_logits. T = 0 gives empty outputs.
    """
    if scoring not in _SCORING:
        raise ValueError(f"moe_route: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if (n_group is None) != (topk_group is None):
        raise ValueError("moe_route: n_group and topk_group go together (both or neither)")
    return tuple(call("moe_route", router_logits, correction_bias, int(top_k), _SCORING[scoring], bool(renormalize),
                      int(n_group or 0), int(topk_group or 0), float(routed_scaling_factor)))


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t):
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_float(op, name, t, dims):
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise ValueError(f"{op}: {name} must be a {dims}-D tensor, got {_shape(t)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 (float64 on the reference backend), "
                        f"got {t.dtype}")


def _check_same(op, name, t, ref_name, ref_t):
    if t.dtype != ref_t.dtype:
        raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {ref_t.dtype}, got {t.dtype}")
    if t.device != ref_t.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref_t.device}, got {t.device}")


def _check_offs(op, offs, num_experts, device):
    if not isinstance(offs, torch.Tensor) or offs.dtype != torch.int32 or offs.dim() != 1:
        raise TypeError(f"{op}: offs must be an int32 [E] tensor of cumulative row ends, got "
                        f"{getattr(offs, 'dtype', type(offs).__name__)} {_shape(offs)}")
    if offs.shape[0] != num_experts:
        raise ValueError(f"{op}: offs must have one entry per expert ({num_experts}), got {offs.shape[0]}")
    if offs.device != device:
        raise ValueError(f"{op}: offs must be on the data's device {device}, got {offs.device}")


def _check_ids(op, ids):
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int32:
        raise TypeError(f"{op}: topk_ids must be an int32 [tokens, top_k] tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)} {_shape(ids)}")


def _sync_offs(op, offs, rows):
    if offs.numel():
        if bool((offs[1:] < offs[:-1]).any()) or int(offs[0]) < 0:
            raise ValueError(f"{op}: offs must be non-decreasing and non-negative (cumulative row ends)")
        if int(offs[-1]) != rows:
            raise ValueError(f"{op}: offs must end at the number of rows ({rows}), got {int(offs[-1])}")


def _sync_ids(op, ids, num_experts):
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= num_experts).any())):
        raise ValueError(f"{op}: topk_ids holds expert ids outside [0, {num_experts})")


def _float64_limit(*tensors):
    return "float64 inputs" if any(t is not None and t.dtype == torch.float64 for t in tensors) else None


def _tri():
    from . import triton as tri  # noqa: PLC0415
    return tri


# --------------------------------------------------------------------------------------------
# grouped_mm and its weight gradient
# --------------------------------------------------------------------------------------------


def _gmm_check(x, w, offs):
    _check_float("grouped_mm", "x", x, 2)
    _check_float("grouped_mm", "w", w, 3)
    _check_same("grouped_mm", "w", w, "x", x)
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"grouped_mm: w must be [E, N, K] with x's K = {x.shape[1]}, got {list(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("grouped_mm: w has no experts (E = 0)")
    _check_offs("grouped_mm", offs, w.shape[0], x.device)


def _gmm_setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _gmm_backward(ctx, dy):
    """dx = dy @ w[e] (the same kernel, w read transposed); dw[e] = dy_e^T x_e over the expert's rows."""
    x, w, offs = ctx.saved_tensors
    dx = call("grouped_mm", dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = call("grouped_mm_wgrad", dy, x, offs, w.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_MAX_N_TILES = 65535 * 64  # the CUDA kernels' column tiles of 64 sit on the grid's second axis


def _gmm_cuda_supports(x, w, offs):
    return f"N = {w.shape[1]} > {_MAX_N_TILES} (one grid column per 64)" if w.shape[1] > _MAX_N_TILES else None


def _capability_major(device) -> int:
    from ..fp8 import _capability  # noqa: PLC0415
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0]


# Rows per expert up to which the CUDA grouped GEMM goes first on Hopper and newer. Its mma.sync
# tiles stream the experts' weights with the lean launch of a C++ op, the decode case; with more rows
# the GEMM is compute-bound and Triton's wgmma tiles (sm_90) are the faster tensor-core path, as the
# FP8 GEMM measured (bench/results/). To be measured for these kernels on an H100.
_CUDA_FIRST_ROWS_PER_EXPERT = 16


def _gmm_order(device, args):
    if device.type != "cuda" or _capability_major(device) < 9:
        return None
    if args is not None and args[0].shape[0] <= _CUDA_FIRST_ROWS_PER_EXPERT * args[2].shape[0]:
        return ("cuda", "triton", "reference")
    return ("triton", "cuda", "reference")


define(Op(name="grouped_mm", family="moe", check=_gmm_check,
          fake=lambda x, w, offs: x.new_empty((x.shape[0], w.shape[1])),
          reference=ref.grouped_mm,
          triton=Impl(lambda x, w, offs: _tri().grouped_mm(unit_last(x), w, offs.contiguous())),
          cuda=Impl(lambda kernel, x, w, offs: kernel(unit_last(x), w, offs.contiguous()), supports=_gmm_cuda_supports),
          auto_order=_gmm_order,
          sync_check=lambda x, w, offs: _sync_offs("grouped_mm", offs, x.shape[0]),
          kernel_limit=lambda x, w, offs: _float64_limit(x),
          backward=_gmm_backward, setup_context=_gmm_setup))


def _wgrad_check(dy, x, offs, num_experts):
    _check_float("grouped_mm_wgrad", "dy", dy, 2)
    _check_float("grouped_mm_wgrad", "x", x, 2)
    _check_same("grouped_mm_wgrad", "x", x, "dy", dy)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_mm_wgrad: dy and x must have the same rows, got {dy.shape[0]} and {x.shape[0]}")
    if num_experts < 1:
        raise ValueError(f"grouped_mm_wgrad: num_experts must be positive, got {num_experts}")
    _check_offs("grouped_mm_wgrad", offs, num_experts, x.device)


define(Op(name="grouped_mm_wgrad", family="moe", check=_wgrad_check,
          fake=lambda dy, x, offs, e: x.new_empty((e, dy.shape[1], x.shape[1])),
          reference=ref.grouped_mm_wgrad,
          triton=Impl(lambda dy, x, offs, e: _tri().grouped_mm_wgrad(unit_last(dy), unit_last(x), offs.contiguous(), e)),
          cuda=Impl(lambda kernel, dy, x, offs, e: kernel(unit_last(dy), unit_last(x), offs.contiguous(), e),
                    supports=lambda dy, x, offs, e: f"num_experts = {e} > 65535 (one grid row each)" if e > 65535
                    else None),
          auto_order=lambda device, args: _gmm_order(device, None if args is None else (args[1], None, args[2])),
          sync_check=lambda dy, x, offs, e: _sync_offs("grouped_mm_wgrad", offs, x.shape[0]),
          kernel_limit=lambda dy, x, offs, e: _float64_limit(x)))


# --------------------------------------------------------------------------------------------
# fp8_grouped_gemm
# --------------------------------------------------------------------------------------------

_FP8_BLOCK = 128


def _fp8g_check(a, a_scales, w, w_scales, offs, out_dtype):
    from ..fp8 import _check_fp8, _check_out_dtype, _check_scale  # noqa: PLC0415
    op = "fp8_grouped_gemm"
    _check_fp8(op, "a", a)
    _check_fp8(op, "w", w, dims=3)
    if w.device != a.device:
        raise ValueError(f"{op}: w must be on a's device ({a.device}), got {w.device}")
    (s, k), (e, n, kw) = a.shape, w.shape
    if kw != k:
        raise ValueError(f"{op}: w must be [E, N, K] with a's K = {k}, got {list(w.shape)}")
    if e == 0:
        raise ValueError(f"{op}: w has no experts (E = 0)")
    kb = math.ceil(k / _FP8_BLOCK)
    _check_scale(op, "a_scales", a_scales, (s, kb), a.device)
    _check_scale(op, "w_scales", w_scales, (e, math.ceil(n / _FP8_BLOCK), kb), a.device)
    _check_out_dtype(op, out_dtype)
    _check_offs(op, offs, e, a.device)


def _fp8g_device_limit(device):
    from ..fp8 import _device_limit  # noqa: PLC0415
    return _device_limit(device)


def _fp8g_cuda_supports(a, sa, w, sw, offs, out_dtype):
    """The CUDA FP8 kernel's 16-byte loads: K % 16 == 0 and 16-byte aligned rows of a and w."""
    a = unit_last(a)
    k = a.shape[1]
    if k % 16 or a.data_ptr() % 16 or (a.shape[0] > 1 and a.stride(0) % 16) or w.data_ptr() % 16:
        return f"K = {k} or rows that are not 16-byte aligned (its 16-byte loads need K % 16 == 0)"
    return _gmm_cuda_supports(a, w, offs)


def _fp8g_order(device, args):
    """As fp8_block_gemm's: on sm_90 and sm_100 the FP8 tensor cores are reached through wgmma /
    tcgen05 (Triton), where the CUDA kernel's mma.sync runs as f16 MMAs at half the rate; it goes
    first only for decode-sized experts."""
    if device.type != "cuda" or _capability_major(device) not in (9, 10):
        return None
    if args is not None and args[0].shape[0] <= _CUDA_FIRST_ROWS_PER_EXPERT * args[4].shape[0]:
        return ("cuda", "triton", "reference")
    return ("triton", "cuda", "reference")


define(Op(name="fp8_grouped_gemm", family="moe", check=_fp8g_check,
          fake=lambda a, sa, w, sw, offs, out_dtype: a.new_empty((a.shape[0], w.shape[1]), dtype=out_dtype),
          reference=lambda a, sa, w, sw, offs, out_dtype: ref.fp8_grouped_gemm(unit_last(a), sa, w, sw, offs,
                                                                               out_dtype),
          triton=Impl(lambda a, sa, w, sw, offs, out_dtype: _tri().fp8_grouped_gemm(
              unit_last(a), unit_last(sa), w.contiguous(), sw.contiguous(), offs.contiguous(), out_dtype)),
          cuda=Impl(lambda kernel, a, sa, w, sw, offs, out_dtype: kernel(unit_last(a), sa, w.contiguous(), sw,
                                                                         offs.contiguous(), out_dtype),
                    supports=_fp8g_cuda_supports),
          auto_order=_fp8g_order,
          sync_check=lambda a, sa, w, sw, offs, out_dtype: _sync_offs("fp8_grouped_gemm", offs, a.shape[0]),
          kernel_limit=lambda a, sa, w, sw, offs, out_dtype: "float64 output" if out_dtype == torch.float64 else None,
          device_limit=_fp8g_device_limit))


# --------------------------------------------------------------------------------------------
# Dispatch: sort, align (vLLM's layout), permute, combine; and SiLU-and-multiply
# --------------------------------------------------------------------------------------------


_CUDA_SORT_MAX_EXPERTS = 2048  # per-expert counters in shared memory (40 bytes each: within every sm_80+ GPU)


def _sort_cuda_supports(num_experts):
    return f"more than {_CUDA_SORT_MAX_EXPERTS} experts" if num_experts > _CUDA_SORT_MAX_EXPERTS else None


def _sort_check(ids, num_experts):
    _check_ids("moe_sort", ids)
    if num_experts < 1:
        raise ValueError(f"moe_sort: num_experts must be positive, got {num_experts}")


def _sort_fake(ids, num_experts):
    n = ids.numel()
    return ids.new_empty(n), ids.new_empty(n), ids.new_empty(num_experts)


define(Op(name="moe_sort", family="moe", check=_sort_check, fake=_sort_fake, reference=ref.moe_sort,
          triton=Impl(lambda ids, e: _tri().moe_sort(ids.contiguous(), e)),
          cuda=Impl(lambda kernel, ids, e: kernel(ids.contiguous(), e), supports=lambda ids, e: _sort_cuda_supports(e)),
          sync_check=lambda ids, e: _sync_ids("moe_sort", ids, e)))


def _align_check(ids, num_experts, block_size):
    _check_ids("moe_align_block_size", ids)
    if num_experts < 1:
        raise ValueError(f"moe_align_block_size: num_experts must be positive, got {num_experts}")
    if block_size < 1:
        raise ValueError(f"moe_align_block_size: block_size must be positive, got {block_size}")


def _align_fake(ids, num_experts, block_size):
    size = ref.align_size(ids.numel(), num_experts, block_size)
    return ids.new_empty(size), ids.new_empty(-(-size // block_size)), ids.new_empty(1)


define(Op(name="moe_align_block_size", family="moe", check=_align_check, fake=_align_fake,
          reference=ref.moe_align_block_size,
          triton=Impl(lambda ids, e, bs: _tri().moe_align_block_size(ids.contiguous(), e, bs,
                                                                     ref.align_size(ids.numel(), e, bs))),
          cuda=Impl(lambda kernel, ids, e, bs: kernel(ids.contiguous(), e, bs),
                    supports=lambda ids, e, bs: _sort_cuda_supports(e)),
          sync_check=lambda ids, e, bs: _sync_ids("moe_align_block_size", ids, e)))


def _permute_check(x, sorted_pairs, top_k):
    _check_float("moe_permute", "x", x, 2)
    if not isinstance(sorted_pairs, torch.Tensor) or sorted_pairs.dtype != torch.int32 or sorted_pairs.dim() != 1:
        raise TypeError(f"moe_permute: sorted_pairs must be an int32 [pairs] tensor, got "
                        f"{getattr(sorted_pairs, 'dtype', '?')} {_shape(sorted_pairs)}")
    if sorted_pairs.device != x.device:
        raise ValueError(f"moe_permute: sorted_pairs must be on x's device {x.device}, got {sorted_pairs.device}")
    if top_k < 1:
        raise ValueError(f"moe_permute: top_k must be positive, got {top_k}")


def _permute_sync(x, sorted_pairs, top_k):
    n = x.shape[0] * top_k
    if sorted_pairs.numel() and (bool((sorted_pairs < 0).any()) or bool((sorted_pairs >= n).any())):
        raise ValueError(f"moe_permute: sorted_pairs holds pair indices outside [0, tokens * top_k = {n})")


def _permute_setup(ctx, inputs, output):
    x, sorted_pairs, top_k = inputs
    ctx.save_for_backward(sorted_pairs)
    ctx.shape = (x.shape[0], top_k)


def _permute_backward(ctx, g):
    """The gradient of a gather by a permutation of the pairs: put each row back at its pair (no two
    rows share one, so no atomics), then sum the k pairs of a token."""
    (sorted_pairs,) = ctx.saved_tensors
    t, k = ctx.shape
    acc = torch.promote_types(g.dtype, torch.float32)
    buf = g.new_zeros(t * k, g.shape[1], dtype=acc)
    buf.index_copy_(0, sorted_pairs.long(), g.to(acc))
    return buf.view(t, k, -1).sum(1).to(g.dtype), None, None


define(Op(name="moe_permute", family="moe", check=_permute_check,
          fake=lambda x, sp, k: x.new_empty((sp.shape[0], x.shape[1])),
          reference=ref.moe_permute,
          triton=Impl(lambda x, sp, k: _tri().moe_permute(unit_last(x), sp.contiguous(), k)),
          cuda=Impl(lambda kernel, x, sp, k: kernel(unit_last(x), sp.contiguous(), k)),
          sync_check=_permute_sync, kernel_limit=lambda x, sp, k: _float64_limit(x),
          backward=_permute_backward, setup_context=_permute_setup))


def _combine_check(y, topk_weights, pair_rows):
    _check_float("moe_combine", "y", y, 2)
    _check_float("moe_combine", "topk_weights", topk_weights, 2)
    t, k = topk_weights.shape
    if not isinstance(pair_rows, torch.Tensor) or pair_rows.dtype != torch.int32 or tuple(pair_rows.shape) != (t * k,):
        raise ValueError(f"moe_combine: pair_rows must be int32 [tokens * top_k] = [{t * k}], got "
                         f"{getattr(pair_rows, 'dtype', '?')} {_shape(pair_rows)}")
    for name, v in (("topk_weights", topk_weights), ("pair_rows", pair_rows)):
        if v.device != y.device:
            raise ValueError(f"moe_combine: {name} must be on y's device {y.device}, got {v.device}")


def _combine_sync(y, topk_weights, pair_rows):
    if pair_rows.numel() and bool((pair_rows >= y.shape[0]).any()):
        raise ValueError(f"moe_combine: pair_rows holds rows past y's {y.shape[0]} rows")


def _combine_setup(ctx, inputs, output):
    y, w, pair_rows = inputs
    ctx.save_for_backward(y, w, pair_rows)


def _combine_backward(ctx, g):
    """dy[row of pair (t, j)] = w[t, j] g[t]; dw[t, j] = <g[t], y[row]>; float32 math."""
    y, w, pair_rows = ctx.saved_tensors
    t, k = w.shape
    acc = torch.promote_types(y.dtype, torch.float32)
    rows = pair_rows.long()
    valid = (rows >= 0)[:, None]
    gt = g.to(acc).repeat_interleave(k, 0)  # [T*k, H], g of each pair's token
    dy = dw = None
    if ctx.needs_input_grad[0]:
        dy = torch.zeros(y.shape, dtype=acc, device=y.device)
        sel = rows >= 0
        dy.index_copy_(0, rows[sel], (gt * w.to(acc).reshape(-1, 1))[sel])  # one pair per row: no atomics
        dy = dy.to(y.dtype)
    if ctx.needs_input_grad[1]:
        yr = y.index_select(0, rows.clamp(min=0)).to(acc)
        dw = torch.where(valid, yr * gt, 0.0).sum(1).view(t, k).to(w.dtype)
    return dy, dw, None


define(Op(name="moe_combine", family="moe", check=_combine_check,
          fake=lambda y, w, rows: y.new_empty((w.shape[0], y.shape[1])),
          reference=ref.moe_combine,
          triton=Impl(lambda y, w, rows: _tri().moe_combine(unit_last(y), unit_last(w), rows.contiguous())),
          cuda=Impl(lambda kernel, y, w, rows: kernel(unit_last(y), w, rows.contiguous())),
          sync_check=_combine_sync, kernel_limit=lambda y, w, rows: _float64_limit(y, w),
          backward=_combine_backward, setup_context=_combine_setup))


def _silu_check(h):
    _check_float("silu_mul", "h", h, 2)
    if h.shape[1] % 2:
        raise ValueError(f"silu_mul: h must be [rows, 2 * I] (gate then up), got an odd width {h.shape[1]}")


def _silu_bwd_check(grad, h):
    _silu_check(h)
    _check_float("silu_mul_backward", "grad", grad, 2)
    _check_same("silu_mul_backward", "grad", grad, "h", h)
    if tuple(grad.shape) != (h.shape[0], h.shape[1] // 2):
        raise ValueError(f"silu_mul_backward: grad must be [{h.shape[0]}, {h.shape[1] // 2}], got {list(grad.shape)}")


def _silu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


define(Op(name="silu_mul", family="moe", check=_silu_check,
          fake=lambda h: h.new_empty((h.shape[0], h.shape[1] // 2)), reference=ref.silu_mul,
          triton=Impl(lambda h: _tri().silu_mul(unit_last(h))), cuda=Impl(lambda kernel, h: kernel(unit_last(h))),
          kernel_limit=lambda h: _float64_limit(h),
          backward=lambda ctx, g: call("silu_mul_backward", g, ctx.saved_tensors[0]), setup_context=_silu_setup))
define(Op(name="silu_mul_backward", family="moe", check=_silu_bwd_check,
          fake=lambda g, h: torch.empty_like(h, memory_format=torch.contiguous_format),
          reference=ref.silu_mul_backward,
          triton=Impl(lambda g, h: _tri().silu_mul_backward(unit_last(g), unit_last(h))),
          cuda=Impl(lambda kernel, g, h: kernel(unit_last(g), unit_last(h))),
          kernel_limit=lambda g, h: _float64_limit(h)))


# --------------------------------------------------------------------------------------------
# moe_experts: the whole expert layer
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = ("silu",)


def _experts_check(hidden, w13, w2, topk_weights, topk_ids, activation, s13, s2):
    op = "moe_experts"
    _check_float(op, "hidden", hidden, 2)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{op}: {name} must be a 3-D [E, rows, cols] tensor, got {_shape(w)}")
        if w.device != hidden.device:
            raise ValueError(f"{op}: {name} must be on hidden's device {hidden.device}, got {w.device}")
    t, h = hidden.shape
    e, i2, h13 = w13.shape
    if h13 != h:
        raise ValueError(f"{op}: w13 must be [E, 2I, H] with hidden's H = {h}, got {list(w13.shape)}")
    if e == 0 or i2 % 2:
        raise ValueError(f"{op}: w13 must be [E, 2I, H] (gate rows then up rows; E >= 1), got {list(w13.shape)}")
    if tuple(w2.shape) != (e, h, i2 // 2):
        raise ValueError(f"{op}: w2 must be [E, H, I] = {[e, h, i2 // 2]}, got {list(w2.shape)}")
    if (s13 is None) != (s2 is None):
        raise ValueError(f"{op}: w13_scale_inv and w2_scale_inv go together (both or neither)")
    if s13 is None:
        for name, w in (("w13", w13), ("w2", w2)):
            if w.dtype != hidden.dtype:
                raise TypeError(f"{op}: {name} must have hidden's dtype {hidden.dtype} (or be float8_e4m3fn with "
                                f"block scales), got {w.dtype}")
    else:
        blocks = lambda rows, cols: [e, math.ceil(rows / _FP8_BLOCK), math.ceil(cols / _FP8_BLOCK)]  # noqa: E731
        for name, w, s, grid in (("w13", w13, s13, blocks(i2, h)), ("w2", w2, s2, blocks(h, i2 // 2))):
            if w.dtype != torch.float8_e4m3fn:
                raise TypeError(f"{op}: with block scales {name} must be float8_e4m3fn, got {w.dtype}")
            if s.dtype != torch.float32 or list(s.shape) != grid:
                raise ValueError(f"{op}: {name}_scale_inv must be float32 {grid} (128 x 128 blocks), got "
                                 f"{s.dtype} {list(s.shape)}")
            if s.device != hidden.device:
                raise ValueError(f"{op}: {name}_scale_inv must be on hidden's device {hidden.device}, got {s.device}")
    _check_float(op, "topk_weights", topk_weights, 2)
    _check_ids(op, topk_ids)
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != t:
        raise ValueError(f"{op}: topk_weights and topk_ids must both be [T = {t}, top_k], got "
                         f"{list(topk_weights.shape)} and {list(topk_ids.shape)}")
    for name, v in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if v.device != hidden.device:
            raise ValueError(f"{op}: {name} must be on hidden's device {hidden.device}, got {v.device}")


def _experts_impl(hidden, w13, w2, topk_weights, topk_ids, activation, s13, s2):
    """sort -> permute -> grouped GEMM w13 -> SiLU(gate) * up -> grouped GEMM w2 -> weighted combine.
    Every piece is an op with its own backend choice (and autograd, where this runs above it)."""
    k = topk_ids.shape[1]
    sorted_pairs, pair_rows, offs = call("moe_sort", topk_ids, w13.shape[0])
    xp = call("moe_permute", hidden, sorted_pairs, k)  # [T*k, H], expert-major
    if s13 is None:
        a = call("silu_mul", call("grouped_mm", xp, w13, offs))  # [T*k, I]
        y = call("grouped_mm", a, w2, offs)  # [T*k, H]
    else:  # FP8: activations quantised per token and 128-group, as DeepSeek-V3 runs
        out_dtype = hidden.dtype if hidden.dtype != torch.float64 else torch.float32
        q, qs = call("act_quant", xp, _FP8_BLOCK, False)
        a = call("silu_mul", call("fp8_grouped_gemm", q, qs, w13, s13, offs, out_dtype))
        q, qs = call("act_quant", a, _FP8_BLOCK, False)
        y = call("fp8_grouped_gemm", q, qs, w2, s2, offs, out_dtype)
    return call("moe_combine", y, topk_weights, pair_rows).to(hidden.dtype)


define(Op(name="moe_experts", family="moe", composite=True, check=_experts_check,
          fake=lambda hidden, *_: torch.empty_like(hidden, memory_format=torch.contiguous_format),
          reference=_experts_impl))


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _ids32(topk_ids):
    if isinstance(topk_ids, torch.Tensor) and topk_ids.dtype in (torch.int64, torch.int16, torch.uint8, torch.int8):
        return topk_ids.int()
    return topk_ids


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]^T: one GEMM per expert over its rows.

    x: [S, K] float32/float16/bfloat16 (any strides), rows grouped by expert. w: [E, N, K] in x's
    dtype (nn.Linear layout, as transformers and vLLM store experts; any strides). offs: int32 [E],
    cumulative row ends (offs[E-1] == S; an expert may have no rows). Returns [S, N] in x's dtype,
    float32 accumulation. Same meaning as torch._grouped_mm(x, w.transpose(1, 2), offs), for any K
    and N, every float dtype, any GPU and the CPU. The kernels read offs on the device (no host sync);
    a malformed offs is reported where that is free (CPU) or asked for (QUICKLLM_SYNC_CHECKS=1),
    otherwise the kernels stay in bounds. Differentiable in x and w.
    """
    return call("grouped_mm", x, w, offs)


def fp8_grouped_gemm(a_fp8: torch.Tensor, a_scales: torch.Tensor, w_fp8: torch.Tensor, w_scales: torch.Tensor,
                     offs: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """grouped_mm for DeepSeek-V3's block-scaled FP8: each expert's rows of a_fp8 [S, K] (a_scales
    float32 [S, ceil(K/128)], act_quant's output) times w_fp8[e]^T ([E, N, K] float8_e4m3fn with
    w_scales float32 [E, ceil(N/128), ceil(K/128)]), each 128-wide K block summed then scaled in
    float32 as fp8_block_gemm does. Returns [S, N] out_dtype. Inference only."""
    return call("fp8_grouped_gemm", a_fp8, a_scales, w_fp8, w_scales, offs, out_dtype)


def moe_sort(topk_ids: torch.Tensor, num_experts: int):
    """The (token, choice) pairs sorted by expert: (sorted_pairs, pair_rows, offs), all int32.

    topk_ids [T, k] (int32 or int64). Pair p = t * k + j. sorted_pairs [T*k]: the pair at each sorted
    row, expert by expert, pairs of one expert in increasing p (a stable sort, the same on every
    backend). pair_rows [T*k]: the sorted row of each pair (-1 for an id outside [0, E), which sorts
    after every expert and is never computed). offs [E]: cumulative row ends, grouped_mm's offs. No
    host sync on any backend.
    """
    return tuple(call("moe_sort", _ids32(topk_ids), int(num_experts)))


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int):
    """vLLM's moe_align_block_size: (sorted_token_ids, expert_ids, num_tokens_post_pad), all int32.

    sorted_token_ids [T*k + E*(block_size-1)] (T*k * block_size if that is less, with fewer pairs
    than experts): pair indices t * k + j grouped by expert, each expert's run padded to a multiple
    of block_size with the value T*k (also in the unused tail). expert_ids [ceil(len/block_size)]:
    the expert of each block, -1 past num_tokens_post_pad [1], the padded length. Within an expert
    pairs come in increasing index (vLLM leaves that order free). Ids outside [0, E) are left out.
    """
    return tuple(call("moe_align_block_size", _ids32(topk_ids), int(num_experts), int(block_size)))


def moe_permute(hidden: torch.Tensor, sorted_pairs: torch.Tensor, top_k: int) -> torch.Tensor:
    """out[i] = hidden[sorted_pairs[i] // top_k]: each token's rows in expert order, [len, H].
    Differentiable in hidden (the gradient sums each token's k rows, without atomics)."""
    return call("moe_permute", hidden, sorted_pairs, int(top_k))


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor, pair_rows: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[pair_rows[t * k + j]]: the experts' rows back to tokens.

    y [rows, H] float; topk_weights [T, k] (any float dtype, read as float32); pair_rows int32 [T*k]
    (moe_sort's; rows < 0 add nothing). Summed in float32 in j order, returned in y's dtype [T, H].
    Differentiable in y and topk_weights."""
    return call("moe_combine", y, topk_weights, pair_rows)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :I]) * h[:, I:] for h [S, 2I] (gate then up, as w13 makes them), float32 math,
    [S, I] in h's dtype. Differentiable."""
    return call("silu_mul", h)


def moe_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, activation: str = "silu", w13_scale_inv: torch.Tensor | None = None,
                w2_scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate) * up), [gate; up] = w13[e] @ hidden[t],
    e = topk_ids[t, j]: the expert layer of Mixtral, DeepSeek-V3 and Qwen3-MoE.

    hidden [T, H] float32/float16/bfloat16; w13 [E, 2I, H] (gate rows then up rows: transformers'
    gate_up_proj, vLLM's w13); w2 [E, H, I] (down_proj); topk_weights [T, k] float (moe_route's);
    topk_ids [T, k] int32/int64. Returns [T, H] in hidden's dtype. Differentiable in hidden, w13, w2
    and topk_weights. Memory: [T*k, H] and [T*k, 2I] intermediates, nothing of [T, E, H] size.

    FP8: with w13_scale_inv [E, ceil(2I/128), ceil(H/128)] and w2_scale_inv [E, ceil(H/128),
    ceil(I/128)] (float32, DeepSeek-V3's weight_scale_inv), w13 and w2 are float8_e4m3fn and the
    activations are quantised with act_quant per token and 128-group (inference only).
    """
    args = (hidden, w13, w2, topk_weights, _ids32(topk_ids), activation, w13_scale_inv, w2_scale_inv)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        if w13_scale_inv is not None:
            raise RuntimeError("moe_experts: the FP8 path is inference only (run it under torch.no_grad(), or "
                               "with inputs that do not require grad)")
        _experts_check(*args)
        return _experts_impl(*args)  # each op records its own backward
    return call("moe_experts", *args)
