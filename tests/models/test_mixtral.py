"""quickllm_models/mixtral.py vs transformers' MixtralForCausalLM on tiny random configs the test builds
and saves in both checkpoint layouts (transformers 5.x stacked experts, and the original per-expert
w1/w2/w3 names that transformers' default save_pretrained writes; single file and sharded): float32
logits, with and without the KV cache, with left padding and a sliding window; greedy generation
token for token; gradients of every weight (router and experts included); the kernel backends."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, gen

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import quickllm_kernels as qk  # noqa: E402
from lm_checks import assert_cached_decode_matches, assert_greedy_generation_matches, stored_keys  # noqa: E402
from quickllm_models.mixtral import MixtralConfig, MixtralForCausalLM  # noqa: E402

transformers = pytest.importorskip("transformers")

V = 128
TOL = dict(rtol=1e-5, atol=1e-5)  # float32, as the Qwen2 tests


def _hf_model(tmp_path, *, layout="stacked", shard=False, sliding_window=None, seed=0):
    """A tiny transformers Mixtral (hidden 64, 2 layers, 4 experts, top 2, vocab 128) saved in `layout`:
    "stacked" (mlp.experts.gate_up_proj / down_proj) or "legacy" (block_sparse_moe.experts.{e}.w1/2/3)."""
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128,
                                     sliding_window=sliding_window, pad_token_id=0,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                     attn_implementation="eager")
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init (std 0.02) leaves the router near uniform and the experts tiny
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.3)
            elif "mlp.gate" in n:
                p.normal_(0, 0.5)  # decisive routing: no near-ties between the top 2 and the rest
            elif "experts" in n:
                p.normal_(0, 0.15)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "5GB",
                       save_original_format=layout == "legacy")
    return hf


@pytest.mark.parametrize("layout,shard", [("stacked", False), ("legacy", False), ("legacy", True)])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_logits_match_transformers(tmp_path, layout, shard, backend):
    hf = _hf_model(tmp_path, layout=layout, shard=shard)
    keys = stored_keys(tmp_path)
    assert ("model.layers.1.mlp.experts.gate_up_proj" in keys) == (layout == "stacked")
    assert ("model.layers.1.block_sparse_moe.experts.3.w3.weight" in keys) == (layout == "legacy")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = MixtralForCausalLM.from_pretrained(tmp_path, backend=backend).eval()
    want_state = hf.state_dict()  # the same names: the stacked layout is transformers 5.x's own
    for k, v in ours.state_dict().items():
        assert torch.equal(v, want_state[k]), k
    ids = torch.randint(0, V, (2, 11), generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)


@pytest.mark.parametrize("layout", ["stacked", "legacy"])
def test_greedy_generation_matches_transformers(tmp_path, layout):
    hf = _hf_model(tmp_path, layout=layout, seed=1)
    ours = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert_greedy_generation_matches(ours, hf, V, seed=2)


def test_kv_cache_and_left_padding_match_transformers(tmp_path):
    hf = _hf_model(tmp_path)
    ours = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert_cached_decode_matches(ours, hf, V, **TOL)


def test_sliding_window_matches_transformers(tmp_path):
    hf = _hf_model(tmp_path, sliding_window=4)
    ours = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.sliding_window == 4
    ids = torch.randint(0, V, (2, 12), generator=gen(4))
    with torch.no_grad():
        full = ours(ids).logits
        torch.testing.assert_close(full, hf(ids).logits, **TOL)
        cache = ours.new_cache(2, 12)
        stepped = torch.cat([ours(ids[:, :6], cache=cache).logits]
                            + [ours(ids[:, i : i + 1], cache=cache).logits for i in range(6, 12)], 1)
    torch.testing.assert_close(stepped, full, **TOL)
    want = hf.generate(ids[:, :6], do_sample=False, eos_token_id=None, max_new_tokens=8)
    assert torch.equal(ours.generate(ids[:, :6], max_new_tokens=8), want)


@pytest.mark.parametrize("layout", ["stacked", "legacy"])
def test_gradients_match_transformers(tmp_path, layout):
    """Training: loss.backward() reaches every weight, router and experts included, as in transformers
    (whose router weights are differentiable through the renormalised top-k softmax)."""
    hf = _hf_model(tmp_path, layout=layout, seed=5).train()
    ours = MixtralForCausalLM.from_pretrained(tmp_path).train()
    ids = torch.randint(0, V, (2, 10), generator=gen(5))

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    loss = loss_of(ours(ids).logits)
    want_loss = loss_of(hf(ids).logits)
    torch.testing.assert_close(loss, want_loss, **TOL)
    loss.backward()
    want_loss.backward()
    want = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = want[name].grad
        assert p.grad is not None and g.abs().max() > 0, name
        # float32 sums over tokens, experts and layers: errors scale with the largest gradient
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=2e-5 * g.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


# Triton only: the CUDA kernels' tests live with the ops (a cuda_ext test here would compile them
# for every run of tests/models on a machine with nvcc); "auto" picks them on a GPU.
@pytest.mark.parametrize("kernel_backend", [pytest.param("triton", marks=pytest.mark.triton)])
def test_kernel_backend_matches_transformers(tmp_path, kernel_backend):
    """The whole model on one kernel backend (the Triton interpreter on the CPU: tiny and short),
    forward and the gradient of the router and the experts."""
    hf = _hf_model(tmp_path, seed=6)
    ours = MixtralForCausalLM.from_pretrained(tmp_path, backend=kernel_backend, device=DEVICE)
    ids = torch.randint(0, V, (1, 6), generator=gen(6))
    with torch.no_grad():
        ours(ids.to(DEVICE))
    backends = qk.last_backends()  # moe_experts is composite: its grouped GEMMs record the backend
    assert backends["moe_route"] == backends["grouped_mm"] == backends["apply_rope"] == kernel_backend
    logits = ours(ids.to(DEVICE)).logits  # with grad: moe_experts runs as its differentiable parts
    assert qk.last_backends()["moe_route"] == kernel_backend
    want = hf(ids).logits
    torch.testing.assert_close(logits.cpu(), want.detach(), rtol=1e-4, atol=1e-4)
    logits.float().logsumexp(-1).sum().backward()
    want.logsumexp(-1).sum().backward()
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(ours.get_parameter(name).grad.cpu(), hf.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_config_from_hf_and_presets(tmp_path):
    assert MixtralConfig.preset("mixtral-8x7b").num_local_experts == 8
    assert MixtralConfig.preset("mixtral-8x22b").num_hidden_layers == 56
    with pytest.raises(ValueError, match="unknown preset"):
        MixtralConfig.preset("mixtral-1x1b")
    cfg = MixtralConfig.from_hf({"hidden_size": 64, "num_experts": 6, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 64}})
    assert (cfg.num_local_experts, cfg.rope_theta, cfg.rope_scaling["rope_type"]) == (6, 5e5, "yarn")
    # transformers 4.x keys
    cfg = MixtralConfig.from_hf({"rope_theta": 1e6, "rope_scaling": None, "sliding_window": None})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.sliding_window) == (1e6, None, None)
    with pytest.raises(NotImplementedError, match="hidden_act"):
        MixtralConfig.from_hf({"hidden_act": "gelu"})
    tiny = MixtralForCausalLM(MixtralConfig.preset("tiny"), backend="reference")
    assert tiny(torch.randint(0, V, (1, 5))).logits.shape == (1, 5, V)


def test_bad_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        (tmp_path / "config.json").write_text('{"vocab_size": 10}')
        MixtralForCausalLM.from_pretrained(tmp_path)
    _hf_model(tmp_path, layout="legacy")
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.experts"):
        MixtralForCausalLM.from_pretrained(tmp_path)
