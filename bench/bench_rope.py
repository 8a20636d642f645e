"""RoPE benchmark: quickllm's CUDA and Triton kernels vs the reference, torch.compile(reference) and
installed peers (flash-attn's and Liger's rotary), on real model shapes, bf16.

Bytes per call: q and k read once and written once, plus the int64 positions; the cos/sin rows are
not counted (a few KB, served from L2). The peers take cos/sin rows already gathered per token
(gathered outside the timed call) and rotate q and k in two calls (flash-attn) or one (Liger).

    python bench/run.py --op rope
    python -m pytest bench -k apply_rope          # pytest-benchmark (bench/test_bench.py)
"""
from __future__ import annotations

import functools

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, on_backend, rand, unavailable
from quickllm_kernels.rope import reference as ref

CASES = {
    # Qwen2-7B prefill: q [T, 28, 128] and k [T, 4, 128] as views of the fused qkv projection.
    "qwen2_7b_16k": dict(tokens=16384, hq=28, hk=4, head_dim=128, rotary_dim=128, style="neox", inplace=False),
    "qwen2_7b_16k_inplace": dict(tokens=16384, hq=28, hk=4, head_dim=128, rotary_dim=128, style="neox",
                                 inplace=True),
    # Qwen2-7B decode step of 64 sequences: launch-latency bound (CUDA-graph timing too).
    "qwen2_7b_decode64": dict(tokens=64, hq=28, hk=4, head_dim=128, rotary_dim=128, style="neox", inplace=False),
    # DeepSeek-V3 MLA rope part: q_pe = last 64 of 192 dims of 128 heads, k_pe = 64 dims of the
    # 576-wide latent projection (one head shared by all), interleaved pairs.
    "deepseek_v3_mla_16k": dict(tokens=16384, hq=128, hk=1, head_dim=64, rotary_dim=64, style="gptj",
                                inplace=False, mla=True),
}
SMOKE_CASES = {"smoke": dict(tokens=64, hq=4, hk=2, head_dim=32, rotary_dim=32, style="neox", inplace=False)}
MAX_POS = 32768


def make_inputs(spec: dict, device, dtype=torch.bfloat16):
    """(q, k, positions, cos_sin_cache): q and k as strided views of one projection, random positions."""
    t, hq, hk, d = spec["tokens"], spec["hq"], spec["hk"], spec["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    if spec.get("mla"):
        q_full = torch.randn(t, hq, 128 + d, generator=g, device=device, dtype=dtype)
        kv = torch.randn(t, 512 + d, generator=g, device=device, dtype=dtype)
        q, k = q_full[..., 128:], kv[:, 512:].view(t, 1, d)
    else:
        qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g, device=device, dtype=dtype)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    positions = torch.randint(0, MAX_POS, (t,), generator=g, device=device)
    cache = qk.rope_cache(spec["rotary_dim"], MAX_POS, base=1e6, device=device)
    return q, k, positions, cache


def providers(spec: dict, device) -> dict:
    """name -> make(q, k, positions, cache) -> fn() returning (q_rot, k_rot), or why it cannot run."""
    is_neox, inplace = spec["style"] == "neox", spec["inplace"]
    device = torch.device(device)
    out = {}

    def ours(name):
        run = on_backend(name, lambda q, k, pos, cache: qk.apply_rope(q, k, pos, cache, style=spec["style"],
                                                                      inplace=inplace))
        return unavailable("apply_rope", name, device) or (lambda *inputs: functools.partial(run, *inputs))

    out["quickllm-cuda"] = ours("cuda")
    out["quickllm-triton"] = ours("triton")
    if not inplace and qk._library.has_cuda_kernel("apply_rope") and device.type == "cuda":
        # The compiled kernel alone, without the Python op layer: shows the host overhead.
        out["quickllm-cuda (kernel only)"] = lambda q, k, pos, cache: (
            lambda: torch.ops.quickllm._cuda_apply_rope(q, k, pos, cache, is_neox, False))
    fn = functools.partial(_ref_inplace if inplace else _ref, is_neox=is_neox)
    out["reference"] = lambda q, k, pos, cache: lambda: fn(q, k, pos, cache)

    def make_compiled(q, k, pos, cache):
        c = compiled(lambda q, k, pos, cache: (_ref_inplace if inplace else _ref)(q, k, pos, cache, is_neox))
        return lambda: c(q, k, pos, cache)
    out["torch.compile(reference)"] = make_compiled

    try:
        from flash_attn.layers.rotary import apply_rotary_emb

        def fa(q, k, pos, cache):
            cos, sin = _gathered(cache, pos, q.dtype)  # [T, R/2]: row t is position pos[t]
            return lambda: (apply_rotary_emb(q[None], cos, sin, interleaved=not is_neox, inplace=inplace)[0],
                            apply_rotary_emb(k[None], cos, sin, interleaved=not is_neox, inplace=inplace)[0])
        out["flash-attn rotary"] = fa
    except ImportError as e:
        out["flash-attn rotary"] = f"not installed ({e.name})"

    try:  # Liger: halves only, q/k as [B, H, S, D] and cos/sin [1, S, D]
        from liger_kernel.ops.rope import LigerRopeFunction
        if not is_neox:
            out["liger rope"] = "rotates halves only"
        else:
            def lg(q, k, pos, cache):
                cos, sin = _gathered(cache, pos, q.dtype)
                cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
                qt, kt = q.transpose(0, 1)[None], k.transpose(0, 1)[None]

                def run():
                    qo, ko = LigerRopeFunction.apply(qt, kt, cos, sin)
                    return qo[0].transpose(0, 1), ko[0].transpose(0, 1)
                return run
            out["liger rope"] = lg
    except ImportError as e:
        out["liger rope"] = f"not installed ({e.name})"
    return out


