"""quickllm_models/qwen2.py vs transformers' Qwen2ForCausalLM on tiny random configs the test builds and saves
(safetensors, single file and sharded): logits to 1e-5 in float32, with and without the KV cache,
with left padding."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lm_checks import assert_cached_decode_matches  # noqa: E402
from quickllm_models.qwen2 import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, *, tie=True, shard=False, rope_scaling=None, seed=0):
    torch.manual_seed(seed)
    params = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        params.update(rope_scaling)
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie, rope_parameters=params, attn_implementation="eager")
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases: the default init leaves some at zero
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path, max_shard_size="60KB" if shard else "5GB")
    return hf


@pytest.mark.parametrize("tie,shard", [(True, False), (False, True)])
def test_logits_match_transformers(tmp_path, tie, shard):
    hf = _hf_model(tmp_path, tie=tie, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path, backend="reference").eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_yarn_rope_config(tmp_path):
    hf = _hf_model(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_and_left_padding_match_transformers(tmp_path):
    hf = _hf_model(tmp_path)
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    assert_cached_decode_matches(ours, hf, 97, rtol=1e-5, atol=1e-5)


def test_hidden_states_feed_the_fused_logprobs(tmp_path):
    import quickllm_kernels as qk
    _hf_model(tmp_path)
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    h = ours(ids, return_hidden=True).hidden_states
    lp = qk.linear_token_logprobs(h[:, :-1].reshape(-1, 64), ours.lm_head.weight, ids[:, 1:].reshape(-1))
    want = torch.log_softmax(ours(ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp.view(2, 5), want, rtol=1e-5, atol=1e-5)


def test_presets_and_bad_checkpoint(tmp_path):
    assert Qwen2Config.preset("qwen2-7b").num_key_value_heads == 4
    with pytest.raises(ValueError, match="unknown preset"):
        Qwen2Config.preset("qwen9")
    with pytest.raises(FileNotFoundError):
        (tmp_path / "config.json").write_text('{"vocab_size": 10}')
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_forward_never_syncs_or_replaces_the_rope_table():
    """The cos/sin table is sized at construction: a forward reads no tensor value on the host and
    keeps its buffers, so it can be captured in a CUDA graph; a position past the table is an error
    on the CPU (NaN on a GPU), not a silent resize."""
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = Qwen2ForCausalLM(cfg, max_positions=24)
    table = model.rope
    assert table.shape[0] == 24
    model(torch.randint(0, 64, (2, 20)))
    assert model.rope is table
    with pytest.raises(IndexError, match="positions"):
        model(torch.randint(0, 64, (1, 30)))
