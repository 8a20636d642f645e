"""FP8 block quantisation (reference) and the DeepSeek-V3 checkpoint converter, on a tiny checkpoint
written here with DeepSeek-V3's tensor names, dtypes and sharded index layout (edge-sized blocks)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quickllm_kernels.fp8.checkpoint import QUANTISED, CheckpointError, convert_checkpoint, main
from quickllm_kernels.fp8.reference import FP8, weight_dequant, weight_quant


def sqnr_db(x, ref):
    return float(10 * torch.log10(ref.double().pow(2).sum() / (x.double() - ref.double()).pow(2).sum()))


@pytest.mark.parametrize("shape", [(256, 256), (200, 96), (576, 130), (1, 1)])
def test_weight_quant_dequant(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    q, s = weight_quant(w)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = weight_dequant(q, s, out_dtype=torch.float32)
    assert sqnr_db(back, w) > 25  # e4m3 keeps 3 mantissa bits: about 30 dB on Gaussian blocks
    # each block's largest magnitude maps to exactly the top of the e4m3 range
    assert q.float().abs().max() == 448.0
    # per-block exactness: dequant is elementwise w_fp8 * its block's scale
    i, j = shape[0] - 1, shape[1] - 1
    assert back[i, j] == q[i, j].float() * s[i // 128, j // 128]


def test_zero_block_stays_zero():
    w = torch.zeros(130, 130)
    w[:128, :128] = torch.randn(128, 128)
    q, s = weight_quant(w)
    back = weight_dequant(q, s, out_dtype=torch.float32)
    assert torch.isfinite(s).all() and (back[128:] == 0).all() and (back[:, 128:] == 0).all()


def test_dequant_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match=r"scale_inv must be \[2, 1\]"):
        weight_dequant(torch.zeros(200, 96, dtype=FP8), torch.ones(1, 1))


def _layer(i):
    p = f"model.layers.{i}."
    g = torch.Generator().manual_seed(i)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {
        p + "self_attn.q_a_proj.weight": r(96, 64),
        p + "self_attn.kv_a_proj_with_mqa.weight": r(200, 64),  # 576 rows in DeepSeek-V3: an edge block
        p + "self_attn.kv_b_proj.weight": r(256, 72),
        p + "self_attn.o_proj.weight": r(64, 130),
        p + "mlp.gate.weight": r(8, 64),  # the MoE router: never quantised
        p + "mlp.experts.0.gate_proj.weight": r(140, 64),
        p + "mlp.experts.0.down_proj.weight": r(64, 140),
        p + "input_layernorm.weight": torch.ones(64),
        p + "self_attn.kv_a_layernorm.weight": torch.ones(24),
    }


def write_fp8_checkpoint(path, *, drop_scale=None, orphan_scale=False):
    """Three shards; the scale of one weight sits in a different shard from the weight."""
    path.mkdir(parents=True)
    bf16 = {"model.embed_tokens.weight": torch.randn(50, 64).bfloat16(), "lm_head.weight": torch.randn(50, 64).bfloat16(),
            "model.norm.weight": torch.ones(64).bfloat16()}
    shards = [dict(bf16), {}, {}]
    for i in range(2):
        for k, v in _layer(i).items():
            if QUANTISED.search(k):
                q, s = weight_quant(v)
                shards[1 + i][k] = q
                shards[1 + i][k + "_scale_inv"] = s
            else:
                shards[1 + i][k] = v.bfloat16()
    moved = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    shards[0][moved] = shards[2].pop(moved)
    if drop_scale:
        for sh in shards:
            sh.pop(drop_scale, None)
    if orphan_scale:
        shards[0]["model.layers.9.mlp.up_proj.weight_scale_inv"] = torch.ones(1, 1)
    weight_map = {}
    for n, sh in enumerate(shards, 1):
        name = f"model-{n:05d}-of-00003.safetensors"
        save_file(sh, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sh})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "torch_dtype": "bfloat16",
                                                  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                          "activation_scheme": "dynamic",
                                                                          "weight_block_size": [128, 128]}}))
    (path / "tokenizer.json").write_text("{}")
    return shards


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_fp8_to_bf16_and_back(tmp_path):
    shards = write_fp8_checkpoint(tmp_path / "fp8")
    src = {k: v for sh in shards for k, v in sh.items()}
    summary = convert_checkpoint(tmp_path / "fp8", tmp_path / "bf16", to="bf16", progress=False)
    assert summary["converted"] == 12 and summary["shards"] == 3
    got = _load_dir(tmp_path / "bf16")
    assert not any(k.endswith("_scale_inv") for k in got)
    for k, v in got.items():
        if k + "_scale_inv" in src:
            assert v.dtype == torch.bfloat16
            assert torch.equal(v, weight_dequant(src[k], src[k + "_scale_inv"]))
        else:
            assert torch.equal(v, src[k])  # embeddings, norms, router gate, lm_head untouched
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg and (tmp_path / "bf16" / "tokenizer.json").exists()

    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8again", to="fp8", progress=False)
    again = _load_dir(tmp_path / "fp8again")
    assert set(again) == set(src)
    for k, v in again.items():
        if QUANTISED.search(k):
            assert v.dtype == FP8
            assert sqnr_db(weight_dequant(v, again[k + "_scale_inv"], out_dtype=torch.float32),
                           weight_dequant(src[k], src[k + "_scale_inv"], out_dtype=torch.float32)) > 25
    assert again["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "fp8again" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]


def test_missing_or_orphan_scales_are_refused_before_writing(tmp_path):
    write_fp8_checkpoint(tmp_path / "a", drop_scale="model.layers.0.self_attn.q_a_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match="q_a_proj.weight' has no"):
        convert_checkpoint(tmp_path / "a", tmp_path / "out", to="bf16", progress=False)
    write_fp8_checkpoint(tmp_path / "b", orphan_scale=True)
    with pytest.raises(CheckpointError, match="has no weight"):
        convert_checkpoint(tmp_path / "b", tmp_path / "out", to="bf16", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_truncated_shard_names_the_file(tmp_path):
    write_fp8_checkpoint(tmp_path / "fp8")
    shard = tmp_path / "fp8" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "out", to="bf16", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_and_recovers_from_an_interrupted_run(tmp_path):
    write_fp8_checkpoint(tmp_path / "fp8")
    with pytest.raises(ValueError, match="refusing to write into the input"):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "fp8" / "sub", to="bf16", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "full", to="bf16", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    stale = tmp_path / "out.partial"  # what an interrupted run leaves
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half")
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "out"), "--to", "bf16"]) == 0
    assert not stale.exists() and len(list((tmp_path / "out").glob("*.safetensors"))) == 3
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "out"), "--to", "bf16"]) == 2  # exists now


def test_converted_checkpoint_runs_in_fp8_linear(tmp_path):
    """The FP8 checkpoint's tensors load into FP8Linear as stored, and its dequant path computes
    exactly what an nn.Linear on the converted BF16 checkpoint does."""
    import quickllm_kernels as qk
    shards = write_fp8_checkpoint(tmp_path / "fp8")
    src = {k: v for sh in shards for k, v in sh.items()}
    convert_checkpoint(tmp_path / "fp8", tmp_path / "bf16", to="bf16", progress=False)
    bf16 = _load_dir(tmp_path / "bf16")
    for key in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.o_proj.weight"):
        w, s = src[key], src[key + "_scale_inv"]
        layer = qk.FP8Linear(w.shape[1], w.shape[0])
        layer.load_state_dict({"weight": w, "weight_scale_inv": s})
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(5)).bfloat16()
        assert torch.equal(layer(x), torch.nn.functional.linear(x, bf16[key]))
        assert layer.last_path == "dequant"


@pytest.mark.gpu
def test_convert_on_gpu_gives_the_same_bytes(tmp_path):
    write_fp8_checkpoint(tmp_path / "fp8")
    convert_checkpoint(tmp_path / "fp8", tmp_path / "cpu", to="bf16", progress=False)
    convert_checkpoint(tmp_path / "fp8", tmp_path / "gpu", to="bf16", progress=False, device="cuda")
    a, b = _load_dir(tmp_path / "cpu"), _load_dir(tmp_path / "gpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
