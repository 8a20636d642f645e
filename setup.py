"""Build of quickllm_kernels.

The package is pure Python unless the CUDA extension `quickllm_kernels._C` is built, which happens
ahead of time here (ninja, through torch.utils.cpp_extension) when QUICKLLM_BUILD_CUDA allows it:

  QUICKLLM_BUILD_CUDA=auto (default)  build when nvcc is found and the installed torch is a CUDA build
  QUICKLLM_BUILD_CUDA=1               build, and fail loudly if that is not possible
  QUICKLLM_BUILD_CUDA=0               never build: a pure-Python install (Triton and reference backends)

The build never looks for a GPU: a CPU machine with nvcc builds the same library. Sources, arch list
and flags come from csrc/build.json, which CMakeLists.txt reads too. Build with
`pip install --no-build-isolation -e .` so that the build sees the torch you run with.
"""
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _want_cuda():
    mode = os.environ.get("QUICKLLM_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"QUICKLLM_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "QUICKLLM_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:  # build isolation without torch, or no torch at all
        reason = f"torch is not importable in the build environment ({e})"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is not a CUDA build"
        elif CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists() and not shutil.which("nvcc"):
            reason = "nvcc not found (set CUDA_HOME)"
        else:
            return True, ""
    if mode == "1":
        sys.exit(f"QUICKLLM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"quickllm_kernels: building without the CUDA extension: {reason}", file=sys.stderr)
    return False, reason


def _cuda_extension():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cfg = json.loads((ROOT / "csrc" / "build.json").read_text())
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cfg["cuda_archs"]]
    # PTX of the newest arch, so later GPUs can JIT it.
    gencode.append(f"-gencode=arch=compute_{cfg['cuda_archs'][-1]},code=compute_{cfg['cuda_archs'][-1]}")
    ext = CUDAExtension(
        name="quickllm_kernels._C",
        sources=cfg["sources"],  # relative to the project root, as setuptools requires
        include_dirs=[str(ROOT)],
        define_macros=[("QUICKLLM_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": cfg["cxx_flags"], "nvcc": cfg["nvcc_flags"] + gencode},
    )
    exts = [ext]
    if cfg["sources_sm90a"]:
        exts.append(CUDAExtension(
            name="quickllm_kernels._C_sm90a",
            sources=cfg["sources_sm90a"],
            include_dirs=[str(ROOT)],
            extra_compile_args={"cxx": cfg["cxx_flags"],
                                "nvcc": cfg["nvcc_flags"] + ["-gencode=arch=compute_90a,code=sm_90a"]},
        ))
    jobs = os.environ.get("MAX_JOBS")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True, parallel=int(jobs) if jobs else None)}


build, _ = _want_cuda()
if build:
    ext_modules, cmdclass = _cuda_extension()
else:
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
