"""RoPE benchmark: quickllm's CUDA and Triton kernels vs the reference, torch.compile(reference) and
installed peers (flash-attn's and Liger's rotary), on real model shapes.

Bytes moved per call: q and k read once and written once (plus the positions); the cos/sin rows are
not counted (a few KB, served from L2). GB/s is over the median time of one call.

    python bench/run.py --op rope            # markdown table + JSON (GPU events)
    pytest bench/bench_rope.py               # the same cases under pytest-benchmark (synchronised)
"""
from __future__ import annotations

import pytest
import torch

import quickllm_kernels as qk
from quickllm_kernels.reference import rope as ref

# name: (tokens, hq, hk, q head stride layout, head_dim, rotary_dim, style, inplace)
CASES = {
    # Qwen2-7B prefill: q [T, 28, 128] and k [T, 4, 128] as views of the fused qkv projection.
    "qwen2_7b_16k": dict(tokens=16384, hq=28, hk=4, head_dim=128, rotary_dim=128, style="neox", inplace=False),
    "qwen2_7b_16k_inplace": dict(tokens=16384, hq=28, hk=4, head_dim=128, rotary_dim=128, style="neox",
                                 inplace=True),
    # Qwen2-7B decode step of 64 sequences: launch-latency bound.
    "qwen2_7b_decode64": dict(tokens=64, hq=28, hk=4, head_dim=128, rotary_dim=128, style="neox", inplace=False),
    # DeepSeek-V3 MLA rope part: q_pe = last 64 of 192 dims of 128 heads, k_pe = 64 dims of the
    # 576-wide latent projection (one head shared by all), interleaved pairs.
    "deepseek_v3_mla_16k": dict(tokens=16384, hq=128, hk=1, head_dim=64, rotary_dim=64, style="gptj",
                                inplace=False, mla=True),
}
SMOKE_CASES = {"smoke": dict(tokens=64, hq=4, hk=2, head_dim=32, rotary_dim=32, style="neox", inplace=False)}


def make_inputs(case: dict, device, dtype=torch.bfloat16):
    t, hq, hk, d = case["tokens"], case["hq"], case["hk"], case["head_dim"]
    g = torch.Generator().manual_seed(0)
    if case.get("mla"):
        q_full = torch.randn(t, hq, 128 + d, generator=g).to(device=device, dtype=dtype)
        kv = torch.randn(t, 512 + d, generator=g).to(device=device, dtype=dtype)
        q, k = q_full[..., 128:], kv[:, 512:].view(t, 1, d)
    else:
        qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(device=device, dtype=dtype)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    max_pos = 32768
    positions = torch.randint(0, max_pos, (t,), generator=g).to(device)
    cache = qk.rope_cache(case["rotary_dim"], max_pos, base=1e6, device=device)
    return q, k, positions, cache


def bytes_moved(q, k, positions) -> int:
    return 2 * (q.numel() * q.element_size() + k.numel() * k.element_size()) + positions.numel() * positions.element_size()


