"""FP8 benchmarks (DeepSeek-V3 shapes).

weight_dequant: fp8 [M, N] + 128x128 scales -> bf16; bytes = M N (read) + 2 M N (write).
act_quant: bf16 [T, K] -> fp8 + one float32 scale per 128; bytes = 2 T K + T K + 4 T K / 128.
Both against the copy ceiling, the reference and torch.compile(reference).
fp8_block_gemm: C[M, N] = A B^T, bf16 out, TFLOP/s against torch._scaled_mm with row-wise scales
(the closest peer torch ships: one scale per row of A and of B, not per 128-block) and against bf16
cuBLAS on the same shapes; at decode M (<= 64) also GB/s of the weight read against the copy ceiling.
"""
from __future__ import annotations

import math

import torch

import quickllm_kernels as qk
from quickllm_kernels.ops import fp8 as fp8_ops
from quickllm_kernels.reference import fp8 as ref

DEQUANT_CASES = {"w1_gate_up [18432, 7168]": (18432, 7168), "w2_down [7168, 18432]": (7168, 18432),
                 "kv_a_proj [576, 7168]": (576, 7168)}
ACT_CASES = {"hidden 4096 tokens [4096, 7168]": (4096, 7168), "mlp 4096 tokens [4096, 18432]": (4096, 18432)}
GEMM_NK = {"q_b_proj": (24576, 1536), "o_proj": (7168, 16384), "dense_up": (18432, 7168),
           "dense_down": (7168, 18432), "expert_up": (2048, 7168)}
GEMM_M = (1, 16, 64, 256, 1024, 4096, 16384)
SMOKE_DEQUANT = {"smoke": (200, 300)}
SMOKE_ACT = {"smoke": (64, 300)}
SMOKE_GEMM_NK = {"smoke": (130, 256)}
SMOKE_GEMM_M = (1, 33)


def _ours(op, name, device):
    why = qk.backend.unavailable_reason(name, op, torch.device(device))
    if why:
        return why

    def wrap(fn):
        def call(*a):
            with qk.use_backend(name):
                return fn(*a)
        return call
    return wrap


def _providers(op, device, fn, reference, smoke):
    out = {}
    for name in ("cuda", "triton"):
        w = _ours(op, name, device)
        out[f"quickllm-{name}"] = w if isinstance(w, str) else w(fn)
    out["reference"] = reference
    out["torch.compile(reference)"] = "not in smoke runs" if smoke else torch.compile(reference, dynamic=False)
    return out


def _time_rows(rows, op, case, shape, provs, args, nbytes, time_ms, ceiling_gbs, flops=None):
    times = {}
    for prov, fn in provs.items():
        if isinstance(fn, str):
            rows.append(dict(op=op, case=case, provider=prov, skipped=fn))
            continue
        try:
            ms = time_ms(lambda: fn(*args))
        except Exception as e:  # a peer that rejects the shape is a row, not a crash
            rows.append(dict(op=op, case=case, provider=prov, skipped=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        times[prov] = ms
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = dict(op=op, case=case, provider=prov, shape=shape, median_ms=ms, bytes=nbytes, gbs=gbs,
                   pct_of_copy=100 * gbs / ceiling_gbs)
        if flops is not None:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
        rows.append(row)
    return times


def _ratios(rows, op, case, times, pairs):
    for r in rows:
        if r.get("op") == op and r.get("case") == case and "median_ms" in r:
            for key, base in pairs:
                if base in times:
                    r[key] = times[base] / r["median_ms"]


def run(device, *, smoke=False, time_ms, ceiling_gbs):
    dev = torch.device(device)
    rows = []
    g = torch.Generator().manual_seed(0)

    for case, (m, n) in (SMOKE_DEQUANT if smoke else DEQUANT_CASES).items():
        q, s = ref.weight_quant(torch.randn(m, n, generator=g).to(dev))
        provs = _providers("weight_dequant", dev, lambda q, s: qk.weight_dequant(q, s),
                           lambda q, s: ref.weight_dequant(q, s), smoke)
        times = _time_rows(rows, "weight_dequant", case, f"[{m}, {n}] fp8 -> bf16", provs, (q, s), 3 * m * n,
                           time_ms, ceiling_gbs)
        _ratios(rows, "weight_dequant", case, times, [("vs_reference", "reference"),
                                                      ("vs_compiled", "torch.compile(reference)")])

    for case, (t, k) in (SMOKE_ACT if smoke else ACT_CASES).items():
        x = torch.randn(t, k, generator=g).to(dev, torch.bfloat16)
        provs = _providers("act_quant", dev, lambda x: qk.act_quant(x), lambda x: ref.act_quant(x, 128, False), smoke)
        try:  # vLLM's Triton per-token-group quantiser, when installed
            from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
            provs["vllm per_token_group_quant_fp8"] = lambda x: per_token_group_quant_fp8(x, 128)
        except Exception as e:  # ImportError, or vLLM failing to import on this build
            provs["vllm per_token_group_quant_fp8"] = f"not available ({type(e).__name__})"
        nbytes = 3 * t * k + 4 * t * math.ceil(k / 128)
        times = _time_rows(rows, "act_quant", case, f"[{t}, {k}] bf16 -> fp8", provs, (x,), nbytes, time_ms,
                           ceiling_gbs)
        _ratios(rows, "act_quant", case, times, [("vs_reference", "reference"),
                                                 ("vs_compiled", "torch.compile(reference)")])

    fp8_ok = fp8_ops.fp8_gemm_supported(dev)
    for nk_name, (n, k) in (SMOKE_GEMM_NK if smoke else GEMM_NK).items():
        bq, bs = ref.weight_quant(torch.randn(n, k, generator=g).to(dev))
        w_bf16 = ref.weight_dequant(bq, bs)
        b_row = torch.ones(1, n, dtype=torch.float32, device=dev)
        for m in (SMOKE_GEMM_M if smoke else GEMM_M):
            case = f"{nk_name} M={m}"
            x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
            aq, as_ = ref.act_quant(x, 128)
            a_row = torch.ones(m, 1, dtype=torch.float32, device=dev)
            provs = _providers("fp8_block_gemm", dev, lambda a, sa: qk.fp8_block_gemm(a, sa, bq, bs),
                               lambda a, sa: ref.fp8_block_gemm(a, sa, bq, bs), smoke)
            if m > 4096 and not smoke:
                provs["reference"] = provs["torch.compile(reference)"] = "float32 dequant + matmul: skipped at M > 4096"
            provs["torch._scaled_mm rowwise"] = (
                (lambda a, sa: torch._scaled_mm(a, bq.t(), scale_a=a_row, scale_b=b_row, out_dtype=torch.bfloat16))
                if fp8_ok else "needs a GPU with FP8 tensor cores (sm_89+)")
            provs["cuBLAS bf16"] = lambda a, sa: x @ w_bf16.t()
            flops = 2 * m * n * k
            weight_bytes = n * k + 4 * bs.numel()
            times = _time_rows(rows, "fp8_block_gemm", case, f"M={m} N={n} K={k}", provs, (aq, as_),
                               weight_bytes + m * k + 2 * m * n, time_ms, ceiling_gbs, flops=flops)
            _ratios(rows, "fp8_block_gemm", case, times, [("vs_reference", "reference"),
                                                          ("vs_compiled", "torch.compile(reference)"),
                                                          ("vs_scaled_mm", "torch._scaled_mm rowwise"),
                                                          ("vs_cublas_bf16", "cuBLAS bf16")])
    return rows
