"""The CMake build (csrc/build.json, same sources as setup.py) gives a library that C++ and serving
engines load with torch.ops.load_library: the schemas of schemas.def, with the public ops bound to
the CUDA kernels. CI builds it and sets QUICKLLM_CMAKE_LIBRARY; elsewhere this test is skipped."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LIB = os.environ.get("QUICKLLM_CMAKE_LIBRARY")
SCHEMAS = Path(__file__).resolve().parents[1] / "quickllm_kernels" / "schemas.def"


@pytest.mark.skipif(not LIB, reason="QUICKLLM_CMAKE_LIBRARY not set (the CMake library was not built)")
def test_cmake_library_registers_public_ops_on_cuda():
    kinds = re.findall(r'^QUICKLLM_(OP|COMPOSITE)\((\w+),\s*"(.*)"\)\s*$', SCHEMAS.read_text(), re.M)
    schemas = {name: sig for kind, name, sig in kinds if kind == "OP"}
    composite = {name: sig for kind, name, sig in kinds if kind == "COMPOSITE"}
    assert schemas
    # A fresh interpreter that never imports quickllm_kernels: the library must stand alone.
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({LIB!r})\n"
        f"schemas = {schemas!r}\n"
        "for name, sig in schemas.items():\n"
        "    got = str(getattr(torch.ops.quickllm, name).default._schema)\n"
        "    assert got == f'quickllm::{name}{sig}', got\n"
        "    for op in (name, '_cuda_' + name):\n"
        "        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'quickllm::{op}', 'CUDA'), op\n"
        "        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f'quickllm::{op}', 'CPU'), op\n"
        f"for name, sig in {composite!r}.items():  # defined, run through the Python package only\n"
        "    assert str(getattr(torch.ops.quickllm, name).default._schema) == f'quickllm::{name}{sig}'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
