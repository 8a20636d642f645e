"""TensorRT-LLM: checkpoints that TensorRT-LLM's `trtllm-build` reads.

    python -m quickllm_kernels.integrations.trtllm export Qwen2.5-7B-Instruct/ qwen-tp2/ --tp 2
    trtllm-build --checkpoint_dir qwen-tp2/ --output_dir engine/ ...      # TensorRT-LLM <= 1.2

Checkpoint exporter. `export_checkpoint(src, dst, tp=, dtype=)` turns a transformers checkpoint
directory (config.json plus one model.safetensors or shards listed in model.safetensors.index.json)
of Qwen2 (Qwen2ForCausalLM), Mixtral (MixtralForCausalLM) or Llama (LlamaForCausalLM) into
TensorRT-LLM's checkpoint format, the one its `trtllm-build` reads (TensorRT-LLM 1.2; later releases
dropped the TensorRT engine builder, releases before 1.1 know fewer mapping fields): a `config.json`
(the model config of the format, Qwen-style for Qwen2, LLaMA-style for Llama and Mixtral, with the
values TensorRT-LLM's own converter writes) and one `rank{r}.safetensors` per tensor-parallel rank
under the format's weight names:

    transformer.vocab_embedding.weight            [V, H]             the whole table on every rank
    transformer.layers.{i}.input_layernorm.weight [H]
    transformer.layers.{i}.attention.qkv.weight   [(q + 2 kv) D / tp, H]  rank r: its q heads, then its
                                                                     k heads, then its v heads
    transformer.layers.{i}.attention.qkv.bias     [(q + 2 kv) D / tp]     Qwen2 only, same order
    transformer.layers.{i}.attention.dense.weight [H, q D / tp]      o_proj, split along its input
    transformer.layers.{i}.post_layernorm.weight  [H]
    dense MLP (Qwen2, Llama):
    transformer.layers.{i}.mlp.fc.weight          [I / tp, H]        gate_proj (the activated half)
    transformer.layers.{i}.mlp.gate.weight        [I / tp, H]        up_proj
    transformer.layers.{i}.mlp.proj.weight        [H, I / tp]        down_proj
    Mixtral's experts:
    transformer.layers.{i}.mlp.router.weight      [E, H]             float32, not split
    transformer.layers.{i}.mlp.fc.weight          [E, 2 I / tp, H]   per expert: w3's rows of rank r,
                                                                     then w1's (up, then gate)
    transformer.layers.{i}.mlp.proj.weight        [E, H, I / tp]     w2, split along its input
    transformer.ln_f.weight                       [H]
    lm_head.weight                                [Vp / tp, H]       Vp = V rounded up to a multiple of
                                                                     tp, zero rows after V

With fewer KV heads than ranks (tp a multiple of them) each KV head is repeated tp / kv times so that
every rank holds one. A model with tied embeddings (Qwen2-0.5B) gets its lm_head from the embedding
table. Only unquantised checkpoints, without pipeline parallelism; experts are split by tensor
parallelism (TensorRT-LLM's default moe_tp_size = tp), never by expert parallelism.

It streams: source tensors are read slice by slice through safetensors' `safe_open` (each rank's slice
only, in blocks of at most 64 MiB), converted to the requested dtype and appended to the rank files
(whose headers are computed before any weight is read), so memory stays around one block whatever the
model's size. Everything is checked first (architecture, tensor-parallel divisibility, every tensor's
presence, shape and dtype, no tensor left unused); then it writes into a temporary directory beside
DST and renames it to DST at the end, so a failure leaves nothing behind. DST must not exist.

`load_checkpoint(dir)` reads such a directory back (config dict, one state dict per rank) and
`join_ranks(config, ranks)` undoes the split: the transformers tensor names and shapes, so a round trip
can be compared with the source (the router comes back as the float32 it is stored as).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["export_checkpoint", "load_checkpoint", "join_ranks", "TrtllmCheckpointError", "SUPPORTED", "main"]


# ---------------------------------------------------------------------------------------------------
# Checkpoint exporter: TensorRT-LLM's checkpoint format (config.json + rank{r}.safetensors)
# ---------------------------------------------------------------------------------------------------

# transformers architecture -> (model_type, TensorRT-LLM config family)
SUPPORTED = {
    "Qwen2ForCausalLM": ("qwen2", "qwen"),
    "LlamaForCausalLM": ("llama", "llama"),
    "MixtralForCausalLM": ("mixtral", "llama"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_BLOCK_BYTES = 64 << 20  # largest slice read at once
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry


class TrtllmCheckpointError(ValueError):
    """The arguments or the input checkpoint cannot be exported (the message names the argument,
    config field, file or tensor)."""


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Rows [r0, r1) of a source tensor, of its columns [c0, c1) where c0 is set (2-D tensors), in
    row-major order; src None: a [r1 - r0, cols] block of zeros."""
    src: str | None
    r0: int
    r1: int
    c0: int | None = None
    c1: int | None = None
    cols: int = 0


