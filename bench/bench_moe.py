"""MoE benchmarks at the shapes of Mixtral-8x7B, DeepSeek-V3 and Qwen3-30B-A3B:

- moe_route on their routers, beside vLLM's top-k routing when installed. Bytes: the logits read
  once, the weights and ids written.
- grouped_mm (bf16) and fp8_grouped_gemm: the w13 projection of the routed tokens, beside
  torch._grouped_mm; TFLOP/s against a dense bf16 matmul of the same FLOPs (the matmul ceiling).
- moe_experts: the whole expert layer (bf16), beside transformers' eager experts loop and its
  grouped_mm experts implementation and vLLM's fused_experts when installed.
- moe_dispatch: routing + sort + permute, the part of the layer that is not GEMM.

Tokens 1 to 16k, routing uniform (distinct random experts per token) or skewed (expert e drawn with
weight 1 / (e + 1)). Every provider beside quickllm's kernels, the reference and
torch.compile(reference).

    python bench/run.py --op moe
"""
from __future__ import annotations

import functools

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, on_backend, rand, unavailable
from quickllm_kernels.fp8 import reference as fp8_ref
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
    return out + layer_cases(device, smoke)


# ------------------------------------------------------------------------------------------------
# The expert layer and its GEMMs
# ------------------------------------------------------------------------------------------------

MODELS = {  # E, top_k, H, I
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "deepseek_v3": (256, 8, 7168, 2048),
    "qwen3_30b_a3b": (128, 8, 2048, 768),
}
LAYER_TOKENS = (1, 16, 128, 1024, 8192, 16384)
ROUTINGS = ("uniform", "skewed")
SMOKE_MODELS = {"smoke": (6, 2, 96, 80)}
SMOKE_LAYER_TOKENS = (5,)


def routing(tokens: int, e: int, k: int, kind: str, device, seed: int = 0):
    """(float32 weights summing to one, int32 distinct expert ids) [tokens, k]."""
    g = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(tokens, e, generator=g, device=device)
    if kind == "skewed":  # Gumbel top-k: distinct experts drawn with weights 1 / (e + 1)
        score = -torch.log(-torch.log(score.clamp_min(1e-20))) - torch.log(torch.arange(1, e + 1, device=device))
    ids = score.topk(k, dim=-1).indices.int()
    w = torch.rand(tokens, k, generator=g, device=device) + 0.1
    return (w / w.sum(-1, keepdim=True)).float(), ids


def layer_inputs(model: tuple, tokens: int, kind: str, device, fp8: bool = False):
    e, k, h, i = model
    x = rand(tokens, h, dtype=torch.bfloat16, device=device)
    w13 = rand(e, 2 * i, h, dtype=torch.bfloat16, device=device, scale=h ** -0.5)
    w2 = rand(e, h, i, dtype=torch.bfloat16, device=device, scale=i ** -0.5)
    w, ids = routing(tokens, e, k, kind, device)
    return x, w13, w2, w, ids


def _expert_rows(ids, e):
    return torch.bincount(ids.reshape(-1).long(), minlength=e)


def _active_bytes(ids, e, per_expert: int) -> int:
    return int((_expert_rows(ids, e) > 0).sum()) * per_expert


def _transformers_experts(model, w13, w2, impl):
    """transformers' MixtralExperts holding these weights, with its `impl` experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    e, k, h, i = model
    cfg = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        m = MixtralExperts(cfg)
    m.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    m.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return m


def layer_providers(model, device) -> dict:
    device = torch.device(device)

    def ours(name):
        run = on_backend(name, lambda x, w13, w2, w, ids: qk.moe_experts(x, w13, w2, w, ids))
        return unavailable("grouped_mm", name, device) or (lambda *inputs: functools.partial(run, *inputs))

    out = {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
           "reference": lambda *inputs: functools.partial(on_backend("reference", qk.moe_experts), *inputs)}

    def make_compiled(x, w13, w2, w, ids):
        c = compiled(on_backend("reference", lambda *a: qk.moe_experts(*a)))
        return lambda: c(x, w13, w2, w, ids)
    out["torch.compile(reference)"] = make_compiled
    try:
        import transformers  # noqa: F401

        for impl in ("eager", "grouped_mm"):
            def hf(x, w13, w2, w, ids, impl=impl):
                m = _transformers_experts(model, w13, w2, impl)
                long_ids = ids.long()
                return lambda: m(x, long_ids, w)
            out[f"transformers {impl}"] = hf
    except ImportError as e:
        out["transformers eager"] = f"not installed ({e.name})"
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts

        out["vllm fused_experts"] = lambda x, w13, w2, w, ids: lambda: fused_experts(x, w13, w2, w, ids)
    except ImportError as e:
        out["vllm fused_experts"] = f"not installed ({e.name})"
    return out


def gemm_inputs(model, tokens, kind, device, fp8: bool = False):
    """The w13 projection's operands: the routed tokens in expert order [T*k, H], w13, offs."""
    x, w13, _, _, ids = layer_inputs(model, tokens, kind, device)
    sorted_pairs, _, offs = ref.moe_sort(ids, model[0])
    xp = ref.moe_permute(x, sorted_pairs, model[1])
    if not fp8:
        return xp, w13, offs
    a, sa = qk.act_quant(xp)
    return (a, sa, *quant_experts(w13), offs)


