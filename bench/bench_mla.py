"""MLA decode benchmarks at DeepSeek-V3's shapes: absorbed queries of D = 576 (kv_lora_rank 512 +
rope 64) over a paged latent cache (page 64), H = 128 heads (and 16: one GPU of a TP-8 group), Sq 1
and 2 (speculative decode), batch 1/32/128, context 1k/4k/16k, and a batch of varying lengths.
Bytes: the cache rows read once, q read and out written; FLOPs: the score and value products.
Beside quickllm's kernels: the reference, torch.compile(reference), and FlashMLA and FlashInfer's
MLA decode when installed. The `attn_*` cases time the whole attention from the projected query to
the per-head values both ways: absorbed (W_UK folded into the query, mla_decode over the latent
cache, W_UV after) and expanded (kv_b_proj applied to every cached latent row, SDPA over the keys and
values that makes per head), the path a prefill takes and the one the absorbed decode replaces.

    python bench/run.py --op mla
"""
from __future__ import annotations

import functools
import math

import torch

import quickllm_kernels as qk
from common import BASELINES, Case, Check, compiled, on_backend, rand, unavailable
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
    try:
        import flashinfer.mla
        out["FlashInfer"] = functools.partial(_flashinfer, flashinfer.mla, dv)
    except ImportError as e:
        out["FlashInfer"] = f"not installed ({e.name})"
    return out


def _flashinfer(mla, dv, q, c, t, s):
    """FlashInfer's BatchMLAPagedAttentionWrapper on the same pages: its own layout (the latent and
    rope parts of the cache as two tensors, the pages of each sequence listed in kv_indices), planned
    once outside the timing (plan reads the lengths on the host, as a serving step's planner does)."""
    b, sq, h, d = q.shape
    page = c.shape[1]
    ckv, kpe = c[..., :dv].contiguous(), c[..., dv:].contiguous()
    pages = (s.long() + page - 1) // page
    kv_indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)]).int()
    kv_indices = torch.cat([t[i, :int(pages[i])] for i in range(b)]).int()
    qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
    wrapper = mla.BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=q.device))
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, s, h, dv, d - dv, page, True, SCALE, q.dtype, c.dtype)
    q_nope, q_pe = q.reshape(b * sq, h, d)[..., :dv].contiguous(), q.reshape(b * sq, h, d)[..., dv:].contiguous()

    def run():
        o, lse = wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=True)
        # lse in base 2 (FlashInfer's convention) -> natural log, [B, H, Sq] as mla_decode's
        return o.view(b, sq, h, dv), (lse.float() * math.log(2.0)).view(b, sq, h).transpose(1, 2)
    return run


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
            baselines=dict(BASELINES, vs_flashinfer="FlashInfer", vs_flashmla="FlashMLA"),
            extra=dict(batch=b, q_len=sq, heads=h, context=label, tokens=tokens)))
    return out + attention_cases(device, smoke)


# ------------------------------------------------------------------------------------------------
# Attention from the projected query to the per-head values: absorbed (W_UK into the query,
# mla_decode over the latent cache, W_UV after) against expanded (kv_b_proj applied to every cached
# latent row, keys and values per head, SDPA), the two ways of computing the same function
# ------------------------------------------------------------------------------------------------

NOPE, ROPE_DIMS, V_HEAD = 128, 64, 128
ATTN = dict(heads=(128, 16), batches=(1, 32), contexts=(1024, 4096))
ATTN_SMOKE = dict(heads=(4,), batches=(2,), contexts=(40,))


