"""The GPU check (bench/gpu_check.py) and its smoke pass, on the CPU: the dry run goes through every
step and leaves a summary and valid JSON; a step that does not fit the budget is not started; the
smoke pass fails a kernel that gives wrong values or leaves outputs unwritten."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import smoke  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}


def _run(out, *args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--dry-run", *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    proc = _run(tmp_path, "--budget", "600")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {step: [r["status"] for r in recs] for step, recs in report["steps"].items()}
    assert status["info"] == ["ok"] and status["smoke"] == ["ok"] and status["pytest"] == ["ok"]
    assert status["bench"][0] == "ok" and status["sanitizer"] == ["skipped"] and status["e2e"] == ["ok"]
    assert [r["batch"] for r in report["e2e"]] == [1, 32]
    assert status["build"] in (["ok"], ["skipped"])
    assert report["environment"]["torch"] == torch.__version__ and "finished" in report
    rows = report["smoke"]
    assert {r["case"] for r in rows} == set(smoke.CASES)
    assert all(r["status"] == "ok" for r in rows if r["backend"] == "triton")
    assert report["pytest"]["counts"]["failed"] == 0 and report["pytest"]["counts"]["error"] == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["ops"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary in proc.stdout and "| smoke | ok |" in summary
    names = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_check.json", "summary.md", "bench.json", "steps.log", "pytest.log", "bench.log",
            "e2e_deepseek.json"} <= names
    assert len(names) <= 8  # what a device run can bring back


def test_steps_that_do_not_fit_are_not_started(tmp_path):
    proc = _run(tmp_path, "--budget", "25", timeout=300)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"]["bench"][0]["status"] == "not started"
    assert report["steps"]["pytest"][0]["status"] == "not started"
    assert "not started" in (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0  # nothing failed; what did not run is said, not hidden


def test_no_gpu_without_dry_run_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


@pytest.mark.triton
def test_smoke_fails_a_wrong_kernel(monkeypatch):
    from quickllm_kernels.rope import triton as tri

    good = tri.apply_rope

    def one_token_wrong(q, k, *a):  # a kernel that skips one token of q
        q_out, k_out = good(q, k, *a)
        q_out[3] = q[3]
        return q_out, k_out

    monkeypatch.setattr(tri, "apply_rope", one_token_wrong)
    rows, go_on = smoke.run_cases(torch.device("cpu"), small=True, backends=("triton",), graphs=False,
                                  log=lambda *_: None)
    assert go_on is None
    by_case = {r["case"]: r for r in rows}
    assert by_case["apply_rope"]["status"] == "FAIL"
    assert by_case["act_quant fp32"]["status"] == "ok"


def test_smoke_compare_catches_nan_and_bits():
    want = (torch.ones(4),)
    ok, err, _ = smoke._compare((torch.tensor([1.0, float("nan"), 1.0, 1.0]),), want, "rel", torch.device("cpu"))
    assert not ok
    ok, _, _ = smoke._compare((torch.tensor([1.0, 1.0, 1.0, 1.0 + 2 ** -20]),), want, "exact", torch.device("cpu"))
    assert not ok
    ok, _, _ = smoke._compare((torch.ones(4),), want, "exact", torch.device("cpu"))
    assert ok


@pytest.mark.triton
def test_smoke_goes_on_in_a_fresh_process_after_a_broken_context(monkeypatch, tmp_path, capsys):
    """A case that leaves the process's CUDA state unusable (a failed capture, an illegal address)
    costs that case only: the rest of the pass runs in a fresh process and its rows come back."""
    from quickllm_kernels.rope import triton as tri

    def crash(*a):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(tri, "apply_rope", crash)
    monkeypatch.setattr(smoke, "_device_broken", lambda device: "context lost")
    out = tmp_path / "rows.json"
    assert smoke.main(["--backend", "triton", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == list(smoke.CASES)  # each case once, in order
    broken = [i for i, r in enumerate(rows) if r["status"] != "ok"]
    assert [rows[i]["case"] for i in broken] == ["apply_rope"] and rows[broken[0]]["device_broken"] == "context lost"
    assert all(r["status"] == "ok" for r in rows[broken[0] + 1:])  # the child has the real kernel back
    assert "going on in a fresh process" in capsys.readouterr().out


@pytest.mark.triton
def test_smoke_cases_run_every_kernel_op(monkeypatch):
    """The smoke pass (each family's CHECKS) reaches every op that has a kernel: what the cases ran is
    read back from last_backends(), not declared."""
    from quickllm_kernels import backend
    from quickllm_kernels._op import OPS

    monkeypatch.setattr(backend, "_last", {})
    rows, _ = smoke.run_cases(torch.device("cpu"), small=True, backends=("triton",), graphs=False,
                              log=lambda *_: None)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    kernel_ops = {name for name, op in OPS.items() if not op.composite and (op.triton or op.cuda)}
    assert kernel_ops <= set(backend.last_backends()), kernel_ops - set(backend.last_backends())
