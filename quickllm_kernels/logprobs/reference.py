"""Chosen-token log-probabilities and entropy in plain PyTorch: the CPU kernel and the oracle.

z = logits / T, lse = logsumexp(z), logprob = z[id] - lse, entropy = lse - sum(softmax(z) * z).
Backward: d logprob / dz = onehot(id) - p; d entropy / dz = -p * (z - lse + entropy); both / T.
Rows whose id equals ignore_index give 0 and get no gradient. Math in float32 (float64 for float64).

Written for the CPU, where these [rows, V] passes cost as much as the lm_head matmul around them: the
forward keeps one [rows, V] buffer besides the logits (and exp() of a few rows at a time), the
backward two (one when no entropy gradient comes back), updated in place. The forward works on
z - max(z): the log-prob and the entropy come out as differences of small numbers, not of two
numbers near max(z).
"""
from __future__ import annotations

import torch


def _acc(logits):
    """The logits in the accumulation dtype (no copy when they already are)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _decide(flag: torch.Tensor) -> bool:
    """bool(flag), or True (the general path) where reading it would sync inside a CUDA-graph capture."""
    if flag.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    return bool(flag)


def _row_dot(a, b):
    """sum(a * b, -1) without a [..., V] product buffer."""
    v = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, v), b.reshape(-1, v, 1)).view(a.shape[:-1])


_BLOCK_BYTES = 16 << 20  # exp(z - max) is made for this many bytes of rows at a time


def _exp_sums(zs):
    """(sum(e), sum(e * zs)) per row, e = exp(zs), with e made a block of rows at a time: the forward
    then holds one [rows, V] buffer (zs) besides the logits. With a -inf logit e * zs is 0 * -inf:
    those rows are redone with the product counted as 0 (masked vocabularies)."""
    v = zs.shape[-1]
    flat = zs.reshape(-1, v)
    step = max(1, _BLOCK_BYTES // (flat.element_size() * max(v, 1)))
    sums, dots = [], []
    # one block buffer for all blocks: a new one per block would leave the freed blocks between the small
    # per-row results on the heap, each block then taking fresh pages
    buf = flat.new_empty((min(step, flat.shape[0]), v)) if not zs.requires_grad else None
    for r in range(0, flat.shape[0], step):
        zb = flat[r:r + step]
        e = torch.exp(zb) if buf is None else torch.exp(zb, out=buf[:zb.shape[0]])
        s, ez = e.sum(-1), _row_dot(e, zb)
        redo = torch.isnan(ez) & ~torch.isnan(s)
        if _decide(redo.any()):
            ez = torch.where(redo, torch.where(e > 0, e * zb, 0.0).sum(-1), ez)
        sums.append(s)
        dots.append(ez)
    if not sums:
        return flat.new_zeros(0).view(zs.shape[:-1]), flat.new_zeros(0).view(zs.shape[:-1])
    return torch.cat(sums).view(zs.shape[:-1]), torch.cat(dots).view(zs.shape[:-1])


def token_logprobs(logits, token_ids, temperature: float, ignore_index: int):
    x = _acc(logits)
    zs = torch.div(x, temperature) if temperature != 1.0 else x.clone()  # becomes z - max(z), [..., V]
    lp, ent, lse, _ = _stats_(zs, token_ids, ignore_index)
    out = lp, ent, lse
    return tuple(t.float() if logits.dtype != torch.float64 else t for t in out)


def _stats_(zs, token_ids, ignore_index: int):
    """(logprob, entropy, lse, log_s) of z = zs, which becomes z - max(z) (in place): z - lse is then
    zs - log_s."""
    # the shift is a constant (detached: lse and the entropy do not depend on it), which also keeps this
    # function differentiable for the tests that use it as an oracle, in place updates included
    zd = zs.detach()
    mx = zd.amax(-1, keepdim=True) if zd.shape[-1] else zd.new_full((*zd.shape[:-1], 1), float("-inf"))
    mx = torch.where(torch.isinf(mx), 0.0, mx)  # an all -inf row: lse = log(0) = -inf, no inf - inf
    zs.sub_(mx)
    s, ez = _exp_sums(zs)
    log_s = torch.log(s)
    lse = mx[..., 0] + log_s
    # entropy = log(s) - sum(e * (z - max)) / s: from the shifted logits, so no cancellation against lse
    entropy = torch.where(s > 0, log_s - ez / s, lse)  # an all -inf row: -inf
    keep = token_ids != ignore_index
    in_range = (token_ids >= 0) & (token_ids < zs.shape[-1])
    ids = torch.where(keep & in_range, token_ids, 0)
    # an id outside [0, V) reads nothing and gives NaN (the GPU kernels do the same; on the CPU the op
    # raises before getting here)
    picked = torch.where(in_range, zs.gather(-1, ids[..., None].long())[..., 0], float("nan"))
    zero = torch.zeros_like(lse)
    return torch.where(keep, picked - log_s, zero), torch.where(keep, entropy, zero), lse, log_s


def token_logprobs_backward(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy,
                            temperature: float, ignore_index: int):
    x = _acc(logits)
    g = torch.div(x, temperature) if temperature != 1.0 else x.clone()
    g.sub_(lse.to(x.dtype)[..., None])  # z - lse
    return _gradient_(g, grad_logprobs, grad_entropy, token_ids, entropy, temperature, ignore_index,
                      finite=lambda: torch.isfinite(x).all()).to(logits.dtype)


def token_logprobs_inplace(logits, token_ids, temperature: float, ignore_index: int):
    """token_logprobs for a float32/float64 [rows, V] buffer that the caller gives up: its logits
    become z - max(z) in place (no second [rows, V] buffer). Returns (logprob, entropy, lse, log_s);
    token_logprobs_backward_inplace then turns the same buffer into the logits' gradient."""
    zs = logits.div_(temperature) if temperature != 1.0 else logits
    return _stats_(zs, token_ids, ignore_index)


