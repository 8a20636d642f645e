"""Run the benchmarks: one markdown table per op family on stdout, a progress line per row on stderr,
and every raw number in a JSON file rewritten (atomically) after each row.

    python bench/run.py --json bench/results/h100-2025-01-01.json      # everything, on the GPU if there is one
    python bench/run.py --op fp8 --case M1 --case M16 --deadline 500   # a subset, cut short at 500 s
    python bench/run.py --smoke --device cpu --json /tmp/smoke.json    # tiny shapes: checks the harness

Every provider's output is first checked against the reference on the same inputs (rel_err; a wrong
one is flagged and not timed), then timed: min / median / max of CUDA-event times with the L2
read-flushed before each call, plus CUDA-graph replays at decode shapes. Each row gives GB/s against
a copy of as many bytes and, for GEMMs, TFLOP/s against torch's FP8 / bf16 GEMM at the same shape
(% of ceiling: the longer of the two bounds, as a share of the measured time), and speedups against
the reference, torch.compile(reference) and the peers. Field by field: bench/results/README.md.

--deadline: no case or provider starts after that many seconds; the JSON then says cut_short. On the
CPU with --smoke, the Triton kernels run under TRITON_INTERPRET=1 (slow, but checked).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

_T0 = time.monotonic()  # --deadline counts from the start of the process (imports and builds included)

import torch  # noqa: E402

COLUMNS = [("case", "case", ""), ("shape", "shape", ""), ("provider", "provider", ""),
           ("median_ms", "median ms", ".4f"), ("min_ms", "min ms", ".4f"), ("max_ms", "max ms", ".4f"),
           ("graph_median_ms", "graph ms", ".4f"), ("gbs", "GB/s", ".1f"), ("pct_of_copy", "% copy", ".1f"),
           ("tflops", "TFLOP/s", ".1f"), ("pct_of_gemm", "% GEMM", ".1f"), ("pct_of_ceiling", "% ceiling", ".1f"),
           ("rel_err", "rel err", ".1e"), ("peak_extra_mib", "peak extra MiB", ".0f"),
           ("peak_vs_full_logits", "peak / full logits", ".3f"),
           ("vs_reference", "x reference", ".2f"), ("vs_compiled", "x compile", ".2f"),
           ("vs_torch_blockwise", "x torch blockwise", ".2f"), ("vs_scaled_mm", "x _scaled_mm", ".2f"),
           ("vs_cublas_bf16", "x cuBLAS bf16", ".2f"), ("vs_flashinfer", "x FlashInfer", ".2f"),
           ("vs_flashmla", "x FlashMLA", ".2f"), ("vs_expanded", "x expanded", ".2f"), ("vs_liger", "x Liger", ".2f"), ("note", "skipped / wrong", "")]


class Interrupted(BaseException):  # not an Exception: a provider's error handler must not swallow it
    pass


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", metavar="FAMILY", help="op family: rope, logprobs, fp8, ... (repeatable)")
    p.add_argument("--case", action="append", default=[], metavar="SUBSTR",
                   help="only cases whose name contains SUBSTR (repeatable)")
    p.add_argument("--provider", action="append", default=[], metavar="SUBSTR",
                   help="only time providers whose name contains SUBSTR (repeatable; others are skipped rows)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no torch.compile: checks the harness")
    p.add_argument("--json", default=None, help="where to write the raw results (rewritten after every row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="start no case or provider after SECONDS; the JSON says where it stopped")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA-graph timing at decode shapes")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up per timing (default 25; smoke 1)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed calls per timing, in ms (default 100; smoke 10)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu" and a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import Bench, DeviceBroken, bench_modules, markdown_table

    families = bench_modules()
    unknown = set(a.op or ()) - set(families)
    if unknown:
        p.error(f"--op: no op family {sorted(unknown)}; families: {', '.join(families)}")
    timing = dict(warmup_ms=1.0, rep_ms=10.0, min_reps=3, max_reps=20) if a.smoke else {}
    timing.update({k: v for k, v in (("warmup_ms", a.warmup_ms), ("rep_ms", a.rep_ms)) if v is not None})
    bench = Bench(device, json_path=a.json, smoke=a.smoke, deadline_s=a.deadline, graphs=not a.no_graphs,
                  compile=not (a.smoke or a.no_compile), timing=timing, providers=a.provider,
                  argv=[Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv), t0=_T0)
    env = bench.results["environment"]
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}\n",
          flush=True)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    cut, rc = None, 0
    try:
        for family in a.op or list(families):
            if bench.expired():
                cut = f"deadline of {a.deadline:g} s reached before {family}"
                break
            for case in families[family].cases(device, smoke=a.smoke):
                if a.case and not any(s in case.name for s in a.case):
                    continue
                cut = bench.run_case(family, case)
                if cut:
                    break
            _print_table(family, bench.results["ops"].get(family, []), markdown_table)
            if cut:
                break
    except Interrupted as e:
        cut, rc = f"interrupted by {e}", 130
    except DeviceBroken as e:
        cut, rc = f"CUDA error, rows after it would be invalid: {e}", 1
    except Exception as e:
        cut = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        bench.finish(cut)
    if cut:
        print(f"cut short: {cut}")
    if a.json:
        print(f"wrote {a.json}")
    return rc


def _print_table(family, rows, markdown_table):
    if rows:
        notes = [dict(r, note=r.get("skipped") or (f"WRONG: {r['wrong']}" if "wrong" in r else None)) for r in rows]
        print(f"## {family}\n\n{markdown_table(notes, COLUMNS)}\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