@dataclasses.dataclass
class _Out:
    name: str
    shape: tuple
    dtype: torch.dtype
    pieces: list  # [_Piece], concatenated in row-major order


class _Source:
    """A transformers checkpoint directory: its config and, per tensor, the file, dtype and shape
    (read from the safetensors headers only)."""

    def __init__(self, src: Path):
        self.dir = src
        if not src.is_dir():
            raise TrtllmCheckpointError(f"SRC {src} is not a directory")
        cfg = src / "config.json"
        if not cfg.is_file():
            raise TrtllmCheckpointError(f"SRC {src} has no config.json (a transformers checkpoint directory "
                                        "holds config.json and *.safetensors)")
        try:
            self.config = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise TrtllmCheckpointError(f"SRC {cfg}: cannot read it ({e})") from e
        index = src / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise TrtllmCheckpointError(f"SRC {index}: no readable weight_map ({e})") from e
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise TrtllmCheckpointError(f"SRC {src} has no *.safetensors files (only safetensors checkpoints "
                                        "are read)")
        from safetensors import safe_open
        self.tensors = {}  # name -> (path, dtype name, shape)
        for name in files:
            path = src / name
            if not path.is_file():
                raise TrtllmCheckpointError(f"SRC {src}: {name} is listed in model.safetensors.index.json "
                                            "but missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self.tensors[key] = (path, s.get_dtype(), tuple(s.get_shape()))
            except Exception as e:  # truncated or corrupt header
                raise TrtllmCheckpointError(f"SRC {path}: cannot read the safetensors header ({e})") from e

    def check(self, name: str, shape: tuple):
        if name not in self.tensors:
            raise TrtllmCheckpointError(f"SRC {self.dir}: tensor {name!r} is missing")
        _, dt, got = self.tensors[name]
        if got != tuple(shape):
            raise TrtllmCheckpointError(f"SRC {self.dir}: tensor {name!r} has shape {list(got)}, config.json "
                                        f"implies {list(shape)}")
        if dt not in _ST_DTYPES:
            raise TrtllmCheckpointError(f"SRC {self.dir}: tensor {name!r} is {dt}; only float32, float16 and "
                                        "bfloat16 weights are exported")


def _rope(hf: dict, default_theta: float):
    """rotary_base and rotary_scaling as TensorRT-LLM takes them, from either transformers layout
    (rope_theta + rope_scaling, or rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", default_theta))
    scaling = hf.get("rope_scaling")
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        # the format has named the kind "type" and "rope_type": both are written
        scaling = None if kind in (None, "default") else dict(scaling, type=kind, rope_type=kind)
    return float(theta), scaling or None


@dataclasses.dataclass
class _Model:
    arch: str
    family: str  # "qwen" or "llama" (TensorRT-LLM's config class)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    experts: int  # 0: dense MLP
    tied: bool
    bias: bool  # q/k/v biases (Qwen2)


def _model(source: _Source) -> _Model:
    hf = source.config
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None or SUPPORTED[arch][0] != model_type:
        raise TrtllmCheckpointError(
            f"SRC {source.dir}/config.json: architectures {archs} (model_type {model_type!r}) is not supported; "
            f"supported: {', '.join(f'{a} ({t})' for a, (t, _) in SUPPORTED.items())}")
    if hf.get("quantization_config"):
        raise TrtllmCheckpointError(f"SRC {source.dir}/config.json: quantization_config is set; only unquantised "
                                    "checkpoints are exported")
    if arch == "LlamaForCausalLM":
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise TrtllmCheckpointError(f"SRC {source.dir}/config.json: {flag} = true is not supported")
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    if arch == "MixtralForCausalLM":
        need += ["num_local_experts", "num_experts_per_tok"]
    for key in need:
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise TrtllmCheckpointError(f"SRC {source.dir}/config.json: {key} must be a positive integer, "
                                        f"got {hf.get(key)!r}")
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    # tied: as the config says; a checkpoint without lm_head.weight and without the field is tied
    tied = bool(hf.get("tie_word_embeddings", "lm_head.weight" not in source.tensors))
    return _Model(arch=arch, family=SUPPORTED[arch][1], layers=hf["num_hidden_layers"], hidden=hf["hidden_size"],
                  heads=heads, kv_heads=kv, head_dim=head_dim, inter=hf["intermediate_size"], vocab=hf["vocab_size"],
                  experts=hf.get("num_local_experts", 0) if arch == "MixtralForCausalLM" else 0, tied=tied,
                  bias=arch == "Qwen2ForCausalLM")


def _check_tp(m: _Model, tp, src: Path):
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TrtllmCheckpointError(f"--tp must be a positive integer, got {tp!r}")
    cfg = f"{src}/config.json"
    if m.heads % tp:
        raise TrtllmCheckpointError(f"--tp {tp} does not divide num_attention_heads = {m.heads} ({cfg})")
    if m.kv_heads % tp and tp % m.kv_heads:
        raise TrtllmCheckpointError(f"--tp {tp} does not divide num_key_value_heads = {m.kv_heads} and is not a "
                                    f"multiple of it (fewer KV heads than ranks are repeated) ({cfg})")
    if m.inter % tp:
        raise TrtllmCheckpointError(f"--tp {tp} does not divide intermediate_size = {m.inter} ({cfg})")


def _trtllm_config(m: _Model, hf: dict, tp: int, dtype: str) -> dict:
    """config.json of TensorRT-LLM's checkpoint format for this model: every field of its Qwen-style
    (Qwen2) or LLaMA-style (Llama, Mixtral) config, with the values TensorRT-LLM's own converter
    derives from the transformers config."""
    theta, scaling = _rope(hf, 100000.0 if m.family == "qwen" else 10000.0)
    cfg = {
        "architecture": m.arch,
        "dtype": dtype,
        "vocab_size": m.vocab,
        "hidden_size": m.hidden,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "hidden_act": "swiglu" if m.experts else hf.get("hidden_act", "silu"),
        "logits_dtype": "float32",
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "runtime_defaults": None,
        "position_embedding_type": "rope_gpt_neox",
        "num_key_value_heads": m.kv_heads,
        "intermediate_size": m.inter,
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "mapping": {"world_size": tp, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp, "pp_size": 1,
                    "moe_tp_size": tp, "moe_cluster_size": 1, "moe_ep_size": 1, "attn_tp_size": tp,
                    "attn_cp_size": 1, "cp_config": {}, "enable_attention_dp": False,
                    "enable_lm_head_tp_in_adp": False},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128,
                         "smoothquant_val": 0.5, "clamp_val": None, "use_meta_recipe": False,
                         "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "head_size": m.head_dim,
        "qk_layernorm": False,
        "rotary_embedding_dim": m.head_dim,
        "mlp_bias": False,
        "attn_bias": m.bias,
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "disable_weight_only_quant_plugin": False,
        "tie_word_embeddings": m.tied,
        # normalization_mode 1 = RENORMALIZE (softmax over the top-k logits, as Mixtral); an empty MoE
        # has 0 (NONE) in the Qwen-style config and None in the LLaMA-style one, as TensorRT-LLM writes
        "moe": {"num_experts": m.experts, "shared_expert_intermediate_size": 0,
                "top_k": hf.get("num_experts_per_tok", 0) if m.experts else 0,
                "normalization_mode": 1 if m.experts else (0 if m.family == "qwen" else None),
                "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
                "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0},
    }
    if m.family == "qwen":
        cfg.update(num_labels=1, use_logn_attn=False, seq_length=hf.get("seq_length", 8192), qwen_type="qwen2",
                   moe_intermediate_size=0, moe_shared_expert_intermediate_size=0)
    else:
        cfg.update(residual_mlp=False, remove_duplicated_kv_heads=False, fc_after_embed=False,
                   use_input_layernorm_in_first_layer=True, use_last_layernorm=True, layer_idx_offset=0,
                   embedding_multiplier=1.0, attention_multiplier=1.0, residual_multiplier=1.0,
                   output_multiplier_scale=1.0, has_partial_lora_mask=False)
    return cfg


def _rows(src, r0, r1):
    return _Piece(src, r0, r1)


def _cols(src, rows, c0, c1):
    return _Piece(src, 0, rows, c0, c1)


def _plan(m: _Model, source: _Source, tp: int, dtype: torch.dtype):
    """Per rank, the output tensors (same names and order on every rank) and where their bytes come
    from. Checks every source tensor's presence and shape and that none is left unused."""
    H, D, V = m.hidden, m.head_dim, m.vocab
    q_rank = m.heads // tp * D
    kv_rank = max(m.kv_heads // tp, 1) * D  # fewer KV heads than ranks: one (repeated) head per rank
    i_rank = m.inter // tp
    v_pad = math.ceil(V / tp) * tp
    v_rank = v_pad // tp
    used = set()

    def src(name, shape):
        source.check(name, shape)
        used.add(name)
        return name

    embed = src("model.embed_tokens.weight", (V, H))
    lm = embed if m.tied else src("lm_head.weight", (V, H))
    if m.tied:
        used.add("lm_head.weight")  # a tied checkpoint may still carry a copy; the table is the source
    ranks = [[] for _ in range(tp)]

    def out(name, shape, per_rank, out_dtype=dtype):
        for r in range(tp):
            ranks[r].append(_Out(name, tuple(shape), out_dtype, per_rank(r)))

    def kv_rows(r):
        if m.kv_heads >= tp:
            return r * kv_rank, (r + 1) * kv_rank
        head = r // (tp // m.kv_heads)
        return head * D, (head + 1) * D

    out("transformer.vocab_embedding.weight", (V, H), lambda r: [_rows(embed, 0, V)])
    for i in range(m.layers):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        a = p + "self_attn."
        qw = src(a + "q_proj.weight", (m.heads * D, H))
        kw = src(a + "k_proj.weight", (m.kv_heads * D, H))
        vw = src(a + "v_proj.weight", (m.kv_heads * D, H))
        out(t + "input_layernorm.weight", (H,), lambda r: [_rows(src(p + "input_layernorm.weight", (H,)), 0, H)])
        out(t + "attention.qkv.weight", (q_rank + 2 * kv_rank, H),
            lambda r: [_rows(qw, r * q_rank, (r + 1) * q_rank), _rows(kw, *kv_rows(r)), _rows(vw, *kv_rows(r))])
        if m.bias:
            qb = src(a + "q_proj.bias", (m.heads * D,))
            kb = src(a + "k_proj.bias", (m.kv_heads * D,))
            vb = src(a + "v_proj.bias", (m.kv_heads * D,))
            out(t + "attention.qkv.bias", (q_rank + 2 * kv_rank,),
                lambda r: [_rows(qb, r * q_rank, (r + 1) * q_rank), _rows(kb, *kv_rows(r)), _rows(vb, *kv_rows(r))])
        ow = src(a + "o_proj.weight", (H, m.heads * D))
        out(t + "attention.dense.weight", (H, q_rank), lambda r: [_cols(ow, H, r * q_rank, (r + 1) * q_rank)])
        if m.experts:
            e = p + "block_sparse_moe."
            gate = src(e + "gate.weight", (m.experts, H))
            w1 = [src(f"{e}experts.{x}.w1.weight", (m.inter, H)) for x in range(m.experts)]
            w2 = [src(f"{e}experts.{x}.w2.weight", (H, m.inter)) for x in range(m.experts)]
            w3 = [src(f"{e}experts.{x}.w3.weight", (m.inter, H)) for x in range(m.experts)]
            # the router stays float32 whatever the dtype, as TensorRT-LLM's checkpoint format has it
            out(t + "mlp.router.weight", (m.experts, H), lambda r: [_rows(gate, 0, m.experts)], torch.float32)
            out(t + "mlp.fc.weight", (m.experts, 2 * i_rank, H),
                lambda r: [pc for x in range(m.experts)
                           for pc in (_rows(w3[x], r * i_rank, (r + 1) * i_rank),
                                      _rows(w1[x], r * i_rank, (r + 1) * i_rank))])
            out(t + "mlp.proj.weight", (m.experts, H, i_rank),
                lambda r: [_cols(w2[x], H, r * i_rank, (r + 1) * i_rank) for x in range(m.experts)])
        else:
            g = src(p + "mlp.gate_proj.weight", (m.inter, H))
            u = src(p + "mlp.up_proj.weight", (m.inter, H))
            d = src(p + "mlp.down_proj.weight", (H, m.inter))
            out(t + "mlp.fc.weight", (i_rank, H), lambda r: [_rows(g, r * i_rank, (r + 1) * i_rank)])
            out(t + "mlp.gate.weight", (i_rank, H), lambda r: [_rows(u, r * i_rank, (r + 1) * i_rank)])
            out(t + "mlp.proj.weight", (H, i_rank), lambda r: [_cols(d, H, r * i_rank, (r + 1) * i_rank)])
        out(t + "post_layernorm.weight", (H,),
            lambda r: [_rows(src(p + "post_attention_layernorm.weight", (H,)), 0, H)])
    out("transformer.ln_f.weight", (H,), lambda r: [_rows(src("model.norm.weight", (H,)), 0, H)])

    def lm_rows(r):
        r0, r1 = r * v_rank, (r + 1) * v_rank
        pieces = [_rows(lm, r0, min(r1, V))] if r0 < V else []
        if r1 > V:  # the padding rows of the last rank(s)
            pieces.append(_Piece(None, max(r0, V), r1, cols=H))
        return pieces
    out("lm_head.weight", (v_rank, H), lm_rows)

    unused = sorted(k for k in source.tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise TrtllmCheckpointError(f"SRC {source.dir}: tensor {unused[0]!r}{more} is not part of the {m.arch} "
                                    "layout this exporter writes (a variant it does not cover)")
    return ranks


def _header(outs: list) -> bytes:
    """A safetensors header for these tensors, in this order, padded to 8 bytes."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for o in outs:
        size = math.prod(o.shape) * o.dtype.itemsize
        meta[o.name] = {"dtype": _ST_NAMES[o.dtype], "shape": list(o.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class _Reader:
    """Slices of source tensors through safe_open; the files opened stay open until `close`, which the
    exporter calls after each output tensor (an mmap kept open would keep its pages resident)."""

    def __init__(self, source: _Source):
        self.source, self.stack, self.files = source, contextlib.ExitStack(), {}

    def slice(self, name: str):
        from safetensors import safe_open
        path = self.source.tensors[name][0]
        if path not in self.files:
            self.files[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.files[path].get_slice(name)

    def close(self):
        self.stack.close()
        self.files = {}


def _write_piece(f, piece: _Piece, reader: _Reader, dtype: torch.dtype) -> int:
    """Append one piece, converted to dtype, in blocks of at most _BLOCK_BYTES; returns bytes written."""
    written = 0
    if piece.src is None:
        rows = piece.r1 - piece.r0
        block = max(1, _BLOCK_BYTES // (piece.cols * dtype.itemsize))
        for r0 in range(0, rows, block):
            written += _write_tensor(f, torch.zeros(min(block, rows - r0), piece.cols, dtype=dtype))
        return written
    _, dt, shape = reader.source.tensors[piece.src]
    row = math.prod(shape[1:]) if piece.c0 is None else piece.c1 - piece.c0
    block = max(1, _BLOCK_BYTES // (row * _ST_DTYPES[dt].itemsize))
    sl = reader.slice(piece.src)
    for r0 in range(piece.r0, piece.r1, block):
        r1 = min(r0 + block, piece.r1)
        t = sl[r0:r1] if piece.c0 is None else sl[r0:r1, piece.c0:piece.c1]
        written += _write_tensor(f, t.to(dtype))
    return written


def _write_tensor(f, t: torch.Tensor) -> int:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    f.write(data)
    return data.nbytes


def _progress(total: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        return contextlib.nullcontext()
    return tqdm(total=total, desc="trtllm export", unit="tensor", file=sys.stderr)


def export_checkpoint(src, dst, tp: int = 1, dtype: str | None = None, progress: bool = False) -> dict:
    """Write TensorRT-LLM's checkpoint for the transformers checkpoint directory `src` into `dst`
    (which must not exist), split for `tp` tensor-parallel ranks, weights in `dtype` ("bfloat16",
    "float16", "float32"; default: the checkpoint's own). Returns a summary dict (ranks, tensors per
    rank, bytes written, dtype). Raises TrtllmCheckpointError, naming the argument or tensor, before
    anything is written; a failure while writing removes what was written."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dtype is not None and dtype not in DTYPES:
        raise TrtllmCheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dst.exists() or dst.is_symlink():
        raise TrtllmCheckpointError(f"DST {dst} exists; refusing to overwrite it")
    if not dst.parent.is_dir():
        raise TrtllmCheckpointError(f"DST {dst}: its parent directory does not exist")
    source = _Source(src)
    m = _model(source)
    _check_tp(m, tp, src)
    if dtype is None:  # the checkpoint's own: config "dtype" ("torch_dtype" before transformers 5), else
        dtype = source.config.get("dtype") or source.config.get("torch_dtype")  # the embedding's
        if dtype not in DTYPES:
            st = source.tensors.get("model.embed_tokens.weight", (None, "F32", None))[1]
            dtype = {v: k for k, v in DTYPES.items()}.get(_ST_DTYPES.get(st), "float32")
    ranks = _plan(m, source, tp, DTYPES[dtype])
    config = _trtllm_config(m, source.config, tp, dtype)

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()
    total = 0
    try:
        with contextlib.ExitStack() as files, _progress(len(ranks[0]), progress) as bar:
            fs = []
            for r, outs in enumerate(ranks):
                f = files.enter_context(open(tmp / f"rank{r}.safetensors", "wb"))
                f.write(_header(outs))
                fs.append(f)
            reader = files.enter_context(contextlib.closing(_Reader(source)))
            for j in range(len(ranks[0])):
                for r in range(tp):
                    o = ranks[r][j]
                    n = sum(_write_piece(fs[r], pc, reader, o.dtype) for pc in o.pieces)
                    if n != math.prod(o.shape) * o.dtype.itemsize:
                        raise AssertionError(f"{o.name}: wrote {n} bytes for shape {list(o.shape)}")
                    total += n
                reader.close()
                if bar is not None:
                    bar.update(1)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        os.rename(tmp, dst)  # atomic on one file system; fails if DST appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dst": str(dst), "architecture": m.arch, "tp": tp, "dtype": dtype, "tensors_per_rank": len(ranks[0]),
            "bytes": total}


def load_checkpoint(path) -> tuple[dict, list[dict]]:
    """(config dict, [state dict of rank 0, rank 1, ...]) of a TensorRT-LLM checkpoint directory."""
    from safetensors.torch import load_file
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    world = config["mapping"]["world_size"]
    return config, [load_file(str(path / f"rank{r}.safetensors")) for r in range(world)]


def join_ranks(config: dict, ranks: list[dict]) -> dict:
    """Undo the split of an exported checkpoint: transformers names and shapes (lm_head without its
    padding rows, KV heads once each, Mixtral's experts one by one). lm_head.weight is returned also
    for a tied model; the router stays float32. Raises ValueError where repeated copies differ."""
    tp = config["mapping"]["tp_size"]
    if len(ranks) != tp or config["mapping"].get("pp_size", 1) != 1:
        raise ValueError(f"join_ranks: {len(ranks)} rank state dicts for tp_size {tp}")
    H, D, V = config["hidden_size"], config["head_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    experts = config["moe"]["num_experts"]
    q_rank, kv_rank = heads // tp * D, max(kv // tp, 1) * D

    def same(name):
        for r in range(1, tp):
            if not torch.equal(ranks[r][name], ranks[0][name]):
                raise ValueError(f"join_ranks: {name} differs between rank 0 and rank {r}")
        return ranks[0][name]

    def cat(name, dim):
        return torch.cat([ranks[r][name] for r in range(tp)], dim)

    def kv_join(parts):  # one part per rank; with repeated heads keep one copy per head
        if kv >= tp:
            return torch.cat(parts, 0)
        reps = tp // kv
        for r in range(tp):
            if not torch.equal(parts[r], parts[r - r % reps]):
                raise ValueError(f"join_ranks: repeated KV head of rank {r} differs from rank {r - r % reps}'s")
        return torch.cat(parts[::reps], 0)

    out = {"model.embed_tokens.weight": same("transformer.vocab_embedding.weight"),
           "model.norm.weight": same("transformer.ln_f.weight"),
           "lm_head.weight": cat("lm_head.weight", 0)[:V]}
    for i in range(config["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        out[p + "input_layernorm.weight"] = same(t + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = same(t + "post_layernorm.weight")
        for kind in ("weight", "bias") if config.get("attn_bias") else ("weight",):
            split = [ranks[r][f"{t}attention.qkv.{kind}"].split([q_rank, kv_rank, kv_rank], 0) for r in range(tp)]
            out[f"{p}self_attn.q_proj.{kind}"] = torch.cat([s[0] for s in split], 0)
            out[f"{p}self_attn.k_proj.{kind}"] = kv_join([s[1] for s in split])
            out[f"{p}self_attn.v_proj.{kind}"] = kv_join([s[2] for s in split])
        out[p + "self_attn.o_proj.weight"] = cat(t + "attention.dense.weight", 1)
        if experts:
            e = p + "block_sparse_moe."
            out[e + "gate.weight"] = same(t + "mlp.router.weight")
            fc = [ranks[r][t + "mlp.fc.weight"].chunk(2, 1) for r in range(tp)]  # (w3, w1) per rank
            w3, w1 = torch.cat([f[0] for f in fc], 1), torch.cat([f[1] for f in fc], 1)
            w2 = cat(t + "mlp.proj.weight", 2)
            for x in range(experts):
                out[f"{e}experts.{x}.w1.weight"] = w1[x]
                out[f"{e}experts.{x}.w2.weight"] = w2[x]
                out[f"{e}experts.{x}.w3.weight"] = w3[x]
        else:
            out[p + "mlp.gate_proj.weight"] = cat(t + "mlp.fc.weight", 0)
            out[p + "mlp.up_proj.weight"] = cat(t + "mlp.gate.weight", 0)
            out[p + "mlp.down_proj.weight"] = cat(t + "mlp.proj.weight", 1)
    return out


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quickllm_kernels.integrations.trtllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write TensorRT-LLM's checkpoint (for trtllm-build) from a transformers "
                                      "checkpoint directory")
    e.add_argument("src", metavar="SRC", help="transformers checkpoint directory (config.json + *.safetensors)")
    e.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    e.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    e.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weight dtype (default: the checkpoint's own)")
    a = p.parse_args(argv)
    try:
        summary = export_checkpoint(a.src, a.dst, tp=a.tp, dtype=a.dtype, progress=True)
    except TrtllmCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
