"""Smoke pass: every op on every backend that can run here, against the reference, on fresh data.
The cases are each family's CHECKS (bench/bench_<family>.py, common.Check).

    python bench/smoke.py [--json out.json] [--small] [--backend cuda] [--no-graphs]

Each case runs an op with one kernel backend (cuda, triton) forced and compares with the reference
backend on the same inputs (relative error ||got - want|| / ||want|| in float64, or exact bits where the op promises
them). On a GPU the caching allocator is first filled with NaN (so an output element a kernel forgets
to write shows up as NaN, not as a stale plausible value), and each case is then captured in a CUDA
graph and replayed on new input values, which must give the reference's answer for those values.
On the CPU the Triton kernels run under TRITON_INTERPRET=1 at small shapes. Exit code 1 if any case
fails. `--small` uses shapes small enough for compute-sanitizer.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import quickllm_kernels as qk  # noqa: E402
from quickllm_kernels._op import OPS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_modules, poison_allocator, rel_err, write_json  # noqa: E402

# Relative error ||got - want|| / ||want|| allowed per output dtype. Kernels compute in float32 and
# round once to the output dtype: the RMS of that rounding is about 2^-9 relative for bfloat16 (twice
# that under the Triton interpreter, which truncates), so these bounds sit a few times above it and
# far below what a wrong index, mask or position does to even one row.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _cases() -> dict:
    """Every family's CHECKS (bench/bench_<family>.py), in declaration order."""
    out = {}
    for module in bench_modules().values():
        for name, case in module.CHECKS.items():
            if name in out:
                raise ValueError(f"smoke case {name!r} is declared twice")
            out[name] = case
    return out


CASES = _cases()


def _compare(got, want, how, device):
    """(ok, worst error, its tolerance): exact bits, or each output within its dtype's REL_TOL."""
    if how == "exact-gpu":  # the Triton interpreter truncates float32 -> bfloat16 where GPUs round
        how = "exact" if device.type == "cuda" else "rel"
    if len(got) != len(want):
        return False, math.inf, 0.0
    worst = (0.0, 0.0, 0.0)  # (error / tolerance, error, tolerance)
    for g, w in zip(got, want):
        if how == "exact":
            same = torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0)) if g.is_floating_point() and \
                g.dtype != torch.float8_e4m3fn else torch.equal(g, w)
            err, tol = (0.0 if same else math.inf), 0.0
        else:
            err, tol = rel_err(g, w), REL_TOL.get(g.dtype, 1e-5)
        err = math.inf if math.isnan(err) else err
        ratio = 0.0 if err == 0 else (math.inf if tol == 0 else err / tol)
        if ratio >= worst[0]:
            worst = (ratio, err, tol)
    return worst[0] <= 1.0, worst[1], worst[2]


