"""Hardware ceilings, environment and result records shared by the benchmarks (timing itself is
quickllm_kernels.timing: CUDA events, median of many runs after warm-up)."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from quickllm_kernels.timing import time_ms  # noqa: F401  (re-exported for the bench modules)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (bytes read + bytes written per second), the ceiling of
    memory-bound ops. On the CPU, a smaller buffer keeps smoke runs quick."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
           "host": platform.node()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   driver=torch.version.cuda)
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()})")
    from quickllm_kernels import _library
    env["cuda_extension"] = _library.CUDA_EXT_STATUS
    return env


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
