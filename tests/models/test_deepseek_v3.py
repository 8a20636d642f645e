"""quickllm_models/deepseek_v3.py vs transformers' DeepseekV3ForCausalLM on tiny random configs the test
builds and saves (hidden 64, 4 heads, kv_lora_rank 32, rope dims 8, 8 experts, vocab 128), in both
expert layouts (per-expert gate/up/down_proj, transformers' default save_pretrained and DeepSeek's own;
stacked gate_up_proj/down_proj, save_original_format=False), single file and sharded: float32 logits
with q_lora_rank set and None, dense first layers, group-limited routing, YaRN with mscale_all_dim past
the original context, interleaved and plain rotary dims; the paged latent cache with left padding;
absorbed decode (mla_decode) against expanded attention; greedy generation token for token; block-FP8
checkpoints (converted here with 128 x 128 blocks) against the same weights dequantised; the Triton
backend.

Routing near-ties: the router weights are drawn with std 0.15 (sigmoid scores spread over (0, 1), no
saturation) and the correction bias with std 0.05, so the gap between a token's k-th and (k+1)-th
biased score (and between the last chosen and the first dropped group) is far above float32 noise
(~1e-7): the logits test asserts it stays above 1e-4 (`_min_routing_gap`; measured 9e-4 and 3e-3),
the other tests use fixed seeds. The FP8 test, whose activations move the scores by ~1e-2, uses a
large bias (gap > 0.03, asserted) and checks that both runs route alike."""
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, gen

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import quickllm_kernels as qk  # noqa: E402
from lm_checks import assert_cached_decode_matches, assert_greedy_generation_matches, stored_keys  # noqa: E402
from quickllm_models.deepseek_v3 import (DeepseekV3Config, DeepseekV3ForCausalLM, MLACache,  # noqa: E402
                                         prepare_state)

transformers = pytest.importorskip("transformers")

V = 128
TOL = dict(rtol=1e-5, atol=1e-5)  # float32, as the Qwen2 and Mixtral tests
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.8}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
VARIANTS = {  # q_lora_rank set / None, dense layers, groups, rope, expert layout
    "qlora-yarn-groups": dict(q_lora_rank=48, first_k_dense_replace=1, n_group=2, topk_group=1, rope=YARN),
    "qfull-plainrope": dict(q_lora_rank=None, first_k_dense_replace=2, n_group=4, topk_group=2, rope=PLAIN,
                            rope_interleave=False, norm_topk_prob=False, routed_scaling_factor=1.5),
}


def _hf_model(tmp_path, *, q_lora_rank=48, first_k_dense_replace=1, n_group=2, topk_group=1, rope=YARN,
              layers=3, layout="per-expert", shard=False, seed=0, bias_std=0.05, **extra):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
        q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=n_group,
        topk_group=topk_group, num_experts_per_tok=2, first_k_dense_replace=first_k_dense_replace,
        max_position_embeddings=128, rope_parameters=dict(rope), pad_token_id=0, attn_implementation="eager",
        **extra)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init (std 0.02) leaves the router near uniform and the experts tiny
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.3)
            elif "mlp.gate.weight" in n:
                p.normal_(0, 0.15)
            elif "experts" in n:
                p.normal_(0, 0.15)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, bias_std)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "5GB",
                       save_original_format=layout == "per-expert")
    return hf


