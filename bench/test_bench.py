"""pytest-benchmark runs of every op family x provider (the cases and providers of bench/run.py).

    python -m pytest bench                                        # GPU: real shapes; CPU: smoke shapes
    python -m pytest bench -k "fp8_block_gemm and M16" --benchmark-save=h100
    python -m pytest bench --benchmark-compare                    # against the last saved run
    python -m pytest bench --benchmark-compare=0001 --benchmark-group-by=group
    QUICKLLM_BENCH_SMOKE=1 python -m pytest bench                 # smoke shapes on a GPU too

Not part of `python -m pytest tests`. Each test first checks the provider's output against the
reference (rel_err within the case's tol; a peer that rejects the call is skipped, one of ours fails),
then times rounds of fn() followed by torch.cuda.synchronize(); before each round, outside the timing,
the L2 is read-flushed (pedantic setup). Tests are grouped per case, so a comparison lines up the
providers of one shape. torch.compile rows run on the GPU only (inductor is slow to compile on a CPU).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from common import CompileFailed, bench_modules, rel_err
from quickllm_kernels.backend import BackendUnavailable
from quickllm_kernels.timing import flush_l2

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
SMOKE = not CUDA or os.environ.get("QUICKLLM_BENCH_SMOKE") == "1"
CASES = [c for mod in bench_modules().values() for c in mod.cases(DEVICE, smoke=SMOKE)]
PARAMS = [pytest.param(c, p, id=f"{c.op}-{c.name}-{p}") for c in CASES for p in c.providers]


@pytest.mark.parametrize("case, provider", PARAMS)
def test_bench(benchmark, case, provider):
    make = case.providers[provider]
    if isinstance(make, str):
        pytest.skip(make)
    if provider.startswith("torch.compile") and not CUDA:
        pytest.skip("torch.compile rows run on the GPU only")
    args = case.inputs()
    want = case.expected(*(case.inputs() if case.mutates else args))
    ours = provider.startswith("quickllm") or provider == "reference"
    try:
        fn = make(*args)
        err = rel_err(fn(), want)
    except (BackendUnavailable, CompileFailed) as e:
        pytest.skip(f"{type(e).__name__}: {e}")
    except Exception as e:  # a peer that rejects this shape or device
        if ours:
            raise
        pytest.skip(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    del want
    tol = case.tols.get(provider, case.tol)
    assert err <= tol, f"{provider}: rel_err {err:.3g} > tol {tol:g} against the reference"

    def setup():
        if CUDA:
            flush_l2(DEVICE)
            torch.cuda.synchronize()

    def timed():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    setup()
    t0 = time.perf_counter()
    timed()
    once = time.perf_counter() - t0
    benchmark.group = f"{case.op} {case.name} ({case.shape})"
    benchmark.extra_info.update(rel_err=err, bytes=case.nbytes, flops=case.flops)
    rounds = max(3, min(50, int(1.0 / max(once, 1e-6)))) if CUDA else 3
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=2 if CUDA else 0)