def token_logprobs_backward_inplace(grad_logprobs, grad_entropy, shifted, log_s, token_ids, entropy,
                                    temperature: float, ignore_index: int):
    """The gradient with respect to the logits, written over token_logprobs_inplace's buffer."""
    g = shifted.sub_(log_s[..., None])  # z - lse
    return _gradient_(g, grad_logprobs, grad_entropy, token_ids, entropy, temperature, ignore_index,
                      finite=lambda: torch.isfinite(g).all())


def _gradient_(g, grad_logprobs, grad_entropy, token_ids, entropy, temperature, ignore_index, finite):
    """g (holding z - lse) becomes (onehot - p) * g_lp - p * (z - lse + entropy) * g_ent, / T.
    finite(): a flag tensor, whether the logits hold no -inf (read only where the entropy term runs)."""
    acc = g.dtype
    keep = token_ids != ignore_index
    glp = torch.where(keep, grad_logprobs.to(acc), 0.0)[..., None]
    gent = torch.where(keep, grad_entropy.to(acc), 0.0)[..., None]
    if _decide((gent != 0).any()):
        has_inf = _decide(~finite())  # -inf logits (masked vocabulary entries): checked before g changes
        p = torch.exp(g)
        # g = glp * (onehot - p) - gent * p * (z - lse + entropy), the onehot added below
        g.add_(entropy.to(acc)[..., None]).mul_(gent).add_(glp).mul_(p).neg_()
        if has_inf:
            g.masked_fill_(p == 0, 0.0)  # -inf logits: p = 0 and the line above gave 0 * -inf
        del p
    else:  # no entropy gradient: one buffer, no entropy term
        g.exp_().mul_(-glp)
    v = g.shape[-1]
    flat = g.view(-1, v)
    rows = (keep & (token_ids >= 0) & (token_ids < v)).reshape(-1).nonzero()[:, 0]
    flat.index_put_((rows, token_ids.reshape(-1)[rows].long()), glp.reshape(-1)[rows], accumulate=True)
    if temperature != 1.0:
        g.div_(temperature)
    dropped = (~keep).reshape(-1).nonzero()[:, 0]
    if dropped.numel():
        flat.index_fill_(0, dropped, 0.0)  # not a product with 0: an ignored row's logits may be -inf or NaN
    return g
