"""One command that turns a GPU machine into committed evidence.

    python bench/gpu_check.py OUTDIR [--budget 540] [--dry-run]

Runs from a source checkout on a bare machine (no install needed: the checkout is put on PYTHONPATH),
under a deadline: a step starts only if its minimum time is left, and each runs under a timeout.

  env        GPU, driver, SMs, clocks, L2, memory, versions, the git commit (OUTDIR/gpu_check.json)
  build      the CUDA kernels for the local architecture only (QUICKLLM_CUDA_ARCHS, default the
             GPU's), compiled into a fresh cache                                  (steps.log)
  smoke      every op x kernel backend against the reference on fresh data, outputs on NaN-filled
             memory, each captured in a CUDA graph and replayed on new values     (steps.log)
  bench      bench/run.py at the real shapes, no torch.compile rows, in a fixed share of the
             budget; JSON written row by row                      (bench.json, bench.log)
  pytest     `pytest -m gpu` with a per-test timeout, never stopping at a failure (pytest.log); the
             Triton kernels' GPU coverage there is the test_gpu_* tests, the rest is the smoke pass
  sanitizer  compute-sanitizer memcheck (no caching allocator) and racecheck on the small-shape smoke
             pass, quickllm's CUDA kernels only                                    (sanitizer.log)
  e2e        bench/e2e_deepseek.py: DeepSeek-V3 decode tokens/s against transformers, 4 layers of
             V2-Lite shapes                                                  (e2e_deepseek.json)
  compile    the torch.compile(reference) rows in what time is left               (bench_compile.json)

The last lines printed (and OUTDIR/summary.md) are the summary. `--dry-run` runs the same steps on a
CPU machine at the smallest settings (CI runs it so this script cannot rot while no GPU is at hand).
Packages the machine lacks (such as expecttest, which opcheck needs) can be given as wheels with
`--wheels DIR`; they are installed into a temporary directory put on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Check:
    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}
        self.report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "dry_run": dry_run, "budget_s": budget, "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self):
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")

    def run(self, step: str, cmd: list[str], log: str, *, timeout: float, min_s: float, env=None) -> dict:
        """Run `cmd` with its output appended to OUTDIR/log, unless fewer than min_s seconds are left."""
        rec = {"cmd": " ".join(cmd)}
        margin = 25  # to stop a step that overruns (SIGTERM, grace, SIGKILL) within the budget
        if self.left() - margin < min_s:
            rec.update(status="not started", why=f"{self.left():.0f} s left of the budget, step needs {min_s:.0f} s "
                                                 f"+ {margin} s to stop it")
        else:
            timeout = min(timeout, self.left() - margin)
            t0 = time.monotonic()
            with open(self.out / log, "a") as f:
                f.write(f"\n$ {rec['cmd']}\n")
                f.flush()
                # Its own process group: a timeout stops the whole tree (nvcc under ninja, the Python
                # under compute-sanitizer), SIGTERM first so that bench/run.py can say it was cut short.
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    rc = proc.wait(timeout=timeout)
                    rec.update(status="ok" if rc == 0 else "failed", returncode=rc)
                except subprocess.TimeoutExpired:
                    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                        try:
                            os.killpg(proc.pid, sig)
                            proc.wait(timeout=grace)
                            break
                        except (ProcessLookupError, subprocess.TimeoutExpired):
                            continue
                    rec.update(status="timed out", why=f"stopped after {timeout:.0f} s")
                    f.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
            rec["seconds"] = round(time.monotonic() - t0, 1)
        self.report["steps"].setdefault(step, []).append(rec)
        self.save()
        print(f"[gpu_check] {step:9s} {rec['status']:11s} {rec.get('seconds', 0):6.1f} s  {rec.get('why', '')}",
              flush=True)
        return rec

    def skip(self, step: str, why: str):
        self.report["steps"].setdefault(step, []).append({"status": "skipped", "why": why})
        self.save()
        print(f"[gpu_check] {step:9s} skipped      {why}", flush=True)


def device_facts() -> dict:
    """What the machine is: the benchmarks' environment record (torch, nvidia-smi, the commit), plus
    the CUDA driver's attributes (cuda-python) and whether the CUDA kernels can be built here."""
    import torch

    sys.path.insert(0, str(ROOT))
    from common import environment
    from quickllm_kernels import _build

    facts = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    facts.update(nvcc=_build.nvcc_version(), cuda_build_unavailable=_build.build_unavailable())
    if torch.cuda.is_available():
        facts.update(_driver_attributes())
    return facts


