"""Checks every causal LM of quickllm_models passes against its transformers twin."""
from pathlib import Path

import torch
from safetensors import safe_open


def stored_keys(path) -> set:
    """The tensor names of every safetensors file in a checkpoint directory."""
    keys = set()
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    return keys


def assert_cached_decode_matches(ours, hf, vocab: int, seed: int = 3, rtol: float = 1e-5, atol: float = 1e-5):
    """Two rows (the second left-padded by 3): the full forward matches transformers at the real
    tokens, and a prefill of 5 tokens followed by 4 one-token steps through the KV cache matches the
    full forward."""
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    real = mask.bool()
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(full[real], want[real], rtol=rtol, atol=atol)
        cache = ours.new_cache(2, 16)
        parts = [ours(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
        for i in range(5, 9):
            parts.append(ours(ids[:, i : i + 1], attention_mask=mask[:, i : i + 1], cache=cache).logits)
        stepped = torch.cat(parts, 1)
    assert cache.length == 9
    torch.testing.assert_close(stepped[real], full[real], rtol=rtol, atol=atol)


def assert_greedy_generation_matches(ours, hf, vocab: int, seed: int):
    """Greedy generation with a left-padded row gives transformers' tokens; then a token the first
    row emits becomes the eos: that row pads, the other runs on, and decoding stops once both have
    ended, as in transformers."""
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10)
    got = ours.generate(ids, **kw)
    want = hf.generate(ids, do_sample=False, eos_token_id=None, **kw)
    assert got.shape == (2, 17)
    assert torch.equal(got, want), (got[:, 7:], want[:, 7:])
    eos = int(got[0, 9])
    got = ours.generate(ids, eos_token_id=eos, pad_token_id=0, **kw)
    want = hf.generate(ids, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    assert torch.equal(got, want), (got[:, 7:], want[:, 7:])

