"""RMSNorm benchmarks on bf16 hidden states of Qwen2-7B (H = 3584), Llama-3-8B (4096) and DeepSeek-V3
(7168), 1 to 16384 tokens, Llama rounding (weight_offset 0):

- rms_norm forward: bytes = x read + y written (+ the weight, + rstd written);
- add_rms_norm forward: x and residual read, y and new_residual written;
- add_rms_norm_ in place (vLLM's fused_add_rms_norm, the serving call): the same bytes;
- rms_norm_backward: x and grad_y read, grad_x written (+ rstd read, + the weight's partial sums).

GB/s against a device copy of as many bytes. Providers: quickllm's kernels, the reference,
torch.compile(reference), and, where installed, Liger's, vLLM's and Apex's RMSNorm kernels (their
backward is timed only through autograd, so the backward cases leave them out). Every provider is
checked against the reference on the same inputs before it is timed.

    python bench/run.py --op norm
"""
from __future__ import annotations

import functools

import torch

import quickllm_kernels as qk
from common import Case, Check, compiled, on_backend, rand, unavailable
from quickllm_kernels.norm import reference as ref

MODELS = {"qwen2_7b": 3584, "llama3_8b": 4096, "deepseek_v3": 7168}
TOKENS = (1, 64, 1024, 16384)
SMOKE_MODELS = {"smoke": 136}
SMOKE_TOKENS = (5,)
EPS = 1e-6
OPS = ("rms_norm", "add_rms_norm", "add_rms_norm_", "rms_norm_backward")


def make_inputs(op: str, tokens: int, h: int, device):
    g = torch.Generator(device=device).manual_seed(tokens + h)
    x = torch.randn(tokens, h, generator=g, device=device, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(h, generator=g, device=device)).to(torch.bfloat16)
    if op == "rms_norm":
        return x, w
    if op in ("add_rms_norm", "add_rms_norm_"):
        return x, 4 * torch.randn(tokens, h, generator=g, device=device, dtype=torch.bfloat16), w
    grad = torch.randn(tokens, h, generator=g, device=device, dtype=torch.bfloat16)
    _, rstd = ref.rms_norm(x, w, EPS, 0.0)
    return grad, x, w, rstd


def _reference(op: str):
    if op == "rms_norm":
        return lambda x, w: ref.rms_norm(x, w, EPS, 0.0)[0]
    if op == "add_rms_norm":
        return lambda x, r, w: ref.add_rms_norm(x, r, w, EPS, 0.0)[:2]
    if op == "add_rms_norm_":
        def inplace(x, r, w):
            ref.add_rms_norm_(x, r, w, EPS, 0.0)
            return x, r
        return inplace
    return lambda g, x, w, rstd: ref.rms_norm_backward(g, None, x, w, rstd, 0.0)


def _ours(op: str):
    if op == "rms_norm":
        return lambda x, w: qk.rms_norm(x, w, EPS)
    if op == "add_rms_norm":
        return lambda x, r, w: qk.add_rms_norm(x, r, w, EPS)
    if op == "add_rms_norm_":
        return lambda x, r, w: qk.add_rms_norm_(x, r, w, EPS)
    return lambda g, x, w, rstd: torch.ops.quickllm.rms_norm_backward(g, None, x, w, rstd, 0.0)


def _liger(op: str):
    """Liger-Kernel's Triton RMSNorm (Llama casting), or why it cannot run this op."""
    if op == "rms_norm_backward":
        return "backward only through autograd"
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError as e:
        return f"not installed ({e.name})"
    if op == "rms_norm":
        return lambda x, w: lambda: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except ImportError as e:
        return f"this version has no fused add + RMSNorm ({e.name})"
    in_place = op == "add_rms_norm_"

    def make(x, r, w):
        def run():
            y, z = LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", in_place)
            return (x, r) if in_place else (y, z)
        return run
    return make


def _vllm(op: str):
    """vLLM's CUDA rms_norm (out=) and fused_add_rms_norm (in place only)."""
    if op not in ("rms_norm", "add_rms_norm_"):
        return "has no out-of-place add + norm" if op == "add_rms_norm" else "has no backward"
    try:
        from vllm import _custom_ops as vllm_ops
    except ImportError as e:
        return f"not installed ({e.name})"
    if op == "rms_norm":
        def make(x, w):
            out = torch.empty_like(x)
            return lambda: (vllm_ops.rms_norm(out, x, w, EPS), out)[1]
        return make

    def make_inplace(x, r, w):
        return lambda: (vllm_ops.fused_add_rms_norm(x, r, w, EPS), (x, r))[1]
    return make_inplace


def _apex(op: str):
    """Apex's fused_rms_norm_affine (CUDA), forward only here."""
    if op != "rms_norm":
        return "no fused residual add" if op.startswith("add") else "backward only through autograd"
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError as e:
        return f"not installed ({e.name})"
    return lambda x, w: lambda: fused_rms_norm_affine(x, w, (x.shape[-1],), EPS)