def _gathered(cache, pos, dtype):
    half = cache.shape[1] // 2
    rows = cache[pos]
    return rows[:, :half].to(dtype).contiguous(), rows[:, half:].to(dtype).contiguous()


def _ref(q, k, pos, cache, is_neox):
    return ref.apply_rope(q, k, pos, cache, is_neox, False)


def _ref_inplace(q, k, pos, cache, is_neox):
    ref.apply_rope_(q, k, pos, cache, is_neox, False)
    return q, k


def cases(device, smoke: bool = False) -> list[Case]:
    out = []
    for name, spec in (SMOKE_CASES if smoke else CASES).items():
        t, hq, hk, d = spec["tokens"], spec["hq"], spec["hk"], spec["head_dim"]
        is_neox = spec["style"] == "neox"
        out.append(Case(
            op="apply_rope", name=name,
            shape=f"q[{t},{hq},{d}] k[{t},{hk},{d}] bf16 {spec['style']}{' inplace' if spec['inplace'] else ''}",
            inputs=functools.partial(make_inputs, spec, device), providers=providers(spec, device),
            expected=lambda q, k, pos, cache, is_neox=is_neox: _ref(q, k, pos, cache, is_neox),
            nbytes=2 * 2 * t * (hq + hk) * d + 8 * t, tol=1e-2, mutates=spec["inplace"], graph=t <= 64,
            extra=dict(tokens=t)))
    return out


# ------------------------------------------------------------------------------------------------
# The GPU check's smoke cases (bench/smoke.py) and the Triton compile test's calls
# ------------------------------------------------------------------------------------------------


def _check_make(dev, small):
    t, hq, hk, d = (37, 4, 2, 128) if small else (1000, 28, 4, 128)
    qkv = rand(t, (hq + 2 * hk) * d, dtype=torch.bfloat16, device=dev)
    return dict(qkv=qkv, q=qkv[:, : hq * d].view(t, hq, d), k=qkv[:, hq * d: (hq + hk) * d].view(t, hk, d),
                pos=torch.randint(0, 4096, (t,), device=dev), cache=qk.rope_cache(d, 4096, base=1e6, device=dev))


def _check_inplace(x):
    q, k = x["q"].clone(), x["k"].clone()
    qk.apply_rope(q, k, x["pos"], x["cache"], inplace=True)
    return q, k


def _check_refresh(x):
    x["qkv"].copy_(torch.randn_like(x["qkv"], dtype=torch.float32))
    x["pos"].random_(0, 4096)


CHECKS = {
    "apply_rope": Check("apply_rope", _check_make, lambda x: qk.apply_rope(x["q"], x["k"], x["pos"], x["cache"]),
                        "rel", _check_refresh),
    "apply_rope_ (in place)": Check("apply_rope_", _check_make, _check_inplace, "rel", _check_refresh),
}


def _rope_calls(g):
    for dtype in (torch.bfloat16, torch.float32):
        for d, r, style in ((128, 128, "neox"), (64, 64, "gptj"), (192, 64, "gptj"), (80, 40, "neox")):
            cache = qk.rope_cache(r, 16)
            q = torch.randn(3, 4, d, generator=g).to(dtype).requires_grad_()
            k = torch.randn(3, 2, d, generator=g).to(dtype).requires_grad_()
            pos = torch.tensor([0, 5, 15])
            qo, ko = qk.apply_rope(q, k, pos, cache, style=style)
            (qo.float().sum() + ko.float().sum()).backward()
            qk.apply_rope(q.detach().clone(), k.detach().clone(), pos, cache, style=style, inplace=True)


TRITON_EXAMPLES = {"apply_rope": _rope_calls, "apply_rope_": _rope_calls}
