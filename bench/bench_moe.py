"""MoE benchmarks: routing (moe_route) on the routers of Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3,
quickllm's CUDA and Triton kernels vs the reference, torch.compile(reference) and vLLM's top-k
routing when installed. Bytes per call: the router logits read once, the weights and ids written.

    python bench/run.py --op moe
"""
from __future__ import annotations

import functools

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, on_backend, rand, unavailable
from quickllm_kernels.moe import reference as ref

ROUTERS = {  # E, k, scoring, grouped (n_group, topk_group), bias, routed_scaling_factor
    "mixtral_8x7b": dict(e=8, k=2, sigmoid=False, groups=(0, 0), bias=False, scale=1.0),
    "qwen3_30b_a3b": dict(e=128, k=8, sigmoid=False, groups=(0, 0), bias=False, scale=1.0),
    "deepseek_v3": dict(e=256, k=8, sigmoid=True, groups=(8, 4), bias=True, scale=2.5),
}
TOKENS = (16, 8192)
SMOKE_TOKENS = (5,)


def make_inputs(spec: dict, tokens: int, device):
    g = torch.Generator(device=device).manual_seed(tokens + spec["e"])
    # float32, as DeepSeek-V3's router computes them: bf16 logits tie often enough that routings
    # which order ties their own way (the peers) would differ at the k-th place
    logits = torch.randn(tokens, spec["e"], generator=g, device=device)
    bias = 0.05 * torch.randn(spec["e"], generator=g, device=device) if spec["bias"] else None
    return logits, bias


def _args(spec):
    return spec["k"], spec["sigmoid"], True, spec["groups"][0], spec["groups"][1], spec["scale"]


def providers(spec: dict, device) -> dict:
    device = torch.device(device)
    kw = dict(scoring="sigmoid" if spec["sigmoid"] else "softmax", routed_scaling_factor=spec["scale"],
              n_group=spec["groups"][0] or None, topk_group=spec["groups"][1] or None)

    def ours(name):
        run = on_backend(name, lambda logits, bias: qk.moe_route(logits, spec["k"], correction_bias=bias, **kw))
        return unavailable("moe_route", name, device) or (lambda *inputs: functools.partial(run, *inputs))

    out = {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
           "reference": lambda logits, bias: lambda: ref.moe_route(logits, bias, *_args(spec))}

    def make_compiled(logits, bias):
        c = compiled(lambda logits, bias: ref.moe_route(logits, bias, *_args(spec)))
        return lambda: c(logits, bias)
    out["torch.compile(reference)"] = make_compiled
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_topk, grouped_topk

        def vllm(logits, bias):
            if spec["groups"][0]:
                return lambda: grouped_topk(logits, logits, spec["k"], True, spec["groups"][0], spec["groups"][1],
                                            scoring_func="sigmoid" if spec["sigmoid"] else "softmax",
                                            routed_scaling_factor=spec["scale"], e_score_correction_bias=bias)
            return lambda: fused_topk(logits, logits, spec["k"], True)[:2]
        out["vllm topk"] = vllm
    except ImportError as e:
        out["vllm topk"] = f"not installed ({e.name})"
    return out


def cases(device, smoke: bool = False) -> list[Case]:
    out = []
    for name, spec in ROUTERS.items():
        for t in SMOKE_TOKENS if smoke else TOKENS:
            e, k = spec["e"], spec["k"]
            out.append(Case(
                op="moe_route", name=f"{name}_T{t}", shape=f"[{t}, {e}] fp32 -> top-{k}",
                inputs=functools.partial(make_inputs, spec, t, device), providers=providers(spec, device),
                expected=lambda logits, bias, spec=spec: ref.moe_route(logits, bias, *_args(spec)),
                nbytes=t * e * 4 + t * k * 8, tol=1e-5, graph=t <= 64, extra=dict(tokens=t, experts=e, top_k=k)))
    return out


# ------------------------------------------------------------------------------------------------
# The GPU check's smoke cases (bench/smoke.py) and the Triton compile test's calls
# ------------------------------------------------------------------------------------------------


def _check_make(dev, small):
    t = 37 if small else 4096
    return dict(logits=rand(t, 256, dtype=torch.bfloat16, device=dev), bias=0.05 * torch.randn(256, device=dev),
                g=torch.randn(t, 8, device=dev))


def _check_run(x):
    z = x["logits"].float().requires_grad_()
    with torch.enable_grad():
        w, ids = qk.moe_route(z, 8, scoring="sigmoid", correction_bias=x["bias"], n_group=8, topk_group=4,
                              routed_scaling_factor=2.5)
        (grad,) = torch.autograd.grad((w * x["g"]).sum(), z)
    return w, ids, grad


def _check_refresh(x):
    x["logits"].copy_(torch.randn_like(x["logits"], dtype=torch.float32))


CHECKS = {"moe_route (DeepSeek-V3 router, fwd+bwd)": Check("moe_route", _check_make, _check_run, "rel",
                                                           _check_refresh)}


def _route_calls(g):
    for dtype in (torch.bfloat16, torch.float32):
        for e, k, sig, groups in ((8, 2, False, None), (256, 8, True, (8, 4)), (60, 6, False, None),
                                  (96, 5, True, (12, 3)), (1000, 32, False, None)):
            logits = torch.randn(3, e, generator=g).to(dtype)
            bias = torch.randn(e, generator=g) if sig else None
            qk.moe_route(logits, k, scoring="sigmoid" if sig else "softmax", correction_bias=bias,
                         n_group=groups[0] if groups else None, topk_group=groups[1] if groups else None)
            qk.moe_route(logits, k, renormalize=False)


TRITON_EXAMPLES = {"moe_route": _route_calls}
