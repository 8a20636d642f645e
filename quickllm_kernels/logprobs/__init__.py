"""Log-probabilities of chosen tokens without materialising softmax: `token_logprobs` from logits and
`linear_token_logprobs` from hidden states and the lm_head weight.

Ops: torch.ops.quickllm.token_logprobs and token_logprobs_backward. Backends: cuda
(csrc/logprobs/logprobs.cu), triton (logprobs/triton.py), reference (logprobs/reference.py).
"""
from __future__ import annotations

import math

import torch

from .._op import Impl, Op, call, define
from . import reference as ref

__all__ = ["token_logprobs", "linear_token_logprobs"]

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(op, name, dtype):
    if dtype not in _FLOAT:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 (float64 on the reference backend), "
                        f"got {dtype}")


def _check_temperature(op, temperature):
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{op}: temperature must be a positive finite number, got {temperature}")


def _check(logits, token_ids, temperature, *_):
    _check_dtype("token_logprobs", "logits", logits.dtype)
    if logits.dim() < 2:
        raise ValueError(f"token_logprobs: logits must be [..., V] with at least one leading dim, "
                         f"got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("token_logprobs: logits has an empty vocabulary (V = 0)")
    if token_ids.dtype != torch.int64:
        raise TypeError(f"token_logprobs: token_ids must be int64, got {token_ids.dtype}")
    if tuple(token_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"token_logprobs: token_ids must have logits' leading shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(token_ids.shape)}")
    if token_ids.device != logits.device:
        raise ValueError(f"token_logprobs: token_ids must be on logits' device ({logits.device}), "
                         f"got {token_ids.device}")
    _check_temperature("token_logprobs", temperature)


def _check_ids(logits, token_ids, temperature, ignore_index):
    """Value check of the ids (a sync check: always on the CPU, on a GPU only with
    QUICKLLM_SYNC_CHECKS=1). Without it, an id outside [0, V) gives a NaN log-prob for its row (the
    kernels never read outside)."""
    vocab = logits.shape[-1]
    if token_ids.numel() == 0:
        return
    bad = (token_ids != ignore_index) & ((token_ids < 0) | (token_ids >= vocab))
    if bool(bad.any()):
        first = int(token_ids[bad].flatten()[0])
        raise IndexError(f"token_logprobs: token_ids must lie in [0, {vocab}) (logits.shape[-1]) or equal "
                         f"ignore_index ({ignore_index}); found {first}")


def _as_3d(logits):
    """[..., V] -> [B, S, V] with a unit last stride, as a view where possible."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() > 3:
        return logits.flatten(0, -3)  # a view when the leading dims merge, else a copy
    return logits


def _kernel_limit(logits, *_):
    return "float64 inputs" if logits.dtype == torch.float64 else None


def _fwd_triton(logits, token_ids, temperature, ignore_index):
    from . import triton as tri
    lead = logits.shape[:-1]
    outs = tri.token_logprobs(_as_3d(logits), token_ids.reshape(-1).contiguous(), temperature, ignore_index)
    return tuple(o.view(lead) for o in outs)


def _bwd_triton(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature, ignore_index):
    from . import triton as tri
    flat = lambda t: t.reshape(-1).contiguous().float()  # noqa: E731
    grad = tri.token_logprobs_backward(flat(grad_logprobs), flat(grad_entropy), _as_3d(logits),
                                       token_ids.reshape(-1).contiguous(), flat(lse), flat(entropy), temperature,
                                       ignore_index)
    return grad.view(logits.shape)


def _fwd_fake(logits, token_ids, temperature, ignore_index):
    lead = logits.shape[:-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return tuple(logits.new_empty(lead, dtype=out_dtype) for _ in range(3))


def _bwd_fake(grad_logprobs, grad_entropy, logits, token_ids, *_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, token_ids, temperature, ignore_index = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, token_ids, lse, entropy)
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.mark_non_differentiable(lse)


def _backward(ctx, g_lp, g_ent, _g_lse):
    logits, token_ids, lse, entropy = ctx.saved_tensors
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
    g_ent = torch.zeros_like(lse) if g_ent is None else g_ent
    grad = call("token_logprobs_backward", g_lp, g_ent, logits, token_ids, lse, entropy,
                ctx.temperature, ctx.ignore_index)
    return grad, None, None, None


define(Op(name="token_logprobs", family="logprobs", check=_check, sync_check=_check_ids, fake=_fwd_fake,
          reference=ref.token_logprobs, triton=Impl(_fwd_triton), cuda=Impl(lambda kernel, *args: kernel(*args)),
          kernel_limit=_kernel_limit, backward=_backward, setup_context=_setup_context))
define(Op(name="token_logprobs_backward", family="logprobs",
          check=lambda g_lp, g_ent, logits, ids, lse, ent, temperature, ignore: _check(logits, ids, temperature),
          fake=_bwd_fake, reference=ref.token_logprobs_backward, triton=Impl(_bwd_triton),
          cuda=Impl(lambda kernel, *args: kernel(*args)),
          kernel_limit=lambda g_lp, g_ent, logits, *_: _kernel_limit(logits)))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100):
    """log_softmax(logits / temperature)[..., token_ids] in float32, in one online pass over each row.

    Equal to `log_softmax(logits.float() / T, -1).gather(-1, ids[..., None])[..., 0]` without building
    any [..., V] intermediate; backward writes grad_logits = g * (onehot - softmax) / T in one pass.

    logits: [..., V] float32/float16/bfloat16, any strides (e.g. `logits[:, :-1]`).
    token_ids: int64 (int32 accepted) with logits' leading shape; ignore_index rows give 0 and no
        gradient. Ids outside [0, V) raise on the CPU; on a GPU they give NaN (QUICKLLM_SYNC_CHECKS=1
        raises instead, at the cost of a sync).
    return_entropy: also return the entropy of softmax(logits / T) per row (same pass, differentiable).
    Returns float32 [...] (and the entropy).
    """
    if token_ids.dtype == torch.int32:
        token_ids = token_ids.long()
    lp, ent, _ = call("token_logprobs", logits, token_ids, float(temperature), int(ignore_index))
    return (lp, ent) if return_entropy else lp


# --------------------------------------------------------------------------------------------
# linear_token_logprobs: the lm_head matmul fused with token_logprobs, chunk by chunk of rows.
# --------------------------------------------------------------------------------------------


# One chunk's [C, V] logits are kept at or under this many bytes as float32 (the reference backend's
# intermediates are float32; the kernels' are the logits' dtype), when that does not cost grad_weight
# precision (see _auto_chunk).
_CHUNK_BYTES = 128 << 20


def _auto_chunk(n: int, vocab: int = 1, weight_dtype: torch.dtype = torch.float32) -> int:
    # 1/32 of the rows per chunk keeps a chunk's logits and their gradient (the peak extra memory)
    # at 1/16 of the full [N, V] logits; at least 256 rows so small batches are not split finely;
    # and no more rows than _CHUNK_BYTES of float32 logits. A 16-bit weight keeps at most 32 chunks
    # whatever the memory, so grad_weight takes at most 32 roundings (see _lin_bwd_impl); float32
    # and float64 accumulate each chunk's product at full precision, so more chunks cost nothing.
    rows = min(max(256, -(-n // 32)), max(16, _CHUNK_BYTES // (4 * max(vocab, 1))))
    if weight_dtype not in (torch.float32, torch.float64):
        rows = max(rows, -(-n // 32))
    return max(1, min(n, rows))


def _lin_check(hidden, weight, bias, token_ids, temperature):
    if hidden.dim() != 2:
        raise ValueError(f"linear_token_logprobs: hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_token_logprobs: weight must be [V, H] with H = hidden.shape[1] "
                         f"({hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_token_logprobs: weight must have hidden's dtype ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"linear_token_logprobs: bias must be [V] = [{weight.shape[0]}] of hidden's dtype, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("token_ids", token_ids)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_token_logprobs: {name} must be on hidden's device ({hidden.device}), "
                             f"got {t.device}")
    if tuple(token_ids.shape) != (hidden.shape[0],):
        raise ValueError(f"linear_token_logprobs: token_ids must be [N] = [{hidden.shape[0]}], "
                         f"got {tuple(token_ids.shape)}")
    _check_dtype("linear_token_logprobs", "hidden", hidden.dtype)
    if weight.shape[0] == 0:
        raise ValueError("linear_token_logprobs: weight has an empty vocabulary (V = 0)")
    if token_ids.dtype != torch.int64:
        raise TypeError(f"linear_token_logprobs: token_ids must be int64, got {token_ids.dtype}")
    _check_temperature("linear_token_logprobs", temperature)


def _chunks(n, chunk_rows, weight):
    c = chunk_rows if chunk_rows > 0 else _auto_chunk(n, weight.shape[0], weight.dtype)
    return [(r, min(n, r + c)) for r in range(0, n, c)]


def _lin_fwd_impl(hidden, weight, bias, token_ids, temperature, ignore_index, chunk_rows):
    n = hidden.shape[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lp, ent, lse = (torch.empty(n, dtype=out_dtype, device=hidden.device) for _ in range(3))
    for r0, r1 in _chunks(n, chunk_rows, weight):
        logits = torch.nn.functional.linear(hidden[r0:r1], weight, bias)  # [C, V], the only big buffer
        outs = call("token_logprobs", logits, token_ids[r0:r1], temperature, ignore_index)
        del logits  # freed before the next chunk's logits are made, not after
        for dst, src in zip((lp, ent, lse), outs):
            dst[r0:r1] = src
    return lp, ent, lse


def _lin_bwd_impl(grad_logprobs, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature,
                  ignore_index, chunk_rows, *, need_hidden=True, need_weight=True, need_bias=True):
    """Workspace: one chunk's logits and their gradient ([C, V] each, in the logits' dtype), nothing
    of [V, H] or [N, V] size. grad_weight is accumulated in place in the weight's dtype: each chunk's
    g^T h is summed in float32 inside the GEMM and added to grad_weight in its epilogue (addmm with
    beta = 1), one rounding per chunk. A float32 accumulator would cost 4 V H bytes more (2 GiB for a
    152k x 3584 lm_head, more than the whole bf16 logits of fewer than 2 H = 7168 rows); with auto
    chunking there are at most 32 chunks for a 16-bit weight. grad_bias ([V] only) is summed in
    float32. A gradient not needed (need_*) is neither computed nor allocated (an empty tensor)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    need_bias = need_bias and bias is not None
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight \
        else weight.new_empty(0)
    grad_bias = torch.zeros(weight.shape[0] if need_bias else 0, dtype=acc, device=weight.device)
    if not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias.to(weight.dtype)
    for r0, r1 in _chunks(hidden.shape[0], chunk_rows, weight):
        h = hidden[r0:r1]
        logits = torch.nn.functional.linear(h, weight, bias)  # recomputed, not stored
        g = call("token_logprobs_backward", grad_logprobs[r0:r1], grad_entropy[r0:r1], logits,
                 token_ids[r0:r1], lse[r0:r1], entropy[r0:r1],
                 temperature, ignore_index)  # [C, V]
        del logits  # only g from here on
        if need_hidden:
            torch.mm(g, weight, out=grad_hidden[r0:r1])
        if need_weight:
            grad_weight.addmm_(g.t(), h)
        if need_bias:
            grad_bias += g.sum(0, dtype=acc)
        del g  # freed before the next chunk's logits are made
    return grad_hidden, grad_weight, grad_bias.to(weight.dtype)


