"""Run the benchmarks and print one markdown table per op; write every raw number to JSON.

    python bench/run.py                      # all ops, on the GPU if there is one
    python bench/run.py --op rope --json bench/results/h100-rope.json
    python bench/run.py --smoke              # tiny shapes (CPU-friendly): checks the harness runs

Columns: median time (CUDA events, after warm-up), GB/s, % of the measured device copy bandwidth,
TFLOP/s where the op is a GEMM, and speedup vs the reference, torch.compile(reference) and, for
fp8_block_gemm, torch._scaled_mm (row-wise scales) and bf16 cuBLAS.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fp8  # noqa: E402
import bench_logprobs  # noqa: E402
import bench_rope  # noqa: E402
from common import copy_bandwidth_gbs, environment, markdown_table, time_ms, write_json  # noqa: E402

OPS = {"rope": bench_rope, "logprobs": bench_logprobs, "fp8": bench_fp8}

COLUMNS = [("case", "case", ""), ("shape", "shape", ""), ("provider", "provider", ""),
           ("median_ms", "median ms", ".4f"), ("gbs", "GB/s", ".1f"), ("pct_of_copy", "% of copy BW", ".1f"),
           ("tflops", "TFLOP/s", ".1f"), ("peak_extra_mib", "peak extra MiB", ".0f"),
           ("peak_vs_full_logits", "peak / full logits", ".3f"),
           ("vs_reference", "x reference", ".2f"), ("vs_compiled", "x compile(ref)", ".2f"),
           ("vs_scaled_mm", "x _scaled_mm", ".2f"), ("vs_cublas_bf16", "x cuBLAS bf16", ".2f"),
           ("skipped", "skipped", "")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=sorted(OPS), help="op family (repeatable); default all")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no torch.compile: checks the harness")
    p.add_argument("--json", default=None, help="where to write the raw results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    timer = functools.partial(time_ms, device=device, **({"warmup": 2, "rep": 20} if a.smoke else {}))
    ceiling = copy_bandwidth_gbs(device)
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"copy bandwidth (measured): {ceiling:.1f} GB/s\n")
    results = {"environment": env, "copy_bandwidth_gbs": ceiling,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "ops": {}}
    for op in a.op or sorted(OPS):
        rows = OPS[op].run(device, smoke=a.smoke, time_ms=lambda fn: timer(fn), ceiling_gbs=ceiling)
        results["ops"][op] = rows
        print(f"## {op}\n")
        print(markdown_table(rows, COLUMNS))
        print()
    if a.json:
        write_json(a.json, results)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
