"""Building and loading the CUDA kernels: architecture selection, toolkit discovery, the strict schema
source, the just-in-time library loaded late into a process, a failed build falling back, and the
sm_90a library (built for sm_90a alone, registrations only, loaded after the main one on sm_90)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quickllm_kernels import _build, _library

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}


@pytest.mark.parametrize("text, want", [("90", ["90"]), ("80;90", ["80", "90"]), ("8.9 9.0", ["89", "90"]),
                                        ("sm_90a", ["90a"]), ("100f, 9.0", ["100f", "90"]), ("90;90", ["90"])])
def test_parse_archs(text, want):
    assert _build.parse_archs(text) == want


@pytest.mark.parametrize("text", ["ninety", "9", ";", "native"])
def test_parse_archs_rejects(text):
    with pytest.raises(ValueError, match="QUICKLLM_CUDA_ARCHS"):
        _build.parse_archs(text)


def test_gencode_ptx_only_for_portable_archs():
    assert _build.gencode_flags(["80", "90"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                  "-gencode=arch=compute_90,code=sm_90",
                                                  "-gencode=arch=compute_90,code=compute_90"]
    assert _build.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_archs_env_overrides(monkeypatch):
    cfg = _build.config()
    monkeypatch.setenv("QUICKLLM_CUDA_ARCHS", "8.9")
    assert _build.archs(cfg, prefer_local=True) == ["89"]
    assert _build.archs(cfg, prefer_local=False) == ["89"]
    monkeypatch.delenv("QUICKLLM_CUDA_ARCHS")
    assert _build.archs(cfg, prefer_local=False) == cfg["cuda_archs"]


def test_cuda_home_follows_a_wrapper_script(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.9"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrap))
    assert _build.cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))  # an explicit but wrong toolkit is not replaced
    assert _build.cuda_home() is None
    why = _build.build_unavailable()
    assert why and ("nvcc not found" in why or "not a CUDA build" in why)


def test_jit_plan_key_changes_with_sources_and_archs():
    if _build.build_unavailable():
        pytest.skip(_build.build_unavailable())
    a, b = _build.jit_plan(["90"]), _build.jit_plan(["80"])
    assert a["directory"] != b["directory"] and a["library"].name == "quickllm_kernels_cuda.so"
    assert any(f.endswith("code=sm_90") for f in a["nvcc_flags"])
    # torch's wheels' CUDA headers come after the toolkit's (-isystem), where they exist
    wheel_dirs = [a["nvcc_flags"][i + 1] for i, f in enumerate(a["nvcc_flags"]) if f == "-isystem"]
    assert wheel_dirs == _build.cuda_include_dirs()
    assert not wheel_dirs or any(Path(d, "cublas_v2.h").exists() for d in wheel_dirs)


def test_schema_source_is_strict():
    with pytest.raises(ValueError, match=r"schemas.def:2: cannot parse"):
        _library.read_schemas('// a comment\nQUICKLLM_OP(foo, "(Tensor x)\n    -> Tensor")\n')
    with pytest.raises(ValueError, match="declared twice"):
        _library.read_schemas('QUICKLLM_OP(foo, "(Tensor x) -> Tensor")\nQUICKLLM_OP(foo, "(Tensor x) -> Tensor")\n')
    assert _library.read_schemas('QUICKLLM_OP(foo, "(Tensor x) -> Tensor")\n') == {"foo": "foo(Tensor x) -> Tensor"}


def test_setup_py_honours_archs():
    """setup.py's ahead-of-time extension gets QUICKLLM_CUDA_ARCHS's -gencode flags (setup() is stubbed,
    nothing is compiled)."""
    if _build.build_unavailable():
        pytest.skip(_build.build_unavailable())
    code = ("import setuptools\n"
            "setuptools.setup = lambda **kw: print(kw['ext_modules'][0].extra_compile_args['nvcc'])\n"
            "import runpy; runpy.run_path('setup.py')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**ENV, "QUICKLLM_BUILD_CUDA": "1", "QUICKLLM_CUDA_ARCHS": "8.9"})
    assert out.returncode == 0, out.stderr
    assert "-gencode=arch=compute_89,code=sm_89" in out.stdout and "sm_90" not in out.stdout


@pytest.mark.cuda_ext
def test_kernels_load_late_into_a_process():
    """The kernels' library is a fragment of `_cuda_` ops: loading it after the package has defined
    and registered its public ops conflicts with nothing."""
    if _library.CUDA_EXT_PATH is None or not _library.CUDA_EXT_PATH.endswith(".so"):
        pytest.skip("the kernels were not loaded from a shared library path")
    code = ("import torch, quickllm_kernels as qk\n"
            "from quickllm_kernels import _library\n"
            "assert not _library.CUDA_EXT_LOADED or _library.CUDA_EXT_STATUS.startswith('loaded (ahead')\n"
            "q = torch.randn(3, 2, 8); k = torch.randn(3, 1, 8)\n"
            "qk.apply_rope(q, k, torch.arange(3), qk.rope_cache(8, 4))\n"
            f"torch.ops.load_library({_library.CUDA_EXT_PATH!r})\n"
            "for n in _library.SCHEMAS:\n"
            "    if n not in _library.COMPOSITE:\n"
            "        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'quickllm::_cuda_{n}', 'CUDA'), n\n"
            "        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'quickllm::{n}', 'CPU'), n\n"
            "qk.apply_rope(q, k, torch.arange(3), qk.rope_cache(8, 4))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**ENV, "QUICKLLM_BUILD_CUDA": "0"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_failed_build_falls_back_or_raises(tmp_path, mode):
    code = ("import sys, torch\n"
            "sys.modules['quickllm_kernels._C'] = None  # as on an install without the ahead-of-time module\n"
            "from quickllm_kernels import _build, _library\n"
            "def broken(*a, **k):\n"
            "    raise RuntimeError('compiling the CUDA kernels failed (log: x): error: planted')\n"
            "_build.jit_build = broken\n"
            "_build.build_unavailable = lambda: None\n"
            "_build.jit_plan = lambda *a, **k: {'library': __import__('pathlib').Path('/nonexistent.so'), 'archs': ['90']}\n"
            "try:\n"
            "    ok = _library.ensure_cuda_extension()\n"
            "except RuntimeError as e:\n"
            "    print('raised', e); sys.exit(0)\n"
            "print('loaded' if ok else 'fallback', _library.CUDA_EXT_STATUS)\n"
            "assert _library.ensure_cuda_extension() is False  # tried once, not again per call\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**ENV, "QUICKLLM_BUILD_CUDA": mode, "QUICKLLM_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    if mode == "1":
        assert out.stdout.startswith("raised") and "planted" in out.stdout
    else:
        assert out.stdout.startswith("fallback just-in-time build failed") and "planted" in out.stdout
        assert "continuing without the CUDA backend" in out.stderr


def test_no_build_mode_never_compiles(tmp_path):
    code = ("import sys; sys.modules['quickllm_kernels._C'] = None\n"
            "from quickllm_kernels import _build, _library\n"
            "_build.jit_build = lambda *a, **k: (_ for _ in ()).throw(AssertionError('compiled'))\n"
            "assert _library.ensure_cuda_extension() is False\n"
            "print(_library.CUDA_EXT_STATUS)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**ENV, "QUICKLLM_BUILD_CUDA": "0", "QUICKLLM_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "QUICKLLM_BUILD_CUDA=0" in out.stdout


def test_cpu_tensors_never_trigger_a_build(monkeypatch):
    calls = []
    monkeypatch.setattr(_library, "ensure_cuda_extension", lambda **k: calls.append(1) or False)
    from quickllm_kernels import backend

    assert backend.unavailable_reason("cuda", "apply_rope", torch.device("cpu")) is not None
    assert calls == []


def test_jit_key_covers_shared_headers(tmp_path, monkeypatch):
    """A change to a header the sources include (not only to a listed source) gives a new cache key."""
    if _build.build_unavailable():
        pytest.skip(_build.build_unavailable())
    import shutil
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    monkeypatch.setattr(_build, "source_root", lambda: root)
    before = _build.jit_plan(["90"])["directory"]
    (root / "csrc" / "common" / "vec.cuh").write_text((root / "csrc" / "common" / "vec.cuh").read_text() + "\n// x\n")
    assert _build.jit_plan(["90"])["directory"] != before


# ------------------------------------------------------------------------------------------------
# The sm_90a library: Hopper-only kernels, registrations only, loaded after the main library
# ------------------------------------------------------------------------------------------------

_PROBE = r"""
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