def _lin_fwd_fake(hidden, weight, bias, token_ids, temperature, ignore_index, chunk_rows):
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=out_dtype) for _ in range(3))


def _lin_bwd_fake(grad_logprobs, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature,
                  ignore_index, chunk_rows):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _lin_setup_context(ctx, inputs, output):
    hidden, weight, bias, token_ids, temperature, ignore_index, chunk_rows = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy)
    ctx.args = (temperature, ignore_index, chunk_rows)
    ctx.mark_non_differentiable(lse)


def _lin_backward(ctx, g_lp, g_ent, _g_lse):
    hidden, weight, bias, token_ids, lse, entropy = ctx.saved_tensors
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
    g_ent = torch.zeros_like(lse) if g_ent is None else g_ent
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    if need_h and need_w and (need_b or bias is None):
        gh, gw, gb = call("linear_token_logprobs_backward", g_lp, g_ent, hidden, weight, bias, token_ids,
                          lse, entropy, *ctx.args)
    else:  # a frozen lm_head (or hidden states that need no gradient): skip that GEMM and its buffer
        _lin_check(hidden, weight, bias, token_ids, ctx.args[0])
        gh, gw, gb = _lin_bwd_impl(g_lp, g_ent, hidden, weight, bias, token_ids, lse, entropy, *ctx.args,
                                   need_hidden=need_h, need_weight=need_w, need_bias=need_b)
    return (gh if need_h else None), (gw if need_w else None), (gb if need_b else None), None, None, None, None


