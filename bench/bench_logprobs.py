"""Log-prob benchmarks, forward + backward.

token_logprobs on bf16 logits [N, V]: bytes = logits read twice (forward and backward) + their
gradient written once, against the copy of as many bytes; providers: quickllm's kernels, the
reference, torch.compile(log_softmax + gather) and a TRL-style per-row log_softmax loop. Checked:
the log-probs and the logits' gradient.
linear_token_logprobs at N=16384, H=3584, V=151936 (Qwen2-7B lm_head): TFLOP/s of the three matmuls
(forward, two backward) against a bf16 cuBLAS matmul of the forward's shape, and peak extra memory
against the unfused path (full logits), which is this op's x-reference baseline. Checked: log-probs
and both gradients, against the reference backend.
grpo_loss_from_hidden (dapo, beta 0.04, bf16, padded completions, trainable lm_head) at Qwen2.5-0.5B
(4k tokens) and Qwen2.5-7B (8k and 32k tokens) shapes: TFLOP/s of its three matmuls and peak extra
memory, beside the unfused path, torch.compile of it and Liger's fused linear GRPO loss where
installed. Checked: the loss and both gradients, against the reference backend.

    python bench/run.py --op logprobs
    python -m pytest bench -k logprobs             # pytest-benchmark (bench/test_bench.py)
"""
from __future__ import annotations

import functools

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, on_backend, rand, unavailable
from quickllm_kernels.logprobs import reference as ref

TOKEN_CASES = {
    "qwen2.5_vocab_8k_rows": dict(rows=8192, vocab=151936),
    "deepseek_v3_vocab_8k_rows": dict(rows=8192, vocab=129280),
    "llama_vocab_16k_rows": dict(rows=16384, vocab=32000),
}
LINEAR_CASES = {"qwen2_7b_lm_head": dict(rows=16384, hidden=3584, vocab=151936)}
SMOKE_TOKEN = {"smoke": dict(rows=64, vocab=1000)}
SMOKE_LINEAR = {"smoke_linear": dict(rows=64, hidden=32, vocab=500)}


def _step(f):
    """make(x, ids) -> fn() running f forward and backward, returning (log-probs, x.grad)."""
    def make(x, ids):
        def step():
            x.grad = None
            lp = f(x, ids)
            lp.sum().backward()
            return lp.detach(), x.grad
        return step
    return make


def _plain(x, ids):  # the unfused formula
    return torch.log_softmax(x.float(), -1).gather(-1, ids[..., None])[..., 0]


def _trl_style(x, ids):  # TRL's selective_log_softmax for bf16: a log_softmax per row, in a loop
    return torch.stack([torch.log_softmax(row.float(), -1).gather(-1, i[None])[0] for row, i in zip(x, ids)])


def _reference(x, ids):
    return ref.token_logprobs(x, ids, 1.0, -100)[0]


def token_providers(device) -> dict:
    out = {}
    for name in ("cuda", "triton"):
        out[f"quickllm-{name}"] = unavailable("token_logprobs", name, device) or _step(
            on_backend(name, lambda x, ids: qk.token_logprobs(x, ids)))
    out["reference"] = _step(_reference)
    out["torch.compile(log_softmax+gather)"] = lambda x, ids: _step(compiled(_plain))(x, ids)
    out["trl per-row log_softmax"] = _step(_trl_style)
    return out


