"""group_advantages and grpo_loss: the formulas of TRL's GRPOTrainer (trl 1.16, written out below from its
`_generate_and_score_completions` and `_compute_loss`; test_grpo_trl_loss.py runs TRL's own code when
trl is installed), masking by selection (padding holding -inf / NaN / -100 changes nothing), empty
batches, the argument checks, the presets, the distributed normalisers, and the fused hidden-state
path against the unfused one."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import quickllm_kernels as qk
from quickllm_kernels.grpo import (LOSS_TYPES, GRPOLossConfig, _quantile, group_advantages, grpo_loss,
                                   grpo_loss_from_hidden, vllm_importance_sampling_ratio)


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --- TRL's formulas, transcribed (multiplying by the mask, as TRL does, on finite inputs) ---------

def nanstd(t, dim=None):
    mean = torch.nanmean(t, dim=dim, keepdim=True)
    var = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(t), dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), float("nan"))
    return torch.sqrt(var).squeeze() if dim is None else torch.sqrt(var).squeeze(dim)


def trl_advantages(rewards, g, scale):
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


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


def trl_is_ratio(old, sampling, mask, mode, lo, hi):
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    r = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=lo, max=hi)
    bad = (r < (-math.inf if lo is None else lo)) | (r > (math.inf if hi is None else hi))
    return r.masked_fill(bad, 0.0)


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

@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_group_advantages_match_trl(scale):
    rewards = torch.rand(5 * 4, generator=_g(1), dtype=torch.float64)
    rewards[4:8] = 0.5  # one group of equal rewards
    got = group_advantages(rewards, 4, scale_rewards=scale)
    named = {True: "group", False: "none"}.get(scale, scale)
    torch.testing.assert_close(got, trl_advantages(rewards, 4, named))
    if named != "batch":
        assert torch.equal(got[4:8], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(rewards, 4, scale=named), got)  # the older keyword


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nan_reward_leaves_the_rest_of_its_group(scale):
    """A NaN reward (not scored) is skipped by the group's statistics and gets advantage 0; before,
    one NaN made its whole group's advantages NaN."""
    rewards = torch.rand(3 * 4, generator=_g(2), dtype=torch.float64)
    rewards[5] = float("nan")
    got = group_advantages(rewards, 4, scale_rewards=scale)
    assert torch.isfinite(got).all() and got[5] == 0
    torch.testing.assert_close(got, trl_advantages(rewards, 4, scale))
    rest = rewards[[4, 6, 7]]  # the group without its NaN: its own statistics
    want = rest - rest.mean()
    if scale == "group":
        want = want / (rest.std() + 1e-4)
    if scale != "batch":
        torch.testing.assert_close(got[[4, 6, 7]], want)
    # a group with a single scored completion has no std: its advantages are 0 (scale "group")
    rewards[8:11] = float("nan")
    got = group_advantages(rewards, 4, scale_rewards="group")
    assert torch.equal(got[8:12], torch.zeros(4, dtype=torch.float64))


def test_multiple_reward_functions_match_trl():
    g, f = 4, 3
    per_fn = torch.rand(3 * g, f, generator=_g(3), dtype=torch.float64)
    per_fn[1, 0] = float("nan")         # one function did not score one completion
    per_fn[6] = float("nan")            # no function scored this one
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    # sum_then_normalize: TRL sums the weighted rewards (nansum), NaN where nothing scored
    total = (per_fn * w).nansum(1)
    total[6] = float("nan")
    got = group_advantages(per_fn, g, reward_weights=w)
    torch.testing.assert_close(got, trl_advantages(total, g, "group"))
    assert got[6] == 0
    # normalize_then_sum: per function within the group, then the weighted sum over the batch
    grouped = per_fn.view(-1, g, f)
    mean_k = torch.nanmean(grouped, 1, keepdim=True)
    std_k = nanstd(grouped, 1).unsqueeze(1)
    s = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, f) * w).nansum(1)
    s[6] = float("nan")
    want = torch.nan_to_num((s - torch.nanmean(s)) / (nanstd(s) + 1e-4), nan=0.0)
    got = group_advantages(per_fn, g, reward_weights=w, multi_objective_aggregation="normalize_then_sum")
    torch.testing.assert_close(got, want)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match=r"rewards.shape\[0\] \(10\) must be a multiple of group_size"):
        group_advantages(torch.rand(10), 4)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(torch.rand(8), 4, scale_rewards="global")
    with pytest.raises(ValueError, match="multi_objective_aggregation must be one of"):
        group_advantages(torch.rand(8), 4, multi_objective_aggregation="mean")
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(torch.rand(2, 4, 1), 4)
    with pytest.raises(ValueError, match="reward_weights must be"):
        group_advantages(torch.rand(8, 2), 4, reward_weights=torch.ones(3))


