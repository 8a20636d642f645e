"""DeepSeek-V3 FP8 ops: block weight dequantisation, per-token-group activation quantisation, and the
block-scaled FP8 GEMM that multiplies the two.

Ops: torch.ops.quickllm.weight_dequant, act_quant, fp8_block_gemm. Backends: cuda (csrc/fp8/fp8.cu),
triton (fp8/triton.py), reference (fp8/reference.py, float8_e4m3fn on any device). weight_dequant
and act_quant give bit-identical results on every backend; fp8_block_gemm agrees to float32
rounding (the kernels sum each 128-wide K block on the tensor cores before scaling it). These are
inference ops: no autograd.
"""
from __future__ import annotations

import math

import torch

from .._op import Impl, Op, call, define, unit_last
from . import reference as ref

__all__ = ["weight_dequant", "act_quant", "fp8_block_gemm", "FP8", "FP8_MAX", "fp8_gemm_supported"]

FP8 = ref.FP8
FP8_MAX = ref.FP8_MAX
GEMM_BLOCK = 128  # fp8_block_gemm: K groups of a_scales and the N x K blocks of b_scales
_OUT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SCALE_FORMATS = {"fp32": False, "ue8m0": True}


def _capability(index: int) -> tuple[int, int]:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


_CAPABILITY: dict[int, tuple[int, int]] = {}
_capability._dynamo_marked_constant = True  # torch.compile evaluates it once while tracing