def _token_inputs(c, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(c["rows"], c["vocab"], generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, c["vocab"], (c["rows"],), generator=g, device=device)
    return x, ids


def _token_expected(x, ids):
    return _step(_reference)(x.detach().clone().requires_grad_(), ids)()


def _linear_inputs(c, device):
    g = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(c["rows"], c["hidden"], generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(c["vocab"], c["hidden"], generator=g, device=device) / c["hidden"] ** 0.5).to(torch.bfloat16)
    ids = torch.randint(0, c["vocab"], (c["rows"],), generator=g, device=device)
    return h, w.requires_grad_(), ids


def _linear_step(f):
    """make(h, w, ids) -> fn() running f forward and backward, returning (log-probs, h.grad, w.grad)."""
    def make(h, w, ids):
        def step():
            h.grad = w.grad = None
            lp = f(h, w, ids)
            lp.sum().backward()
            return lp.detach(), h.grad, w.grad
        return step
    return make


def _unfused(h, w, ids):
    return torch.log_softmax((h @ w.T).float(), -1).gather(-1, ids[:, None])[:, 0]


def _linear_reference(h, w, ids):
    with qk.use_backend("reference"):
        return qk.linear_token_logprobs(h, w, ids)


def _linear_expected(h, w, ids):
    return _linear_step(_linear_reference)(h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(),
                                           ids)()


def linear_providers() -> dict:
    out = {"quickllm linear_token_logprobs": _linear_step(lambda h, w, ids: qk.linear_token_logprobs(h, w, ids)),
           "unfused (full logits)": _linear_step(_unfused),
           "torch.compile(unfused)": lambda h, w, ids: _linear_step(compiled(_unfused))(h, w, ids)}
    return out


# ------------------------------------------------------------------------------------------------
# The GRPO loss from hidden states (the lm_head, log-probs and loss fused, one pass) against Liger's
# fused linear GRPO loss and the unfused path; dapo, beta 0.04, bf16, trainable lm_head
# ------------------------------------------------------------------------------------------------

GRPO_CASES = {
    "qwen2.5_0.5b_4k_tokens": dict(batch=32, tokens=128, hidden=896, vocab=151936),
    "qwen2.5_7b_8k_tokens": dict(batch=16, tokens=512, hidden=3584, vocab=151936),
    "qwen2.5_7b_32k_tokens": dict(batch=32, tokens=1024, hidden=3584, vocab=151936),
}
SMOKE_GRPO = {"smoke_grpo": dict(batch=3, tokens=8, hidden=32, vocab=500)}
_GRPO_BETA = 0.04
_UNFUSED_MAX_LOGITS = 1 << 32  # bytes of bf16 logits past which the unfused provider is not run


def _grpo_inputs(c, device):
    g = torch.Generator(device=device).manual_seed(2)
    b, t, h, v = c["batch"], c["tokens"], c["hidden"], c["vocab"]
    hidden = torch.randn(b, t, h, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, generator=g, device=device) / h ** 0.5).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g, device=device)
    mask = (torch.arange(t, device=device)[None] < lengths[:, None]).float()  # padded completions
    old = -12.0 + 0.1 * torch.randn(b, t, generator=g, device=device)  # near the policy's log-probs
    ref = old + 0.05 * torch.randn(b, t, generator=g, device=device)
    adv = torch.randn(b, generator=g, device=device)
    return hidden, w, ids, mask, old, ref, adv


def _grpo_step(loss_fn):
    def make(hidden, w, ids, mask, old, ref, adv):
        def step():
            hidden.grad = w.grad = None
            loss = loss_fn(hidden, w, ids, mask, old, ref, adv)
            loss.backward()
            return loss.detach().float(), hidden.grad, w.grad
        return step
    return make


def _grpo_ours(hidden, w, ids, mask, old, ref, adv):
    return qk.grpo_loss_from_hidden(hidden, w, ids, old, ref, adv, mask, loss_type="dapo", beta=_GRPO_BETA)[0]


def _grpo_unfused(hidden, w, ids, mask, old, ref, adv):
    lp = torch.log_softmax((hidden @ w.T).float(), -1).gather(-1, ids[..., None])[..., 0]
    return qk.grpo_loss(lp, old, ref, adv, mask, loss_type="dapo", beta=_GRPO_BETA)[0]


def _grpo_expected(hidden, w, *rest):
    h2, w2 = hidden.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    return _grpo_step(on_backend("reference", _grpo_ours))(h2, w2, *rest)()


