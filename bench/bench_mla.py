"""MLA decode benchmarks at DeepSeek-V3's shapes: absorbed queries of D = 576 (kv_lora_rank 512 +
rope 64) over a paged latent cache (page 64), H = 128 heads (and 16: one GPU of a TP-8 group), Sq 1
and 2 (speculative decode), batch 1/32/128, context 1k/4k/16k, and a batch of varying lengths.
Bytes: the cache rows read once, q read and out written; FLOPs: the score and value products.
Beside quickllm's kernels: the reference, torch.compile(reference) and FlashMLA when installed.

    python bench/run.py --op mla
"""
from __future__ import annotations

import functools

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, on_backend, rand, unavailable
from quickllm_kernels.mla import reference as ref

D, DV, PAGE = 576, 512, 64
SCALE = 192 ** -0.5
HEADS = (128, 16)
Q_LENS = (1, 2)
BATCHES = (1, 32, 128)
CONTEXTS = (1024, 4096, 16384)
SMOKE = dict(heads=(4,), q_lens=(2,), batches=(2,), contexts=(40,), d=80, dv=64, page=16)


def make_inputs(b, sq, h, lens, d, dv, page, device):
    """q, a shuffled paged cache holding every sequence, its block table and lengths."""
    g = torch.Generator(device="cpu").manual_seed(b * 7 + sq)
    max_blocks = -(-max(lens) // page)
    nb = b * max_blocks
    cache = rand(nb, page, d, dtype=torch.bfloat16, device=device)
    table = torch.randperm(nb, generator=g).view(b, max_blocks).int().to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = rand(b, sq, h, d, dtype=torch.bfloat16, device=device)
    return q, cache, table, seqlens


def providers(dv, device) -> dict:
    device = torch.device(device)

    def ours(name):
        run = on_backend(name, lambda q, c, t, s: qk.mla_decode(q, c, t, s, softmax_scale=SCALE, head_dim_v=dv))
        return unavailable("mla_decode", name, device) or (lambda *inputs: functools.partial(run, *inputs))

    out = {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
           "reference": lambda q, c, t, s: lambda: ref.mla_decode(q, c, t, s, SCALE, dv, True)}

    def make_compiled(q, c, t, s):
        fn = compiled(lambda q, c, t, s: ref.mla_decode(q, c, t, s, SCALE, dv, True))
        return lambda: fn(q, c, t, s)
    out["torch.compile(reference)"] = make_compiled
    try:
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata

        def flashmla(q, c, t, s):
            meta, splits = get_mla_metadata(s, q.shape[1] * q.shape[2], 1)
            return lambda: flash_mla_with_kvcache(q, c.unsqueeze(2), t, s, dv, meta, splits, softmax_scale=SCALE,
                                                  causal=True)
        out["FlashMLA"] = flashmla
    except ImportError as e:
        out["FlashMLA"] = f"not installed ({e.name})"
    return out


def cases(device, smoke: bool = False) -> list[Case]:
    cfg = SMOKE if smoke else dict(heads=HEADS, q_lens=Q_LENS, batches=BATCHES, contexts=CONTEXTS, d=D, dv=DV,
                                   page=PAGE)
    d, dv, page = cfg["d"], cfg["dv"], cfg["page"]
    shapes = [(b, sq, h, [ctx] * b, f"ctx{ctx}") for h in cfg["heads"] for sq in cfg["q_lens"]
              for b in cfg["batches"] for ctx in cfg["contexts"]]
    for h in cfg["heads"]:  # one batch of varying lengths (a serving step)
        b = cfg["batches"][-1]
        lens = [max(1, (cfg["contexts"][-1] * (i * 37 % b + 1)) // b) for i in range(b)]
        shapes.append((b, 1, h, lens, "varying"))
    out = []
    for b, sq, h, lens, label in shapes:
        tokens = sum(lens)
        out.append(Case(
            op="mla_decode", name=f"H{h}_Sq{sq}_B{b}_{label}", shape=f"q [{b}, {sq}, {h}, {d}] cache {tokens} x {d} bf16",
            inputs=functools.partial(make_inputs, b, sq, h, lens, d, dv, page, device), providers=providers(dv, device),
            expected=lambda q, c, t, s: ref.mla_decode(q, c, t, s, SCALE, dv, True),
            nbytes=tokens * d * 2 + b * sq * h * (d + dv) * 2, flops=2 * sq * h * tokens * (d + dv), tol=2e-2,
            graph=True, matmul_ceiling=(max(sq * h, 16) * b, max(tokens // b, 16), d + dv),
            extra=dict(batch=b, q_len=sq, heads=h, context=label, tokens=tokens)))
    return out


# ------------------------------------------------------------------------------------------------
# The GPU check's smoke cases (bench/smoke.py) and the Triton compile test's calls
# ------------------------------------------------------------------------------------------------


def _check_make(dev, small):
    b, sq, h, ctx = (3, 2, 8, 150) if small else (32, 1, 128, 4096)
    d, dv, page = (80, 64, 16) if small else (D, DV, PAGE)
    lens = [max(1, ctx * (i + 1) // b) for i in range(b)]
    q, cache, table, seqlens = make_inputs(b, sq, h, lens, d, dv, page, dev)
    return dict(q=q.half(), cache=cache.half(), table=table, seqlens=seqlens, dv=dv)


def _check_run(x):
    return qk.mla_decode(x["q"], x["cache"], x["table"], x["seqlens"], softmax_scale=0.1, head_dim_v=x["dv"])


def _check_refresh(x):
    x["q"].copy_(torch.randn_like(x["q"]))
    x["cache"].copy_(torch.randn_like(x["cache"]))


def _write_make(dev, small):
    t, nb, page = (37, 8, 16) if small else (4096, 256, 64)
    return dict(cache=torch.zeros(nb, page, 1, 80, dtype=torch.float16, device=dev),
                slots=torch.randperm(nb * page, device=dev)[:t], kv_c=torch.randn(t, 64, device=dev).half(),
                k_pe=torch.randn(t, 16, device=dev).half())


def _write_run(x):
    cache = x["cache"].clone()
    qk.mla_cache_write(cache, x["slots"], x["kv_c"], x["k_pe"])
    return (cache,)


def _write_refresh(x):
    x["kv_c"].copy_(torch.randn_like(x["kv_c"]))


CHECKS = {"mla_decode (paged, Sq 2, varying lengths)": Check("mla_decode", _check_make, _check_run, "rel",
                                                             _check_refresh),
          "mla_cache_write": Check("mla_cache_write", _write_make, _write_run, "exact", _write_refresh)}


def _decode_calls(g):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for b, sq, h, d, dv in ((2, 1, 16, 576, 512), (1, 2, 128, 576, 512), (3, 1, 20, 40, 32), (2, 1, 8, 48, 48)):
            cache = torch.randn(6, 16, d, generator=g).to(dtype)
            table = torch.randint(0, 6, (b, 3), generator=g).int()
            seqlens = torch.randint(0, 48, (b,), generator=g).int()
            q = torch.randn(b, sq, h, d, generator=g).to(dtype)
            qk.mla_decode(q, cache, table, seqlens, softmax_scale=0.1, head_dim_v=dv)


def _write_calls(g):
    for dtype in (torch.bfloat16, torch.float32):
        cache = torch.zeros(4, 16, 576, dtype=dtype)
        qk.mla_cache_write(cache, torch.tensor([3, -1, 60]), torch.randn(3, 512, generator=g).to(dtype),
                           torch.randn(3, 64, generator=g).to(dtype))


TRITON_EXAMPLES = {"mla_decode": _decode_calls, "mla_cache_write": _write_calls}
