"""Every Triton kernel, launched the way the ops launch it, compiles for the GPUs the package targets
and fits their shared memory, checked on any machine, GPU or not.

The interpreter that runs the Triton kernels in the CPU tests accepts code the GPU compiler rejects
(module globals that are not constexpr, casts and ops a backend lacks, tiles that overflow shared
memory), so passing CPU tests alone says nothing about a GPU. This test records the launches of real
op calls under the interpreter (without running them), then compiles each distinct specialisation
ahead of time in a subprocess without the interpreter: Triton -> PTX -> cubin with ptxas, for
sm_80, sm_89 and sm_90. It needs no GPU and no driver.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

tl = pytest.importorskip("triton.language")

import quickllm_kernels as qk

pytestmark = pytest.mark.triton

# Per-block opt-in shared memory, bytes (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Kernels that need FP8 tensor cores or conversions: the ops refuse them below sm_89.
FP8_ONLY = {"_gemm_kernel", "_fp8_grouped_kernel"}

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")




def _examples() -> dict:
    """Op -> calls that between them take its Triton kernels through every configuration the op
    chooses: each family's TRITON_EXAMPLES (bench/bench_<family>.py)."""
    from common import bench_modules

    return {op: calls for module in bench_modules().values() for op, calls in module.TRITON_EXAMPLES.items()}


EXAMPLES = _examples()


def test_every_triton_op_has_examples():
    from quickllm_kernels._op import OPS

    assert {name for name, op in OPS.items() if op.triton is not None} == set(EXAMPLES)


def _op_calls():
    g = torch.Generator().manual_seed(0)
    for calls in dict.fromkeys(EXAMPLES.values()):  # each once, in declaration order
        calls(g)


def _record_launches():
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        spec = {"module": fn.__module__, "name": fn.__name__, "args": {}, "options": options}
        constexpr = _constexpr_names(fn)
        for name in names:
            value = bound.get(name)  # None arguments are constexpr None to Triton
            if name == "INTERPRETED":  # a kernel's interpreter-only workaround: never on a GPU
                spec["args"][name] = ["value", False]
            elif value is None or name in constexpr:
                spec["args"][name] = ["value", value]
            elif type(value) is int and value == 1:  # the JIT specialises ints equal to 1 as constexprs
                spec["args"][name] = ["value", 1]
            else:  # the JIT's divisibility-by-16 hints, which decide vector widths and pipelining
                if isinstance(value, torch.Tensor):
                    aligned = value.data_ptr() % 16 == 0
                else:
                    aligned = type(value) is int and value % 16 == 0
                spec["args"][name] = ["type", _arg_type(value), aligned]
        launches[json.dumps(spec, sort_keys=True)] = spec  # run nothing: outputs stay as allocated

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpretedFunction, "run", record)
        with qk.use_backend("triton"):
            _op_calls()
    return list(launches.values())


def _constexpr_names(fn):
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.annotation is tl.constexpr or p.annotation == "tl.constexpr"}


_COMPILE = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

specs, archs, fp8_only, result_path = json.loads(sys.stdin.read())
out = []
for spec in specs:
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, (kind, value, *aligned)) in enumerate(spec["args"].items()):
        if kind == "value":
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = value
            if aligned[0]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for cc in archs:
        if cc < 89 and spec["name"] in fp8_only:
            continue
        row = {"kernel": spec["name"], "cc": cc, "constexprs": constexprs, "options": spec["options"]}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", cc, 32), options=spec["options"])
            row["shared"] = k.metadata.shared
            row["cubin_bytes"] = len(k.asm["cubin"])
            ptx = k.asm["ptx"]
            row["mma"] = sorted({line.split()[0] for line in ptx.splitlines()
                                 if line.strip().startswith(("mma.", "wgmma.mma_async"))})
            # FP8 wgmma: (scale-d operand, accumulator registers); scale-d 0 means D = A*B, a fresh sum
            row["wgmma_fp8"] = [(m.group(2).strip(), len(m.group(1).split(","))) for m in re.finditer(
                r"wgmma\.mma_async\S*e4m3\S*\s*\{([^}]*)\},\s*[^,]+,\s*[^,]+,\s*([^,]+),", ptx)]
            row["add_f32"] = len(re.findall(r"^\s*add(?:\.rn)?\.f32\s", ptx, re.M))
            row["fma_f32"] = len(re.findall(r"^\s*fma\.rn\.f32\s", ptx, re.M))
        except Exception as e:  # reported by the test, with the kernel and its specialisation
            row["error"] = f"{type(e).__name__}: {e}"[-3000:]
        out.append(row)
with open(result_path, "w") as f:
    json.dump(out, f)
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="on a GPU the kernels are compiled by the tests that run them")
def test_every_triton_kernel_compiles_for_sm80_sm89_sm90(tmp_path):
    specs = _record_launches()
    kernels = {s["name"] for s in specs}
    assert {"_rope_kernel", "_fwd_kernel", "_bwd_kernel", "_dequant_kernel", "_act_quant_kernel",
            "_gemm_kernel"} <= kernels, kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, "-c", _COMPILE],
                          input=json.dumps([specs, sorted(SMEM_LIMIT), sorted(FP8_ONLY), str(result)]),
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(result.read_text())
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n\n".join(f"{r['kernel']} sm_{r['cc']} {r['constexprs']} {r['options']}:\n{r['error']}"
                                   for r in errors)
    over = [r for r in rows if r["shared"] > SMEM_LIMIT[r["cc"]]]
    assert not over, [(r["kernel"], r["cc"], r["constexprs"], r["options"], r["shared"]) for r in over]
    assert all(r["cubin_bytes"] > 0 for r in rows)
    # fp8_block_gemm runs on FP8 tensor cores: mma.sync e4m3 on sm_89, wgmma e4m3 on sm_90 for the
    # 64+ row tiles (the reason the auto order puts Triton first on Hopper). 16-row decode tiles on
    # sm_90 convert to f16 MMAs, which is fine for a memory-bound shape.
    for r in rows:
        if r["kernel"] == "_gemm_kernel" and (r["cc"] == 89 or r["constexprs"]["BM"] >= 64):
            want = "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" if r["cc"] == 89 else "wgmma.mma_async"
            assert any(m.startswith(want) and "e4m3" in m for m in r["mma"]), (r["cc"], r["constexprs"], r["mma"])
    # On sm_90 the FP8 tensor cores sum at most one K block (BK products, 128) before float32 takes
    # over: the first wgmma (k32) of each block starts from zero (scale-d 0, not a predicate chaining it
    # onto the previous result) and at most BK/32 chain, so no tensor-core sum runs across blocks.
    for r in rows:
        if r["kernel"] == "_gemm_kernel" and r["cc"] == 90 and r["constexprs"]["BM"] >= 64:
            w, per_block = r["wgmma_fp8"], r["constexprs"]["BK"] // 32
            starts = [i for i, (scale_d, _) in enumerate(w) if scale_d == "0"]
            assert starts and starts[0] == 0, (r["constexprs"], w)
            chains = [b - a for a, b in zip(starts, starts[1:] + [len(w)])]
            assert max(chains) <= per_block, (r["constexprs"], w)
            # ... and each accumulator register of a block's sum is scaled into float32 once per block
            assert r["add_f32"] + r["fma_f32"] >= w[0][1], (r["constexprs"], r["add_f32"], r["fma_f32"])
