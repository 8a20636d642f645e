"""What is installed, what loaded, and which backend each op uses: `quickllm_kernels.info()`."""
from __future__ import annotations

import os
import platform

import torch

from . import _library, backend


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def info() -> dict:
    """A dict of versions, the CUDA kernels' load status, the device, and per op: the backend a call
    would use now on this device, why each other backend cannot run, and the backend its last call ran.
    Never compiles anything: CUDA kernels not built yet are reported as such."""
    from ._op import OPS

    dev = _device()
    ok, triton_why = backend.triton_status()
    report = {
        "quickllm_kernels": __import__("quickllm_kernels").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_why,
        "cuda_extension": _library.CUDA_EXT_STATUS,
        "sm90a_kernels": _library.SM90A_STATUS,
        "device": (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
                   if dev.type == "cuda" else "cpu (no CUDA device)"),
        "requested_backend": backend.requested_backend(),
        "env": {k: os.environ[k] for k in ("QUICKLLM_BACKEND", "QUICKLLM_BUILD_CUDA", "QUICKLLM_CUDA_ARCHS",
                                           "QUICKLLM_CACHE_DIR", "QUICKLLM_SYNC_CHECKS", "TRITON_INTERPRET")
                if k in os.environ},
        "ops": {},
    }
    last = backend.last_backends()
    for name, op in OPS.items():
        unavailable = {b: op.unavailable(b, dev, build=False) for b in backend.BACKENDS}
        try:
            would = op.would_use(dev)
        except backend.BackendUnavailable as e:
            would = f"error: {e}"
        report["ops"][name] = {
            "family": op.family,
            "would_use": would,
            "unavailable": {b: why for b, why in unavailable.items() if why},
            "last_ran": last.get(name),
        }
    return report


def format_info(report: dict | None = None) -> str:
    r = report or info()
    lines = [f"quickllm_kernels {r['quickllm_kernels']}  (python {r['python']})",
             f"torch            {r['torch']} (CUDA {r['torch_cuda']})",
             f"triton           {r['triton']}",
             f"CUDA extension   {r['cuda_extension']}",
             f"sm_90a kernels   {r['sm90a_kernels']}",
             f"device           {r['device']}",
             f"backend request  {r['requested_backend']}"]
    for k, v in r["env"].items():
        lines.append(f"env              {k}={v}")
    lines.append("")
    lines.append("| op | would use | last ran | unavailable |")
    lines.append("|---|---|---|---|")
    for op, o in r["ops"].items():
        why = "; ".join(f"{b}: {w}" for b, w in o["unavailable"].items()) or "-"
        lines.append(f"| {op} | {o['would_use']} | {o['last_ran'] or '-'} | {why} |")
    return "\n".join(lines)
