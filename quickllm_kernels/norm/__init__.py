"""RMSNorm and fused residual-add + RMSNorm, forward and backward: `rms_norm`, `add_rms_norm`, the
in-place serving variant `add_rms_norm_` (vLLM's fused_add_rms_norm) and the `RMSNorm` module.

Ops: torch.ops.quickllm.rms_norm, add_rms_norm (functional, with autograd), add_rms_norm_ (in place,
`Tensor(a!)` in its schema) and rms_norm_backward. Backends: cuda (csrc/norm/norm.cu), triton
(norm/triton.py), reference (norm/reference.py).

Rounding follows transformers exactly. With weight_offset == 0 (LlamaRMSNorm, Qwen2RMSNorm, Mistral,
DeepSeek-V3) the normalised value x * rstd is cast to x's dtype first and then multiplied by the
weight in x's dtype; with any other offset (GemmaRMSNorm: 1.0, weights stored as w - 1) the product
x * rstd * (offset + weight) is taken in float32 and cast once. For float32 inputs the two agree.
"""
from __future__ import annotations

import math

import torch

from .._op import Impl, Op, call, define
from . import reference as ref

__all__ = ["rms_norm", "add_rms_norm", "add_rms_norm_", "RMSNorm"]

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_MAX = 2 ** 31 - 1


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_input(op, name, x):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: {name} must be a tensor [..., H], got {_shape(x)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: {name} has no columns (H = {name}.shape[-1] = 0)")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 (float64 on the reference backend), "
                        f"got {x.dtype}")


def _check_like(op, name, t, ref_name, ref_t, shape=None):
    """t has ref_t's dtype, device and (unless `shape` is given) shape."""
    want = tuple(ref_t.shape) if shape is None else tuple(shape)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
        raise ValueError(f"{op}: {name} must have shape {want} ({ref_name}'s), got {_shape(t)}")
    if t.dtype != ref_t.dtype:
        raise TypeError(f"{op}: {name} must have {ref_name}'s dtype ({ref_t.dtype}), got {t.dtype}")
    if t.device != ref_t.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device ({ref_t.device}), got {t.device}")


def _check_weight(op, x, weight, weight_offset):
    h = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != h:
        raise ValueError(f"{op}: weight must be [H] = [{h}] (x.shape[-1]), got {_shape(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype ({x.dtype}), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight must be on x's device ({x.device}), got {weight.device}")
    if not math.isfinite(weight_offset):
        raise ValueError(f"{op}: weight_offset must be finite, got {weight_offset}")


def _check_eps(op, eps):
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")


def _check(x, weight, eps, weight_offset, op="rms_norm"):
    """Shape, dtype and device checks; they run on fake tensors too."""
    _check_input(op, "x", x)
    _check_weight(op, x, weight, weight_offset)
    _check_eps(op, eps)


def _check_add(x, residual, weight, eps, weight_offset, op="add_rms_norm"):
    _check(x, weight, eps, weight_offset, op)
    _check_like(op, "residual", residual, "x", x)


def _rstd_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_bwd(grad_y, grad_residual, x, weight, rstd, weight_offset):
    op = "rms_norm_backward"
    _check_input(op, "x", x)
    _check_weight(op, x, weight, weight_offset)
    _check_like(op, "grad_y", grad_y, "x", x)
    if grad_residual is not None:
        _check_like(op, "grad_residual", grad_residual, "x", x)
    lead = tuple(x.shape[:-1])
    if not isinstance(rstd, torch.Tensor) or tuple(rstd.shape) != lead:
        raise ValueError(f"{op}: rstd must have x's leading shape {lead}, got {_shape(rstd)}")
    if rstd.dtype != _rstd_dtype(x.dtype):
        raise TypeError(f"{op}: rstd must be {_rstd_dtype(x.dtype)} (the forward's), got {rstd.dtype}")
    if rstd.device != x.device:
        raise ValueError(f"{op}: rstd must be on x's device ({x.device}), got {rstd.device}")


def _rows(x):
    return math.prod(x.shape[:-1])


def _kernel_limit(x, *_):
    return "float64 inputs" if x.dtype == torch.float64 else None


def _cuda_supports(x, *_):
    return f"{_rows(x)} rows (at most 2**31 - 1 in one launch)" if _rows(x) > _INT32_MAX else None


def _bwd_cuda_supports(grad_y, grad_residual, x, *_):
    return _cuda_supports(x)


def _tri():
    from . import triton as tri  # noqa: PLC0415
    return tri