# --- loss: formulas ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_matches_trl(loss_type, beta, clips):
    lp, old, ref, adv, mask = _batch()
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    got, metrics = grpo_loss(a, old, ref if beta else None, adv, mask, epsilon=clips[0], epsilon_high=clips[1],
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


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vllm_importance_sampling_matches_trl(mode):
    lp, old, ref, adv, mask = _batch(seed=3)
    sampling = old + 0.15 * torch.randn(old.shape, generator=_g(4), dtype=old.dtype)
    sampling[1, 0] = float("nan")  # a token the engine did not score: ratio 1
    lo, hi = 0.85, 1.2
    want_ratio = trl_is_ratio(old, sampling, mask, mode, lo, hi)
    ratio = vllm_importance_sampling_ratio(old, sampling, mask, mode=mode, clip_min=lo, clip_max=hi)
    torch.testing.assert_close(ratio, want_ratio)
    assert (ratio == 0).any() if mode.endswith("mask") else (ratio != 1).any()
    got, m = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", sampling_logprobs=sampling,
                       vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
                       vllm_importance_sampling_clip_max=hi)
    want = trl_loss(lp, old, ref, adv, mask, 0.2, 0.2, 0.04, "bnpo", None, want_ratio)
    torch.testing.assert_close(got, want)
    given, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", importance_sampling_ratio=ratio)
    torch.testing.assert_close(given, got)
    off, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", sampling_logprobs=sampling,
                       vllm_importance_sampling_correction=False)
    torch.testing.assert_close(off, trl_loss(lp, old, ref, adv, mask, 0.2, 0.2, 0.04, "bnpo", None))


def test_older_names_still_work():
    lp, old, ref, adv, mask = _batch(seed=3)
    rollout = old + 0.5 * torch.randn(old.shape, generator=_g(4), dtype=old.dtype)
    a, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", rollout_logprobs=rollout, importance_cap=1.5,
                     clip_low=0.1, clip_high=0.3)
    b, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", sampling_logprobs=rollout,
                     vllm_importance_sampling_clip_max=1.5, epsilon=0.1, epsilon_high=0.3)
    torch.testing.assert_close(a, b)
    # the project's default correction: per-token ratios truncated at 2
    want = trl_loss(lp, old, ref, adv, mask, 0.2, 0.2, 0.04, "bnpo", None,
                    trl_is_ratio(old, rollout, mask, "token_truncate", None, 2.0))
    torch.testing.assert_close(grpo_loss(lp, old, ref, adv, mask, loss_type="bnpo", rollout_logprobs=rollout)[0], want)


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


def test_quantile_past_torch_limit(monkeypatch):
    """Past torch.quantile's size limit (lowered here) the sorted fallback gives its values."""
    import quickllm_kernels.grpo as grpo
    x = torch.rand(1001, generator=_g(9))
    want = {q: torch.quantile(x, q) for q in (0.0, 0.2, 0.5, 0.77, 0.999, 1.0)}
    monkeypatch.setattr(grpo, "_QUANTILE_LIMIT", 100)
    for q, w in want.items():
        torch.testing.assert_close(_quantile(x, q), w, rtol=1e-6, atol=0)


# --- presets and options -----------------------------------------------------------------------------

def test_presets():
    d = GRPOLossConfig()
    assert (d.loss_type, d.beta, d.epsilon, d.epsilon_high_value, d.use_bias_correction_kl) == ("grpo", 0.04, 0.2, 0.2,
                                                                                               False)
    assert (d.vllm_importance_sampling_mode, d.vllm_importance_sampling_clip_max) == ("token_truncate", 2.0)
    t = GRPOLossConfig.trl_defaults()
    assert (t.loss_type, t.beta, t.use_bias_correction_kl) == ("dapo", 0.0, True)
    assert (t.vllm_importance_sampling_mode, t.vllm_importance_sampling_clip_max) == ("sequence_mask", 3.0)
    assert GRPOLossConfig.preset("trl") == t and GRPOLossConfig.preset("default") == d
    assert GRPOLossConfig.trl_defaults(beta=0.1).beta == 0.1
    lp, old, ref, adv, mask = _batch(seed=7)
    a, _ = grpo_loss(lp, old, ref, adv, mask, "trl")
    b, _ = grpo_loss(lp, old, None, adv, mask, loss_type="dapo", beta=0.0)
    torch.testing.assert_close(a, b)
    c, _ = grpo_loss(lp, old, ref, adv, mask, "trl", beta=0.04)
    e, _ = grpo_loss(lp, old, ref, adv, mask, loss_type="dapo", beta=0.04, use_bias_correction_kl=True)
    torch.testing.assert_close(c, e)
    assert not torch.allclose(c, grpo_loss(lp, old, ref, adv, mask, loss_type="dapo", beta=0.04)[0])


