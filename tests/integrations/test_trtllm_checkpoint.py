"""quickllm_kernels.integrations.trtllm's checkpoint exporter on tiny random transformers checkpoints
(Qwen2 with q/k/v biases, tied and untied; Mixtral, also sharded; Llama), on the CPU, without
TensorRT-LLM: exported for 1, 2 and 4 ranks, read back, joined and compared with the source bit for bit;
config.json's fields as TensorRT-LLM's PretrainedConfig writes them; each rank's layout (fused q/k/v
heads, gate/up order, experts, padded lm_head); dtype conversion; errors that name the argument or
tensor and leave nothing behind; the command line. With TensorRT-LLM importable, its own loader reads
the result."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quickllm_kernels.integrations import trtllm

transformers = pytest.importorskip("transformers")

V = 97  # a multiple of neither 2 nor 4: lm_head gets zero rows
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
KINDS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}

# config.json keys, as TensorRT-LLM 1.2's PretrainedConfig.to_dict writes them (the instance's
# __dict__ plus the subclass fields), read from its sources:
#   tensorrt_llm/models/modeling_utils.py  PretrainedConfig.__init__ / to_dict, QuantConfig's fields
#   tensorrt_llm/models/qwen/config.py     QWenConfig.__init__ / to_dict and the from_hugging_face kwargs
#   tensorrt_llm/models/llama/config.py    LLaMAConfig.__init__ / to_dict and the from_hugging_face kwargs
#   tensorrt_llm/mapping.py                MappingBase.to_dict, less "rank" (PretrainedConfig.to_dict pops it)
#   tensorrt_llm/layers/moe.py             MoeConfig's fields (to_dict is dataclasses.asdict)
PRETRAINED_KEYS = {
    "architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "logits_dtype", "norm_epsilon", "runtime_defaults", "position_embedding_type",
    "num_key_value_heads", "intermediate_size", "max_position_embeddings", "mapping", "quantization",
    "use_parallel_embedding", "embedding_sharding_dim", "head_size", "qk_layernorm", "rotary_embedding_dim"}
QWEN_KEYS = PRETRAINED_KEYS | {
    "mlp_bias", "attn_bias", "rotary_base", "rotary_scaling", "disable_weight_only_quant_plugin", "num_labels",
    "use_logn_attn", "moe", "seq_length", "qwen_type", "moe_intermediate_size",
    "moe_shared_expert_intermediate_size", "tie_word_embeddings"}
LLAMA_KEYS = PRETRAINED_KEYS | {
    "mlp_bias", "attn_bias", "rotary_base", "rotary_scaling", "residual_mlp", "disable_weight_only_quant_plugin",
    "moe", "remove_duplicated_kv_heads", "fc_after_embed", "use_input_layernorm_in_first_layer",
    "use_last_layernorm", "layer_idx_offset", "embedding_multiplier", "attention_multiplier",
    "residual_multiplier", "output_multiplier_scale", "has_partial_lora_mask", "tie_word_embeddings"}
MAPPING_KEYS = {"world_size", "gpus_per_node", "cp_size", "tp_size", "pp_size", "moe_tp_size", "moe_cluster_size",
                "moe_ep_size", "attn_tp_size", "attn_cp_size", "cp_config", "enable_attention_dp",
                "enable_lm_head_tp_in_adp"}
# QuantConfig's fields common to the 1.x releases (later ones add mamba_ssm_cache_dtype, default None)
QUANT_KEYS = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val", "use_meta_recipe",
              "has_zero_point", "pre_quant_scale", "exclude_modules"}
MOE_KEYS = {"num_experts", "shared_expert_intermediate_size", "top_k", "normalization_mode", "sparse_mixer_epsilon",
            "tp_mode", "device_limited_n_group", "device_limited_topk_group",
            "device_limited_routed_scaling_factor"}


def _save(path, kind, dtype=torch.float32, shard=None, seed=0, **over):
    """A random checkpoint of this kind (every parameter drawn, biases and norms included)."""
    cfg_name, model_name, extra = KINDS[kind]
    cfg = getattr(transformers, cfg_name)(**dict(COMMON, **extra, **over))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _export(src, dst, **kw):
    trtllm.export_checkpoint(src, dst, **kw)
    return trtllm.load_checkpoint(dst)


def _leftovers(parent, *keep):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


ROUND_TRIPS = [  # kind, tp, source dtype, shard size
    ("qwen2", 1, torch.float32, None),
    ("qwen2", 2, torch.float32, None),
    ("qwen2", 4, torch.bfloat16, "20KB"),  # 2 KV heads on 4 ranks: repeated
    ("qwen2_tied", 2, torch.float32, None),
    ("qwen2_tied", 4, torch.float16, None),
    ("mixtral", 1, torch.float32, "20KB"),
    ("mixtral", 2, torch.bfloat16, "20KB"),
    ("mixtral", 4, torch.float32, None),
    ("llama", 2, torch.bfloat16, None),
]


@pytest.mark.parametrize("kind,tp,dtype,shard", ROUND_TRIPS)
def test_round_trip_is_exact(tmp_path, kind, tp, dtype, shard):
    src = _save(tmp_path / "src", kind, dtype, shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    config, ranks = _export(src, tmp_path / "out", tp=tp)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"] + [
        f"rank{r}.safetensors" for r in range(tp)]
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    names = list(ranks[0])
    assert all(list(r) == names for r in ranks)  # the same tensors on every rank

    want = _tensors(src)
    if kind == "qwen2_tied":
        assert "lm_head.weight" not in want
        want["lm_head.weight"] = want["model.embed_tokens.weight"]
    got = trtllm.join_ranks(config, ranks)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        if name.endswith("block_sparse_moe.gate.weight"):  # the router is stored as float32
            assert g.dtype == torch.float32
            w = w.float()
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name

    H, Vp = COMMON["hidden_size"], -(-V // tp) * tp
    for r in ranks:
        assert r["transformer.vocab_embedding.weight"].shape == (V, H)  # never split, never padded
        assert r["lm_head.weight"].shape == (Vp // tp, H)
    lm = torch.cat([r["lm_head.weight"] for r in ranks])
    assert torch.equal(lm[V:], torch.zeros(Vp - V, H, dtype=dtype))


@pytest.mark.parametrize("kind,keys", [("qwen2", QWEN_KEYS), ("qwen2_tied", QWEN_KEYS), ("mixtral", LLAMA_KEYS),
                                       ("llama", LLAMA_KEYS)])
def test_config_json_fields(tmp_path, kind, keys):
    src = _save(tmp_path / "src", kind, torch.bfloat16)
    trtllm.export_checkpoint(src, tmp_path / "out", tp=2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config) == keys
    assert set(config["mapping"]) == MAPPING_KEYS
    assert set(config["quantization"]) == QUANT_KEYS
    assert set(config["moe"]) == MOE_KEYS
    assert config["architecture"] == KINDS[kind][1]
    assert config["dtype"] == "bfloat16" and config["logits_dtype"] == "float32"
    assert config["mapping"]["world_size"] == config["mapping"]["tp_size"] == 2
    assert config["mapping"]["moe_tp_size"] == 2 and config["mapping"]["moe_ep_size"] == 1
    assert config["mapping"]["pp_size"] == 1 and config["mapping"]["cp_size"] == 1
    assert all(v is None for k, v in config["quantization"].items() if k in ("quant_algo", "kv_cache_quant_algo"))
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]) == (4, 2, 8)
    assert config["rotary_embedding_dim"] == 8
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (V, 32, 24)
    assert config["num_hidden_layers"] == 2 and config["max_position_embeddings"] == 64
    assert config["position_embedding_type"] == "rope_gpt_neox"
    assert config["use_parallel_embedding"] is False
    assert config["tie_word_embeddings"] is (kind == "qwen2_tied")
    hf = json.loads((src / "config.json").read_text())
    assert config["norm_epsilon"] == hf["rms_norm_eps"]
    assert config["rotary_base"] == hf["rope_parameters"]["rope_theta"]
    if kind.startswith("qwen2"):
        assert config["qwen_type"] == "qwen2" and config["attn_bias"] is True
        assert config["hidden_act"] == "silu" and config["rotary_scaling"] is None
        assert config["moe"]["num_experts"] == 0 and config["moe"]["normalization_mode"] == 0
    elif kind == "mixtral":
        assert config["hidden_act"] == "swiglu" and config["attn_bias"] is False
        assert (config["moe"]["num_experts"], config["moe"]["top_k"]) == (4, 2)
        assert config["moe"]["normalization_mode"] == 1  # RENORMALIZE: softmax over the top-k logits
    else:
        assert config["hidden_act"] == "silu" and config["moe"]["normalization_mode"] is None
        assert config["rotary_scaling"] == {"type": "llama3", "rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_rank_holds_its_q_then_k_then_v_heads(tmp_path, tp):
    src = _save(tmp_path / "src", "qwen2")
    _, ranks = _export(src, tmp_path / "out", tp=tp)
    s, D = _tensors(src), 8
    heads_q = 4 // tp
    for i in range(2):
        a = f"model.layers.{i}.self_attn."
        for r, rank in enumerate(ranks):
            kv = [r] if tp == 2 else [r // 2]  # 2 KV heads: one each on 2 ranks, each repeated on 2 of 4
            for kind in ("weight", "bias"):
                q = s[a + "q_proj." + kind][r * heads_q * D:(r + 1) * heads_q * D]
                k = torch.cat([s[a + "k_proj." + kind][h * D:(h + 1) * D] for h in kv])
                v = torch.cat([s[a + "v_proj." + kind][h * D:(h + 1) * D] for h in kv])
                assert torch.equal(rank[f"transformer.layers.{i}.attention.qkv.{kind}"], torch.cat([q, k, v]))
            o = s[a + "o_proj.weight"][:, r * heads_q * D:(r + 1) * heads_q * D]
            assert torch.equal(rank[f"transformer.layers.{i}.attention.dense.weight"], o)


def test_join_ranks_checks_the_repeated_copies(tmp_path):
    src = _save(tmp_path / "src", "qwen2")
    config, ranks = _export(src, tmp_path / "out", tp=4)
    ranks[1]["transformer.layers.0.attention.qkv.weight"][8] += 1  # rank 1's copy of KV head 0
    with pytest.raises(ValueError, match="repeated KV head of rank 1 differs from rank 0"):
        trtllm.join_ranks(config, ranks)
    ranks[1]["transformer.layers.0.attention.qkv.weight"][8] -= 1
    ranks[3]["transformer.ln_f.weight"][0] += 1
    with pytest.raises(ValueError, match="transformer.ln_f.weight differs between rank 0 and rank 3"):
        trtllm.join_ranks(config, ranks)


def test_dense_mlp_fc_is_gate_proj_and_gate_is_up_proj(tmp_path):
    src = _save(tmp_path / "src", "qwen2")
    _, ranks = _export(src, tmp_path / "out", tp=2)
    s = _tensors(src)
    for r, rank in enumerate(ranks):
        rows, t, p = slice(r * 12, (r + 1) * 12), "transformer.layers.1.mlp.", "model.layers.1.mlp."
        assert torch.equal(rank[t + "fc.weight"], s[p + "gate_proj.weight"][rows])
        assert torch.equal(rank[t + "gate.weight"], s[p + "up_proj.weight"][rows])
        assert torch.equal(rank[t + "proj.weight"], s[p + "down_proj.weight"][:, rows])
        assert "transformer.layers.1.attention.dense.bias" not in rank


def test_mixtral_fc_is_w3_then_w1_per_expert_and_rank(tmp_path):
    src = _save(tmp_path / "src", "mixtral", shard="20KB")
    _, ranks = _export(src, tmp_path / "out", tp=2)
    s = _tensors(src)
    for r, rank in enumerate(ranks):
        t, e = "transformer.layers.0.mlp.", "model.layers.0.block_sparse_moe."
        fc, proj, router = rank[t + "fc.weight"], rank[t + "proj.weight"], rank[t + "router.weight"]
        assert fc.shape == (4, 24, 32) and proj.shape == (4, 32, 12)
        assert router.dtype == torch.float32 and torch.equal(router, s[e + "gate.weight"])
        rows = slice(r * 12, (r + 1) * 12)
        for x in range(4):
            assert torch.equal(fc[x, :12], s[f"{e}experts.{x}.w3.weight"][rows])  # up: linear half
            assert torch.equal(fc[x, 12:], s[f"{e}experts.{x}.w1.weight"][rows])  # gate: activated half
            assert torch.equal(proj[x], s[f"{e}experts.{x}.w2.weight"][:, rows])


@pytest.mark.parametrize("kind", ["qwen2_tied", "mixtral"])
@pytest.mark.parametrize("to", ["bfloat16", "float16"])
def test_dtype_conversion(tmp_path, kind, to):
    src = _save(tmp_path / "src", kind, torch.float32)
    config, ranks = _export(src, tmp_path / "out", tp=2, dtype=to)
    assert config["dtype"] == to
    want, got = _tensors(src), trtllm.join_ranks(config, ranks)
    for name, g in got.items():
        w = want.get(name, want["model.embed_tokens.weight"])  # a tied lm_head is the table
        if name.endswith("block_sparse_moe.gate.weight"):
            assert g.dtype == torch.float32 and torch.equal(g, w)  # straight from the source, not rounded
        else:
            assert g.dtype == getattr(torch, to) and torch.equal(g, w.to(g.dtype)), name


def test_widening_to_float32_is_exact(tmp_path):
    src = _save(tmp_path / "src", "qwen2", torch.bfloat16)
    config, ranks = _export(src, tmp_path / "out", tp=2, dtype="float32")
    got = trtllm.join_ranks(config, ranks)
    for name, w in _tensors(src).items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name].bfloat16(), w), name


def test_rank_files_are_plain_safetensors(tmp_path):
    src = _save(tmp_path / "src", "qwen2_tied")
    trtllm.export_checkpoint(src, tmp_path / "out", tp=2)
    for r in range(2):
        with safe_open(str(tmp_path / "out" / f"rank{r}.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert "lm_head.weight" in f.keys() and "transformer.ln_f.weight" in f.keys()
            assert len(f.keys()) == 3 + 2 * 8  # embedding, ln_f, lm_head; 2 layers of 2 norms, qkv weight
            #                                    and bias, dense, fc, gate, proj
    # a tied source holding an lm_head copy anyway: the table is used, the copy is accepted
    t = load_file(str(src / "model.safetensors"))
    save_file(dict(t, **{"lm_head.weight": torch.zeros(V, 32)}), str(src / "model.safetensors"))
    config, ranks = _export(src, tmp_path / "out2", tp=1)
    assert torch.equal(ranks[0]["lm_head.weight"], t["model.embed_tokens.weight"])


def _without(path, name):
    f = path / "model.safetensors"
    t = load_file(str(f))
    del t[name]
    save_file(t, str(f), metadata={"format": "pt"})


def _with(path, name, value):
    f = path / "model.safetensors"
    save_file(dict(load_file(str(f)), **{name: value}), str(f), metadata={"format": "pt"})


def _edit_config(path, **fields):
    c = json.loads((path / "config.json").read_text())
    c.update(fields)
    (path / "config.json").write_text(json.dumps(c))


ERRORS = {  # name: (source setup, export kwargs (kind: the source, qwen2 by default), what the message names)
    "unknown architecture": (lambda p: _edit_config(p, architectures=["GPT2LMHeadModel"], model_type="gpt2"), {},
                             r"architectures \['GPT2LMHeadModel'\] \(model_type 'gpt2'\) is not supported"),
    "qwen2_moe": (lambda p: _edit_config(p, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe"), {},
                  "architectures"),
    "model_type mismatch": (lambda p: _edit_config(p, model_type="llama"), {}, "model_type 'llama'"),
    "tp vs heads": (None, dict(tp=3), r"--tp 3 does not divide num_attention_heads = 4"),
    "tp zero": (None, dict(tp=0), r"--tp must be a positive integer"),
    "tp vs kv heads": (None, dict(tp=2, kind="qwen2_kv3"), r"--tp 2 does not divide num_key_value_heads = 3"),
    "intermediate": (lambda p: _edit_config(p, intermediate_size=26), dict(tp=4),
                     r"--tp 4 does not divide intermediate_size = 26"),
    "dtype": (None, dict(dtype="int8"), r"--dtype must be one of"),
    "missing tensor": (lambda p: _without(p, "model.layers.1.self_attn.k_proj.bias"), {},
                       r"tensor 'model.layers.1.self_attn.k_proj.bias' is missing"),
    "missing lm_head": (lambda p: _without(p, "lm_head.weight"), {}, r"tensor 'lm_head.weight' is missing"),
    "extra tensor": (lambda p: _with(p, "model.layers.0.self_attn.o_proj.bias", torch.zeros(32)), {},
                     r"tensor 'model.layers.0.self_attn.o_proj.bias' is not part of the Qwen2ForCausalLM"),
    "wrong shape": (lambda p: _with(p, "model.layers.0.mlp.up_proj.weight", torch.zeros(24, 31)), {},
                    r"tensor 'model.layers.0.mlp.up_proj.weight' has shape \[24, 31\]"),
    "integer tensor": (lambda p: _with(p, "model.norm.weight", torch.zeros(32, dtype=torch.int32)), {},
                       r"tensor 'model.norm.weight' is I32"),
    "no config": (lambda p: (p / "config.json").unlink(), {}, r"has no config.json"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), {}, r"has no \*.safetensors"),
    "quantised": (lambda p: _edit_config(p, quantization_config={"quant_method": "fp8"}), {}, "quantization_config"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_the_argument_and_leave_nothing(tmp_path, case):
    setup, kw, message = ERRORS[case]
    kw = dict(kw)
    kind = kw.pop("kind", "qwen2")
    if kind == "qwen2_kv3":
        src = _save(tmp_path / "src", "qwen2", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    else:
        src = _save(tmp_path / "src", kind)
    if setup:
        setup(src)
    before = _leftovers(tmp_path)
    with pytest.raises(trtllm.TrtllmCheckpointError, match=message):
        trtllm.export_checkpoint(src, tmp_path / "out", **kw)
    assert _leftovers(tmp_path) == before == ["src"]


def test_other_argument_errors(tmp_path):
    src = _save(tmp_path / "src", "qwen2")
    with pytest.raises(trtllm.TrtllmCheckpointError, match=r"SRC .*nowhere is not a directory"):
        trtllm.export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(trtllm.TrtllmCheckpointError, match=r"DST .* its parent directory does not exist"):
        trtllm.export_checkpoint(src, tmp_path / "a" / "b")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    with pytest.raises(trtllm.TrtllmCheckpointError, match=r"DST .*out exists; refusing to overwrite"):
        trtllm.export_checkpoint(src, tmp_path / "out")
    assert (tmp_path / "out" / "keep").read_text() == "mine"
    _edit_config(src, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True)
    with pytest.raises(trtllm.TrtllmCheckpointError, match="attention_bias = true is not supported"):
        trtllm.export_checkpoint(src, tmp_path / "out2")
    assert _leftovers(tmp_path) == ["out", "src"]


def test_index_listing_a_missing_shard(tmp_path):
    src = _save(tmp_path / "src", "mixtral", shard="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).unlink()
    with pytest.raises(trtllm.TrtllmCheckpointError, match=f"{shard} is listed in model.safetensors.index.json"):
        trtllm.export_checkpoint(src, tmp_path / "out")
    assert _leftovers(tmp_path) == ["src"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_while_writing_removes_everything(tmp_path, monkeypatch, exc):
    src = _save(tmp_path / "src", "mixtral", shard="20KB")
    real, calls = trtllm._write_tensor, []

    def failing(f, t):
        calls.append(1)
        if len(calls) == 25:
            raise exc
        return real(f, t)
    monkeypatch.setattr(trtllm, "_write_tensor", failing)
    with pytest.raises(type(exc)):
        trtllm.export_checkpoint(src, tmp_path / "out", tp=2)
    assert len(calls) == 25
    assert _leftovers(tmp_path) == ["src"]  # no DST, no partial directory


def test_reads_in_bounded_blocks(tmp_path, monkeypatch):
    """With a tiny block size every slice is read a few rows at a time, and the bytes are the same."""
    src = _save(tmp_path / "src", "mixtral")
    _, whole = _export(src, tmp_path / "a", tp=2)
    monkeypatch.setattr(trtllm, "_BLOCK_BYTES", 100)
    _, blocks = _export(src, tmp_path / "b", tp=2)
    for a, b in zip(whole, blocks):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "rank1.safetensors").read_bytes() == (tmp_path / "b" / "rank1.safetensors").read_bytes()


def test_command_line(tmp_path, capsys):
    src = _save(tmp_path / "src", "qwen2_tied", torch.bfloat16)
    dst = tmp_path / "out"
    assert trtllm.main(["export", str(src), str(dst), "--tp", "2", "--dtype", "float16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tp"] == 2 and summary["dtype"] == "float16" and summary["architecture"] == "Qwen2ForCausalLM"
    config, ranks = trtllm.load_checkpoint(dst)
    assert config["dtype"] == "float16" and len(ranks) == 2
    assert ranks[1]["transformer.layers.0.attention.qkv.weight"].dtype == torch.float16

    assert trtllm.main(["export", str(src), str(tmp_path / "out2"), "--tp", "3"]) == 2
    assert "--tp 3 does not divide num_attention_heads" in capsys.readouterr().err
    assert trtllm.main(["export", str(src), str(dst)]) == 2
    assert "exists; refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        trtllm.main(["export", str(src), str(tmp_path / "out3"), "--dtype", "int8"])
    assert "--dtype" in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["out", "src"]


def test_tensorrt_llm_loads_the_checkpoint(tmp_path):
    pytest.importorskip("tensorrt_llm")
    from tensorrt_llm.models import MODEL_MAP, PretrainedConfig
    for kind in ("qwen2_tied", "mixtral", "llama"):
        src = _save(tmp_path / kind, kind, torch.float16)
        dst = tmp_path / f"{kind}-trtllm"
        trtllm.export_checkpoint(src, dst, tp=2)
        config = PretrainedConfig.from_json_file(str(dst / "config.json"))
        for rank in range(2):
            MODEL_MAP[config.architecture].from_checkpoint(str(dst), rank=rank)