def fp8_gemm_supported(device) -> bool:
    """Whether `device` has FP8 tensor cores (CUDA sm_89 and newer), which the cuda and triton
    fp8_block_gemm kernels need. The reference backend runs anywhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


def _float64_limit(*dtypes):
    return "float64 inputs" if torch.float64 in dtypes else None


def _check_out_dtype(op, out_dtype):
    if out_dtype not in _OUT:
        raise TypeError(f"{op}: out_dtype must be torch.bfloat16, torch.float16 or torch.float32 (float64 on the "
                        f"reference backend), got {out_dtype}")


def _check_fp8(op, name, t, dims=2):
    if t.dtype != FP8:
        raise TypeError(f"{op}: {name} must be torch.float8_e4m3fn, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_scale(op, name, s, shape, device):
    if s.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {s.dtype}")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(s.shape)}")
    if s.device != device:
        raise ValueError(f"{op}: {name} must be on the same device as the fp8 values ({device}), got {s.device}")


# --------------------------------------------------------------------------------------------
# weight_dequant
# --------------------------------------------------------------------------------------------


def _dequant_check(w, scale_inv, block_m, block_n, out_dtype):
    _check_fp8("weight_dequant", "w", w)
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"weight_dequant: block must be two positive ints, got ({block_m}, {block_n})")
    _check_out_dtype("weight_dequant", out_dtype)
    m, n = w.shape
    _check_scale("weight_dequant", "scale_inv", scale_inv, (math.ceil(m / block_m), math.ceil(n / block_n)), w.device)


def _dequant_triton(w, scale_inv, block_m, block_n, out_dtype):
    from . import triton as tri
    return tri.weight_dequant(unit_last(w), scale_inv, (block_m, block_n), out_dtype)


def _dequant_fake(w, scale_inv, block_m, block_n, out_dtype):
    return w.new_empty(w.shape, dtype=out_dtype)


define(Op(
    name="weight_dequant", family="fp8", check=_dequant_check, fake=_dequant_fake,
    reference=lambda w, s, bm, bn, out_dtype: ref.weight_dequant(unit_last(w), s, (bm, bn), out_dtype),
    triton=Impl(_dequant_triton),
    cuda=Impl(lambda kernel, w, s, bm, bn, out_dtype: kernel(unit_last(w), s, bm, bn, out_dtype)),
    kernel_limit=lambda w, s, bm, bn, out_dtype: _float64_limit(out_dtype)))


# --------------------------------------------------------------------------------------------
# act_quant
# --------------------------------------------------------------------------------------------


def _act_check(x, group):
    if x.dtype not in _OUT:
        raise TypeError(f"act_quant: x must be float32, float16 or bfloat16 (float64 on the reference backend), "
                        f"got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("act_quant: x must have at least one dimension (the K dim that groups run along)")
    if group <= 0:
        raise ValueError(f"act_quant: group must be a positive int, got {group}")


def _act_shapes(x, group):
    return x.shape, (*x.shape[:-1], math.ceil(x.shape[-1] / group))


def _act_triton(x, group, ue8m0):
    from . import triton as tri
    x2 = unit_last(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x)
    q, s = tri.act_quant(x2, group, ue8m0)
    q_shape, s_shape = _act_shapes(x, group)
    return q.view(q_shape), s.view(s_shape)


def _act_fake(x, group, ue8m0):
    q_shape, s_shape = _act_shapes(x, group)
    return x.new_empty(q_shape, dtype=FP8), x.new_empty(s_shape, dtype=torch.float32)


define(Op(
    name="act_quant", family="fp8", check=lambda x, group, ue8m0: _act_check(x, group), fake=_act_fake,
    reference=ref.act_quant, triton=Impl(_act_triton), cuda=Impl(lambda kernel, *args: kernel(*args)),
    kernel_limit=lambda x, group, ue8m0: _float64_limit(x.dtype)))


# --------------------------------------------------------------------------------------------
# fp8_block_gemm
# --------------------------------------------------------------------------------------------


def _gemm_check(a, a_scales, b, b_scales, out_dtype):
    op = "fp8_block_gemm"
    _check_fp8(op, "a", a)
    _check_fp8(op, "b", b)
    if b.device != a.device:
        raise ValueError(f"{op}: b must be on a's device ({a.device}), got {b.device}")
    (m, k), (n, kb_) = a.shape, b.shape
    if kb_ != k:
        raise ValueError(f"{op}: a is [M, K] = {list(a.shape)} and b must be [N, K] with the same K, "
                         f"got {list(b.shape)}")
    kb = math.ceil(k / GEMM_BLOCK)
    _check_scale(op, "a_scales", a_scales, (m, kb), a.device)
    _check_scale(op, "b_scales", b_scales, (math.ceil(n / GEMM_BLOCK), kb), a.device)
    _check_out_dtype(op, out_dtype)


def _aligned(t):
    return t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % 16 == 0)


def _device_limit(device):
    """Why no fp8_block_gemm kernel can run on `device` (a GPU without FP8 tensor cores), or None."""
    if device.type == "cuda" and not fp8_gemm_supported(device):
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        return f"GPUs without FP8 tensor cores (they need sm_89+, this one is sm_{major}{minor})"
    return None


_CUDA_GEMM_MAX_N = 65535 * 64


def _gemm_cuda_supports(a, a_scales, b, b_scales, out_dtype):
    """Why the CUDA GEMM cannot take this call: its 16-byte loads and its grid."""
    a, b = unit_last(a), unit_last(b)
    k = a.shape[1]
    if k % 16 or not (_aligned(a) and _aligned(b)):
        return (f"K = {k} or row strides that are not multiples of 16 bytes (its 16-byte loads need K % 16 == 0 "
                f"and 16-byte aligned rows)")
    if b.shape[0] > _CUDA_GEMM_MAX_N:
        return f"N > {_CUDA_GEMM_MAX_N} (one launch has at most 65535 column tiles of 64)"
    return None


# Rows up to which the CUDA GEMM goes first on Hopper: measured on an H100 (bench/results/), at
# decode sizes it is memory-bound and its lean launch (a few microseconds of host time against
# Triton's tens) wins, in CUDA graphs too for 6 of the 10 shapes at M = 1 and 16 (up to 1.9x; the
# worst loss 18%); at M = 64 Triton's wgmma is 2x faster for the large weights (graph replays), and
# from M = 256 on 1.4-4.5x.
_CUDA_FIRST_MAX_M = 16


def _gemm_order(device, args):
    """Auto order on a GPU. Hopper and datacenter Blackwell (sm_90, sm_100) have FP8 MMA only through
    wgmma / tcgen05, which Triton emits; there the CUDA kernel's mma.sync is lowered to e4m3 -> f16
    conversions and f16 MMAs (same numbers, half the rate), so Triton goes first, except for
    decode-sized calls (_CUDA_FIRST_MAX_M), which are memory-bound. sm_89 and sm_120 run mma.sync
    FP8 natively: the default order."""
    if device.type == "cuda" and _capability(device.index if device.index is not None
                                             else torch.cuda.current_device())[0] in (9, 10):
        a = args[0] if args else None
        if a is not None and a.shape[-1] and a.numel() // a.shape[-1] <= _CUDA_FIRST_MAX_M:
            return ("cuda", "triton", "reference")
        return ("triton", "cuda", "reference")
    return None


def _gemm_triton(a, a_scales, b, b_scales, out_dtype):
    from . import triton as tri
    return tri.fp8_block_gemm(unit_last(a), a_scales, unit_last(b), b_scales, out_dtype)


def _gemm_fake(a, a_scales, b, b_scales, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


define(Op(
    name="fp8_block_gemm", family="fp8", check=_gemm_check, fake=_gemm_fake,
    reference=lambda a, sa, b, sb, out_dtype: ref.fp8_block_gemm(unit_last(a), sa, unit_last(b), sb, out_dtype),
    triton=Impl(_gemm_triton),
    cuda=Impl(lambda kernel, a, sa, b, sb, out_dtype: kernel(unit_last(a), sa, unit_last(b), sb, out_dtype),
              supports=_gemm_cuda_supports),
    kernel_limit=lambda a, sa, b, sb, out_dtype: "float64 output" if out_dtype == torch.float64 else None,
    device_limit=_device_limit, auto_order=_gemm_order))


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, *, block=(128, 128),
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w_fp8 * scale_inv, each scale repeated over its block: the weight a DeepSeek-V3 checkpoint means.

    w: [M, N] float8_e4m3fn, any strides. scale_inv: float32 [ceil(M/bm), ceil(N/bn)] (edge blocks
    cover the rows and columns that are left, as in the 576-row kv_a_proj). block: (bm, bn).
    Returns [M, N] out_dtype (bfloat16, float16 or float32; float64 on the reference backend),
    computed as one float32 multiply per element, so every backend gives the same bits.
    """
    bm, bn = (int(v) for v in block)
    return call("weight_dequant", w, scale_inv, bm, bn, out_dtype)