def quant_experts(w):
    """[E, N, K] weights as DeepSeek-V3 stores them: e4m3 with one float32 scale per 128 x 128 block
    of each expert, (w_fp8 [E, N, K], scale_inv [E, ceil(N/128), ceil(K/128)])."""
    q, s = zip(*(fp8_ref.weight_quant(m) for m in w))
    return torch.stack(q), torch.stack(s)


def gemm_providers(device, fp8: bool = False) -> dict:
    device = torch.device(device)
    op = "fp8_grouped_gemm" if fp8 else "grouped_mm"
    fn = (lambda a, sa, w, sw, offs: qk.fp8_grouped_gemm(a, sa, w, sw, offs)) if fp8 else qk.grouped_mm

    def ours(name):
        run = on_backend(name, fn)
        return unavailable(op, name, device) or (lambda *inputs: functools.partial(run, *inputs))

    refn = (lambda a, sa, w, sw, offs: ref.fp8_grouped_gemm(a, sa, w, sw, offs, torch.bfloat16)) if fp8 \
        else ref.grouped_mm
    out = {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
           "reference": lambda *inputs: functools.partial(refn, *inputs)}
    if not fp8:
        if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
            out["torch._grouped_mm"] = lambda x, w, offs: lambda: torch._grouped_mm(x, w.transpose(1, 2), offs)
        else:
            out["torch._grouped_mm"] = "needs a CUDA device (sm_90+ for bf16)"
    return out


def dispatch_providers(model, device) -> dict:
    device = torch.device(device)
    e, k = model[0], model[1]

    def run(logits, x):
        w, ids = qk.moe_route(logits, k)
        sorted_pairs, pair_rows, offs = qk.moe_sort(ids, e)
        return qk.moe_permute(x, sorted_pairs, k), pair_rows, offs

    def ours(name):
        return unavailable("moe_sort", name, device) or (lambda *inputs: functools.partial(on_backend(name, run),
                                                                                             *inputs))
    return {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
            "reference": lambda *inputs: functools.partial(on_backend("reference", run), *inputs)}


def _dispatch_expected(model):
    def expected(logits, x):
        with qk.use_backend("reference"):
            return dispatch_providers(model, logits.device)["reference"](logits, x)()
    return expected