def make_attention_inputs(b, h, ctx, r, dr, nope, vd, page, device):
    """q_nope [B, 1, H, nope], q_pe [B, 1, H, dr], the latent cache (and its table and lengths) and
    kv_b_proj.weight [H * (nope + vd), r]."""
    q, cache, table, seqlens = make_inputs(b, 1, h, [ctx] * b, r + dr, r, page, device)
    kv_b = rand(h * (nope + vd), r, dtype=torch.bfloat16, device=device, scale=r ** -0.5)
    q_nope = rand(b, 1, h, nope, dtype=torch.bfloat16, device=device)
    w_uk, w_uv = qk.mla_absorb(kv_b, h, nope, vd)  # once per layer in a model, so not timed
    return q_nope, q[..., r:].contiguous(), cache, table, seqlens, kv_b, w_uk, w_uv


def _absorbed(q_nope, q_pe, cache, table, seqlens, kv_b, w_uk, w_uv, *, decode):
    q = torch.cat([torch.einsum("bshd,hdr->bshr", q_nope, w_uk), q_pe], -1)
    out, _ = decode(q, cache, table, seqlens, w_uk.shape[-1])
    return torch.einsum("bshr,hrv->bshv", out, w_uv)


def _expanded(q_nope, q_pe, cache, table, seqlens, kv_b, w_uk, w_uv, *, n):
    """The non-absorbed path: gather each sequence's latent rows, expand them to keys and values per
    head with kv_b_proj, SDPA (every sequence of the batch holds n tokens here)."""
    b, _, h, nope = q_nope.shape
    dr = q_pe.shape[-1]
    r = cache.shape[-1] - dr
    rows = cache[table.long()].flatten(1, 2)[:, :n]  # [B, n, r + dr]
    kv = (rows[..., :r] @ kv_b.t()).view(b, n, h, -1)  # [B, n, H, nope + v]
    k = torch.cat([kv[..., :nope], rows[:, :, None, r:].expand(b, n, h, dr)], -1)
    q = torch.cat([q_nope, q_pe], -1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           kv[..., nope:].transpose(1, 2), scale=SCALE)
    return out.transpose(1, 2)  # [B, 1, H, v]


def _expanded_make(n, *inputs):
    return functools.partial(_expanded, *inputs, n=n)


def attention_cases(device, smoke: bool = False) -> list[Case]:
    cfg = ATTN_SMOKE if smoke else ATTN
    r, dr, nope, vd, page = (64, 16, 32, 32, 16) if smoke else (DV, D - DV, NOPE, V_HEAD, PAGE)
    ref_decode = lambda q, c, t, s, dv: ref.mla_decode(q, c, t, s, SCALE, dv, True)  # noqa: E731

    def ours(name):
        def decode(q, c, t, s, dv):
            return qk.mla_decode(q, c, t, s, softmax_scale=SCALE, head_dim_v=dv)
        run = on_backend(name, functools.partial(_absorbed, decode=decode))
        return unavailable("mla_decode", name, device) or (lambda *inputs: functools.partial(run, *inputs))

    out = []
    for h in cfg["heads"]:
        for b in cfg["batches"]:
            for ctx in cfg["contexts"]:
                providers = {"quickllm-cuda absorbed": ours("cuda"), "quickllm-triton absorbed": ours("triton"),
                             "expanded (kv_b_proj + SDPA)": functools.partial(_expanded_make, ctx),
                             "reference": lambda *x: functools.partial(_absorbed, *x, decode=ref_decode)}
                out.append(Case(
                    op="mla_attention", name=f"attn_H{h}_B{b}_ctx{ctx}",
                    shape=f"q [{b}, 1, {h}, {nope}+{dr}] latent {b * ctx} x {r + dr}, kv_b [{h * (nope + vd)}, {r}]",
                    inputs=functools.partial(make_attention_inputs, b, h, ctx, r, dr, nope, vd, page, device),
                    providers=providers,
                    expected=lambda *x: _absorbed(*x, decode=ref_decode),
                    nbytes=b * ctx * (r + dr) * 2 + h * (nope + vd) * r * 2, tol=2e-2, graph=True,
                    baselines=dict(BASELINES, vs_expanded="expanded (kv_b_proj + SDPA)"),
                    extra=dict(batch=b, heads=h, context=ctx)))
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
