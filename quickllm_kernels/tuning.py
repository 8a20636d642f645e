"""Per-device tuned kernel configurations: for a kernel and a shape key, the tile configuration that
measured fastest on this kind of GPU.

    cfg = tuning.lookup("fp8_block_gemm", device, keys, default)

`keys` go from the most specific to the most general (for the FP8 GEMM: the M bucket with N and K,
then the M bucket alone); the first one found in this device's table wins, else `default` (the
kernel's hand-written rule). Tables are JSON files named after the device
(`nvidia-h100-80gb-hbm3.json`), looked up in QUICKLLM_TUNED_CONFIGS (a directory of your own tunings)
and then in the package's configs/ directory:

    {"device": "NVIDIA H100 80GB HBM3", "capability": "sm_90", "torch": "...", "triton": "...",
     "kernels": {"fp8_block_gemm": {"M64_N7168_K18432": {"BM": 64, "BN": 128, "num_warps": 4,
                                                         "num_stages": 4, "ms": 0.123}, ...}}}

bench/tune.py measures candidate configurations on a GPU (each checked against the reference first)
and writes such a file atomically. Only the keys a kernel knows are used; extra fields (timings) are
kept for the record.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
ENV = "QUICKLLM_TUNED_CONFIGS"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the table's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_paths(device_name: str) -> list[Path]:
    """Where this device's tables are looked for, the user's directory first."""
    name = device_slug(device_name) + ".json"
    dirs = [Path(d).expanduser() for d in os.environ.get(ENV, "").split(os.pathsep) if d]
    return [d / name for d in dirs] + [PACKAGE_CONFIGS / name]


@functools.lru_cache(maxsize=None)
def _tables(device_name: str, env: str) -> tuple[dict, ...]:
    out = []
    for path in table_paths(device_name):
        if path.is_file():
            try:
                out.append(json.loads(path.read_text()).get("kernels", {}))
            except (OSError, ValueError) as e:  # an error naming the file, never a silent fallback
                raise ValueError(f"tuned configurations {path} cannot be read: {e}") from e
    return tuple(out)


def _device_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())


def lookup(kernel: str, device: torch.device, keys, default: dict) -> dict:
    """The tuned configuration of `kernel` for the first of `keys` that a table of `device` holds,
    restricted to the fields of `default`; else `default`."""
    name = _device_name(torch.device(device))
    if name is None:
        return default
    for table in _tables(name, os.environ.get(ENV, "")):
        entries = table.get(kernel, {})
        for key in keys:
            if key in entries:
                return {k: entries[key].get(k, v) for k, v in default.items()}
    return default


def write_table(path: Path, device: torch.device, kernels: dict) -> None:
    """Write (atomically) a table for `device` holding `kernels`, merged over what the file had."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.is_file() else {"kernels": {}}
    for kernel, entries in kernels.items():
        old["kernels"].setdefault(kernel, {}).update(entries)
    import triton  # noqa: PLC0415  (the tuner runs Triton kernels: it is there)

    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    old.update(device=props.name if props else str(device),
               capability=f"sm_{props.major}{props.minor}" if props else None,
               torch=torch.__version__, triton=triton.__version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    _tables.cache_clear()