// setmaxnreg exists on sm_90a only: this file compiles for no other target.
__global__ void probe_kernel(float* out) {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  out[threadIdx.x] = 90.f;
}

at::Tensor probe(const at::Tensor& x) {
  auto out = at::empty({128}, x.options().dtype(at::kFloat));
  probe_kernel<<<1, 128, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_IMPL(quickllm_probe, CUDA, m) { m.impl("probe", &probe); }
"""


@pytest.fixture(scope="module")
def sm90a_probe_library(tmp_path_factory):
    """A source tree whose build.json lists one sm_90a source, built the way the package builds its
    sm_90a library (the just-in-time build's variant "sm90a")."""
    if _build.build_unavailable():
        pytest.skip(_build.build_unavailable())
    root = tmp_path_factory.mktemp("sm90a")
    (root / "csrc" / "probe").mkdir(parents=True)
    (root / "csrc" / "probe" / "probe.cu").write_text(_PROBE)
    cfg = {**_build.config(), "sources": [], "sources_sm90a": ["csrc/probe/probe.cu"]}
    (root / "csrc" / "build.json").write_text(json.dumps(cfg))
    plan = _build.jit_plan(variant="sm90a", root=root, cfg=cfg)
    assert plan["archs"] == ["90a"]
    assert [f for f in plan["nvcc_flags"] if f.startswith("-gencode")] == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert plan["library"].name == "quickllm_kernels_cuda_sm90a.so"
    return root, cfg, _build.jit_build(variant="sm90a", root=root, cfg=cfg)


def test_sm90a_library_builds_links_and_registers(sm90a_probe_library):
    """It compiles for sm_90a alone (an sm_90a-only instruction compiles, no other machine code is in
    the library), links against torch, and registers its kernels for ops that another library defines."""
    _, _, path = sm90a_probe_library  # built: ptxas took setmaxnreg, so every target was sm_90a
    cuobjdump = Path(_build.cuda_home(), "bin", "cuobjdump")
    if cuobjdump.exists():  # where the toolkit has it, the library's machine code says so itself
        elf = subprocess.run([str(cuobjdump), "--list-elf", str(path)], capture_output=True, text=True)
        assert elf.returncode == 0, elf.stderr
        assert set(re.findall(r"sm_\d+a?", elf.stdout)) == {"sm_90a"}, elf.stdout
    code = ("import torch\n"
            "lib = torch.library.Library('quickllm_probe', 'DEF')\n"
            "lib.define('probe(Tensor x) -> Tensor')\n"
            f"torch.ops.load_library({str(path)!r})\n"
            "assert torch._C._dispatch_has_kernel_for_dispatch_key('quickllm_probe::probe', 'CUDA')\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_sm90a_library_loads_after_the_main_one_on_sm90_only(sm90a_probe_library, monkeypatch):
    root, cfg, path = sm90a_probe_library
    monkeypatch.setattr(_library, "CUDA_EXT_LOADED", True)
    monkeypatch.setattr(_build, "source_root", lambda: root)
    monkeypatch.setattr(_build, "config", lambda r=None: cfg)
    monkeypatch.setitem(sys.modules, "quickllm_kernels._C_sm90a", None)  # no ahead-of-time module
    for arch, want in (("89", "not loaded: sm_90a code runs on sm_90 GPUs only (here: sm_89)"), (None, "no GPU")):
        monkeypatch.setattr(_build, "local_arch", lambda a=arch: a)
        monkeypatch.setattr(_library, "_sm90a_done", False)
        _library._load_sm90a(True, print)
        assert want in _library.SM90A_STATUS and _library._sm90a_done
    probe_def = torch.library.Library("quickllm_probe", "DEF")  # what the main library would define
    probe_def.define("probe(Tensor x) -> Tensor")
    monkeypatch.setattr(_build, "local_arch", lambda: "90")
    monkeypatch.setattr(_library, "_sm90a_done", False)
    _library._load_sm90a(True, print)
    assert _library.SM90A_STATUS == f"loaded (just-in-time build: {path})"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("quickllm_probe::probe", "CUDA")