def test_bias_corrected_kl_changes_the_gradient_on_policy():
    """On policy the ratio is 1 in value, so the loss is unchanged, but its gradient is not."""
    lp, _, ref, adv, mask = _batch(seed=8)
    grads = []
    for corrected in (False, True):
        x = lp.clone().requires_grad_()
        loss, _ = grpo_loss(x, None, ref, adv, mask, loss_type="dapo", use_bias_correction_kl=corrected)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert not torch.allclose(grads[0][1], grads[1][1])


def test_config_and_argument_errors():
    lp, old, ref, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(lp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(TypeError, match="unknown option 'epsilon_hi'.*'epsilon_high'"):
        grpo_loss(lp, old, ref, adv, mask, epsilon_hi=0.3)
    with pytest.raises(TypeError, match="given twice"):
        grpo_loss(lp, old, ref, adv, mask, epsilon=0.1, clip_low=0.2)
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        GRPOLossConfig(importance_sampling_level="seq")
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        GRPOLossConfig(vllm_importance_sampling_mode="token")
    with pytest.raises(ValueError, match="clip_min .* must be less than"):
        GRPOLossConfig(vllm_importance_sampling_clip_min=3.0, vllm_importance_sampling_clip_max=2.0)
    with pytest.raises(ValueError, match="needs vllm_importance_sampling_clip_min or"):
        GRPOLossConfig(vllm_importance_sampling_clip_max=None)
    with pytest.raises(ValueError, match="'vespo' takes token-level vLLM importance ratios"):
        grpo_loss(lp, old, ref, adv, mask, "trl", loss_type="vespo", sampling_logprobs=old)
    with pytest.raises(ValueError, match="'vespo' needs a per-token importance_sampling_ratio"):
        grpo_loss(lp, old, ref, adv, mask, loss_type="vespo", importance_sampling_ratio=torch.ones(6, 1))
    with pytest.raises(ValueError, match="top_entropy_quantile must lie in"):
        GRPOLossConfig(top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match="preset: name must be one of"):
        GRPOLossConfig.preset("liger")
    with pytest.raises(TypeError, match="config must be"):
        grpo_loss(lp, old, ref, adv, mask, {"loss_type": "dapo"})
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \[6\]"):
        grpo_loss(lp, old, ref, adv[:3], mask)
    with pytest.raises(ValueError, match=r"mask must have logprobs' shape \[B, T\] = \[6, 9\], got \[6, 3\]"):
        grpo_loss(lp, old, ref, adv, mask[:, :3])
    with pytest.raises(ValueError, match="importance_sampling_ratio must be"):
        grpo_loss(lp, old, ref, adv, mask, importance_sampling_ratio=torch.ones(6))
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="entropy is required"):
        grpo_loss(lp, old, ref, adv, mask, top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="logprobs must be"):
        grpo_loss(lp[0], old, ref, adv, mask)


# --- masking by selection, empty batches -------------------------------------------------------------