def _min_routing_gap(model, ids, mask=None):
    """The smallest gap, over tokens and MoE layers, between a token's last chosen and first unchosen
    biased score (a near-tie there could flip under float32 noise)."""
    gaps = []

    def hook(mod, args, out):
        x = args[0]
        s = torch.sigmoid(torch.nn.functional.linear(x.float(), mod.weight.float())) + mod.e_score_correction_bias
        chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, out[1].long(), True)
        groups = mod.cfg.n_group
        if groups:  # experts of groups not taken cannot compete: compare within the allowed set
            g = s.view(len(s), groups, -1).topk(2, -1)[0].sum(-1)
            top = g.topk(mod.cfg.topk_group, -1)[0]
            if top.shape[1] < groups:
                rest = g.masked_fill(g >= top[:, -1:], float("-inf")).max(-1)[0]
                gaps.append((top[:, -1] - rest).min())
            allowed = (g >= top[:, -1:]).repeat_interleave(s.shape[1] // groups, 1)
            s = s.masked_fill(~allowed, float("-inf"))
        gaps.append((s.masked_fill(~chosen, float("inf")).min(-1)[0] - s.masked_fill(chosen, float("-inf")).max(-1)[0]
                     ).min())

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return min(float(g) for g in gaps)


@pytest.mark.parametrize("variant,layout,shard", [("qlora-yarn-groups", "per-expert", False),
                                                  ("qlora-yarn-groups", "stacked", True),
                                                  ("qfull-plainrope", "stacked", False),
                                                  ("qfull-plainrope", "per-expert", True)])
def test_logits_match_transformers(tmp_path, variant, layout, shard):
    hf = _hf_model(tmp_path, layout=layout, shard=shard, **VARIANTS[variant])
    keys = stored_keys(tmp_path)
    assert ("model.layers.2.mlp.experts.gate_up_proj" in keys) == (layout == "stacked")
    assert ("model.layers.2.mlp.experts.7.up_proj.weight" in keys) == (layout == "per-expert")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, backend="reference").eval()
    want_state = hf.state_dict()  # the same names: the stacked layout is transformers 5.x's own
    got_state = ours.state_dict()
    assert set(got_state) == set(want_state)
    for k, v in got_state.items():
        assert torch.equal(v, want_state[k]), k
    # 40 tokens: past YaRN's original context of 32
    ids = torch.randint(0, V, (2, 40), generator=gen(1))
    assert _min_routing_gap(ours, ids) > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_and_left_padding_match_transformers(tmp_path, variant):
    """Full forward with left padding vs transformers; prefill of 5 (expanded) + 4 absorbed decode
    steps through the paged latent cache vs the full forward."""
    hf = _hf_model(tmp_path, seed=2, **VARIANTS[variant])
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert_cached_decode_matches(ours, hf, V, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_absorbed_decode_equals_expanded(tmp_path, variant):
    """Absorbed MLA (q_nope @ W_UK, mla_decode over the paged latents, @ W_UV) = expanded attention
    (kv_b_proj per head, SDPA) on the same cache, each decode step, within 1e-4 in float32; and the
    paged cache stores only real tokens (a left-padded row holds fewer)."""
    _hf_model(tmp_path, seed=3, **VARIANTS[variant])
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 10), generator=gen(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    worst = 0.0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = ours.new_cache(2, 12, page_size=4)  # 3 pages a row, interleaved between the rows
        ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
        assert cache.seqlens.tolist() == [6, 3] and cache.length == 6
        for i in range(6, 10):
            twin = cache.clone()
            absorbed = ours(ids[:, i : i + 1], cache=cache).logits
            assert qk.last_backends()["mla_decode"] == "reference"
            expanded = ours(ids[:, i : i + 1], cache=twin, absorb=False).logits
            worst = max(worst, (absorbed - expanded).abs().max().item())
            torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(absorbed[:, 0], full[:, i], rtol=1e-4, atol=1e-4)
            # both wrote the same latent row (bit for bit in layer 0; later layers see the rounding)
            assert torch.equal(twin.kv[0], cache.kv[0])
            torch.testing.assert_close(twin.kv, cache.kv, rtol=1e-5, atol=1e-5)
        assert cache.seqlens.tolist() == [10, 7]
        # a chunk of several tokens after the prefill: expanded over the gathered cache rows, or
        # absorbed (mla_decode with Sq = 4, causal) when the chunk has no padding
        for absorb in (False, True):
            cache = ours.new_cache(2, 12, page_size=4)
            ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
            chunk = ours(ids[:, 6:], cache=cache, absorb=absorb).logits
            torch.testing.assert_close(chunk, full[:, 6:], rtol=1e-4, atol=1e-4)
    print(f"absorbed vs expanded decode, max |diff| of logits: {worst:.2e}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(tmp_path, variant):
    hf = _hf_model(tmp_path, seed=4, **VARIANTS[variant])
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert_greedy_generation_matches(ours, hf, V, seed=4)


def test_fp8_checkpoint_matches_dequantised(tmp_path):
    """A block-FP8 checkpoint (every linear weight float8_e4m3fn with 128 x 128 weight_scale_inv, as
    DeepSeek ships V3; converted here from the tiny float32 one) loads as FP8Linear layers and FP8
    expert stacks. With dequantised weights it is the float32 model of those weights (1e-5); with FP8
    activations (act_quant per token and 128-group) the logits stay within a relative RMS error of
    FP8's precision (e4m3: 3 mantissa bits, ~2-4% per GEMM, compounding over the layers).

    FP8 activations move the router's input by a few percent, enough to flip the k-th expert of a
    token whose scores are within ~1e-2 (then the error is that of another expert, not of FP8): here
    a large correction bias (std 1.0) keeps every choice decisive (gap > 0.03, asserted), and both
    runs are checked to route every token alike."""
    from quickllm_kernels.fp8.checkpoint import convert_checkpoint
    src, fp8_dir, deq_dir = tmp_path / "f32", tmp_path / "fp8", tmp_path / "deq"
    _hf_model(src, seed=5, bias_std=1.0)
    convert_checkpoint(src, fp8_dir, to="fp8", progress=False)
    convert_checkpoint(fp8_dir, deq_dir, to="bf16", out_dtype=torch.float32, progress=False)
    assert "model.layers.2.mlp.experts.3.gate_proj.weight_scale_inv" in stored_keys(fp8_dir)
    ours = DeepseekV3ForCausalLM.from_pretrained(fp8_dir).eval()
    ref = DeepseekV3ForCausalLM.from_pretrained(deq_dir).eval()
    attn, moe = ours.model.layers[2].self_attn, ours.model.layers[2].mlp
    assert isinstance(attn.kv_b_proj, qk.FP8Linear) and attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(moe.shared_experts.down_proj, qk.FP8Linear)
    assert moe.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    # I = 32 padded to 128 so that the gate and up blocks stack: [E, 2 * 128, 64], scales [E, 2, 1]
    assert tuple(moe.experts.gate_up_proj.shape) == (8, 256, 64)
    assert tuple(moe.experts.gate_up_proj_scale_inv.shape) == (8, 2, 1)
    assert tuple(moe.experts.down_proj_scale_inv.shape) == (8, 1, 1)
    assert moe.gate.weight.dtype == torch.float32 and not isinstance(ours.lm_head, qk.FP8Linear)

    ids = torch.randint(0, V, (2, 12), generator=gen(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0
    assert _min_routing_gap(ref, ids, mask) > 0.03

    def routed(model):  # (logits, the experts of every token in every MoE layer)
        ids_seen = []
        hooks = [m.register_forward_hook(lambda mod, a, out: ids_seen.append(out[1].sort(-1)[0]))
                 for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
        logits = model(ids, attention_mask=mask).logits
        for h in hooks:
            h.remove()
        return logits, torch.stack(ids_seen)

    with torch.no_grad():
        want, want_ids = routed(ref)
        ours.set_fp8_path("dequant")
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, want, **TOL)
        assert attn.kv_b_proj.last_path == "dequant"
        ours.set_fp8_path("fp8")
        got, got_ids = routed(ours)
        assert attn.kv_b_proj.last_path == "fp8"
        assert torch.equal(got_ids, want_ids)
        real = mask.bool()
        rel_rms = ((got - want)[real].norm() / want[real].norm()).item()
        print(f"FP8 activations vs dequantised weights: relative RMS error of the logits {rel_rms:.3e}")
        assert rel_rms < 0.12
        # decode with the FP8 model = its full forward. Absorbed MLA folds the dequantised kv_b_proj
        # into q and the output (as DeepSeek's inference code does), so no FP8 activation enters it;
        # the expanded path runs kv_b_proj on FP8-quantised latents. With kv_b_proj on dequantised
        # weights in both, activations are quantised per token alike and only float32 rounding (and
        # an FP8 rounding it tips over, rarely) differs.
        for layer in ours.model.layers:
            layer.self_attn.kv_b_proj.path = "dequant"
        got = ours(ids, attention_mask=mask).logits
        cache = ours.new_cache(2, 16, page_size=4)
        ours(ids[:, :8], attention_mask=mask[:, :8], cache=cache)
        step = ours(ids[:, 8:9], cache=cache).logits[:, 0]
        step_err = ((step - got[:, 8]).norm() / got[:, 8].norm()).item()
        print(f"FP8 absorbed decode step vs FP8 full forward: relative RMS error {step_err:.3e}")
        assert step_err < 1e-3
    # model.to(dtype) leaves the FP8 weights, their scales and the router as they are
    ours.to(torch.bfloat16)
    assert moe.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert moe.experts.gate_up_proj_scale_inv.dtype == torch.float32
    assert attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert ours.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():  # and runs in bfloat16 on FP8 weights
        got16 = ours(ids, attention_mask=mask).logits
    assert got16.dtype == torch.bfloat16
    assert ((got16.float() - got)[real].norm() / got[real].norm()).item() < 0.12


def test_bfloat16(tmp_path):
    """dtype=torch.bfloat16: every weight, the experts and the latent cache in bfloat16, the router in
    float32 (as transformers keeps it); logits, and decode through the cache, within bfloat16's
    precision of the float32 model."""
    _hf_model(tmp_path, seed=7, bias_std=1.0)
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    moe = ours.model.layers[2].mlp
    assert moe.experts.gate_up_proj.dtype == ours.lm_head.weight.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == moe.gate.e_score_correction_bias.dtype == torch.float32
    assert ours.rope.dtype == torch.float32
    ids = torch.randint(0, V, (2, 9), generator=gen(7))
    with torch.no_grad():
        want = ref(ids).logits
        full = ours(ids).logits
        assert full.dtype == torch.bfloat16
        assert ((full.float() - want).norm() / want.norm()).item() < 2e-2
        cache = ours.new_cache(2, 9)
        assert cache.kv.dtype == torch.bfloat16
        ours(ids[:, :7], cache=cache)
        steps = torch.cat([ours(ids[:, i : i + 1], cache=cache).logits for i in (7, 8)], 1)
    assert ((steps.float() - want[:, 7:]).norm() / want[:, 7:].norm()).item() < 2e-2


# Triton only: the CUDA kernels' tests live with the ops; "auto" picks them on a GPU.
@pytest.mark.parametrize("kernel_backend", [pytest.param("triton", marks=pytest.mark.triton)])
def test_kernel_backend_matches_transformers(tmp_path, kernel_backend):
    """The whole model on one kernel backend (the Triton interpreter on the CPU: tiny and short):
    a prefill and one absorbed decode step against transformers."""
    hf = _hf_model(tmp_path, layers=2, seed=6)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, backend=kernel_backend, device=DEVICE).eval()
    ids = torch.randint(0, V, (1, 6), generator=gen(6))
    with torch.no_grad():
        want = hf(ids).logits
        cache = ours.new_cache(1, 8, page_size=4)
        got = ours(ids[:, :5].to(DEVICE), cache=cache).logits
        backends = qk.last_backends()  # moe_experts is composite: its grouped GEMMs record the backend
        assert backends["moe_route"] == backends["grouped_mm"] == backends["apply_rope"] == kernel_backend
        assert backends["mla_cache_write"] == kernel_backend
        step = ours(ids[:, 5:].to(DEVICE), cache=cache).logits
        assert qk.last_backends()["mla_decode"] == kernel_backend
    torch.testing.assert_close(torch.cat([got, step], 1).cpu(), want, rtol=1e-4, atol=1e-4)


def test_config_from_hf_and_presets(tmp_path):
    v3 = DeepseekV3Config.preset("deepseek-v3")
    assert (v3.n_routed_experts, v3.kv_lora_rank, v3.qk_head_dim, v3.rope_scaling["factor"]) == (256, 512, 192, 40.0)
    assert DeepseekV3Config.preset("deepseek-v2-lite-shaped").q_lora_rank is None
    with pytest.raises(ValueError, match="unknown preset"):
        DeepseekV3Config.preset("deepseek-v9")
    # DeepSeek's own config.json (transformers 4.x keys), trimmed
    d = {"hidden_size": 7168, "n_routed_experts": 256, "num_nextn_predict_layers": 1, "rope_theta": 10000,
         "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
         "scoring_func": "sigmoid", "topk_method": "noaux_tc", "model_type": "deepseek_v3",
         "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}}
    cfg = DeepseekV3Config.from_hf(d)
    assert (cfg.rope_theta, cfg.rope_scaling["type"], cfg.fp8_block) == (10000, "yarn", (128, 128))
    # transformers 5.x keys (as save_pretrained writes them)
    _hf_model(tmp_path, q_lora_rank=None)
    cfg = DeepseekV3Config.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.q_lora_rank, cfg.rope_scaling["mscale_all_dim"], cfg.fp8_block, cfg.num_hidden_layers) == \
        (None, 0.8, None, 3)
    with pytest.raises(NotImplementedError, match="hidden_act"):
        DeepseekV3Config.from_hf({"hidden_act": "gelu"})
    with pytest.raises(NotImplementedError, match="scoring_func"):
        DeepseekV3Config.from_hf({"scoring_func": "softmax"})
    tiny = DeepseekV3ForCausalLM(DeepseekV3Config.preset("tiny"), backend="reference")
    assert tiny(torch.randint(0, V, (1, 5))).logits.shape == (1, 5, V)
    assert isinstance(tiny.new_cache(1, 8), MLACache)
    # the MTP layer past num_hidden_layers is skipped
    state = prepare_state({"model.layers.1.x": torch.zeros(1), "model.layers.2.y": torch.zeros(1)},
                          DeepseekV3Config.preset("tiny"))
    assert list(state) == ["model.layers.1.x"]


def test_bad_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        (tmp_path / "config.json").write_text('{"vocab_size": 10}')
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    _hf_model(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.experts.2.down_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.experts"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_len"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.preset("tiny"))
        model(torch.zeros(1, 9, dtype=torch.long), cache=model.new_cache(1, 8))


def test_readme_walk_through_runs(tmp_path, monkeypatch, capsys):
    """The README's CPU walk-through, as written: it loads, decodes, and shows the ops it ran."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    marker = "<!-- walk-through: deepseek-v3"
    assert marker in readme
    block = readme.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (walk-through)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    backends = eval(out[0])  # the printed last_backends() dict
    assert backends["mla_decode"] == "reference" and backends["mla_cache_write"] == "reference"
    assert float(out[1].removeprefix("tensor(").rstrip(")")) < 1e-4
    assert (tmp_path / "tiny-deepseek-v3" / "config.json").exists()
