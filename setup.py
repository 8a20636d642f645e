"""Build of quickllm_kernels.

A plain `pip install -e .` (build isolation, no torch in the build) installs Python only; the package
then compiles its CUDA kernels for the local GPU on first use and caches them (quickllm_kernels/_build.py).
This file can also build them ahead of time, as the extension `quickllm_kernels._C`, when the build sees
the torch you run with (`--no-build-isolation`) and QUICKLLM_BUILD_CUDA allows it:

  QUICKLLM_BUILD_CUDA=auto (default)  build when nvcc is found and the build's torch is a CUDA build
  QUICKLLM_BUILD_CUDA=1               build, and fail loudly if that is not possible
  QUICKLLM_BUILD_CUDA=0               never build (and no just-in-time build at run time either)

The build never looks for a GPU: a CPU machine with nvcc builds the same library. Sources, arch list
and flags come from csrc/build.json (QUICKLLM_CUDA_ARCHS overrides the architectures), read through
quickllm_kernels/_build.py, the module the just-in-time build uses too; CMakeLists.txt reads the same file.
Wheels carry csrc/ inside the package so that the just-in-time build works there as well.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The package's build module, loaded by path: importing the package would need torch.
_spec = importlib.util.spec_from_file_location("_quickllm_build", ROOT / "quickllm_kernels" / "_build.py")
qbuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qbuild)


def _want_cuda():
    mode = os.environ.get("QUICKLLM_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"QUICKLLM_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "QUICKLLM_BUILD_CUDA=0"
    reason = qbuild.build_unavailable()
    if reason is None:
        return True, ""
    if mode == "1":
        sys.exit(f"QUICKLLM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"quickllm_kernels: no ahead-of-time CUDA extension ({reason}); the kernels are compiled on "
          f"first CUDA use instead when nvcc and a CUDA torch are there", file=sys.stderr)
    return False, reason


def _cuda_extension():
    os.environ.setdefault("CUDA_HOME", qbuild.cuda_home())  # before cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cfg = qbuild.config(ROOT)
    include = [str(ROOT)] + qbuild.cuda_include_dirs()
    ext = CUDAExtension(
        name="quickllm_kernels._C",
        sources=cfg["sources"],  # relative to the project root, as setuptools requires
        include_dirs=include,
        define_macros=[("QUICKLLM_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": cfg["cxx_flags"],
                            "nvcc": cfg["nvcc_flags"] + qbuild.gencode_flags(qbuild.archs(cfg, prefer_local=False))},
    )
    exts = [ext]
    if cfg["sources_sm90a"]:
        # Hopper-only kernels: sm_90a machine code alone, registrations only (the `_cuda_` schemas
        # come from _C), imported after _C on an sm_90 GPU (quickllm_kernels/_library.py)
        exts.append(CUDAExtension(
            name="quickllm_kernels._C_sm90a",
            sources=cfg["sources_sm90a"] + ["csrc/common/module_sm90a.cpp"],
            include_dirs=include,
            define_macros=[("QUICKLLM_PYTHON_MODULE", None)],
            extra_compile_args={"cxx": cfg["cxx_flags"],
                                "nvcc": cfg["nvcc_flags"] + qbuild.gencode_flags(["90a"])},
        ))
    jobs = os.environ.get("MAX_JOBS")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True, parallel=int(jobs) if jobs else None)}


class BuildPyWithSources(build_py):
    """Wheels carry csrc/ (and build.json) as quickllm_kernels/_csrc/csrc, for the just-in-time build."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install finds csrc/ in the source tree
            return
        dst = Path(self.build_lib) / "quickllm_kernels" / "_csrc" / "csrc"
        shutil.copytree(ROOT / "csrc", dst, dirs_exist_ok=True)


build, _ = _want_cuda()
if build:
    ext_modules, cmdclass = _cuda_extension()
else:
    ext_modules, cmdclass = [], {}
cmdclass["build_py"] = BuildPyWithSources

setup(ext_modules=ext_modules, cmdclass=cmdclass)