ALL_OPTIONS = dict(beta=0.04, use_bias_correction_kl=True, delta=1.3, off_policy_mask_threshold=0.05,
                   top_entropy_quantile=0.5, entropy_coef=0.01, max_completion_length=12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_garbage_at_masked_positions_changes_nothing(loss_type, level):
    """Padding holding an old log-prob of -100, a reference of -inf, NaN sampling log-probs, a -inf
    log-prob: the loss and its gradients are those of a clean batch (they were NaN when the mask
    multiplied)."""
    lp, old, ref, adv, mask = _batch(seed=10)
    sampling = old + 0.1 * torch.randn(old.shape, generator=_g(11), dtype=old.dtype)
    ent = torch.rand(lp.shape, generator=_g(12), dtype=lp.dtype)
    pad = mask == 0
    assert pad.any()
    dirty = dict(lp=lp.masked_fill(pad, float("-inf")), old=old.masked_fill(pad, -100.0),
                 ref=ref.masked_fill(pad, float("-inf")), sampling=sampling.masked_fill(pad, float("nan")),
                 ent=ent.masked_fill(pad, float("nan")))
    clean = dict(lp=lp.masked_fill(pad, 0.0), old=old.masked_fill(pad, 0.0), ref=ref.masked_fill(pad, 0.0),
                 sampling=sampling.masked_fill(pad, 0.0), ent=ent.masked_fill(pad, 0.0))
    out = []
    for d in (dirty, clean):
        x, e = d["lp"].clone().requires_grad_(), d["ent"].clone().requires_grad_()
        loss, metrics = grpo_loss(x, d["old"], d["ref"], adv, mask, loss_type=loss_type,
                                  importance_sampling_level="token" if loss_type == "vespo" else level,
                                  sampling_logprobs=d["sampling"], entropy=e, **ALL_OPTIONS)
        loss.backward()
        out.append((loss.detach(), x.grad, e.grad, metrics))
    (l1, g1, e1, m1), (l2, g2, e2, m2) = out
    assert torch.isfinite(l1) and torch.isfinite(g1).all() and torch.isfinite(e1).all()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(e1, e2)
    assert (g1[pad] == 0).all() and (e1[pad] == 0).all()
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], msg=k)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batch(loss_type, shape):
    b, t = shape
    x = torch.zeros(b, t, requires_grad=True)
    loss, metrics = grpo_loss(x, None, torch.zeros(b, t), torch.zeros(b), torch.zeros(b, t), loss_type=loss_type,
                              max_completion_length=4)
    loss.backward()
    assert loss == 0 and x.grad.shape == (b, t) and all(torch.isfinite(v) for v in metrics.values())
    hidden = torch.randn(b, t, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss, _, lp = grpo_loss_from_hidden(hidden, weight, torch.zeros(b, t, dtype=torch.long), None, None,
                                        torch.zeros(b), torch.ones(b, t), loss_type=loss_type, beta=0.0,
                                        max_completion_length=4, top_entropy_quantile=0.5)
    loss.backward()
    assert loss == 0 and lp.shape == (b, t) and hidden.grad.shape == (b, t, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_fully_masked_sequences():
    lp, old, ref, adv, mask = _batch(seed=13)
    mask[2] = 0
    for lt in LOSS_TYPES:
        x = lp.clone().requires_grad_()
        loss, _ = grpo_loss(x, old, ref, adv, mask, loss_type=lt, max_completion_length=12)
        loss.backward()
        assert torch.isfinite(loss) and (x.grad[2] == 0).all()


# --- distributed normalisers -------------------------------------------------------------------------

def _ddp_worker(rank, world, path, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = torch.load(path)
        rows = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for name, kw in _DDP_CASES.items():
            x = full["lp"][rows].clone().requires_grad_()
            loss, _ = grpo_loss(x, full["old"][rows], full["ref"][rows], full["adv"][rows], full["mask"][rows],
                                entropy=full["ent"][rows], **kw)
            loss.backward()
            # what DDP does: the mean over ranks of the loss and of the gradient
            stacked = [torch.zeros(8, 7, dtype=x.dtype) for _ in range(world)]
            dist.all_gather(stacked, torch.nn.functional.pad(x.grad, (0, 0, rank * 4, (world - 1 - rank) * 4)))
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[name] = (total / world, sum(stacked) / world)
        for name in ("dapo", "cispo"):  # the one-pass fused path: its chunks share one global token count
            hd = full["hidden"][rows].clone().requires_grad_()
            w = full["weight"].clone().requires_grad_()
            loss, _, _ = grpo_loss_from_hidden(hd, w, full["ids"][rows], full["old"][rows], full["ref"][rows],
                                               full["adv"][rows], full["mask"][rows], chunk_rows=3, **_DDP_CASES[name])
            loss.backward()
            stacked = [torch.zeros(8, 7, 5, dtype=hd.dtype) for _ in range(world)]
            dist.all_gather(stacked, torch.nn.functional.pad(hd.grad, (0, 0, 0, 0, rank * 4, (world - 1 - rank) * 4)))
            total, gw = loss.detach().clone(), w.grad.clone()
            dist.all_reduce(total)
            dist.all_reduce(gw)
            results["hidden " + name] = (total / world, sum(stacked) / world, gw / world)
        if rank == 0:
            torch.save(results, path + ".out")
    finally:
        dist.destroy_process_group()


_DDP_CASES = {
    "dapo": dict(loss_type="dapo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "vespo": dict(loss_type="vespo"),
    "dapo_top_entropy": dict(loss_type="dapo", top_entropy_quantile=0.4),
    "grpo_top_entropy": dict(loss_type="grpo", top_entropy_quantile=0.4),
    "dapo_local_count": dict(loss_type="dapo", num_items=None),  # replaced below by this rank's count
}


def test_distributed_normalisers_match_the_concatenated_batch():
    """Two gloo ranks, each with half the batch and DDP's averaging: dapo / cispo / vespo divide by the
    tokens of all ranks and top_entropy_quantile takes the quantile of all ranks' entropies, so the
    result is the single-process loss and gradient of the whole batch. Control: dividing by the rank's
    own tokens (num_items) does not give it."""
    lp, old, ref, adv, mask = _batch(b=8, t=7, seed=14)
    mask[:4, 5:] = 0  # rank 0 holds far fewer tokens than rank 1
    ent = torch.rand(8, 7, generator=_g(15), dtype=lp.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.pt")
        hidden = torch.randn(8, 7, 5, generator=_g(16), dtype=lp.dtype)
        weight = torch.randn(13, 5, generator=_g(17), dtype=lp.dtype)
        ids = torch.randint(0, 13, (8, 7), generator=_g(18))
        torch.save(dict(lp=lp, old=old, ref=ref, adv=adv, mask=mask, ent=ent, hidden=hidden, weight=weight, ids=ids),
                   path)
        cases = dict(_DDP_CASES)
        cases["dapo_local_count"] = dict(loss_type="dapo", num_items=None)
        mp.spawn(_ddp_worker, args=(2, path, os.path.join(tmp, "init")), nprocs=2, join=True)
        results = torch.load(path + ".out")
    for name, kw in _DDP_CASES.items():
        x = lp.clone().requires_grad_()
        loss, _ = grpo_loss(x, old, ref, adv, mask, entropy=ent, **kw)
        loss.backward()
        got_loss, got_grad = results[name]
        if name == "grpo_top_entropy":  # grpo is a per-rank mean of sequence means: equal halves, equal mean
            torch.testing.assert_close(got_loss, loss.detach())
            torch.testing.assert_close(got_grad, x.grad)
        elif name == "dapo_local_count":
            continue
        else:
            torch.testing.assert_close(got_loss, loss.detach(), msg=name)
            torch.testing.assert_close(got_grad, x.grad, msg=name)
    for name in ("dapo", "cispo"):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _, _ = grpo_loss_from_hidden(hd, w, ids, old, ref, adv, mask, **_DDP_CASES[name])
        loss.backward()
        got_loss, got_hidden, got_weight = results["hidden " + name]
        torch.testing.assert_close(got_loss, loss.detach(), msg=name)
        torch.testing.assert_close(got_hidden, hd.grad, msg=name)
        torch.testing.assert_close(got_weight, w.grad, msg=name)
    # the control, computed here: each half divided by its own tokens, averaged
    halves = [grpo_loss(lp[r], old[r], ref[r], adv[r], mask[r], loss_type="dapo", num_items=mask[r].sum())[0]
              for r in (slice(0, 4), slice(4, 8))]
    whole = grpo_loss(lp, old, ref, adv, mask, loss_type="dapo")[0]
    assert not torch.allclose(sum(halves) / 2, whole)


# --- fused path --------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,options", [
    ("grpo", {}),
    ("dapo", {}),
    ("dapo", dict(entropy_coef=0.05, top_entropy_quantile=0.6, use_bias_correction_kl=True)),
    ("cispo", dict(epsilon_high=1.5)),
    ("sapo", {}),
    ("luspo", dict(importance_sampling_level="sequence")),
    ("vespo", {}),
])
def test_loss_from_hidden_matches_unfused(loss_type, options):
    b, t, h, v = 4, 7, 12, 40
    hidden, weight, ids, _ = _lm_head_problem(b, t, h, v, 7, 1 / 3)
    _, old, ref, adv, mask = _batch(b, t, seed=8)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, m1, lp1 = grpo_loss_from_hidden(h1, w1, ids, old, ref, adv, mask, temperature=0.9, loss_type=loss_type,
                                           chunk_rows=5, **options)
    loss1.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax((h2 @ w2.T) / 0.9, -1)
    lp2 = logp.gather(-1, ids[..., None])[..., 0]
    ent2 = -(logp.exp() * logp).sum(-1)
    loss2, m2 = grpo_loss(lp2, old, ref, adv, mask, loss_type=loss_type, entropy=ent2, **options)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(lp1 * mask, lp2 * mask)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(m1["entropy"], m2["entropy"])


def _lm_head_problem(b, t, h, v, seed, scale=1.0):
    """hidden [B, T, H], an lm_head weight [V, H] and token ids [B, T], float64."""
    g = _g(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * scale
    return hidden, weight, torch.randint(0, v, (b, t), generator=g), g


def _unfused_from_hidden(hidden, weight, bias, ids, temperature=1.0):
    logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias) / temperature, -1)
    return logp.gather(-1, ids[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


_ONE_PASS_CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=9),
    "dapo_bias_corrected": dict(loss_type="dapo", use_bias_correction_kl=True),
    "dapo_entropy_bonus": dict(loss_type="dapo", entropy_coef=0.05),
    "grpo_entropy_bonus": dict(loss_type="grpo", entropy_coef=0.05, beta=0.0),
    "dapo_delta": dict(loss_type="dapo", delta=1.1),
    "cispo": dict(loss_type="cispo", epsilon_high=1.5),
    "sapo": dict(loss_type="sapo"),
    "luspo_sequence": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "grpo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "dapo_off_policy": dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    "trl": dict(config="trl"),
}


@pytest.mark.parametrize("chunk_rows", [1, 4, 0])
@pytest.mark.parametrize("case", sorted(_ONE_PASS_CASES))
def test_one_pass_matches_unfused(case, chunk_rows):
    """The one-pass loss (gradients made in the forward pass, chunk by chunk) against full logits and
    grpo_loss in float64: the loss, every metric, the log-probs and the gradients of hidden, weight
    and bias; padded sequences, an empty sequence, per-sequence and per-token advantages, the sampling
    engine's log-probs; chunks of one row, a few rows (whole sequences where the loss needs them) and
    the automatic size."""
    b, t, h, v = 6, 9, 10, 37
    hidden, weight, ids, g = _lm_head_problem(b, t, h, v, 31, 1 / 3)
    bias = torch.randn(v, generator=g, dtype=torch.float64) / 5
    _, _, _, adv, mask = _batch(b, t, seed=32)
    mask[3] = 0  # a sequence with no kept token
    with torch.no_grad():  # old and reference log-probs near the policy's: ratios inside and outside the clip
        lp = _unfused_from_hidden(hidden, weight, bias, ids, 0.8)[0]
    old = lp + 0.15 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    options = dict(_ONE_PASS_CASES[case])
    for per_token in (False, True):
        a = adv[:, None].expand(b, t) + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64) if per_token else adv
        extra = dict(sampling_logprobs=sampling) if case in ("trl", "dapo_off_policy", "grpo") else {}
        h1, w1, b1 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        loss1, m1, lp1 = grpo_loss_from_hidden(h1, w1, ids, old, ref, a, mask, temperature=0.8, lm_head_bias=b1,
                                               chunk_rows=chunk_rows, **extra, **options)
        assert loss1.grad_fn is not None and not lp1.requires_grad
        loss1.backward()
        h2, w2, b2 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        lp2, ent2 = _unfused_from_hidden(h2, w2, b2, ids, 0.8)
        loss2, m2 = grpo_loss(lp2, old, ref, a, mask, entropy=ent2, **extra, **options)
        loss2.backward()
        torch.testing.assert_close(loss1, loss2, msg=case)
        assert m1.keys() == m2.keys()
        for k in m1:
            torch.testing.assert_close(m1[k], m2[k], msg=f"{case} {k}")
        torch.testing.assert_close(lp1 * mask, (lp2 * mask).detach())
        for got, want, name in ((h1, h2, "hidden"), (w1, w2, "weight"), (b1, b2, "bias")):
            torch.testing.assert_close(got.grad, want.grad, msg=f"{case} grad {name}")


# (not conftest's KERNEL_BACKENDS: this module is imported again by the spawned distributed workers,
# where the tests' conftest is not the one on sys.path)
@pytest.mark.parametrize("backend_name", [pytest.param("triton", marks=pytest.mark.triton),
                                          pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_on_kernel_backends(backend_name, dtype):
    """The one pass on the Triton and CUDA kernels (the logits and their gradient as two buffers) against
    the float64 oracle: loss, log-probs, gradients; the entropy bonus takes the entropy term."""
    b, t, h, v = 3, 5, 16, 70
    hidden, weight, ids, g = _lm_head_problem(b, t, h, v, 45, 1 / 4)
    _, _, _, adv, mask = _batch(b, t, seed=46)
    with torch.no_grad():
        lp = _unfused_from_hidden(hidden, weight, None, ids)[0]
    old = lp + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = lp + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    options = dict(loss_type="dapo", entropy_coef=0.1)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = _unfused_from_hidden(h2, w2, None, ids)
    loss2, _ = grpo_loss(lp2, old, ref, adv, mask, entropy=ent2, **options)
    loss2.backward()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h1 = hidden.to(dev, dtype).requires_grad_()
    w1 = weight.to(dev, dtype).requires_grad_()
    with qk.use_backend(backend_name):
        loss1, _, lp1 = grpo_loss_from_hidden(h1, w1, ids.to(dev), old.to(dev), ref.to(dev), adv.to(dev),
                                              mask.to(dev), chunk_rows=4, **options)
        loss1.backward()
        assert qk.last_backends()["token_logprobs_backward"] == backend_name
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    rel = lambda a, e: ((a.double().cpu() - e).norm() / e.norm()).item()  # noqa: E731
    assert rel(lp1 * mask.to(dev), (lp2 * mask).detach()) < tol
    assert abs(loss1.item() - loss2.item()) <= tol * (abs(loss2.item()) + 1e-3)
    assert rel(h1.grad, h2.grad) < tol and rel(w1.grad, w2.grad) < tol


def test_one_pass_strided_bf16_scaled_and_once():
    """hidden as a strided view ([:, :-1] of a model's output), int32 ids, bfloat16 against float64, a
    scaled backward (an accumulation step's loss / k), no_grad, and a second backward refused."""
    b, t, h, v = 4, 6, 16, 50
    g = _g(40)
    full = torch.randn(b, t + 1, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / 4
    ids = torch.randint(0, v, (b, t), generator=g)
    _, old, ref, adv, mask = _batch(b, t, seed=41)
    f64 = full.clone().requires_grad_()
    w64 = weight.clone().requires_grad_()
    loss64, _, _ = grpo_loss_from_hidden(f64[:, :-1], w64, ids.int(), old, ref, adv, mask, chunk_rows=3)
    (loss64 * 3).backward()
    h2, w2 = full.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = _unfused_from_hidden(h2[:, :-1], w2, None, ids)
    (grpo_loss(lp2, old, ref, adv, mask, entropy=ent2)[0] * 3).backward()
    torch.testing.assert_close(f64.grad, h2.grad)
    torch.testing.assert_close(w64.grad, w2.grad)

    fb, wb = full.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    lossb, _, _ = grpo_loss_from_hidden(fb[:, :-1], wb, ids, old.float(), ref.float(), adv.float(), mask,
                                        chunk_rows=5)
    (lossb * 3).backward()
    for got, want in ((fb.grad, h2.grad), (wb.grad, w2.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-2, err
    assert abs(lossb.item() - loss64.item()) <= 2e-2 * abs(loss64.item()) + 1e-3

    with torch.no_grad():
        loss_ng, _, _ = grpo_loss_from_hidden(f64[:, :-1], w64, ids, old, ref, adv, mask)
    assert loss_ng.grad_fn is None
    torch.testing.assert_close(loss_ng, loss64.detach())

    loss, _, _ = grpo_loss_from_hidden(f64[:, :-1], w64, ids, old, ref, adv, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_one_pass_long_sequences_fall_back():
    """A sequence-coupled loss whose sequences are longer than four chunks goes through the two-pass
    path (the logits again in the backward pass) with the same result; so does top_entropy_quantile."""
    b, t, h, v = 3, 11, 6, 23
    hidden, weight, ids, _ = _lm_head_problem(b, t, h, v, 50)
    _, old, ref, adv, mask = _batch(b, t, seed=51)
    mask[0] = 1  # 11 kept rows > 4 chunks of 2
    calls = []
    real = qk.grpo.linear_token_logprobs

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    for options in (dict(importance_sampling_level="sequence"), dict(top_entropy_quantile=0.5)):
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        qk.grpo.linear_token_logprobs = spy
        try:
            loss1, _, _ = grpo_loss_from_hidden(h1, w1, ids, old, ref, adv, mask, chunk_rows=2, **options)
        finally:
            qk.grpo.linear_token_logprobs = real
        assert calls, options
        calls.clear()
        loss1.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp2, ent2 = _unfused_from_hidden(h2, w2, None, ids)
        loss2, _ = grpo_loss(lp2, old, ref, adv, mask, entropy=ent2, **options)
        loss2.backward()
        torch.testing.assert_close(loss1, loss2)
        torch.testing.assert_close(h1.grad, h2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)


def test_loss_from_hidden_skips_unneeded_work(monkeypatch):
    """One pass: each chunk's logits are made once (no recomputation in the backward pass, which only
    scales the gradients); a frozen lm_head gets no grad_weight GEMM; without entropy_coef no entropy
    term (on the reference backend: no exp over a chunk's [C, V] logits for it); the gradients that are
    computed are the same."""
    b, t, h, v = 3, 5, 8, 29
    g = _g(20)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / 3
    ids = torch.randint(0, v, (b, t), generator=g)
    _, old, ref, adv, _ = _batch(b, t, seed=21, dtype=torch.float32)
    mask = torch.ones(b, t)  # 15 kept rows: 4 chunks of at most 4 rows
    wide = {"exp": 0, "addmm_": 0, "linear": 0}
    real_exp, real_addmm, real_linear = torch.exp, torch.Tensor.addmm_, torch.nn.functional.linear

    def exp(x, *a, **k):
        wide["exp"] += x.shape[-1] == v
        return real_exp(x, *a, **k)

    def addmm_(self, *a, **k):
        wide["addmm_"] += tuple(self.shape) == (v, h)
        return real_addmm(self, *a, **k)

    def linear(x, w, *a, **k):
        wide["linear"] += tuple(w.shape) == (v, h)
        return real_linear(x, w, *a, **k)

    def run(train_head, entropy_coef):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
        monkeypatch.setattr(torch, "exp", exp)
        monkeypatch.setattr(torch.Tensor, "addmm_", addmm_)
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
        wide.update(exp=0, addmm_=0, linear=0)
        loss, _, _ = grpo_loss_from_hidden(hd, w, ids, old, ref, adv, mask, loss_type="dapo", chunk_rows=4,
                                           entropy_coef=entropy_coef)
        forward = dict(wide)
        wide.update(exp=0, addmm_=0, linear=0)
        loss.backward()
        monkeypatch.undo()
        assert wide == {"exp": 0, "addmm_": 0, "linear": 0}  # the backward pass makes no [C, V] or [V, H] work
        return hd.grad, w.grad, forward

    gh, gw, counts = run(True, 0.0)
    assert counts["linear"] == 4 and counts["addmm_"] == 4  # 4 chunks, each made once, each adding to grad_weight
    gh_frozen, gw_frozen, counts_frozen = run(False, 0.0)
    assert gw_frozen is None and counts_frozen["addmm_"] == 0 and counts_frozen["linear"] == 4
    torch.testing.assert_close(gh_frozen, gh)
    _, _, counts_entropy = run(True, 0.1)
    assert counts_entropy["exp"] == counts["exp"] + 4  # the entropy term: p = exp(z - lse) per chunk


def test_loss_from_hidden_bad_shapes():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    ids, adv, mask = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\], got shape \[10, 8\]"):
        grpo_loss_from_hidden(hidden.view(10, 8), weight, ids, None, None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match=r"mask must be \[B, T\] = \[2, 5\].*got \[2, 6\]"):
        grpo_loss_from_hidden(hidden, weight, ids, None, None, adv, torch.ones(2, 6), beta=0.0)
    with pytest.raises(ValueError, match=r"completion_ids must be \[B, T\] = \[2, 5\]"):
        grpo_loss_from_hidden(hidden, weight, ids[:, 1:], None, None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss_from_hidden(hidden, weight, ids, None, None, adv, mask, beta=0.0, loss_type="gspo")
    with pytest.raises(TypeError, match="unknown option 'temprature'"):
        grpo_loss_from_hidden(hidden, weight, ids, None, None, adv, mask, beta=0.0, temprature=0.7)


def test_loss_compiles_fullgraph():
    torch._dynamo.reset()
    lp, old, ref, adv, mask = _batch(dtype=torch.float32)
    f = lambda x: grpo_loss(x, old, ref, adv, mask, loss_type="grpo")[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(lp), f(lp))
    assert qk.group_advantages is group_advantages
