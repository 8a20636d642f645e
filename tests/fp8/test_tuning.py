"""Per-device tuned configurations (quickllm_kernels.tuning) and the FP8 GEMM's use of them: lookup
order, fallback to the kernel's own rule, broken tables, explicit tiles, and the tuner end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quickllm_kernels import tuning
from quickllm_kernels.fp8 import reference as ref

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = dict(BM=128, BN=128, num_warps=8, num_stages=3)


def _table(tmp_path, entries, name="Fake GPU 9"):
    path = tmp_path / f"{tuning.device_slug(name)}.json"
    path.write_text(json.dumps({"device": name, "kernels": {"fp8_block_gemm": entries}}))
    return path


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "_device_name", lambda device: "Fake GPU 9")
    monkeypatch.setenv(tuning.ENV, str(tmp_path))
    tuning._tables.cache_clear()
    yield tmp_path
    tuning._tables.cache_clear()


def test_device_slug():
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.device_slug("NVIDIA H200") == "nvidia-h200"


def test_cpu_and_untuned_devices_use_the_rule(fake_gpu):
    assert tuning.lookup("fp8_block_gemm", torch.device("cpu"), ["M64"], DEFAULT) is DEFAULT
    assert tuning.lookup("fp8_block_gemm", torch.device("cuda", 0), ["M64"], DEFAULT) == DEFAULT  # no table


def test_most_specific_key_wins_and_only_known_fields(fake_gpu):
    _table(fake_gpu, {"M64_N7168_K2048": {"BM": 64, "BN": 256, "num_warps": 4, "num_stages": 4, "ms": 0.1},
                      "M64": {"BM": 32, "BN": 64}})
    dev = torch.device("cuda", 0)
    assert tuning.lookup("fp8_block_gemm", dev, ["M64_N7168_K2048", "M64"], DEFAULT) == \
        dict(BM=64, BN=256, num_warps=4, num_stages=4)
    assert tuning.lookup("fp8_block_gemm", dev, ["M64_N1_K1", "M64"], DEFAULT) == \
        dict(BM=32, BN=64, num_warps=8, num_stages=3)  # missing fields keep the rule's
    assert tuning.lookup("fp8_block_gemm", dev, ["M4096"], DEFAULT) == DEFAULT


def test_broken_table_names_its_file(fake_gpu):
    (fake_gpu / "fake-gpu-9.json").write_text("{not json")
    with pytest.raises(ValueError, match="fake-gpu-9.json"):
        tuning.lookup("fp8_block_gemm", torch.device("cuda", 0), ["M64"], DEFAULT)


def test_gemm_keys():
    from quickllm_kernels.fp8.triton import gemm_keys
    assert gemm_keys(1, 7168, 2048) == ("M16_N7168_K2048", "M16")
    assert gemm_keys(17, 7, 8) == ("M32_N7_K8", "M32")
    assert gemm_keys(4096, 7, 8)[1] == "M4096" and gemm_keys(4097, 7, 8)[1] == "M8192"
    assert gemm_keys(10 ** 6, 7, 8)[1] == "M16384"


@pytest.mark.triton
def test_explicit_tiles_match_the_reference_and_bad_ones_are_refused():
    from quickllm_kernels.fp8 import triton as tri
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    a, sa = ref.act_quant(torch.randn(33, 256, generator=g).to(dev), 128)
    b, sb = ref.weight_quant(torch.randn(144, 256, generator=g).to(dev))
    want = ref.fp8_block_gemm(a, sa, b, sb, torch.float32)
    for cfg in (dict(BM=16, BN=64, num_warps=4, num_stages=2), dict(BM=32, BN=128, num_warps=4, num_stages=2)):
        got = tri.fp8_block_gemm(a, sa, b, sb, torch.float32, config=cfg)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="tuned BM"):
        tri.fp8_block_gemm(a, sa, b, sb, torch.float32, config=dict(BM=48, BN=64, num_warps=4, num_stages=2))


@pytest.mark.triton
def test_tuner_writes_a_table(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the smoke tuner run is for CPU machines")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "cpu.json").read_text())
    entry = table["kernels"]["fp8_block_gemm"]["M64_N144_K256"]
    assert {"BM", "BN", "num_warps", "num_stages", "ms", "rel_err"} <= set(entry) and entry["rel_err"] < 1.6e-2
    assert table["torch"] == torch.__version__
