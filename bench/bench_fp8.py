"""FP8 benchmarks (DeepSeek-V3 shapes).

weight_dequant: fp8 [M, N] + 128x128 scales -> bf16; bytes = M N (read) + 2 M N (write) + scales.
act_quant: bf16 [T, K] -> fp8 + one float32 scale per 128; bytes = 2 T K + T K + 4 T K / 128.
Both against the copy of as many bytes, the reference, torch.compile(reference) and vLLM's
per_token_group_quant_fp8 when installed.

fp8_block_gemm: C[M, N] = A B^T, bf16 out, A with 1x128 scales, B with 128x128 scales; bytes = B and
its scales + A and its scales + C. Providers:
  torch scaled_mm blockwise   the like-for-like peer: cuBLAS through torch's block-scaled mm
                              (ScalingType.BlockWise1x128 x BlockWise128x128; sm_90, cuBLAS >= 12.9),
                              with A's scales made M-major outside the timed call, as it requires
  torch._scaled_mm rowwise    A and B requantised per row (outside the timed call): the fastest
                              FP8 GEMM torch ships, and this op's TFLOP/s ceiling
  cuBLAS bf16                 the dequantised A and B in bf16: the ceiling where FP8 is unavailable
  vllm w8a8_block_fp8_matmul  vLLM's Triton block GEMM, when installed
The two requantising/dequantising peers compute a close variant of the product, checked with a
looser bound. At decode M (<= 64) the rows are also timed as CUDA-graph replays, and their bytes
against the copy ceiling tell how close they come to streaming the weight once.

    python bench/run.py --op fp8
    python -m pytest bench -k fp8                   # pytest-benchmark (bench/test_bench.py)
"""
from __future__ import annotations

import functools
import math

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, fp8_bits, on_backend, rand, unavailable
from quickllm_kernels.fp8 import reference as ref

DEQUANT_CASES = {"w1_gate_up_18432x7168": (18432, 7168), "w2_down_7168x18432": (7168, 18432),
                 "kv_a_proj_576x7168": (576, 7168)}
ACT_CASES = {"hidden_4096x7168": (4096, 7168), "mlp_4096x18432": (4096, 18432)}
GEMM_NK = {"q_b_proj": (24576, 1536), "o_proj": (7168, 16384), "dense_up": (18432, 7168),
           "dense_down": (7168, 18432), "expert_up": (2048, 7168)}
GEMM_M = (1, 16, 64, 256, 1024, 4096, 16384)
GEMM_COMPILE_M = (64, 4096)       # torch.compile(reference) rows: one decode and one prefill M per shape
REFERENCE_MAX_M = 4096            # the float32 reference is not timed above this M (still the check)
SMOKE_DEQUANT = {"smoke": (200, 300)}
SMOKE_ACT = {"smoke": (64, 300)}
SMOKE_GEMM_NK = {"smoke": (144, 256)}   # N % 16 == 0 (torch's scaled mm), N % 128 != 0 (edge tiles)
SMOKE_GEMM_M = (1, 33)
BLOCKWISE = "torch scaled_mm blockwise"


def _ours(op, name, device, call):
    """quickllm on one backend: make(*inputs) -> fn(), or why that backend cannot run here."""
    return unavailable(op, name, device) or (lambda *inputs: functools.partial(on_backend(name, call), *inputs))


def _common(op, device, call, reference):
    out = {f"quickllm-{name}": _ours(op, name, device, call) for name in ("cuda", "triton")}
    out["reference"] = lambda *inputs: lambda: reference(*inputs)
    out["torch.compile(reference)"] = lambda *inputs: functools.partial(compiled(reference), *inputs)
    return out


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


@functools.lru_cache(maxsize=1)
def _weight(n, k, device):
    """B [n, k] fp8 and its 128x128 scales (the last one built is kept: all M of one shape share it)."""
    return ref.weight_quant(torch.randn(n, k, generator=_gen(device, 1), device=device))