def _as_view3(t):
    """t as a [B, S, H] view with a unit last stride (what the in-place kernels write through), or
    None when its strides do not allow one (the leading dims but the last two cannot be merged)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    if t.dim() <= 3 or t.numel() == 0:
        return _tri().rows3(t)
    kept = [(n, s) for n, s in zip(t.shape[:-2], t.stride()[:-2]) if n != 1]
    for (_, s_outer), (n_inner, s_inner) in zip(kept, kept[1:]):
        if s_outer != n_inner * s_inner:
            return None
    return t.flatten(0, -3)


def _triton_inplace(x, residual, weight, eps, weight_offset):
    tri = _tri()
    x3, r3 = _as_view3(x), _as_view3(residual)
    if x3 is not None and r3 is not None:
        tri.add_rms_norm_(x3, r3, weight, eps, weight_offset)
        return
    # A layout the kernel cannot write through: out of place, then copied back.
    y, z, _ = tri.add_rms_norm(x, residual, weight, eps, weight_offset)
    residual.copy_(z)
    x.copy_(y)


def _fwd_fake(x, weight, eps, weight_offset):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x.dtype)))


def _add_fake(x, residual, weight, eps, weight_offset):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x.dtype)))


def _bwd_fake(grad_y, grad_residual, x, weight, rstd, weight_offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, _, weight_offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.weight_offset = weight_offset
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = call("rms_norm_backward", grad_y, None, x, weight, rstd, ctx.weight_offset)
    return dx, dw, None, None


def _add_setup(ctx, inputs, output):
    _, _, weight, _, weight_offset = inputs
    _, new_residual, rstd = output
    ctx.save_for_backward(new_residual, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.mark_non_differentiable(rstd)


def _add_backward(ctx, grad_y, grad_new_residual, _grad_rstd):
    new_residual, weight, rstd = ctx.saved_tensors
    if grad_y is None:  # only new_residual was used
        grad_y = torch.zeros_like(new_residual)
    dx, dw = call("rms_norm_backward", grad_y, grad_new_residual, new_residual, weight, rstd, ctx.weight_offset)
    return dx, dx, dw, None, None  # x and residual enter the sum alike


_KERNELS = dict(family="norm", kernel_limit=_kernel_limit)
define(Op(name="rms_norm", check=_check, fake=_fwd_fake, reference=ref.rms_norm,
          triton=Impl(lambda *args: _tri().rms_norm(*args)),
          cuda=Impl(lambda kernel, *args: kernel(*args), supports=_cuda_supports),
          backward=_backward, setup_context=_setup, **_KERNELS))
define(Op(name="add_rms_norm", check=_check_add, fake=_add_fake, reference=ref.add_rms_norm,
          triton=Impl(lambda *args: _tri().add_rms_norm(*args)),
          cuda=Impl(lambda kernel, *args: kernel(*args), supports=_cuda_supports),
          backward=_add_backward, setup_context=_add_setup, **_KERNELS))
define(Op(name="add_rms_norm_", check=lambda *args: _check_add(*args, op="add_rms_norm_"),
          fake=lambda *args: None, reference=ref.add_rms_norm_, triton=Impl(_triton_inplace),
          cuda=Impl(lambda kernel, *args: kernel(*args), supports=_cuda_supports), **_KERNELS))
define(Op(name="rms_norm_backward", check=_check_bwd, fake=_bwd_fake, reference=ref.rms_norm_backward,
          triton=Impl(lambda *args: _tri().rms_norm_backward(*args)),
          cuda=Impl(lambda kernel, *args: kernel(*args), supports=_bwd_cuda_supports), **_KERNELS))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, weight_offset: float = 0.0):
    """y = x * rsqrt(mean(x^2) + eps) * (weight_offset + weight), rstd and products in float32.

    x: [..., H] float32, float16 or bfloat16 (float64 on the reference backend), any strides (a
       non-unit last stride costs a copy). weight: [H] in x's dtype.
    weight_offset == 0: transformers' LlamaRMSNorm / Qwen2RMSNorm rounding,
       y = weight * (x * rstd).to(x.dtype), the product in x's dtype;
    otherwise GemmaRMSNorm's (offset 1.0, weights stored as w - 1),
       y = (x * rstd * (weight_offset + weight.float())).to(x.dtype).
    Returns y [..., H], contiguous, in x's dtype. Differentiable in x and weight (the gradient of the
    exact math; the weight's gradient is summed in float32, deterministically).
    """
    return call("rms_norm", x, weight, float(eps), float(weight_offset))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 weight_offset: float = 0.0):
    """The residual add of a pre-norm decoder layer fused with the next RMSNorm:
    new_residual = x + residual (in their dtype), y = rms_norm(new_residual, weight, eps, weight_offset).

    x, residual: [..., H], same shape and dtype, any strides; weight [H] in that dtype.
    Returns (y, new_residual), new contiguous tensors. Differentiable in x, residual and weight,
    through both outputs.
    """
    y, new_residual, _ = call("add_rms_norm", x, residual, weight, float(eps), float(weight_offset))
    return y, new_residual


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  weight_offset: float = 0.0):
    """In place, vLLM's fused_add_rms_norm: residual <- x + residual, then x <- rms_norm(residual).

    Shapes, dtypes and rounding as add_rms_norm; x and residual must not overlap. The op
    (torch.ops.quickllm.add_rms_norm_) has no autograd: where autograd would record the call it runs
    add_rms_norm out of place and copies the results in (which autograd tracks). Returns (x, residual).
    """
    eps, weight_offset = float(eps), float(weight_offset)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight)):
        y, new_residual, _ = call("add_rms_norm", x, residual, weight, eps, weight_offset)
        residual.copy_(new_residual)
        x.copy_(y)
        return x, residual
    call("add_rms_norm_", x, residual, weight, eps, weight_offset)
    return x, residual


class RMSNorm(torch.nn.Module):
    """Drop-in for transformers' LlamaRMSNorm / Qwen2RMSNorm (weight_offset 0, weight initialised to
    ones) and GemmaRMSNorm (weight_offset 1, weight initialised to zeros): the same `weight` parameter
    (state dicts load unchanged) and `variance_epsilon` (`eps` too), the same rounding.

    forward(x) -> rms_norm(x); forward(x, residual) -> (y, new_residual) = add_rms_norm(x, residual).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0, *, device=None,
                 dtype=None):
        super().__init__()
        _check_eps("RMSNorm", eps)
        init = torch.zeros if weight_offset == 1 else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)
        self.weight_offset = float(weight_offset)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon, weight_offset=self.weight_offset)
        return add_rms_norm(x, residual, self.weight, self.variance_epsilon, weight_offset=self.weight_offset)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{offset}"