def layer_cases(device, smoke: bool = False) -> list[Case]:
    out = []
    for name, model in (SMOKE_MODELS if smoke else MODELS).items():
        e, k, h, i = model
        for t in SMOKE_LAYER_TOKENS if smoke else LAYER_TOKENS:
            for kind in ROUTINGS:
                label = f"{name}_T{t}_{kind}"
                extra = dict(model=name, tokens=t, routing=kind, experts=e, top_k=k, hidden=h, inter=i)
                inputs = functools.partial(layer_inputs, model, t, kind, device)
                # bytes: the active experts' weights (what decode is bound by) and the activations
                w_bytes = lambda ids, per=3 * i * h * 2, e=e: _active_bytes(ids, e, per)  # noqa: E731
                _, ids = routing(t, e, k, kind, device)
                layer_flops = 2 * t * k * 3 * i * h
                out.append(Case(
                    op="moe_experts", name=label, shape=f"T{t} E{e} k{k} H{h} I{i} bf16", inputs=inputs,
                    providers=layer_providers(model, device),
                    expected=lambda *a: on_backend("reference", qk.moe_experts)(*a),
                    nbytes=w_bytes(ids) + 2 * t * h * 2 + t * k * (2 * h + 3 * i) * 2, flops=layer_flops,
                    tol=2e-2, graph=t <= 16, matmul_ceiling=(max(t * k, 1), 3 * i, h), extra=extra))
                gemm_flops = 2 * t * k * 2 * i * h
                out.append(Case(
                    op="grouped_mm", name=label, shape=f"[{t * k}, {h}] x [{e}, {2 * i}, {h}] bf16",
                    inputs=functools.partial(gemm_inputs, model, t, kind, device), providers=gemm_providers(device),
                    expected=ref.grouped_mm, nbytes=_active_bytes(ids, e, 2 * i * h * 2) + t * k * (h + 2 * i) * 2,
                    flops=gemm_flops, tol=1e-2, graph=t <= 16, matmul_ceiling=(max(t * k, 1), 2 * i, h), extra=extra))
                out.append(Case(
                    op="fp8_grouped_gemm", name=label, shape=f"[{t * k}, {h}] x [{e}, {2 * i}, {h}] fp8 block",
                    inputs=functools.partial(gemm_inputs, model, t, kind, device, True),
                    providers=gemm_providers(device, fp8=True),
                    expected=lambda a, sa, w, sw, offs: ref.fp8_grouped_gemm(a, sa, w, sw, offs, torch.bfloat16),
                    nbytes=_active_bytes(ids, e, 2 * i * h) + t * k * (h + 2 * 2 * i), flops=gemm_flops, tol=1e-2,
                    graph=t <= 16, matmul_ceiling=(max(t * k, 1), 2 * i, h), extra=extra))
                if kind == "uniform":
                    out.append(Case(
                        op="moe_dispatch", name=f"{name}_T{t}", shape=f"route [{t}, {e}] top-{k} + sort + permute H{h}",
                        inputs=lambda t=t, e=e, h=h: (rand(t, e, dtype=torch.float32, device=device),
                                                      rand(t, h, dtype=torch.bfloat16, device=device)),
                        providers=dispatch_providers(model, device), expected=_dispatch_expected(model),
                        nbytes=t * e * 4 + 2 * t * k * h * 2 + t * k * 16, tol=0.0, graph=t <= 16, extra=extra))
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


def _layer_make(dev, small):
    """float16: the interpreter truncates float32 -> bfloat16 (GPUs round), a bias that adds up over
    the layer's four roundings, beyond bfloat16's tolerance on a CPU."""
    e, k, h, i = (8, 2, 96, 80) if small else (64, 8, 2048, 768)
    t = 37 if small else 512
    x, w13, w2, w, ids = (v.half() if v.is_floating_point() and v.dtype != torch.float32 else v
                          for v in layer_inputs((e, k, h, i), t, "skewed", dev))
    return dict(x=x, w13=w13, w2=w2, w=w, ids=ids, g=torch.randn_like(x))


def _layer_run(x):
    leaves = [x[n].detach().requires_grad_() for n in ("x", "w13", "w2", "w")]
    with torch.enable_grad():
        out = qk.moe_experts(leaves[0], leaves[1], leaves[2], leaves[3], x["ids"])
        grads = torch.autograd.grad(out, leaves, x["g"])
    return (out, *grads[:3], grads[3].half())  # (the router's gradient is a dot of float16 rows)


def _layer_refresh(x):
    x["x"].copy_(torch.randn_like(x["x"]))
    x["w"].copy_(torch.rand_like(x["w"]) + 0.1)


def _fp8_layer_make(dev, small):
    e, k, h, i = (4, 2, 160, 136) if small else (32, 8, 2048, 768)
    t = 9 if small else 256
    x, w13, w2, w, ids = layer_inputs((e, k, h, i), t, "uniform", dev)
    x = x.float()  # activations are quantised to e4m3: float32 in, so kernels and reference quantise the same values
    q13, s13 = quant_experts(w13)
    q2, s2 = quant_experts(w2)
    return dict(x=x, w13=q13, s13=s13, w2=q2, s2=s2, w=w, ids=ids)


def _fp8_layer_run(x):
    return qk.moe_experts(x["x"], x["w13"], x["w2"], x["w"], x["ids"], w13_scale_inv=x["s13"], w2_scale_inv=x["s2"])


def _fp8_layer_refresh(x):
    x["x"].copy_(torch.randn_like(x["x"]))