def act_quant(x: torch.Tensor, *, group: int = 128, scale_format: str = "fp32"):
    """Per-token-group FP8 quantisation: x ~= x_fp8 * scale, one scale per `group` values along K.

    s = max(amax(|x_group|), 1e-10) / 448, x_fp8 = e4m3(clamp(x / s, -448, 448)) (nearest even);
    a group of zeros gives zeros. scale_format "ue8m0" rounds s up to a power of two (the scales of
    newer DeepSeek checkpoints and DeepGEMM's UE8M0 mode), still returned as float32.
    x: [..., K] float32/float16/bfloat16, any strides; the last group of a row may be partial.
    Returns (x_fp8 [..., K] float8_e4m3fn, scales float32 [..., ceil(K/group)]), both contiguous;
    every backend gives the same bits.
    """
    if scale_format not in _SCALE_FORMATS:
        raise ValueError(f"act_quant: scale_format must be 'fp32' or 'ue8m0', got {scale_format!r}")
    return call("act_quant", x, int(group), _SCALE_FORMATS[scale_format])


def fp8_block_gemm(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor, *,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C = A B^T for DeepSeek-V3's block-scaled FP8: A = a_fp8 * a_scales (per token, per 128 of K),
    B = b_fp8 * b_scales (per 128 x 128 block), float32 accumulation, each 128-wide K block of
    a_fp8 b_fp8^T scaled once by a_scales[m, kb] * b_scales[n // 128, kb].

    a_fp8: [..., K] float8_e4m3fn with a_scales float32 [..., ceil(K/128)] (act_quant's output).
    b_fp8: [N, K] float8_e4m3fn (a checkpoint's weight) with b_scales float32 [ceil(N/128), ceil(K/128)]
    (its weight_scale_inv). Returns [..., N] in out_dtype. The cuda and triton kernels need FP8
    tensor cores (sm_89+); elsewhere the reference computes the same product from dequantised
    float32 operands.
    """
    if a_fp8.dim() < 1:
        raise ValueError("fp8_block_gemm: a_fp8 must be [..., K]")
    lead = a_fp8.shape[:-1]
    if tuple(a_scales.shape[:-1]) != tuple(lead):
        raise ValueError(f"fp8_block_gemm: a_scales must be [..., ceil(K/128)] with a_fp8's leading shape "
                         f"{list(lead)}, got {list(a_scales.shape)}")
    rows = math.prod(lead)
    a2 = a_fp8.reshape(rows, a_fp8.shape[-1])
    s2 = a_scales.reshape(rows, a_scales.shape[-1]) if a_scales.dim() else a_scales
    out = call("fp8_block_gemm", a2, s2, b_fp8, b_scales, out_dtype)
    return out.view(*lead, b_fp8.shape[0])
