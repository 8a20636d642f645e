"""Timing of device work, used by the demo and by bench/.

measure(fn, device) -> Timing(min_ms, median_ms, max_ms, mean_ms, reps, method): one entry per call.

  "cuda-events"  after warm-up, each call is timed on the GPU between two CUDA events. Before each
                 call (outside its events) the L2 cache is flushed by READING a buffer of twice its
                 size, so the call starts with a cold L2 that holds no dirty lines: a flush that
                 writes (triton's do_bench zeroes a buffer) leaves write-backs for the timed kernel
                 to pay. The host is not synchronised between calls, so host overhead shows only
                 where it is longer than the GPU work it launches (small, many-kernel calls).
  "cuda-graph"   fn is captured once in a CUDA graph (after warm-up on a side stream) and each
                 replay is timed as above: the device time of its kernels without host launch
                 overhead, what a serving engine's graphed decode step pays.
  "wall"         CPU tensors: time.perf_counter() around each call, after one warm-up call.

time_ms(fn, device, warmup=25, rep=100) is the median alone (warmup/rep: milliseconds of warm-up
and of timed calls, as before).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

__all__ = ["Timing", "measure", "time_ms", "flush_l2", "l2_flush_bytes"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call over `reps` timed calls; method: "cuda-events", "cuda-graph" or "wall"."""
    min_ms: float
    median_ms: float
    max_ms: float
    mean_ms: float
    reps: int
    method: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _summary(times: list[float], method: str) -> Timing:
    return Timing(min(times), statistics.median(times), max(times), statistics.fmean(times), len(times), method)


def _clamp(x: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, round(x))))


def l2_flush_bytes(device: torch.device) -> int:
    """Bytes read by flush_l2: twice the GPU's L2 (at least 64 MiB; 256 MiB when the size is unknown)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (128 << 20)
    return max(2 * l2, 64 << 20)


_FLUSH: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache with reads only: a sum of a zero buffer twice the L2 size into a scalar."""
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _FLUSH:
        buf = torch.zeros(l2_flush_bytes(device) // 4, dtype=torch.float32, device=device)
        _FLUSH[key] = (buf, torch.zeros((), dtype=torch.float32, device=device))
    buf, out = _FLUSH[key]
    torch.sum(buf, dim=0, out=out)


def _events(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush, method) -> Timing:
    before = (lambda: flush_l2(device)) if flush else (lambda: None)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n_est = 1
    while True:  # estimate one flushed call; a few calls when it is short
        start.record()
        for _ in range(n_est):
            before()
            fn()
        end.record()
        end.synchronize()
        est = start.elapsed_time(end) / n_est
        if est * n_est > 1.0 or n_est >= 16:
            break
        n_est *= 4
    est = max(est, 1e-3)
    for _ in range(_clamp(warmup_ms / est, 0, max_reps)):  # the calls above already warmed a slow fn up
        before()
        fn()
    n = _clamp(rep_ms / est, min_reps, max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        before()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)], method)


def _graph(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush) -> Timing:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (lazy init, autotuning, workspaces)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    try:
        return _events(graph.replay, device, warmup_ms, rep_ms, min_reps, max_reps, flush, "cuda-graph")
    finally:
        del graph  # frees its private memory pool


def _wall(fn, rep_ms, min_reps, max_reps) -> Timing:
    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    times = []
    for _ in range(_clamp(rep_ms / est, min_reps, max_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, "wall")


def measure(fn, device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5,
            max_reps: int = 1000, flush: bool = True, cuda_graph: bool = False) -> Timing:
    """Time fn() (no arguments) on `device`.

    warmup_ms, rep_ms: the time spent in warm-up and in timed calls, from an estimate of one call;
    at least min_reps and at most max_reps timed calls. flush: read-flush the L2 before each call
    (GPU). cuda_graph: time replays of one captured call (GPU; capture errors propagate).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _wall(fn, rep_ms, min_reps, max_reps)
    if cuda_graph:
        return _graph(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush)
    return _events(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush, "cuda-events")


def time_ms(fn, device: torch.device, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of one call of fn(): `warmup` ms of warm-up, about `rep` ms of timed calls
    (at least 3)."""
    return measure(fn, device, warmup_ms=warmup, rep_ms=rep, min_reps=3).median_ms