def _align_make(dev, small):
    t, k, e = (37, 8, 64) if small else (8192, 8, 256)
    return dict(ids=routing(t, e, k, "skewed", dev)[1], e=e)


def _align_run(x):
    return (*qk.moe_align_block_size(x["ids"], 64, x["e"]), *qk.moe_sort(x["ids"], x["e"]))


def _align_refresh(x):
    x["ids"].copy_(x["ids"].flip(0))


CHECKS = {"moe_route (DeepSeek-V3 router, fwd+bwd)": Check("moe_route", _check_make, _check_run, "rel",
                                                           _check_refresh),
          "moe_experts (skewed routing, fwd+bwd)": Check("grouped_mm", _layer_make, _layer_run, "rel",
                                                         _layer_refresh),
          "moe_align_block_size + moe_sort (vLLM layout)": Check("moe_align_block_size", _align_make, _align_run,
                                                                  "exact", _align_refresh),
          "moe_experts FP8 (inference)": Check("fp8_grouped_gemm", _fp8_layer_make, _fp8_layer_run, "rel",
                                               _fp8_layer_refresh)}


def _route_calls(g):
    for dtype in (torch.bfloat16, torch.float32):
        for e, k, sig, groups in ((8, 2, False, None), (256, 8, True, (8, 4)), (60, 6, False, None),
                                  (96, 5, True, (12, 3)), (1000, 32, False, None)):
            logits = torch.randn(3, e, generator=g).to(dtype)
            bias = torch.randn(e, generator=g) if sig else None
            qk.moe_route(logits, k, scoring="sigmoid" if sig else "softmax", correction_bias=bias,
                         n_group=groups[0] if groups else None, topk_group=groups[1] if groups else None)
            qk.moe_route(logits, k, renormalize=False)


def _gemm_calls(g):
    """Every tile configuration grouped_mm and its weight gradient choose (rows per expert 1 to 200)
    in every dtype, with transposed weights (the backward's dx)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for s, e in ((4, 4), (30, 1), (60, 1), (200, 1)):
            x = torch.randn(s, 40, generator=g).to(dtype)
            w = torch.randn(e, 24, 40, generator=g).to(dtype)
            offs = torch.linspace(s / e, s, e).round().int()
            qk.grouped_mm(x, w, offs)
            qk.grouped_mm(torch.randn(s, 24, generator=g).to(dtype), w.transpose(1, 2), offs)
            torch.ops.quickllm.grouped_mm_wgrad(torch.randn(s, 24, generator=g).to(dtype), x, offs, e)


def _fp8_gemm_calls(g):
    for s, e in ((4, 4), (60, 1), (200, 1)):
        a, sa = qk.act_quant(torch.randn(s, 256, generator=g))
        w = torch.randn(e, 160, 256, generator=g).to(torch.float8_e4m3fn)
        offs = torch.linspace(s / e, s, e).round().int()
        qk.fp8_grouped_gemm(a, sa, w, torch.rand(e, 2, 2, generator=g), offs)


def _dispatch_calls(g):
    for t, k, e in ((5, 2, 8), (300, 8, 256), (7, 1, 1000)):
        ids = torch.randint(0, e, (t, k), generator=g).int()
        w = torch.rand(t, k, generator=g)
        qk.moe_sort(ids, e)
        sorted_pairs, pair_rows, _ = ref.moe_sort(ids, e)  # (the compile test records launches, runs none)
        for bs in (16, 64):
            qk.moe_align_block_size(ids, bs, e)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(t, 72, generator=g).to(dtype)
            qk.moe_permute(x, sorted_pairs, k)
            qk.moe_combine(ref.moe_permute(x, sorted_pairs, k), w, pair_rows)
            h = torch.randn(t, 2 * 1500, generator=g).to(dtype)
            torch.ops.quickllm.silu_mul_backward(qk.silu_mul(h), h)


TRITON_EXAMPLES = {"moe_route": _route_calls, "grouped_mm": _gemm_calls, "grouped_mm_wgrad": _gemm_calls,
                   "fp8_grouped_gemm": _fp8_gemm_calls, "moe_sort": _dispatch_calls,
                   "moe_align_block_size": _dispatch_calls, "moe_permute": _dispatch_calls,
                   "moe_combine": _dispatch_calls, "silu_mul": _dispatch_calls, "silu_mul_backward": _dispatch_calls}
