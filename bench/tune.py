"""Tune the Triton FP8 block GEMM's tiles on this GPU and write its table (quickllm_kernels.tuning).

    python bench/tune.py --out tuned/ [--m 16 64 4096] [--shape 7168x18432] [--deadline 500]
    python bench/tune.py --smoke --device cpu --out /tmp/tuned    # checks the tuner (interpreter)

For each weight shape (N, K) and M bucket, every candidate tile is first checked against the reference
on the same inputs (a wrong or failing candidate is skipped and said), then timed: replays of a CUDA
graph of one call (device time, no launch overhead), CUDA events, L2 read-flushed, the median. The
fastest goes into OUT/<device>.json under its key, merged with what the file had and written
atomically after each shape, so a run cut short keeps what it finished. Use it
with QUICKLLM_TUNED_CONFIGS=OUT, or commit it to quickllm_kernels/configs/ for everyone with that GPU.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from quickllm_kernels import tuning  # noqa: E402
from quickllm_kernels.fp8 import reference as ref  # noqa: E402
from quickllm_kernels.fp8 import triton as tri  # noqa: E402
from quickllm_kernels.timing import measure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rel_err  # noqa: E402

# DeepSeek-V3 weights (N, K): q_b_proj, o_proj, dense up and down, an expert's up projection
SHAPES = [(24576, 1536), (7168, 16384), (18432, 7168), (7168, 18432), (2048, 7168)]
M_BUCKETS = [16, 64, 256, 1024, 4096]


def candidates(m: int, smoke: bool):
    """Tiles worth trying at this M: row tiles no taller than M needs, column tiles 64-256 wide."""
    if smoke:
        return [dict(BM=16, BN=64, num_warps=4, num_stages=2), dict(BM=32, BN=64, num_warps=4, num_stages=2)]
    bms = [16] if m <= 16 else [32, 64] if m <= 64 else [64, 128]
    return [dict(BM=bm, BN=bn, num_warps=w, num_stages=s)
            for bm, bn, w, s in itertools.product(bms, (64, 128, 256), (4, 8), (3, 4, 5))
            if bm * bn <= 128 * 256 and not (bm <= 32 and w == 8)]


def tune_shape(m, n, k, device, smoke, log):
    g = torch.Generator().manual_seed(m * 31 + n)
    a, sa = ref.act_quant(torch.randn(m, k, generator=g).to(device), 128)
    b, sb = ref.weight_quant(torch.randn(n, k, generator=g).to(device))
    want = ref.fp8_block_gemm(a, sa, b, sb, torch.bfloat16)
    timing = dict(warmup_ms=1, rep_ms=5, min_reps=2, max_reps=3) if smoke else dict(warmup_ms=10, rep_ms=50)
    best = None
    for cfg in candidates(m, smoke):
        try:
            err = rel_err(tri.fp8_block_gemm(a, sa, b, sb, torch.bfloat16, config=cfg), want)
        except Exception as e:  # out of shared memory, too many registers: not a candidate here
            log(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if not err <= 1.6e-2:
            log(f"  skip {cfg}: wrong (rel err {err:.2e})")
            continue
        # device time of the kernel alone (CUDA-graph replays): eager timing at decode sizes would rank
        # the candidates by the launch's host time, which is the same for every tile
        t = measure(lambda: tri.fp8_block_gemm(a, sa, b, sb, torch.bfloat16, config=cfg), device,
                    cuda_graph=device.type == "cuda", **timing)
        log(f"  {cfg}: {t.median_ms:.4f} ms")
        if best is None or t.median_ms < best["ms"]:
            best = {**cfg, "ms": t.median_ms, "rel_err": err}
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the table (QUICKLLM_TUNED_CONFIGS)")
    p.add_argument("--m", type=int, nargs="*", default=None, help="M buckets (default 16 64 256 1024 4096)")
    p.add_argument("--shape", nargs="*", default=None, help="NxK weight shapes (default DeepSeek-V3's)")
    p.add_argument("--deadline", type=float, default=None, help="start no shape after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two candidates (CPU: interpreter)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = Path(a.out) / f"{tuning.device_slug(name)}.json"
    shapes = ([(144, 256)] if a.smoke else
              [tuple(int(v) for v in s.lower().split("x")) for s in a.shape] if a.shape else SHAPES)
    ms = [33] if a.smoke else (a.m or M_BUCKETS)
    for (n, k), m in itertools.product(shapes, ms):
        if a.deadline is not None and time.monotonic() - t0 > a.deadline:
            print(f"deadline reached: stopped before M={m} N={n} K={k}")
            break
        print(f"M={m} N={n} K={k}", flush=True)
        best = tune_shape(m, n, k, device, a.smoke, print)
        if best is None:
            print("  no candidate ran")
            continue
        key = tri.gemm_keys(m, n, k)[0]
        tuning.write_table(path, device, {"fp8_block_gemm": {key: best}})
        print(f"  best {best} -> {path} [{key}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
