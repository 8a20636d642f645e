"""What the benchmarks share: the Case a bench module describes, the Bench runner that checks, times
and records every provider of a case, the ceilings, the environment facts and the output files.

A row (one provider of one case) holds:
  status       "ok", "skipped" (with `skipped`: why) or "wrong" (with `wrong`: rel_err over tol;
               a wrong provider is not timed, so no fast wrong number can be quoted)
  rel_err      max over the outputs of ||out - expected|| / ||expected|| against the reference on
               the same inputs (the first call, before any timing); tol: the bound it must meet
  min_ms, median_ms, max_ms, mean_ms, reps, timer
               per-call times (quickllm_kernels.timing: CUDA events, L2 read-flushed before each
               call; "wall" on the CPU); graph_*: the same for CUDA-graph replays (decode shapes)
  bytes, gbs   bytes one call must move and bytes / median time
  copy_gbs, pct_of_copy
               a device copy moving the same number of bytes (measured in this run) and gbs as a
               percentage of it
  flops, tflops, gemm_ceiling, gemm_ceiling_tflops, pct_of_gemm
               for matmul-shaped ops: FLOPs per call, FLOP rate, the library GEMM whose rate is
               the ceiling at the same shape, and the percentage of it
  ceiling_ms, pct_of_ceiling
               roofline: the longer of bytes / copy_gbs and flops / gemm ceiling, and that time as
               a percentage of median_ms (100 = as fast as the copy / library GEMM would allow)
  vs_*         speedup: the baseline provider's median / this row's median
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Callable

import torch

from quickllm_kernels.timing import l2_flush_bytes, measure

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"vs_reference": "reference", "vs_compiled": "torch.compile(reference)"}


@dataclasses.dataclass
class Case:
    """One workload of one op, and the providers that run it.

    providers: name -> make(*inputs) returning fn(), where fn() runs the op once and returns its
    outputs; or a string saying why that provider cannot run here. expected(*inputs): the reference
    outputs every provider is checked against.
    """
    op: str
    name: str
    shape: str
    inputs: Callable[[], tuple]
    providers: dict
    expected: Callable
    nbytes: int | None = None          # bytes one call must move (GB/s and the copy ceiling)
    flops: int | None = None           # FLOPs of one call (TFLOP/s)
    tol: float = 1e-2                  # bound on rel_err
    tols: dict = dataclasses.field(default_factory=dict)  # per provider, where it computes a close variant
    mutates: bool = False              # providers write into their inputs: fresh inputs for each
    graph: bool = False                # also time CUDA-graph replays (decode shapes)
    gemm_ceiling: tuple = ()           # providers whose TFLOP/s is the ceiling (the first that passed)
    matmul_ceiling: tuple | None = None  # (m, n, k): a bf16 matmul of this shape is the TFLOP/s ceiling
    baselines: dict = dataclasses.field(default_factory=lambda: dict(BASELINES))
    peak_memory: int = 0               # if set: record peak extra CUDA memory, and its ratio to this
    extra: dict = dataclasses.field(default_factory=dict)  # fields copied into every row


class Check(typing.NamedTuple):
    """A case of the GPU check's smoke pass (bench/smoke.py), declared by each family's bench module
    in CHECKS: `op` names the op whose backends it runs; make(device, small) -> inputs dict;
    run(inputs) -> output tensors (the public functions, so autograd and composites are covered);
    compare: "rel" (REL_TOL of the dtype), "exact" (bits) or "exact-gpu" (bits on a GPU, where the
    interpreter's float32 -> bfloat16 truncation does not apply); refresh(inputs): new values in
    place, for the CUDA-graph replay."""
    op: str
    make: Callable
    run: Callable
    compare: str
    refresh: Callable


def rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def fp8_bits(t):
    """float8 tensors as their bytes (torch.equal and friends do not take float8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def bench_modules() -> dict:
    """Op family -> its benchmark module (bench/bench_<family>.py), for every family that declares
    ops (quickllm_kernels._op.OPS): a family without one fails here, not silently."""
    import importlib

    from quickllm_kernels._op import OPS

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return {family: importlib.import_module(f"bench_{family}")
            for family in dict.fromkeys(op.family for op in OPS.values())}


class CompileFailed(RuntimeError):
    pass


class DeviceBroken(RuntimeError):
    """A CUDA error that leaves the context unusable (e.g. an illegal address): stop the run."""


def compiled(fn, backend: str = "inductor"):
    """torch.compile(fn, fullgraph=True, dynamic=False) that cannot quietly run eagerly: its first
    call resets dynamo's caches, compiles, and raises CompileFailed unless a graph was compiled
    (dynamo disabled, unsupported Python, suppressed errors and graph breaks all end up here)."""
    state = {}

    def call(*args):
        c = state.get("fn")
        if c is not None:
            return c(*args)
        import torch._dynamo
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        torch._dynamo.config.suppress_errors = False
        c = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
        before = counters["stats"]["unique_graphs"]
        try:
            out = c(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            raise CompileFailed(_why(e)) from e
        if counters["stats"]["unique_graphs"] <= before:
            raise CompileFailed("no graph was compiled (torch.compile ran the function eagerly)")
        state["fn"] = c
        return out
    return call


def _why(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def on_backend(name: str, fn):
    """fn with quickllm's backend `name` forced for the ops it calls."""
    def call(*args):
        import quickllm_kernels as qk

        with qk.use_backend(name):
            return fn(*args)
    return call


def unavailable(op: str, name: str, device) -> str | None:
    """Why quickllm's backend `name` cannot run `op` on `device` at all (the op's declaration), or None."""
    from quickllm_kernels._op import OPS

    return OPS[op].unavailable(name, torch.device(device))


def poison_allocator(*nbytes, device="cuda"):
    """Fill one block of the CUDA caching allocator per size in `nbytes` with 0xFF bytes (NaN in every
    float dtype, float8_e4m3fn included) and free them. An allocation of about that size that follows
    on the same stream (an op's torch.empty / at::empty output) then likely reuses one, so an element
    the op never writes reads NaN, not a stale plausible value: best effort, the allocator may pick
    another free block."""
    blocks = [torch.full((max(int(n), 1),), 0xFF, dtype=torch.uint8, device=device) for n in nbytes]
    del blocks


def rel_err(got, want) -> float:
    """max over output tensors of ||got - want||_2 / ||want||_2, summed in float64 chunk by chunk;
    inf when the outputs' count or shapes differ, NaN when either holds NaN."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want) or not want:
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return math.inf
        g, w = g.detach().reshape(-1), w.detach().reshape(-1)
        num = den = 0.0
        for i in range(0, w.numel(), 1 << 24):
            gi, wi = g[i:i + (1 << 24)].double(), w[i:i + (1 << 24)].to(g.device).double()
            num += float((gi - wi).square().sum())
            den += float(wi.square().sum())
        err = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
        if math.isnan(err):
            return err
        worst = max(worst, err)
    return worst


def _finite(x):
    """JSON-safe: NaN and infinities become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str | Path, payload: dict) -> None:
    """Atomically: a reader (or a crash) sees the previous file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Device, clocks, driver and library versions, and the source tree's commit."""
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
           "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "env": {k: os.environ[k] for k in ("QUICKLLM_BACKEND", "QUICKLLM_SYNC_CHECKS", "TRITON_INTERPRET",
                                              "CUDA_VISIBLE_DEVICES") if k in os.environ}}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    commit = _run(["git", "rev-parse", "HEAD"])
    env["git_commit"] = commit
    env["git_dirty"] = None if commit is None else bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"sm_{p.major}{p.minor}", sm_count=p.multi_processor_count,
                   l2_bytes=getattr(p, "L2_cache_size", None), memory_gib=round(p.total_memory / 2**30, 1),
                   clock_rate_khz=getattr(p, "clock_rate", None),
                   memory_clock_rate_khz=getattr(p, "memory_clock_rate", None),
                   memory_bus_width_bits=getattr(p, "memory_bus_width", None),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit",
                  "temperature.gpu", "persistence_mode", "pstate"]
        cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        bus = getattr(p, "pci_bus_id", None)
        if bus is not None:
            cmd.append(f"--id={getattr(p, 'pci_domain_id', 0):08X}:{bus:02X}:{getattr(p, 'pci_device_id', 0):02X}.0")
        out = _run(cmd) or _run(cmd[:3])
        if out:
            vals = [v.strip() for v in out.splitlines()[0].split(",")]
            env["nvidia_smi"] = dict(zip(["driver", "sm_clock_mhz", "mem_clock_mhz", "max_sm_clock_mhz",
                                          "max_mem_clock_mhz", "power_limit_w", "temperature_c", "persistence_mode",
                                          "pstate"], vals))
            env["driver"] = env["nvidia_smi"]["driver"]
    else:
        env["device"] = f"cpu ({env['cpu']})"
    from quickllm_kernels import _library
    env["cuda_extension"] = _library.CUDA_EXT_STATUS
    return env


