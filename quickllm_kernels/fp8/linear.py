"""Modules built on the ops. FP8Linear: a linear layer holding DeepSeek-V3 block-FP8 weights."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import fp8 as fp8_ops
from . import reference as fp8_ref

__all__ = ["FP8Linear"]

_PATHS = ("auto", "fp8", "dequant")


class FP8Linear(nn.Module):
    """y = x W^T + b, with W kept as DeepSeek-V3 stores it: `weight` float8_e4m3fn [out, in] and
    `weight_scale_inv` float32 [ceil(out/128), ceil(in/128)] (so a checkpoint's tensors load as they are).

    Two ways to compute it, chosen per call by `path`:
      "fp8"      act_quant(x) per token and group of 128, then fp8_block_gemm on FP8 tensor cores
                 (cuda or triton backend on sm_89+; elsewhere the reference backend computes the same
                 quantised product in float32, which is how to debug the FP8 numerics on a CPU).
      "dequant"  weight_dequant(W) to x's dtype, then a plain matmul: exact weights, unquantised x.
      "auto"     "fp8" where the device has FP8 tensor cores and the blocks are 128 x 128, else "dequant".
    `last_path` says which one the latest call took. x: [..., in] in float32/float16/bfloat16 (float64
    on the CPU); the output has x's dtype. Inference only: the weights take no gradient.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, block=(128, 128),
                 path: str = "auto", scale_format: str = "fp32", bias_dtype=torch.bfloat16, device=None):
        super().__init__()
        if path not in _PATHS:
            raise ValueError(f"FP8Linear: path must be one of {_PATHS}, got {path!r}")
        if scale_format not in ("fp32", "ue8m0"):
            raise ValueError(f"FP8Linear: scale_format must be 'fp32' or 'ue8m0', got {scale_format!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block = (int(block[0]), int(block[1]))
        self.path, self.scale_format = path, scale_format
        sm, sn = math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1])
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=fp8_ref.FP8, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.ones(sm, sn, dtype=torch.float32, device=device),
                                             requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.last_path: str | None = None

    # ---- conversions -------------------------------------------------------------------------

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None, *,
                 block=(128, 128), path: str = "auto", scale_format: str = "fp32") -> "FP8Linear":
        """Wrap a checkpoint's `weight` (float8_e4m3fn [out, in]) and `weight_scale_inv`."""
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, block=block, path=path, scale_format=scale_format,
                bias_dtype=bias.dtype if bias is not None else torch.bfloat16, device=weight.device)
        fp8_ops._dequant_check(weight, weight_scale_inv, m.block[0], m.block[1], torch.float32)
        m.weight.data = weight.detach()
        m.weight_scale_inv.data = weight_scale_inv.detach()
        if bias is not None:
            m.bias.data = bias.detach()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block=(128, 128), path: str = "auto",
                    scale_format: str = "fp32") -> "FP8Linear":
        """Quantise an nn.Linear's weight into 128 x 128 blocks (amax / 448 per block, the scheme of
        DeepSeek-V3 checkpoints and of `python -m quickllm_kernels.fp8 convert --to fp8`)."""
        w, s = fp8_ref.weight_quant(linear.weight.detach(), block)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_fp8(w, s, bias, block=block, path=path, scale_format=scale_format)

    def to_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """An nn.Linear holding the dequantised weight in `dtype`."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return fp8_ops.weight_dequant(self.weight, self.weight_scale_inv, block=self.block, out_dtype=dtype)

    def _apply(self, fn, recurse=True):
        # module.to(dtype), .half(), .bfloat16() ... convert every floating tensor: the fp8 weight and its
        # float32 scales would lose their format (and the scales their bits). They go through `fn` as
        # integer views, which device moves change and dtype casts leave alone; the bias converts.
        fixed = {id(self.weight), id(self.weight_scale_inv)}
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

        def keep_format(t):
            if id(t) not in fixed:
                return fn(t)
            raw = ints[t.element_size()]
            moved = fn(t.view(raw))
            # Module.type(dtype) converts integer tensors too: then keep t and take only the device
            return moved.view(t.dtype) if moved.dtype == raw else t.to(moved.device)

        return super()._apply(keep_format, recurse)

    # ---- forward -------------------------------------------------------------------------------

    def resolve_path(self, device) -> str:
        """The path a call on `device` takes: "fp8" or "dequant"."""
        if self.path != "auto":
            return self.path
        return "fp8" if self.block == (128, 128) and fp8_ops.fp8_gemm_supported(device) else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: x must be [..., {self.in_features}], got shape {tuple(x.shape)}")
        path = self.resolve_path(x.device)
        if path == "fp8":
            if self.block != (128, 128):
                raise ValueError(f"FP8Linear: path 'fp8' needs 128 x 128 weight blocks, this layer has {self.block}")
            q, s = fp8_ops.act_quant(x, group=128, scale_format=self.scale_format)
            y = fp8_ops.fp8_block_gemm(q, s, self.weight, self.weight_scale_inv, out_dtype=x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            w = self.dequantized_weight(x.dtype)
            y = nn.functional.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)
        self.last_path = path
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, path={self.path!r}, scale_format={self.scale_format!r}")