def grpo_providers(c) -> dict:
    out = {"quickllm grpo_loss_from_hidden": _grpo_step(_grpo_ours)}
    if c["batch"] * c["tokens"] * c["vocab"] * 2 <= _UNFUSED_MAX_LOGITS:
        out["unfused (full logits)"] = _grpo_step(_grpo_unfused)
        out["torch.compile(unfused)"] = lambda *x: _grpo_step(compiled(_grpo_unfused))(*x)
    else:
        out["unfused (full logits)"] = "not run: its float32 log-softmax alone would pass 8 GiB"
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        out["liger fused linear GRPO"] = f"not installed ({e.name})"
    else:
        liger = LigerFusedLinearGRPOLoss(beta=_GRPO_BETA, loss_type="dapo", use_ref_model=True)

        def _liger(hidden, w, ids, mask, old, ref, adv):
            return liger(hidden, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
        out["liger fused linear GRPO"] = _grpo_step(_liger)
    return out


def cases(device, smoke: bool = False) -> list[Case]:
    out = []
    for name, c in (SMOKE_TOKEN if smoke else TOKEN_CASES).items():
        out.append(Case(
            op="token_logprobs", name=name, shape=f"[{c['rows']}, {c['vocab']}] bf16 fwd+bwd",
            inputs=functools.partial(_token_inputs, c, device), providers=token_providers(device),
            expected=_token_expected, nbytes=3 * c["rows"] * c["vocab"] * 2, tol=1e-2,
            baselines={"vs_reference": "reference", "vs_compiled": "torch.compile(log_softmax+gather)"}))
    for name, c in (SMOKE_LINEAR if smoke else LINEAR_CASES).items():
        n, h, v = c["rows"], c["hidden"], c["vocab"]
        out.append(Case(
            op="linear_token_logprobs", name=name, shape=f"N={n} H={h} V={v} bf16 fwd+bwd",
            inputs=functools.partial(_linear_inputs, c, device), providers=linear_providers(),
            expected=_linear_expected, flops=3 * 2 * n * h * v, tol=2e-2, matmul_ceiling=(n, v, h),
            baselines={"vs_reference": "unfused (full logits)", "vs_compiled": "torch.compile(unfused)"},
            peak_memory=n * v * 2))
    for name, c in (SMOKE_GRPO if smoke else GRPO_CASES).items():
        b, t, h, v = c["batch"], c["tokens"], c["hidden"], c["vocab"]
        n = b * t
        out.append(Case(
            op="grpo_loss_from_hidden", name=name, shape=f"B={b} T={t} H={h} V={v} bf16 dapo fwd+bwd",
            inputs=functools.partial(_grpo_inputs, c, device), providers=grpo_providers(c),
            expected=_grpo_expected, flops=3 * 2 * n * h * v, tol=2e-2, matmul_ceiling=(n, v, h),
            baselines={"vs_reference": "unfused (full logits)", "vs_compiled": "torch.compile(unfused)",
                       "vs_liger": "liger fused linear GRPO"},
            peak_memory=n * v * 2))
    return out


# ------------------------------------------------------------------------------------------------
# The GPU check's smoke cases (bench/smoke.py) and the Triton compile test's calls
# ------------------------------------------------------------------------------------------------


def _check_lp_make(dev, small):
    n, v = (19, 1000) if small else (512, 151936)
    logits = rand(n, v, dtype=torch.bfloat16, device=dev, scale=3.0).requires_grad_()
    ids = torch.randint(0, v, (n,), device=dev)
    ids[::7] = -100
    return dict(logits=logits, ids=ids, g=torch.randn(n, device=dev), ge=torch.randn(n, device=dev))


def _check_lp_run(x):
    x["logits"].grad = None
    with torch.enable_grad():
        lp, ent = qk.token_logprobs(x["logits"], x["ids"], temperature=0.7, return_entropy=True)
        (grad,) = torch.autograd.grad((lp * x["g"]).sum() + (ent * x["ge"]).sum(), x["logits"])
    return lp, ent, grad


def _check_lp_refresh(x):
    with torch.no_grad():
        x["logits"].copy_(torch.randn_like(x["logits"], dtype=torch.float32) * 3)


def _check_lin_make(dev, small):
    n, h, v = (33, 64, 300) if small else (1024, 3584, 32768)
    return dict(hidden=rand(n, h, dtype=torch.bfloat16, device=dev).requires_grad_(),
                weight=rand(v, h, dtype=torch.bfloat16, device=dev, scale=h ** -0.5).requires_grad_(),
                ids=torch.randint(0, v, (n,), device=dev), g=torch.randn(n, device=dev))


def _check_lin_run(x):
    with torch.enable_grad():
        lp, ent = qk.linear_token_logprobs(x["hidden"], x["weight"], x["ids"], return_entropy=True)
        gh, gw = torch.autograd.grad((lp * x["g"]).sum() + ent.sum(), (x["hidden"], x["weight"]))
    return lp, ent, gh, gw


def _check_lin_refresh(x):
    with torch.no_grad():
        x["hidden"].copy_(torch.randn_like(x["hidden"], dtype=torch.float32))


CHECKS = {
    "token_logprobs fwd+bwd": Check("token_logprobs", _check_lp_make, _check_lp_run, "rel", _check_lp_refresh),
    "linear_token_logprobs fwd+bwd": Check("token_logprobs", _check_lin_make, _check_lin_run, "rel",
                                           _check_lin_refresh),
}


def _logprob_calls(g):
    for dtype in (torch.bfloat16, torch.float32):
        for v in (1000, 32000, 151936):
            logits = torch.randn(2, 3, v, generator=g).to(dtype).requires_grad_()
            ids = torch.randint(0, v, (2, 3), generator=g)
            lp, ent = qk.token_logprobs(logits, ids, return_entropy=True, temperature=0.7)
            (lp.sum() + ent.sum()).backward()


TRITON_EXAMPLES = {"token_logprobs": _logprob_calls, "token_logprobs_backward": _logprob_calls}
