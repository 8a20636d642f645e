"""The benchmark harness runs end to end (tiny shapes) and writes the JSON the tables need, row by row
and valid at every moment, so it cannot rot between GPU runs; its checking, compile and timing parts
are tested on their own."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_common():
    if "bench_common" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
        sys.modules["bench_common"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_common"])
    return sys.modules["bench_common"]


def _run(tmp_path, *args, timeout=600):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu", "--json", str(out),
                           *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_bench_smoke(tmp_path):
    proc, data = _run(tmp_path, "--smoke")
    for head in ("## rope", "## logprobs", "## fp8", "median ms", "min ms", "max ms", "% copy", "% ceiling", "rel err"):
        assert head in proc.stdout
    assert data["schema"] == 2 and data["complete"] is True and data["cut_short"] is None and data["finished"]
    env = data["environment"]
    assert env["torch"] and env["device"].startswith("cpu") and "git_commit" in env
    assert data["settings"]["smoke"] is True and data["settings"]["compile"] is False
    copies = {c["bytes"]: c for c in data["ceilings"]["copy"]}
    assert copies and all(c["gbs"] > 0 and c["min_ms"] <= c["median_ms"] <= c["max_ms"] for c in copies.values())

    rows = [r for family in data["ops"].values() for r in family]
    assert {r["status"] for r in rows} <= {"ok", "skipped", "wrong"}
    assert not [r for r in rows if r["status"] == "wrong"], "a provider disagrees with the reference"
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["reps"] >= 3 and r["timer"] == "wall"
        assert 0 <= r["rel_err"] <= r["tol"]
        assert r["pct_of_ceiling"] > 0 and r["ceiling_ms"] > 0
        if "bytes" in r:  # the copy ceiling is measured at the row's own size
            assert r["copy_gbs"] == copies[r["bytes"] - r["bytes"] % 2]["gbs"] and r["pct_of_copy"] > 0
    for r in rows:
        if r["status"] == "skipped":
            assert r["skipped"] and "median_ms" not in r

    rope = {r["provider"]: r for r in data["ops"]["rope"]}
    assert rope["reference"]["vs_reference"] == 1.0 and rope["reference"]["gbs"] > 0
    assert rope["torch.compile(reference)"]["status"] == "skipped"
    if rope["quickllm-triton"]["status"] == "ok":  # the interpreter ran the kernel, and it was checked
        assert rope["quickllm-triton"]["rel_err"] < 1e-2
    lp = {r["provider"]: r for r in data["ops"]["logprobs"] if r["status"] == "ok"}
    lin = lp["quickllm linear_token_logprobs"]
    assert lin["tflops"] > 0 and lin["gemm_ceiling"].startswith("bf16 matmul") and lin["pct_of_gemm"] > 0
    assert data["ceilings"]["matmul"]
    fp8 = [r for r in data["ops"]["fp8"] if r["status"] == "ok"]
    assert {r["op"] for r in fp8} == {"weight_dequant", "act_quant", "fp8_block_gemm"}
    gemm = {(r["case"], r["provider"]): r for r in data["ops"]["fp8"] if r["op"] == "fp8_block_gemm"}
    ref = gemm[("smoke_M1", "reference")]
    assert ref["tflops"] > 0 and ref["vs_reference"] == 1.0 and ref["vs_cublas_bf16"] > 0
    assert ref["gemm_ceiling"] == "torch._scaled_mm rowwise" and ref["M"] == 1
    assert gemm[("smoke_M1", "torch scaled_mm blockwise")]["status"] == "skipped"  # blockwise needs sm_90


def test_bench_deadline_zero_gives_a_valid_file_marked_cut_short(tmp_path):
    proc, data = _run(tmp_path, "--smoke", "--deadline", "0", timeout=300)
    assert data["complete"] is False and "deadline" in data["cut_short"]
    assert data["ops"] == {} and data["environment"]["torch"]
    assert "cut short" in proc.stdout


def test_bench_case_and_provider_filters(tmp_path):
    _, data = _run(tmp_path, "--smoke", "--op", "fp8", "--case", "M33", "--provider", "reference", timeout=300)
    rows = data["ops"]["fp8"]
    assert {r["case"] for r in rows} == {"smoke_M33"}
    assert {r["provider"] for r in rows if r["status"] == "ok"} == {"reference"}


def test_rows_are_written_one_by_one_and_checked(tmp_path):
    common = _bench_common()
    path = tmp_path / "rows.json"
    x = torch.arange(1.0, 9.0)
    seen = {}

    def spy(x):  # starts after the first row: that row must already be on disk, in a valid file
        seen["rows"] = json.loads(path.read_text())["ops"]["demo"]
        return lambda: x * 2

    def graph_break(x):
        print("not traceable")
        return x * 2

    def raises(x):
        raise RuntimeError("rejects this shape\nsecond line")

    case = common.Case(
        op="double", name="eight", shape="[8]", inputs=lambda: (x,), expected=lambda x: x * 2, nbytes=64, flops=8,
        providers={"reference": lambda x: lambda: x * 2, "spy": spy, "wrong": lambda x: lambda: x * 3,
                   "raises": raises, "not here": "not installed (nothing)",
                   "torch.compile(reference)": lambda x: lambda: common.compiled(lambda x: x * 2, "eager")(x),
                   "torch.compile(broken)": lambda x: lambda: common.compiled(graph_break, "eager")(x)})
    bench = common.Bench("cpu", json_path=path, timing=dict(warmup_ms=0, rep_ms=1, min_reps=3, max_reps=5), log=None)
    assert bench.run_case("demo", case) is None
    bench.finish()
    assert [r["provider"] for r in seen["rows"]] == ["reference"] and seen["rows"][0]["status"] == "ok"
    rows = {r["provider"]: r for r in json.loads(path.read_text())["ops"]["demo"]}
    assert rows["spy"]["status"] == "ok" and rows["spy"]["rel_err"] == 0 and rows["spy"]["reps"] >= 3
    assert rows["wrong"]["status"] == "wrong" and "rel_err 0.5 > tol" in rows["wrong"]["wrong"]
    assert "median_ms" not in rows["wrong"]  # a wrong result gets no time
    assert rows["raises"]["skipped"] == "RuntimeError: rejects this shape"
    assert rows["not here"]["skipped"] == "not installed (nothing)"
    assert rows["torch.compile(reference)"]["status"] == "ok" and rows["torch.compile(reference)"]["vs_reference"] > 0
    assert rows["torch.compile(broken)"]["skipped"].startswith("compile failed: ")
    assert rows["reference"]["vs_reference"] == 1.0 and rows["reference"]["pct_of_copy"] > 0


def test_compiled_refuses_to_run_eagerly():
    common = _bench_common()
    import torch._dynamo
    with torch.compiler.set_stance("force_eager"), pytest.raises(common.CompileFailed, match="eagerly"):
        common.compiled(lambda x: x + 1, "eager")(torch.ones(3))  # torch ran it eagerly: no graph counted

    def breaks(x):
        torch._dynamo.graph_break()
        return x + 1
    with pytest.raises(common.CompileFailed):  # a graph break under fullgraph=True
        common.compiled(breaks, "eager")(torch.ones(3))


def test_rel_err():
    common = _bench_common()
    a = torch.tensor([3.0, 4.0])
    assert common.rel_err((a, a), (a, a)) == 0
    assert common.rel_err(a * 1.5, a) == pytest.approx(0.5)
    assert common.rel_err(a, torch.ones(3)) == float("inf")
    assert common.rel_err(torch.tensor([float("nan"), 1.0]), a) != common.rel_err(a, a)  # NaN is never within tol
    assert common.rel_err(a.to(torch.float8_e4m3fn), a) == 0


def test_measure_reports_min_median_max():
    from quickllm_kernels.timing import measure, time_ms
    t = measure(lambda: torch.ones(10).sum(), torch.device("cpu"), rep_ms=1, min_reps=4, max_reps=6)
    assert 0 < t.min_ms <= t.median_ms <= t.max_ms and 4 <= t.reps <= 6 and t.method == "wall"
    assert set(t.as_dict()) == {"min_ms", "median_ms", "max_ms", "mean_ms", "reps", "method"}
    assert time_ms(lambda: None, torch.device("cpu"), warmup=1, rep=1) >= 0


def test_pytest_benchmarks_collect_and_run():
    pytest.importorskip("pytest_benchmark")
    # smoke shapes on a GPU too; no interpreted Triton (the smoke run covers it) and no compiles (slow)
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "-k", "not triton and not compile"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "QUICKLLM_BENCH_SMOKE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
