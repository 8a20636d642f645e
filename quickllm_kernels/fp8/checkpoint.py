"""DeepSeek-V3 FP8 checkpoints: convert a directory between block-FP8 and BF16.

    python -m quickllm_kernels.fp8 convert DeepSeek-V3/ DeepSeek-V3-bf16/ --to bf16
    python -m quickllm_kernels.fp8 convert my-finetune-bf16/ my-finetune-fp8/ --to fp8

FP8 layout (as DeepSeek ships it): every quantised `X.weight` is float8_e4m3fn with a float32
`X.weight_scale_inv` of one value per 128x128 block; config.json carries a `quantization_config`.
The conversion streams one shard at a time (memory: one shard plus the occasional scale fetched from
another shard), checks that every FP8 weight has its scale and every scale its weight before writing
anything, keeps every other tensor (embeddings, norms, router gate, lm_head) as it is, writes a new
model.safetensors.index.json and config.json, and copies the other files (tokenizer, ...). It writes
into DST.partial and renames it to DST only when complete, so an interrupted run leaves no mixed
checkpoint and can simply be re-run. It never writes into its input.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from .reference import FP8, weight_quant

SCALE_SUFFIX = "_scale_inv"
# Weights DeepSeek-V3 quantises: the linear projections of attention, MLP and experts. The router
# (`mlp.gate.weight`), embeddings, norms and lm_head stay in high precision.
QUANTISED = re.compile(r"(^|\.)(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
                       r"down_proj)\.weight$")


class CheckpointError(ValueError):
    """The input checkpoint is inconsistent or unreadable (the message names the file and tensor)."""


def _weight_map(src: Path) -> dict[str, str]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = src / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{src}: no model.safetensors.index.json or model.safetensors")
    return {k: "model.safetensors" for k in _keys(single)}


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # truncated or corrupt header
        raise CheckpointError(f"{path}: cannot read the safetensors header ({e})") from e


def _read(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from e


def _check_pairs(weight_map: dict[str, str], src: Path, to: str):
    """Every scale has its weight, and (for fp8 -> bf16) every FP8 weight its scale."""
    scales = {k for k in weight_map if k.endswith(SCALE_SUFFIX)}
    for s in sorted(scales):
        if s[: -len(SCALE_SUFFIX)] not in weight_map:
            raise CheckpointError(f"{src}: scale {s!r} ({weight_map[s]}) has no weight {s[:-len(SCALE_SUFFIX)]!r}")
    if to == "fp8" and scales:
        raise CheckpointError(f"{src}: already holds FP8 scales (e.g. {sorted(scales)[0]!r}); nothing to quantise")
    if to == "bf16":
        from safetensors import safe_open
        for shard in sorted(set(weight_map.values())):
            path = src / shard
            if not path.exists():
                raise CheckpointError(f"{path}: listed in the index but missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if key.endswith(SCALE_SUFFIX):
                            continue
                        dtype = f.get_slice(key).get_dtype()
                        if dtype in ("F8_E4M3", "float8_e4m3fn") and key + SCALE_SUFFIX not in weight_map:
                            raise CheckpointError(f"{path}: FP8 weight {key!r} has no {key + SCALE_SUFFIX!r}")
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read the safetensors header ({e})") from e


def convert_checkpoint(src, dst, *, to: str, block=(128, 128), out_dtype=torch.bfloat16, progress=True,
                       device="cpu") -> dict:
    """Convert checkpoint directory `src` into `dst` ("bf16": dequantise; "fp8": block-quantise).
    `device`: where each tensor is (de)quantised ("cuda" is faster on big checkpoints; the bits are
    the same, since weight_dequant is exact on every backend). Returns a summary dict (tensors
    converted and kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from . import weight_dequant as dequant_op

    if to not in ("bf16", "fp8"):
        raise ValueError(f"convert_checkpoint: to must be 'bf16' or 'fp8', got {to!r}")
    device = torch.device(device)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"convert_checkpoint: refusing to write into the input ({dst})")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"convert_checkpoint: {dst} exists and is not empty; refusing to overwrite it")
    config = json.loads((src / "config.json").read_text())
    weight_map = _weight_map(src)
    _check_pairs(weight_map, src, to)

    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    partial.mkdir(parents=True)
    new_map, total, converted, kept = {}, 0, 0, 0
    shards = sorted(set(weight_map.values()))
    for i, shard in enumerate(shards, 1):
        out = {}
        try:
            with safe_open(str(src / shard), framework="pt") as f:
                keys = list(f.keys())
                for key in keys:
                    if key.endswith(SCALE_SUFFIX):
                        continue
                    t = f.get_tensor(key)
                    if to == "bf16" and t.dtype == FP8:
                        scale_key = key + SCALE_SUFFIX
                        scale_file = weight_map[scale_key]
                        scale = f.get_tensor(scale_key) if scale_file == shard else _read(src / scale_file, scale_key)
                        out[key] = dequant_op(t.to(device), scale.to(device), block=block,
                                              out_dtype=out_dtype).cpu()
                        converted += 1
                    elif to == "fp8" and t.dim() == 2 and QUANTISED.search(key):
                        q, sc = weight_quant(t.to(device), block)
                        out[key], out[key + SCALE_SUFFIX] = q.cpu(), sc.cpu()
                        converted += 1
                    else:
                        out[key] = t
                        kept += 1
        except CheckpointError:
            raise
        except ValueError as e:  # a scale of the wrong shape
            raise CheckpointError(f"{src / shard}: {e}") from e
        except Exception as e:
            raise CheckpointError(f"{src / shard}: cannot read ({e})") from e
        save_file(out, str(partial / shard), metadata={"format": "pt"})
        for key, t in out.items():
            new_map[key] = shard
            total += t.numel() * t.element_size()
        if progress:
            print(f"[{i}/{len(shards)}] {shard}: {len(out)} tensors", file=sys.stderr, flush=True)

    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2) + "\n")
    if to == "bf16":
        config.pop("quantization_config", None)
        config["torch_dtype"] = "bfloat16"
    else:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(block)}
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for other in src.iterdir():  # tokenizer, generation config, code: copied as they are
        if other.is_file() and other.suffix != ".safetensors" and other.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(other, partial / other.name)
    if dst.exists():
        dst.rmdir()  # empty (checked above)
    partial.rename(dst)
    return {"shards": len(shards), "converted": converted, "kept": kept, "total_size": total}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quickllm_kernels.fp8", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint directory between FP8 and BF16")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=("bf16", "fp8"), required=True)
    c.add_argument("--device", default="cpu", help="where to (de)quantise each tensor, e.g. cuda (default cpu)")
    a = p.parse_args(argv)
    try:
        summary = convert_checkpoint(a.src, a.dst, to=a.to, device=a.device)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
