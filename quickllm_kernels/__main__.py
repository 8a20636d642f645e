"""Command line: `python -m quickllm_kernels info | demo | build`.

info   versions, whether the CUDA kernels loaded (and why not), the device, the backend per op.
demo   runs every op on a default workload on each backend that can run here, checks it against the
       reference and prints error and time per backend.
build  compiles the CUDA kernels into the just-in-time cache now (for the local GPU, or for
       QUICKLLM_CUDA_ARCHS / --archs), so that the first CUDA call does not wait for nvcc; works
       without a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import backend
from .info import format_info, info
from .timing import time_ms


def _rope_workload(device, tokens):
    # Qwen2-7B attention: 28 q heads, 4 kv heads, head_dim 128, q/k/v as views of one projection.
    from .rope import rope_cache

    hq, hk, d = 28, 4, 128
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(device=device, dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    cache = rope_cache(d, 4096, base=1e6, device=device)
    return (q, k, positions, cache), f"Qwen2-7B q/k, {tokens} tokens, bf16"


def demo(tokens: int | None = None, reps: int = 10) -> list[dict]:
    from .rope import apply_rope

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = tokens or (16384 if device.type == "cuda" else 256)
    args, what = _rope_workload(device, tokens)
    with backend.use_backend("reference"):
        want = [t.float() for t in apply_rope(*args)]
    rows = []
    for name in backend.BACKENDS:
        why = backend.unavailable_reason(name, "apply_rope", device)
        if why:
            rows.append({"op": "apply_rope", "backend": name, "skipped": why})
            continue
        with backend.use_backend(name):
            got = apply_rope(*args)
            err = max(float((g.float() - w).norm() / w.norm()) for g, w in zip(got, want))
            ms = time_ms(lambda: apply_rope(*args), device, warmup=3, rep=reps)
        rows.append({"op": "apply_rope", "workload": what, "backend": name, "rel_error": err,
                     "median_ms": ms, "device": str(device)})
    return rows


def _build_cmd(archs, verbose):
    from . import _build, _library

    why = _build.build_unavailable()
    if why:
        print(f"cannot build the CUDA kernels: {why}", file=sys.stderr)
        return 1
    arch_list = _build.parse_archs(archs, native=_build.local_arch()) if archs else None
    try:
        path = _build.jit_build(arch_list, verbose=verbose, log=print)
        targets = arch_list or _build.archs(_build.config(), prefer_local=True)
        if _build.config().get("sources_sm90a") and any(a.startswith("90") for a in targets):
            print(_build.jit_build(verbose=verbose, log=print, variant="sm90a"), "(sm_90a kernels, loaded after it on sm_90)")
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    if _library.CUDA_EXT_LOADED:  # the ahead-of-time module defines the same ops: loading both would abort
        print(f"{path}\n(built and loaded in the build process; this one has {_library.CUDA_EXT_STATUS})")
        return 0
    torch.ops.load_library(str(path))
    twins = sorted(n for n in _library.SCHEMAS if hasattr(torch.ops.quickllm, f"_cuda_{n}"))
    print(f"{path}\nregisters CUDA kernels for: {', '.join(twins)}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m quickllm_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="versions, extension status, device, backend per op")
    p_info.add_argument("--json", action="store_true")
    p_demo = sub.add_parser("demo", help="run every op on a default workload on each available backend")
    p_demo.add_argument("--tokens", type=int, default=None)
    p_demo.add_argument("--json", action="store_true")
    p_build = sub.add_parser("build", help="compile the CUDA kernels into the just-in-time cache")
    p_build.add_argument("--archs", default=None, help="e.g. 90 or '80;89;90' (default: the local GPU's, "
                         "else QUICKLLM_CUDA_ARCHS, else csrc/build.json's list)")
    p_build.add_argument("--verbose", action="store_true")
    a = parser.parse_args(argv)
    if a.cmd == "build":
        return _build_cmd(a.archs, a.verbose)
    if a.cmd == "info":
        print(json.dumps(info(), indent=2) if a.json else format_info())
        return 0
    rows = demo(a.tokens)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| op | workload | backend | rel. error vs reference | median ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['op']} | | {r['backend']} | skipped: {r['skipped']} | |")
        else:
            print(f"| {r['op']} | {r['workload']} | {r['backend']} | {r['rel_error']:.2e} | {r['median_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