def providers(op: str, device) -> dict:
    """name -> make(*inputs) -> fn() returning the op's outputs, or why it cannot run."""
    device = torch.device(device)

    def ours(name):
        run = on_backend(name, _ours(op))
        return unavailable(op, name, device) or (lambda *inputs: functools.partial(run, *inputs))

    out = {"quickllm-cuda": ours("cuda"), "quickllm-triton": ours("triton"),
           "reference": lambda *inputs: functools.partial(_reference(op), *inputs)}

    def make_compiled(*inputs):
        c = compiled(_reference(op))
        return lambda: c(*inputs)
    out["torch.compile(reference)"] = make_compiled
    out["liger rms_norm"] = _liger(op)
    out["vllm rms_norm"] = _vllm(op)
    out["apex fused_rms_norm"] = _apex(op)
    return out


def _nbytes(op: str, t: int, h: int) -> int:
    row = t * h * 2
    if op == "rms_norm":
        return 2 * row + h * 2 + t * 4
    if op in ("add_rms_norm", "add_rms_norm_"):
        return 4 * row + h * 2 + (t * 4 if op == "add_rms_norm" else 0)
    return 3 * row + h * 2 + t * 4  # backward (the weight's partial sums are the kernels' own extra)


def cases(device, smoke: bool = False) -> list[Case]:
    out = []
    for name, h in (SMOKE_MODELS if smoke else MODELS).items():
        for t in SMOKE_TOKENS if smoke else TOKENS:
            for op in OPS:
                out.append(Case(
                    op=op, name=f"{op}_{name}_T{t}", shape=f"[{t}, {h}] bf16",
                    inputs=functools.partial(make_inputs, op, t, h, device), providers=providers(op, device),
                    expected=_reference(op), nbytes=_nbytes(op, t, h), tol=1e-2, mutates=op == "add_rms_norm_",
                    graph=t <= 64, extra=dict(model=name, tokens=t, hidden=h)))
    return out


# ------------------------------------------------------------------------------------------------
# The GPU check's smoke cases (bench/smoke.py) and the Triton compile test's calls
# ------------------------------------------------------------------------------------------------


def _check_make(dev, small):
    t, h = (37, 136) if small else (4096, 3584)
    return dict(x=rand(t, h, dtype=torch.bfloat16, device=dev).requires_grad_(),
                r=rand(t, h, dtype=torch.bfloat16, device=dev, scale=4.0).requires_grad_(),
                w=(1 + 0.1 * torch.randn(h, device=dev)).to(torch.bfloat16).requires_grad_(),
                gemma_w=(0.1 * torch.randn(h, device=dev)).to(torch.bfloat16).requires_grad_(),
                g=rand(t, h, dtype=torch.bfloat16, device=dev), g_res=rand(t, h, dtype=torch.bfloat16, device=dev))


def _check_norm(x):
    with torch.enable_grad():
        y = qk.rms_norm(x["x"], x["w"], EPS)
        gx, gw = torch.autograd.grad(y, (x["x"], x["w"]), x["g"])
    return y, gx, gw


def _check_add(x):
    with torch.enable_grad():
        y, z = qk.add_rms_norm(x["x"], x["r"], x["gemma_w"], EPS, weight_offset=1.0)
        grads = torch.autograd.grad((y, z), (x["x"], x["r"], x["gemma_w"]), (x["g"], x["g_res"]))
    return (y, z, *grads)


def _check_inplace(x):
    a, b = x["x"].detach().clone(), x["r"].detach().clone()
    qk.add_rms_norm_(a, b, x["w"].detach(), EPS)
    return a, b


def _check_refresh(x):
    with torch.no_grad():
        x["x"].copy_(torch.randn_like(x["x"], dtype=torch.float32))
        x["r"].copy_(4 * torch.randn_like(x["r"], dtype=torch.float32))


CHECKS = {
    "rms_norm fwd+bwd": Check("rms_norm", _check_make, _check_norm, "rel", _check_refresh),
    "add_rms_norm fwd+bwd (Gemma offset)": Check("add_rms_norm", _check_make, _check_add, "rel", _check_refresh),
    "add_rms_norm_ (in place)": Check("add_rms_norm_", _check_make, _check_inplace, "rel", _check_refresh),
}


def _norm_calls(g):
    """Every kernel configuration: row tiles of several short rows (H 40), one row in registers (4096),
    two passes over column blocks (20000); with and without the residual add, both roundings, the
    backward with and without a residual gradient, the in-place variant; each float dtype."""
    for dtype, widths in ((torch.bfloat16, (40, 4096, 20000)), (torch.float32, (40, 4096, 20000)),
                          (torch.float16, (4096,))):
        for h in widths:
            x = torch.randn(3, h, generator=g).to(dtype).requires_grad_()
            r = torch.randn(3, h, generator=g).to(dtype).requires_grad_()
            for offset in (0.0, 1.0):
                w = torch.randn(h, generator=g).to(dtype).requires_grad_()
                qk.rms_norm(x, w, EPS, weight_offset=offset).float().sum().backward()
                y, z = qk.add_rms_norm(x, r, w, EPS, weight_offset=offset)
                (y.float().sum() + z.float().sum()).backward()
                qk.add_rms_norm_(x.detach().clone(), r.detach().clone(), w.detach(), EPS, offset)


TRITON_EXAMPLES = {name: _norm_calls for name in OPS}