def providers(case: dict, device) -> dict:
    """name -> (callable factory taking the inputs, or a string saying why it is unavailable)."""
    style, inplace = case["style"], case["inplace"]
    is_neox = style == "neox"
    out = {}

    def ours(name):
        why = qk.backend.unavailable_reason(name, "apply_rope", torch.device(device))
        if why:
            return why

        def make(q, k, pos, cache):
            def run():
                with qk.use_backend(name):
                    return qk.apply_rope(q, k, pos, cache, style=style, inplace=inplace)
            return run
        return make

    out["quickllm-cuda"] = ours("cuda")
    out["quickllm-triton"] = ours("triton")
    if not inplace and qk._library.has_cuda_kernel("apply_rope") and torch.device(device).type == "cuda":
        # The compiled kernel alone, without the Python op layer: shows the host overhead.
        out["quickllm-cuda (kernel only)"] = lambda q, k, pos, cache: (
            lambda: torch.ops.quickllm._cuda_apply_rope(q, k, pos, cache, is_neox, False))

    if inplace:
        out["reference"] = lambda q, k, pos, cache: (lambda: ref.apply_rope_(q, k, pos, cache, is_neox, False))
    else:
        out["reference"] = lambda q, k, pos, cache: (lambda: ref.apply_rope(q, k, pos, cache, is_neox, False))

    def compiled(q, k, pos, cache):
        fn = torch.compile(ref.apply_rope_ if inplace else ref.apply_rope, dynamic=False)
        return lambda: fn(q, k, pos, cache, is_neox, False)
    out["torch.compile(reference)"] = compiled

    try:  # flash-attn: per-sequence offsets only, so positions are 0..T-1 here; q and k in two calls
        from flash_attn.layers.rotary import apply_rotary_emb

        def fa(q, k, pos, cache):
            half = cache.shape[1] // 2
            cos, sin = cache[: q.shape[0], :half].to(q.dtype), cache[: q.shape[0], half:].to(q.dtype)
            return lambda: (apply_rotary_emb(q[None], cos, sin, interleaved=not is_neox, inplace=inplace),
                            apply_rotary_emb(k[None], cos, sin, interleaved=not is_neox, inplace=inplace))
        out["flash-attn rotary"] = fa
    except ImportError as e:
        out["flash-attn rotary"] = f"not installed ({e.name})"

    try:  # Liger: halves only, q/k as [B, H, S, D] and cos/sin [1, S, D]
        from liger_kernel.ops.rope import LigerRopeFunction
        if not is_neox:
            out["liger rope"] = "rotates halves only"
        else:
            def lg(q, k, pos, cache):
                half = cache.shape[1] // 2
                rows = cache[pos]
                cos = torch.cat((rows[:, :half],) * 2, -1)[None].to(q.dtype)
                sin = torch.cat((rows[:, half:],) * 2, -1)[None].to(q.dtype)
                qt, kt = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
                return lambda: LigerRopeFunction.apply(qt, kt, cos, sin)
            out["liger rope"] = lg
    except ImportError as e:
        out["liger rope"] = f"not installed ({e.name})"
    return out


def run(device, *, smoke=False, time_ms, ceiling_gbs):
    """Rows of results for every case and provider that can run on `device`."""
    rows = []
    for name, case in (SMOKE_CASES if smoke else CASES).items():
        inputs = make_inputs(case, device)
        nbytes = bytes_moved(*inputs[:3])
        timings = {}
        for prov, factory in providers(case, device).items():
            if isinstance(factory, str):
                rows.append(dict(op="apply_rope", case=name, provider=prov, skipped=factory))
                continue
            if smoke and prov == "torch.compile(reference)":
                rows.append(dict(op="apply_rope", case=name, provider=prov, skipped="not in smoke runs"))
                continue
            args = [t.clone() if case["inplace"] and i < 2 else t for i, t in enumerate(inputs)]
            fn = factory(*args)
            ms = time_ms(fn)
            timings[prov] = ms
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(op="apply_rope", case=name, provider=prov, tokens=case["tokens"],
                             shape=f"q[{case['tokens']},{case['hq']},{case['head_dim']}] k[{case['hk']}] "
                                   f"{case['style']}{' inplace' if case['inplace'] else ''}",
                             dtype="bfloat16", median_ms=ms, bytes=nbytes, gbs=gbs,
                             pct_of_copy=100 * gbs / ceiling_gbs))
        for r in rows:
            if r.get("case") == name and "median_ms" in r:
                for base, key in (("reference", "vs_reference"), ("torch.compile(reference)", "vs_compiled")):
                    if base in timings:
                        r[key] = timings[base] / r["median_ms"]
    return rows


# ---- pytest-benchmark entry (wall clock, so every timed call synchronises) ----------------------

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", list(CASES) if _DEVICE == "cuda" else list(SMOKE_CASES))
@pytest.mark.parametrize("provider", ["quickllm-cuda", "quickllm-triton", "reference", "torch.compile(reference)"])
def test_rope(benchmark, case, provider):
    spec = {**CASES, **SMOKE_CASES}[case]
    factory = providers(spec, _DEVICE)[provider]
    if isinstance(factory, str):
        pytest.skip(factory)
    fn = factory(*make_inputs(spec, _DEVICE))
    sync = torch.cuda.synchronize if _DEVICE == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, warmup_rounds=5, rounds=50)
