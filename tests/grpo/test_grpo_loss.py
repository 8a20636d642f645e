"""group_advantages and grpo_loss vs the formulas of TRL's GRPOTrainer (transcribed below from
trl 1.16 `_generate_and_score_completions` and `_compute_loss`), on random data; the fused
hidden-state path vs the unfused one."""
import pytest
import torch

import quickllm_kernels as qk
from quickllm_kernels.grpo import LOSS_TYPES, group_advantages, grpo_loss, grpo_loss_from_hidden


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --- TRL's formulas, as TRL writes them -----------------------------------------------------------

def trl_nanstd(t, dim=None):
    mean = torch.nanmean(t, dim=dim, keepdim=True)
    var = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(t), dim=dim, keepdim=True)
    var = var * (count / (count - 1))
    return torch.sqrt(var).squeeze() if dim is None else torch.sqrt(var).squeeze(dim)


def trl_advantages(rewards, g, scale):
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = trl_nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    else:
        std = trl_nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv


def trl_loss(lp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len, is_ratio=None):
    adv = adv.unsqueeze(1)
    coef_1 = torch.exp(lp - old)
    if beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    if beta != 0.0:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):  # dapo's num_items_in_batch is the batch's tokens here
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token * mask).sum() / (per_token.size(0) * max_len)


def trl_is_ratio(old, sampling, mask, cap):
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    return torch.clamp(torch.exp(diff), min=None, max=cap)


def _batch(b=6, t=9, seed=0, dtype=torch.float64):
    g = _g(seed)
    lp = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    old = lp + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)  # ratios well inside and outside the clip
    ref = lp + 0.2 * torch.randn(b, t, generator=g, dtype=dtype)
    adv = torch.randn(b, generator=g, dtype=dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(dtype)
    return lp, old, ref, adv, mask


# --- advantages --------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    rewards = torch.rand(5 * 4, generator=_g(1), dtype=torch.float64)
    rewards[4:8] = 0.5  # one group of equal rewards
    got = group_advantages(rewards, 4, scale=scale)
    torch.testing.assert_close(got, trl_advantages(rewards, 4, scale))
    if scale != "batch":
        assert torch.equal(got[4:8], torch.zeros(4, dtype=torch.float64))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.rand(10), 4)
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(torch.rand(8), 4, scale="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.rand(2, 4), 4)


# --- loss --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_matches_trl(loss_type, beta, clips):
    lp, old, ref, adv, mask = _batch()
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    got, metrics = grpo_loss(a, old, ref if beta else None, adv, mask, clip_low=clips[0], clip_high=clips[1],
                             beta=beta, loss_type=loss_type, max_completion_length=12)
    want = trl_loss(b, old, ref, adv, mask, clips[0], clips[1], beta, loss_type, 12)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert 0 < metrics["clip_fraction"] < 1 and metrics["ratio"] > 0
    if beta:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        torch.testing.assert_close(metrics["kl"], (kl * mask).sum() / mask.sum())


def test_truncated_importance_sampling_matches_trl():
    lp, old, ref, adv, mask = _batch(seed=3)
    rollout = old + 0.5 * torch.randn(old.shape, generator=_g(4), dtype=old.dtype)
    got, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", rollout_logprobs=rollout, importance_cap=2.0)
    want = trl_loss(lp, old, ref, adv, mask, 0.2, 0.2, 0.04, "bnpo", None, trl_is_ratio(old, rollout, mask, 2.0))
    torch.testing.assert_close(got, want)
    without, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo")
    assert not torch.allclose(got, without)


def test_on_policy_defaults_and_gradient_sign():
    """With old_logprobs None (one step per batch) the ratio is 1: the loss is -mean(A) (+0 KL at
    ref == lp), and the gradient raises the log-prob of positively advantaged tokens."""
    lp, _, _, _, mask = _batch(seed=5)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, -0.5], dtype=lp.dtype)
    x = lp.clone().requires_grad_()
    loss, m = grpo_loss(x, None, lp.clone(), adv, mask, loss_type="grpo")
    torch.testing.assert_close(loss, -adv.mean())
    assert m["ratio"] == 1 and m["clip_fraction"] == 0 and m["kl"] == 0
    loss.backward()
    per_seq = (x.grad * mask).sum(-1)
    assert (per_seq[adv > 0] < 0).all() and (per_seq[adv < 0] > 0).all() and per_seq[3] == 0


def test_dapo_with_generation_batch_normaliser():
    lp, old, ref, adv, mask = _batch(seed=6)
    a, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="dapo", num_items=200)
    b, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(a * 200, b * mask.sum())


def test_loss_bad_input():
    lp, old, ref, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(lp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(lp, old, ref, adv[:3], mask)
    with pytest.raises(ValueError, match="mask must have"):
        grpo_loss(lp, old, ref, adv, mask[:, :3])
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, old, ref, adv, mask, loss_type="dr_grpo")


# --- fused path --------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loss_from_hidden_matches_unfused(loss_type):
    b, t, h, v = 4, 7, 12, 40
    g = _g(7)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / 3
    ids = torch.randint(0, v, (b, t), generator=g)
    _, old, ref, adv, mask = _batch(b, t, seed=8)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, m1, lp1 = grpo_loss_from_hidden(h1, w1, ids, old, ref, adv, mask, temperature=0.9, loss_type=loss_type,
                                           chunk_rows=5)
    loss1.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2 = torch.log_softmax((h2 @ w2.T) / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    loss2, _ = grpo_loss(lp2, old, ref, adv, mask, loss_type=loss_type)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(lp1 * mask, lp2 * mask)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert "entropy" in m1


def test_loss_compiles_fullgraph():
    torch._dynamo.reset()
    lp, old, ref, adv, mask = _batch(dtype=torch.float32)
    f = lambda x: grpo_loss(x, old, ref, adv, mask, loss_type="grpo")[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(lp), f(lp))
    assert qk.group_advantages is group_advantages
