"""Group relative policy optimisation: advantages and the clipped surrogate loss.

The formulas follow TRL's GRPOTrainer for the same options (its `scale_rewards`, `loss_type`,
`epsilon`/`epsilon_high`, `beta` and vLLM truncated importance sampling), written as plain tensor
functions so they trace, compile and read in one sitting.
"""
from __future__ import annotations

import torch

from .logprobs import linear_token_logprobs

__all__ = ["group_advantages", "grpo_loss", "grpo_loss_from_hidden", "LOSS_TYPES"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Advantages [P * G] from rewards [P * G] (G = group_size consecutive completions per prompt):
    (r - mean of its group) / (std + eps), std the unbiased sample std of the group ("group"), of the
    whole batch ("batch"), or no division at all ("none", Dr. GRPO). A group of equal rewards gives 0."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [num_prompts * group_size], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards ({rewards.numel()}) must be a multiple of group_size ({group_size})")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = rewards.float() if rewards.dtype not in (torch.float32, torch.float64) else rewards
    grouped = r.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    adv = r - mean
    if scale == "none":
        return adv
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(r)
    else:
        std = r.std().expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    return adv / (std + eps)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
              beta: float = 0.04, loss_type: str = "grpo", max_completion_length: int | None = None,
              rollout_logprobs: torch.Tensor | None = None, importance_cap: float = 2.0,
              num_items: float | torch.Tensor | None = None, entropy: torch.Tensor | None = None):
    """The GRPO loss and its metrics.

    Per token, with ratio = exp(logprobs - old_logprobs) and A the sequence's advantage:
        loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) [* w_t] + beta * kl_t
        kl_t   = exp(ref - logprobs) - (ref - logprobs) - 1                     (k3 estimator)
        w_t    = min(exp(old_logprobs - rollout_logprobs), importance_cap)      (only with rollout_logprobs:
                 completions sampled by another engine, e.g. vLLM, whose log-probs differ from ours)
    then reduced over the tokens where mask is 1:
        grpo     mean over tokens of each sequence, then over sequences (original GRPO)
        bnpo     sum / number of tokens in the batch
        dapo     sum / num_items (the tokens of the whole generation batch; default: this batch's)
        dr_grpo  sum / (batch size * max_completion_length)

    logprobs, old_logprobs, ref_logprobs, rollout_logprobs, mask: [B, T]; advantages: [B].
    old_logprobs None means a single optimisation step per batch (logprobs.detach()); ref_logprobs may
    be None when beta == 0. Returns (loss, metrics): metrics are detached scalars: kl, clip_fraction
    (low, high), ratio, and entropy when given.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"grpo_loss: logprobs must be [B, T], got {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask),
                    ("rollout_logprobs", rollout_logprobs), ("entropy", entropy)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"grpo_loss: {name} must have logprobs' shape {shape}, got {tuple(t.shape)}")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"grpo_loss: advantages must be [B] = [{shape[0]}], got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("grpo_loss: ref_logprobs is required when beta != 0")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("grpo_loss: loss_type 'dr_grpo' needs max_completion_length")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"grpo_loss: clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")

    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    adv = advantages.to(logprobs.dtype)[:, None]  # [B, 1]
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if rollout_logprobs is not None:
        diff = torch.nan_to_num((old - rollout_logprobs) * mask, nan=0.0)
        per_token = per_token * torch.clamp(torch.exp(diff), max=importance_cap).detach()
    if beta != 0.0:
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl

    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dapo":
        norm = tokens if num_items is None else torch.as_tensor(num_items, dtype=logprobs.dtype).clamp(min=1.0)
        loss = (per_token * mask).sum() / norm
    else:
        loss = (per_token * mask).sum() / (shape[0] * max_completion_length)

    with torch.no_grad():
        masked_mean = lambda x: (x * mask).sum() / tokens  # noqa: E731
        low = ((ratio < 1 - clip_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + clip_high) & (adv > 0)).to(mask.dtype)
        metrics = {
            "kl": masked_mean(kl).detach() if beta != 0.0 else torch.zeros((), device=logprobs.device),
            "clip_fraction": masked_mean(low + high),
            "clip_fraction_low": masked_mean(low),
            "clip_fraction_high": masked_mean(high),
            "ratio": masked_mean(ratio),
        }
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy)
    return loss, metrics


def grpo_loss_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, completion_ids: torch.Tensor,
                          old_logprobs, ref_logprobs, advantages, mask, *, temperature: float = 1.0,
                          lm_head_bias: torch.Tensor | None = None, chunk_rows: int = 0, **loss_kwargs):
    """grpo_loss with the policy's log-probs computed from hidden states [B, T, H] and the lm_head
    weight [V, H] through linear_token_logprobs: the training step never holds [B, T, V] logits.
    hidden[:, t] must be the state that predicts completion_ids[:, t]. Returns (loss, metrics, logprobs)."""
    b, t, h = hidden.shape
    if tuple(completion_ids.shape) != (b, t):
        raise ValueError(f"grpo_loss_from_hidden: completion_ids must be [B, T] = [{b}, {t}], "
                         f"got {tuple(completion_ids.shape)}")
    ids = torch.where(mask.bool(), completion_ids, -100)  # padding gets no logits work and no gradient
    lp, ent = linear_token_logprobs(hidden.reshape(b * t, h), lm_head_weight, ids.reshape(-1), bias=lm_head_bias,
                                    temperature=temperature, return_entropy=True, chunk_rows=chunk_rows)
    lp, ent = lp.view(b, t), ent.view(b, t)
    loss, metrics = grpo_loss(lp, old_logprobs, ref_logprobs, advantages, mask, entropy=ent.detach(), **loss_kwargs)
    return loss, metrics, lp