define(Op(name="linear_token_logprobs", family="logprobs", composite=True,
          check=lambda hidden, weight, bias, ids, temperature, *_: _lin_check(hidden, weight, bias, ids, temperature),
          fake=_lin_fwd_fake, reference=_lin_fwd_impl, backward=_lin_backward, setup_context=_lin_setup_context))
define(Op(name="linear_token_logprobs_backward", family="logprobs", composite=True,
          check=lambda g_lp, g_ent, hidden, weight, bias, ids, lse, ent, temperature, *_: _lin_check(
              hidden, weight, bias, ids, temperature),
          fake=_lin_bwd_fake, reference=_lin_bwd_impl))


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100, chunk_rows: int = 0):
    """token_logprobs(hidden @ weight.T + bias, token_ids) without ever holding the [N, V] logits.

    hidden [N, H] and weight [V, H] (the lm_head) in one float dtype; token_ids int64 [N]. Rows go
    through in chunks of `chunk_rows` (0: max(256, N/32) rows, fewer where a chunk's float32 logits
    would pass 128 MiB, except that a 16-bit weight keeps at most 32 chunks); each chunk's logits are
    made by cuBLAS, reduced by the token_logprobs kernel of the chosen backend and dropped; backward
    recomputes them and gives grad_hidden, grad_weight and grad_bias, only those that are needed (a
    frozen lm_head costs no grad_weight GEMM), and the entropy's term only when the entropy gets a
    gradient (reference backend). Extra memory: one chunk's logits and their gradient. grad_weight is
    accumulated in the weight's dtype (each chunk's product is summed in float32 by the GEMM, then
    added: one rounding per chunk, at most 32 with the default chunks for a 16-bit weight); grad_bias
    is summed in float32.
    Returns float32 [N] log-probs (and entropies with return_entropy).
    """
    if token_ids.dtype == torch.int32:
        token_ids = token_ids.long()
    lp, ent, _ = call("linear_token_logprobs", hidden, weight, bias, token_ids, float(temperature),
                      int(ignore_index), int(chunk_rows))
    return (lp, ent) if return_entropy else lp