def _rowwise(t):
    """t [R, K] -> (fp8 [R, K], float32 scales [R, 1]): one scale per row, amax / 448."""
    s = (t.float().abs().amax(1, keepdim=True) / 448.0).clamp(min=1e-12)
    return (t.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s


def gemm_providers(device, m) -> dict:
    """name -> make(a_fp8, a_scales, b_fp8, b_scales) -> fn() returning C [M, N] bf16, or why not."""
    out = _common("fp8_block_gemm", device, lambda a, sa, b, sb: qk.fp8_block_gemm(a, sa, b, sb),
                  lambda a, sa, b, sb: ref.fp8_block_gemm(a, sa, b, sb))
    if torch.device(device).type == "cuda":
        if m > REFERENCE_MAX_M:
            out["reference"] = f"float32 dequant + matmul: not timed at M > {REFERENCE_MAX_M} (still the check)"
        if m not in GEMM_COMPILE_M:
            out["torch.compile(reference)"] = f"only at M in {GEMM_COMPILE_M} (compile time)"

    out[BLOCKWISE] = _torch_blockwise

    def rowwise(a, sa, b, sb):
        aq, a_s = _rowwise(ref.act_dequant(a, sa))
        bq, b_s = _rowwise(ref.weight_dequant(b, sb, out_dtype=torch.float32))
        b_s = b_s.reshape(1, -1).contiguous()
        return lambda: torch._scaled_mm(aq, bq.t(), scale_a=a_s, scale_b=b_s, out_dtype=torch.bfloat16)
    out["torch._scaled_mm rowwise"] = rowwise

    def cublas(a, sa, b, sb):
        a16, b16 = ref.act_dequant(a, sa, out_dtype=torch.bfloat16), ref.weight_dequant(b, sb)
        return lambda: a16 @ b16.t()
    out["cuBLAS bf16"] = cublas

    try:
        from vllm.model_executor.layers.quantization.utils.fp8_utils import w8a8_block_fp8_matmul
        out["vllm w8a8_block_fp8_matmul"] = lambda a, sa, b, sb: lambda: w8a8_block_fp8_matmul(
            a, b, sa, sb, [128, 128], output_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001  (ImportError, or vLLM failing to import on this build)
        out["vllm w8a8_block_fp8_matmul"] = f"not available ({type(e).__name__})"
    return out


def _torch_blockwise(a, sa, b, sb):
    """torch's DeepSeek-style block-scaled mm: torch.nn.functional.scaled_mm with explicit recipes
    where it exists (enum names vary between releases), else torch._scaled_mm, which infers the
    recipe from the scale shapes. One trial call picks the first that runs; fn.impl names it."""
    sa_m_major = sa.t().contiguous().t()  # [M, K/128] with strides (1, M), as cuBLAS wants it
    sb_t = sb.t()                          # [K/128, N/128] with strides (1, K/128): b.t()'s blocks
    tries, errors = [], []
    try:
        from torch.nn.functional import ScalingType, scaled_mm
        r1, r2 = (next((getattr(ScalingType, n) for n in names if hasattr(ScalingType, n)), None)
                  for names in (("BlockWise1x128", "Blockwise_1x128"), ("BlockWise128x128", "Blockwise_128x128")))
        if r1 is not None and r2 is not None:
            tries.append(("torch.nn.functional.scaled_mm", lambda: scaled_mm(
                a, b.t(), sa_m_major, r1, sb_t, r2, output_dtype=torch.bfloat16)))
        else:
            errors.append(f"ScalingType has no 1x128 / 128x128 recipe ({[m.name for m in ScalingType]})")
    except ImportError as e:
        errors.append(f"no torch.nn.functional.scaled_mm ({e})")
    tries.append(("torch._scaled_mm", lambda: torch._scaled_mm(a, b.t(), scale_a=sa_m_major, scale_b=sb_t,
                                                                out_dtype=torch.bfloat16)))
    for name, fn in tries:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")
            continue
        fn.impl = name
        return fn
    raise RuntimeError("; ".join(errors))


def _vllm_act_quant():
    try:
        from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
        return lambda x: lambda: per_token_group_quant_fp8(x, 128)
    except Exception as e:  # noqa: BLE001
        return f"not available ({type(e).__name__})"


def _dequant_inputs(m, n, device):
    return ref.weight_quant(torch.randn(m, n, generator=_gen(device, 0), device=device))


def _act_inputs(t, k, device):
    return (torch.randn(t, k, generator=_gen(device, 0), device=device, dtype=torch.bfloat16),)


def _gemm_inputs(m, n, k, device):
    x = torch.randn(m, k, generator=_gen(device, 2), device=device, dtype=torch.bfloat16)
    return (*ref.act_quant(x, 128), *_weight(n, k, device))


def cases(device, smoke: bool = False) -> list[Case]:
    dev = str(torch.device(device))
    out = []
    for name, (m, n) in (SMOKE_DEQUANT if smoke else DEQUANT_CASES).items():
        nscale = 4 * math.ceil(m / 128) * math.ceil(n / 128)
        out.append(Case(
            op="weight_dequant", name=name, shape=f"[{m}, {n}] fp8 -> bf16",
            inputs=functools.partial(_dequant_inputs, m, n, dev),
            providers=_common("weight_dequant", dev, lambda q, s: qk.weight_dequant(q, s), ref.weight_dequant),
            expected=ref.weight_dequant, nbytes=3 * m * n + nscale, tol=1e-2))
    for name, (t, k) in (SMOKE_ACT if smoke else ACT_CASES).items():
        provs = _common("act_quant", dev, lambda x: qk.act_quant(x), lambda x: ref.act_quant(x, 128, False))
        provs["vllm per_token_group_quant_fp8"] = _vllm_act_quant()
        out.append(Case(
            op="act_quant", name=name, shape=f"[{t}, {k}] bf16 -> fp8",
            inputs=functools.partial(_act_inputs, t, k, dev), providers=provs,
            expected=lambda x: ref.act_quant(x, 128, False), nbytes=3 * t * k + 4 * t * math.ceil(k / 128),
            tol=2e-2))
    for nk_name, (n, k) in (SMOKE_GEMM_NK if smoke else GEMM_NK).items():
        kb = math.ceil(k / 128)
        for m in (SMOKE_GEMM_M if smoke else GEMM_M):
            out.append(Case(
                op="fp8_block_gemm", name=f"{nk_name}_M{m}", shape=f"M={m} N={n} K={k}",
                inputs=functools.partial(_gemm_inputs, m, n, k, dev), providers=gemm_providers(dev, m),
                expected=lambda a, sa, b, sb: ref.fp8_block_gemm(a, sa, b, sb),
                nbytes=n * k + 4 * math.ceil(n / 128) * kb + m * k + 4 * m * kb + 2 * m * n, flops=2 * m * n * k,
                tol=1e-2, tols={"torch._scaled_mm rowwise": 0.1, "cuBLAS bf16": 2e-2}, graph=m <= 64,
                gemm_ceiling=("torch._scaled_mm rowwise", "cuBLAS bf16"),
                baselines={"vs_reference": "reference", "vs_compiled": "torch.compile(reference)",
                           "vs_torch_blockwise": BLOCKWISE, "vs_scaled_mm": "torch._scaled_mm rowwise",
                           "vs_cublas_bf16": "cuBLAS bf16"},
                extra=dict(M=m, N=n, K=k)))
    return out


# ------------------------------------------------------------------------------------------------
# The GPU check's smoke cases (bench/smoke.py) and the Triton compile test's calls
# ------------------------------------------------------------------------------------------------


def _check_dequant_make(dev, small):
    m, n = (200, 300) if small else (7168, 2048)
    q, s = ref.weight_quant(torch.randn(m, n, device=dev))
    return dict(q=q, s=s)


def _check_dequant_refresh(x):
    q, s = ref.weight_quant(torch.randn(x["q"].shape, device=x["q"].device))
    x["q"].copy_(q)
    x["s"].copy_(s)


def _check_act_make(dev, small):
    t, k = (19, 300) if small else (4096, 7168)
    return dict(x=rand(t, k, dtype=torch.bfloat16, device=dev))


def _check_act_refresh(x):
    x["x"].copy_(torch.randn_like(x["x"], dtype=torch.float32))


def _check_gemm_make(dev, small):
    m, n, k = (33, 200, 256) if small else (1000, 2048, 7168)
    aq, as_ = ref.act_quant(torch.randn(m, k, device=dev), 128)
    bq, bs = ref.weight_quant(torch.randn(n, k, device=dev))
    return dict(aq=aq, as_=as_, bq=bq, bs=bs)


def _check_gemm_refresh(x):
    aq, as_ = ref.act_quant(torch.randn(x["aq"].shape, device=x["aq"].device), 128)
    x["aq"].copy_(aq)
    x["as_"].copy_(as_)


CHECKS = {
    "weight_dequant": Check("weight_dequant", _check_dequant_make, lambda x: (qk.weight_dequant(x["q"], x["s"]),),
                            "exact-gpu", _check_dequant_refresh),
    "act_quant fp32": Check("act_quant", _check_act_make, lambda x: tuple(map(fp8_bits, qk.act_quant(x["x"]))),
                            "exact", _check_act_refresh),
    "act_quant ue8m0": Check("act_quant", _check_act_make,
                             lambda x: tuple(map(fp8_bits, qk.act_quant(x["x"], scale_format="ue8m0"))), "exact",
                             _check_act_refresh),
    "fp8_block_gemm": Check("fp8_block_gemm", _check_gemm_make,
                            lambda x: (qk.fp8_block_gemm(x["aq"], x["as_"], x["bq"], x["bs"]),), "rel",
                            _check_gemm_refresh),
}


def _dequant_calls(g):
    for out_dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(300, 260, generator=g).to(torch.float8_e4m3fn)
        qk.weight_dequant(w, torch.ones(3, 3), out_dtype=out_dtype)


def _act_quant_calls(g):
    for xdtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(5, 300, generator=g).to(xdtype)
        for group, fmt in ((128, "fp32"), (128, "ue8m0"), (64, "fp32")):
            qk.act_quant(x, group=group, scale_format=fmt)
        qk.act_quant(torch.randn(2, 9000, generator=g).to(xdtype), group=5000)  # wider than one tile: two passes


def _gemm_calls(g):
    for m in (1, 16, 64, 300):
        for out_dtype in (torch.bfloat16, torch.float32):
            a = torch.randn(m, 256, generator=g).to(torch.float8_e4m3fn)
            b = torch.randn(200, 256, generator=g).to(torch.float8_e4m3fn)
            qk.fp8_block_gemm(a, torch.ones(m, 2), b, torch.ones(2, 2), out_dtype=out_dtype)


TRITON_EXAMPLES = {"weight_dequant": _dequant_calls, "act_quant": _act_quant_calls, "fp8_block_gemm": _gemm_calls}