def _driver_attributes() -> dict:
    """Clock rates, memory bus width and the resulting peak DRAM bandwidth from the CUDA driver API
    (cuda-python's cuda.bindings), the figures torch does not report."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        try:
            from cuda import cuda as cu  # cuda-python before 12.6
        except ImportError as e:
            return {"driver_attributes": f"cuda-python not installed ({e})"}
    try:
        (err,) = cu.cuInit(0)
        err, dev = cu.cuDeviceGet(0)
        err, drv = cu.cuDriverGetVersion()
        A = cu.CUdevice_attribute

        def attr(name):
            e, v = cu.cuDeviceGetAttribute(getattr(A, name), dev)
            return int(v) if int(e) == 0 else None

        mem_khz, bus = attr("CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE"), attr("CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH")
        out = {"cuda_driver": f"{drv // 1000}.{drv % 1000 // 10}",
               "sm_clock_mhz": (attr("CU_DEVICE_ATTRIBUTE_CLOCK_RATE") or 0) // 1000,
               "mem_clock_mhz": (mem_khz or 0) // 1000, "mem_bus_bits": bus,
               "smem_per_block_optin_kib": (attr("CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN") or 0) // 1024}
        if mem_khz and bus:  # double data rate
            out["dram_peak_gbs"] = round(2 * mem_khz * 1e3 * bus / 8 / 1e9, 1)
        return out
    except Exception as e:  # facts are best effort; the check goes on
        return {"driver_attributes": f"failed: {type(e).__name__}: {e}"}


def _pytest_results(xml_path: Path) -> dict:
    """Counts and the failing tests (with the first line of their message) from a JUnit file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):  # not written, or cut off: the -v log fallback reads what ran
        return {}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [c.tag for c in case]
        if "failure" in kinds or "error" in kinds:
            kind = "failed" if "failure" in kinds else "error"
            node = case.find(kind if kind == "error" else "failure")
            counts[kind] += 1
            first = (node.get("message") or "").splitlines()[:1] if node is not None else []
            failures.append(f"{name}: {first[0][:200] if first else ''}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failures": failures}