def _graph_check(run, x, refresh, name, dev):
    """Capture `run` in a CUDA graph, replay it on new input values, compare with the reference.

    The warm-up and the capture run on one side stream, and the leaves that need gradients are made
    afresh there: autograd creates a leaf's AccumulateGrad node on the stream current at its first
    use, and a node left on the default stream by the eager calls makes the captured backward wait
    on the legacy stream, which invalidates the capture (the recipe any user of graphs with
    backward follows)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for key, v in list(x.items()):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                x[key] = v.detach().clone().requires_grad_()
        with qk.use_backend(name):
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its algorithms, outside capture
                run(x)
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side), qk.use_backend(name):
        static_out = run(x)
    refresh(x)
    graph.replay()
    torch.cuda.synchronize(dev)
    with qk.use_backend("reference"):
        want = run(x)
    return [o.clone() for o in static_out], want


def _device_broken(device) -> str | None:
    """After an exception: whether the CUDA context still works (an illegal address poisons it)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        return None
    except Exception as e:  # torch.AcceleratorError or RuntimeError, by version
        return f"{type(e).__name__}: {e}"[:300]


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_cases(device: torch.device, *, small: bool, backends, graphs: bool, log=print, json_path=None,
              start: int = 0) -> tuple[list[dict], int | None]:
    """Every case on every backend from the `start`-th on; rows are written to json_path as they
    finish. Returns (rows, where to go on): a failed capture or a broken CUDA context leaves this
    process's CUDA state untrustworthy (the RNG still thinks it is capturing, say), so the pass stops
    and tells the caller from which case a fresh process must go on (None when all ran)."""
    rows = []
    pairs = [(case, name) for case in CASES for name in backends]
    for i in range(start, len(pairs)):
        case, name = pairs[i]
        op, make, run, how, refresh = CASES[case]
        row = dict(case=case, backend=name, device=str(device))
        torch.manual_seed(i + 1)
        poisoned = None
        try:
            x = make(device, small)
            why = OPS[op].unavailable(name, device)
            if why:
                row.update(status="skipped", why=why)
                rows.append(row)
                log(f"skip  {case:32s} {name:9s} {why[:90]}")
                continue
            with qk.use_backend("reference"):
                want = run(x)
            if device.type == "cuda":
                poison_allocator(*(w.numel() * w.element_size() for w in want), device=device)
            t0 = time.perf_counter()
            with qk.use_backend(name):
                got = run(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["ms_first_call"] = (time.perf_counter() - t0) * 1e3
            ok, err, tol = _compare(got, want, how, device)
            row.update(status="ok" if ok else "FAIL", compare=how, error=err, tol=tol)
            if ok and graphs and device.type == "cuda":
                try:
                    g_got, g_want = _graph_check(run, x, refresh, name, device)
                except Exception as e:
                    poisoned = f"graph capture failed: {type(e).__name__}"
                    row["graph"] = "FAIL"
                    raise
                g_ok, g_err, _ = _compare(g_got, g_want, how, device)
                row.update(graph="ok" if g_ok else "FAIL", graph_error=g_err)
                if not g_ok:
                    row["status"] = "FAIL"
        except Exception as e:  # a crash is a result of the smoke pass, not the end of it
            row.update(status="FAIL", error_text=f"{type(e).__name__}: {e}"[:1500],
                       traceback=traceback.format_exc()[-3000:])
            broken = _device_broken(device)
            if broken:  # every later row would fail here, not where the fault is
                row["device_broken"] = poisoned = broken
        rows.append(row)
        if json_path:
            write_json(json_path, rows)
        log(f"{row['status']:5s} {case:32s} {name:9s} err={_fmt(row.get('error', '-')):9s} "
            f"tol={_fmt(row.get('tol', '-')):7s} graph={row.get('graph', '-')} {row.get('error_text', '')[:160]}")
        if poisoned and i + 1 < len(pairs):
            log(f"      {poisoned}: going on in a fresh process")
            return rows, i + 1
    return rows, None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--small", action="store_true", help="tiny shapes (always on the CPU; for the sanitizer)")
    p.add_argument("--backend", action="append", choices=("cuda", "triton"), help="repeatable; default both")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph capture and replay")
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)  # where a fresh process goes on
    p.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, go_on = run_cases(dev, small=a.small or dev.type == "cpu", backends=a.backend or ("cuda", "triton"),
                            graphs=not a.no_graphs, json_path=a.json, start=a.start)
    if go_on is not None:
        rows += _continue_in_child(argv, go_on)
        if a.json:
            write_json(a.json, rows)
    if not a.no_summary:
        failed = [r for r in rows if r["status"] == "FAIL"]
        print(f"smoke: {sum(r['status'] == 'ok' for r in rows)} ok, {len(failed)} failed, "
              f"{sum(r['status'] == 'skipped' for r in rows)} skipped")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def _continue_in_child(argv, start: int) -> list[dict]:
    """The rest of the pass in a fresh process (a clean CUDA context), its rows read back."""
    import json
    import subprocess
    import tempfile
    keep, skip = [], False
    for arg in argv:  # drop this process's --json/--start: the child reports to its own file
        if skip:
            skip = False
        elif arg in ("--json", "--start"):
            skip = True
        elif not arg.startswith(("--json=", "--start=", "--no-summary")):
            keep.append(arg)
    with tempfile.TemporaryDirectory(prefix="quickllm-smoke-") as tmp:
        out = os.path.join(tmp, "rows.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *keep, "--start", str(start), "--json", out,
                        "--no-summary"], check=False)
        if not os.path.exists(out):
            return [dict(case="(rest of the pass)", backend="-", status="FAIL",
                         error_text=f"the fresh process from case {start} on wrote no rows")]
        return json.loads(open(out).read())


if __name__ == "__main__":
    sys.exit(main())