class Bench:
    """Runs cases, one provider at a time, and rewrites the JSON file after every row."""

    def __init__(self, device, *, json_path=None, smoke=False, deadline_s=None, compile=True, graphs=True,
                 timing=None, providers=None, argv=None, log=sys.stderr, t0=None):
        self.device = torch.device(device)
        self.json_path, self.deadline_s, self.compile, self.graphs = json_path, deadline_s, compile, graphs
        self.provider_filter = providers or []
        self.timing = {**dict(warmup_ms=25.0, rep_ms=100.0, min_reps=5, max_reps=1000), **(timing or {})}
        self.t0 = time.monotonic() if t0 is None else t0  # the deadline counts from here
        self.log = log
        self._copy, self._matmul = {}, {}
        cuda = self.device.type == "cuda"
        self.results = {
            "schema": 2, "command": " ".join(argv) if argv is not None else None, "started": _now(), "updated": None,
            "finished": None, "complete": False, "cut_short": None,
            "settings": dict(device=str(self.device), smoke=smoke, deadline_s=deadline_s, compile=compile,
                             cuda_graphs=graphs and cuda, **self.timing,
                             l2_flush=f"read of {l2_flush_bytes(self.device) >> 20} MiB before each timed call"
                             if cuda else None),
            "environment": environment(self.device),
            "ceilings": {"copy": [], "matmul": []},
            "ops": {},
        }
        self.write()

    # ---- output ----------------------------------------------------------------------------
    def write(self):
        self.results["updated"] = _now()
        if self.json_path:
            write_json(self.json_path, self.results)

    def finish(self, cut_short: str | None = None):
        self.results.update(finished=_now(), complete=cut_short is None, cut_short=cut_short)
        self.write()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def expired(self) -> bool:
        return self.deadline_s is not None and self.elapsed() >= self.deadline_s

    def _say(self, msg):
        if self.log:
            print(f"[{self.elapsed():7.1f}s] {msg}", file=self.log, flush=True)

    # ---- ceilings ----------------------------------------------------------------------------
    def copy_gbs(self, nbytes: int) -> float:
        """GB/s of a device copy moving `nbytes` in all (half read, half written), measured once per
        size in this run (buffers capped at 4 GiB each)."""
        half = max(1, min(nbytes // 2, 4 << 30))
        if half not in self._copy:
            src = torch.randint(0, 256, (half,), dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            t = measure(lambda: dst.copy_(src), self.device, **self.timing)
            del src, dst
            self._copy[half] = 2 * half / t.median_ms / 1e6
            self.results["ceilings"]["copy"].append(dict(bytes=2 * half, gbs=self._copy[half], **t.as_dict()))
        return self._copy[half]

    def matmul_tflops(self, m: int, n: int, k: int) -> float:
        """TFLOP/s of a bf16 [m, k] x [k, n] matmul (cuBLAS on a GPU), measured once per shape."""
        if (m, n, k) not in self._matmul:
            g = torch.Generator(device=self.device).manual_seed(0)
            a = torch.randn(m, k, generator=g, device=self.device, dtype=torch.bfloat16)
            b = torch.randn(n, k, generator=g, device=self.device, dtype=torch.bfloat16)
            t = measure(lambda: a @ b.t(), self.device, **self.timing)
            del a, b
            self._matmul[(m, n, k)] = 2 * m * n * k / t.median_ms / 1e9
            self.results["ceilings"]["matmul"].append(dict(m=m, n=n, k=k, dtype="bfloat16",
                                                           tflops=self._matmul[(m, n, k)], **t.as_dict()))
        return self._matmul[(m, n, k)]

    # ---- cases -------------------------------------------------------------------------------
    def run_case(self, family: str, case: Case) -> str | None:
        """Run every provider of `case`; returns why the run was cut short, or None. No case or
        provider starts once the deadline has passed."""
        if self.expired():
            return f"deadline of {self.deadline_s:g} s reached before {family} / {case.name}"
        rows = self.results["ops"].setdefault(family, [])
        base = dict(op=case.op, case=case.name, shape=case.shape, **case.extra)
        copy_gbs = self.copy_gbs(case.nbytes) if case.nbytes else None
        mm = case.matmul_ceiling
        mm_tflops = self.matmul_tflops(*mm) if mm else None
        args = case.inputs()
        want = case.expected(*(case.inputs() if case.mutates else args))
        done, cut = [], None
        for prov, make in case.providers.items():
            if self.expired():
                cut = f"deadline of {self.deadline_s:g} s reached before {family} / {case.name} / {prov}"
                break
            row = dict(base, provider=prov)
            if isinstance(make, str):
                row.update(status="skipped", skipped=make)
            elif self.provider_filter and not any(s in prov for s in self.provider_filter):
                row.update(status="skipped", skipped="not selected (--provider)")
            elif prov.startswith("torch.compile") and not self.compile:
                row.update(status="skipped", skipped="torch.compile rows are off (--smoke or --no-compile)")
            else:
                self._run_provider(row, case, make, case.inputs() if case.mutates else args, want)
            if row["status"] == "ok":
                if case.nbytes:
                    row.update(bytes=case.nbytes, gbs=case.nbytes / row["median_ms"] / 1e6, copy_gbs=copy_gbs)
                    row["pct_of_copy"] = 100 * row["gbs"] / copy_gbs
                if case.flops:
                    row.update(flops=case.flops, tflops=case.flops / row["median_ms"] / 1e9)
            rows.append(row)
            done.append(row)
            self._say(_progress(family, row))
            self.write()
        self._derive(case, done, mm, mm_tflops)
        self.write()
        return cut

    def _run_provider(self, row, case, make, args, want):
        cuda = self.device.type == "cuda"
        try:
            fn = make(*args)
            if getattr(fn, "impl", None):  # which of several APIs the provider found working
                row["impl"] = fn.impl
            got = fn()  # the check call (also compiles, autotunes, initialises)
            err = rel_err(got, want)
            del got
            tol = case.tols.get(row["provider"], case.tol)
            row.update(rel_err=err, tol=tol)
            if not err <= tol:
                row.update(status="wrong", wrong=f"rel_err {err:.3g} > tol {tol:g} against the reference")
                return
            t = measure(fn, self.device, **self.timing)
            row.update(status="ok", timer=t.method, **{k: v for k, v in t.as_dict().items() if k != "method"})
            if case.graph and self.graphs and cuda:
                try:
                    g = measure(fn, self.device, cuda_graph=True, **self.timing)
                    row.update({f"graph_{k}": v for k, v in g.as_dict().items() if k != "method"})
                except Exception as e:  # noqa: BLE001  (capture refused: a host sync, CPU work, ...)
                    self._check_device(e)
                    row["graph_skipped"] = _why(e)
            if case.peak_memory and cuda:
                fn()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - start
                row.update(peak_extra_mib=peak / 2**20, peak_vs_full_logits=peak / case.peak_memory)
        except DeviceBroken:
            raise
        except CompileFailed as e:
            row.update(status="skipped", skipped=f"compile failed: {e}")
        except torch.OutOfMemoryError as e:
            row.update(status="skipped", skipped=f"out of memory: {_why(e)[:200]}")
        except Exception as e:  # noqa: BLE001  (a provider that rejects the call is a row, not a crash)
            self._check_device(e)
            row.update(status="skipped", skipped=_why(e))
        finally:
            if cuda:
                try:
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001  (a broken context is reported by _check_device)
                    pass

    def _check_device(self, e):
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize()
        except Exception as sync_error:  # noqa: BLE001
            raise DeviceBroken(f"{_why(e)}; then {_why(sync_error)}") from e

    def _derive(self, case, rows, mm, mm_tflops):
        ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
        gemm = next(((p, ok[p]["tflops"]) for p in case.gemm_ceiling if p in ok), None)
        if mm_tflops:
            gemm = (f"bf16 matmul [{mm[0]}, {mm[2]}] x [{mm[2]}, {mm[1]}]", mm_tflops)
        for r in ok.values():
            for key, base in case.baselines.items():
                if base in ok:
                    r[key] = ok[base]["median_ms"] / r["median_ms"]
            bounds = []
            if r.get("copy_gbs"):
                bounds.append(case.nbytes / r["copy_gbs"] / 1e6)
            if gemm and case.flops:
                r.update(gemm_ceiling=gemm[0], gemm_ceiling_tflops=gemm[1], pct_of_gemm=100 * r["tflops"] / gemm[1])
                bounds.append(case.flops / gemm[1] / 1e9)
            if bounds:
                r.update(ceiling_ms=max(bounds), pct_of_ceiling=100 * max(bounds) / r["median_ms"])


def _progress(family, r) -> str:
    head = f"{family} / {r['case']} / {r['provider']}: "
    if r["status"] == "skipped":
        return head + f"skipped: {r['skipped']}"
    if r["status"] == "wrong":
        return head + f"WRONG: {r['wrong']}"
    extra = f", graph {r['graph_median_ms']:.4f} ms" if "graph_median_ms" in r else ""
    return head + f"{r['median_ms']:.4f} ms (min {r['min_ms']:.4f}, max {r['max_ms']:.4f}, {r['reps']} reps{extra}), " \
                  f"rel_err {r['rel_err']:.2e}"


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format); columns no row has are left out."""
    columns = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