def _pytest_log_results(log: Path) -> dict:
    """The same from pytest's -v lines, for a run stopped before it wrote its JUnit file, and the
    test that was running when it was stopped."""
    if not log.exists():
        return {}
    text = log.read_text(errors="replace")
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M):
        kind = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error"}.get(m.group(2), "skipped")
        counts[kind] += 1
        if kind in ("failed", "error"):
            failures.append(m.group(1))
    last = text.rstrip().splitlines()[-3:] if text.strip() else []
    running = next((ln.split()[0] for ln in reversed(last) if "::" in ln and not re.search(
        r" (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", ln)), None)
    return {"counts": counts, "failures": failures, "incomplete": True, "running_when_stopped": running}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir")
    p.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540)")
    p.add_argument("--dry-run", action="store_true", help="CPU machine: smallest settings, GPU-only steps skipped")
    p.add_argument("--wheels", default=None, help="directory of wheels to install first (e.g. expecttest)")
    p.add_argument("--per-test-timeout", type=int, default=45)
    a = p.parse_args(argv)
    out = Path(a.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chk = Check(out, a.budget, a.dry_run)
    py = sys.executable

    if a.wheels and not any(Path(a.wheels).glob("*.whl")):
        chk.skip("wheels", f"no wheels in {a.wheels}")
    elif a.wheels:
        site = tempfile.mkdtemp(prefix="quickllm-wheels-")
        chk.run("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                           *map(str, sorted(Path(a.wheels).glob("*.whl")))], "steps.log", timeout=120, min_s=10)
        chk.env["PYTHONPATH"] = os.pathsep.join([chk.env["PYTHONPATH"], site])

    # env
    chk.report["environment"] = facts = device_facts()
    chk.save()
    gpu = facts.get("capability") is not None
    print(f"[gpu_check] {facts.get('device')} {facts.get('capability', '')}  torch {facts['torch']}  "
          f"triton {facts['triton']}  nvcc {facts['nvcc']}  commit {str(facts.get('git_commit'))[:12]}", flush=True)
    if not gpu and not a.dry_run:
        print("[gpu_check] no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2

    # build: a fresh cache, so the check proves that these sources compile on this machine
    if not gpu:
        chk.env.setdefault("TRITON_INTERPRET", "1")
    build_env = dict(chk.env)
    if gpu:
        build_env["QUICKLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="quickllm-cache-")
        build_env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        chk.env["QUICKLLM_CACHE_DIR"] = build_env["QUICKLLM_CACHE_DIR"]
    if facts["cuda_build_unavailable"] is None:
        rec = chk.run("build", [py, "-m", "quickllm_kernels", "build"], "steps.log", timeout=300, min_s=60,
                      env=build_env)
        if rec["status"] != "ok":  # no later step may try (and wait for) the compiler again
            chk.env["QUICKLLM_BUILD_CUDA"] = "0"
    else:
        chk.skip("build", facts["cuda_build_unavailable"])
    chk.run("info", [py, "-m", "quickllm_kernels", "info"], "steps.log", timeout=60, min_s=10)

    # smoke: every op x kernel backend, rows written as they finish
    chk.run("smoke", [py, "bench/smoke.py", "--json", str(out / "smoke.json")], "steps.log", timeout=150, min_s=20)
    smoke = out / "smoke.json"
    if smoke.exists():
        chk.report["smoke"] = json.loads(smoke.read_text())
        smoke.unlink()  # folded into gpu_check.json
        chk.save()

    # benchmarks of the kernels and peers (no torch.compile rows: 10-40 s of compiling each), shorter
    # timings than a full run, in a fixed share of the budget: the evidence the speed targets need
    bench = [py, "bench/run.py"] + ([] if gpu else ["--smoke", "--device", "cpu"])
    bench_s = max(45.0, min(220.0, 0.45 * (chk.left() - 15)))
    chk.run("bench", bench + ["--json", str(out / "bench.json"), "--no-compile", "--deadline", str(int(bench_s - 25))]
            + (["--rep-ms", "50", "--warmup-ms", "10"] if gpu else []), "bench.log", timeout=bench_s, min_s=45)

    # pytest -m gpu
    xml = out / "pytest.xml"
    # -v: one line per test as it ends, so a run stopped by the step's timeout still tells what passed;
    # a module that fails to import costs its own tests, not the run
    cmd = [py, "-m", "pytest", "tests", "-v", "--tb=short", "-m", "gpu", "-p", "no:cacheprovider", "-rfE",
           "--continue-on-collection-errors", f"--junitxml={xml}", "--durations=15"]
    have_timeout = subprocess.run([py, "-c", "import pytest_timeout"], env=chk.env, capture_output=True).returncode == 0
    if have_timeout:
        cmd.append(f"--timeout={a.per_test_timeout}")
    else:
        chk.report["pytest_note"] = "pytest-timeout not installed: no per-test timeout, only the step's"
    chk.run("pytest", cmd, "pytest.log", timeout=60 if a.dry_run else max(100, 0.6 * (chk.left() - 15)), min_s=30)
    chk.report["pytest"] = _pytest_results(xml) or _pytest_log_results(out / "pytest.log")
    xml.unlink(missing_ok=True)
    chk.save()

    # compute-sanitizer on small shapes, the CUDA kernels only (all in namespace quickllm): memcheck
    # without the caching allocator (which would hide reads past a tensor inside its 2 MiB segment),
    # then racecheck on shared memory
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(c) for c in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer",
                          Path("/usr/local/cuda/bin/compute-sanitizer")) if c.exists()), None)
    if not gpu:
        chk.skip("sanitizer", "no CUDA device")
    elif sanitizer is None:
        chk.skip("sanitizer", "compute-sanitizer not found")
    else:
        small = [py, "bench/smoke.py", "--small", "--backend", "cuda", "--no-graphs"]
        tool = [sanitizer, "--error-exitcode", "3", "--kernel-name", "kns=quickllm"]
        chk.run("sanitizer", [*tool, "--tool", "memcheck", *small], "sanitizer.log", timeout=120, min_s=40,
                env={**chk.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        chk.run("sanitizer", [*tool, "--tool", "racecheck", *small], "sanitizer.log", timeout=100, min_s=40)
        log = (out / "sanitizer.log").read_text(errors="replace") if (out / "sanitizer.log").exists() else ""
        chk.report["sanitizer_summary"] = re.findall(r"ERROR SUMMARY: .*|RACECHECK SUMMARY: .*", log)

    # end to end: DeepSeek-V3 greedy decode against transformers (a few V2-Lite-shaped layers on a GPU)
    e2e = ["--layers", "4", "--batch", "1", "--batch", "32", "--prompt", "256", "--new", "32", "--reps", "2"] if gpu \
        else ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt", "8", "--new", "4", "--reps", "1"]
    chk.run("e2e", [py, "bench/e2e_deepseek.py", "--json", str(out / "e2e_deepseek.json"), *e2e], "bench.log",
            timeout=150, min_s=60 if gpu else 20)
    try:
        rows = json.loads((out / "e2e_deepseek.json").read_text())["rows"]
        chk.report["e2e"] = [dict(batch=r["batch"], speedup=r["speedup"], quickllm=r["quickllm"]["decode_tokens_per_s"],
                                  transformers=r["transformers"]["decode_tokens_per_s"]) for r in rows]
        chk.save()
    except (OSError, ValueError, KeyError):
        pass

    # torch.compile(reference) rows, in what is left
    compile_s = chk.left() - 15
    chk.run("compile", bench + ["--json", str(out / "bench_compile.json"), "--provider", "compile",
                              "--deadline", str(int(compile_s - 25))], "bench.log", timeout=compile_s, min_s=70)

    chk.report["bench"] = {f: _bench_digest(out / f) for f in ("bench.json", "bench_compile.json") if (out / f).exists()}
    summary = _summary(chk.report)
    (out / "summary.md").write_text(summary)
    chk.report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    chk.save()
    print("\n" + summary)
    failed = [s for s, recs in chk.report["steps"].items() for r in recs if r["status"] in ("failed", "timed out")]
    return 1 if failed else 0


def _bench_digest(path: Path) -> dict:
    """Per op and provider: the % of ceiling of each timed case, and how many rows were wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"complete": False, "by_provider": {}, "wrong": {}, "error": str(e)}
    by, wrong = {}, {}
    for rows in data.get("ops", {}).values():
        for row in rows:
            key = f"{row.get('op', '?')}|{row.get('provider', '?')}"
            if row.get("status") == "wrong":
                wrong[key] = wrong.get(key, 0) + 1
            elif row.get("status") == "ok" and row.get("pct_of_ceiling") is not None:
                by.setdefault(key, []).append(float(row["pct_of_ceiling"]))
    return {"complete": bool(data.get("complete")), "by_provider": by, "wrong": wrong}


def _summary(r: dict) -> str:
    e = r.get("environment", {})
    lines = [f"# gpu_check {'(dry run) ' if r['dry_run'] else ''}{e.get('device')} {e.get('capability', '')}",
             f"torch {e.get('torch')} (CUDA {e.get('torch_cuda')}), triton {e.get('triton')}, nvcc {e.get('nvcc')}, "
             f"driver {e.get('cuda_driver') or e.get('driver')}, SMs {e.get('sm_count')}, "
             f"L2 {(e.get('l2_bytes') or 0) / 2**20:.0f} MiB, commit {str(e.get('git_commit'))[:12]}"
             f"{' (dirty)' if e.get('git_dirty') else ''}", "", "| step | status | s | note |", "|---|---|---|---|"]
    for step, recs in r["steps"].items():
        for rec in recs:
            lines.append(f"| {step} | {rec['status']} | {rec.get('seconds', '-')} | {rec.get('why', '')} |")
    smoke = r.get("smoke") or []
    if smoke:
        bad = [s for s in smoke if s["status"] == "FAIL"]
        lines += ["", f"smoke: {sum(s['status'] == 'ok' for s in smoke)} ok, {len(bad)} failed, "
                      f"{sum(s['status'] == 'skipped' for s in smoke)} skipped"]
        lines += [f"  FAIL {s['case']} [{s['backend']}] err={s.get('error')} graph={s.get('graph')} "
                  f"{s.get('error_text', '')[:150]}" for s in bad]
    for name, bench in (r.get("bench") or {}).items():
        lines += ["", f"{name}: {'complete' if bench.get('complete') else 'cut short'}; % of ceiling "
                      f"(min / median / max over cases), wrong rows"]
        for key in sorted(set(bench["by_provider"]) | set(bench["wrong"])):
            op, prov = key.split("|", 1)
            pcts, wrong = sorted(bench["by_provider"].get(key, [])), bench["wrong"].get(key, 0)
            lines.append(f"  {op:22s} {prov:32s} " + (f"{pcts[0]:5.1f} / {pcts[len(pcts) // 2]:5.1f} / {pcts[-1]:5.1f}"
                                                      if pcts else "   -") + (f"  WRONG x{wrong}" if wrong else ""))
    for e2e in r.get("e2e") or []:
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731  (None: t(new) <= t(1), noise)
        lines.append(f"e2e DeepSeek-V3 decode, batch {e2e['batch']}: quickllm {fmt(e2e['quickllm'], '.1f')} tok/s, "
                     f"transformers {fmt(e2e['transformers'], '.1f')} tok/s, x{fmt(e2e['speedup'], '.2f')}")
    if r.get("sanitizer_summary"):
        lines += ["", "compute-sanitizer: " + "; ".join(r["sanitizer_summary"])]
    pt = r.get("pytest") or {}
    if pt:
        lines += ["", f"pytest -m gpu: {pt['counts']}"] + [f"  {f}" for f in pt["failures"][:25]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
