"""The benchmark harness runs end to end (tiny shapes) and writes JSON with the fields the tables need,
so it cannot rot between GPU runs."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "## rope" in proc.stdout and "## logprobs" in proc.stdout and "## fp8" in proc.stdout and "% of copy BW" in proc.stdout
    data = json.loads(out.read_text())
    assert data["copy_bandwidth_gbs"] > 0
    assert data["environment"]["torch"]
    rows = [r for r in data["ops"]["rope"] if "median_ms" in r]
    ref = next(r for r in rows if r["provider"] == "reference")
    assert ref["median_ms"] > 0 and ref["gbs"] > 0 and ref["vs_reference"] == 1.0
    lp = {r["provider"]: r for r in data["ops"]["logprobs"] if "median_ms" in r}
    assert lp["reference"]["gbs"] > 0 and lp["quickllm linear_token_logprobs"]["tflops"] > 0
    fp8 = [r for r in data["ops"]["fp8"] if "median_ms" in r]
    assert {r["op"] for r in fp8} == {"weight_dequant", "act_quant", "fp8_block_gemm"}
    gemm_ref = next(r for r in fp8 if r["op"] == "fp8_block_gemm" and r["provider"] == "reference")
    assert gemm_ref["tflops"] > 0 and gemm_ref["vs_reference"] == 1.0 and gemm_ref["vs_cublas_bf16"] > 0
