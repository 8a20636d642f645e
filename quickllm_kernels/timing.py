"""Timing of device work: median of many runs after warm-up, with CUDA events on a GPU
(triton.testing.do_bench when triton is present, which also flushes L2 between runs) and the
wall clock on the CPU. Used by the demo and by bench/."""
from __future__ import annotations

import statistics
import time

import torch


def time_ms(fn, device: torch.device, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of one call of fn().

    On a GPU, warmup and rep are milliseconds of warm-up and of timed calls (do_bench's meaning;
    without triton, counts of calls timed with CUDA events). On the CPU, max(3, rep // 10) calls.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _events_ms(fn, warmup=warmup, rep=rep)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, rep // 10)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _events_ms(fn, *, warmup, rep):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
