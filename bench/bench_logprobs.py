"""Log-prob benchmarks.

token_logprobs, forward + backward on bf16 logits [N, V]: bytes = logits read twice (forward and
backward) + grad written once; against the reference, torch.compile(log_softmax + gather) and a
TRL-style per-row logsumexp loop.
linear_token_logprobs, forward + backward at N=16384, H=3584, V=151936 (Qwen2-7B lm_head): time and
peak extra memory against the unfused path (full logits) and Liger's fused linear GRPO loss if present.
"""
from __future__ import annotations

import torch

import quickllm_kernels as qk
from quickllm_kernels.reference import logprobs as ref

TOKEN_CASES = {
    "qwen2.5_vocab_8k_rows": dict(rows=8192, vocab=151936),
    "deepseek_v3_vocab_8k_rows": dict(rows=8192, vocab=129280),
    "llama_vocab_16k_rows": dict(rows=16384, vocab=32000),
}
LINEAR_CASES = {"qwen2_7b_lm_head": dict(rows=16384, hidden=3584, vocab=151936)}
SMOKE_TOKEN = {"smoke": dict(rows=64, vocab=1000)}
SMOKE_LINEAR = {"smoke_linear": dict(rows=64, hidden=32, vocab=500)}


def _token_providers(device):
    def ours(name):
        why = qk.backend.unavailable_reason(name, "token_logprobs", torch.device(device))
        if why:
            return why

        def fn(x, ids):
            with qk.use_backend(name):
                return qk.token_logprobs(x, ids)
        return fn

    def plain(x, ids):  # the unfused formula
        return torch.log_softmax(x.float(), -1).gather(-1, ids[..., None])[..., 0]

    def trl_style(x, ids):  # TRL's selective_log_softmax for bf16: a logsumexp per row, in a loop
        out = []
        for row, i in zip(x, ids):
            lp = torch.log_softmax(row.float(), -1)
            out.append(lp.gather(-1, i[None])[0])
        return torch.stack(out)

    return {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
            "reference": lambda x, ids: ref.token_logprobs(x, ids, 1.0, -100)[0],
            "torch.compile(log_softmax+gather)": torch.compile(plain, dynamic=False),
            "trl per-row logsumexp": trl_style}


def run(device, *, smoke=False, time_ms, ceiling_gbs):
    rows = []
    dev = torch.device(device)
    for name, c in (SMOKE_TOKEN if smoke else TOKEN_CASES).items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(c["rows"], c["vocab"], generator=g).to(device=dev, dtype=torch.bfloat16).requires_grad_()
        ids = torch.randint(0, c["vocab"], (c["rows"],), generator=g).to(dev)
        nbytes = 3 * x.numel() * x.element_size()
        times = {}
        for prov, fn in _token_providers(device).items():
            if isinstance(fn, str):
                rows.append(dict(op="token_logprobs", case=name, provider=prov, skipped=fn))
                continue
            if smoke and prov.startswith("torch.compile"):
                rows.append(dict(op="token_logprobs", case=name, provider=prov, skipped="not in smoke runs"))
                continue

            def step():
                x.grad = None
                fn(x, ids).sum().backward()
            ms = time_ms(step)
            times[prov] = ms
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(op="token_logprobs", case=name, provider=prov, shape=f"[{c['rows']}, {c['vocab']}] bf16 fwd+bwd",
                             median_ms=ms, bytes=nbytes, gbs=gbs, pct_of_copy=100 * gbs / ceiling_gbs))
        _speedups(rows, name, times, "reference", "torch.compile(log_softmax+gather)")

    for name, c in (SMOKE_LINEAR if smoke else LINEAR_CASES).items():
        g = torch.Generator().manual_seed(1)
        h = (torch.randn(c["rows"], c["hidden"], generator=g)).to(device=dev, dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(c["vocab"], c["hidden"], generator=g) / c["hidden"] ** 0.5).to(dev, torch.bfloat16)
        w.requires_grad_()
        ids = torch.randint(0, c["vocab"], (c["rows"],), generator=g).to(dev)
        full_logits = c["rows"] * c["vocab"] * 2
        provs = {
            "quickllm linear_token_logprobs": lambda: qk.linear_token_logprobs(h, w, ids).sum().backward(),
            "unfused (full logits)": lambda: torch.log_softmax((h @ w.T).float(), -1).gather(
                -1, ids[:, None]).sum().backward(),
        }
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
            rows.append(dict(op="linear_token_logprobs", case=name, provider="liger fused linear GRPO",
                             skipped="installed, not yet wired into this benchmark"))
        except ImportError as e:
            rows.append(dict(op="linear_token_logprobs", case=name, provider="liger fused linear GRPO",
                             skipped=f"not installed ({e.name})"))
        times = {}
        for prov, fn in provs.items():
            def step(fn=fn):
                h.grad = w.grad = None
                fn()
            peak = None
            if dev.type == "cuda":
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            ms = time_ms(step)
            times[prov] = ms
            flops = 3 * 2 * c["rows"] * c["hidden"] * c["vocab"]  # forward matmul + two backward matmuls
            rows.append(dict(op="linear_token_logprobs", case=name, provider=prov,
                             shape=f"N={c['rows']} H={c['hidden']} V={c['vocab']} bf16 fwd+bwd", median_ms=ms,
                             tflops=flops / (ms * 1e-3) / 1e12,
                             peak_extra_mib=None if peak is None else peak / 2**20,
                             peak_vs_full_logits=None if peak is None else peak / full_logits))
        _speedups(rows, name, times, "unfused (full logits)", None)
    return rows


def _speedups(rows, case, times, base, compiled):
    for r in rows:
        if r.get("case") == case and "median_ms" in r:
            if base in times:
                r["vs_reference"] = times[base] / r["median_ms"]
            if compiled and compiled in times:
                r["vs_compiled"] = times[compiled] / r["median_ms"]
