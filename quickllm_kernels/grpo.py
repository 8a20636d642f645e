"""Group relative policy optimisation: advantages and the policy-gradient losses of the GRPO family.

The formulas are those of TRL's GRPOTrainer (1.16) for the same options, under the same names
(`loss_type`, `beta`, `epsilon`/`epsilon_high`, `delta`, `importance_sampling_level`,
`use_bias_correction_kl`, `top_entropy_quantile`, `off_policy_mask_threshold`, the `vllm_importance_sampling_*`
correction, `scale_rewards`, ...), written as plain tensor functions so that they trace, compile and
read in one sitting. Two differences on purpose:

- masked positions are dropped by selection (torch.where), never by multiplying with the mask, so a
  padding position holding -inf, NaN or -100 cannot turn the loss or its gradient into NaN;
- the project's defaults (`GRPOLossConfig()`: grpo, beta 0.04, plain KL, truncated importance sampling
  capped at 2) differ from TRL 1.16's; `GRPOLossConfig.trl_defaults()` (or `config="trl"`) selects TRL's
  (dapo, beta 0, bias-corrected KL, sequence-masked importance sampling capped at 3).
"""
from __future__ import annotations

import bisect
import dataclasses
import difflib
import math

import torch

from . import backend
from ._op import call
from .logprobs import reference
from .logprobs import _auto_chunk, _lin_check, linear_token_logprobs

__all__ = ["GRPOLossConfig", "group_advantages", "grpo_loss", "grpo_loss_from_hidden",
           "vllm_importance_sampling_ratio", "LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS",
           "VLLM_IMPORTANCE_SAMPLING_MODES", "SCALE_REWARDS"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# Loss types divided by the token count of the whole (all ranks') batch; the others reduce locally.
GLOBALLY_NORMALISED = ("dapo", "cispo", "vespo")
# Loss types with PPO's clipped surrogate (and so clip-fraction metrics in TRL's sense).
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Older keyword names of this package, still accepted.
_ALIASES = {"clip_low": "epsilon", "clip_high": "epsilon_high", "importance_cap": "vllm_importance_sampling_clip_max"}


def _one_of(who, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{who}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """Every option of the loss, named as TRL's GRPOConfig names it. The defaults are this package's
    (`trl_defaults()` gives TRL 1.16's). Per token, with r = exp(logprobs - old_logprobs) (its mean
    log over the sequence with importance_sampling_level="sequence") and A the advantage:

        grpo, bnpo, dr_grpo, dapo, luspo  -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A), with r capped
                                          at delta first when delta is set (two-sided clipping, INTELLECT-2)
        cispo                             -min(r, epsilon_high).detach() * A * logprobs
        sapo                              -sigmoid(tau (r - 1)) * 4 / tau * A, tau = sapo_temperature_pos if
                                          A > 0 else sapo_temperature_neg
        vespo                             -phi(w).detach() * A * logprobs, phi(w) = exp(lambda + k log w -
                                          lambda w), w the sequence's product of ratios (vespo_k_* and
                                          vespo_lambda_* by the sign of A)
    plus beta * kl, kl = exp(ref - logprobs) - (ref - logprobs) - 1 (times r with use_bias_correction_kl),
    minus entropy_coef * (mean entropy). Reduced over the kept tokens:
        grpo, sapo          mean over each sequence's tokens, then over sequences
        bnpo                sum / tokens of this batch
        dr_grpo             sum / (batch size * max_completion_length)
        dapo, cispo, vespo  sum / num_items (default: the tokens of the batch on all ranks / world size)
        luspo               sum over each sequence, mean over sequences
    Tokens dropped before the reduction: top_entropy_quantile < 1 keeps only the tokens whose entropy is
    in that top quantile (of all ranks' tokens); off_policy_mask_threshold drops the sequences with
    A < 0 whose mean (sampling - current) log-prob exceeds it (DeepSeek-V3.2). With sampling log-probs
    from another engine (vLLM) and vllm_importance_sampling_correction, each token's loss is weighted by
    the ratio exp(old - sampling) (per token or per sequence), truncated to or masked outside
    [vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max] by vllm_importance_sampling_mode.
    """
    loss_type: str = "grpo"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    delta: float | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None  # dr_grpo's constant
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    vllm_importance_sampling_correction: bool = True  # used only when sampling log-probs are given
    vllm_importance_sampling_mode: str = "token_truncate"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 2.0
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self):
        who = "GRPOLossConfig"
        _one_of(who, "loss_type", self.loss_type, LOSS_TYPES)
        _one_of(who, "importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _one_of(who, "vllm_importance_sampling_mode", self.vllm_importance_sampling_mode,
                VLLM_IMPORTANCE_SAMPLING_MODES)
        if not self.epsilon >= 0 or not self.epsilon_high_value >= 0:
            raise ValueError(f"{who}: epsilon and epsilon_high must be >= 0, got {self.epsilon}, {self.epsilon_high}")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"{who}: delta must be > 0 (or None), got {self.delta}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"{who}: top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None and not self.off_policy_mask_threshold >= 0:
            raise ValueError(f"{who}: off_policy_mask_threshold must be >= 0 (or None), "
                             f"got {self.off_policy_mask_threshold}")
        if self.max_completion_length is not None and not self.max_completion_length > 0:
            raise ValueError(f"{who}: max_completion_length must be > 0 (or None), got {self.max_completion_length}")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"{who}: vllm_importance_sampling_clip_min ({lo}) must be less than "
                             f"vllm_importance_sampling_clip_max ({hi})")
        if (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("_truncate")
                and lo is None and hi is None):
            raise ValueError(f"{who}: vllm_importance_sampling_mode {self.vllm_importance_sampling_mode!r} needs "
                             "vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def trl_defaults(cls, **options) -> GRPOLossConfig:
        """TRL 1.16's GRPOConfig defaults: dapo, beta 0, the KL weighted by the ratio, and rollouts from
        vLLM corrected by sequence-level masked importance sampling with C_max = 3."""
        base = cls(loss_type="dapo", beta=0.0, use_bias_correction_kl=True,
                   vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=3.0)
        return base.replace(**options)

    @classmethod
    def preset(cls, name: str) -> GRPOLossConfig:
        """"default" (this package's defaults) or "trl" (TRL 1.16's)."""
        _one_of("GRPOLossConfig.preset", "name", name, ("default", "trl"))
        return cls() if name == "default" else cls.trl_defaults()

    def replace(self, **options) -> GRPOLossConfig:
        """A copy with these options changed; an unknown name raises TypeError naming it."""
        if not options:
            return self
        fields = {f.name for f in dataclasses.fields(self)}
        changes = {}
        for name, value in options.items():
            key = _ALIASES.get(name, name)
            if key not in fields:
                close = difflib.get_close_matches(name, sorted(fields | set(_ALIASES)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"GRPOLossConfig: unknown option {name!r}{hint}")
            if key in changes:
                raise TypeError(f"GRPOLossConfig: option {key!r} given twice (once as {name!r})")
            changes[key] = value
        return dataclasses.replace(self, **changes)


def _config(config, options, who) -> GRPOLossConfig:
    if config is None:
        config = GRPOLossConfig()
    elif isinstance(config, str):
        config = GRPOLossConfig.preset(config)
    elif not isinstance(config, GRPOLossConfig):
        raise TypeError(f"{who}: config must be a GRPOLossConfig, 'default', 'trl' or None, "
                        f"got {type(config).__name__}")
    return config.replace(**options)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def _nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Sample std (Bessel-corrected) ignoring NaNs; NaN where fewer than two values remain."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str | bool = "group",
                     eps: float = 1e-4, reward_weights: torch.Tensor | None = None,
                     multi_objective_aggregation: str = "sum_then_normalize", scale: str | None = None):
    """Advantages [P * G] from rewards (G = group_size consecutive completions per prompt), as TRL 1.16:

        sum_then_normalize: r = weighted sum of the reward functions (NaN-skipping); A = (r - mean of its
            group) / (std + eps), std the sample std of the group ("group", True), of the whole batch
            ("batch"), or no division at all ("none", False: Dr. GRPO)
        normalize_then_sum: each function normalised within its group first, the weighted sum then
            normalised over the batch (GDPO); scale_rewards is not used

    rewards: [P * G], or [P * G, F] for F reward functions (reward_weights [F], default ones). NaN marks a
    reward that was not given: means and stds skip it (nanmean, nanstd), a completion with no reward at
    all gets advantage 0, and so does every completion of a group whose std is undefined. A group of
    equal rewards gives 0. Returns float32 (float64 for float64 rewards) [P * G].
    """
    who = "group_advantages"
    if scale is not None:  # the older name of scale_rewards
        scale_rewards = scale
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards) \
        if isinstance(scale_rewards, bool) else scale_rewards
    _one_of(who, "scale_rewards", scale_rewards, SCALE_REWARDS)
    _one_of(who, "multi_objective_aggregation", multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"{who}: rewards must be [num_prompts * group_size] or [num_prompts * group_size, "
                         f"num_reward_functions], got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{who}: rewards.shape[0] ({rewards.shape[0]}) must be a multiple of group_size "
                         f"({group_size})")
    r = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
    per_fn = r if r.dim() == 2 else r[:, None]  # [N, F]
    n, f = per_fn.shape
    if reward_weights is None:
        w = torch.ones(f, dtype=r.dtype, device=r.device)
    else:
        w = torch.as_tensor(reward_weights, dtype=r.dtype, device=r.device)
        if tuple(w.shape) != (f,):
            raise ValueError(f"{who}: reward_weights must be [num_reward_functions] = [{f}], got {tuple(w.shape)}")
    unscorable = torch.isnan(per_fn).all(1)  # [N]
    g = group_size

    if multi_objective_aggregation == "sum_then_normalize":
        total = r if r.dim() == 1 else (per_fn * w).nansum(1)
        if r.dim() == 2:
            total = torch.where(unscorable, torch.full_like(total, float("nan")), total)
        grouped = total.view(-1, g)
        mean = torch.nanmean(grouped, 1).repeat_interleave(g)
        adv = total - mean
        if scale_rewards != "none":
            if scale_rewards == "group":
                std = _nanstd(grouped, 1).repeat_interleave(g) if g > 1 else torch.zeros_like(total)
            else:
                std = _nanstd(total).expand_as(total) if n > 1 else torch.zeros_like(total)
            adv = adv / (std + eps)
    else:
        grouped = per_fn.view(-1, g, f)
        mean_k = torch.nanmean(grouped, 1, keepdim=True)
        std_k = _nanstd(grouped, 1, keepdim=True) if g > 1 else torch.zeros_like(mean_k)
        normed = ((grouped - mean_k) / (std_k + eps)).view(n, f)
        total = (normed * w).nansum(1)
        total = torch.where(unscorable, torch.full_like(total, float("nan")), total)
        std = _nanstd(total).expand_as(total) if n > 1 else torch.zeros_like(total)
        adv = (total - torch.nanmean(total)) / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


# --------------------------------------------------------------------------------------------
# Importance sampling against another engine's sampling log-probs
# --------------------------------------------------------------------------------------------


def _as_bool_mask(mask):
    return mask if mask.dtype == torch.bool else mask != 0


def vllm_importance_sampling_ratio(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor,
                                   *, mode: str = "token_truncate", clip_min: float | None = None,
                                   clip_max: float | None = 2.0) -> torch.Tensor:
    """The weight that corrects for completions sampled by another engine (e.g. vLLM), whose log-probs
    differ from the trainer's: exp(old_logprobs - sampling_logprobs) per token ("token_*" modes, [B, T])
    or per sequence (its product, "sequence_*", [B, 1]); "*_truncate" clamps it to [clip_min, clip_max],
    "*_mask" sets it to 0 outside. Masked positions and NaN sampling log-probs (tokens the engine did not
    score) count as ratio 1. Detached; inputs [B, T]."""
    _one_of("vllm_importance_sampling_ratio", "mode", mode, VLLM_IMPORTANCE_SAMPLING_MODES)
    m = _as_bool_mask(mask)
    with torch.no_grad():
        diff = torch.where(m, old_logprobs - sampling_logprobs.to(old_logprobs.dtype), 0.0)
        diff = torch.nan_to_num(diff, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("_truncate"):
            if clip_min is None and clip_max is None:
                raise ValueError(f"vllm_importance_sampling_ratio: mode {mode!r} needs clip_min or clip_max")
            return torch.clamp(ratio, min=clip_min, max=clip_max)
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        return torch.where((ratio < lo) | (ratio > hi), torch.zeros_like(ratio), ratio)


# --------------------------------------------------------------------------------------------
# Distributed helpers: the loss reduces over all ranks where TRL does
# --------------------------------------------------------------------------------------------


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _global_token_normaliser(m: torch.Tensor) -> torch.Tensor:
    """Tokens of the whole batch (all ranks) per rank: with DDP averaging the ranks' gradients, sum /
    this gives the gradient of the loss of the concatenated batch."""
    count = m.sum()
    world = 1
    if _distributed():
        count = count.clone()
        torch.distributed.all_reduce(count)
        world = torch.distributed.get_world_size()
    return count.clamp(min=1) / world


def _gather_values(x: torch.Tensor) -> torch.Tensor:
    """1-D tensors of any length from every rank, concatenated (x itself without torch.distributed)."""
    if not _distributed():
        return x
    world = torch.distributed.get_world_size()
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


_QUANTILE_LIMIT = 1 << 24  # the most elements torch.quantile takes


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (as TRL computes it), also past its 2**24-element limit: there by sorting,
    with the same linear interpolation (its rank may round differently in the last place)."""
    if x.numel() <= _QUANTILE_LIMIT:
        return torch.quantile(x, q)
    s = x.sort().values
    rank = q * (x.numel() - 1)
    below, above = math.floor(rank), math.ceil(rank)
    return torch.lerp(s[below], s[above], torch.tensor(rank - below, dtype=x.dtype, device=x.device))


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """The kept tokens whose entropy is at least the (1 - top_entropy_quantile) quantile of the kept
    tokens' entropies (of all ranks under torch.distributed). Boolean [B, T]."""
    m = _as_bool_mask(mask)
    values = _gather_values(entropy.detach()[m].float())
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = _quantile(values, 1.0 - top_entropy_quantile)
    return (entropy.detach() >= threshold) & m


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def _check_inputs(who, logprobs, old_logprobs, ref_logprobs, advantages, mask, sampling_logprobs,
                  importance_sampling_ratio, entropy, cfg):
    if logprobs.dim() != 2:
        raise ValueError(f"{who}: logprobs must be [B, T], got {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    for name, t in (("mask", mask), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("sampling_logprobs", sampling_logprobs), ("entropy", entropy)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{who}: {name} must have logprobs' shape [B, T] = {list(shape)}, got {list(t.shape)}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"{who}: advantages must be [B] = [{shape[0]}] (one per sequence) or [B, T] = "
                         f"{list(shape)} (one per token), got {list(advantages.shape)}")
    if importance_sampling_ratio is not None and tuple(importance_sampling_ratio.shape) not in (shape, (shape[0], 1)):
        raise ValueError(f"{who}: importance_sampling_ratio must be [B, T] = {list(shape)} or [B, 1] = "
                         f"[{shape[0]}, 1], got {list(importance_sampling_ratio.shape)}")
    if cfg.loss_type == "vespo":
        if importance_sampling_ratio is not None and tuple(importance_sampling_ratio.shape) != shape:
            raise ValueError(f"{who}: loss_type 'vespo' needs a per-token importance_sampling_ratio [B, T]")
        sequence_mode = cfg.vllm_importance_sampling_mode.startswith("sequence")
        if (importance_sampling_ratio is None and sampling_logprobs is not None
                and cfg.vllm_importance_sampling_correction and sequence_mode):
            raise ValueError(f"{who}: loss_type 'vespo' takes token-level vLLM importance ratios "
                             "(vllm_importance_sampling_mode 'token_truncate' or 'token_mask'), got "
                             f"{cfg.vllm_importance_sampling_mode!r}")
    if cfg.beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"{who}: ref_logprobs is required when beta != 0 (beta = {cfg.beta})")
    if cfg.loss_type == "dr_grpo" and not cfg.max_completion_length:
        raise ValueError(f"{who}: loss_type 'dr_grpo' needs max_completion_length")
    if (cfg.top_entropy_quantile < 1.0 or cfg.entropy_coef != 0.0) and entropy is None:
        raise ValueError(f"{who}: entropy is required with top_entropy_quantile < 1 or entropy_coef != 0")
    if not (logprobs.is_floating_point() and advantages.is_floating_point()):
        raise TypeError(f"{who}: logprobs and advantages must be floating point, got {logprobs.dtype}, "
                        f"{advantages.dtype}")


def _loss_terms(logprobs, old_logprobs, ref_logprobs, advantages, mask, cfg: GRPOLossConfig, *,
                sampling_logprobs=None, importance_sampling_ratio=None, entropy=None, num_items=None,
                who="grpo_loss", totals=None):
    """Everything grpo_loss computes, as a dict (the loss and the tensors its metrics come from).

    totals: (sequences, kept tokens) of the whole batch when these rows are one part of it (the fused
    path's chunks): the loss is then this part's share of the whole batch's loss, so that the parts'
    losses (and gradients) add up to the whole's. None: these rows are the batch."""
    _check_inputs(who, logprobs, old_logprobs, ref_logprobs, advantages, mask, sampling_logprobs,
                  importance_sampling_ratio, entropy, cfg)
    b, t = logprobs.shape
    dt = logprobs.dtype
    m = _as_bool_mask(mask)
    # Masked positions are replaced (not multiplied by 0): whatever they hold (-inf, NaN, -100), every
    # term below stays finite there, so neither the loss nor its gradient picks up a NaN.
    lp = torch.where(m, logprobs, 0.0)
    old = lp.detach() if old_logprobs is None else torch.where(m, old_logprobs.detach().to(dt), 0.0)
    adv = advantages.detach().to(dt)
    adv = adv[:, None] if adv.dim() == 1 else torch.where(m, adv, 0.0)  # [B, 1] or [B, T]
    count = m.sum(-1, keepdim=True)  # [B, 1]

    is_ratio = importance_sampling_ratio
    if is_ratio is None and sampling_logprobs is not None and cfg.vllm_importance_sampling_correction:
        is_ratio = vllm_importance_sampling_ratio(
            old, sampling_logprobs, m, mode=cfg.vllm_importance_sampling_mode,
            clip_min=cfg.vllm_importance_sampling_clip_min, clip_max=cfg.vllm_importance_sampling_clip_max)
    if is_ratio is not None:
        is_ratio = is_ratio.detach().to(dt)
        if is_ratio.shape[1] == t:
            is_ratio = torch.where(m, is_ratio, 1.0)

    keep_seq = None
    if cfg.off_policy_mask_threshold is not None:
        # Sequences with A < 0 that drifted far from the policy that sampled them are dropped: the mean
        # (sampling - current) log-prob is the forward KL estimate; unscored (NaN) tokens count as 0.
        sampled = old if sampling_logprobs is None else sampling_logprobs.detach().to(dt)
        drift = torch.nan_to_num(torch.where(m, sampled - lp.detach(), 0.0), nan=0.0)
        mean_drift = drift.sum(-1, keepdim=True) / count.clamp(min=1)
        keep_seq = (adv >= 0) | (mean_drift <= cfg.off_policy_mask_threshold)

    log_ratio = lp - old
    if cfg.importance_sampling_level == "token":
        log_weight = log_ratio
    else:  # GSPO: one ratio per sequence, the geometric mean of its tokens' ratios
        log_weight = torch.where(m, log_ratio, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
    ratio = torch.exp(log_weight)  # [B, T] or [B, 1]

    kl = None
    if cfg.beta != 0.0:
        d = torch.where(m, ref_logprobs.detach().to(dt), 0.0) - lp
        kl = torch.exp(d) - d - 1
        if cfg.use_bias_correction_kl:  # unbiased gradient of the reverse KL under off-policy samples
            kl = kl * ratio

    eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value
    capped, phi = ratio, None
    lt = cfg.loss_type
    if lt == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * lp
    elif lt in CLIPPED:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        if cfg.delta is not None:
            capped = torch.clamp(ratio, max=cfg.delta)
        per_token = -torch.min(capped * adv, clipped * adv)
    elif lt == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(dt)
        per_token = -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv
    else:  # vespo
        phi = _vespo_weights(adv, log_ratio.detach(), m, is_ratio, cfg)
        per_token = -phi * adv * lp

    ent_mask = None
    if cfg.top_entropy_quantile < 1.0:
        ent_mask = high_entropy_mask(entropy, m, cfg.top_entropy_quantile)
    if keep_seq is not None:
        per_token = torch.where(keep_seq, per_token, 0.0)
    if ent_mask is not None:
        per_token = torch.where(ent_mask, per_token, 0.0)
    if is_ratio is not None and lt != "vespo":  # vespo folds the ratio into phi
        per_token = per_token * is_ratio
    if kl is not None:
        per_token = per_token + cfg.beta * kl

    kept = torch.where(m, per_token.expand(b, t), 0.0)
    sequences, tokens = (b, None) if totals is None else totals
    tokens = m.sum() if tokens is None else tokens

    def over_sequences(per_seq):
        if totals is None:
            return per_seq.mean() if b else per_seq.sum()
        return per_seq.sum() / max(sequences, 1)

    if lt in ("grpo", "sapo"):
        loss = over_sequences(kept.sum(-1) / count[:, 0].clamp(min=1))
    elif lt == "bnpo":
        loss = kept.sum() / tokens.clamp(min=1)
    elif lt == "dr_grpo":
        loss = kept.sum() / (max(sequences, 1) * cfg.max_completion_length)
    elif lt in GLOBALLY_NORMALISED:
        norm = _global_token_normaliser(m) if num_items is None else num_items
        loss = kept.sum() / torch.as_tensor(norm, device=kept.device).to(dt)
    else:  # luspo
        loss = over_sequences(kept.sum(-1))
    policy_loss = loss

    if cfg.entropy_coef != 0.0:  # the bonus is the mean entropy whatever the loss type
        on = m if ent_mask is None else ent_mask
        if totals is not None and ent_mask is not None:
            raise ValueError(f"{who}: top_entropy_quantile needs the whole batch's entropies at once")
        on_count = on.sum() if totals is None else tokens
        bonus = torch.where(on, entropy, 0.0).sum() / on_count.clamp(min=1)
        loss = loss - cfg.entropy_coef * bonus

    return dict(loss=loss, policy_loss=policy_loss, mask=m, ratio=ratio, capped=capped, kl=kl, adv=adv, phi=phi,
                entropy_mask=ent_mask, keep_sequences=keep_seq, importance_sampling_ratio=is_ratio)


def _vespo_weights(adv, log_ratio, m, is_ratio, cfg):
    """phi(w) = exp(lambda + k log w - lambda w) of the sequence's importance weight w (1 at w = 1),
    computed in log space with TRL's clamps; a gradient scale only (no gradient of its own)."""
    with torch.no_grad():
        floor = math.log(1e-8)
        log_w = torch.where(m, torch.clamp(log_ratio, -20.0, 20.0), 0.0).sum(-1, keepdim=True)
        if is_ratio is not None:  # the sampling engine's ratio, in log space
            log_w = log_w + torch.where(m, torch.clamp(torch.log(is_ratio), floor, 20.0), 0.0).sum(-1, keepdim=True)
        log_w = torch.clamp(log_w, floor, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _masked_mean(x, m):
    """Mean over the kept tokens ([B, T]) or over the sequences ([B, 1] values)."""
    x = x if x.is_floating_point() else x.float()
    if x.shape[1] == 1 and m.shape[1] != 1:
        return x.mean() if x.numel() else x.new_zeros(())
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


def _metrics(terms, cfg, entropy):
    m, ratio, capped, adv = terms["mask"], terms["ratio"], terms["capped"], terms["adv"]
    with torch.no_grad():
        low = (capped < 1 - cfg.epsilon_low) & (adv < 0)
        high = (capped > 1 + cfg.epsilon_high_value) & (adv > 0)
        out = {
            "kl": _masked_mean(terms["kl"], m) if terms["kl"] is not None else torch.zeros((), device=m.device),
            "clip_fraction": _masked_mean((low | high).float(), m),
            "clip_fraction_low": _masked_mean(low.float(), m),
            "clip_fraction_high": _masked_mean(high.float(), m),
            "ratio": _masked_mean(ratio, m),
            "policy_loss": terms["policy_loss"].detach(),
        }
        if cfg.loss_type == "cispo":
            out["cispo_clip_fraction"] = _masked_mean(((ratio > cfg.epsilon_high_value) & (adv > 0)).float(), m)
        if terms["phi"] is not None:
            out["vespo_phi"] = _masked_mean(terms["phi"], m)
        if terms["importance_sampling_ratio"] is not None:
            out["importance_sampling_ratio"] = _masked_mean(terms["importance_sampling_ratio"], m)
        if terms["entropy_mask"] is not None:
            out["entropy_mask_fraction"] = _masked_mean(terms["entropy_mask"].float(), m)
        if terms["keep_sequences"] is not None:
            out["off_policy_kept_fraction"] = _masked_mean(terms["keep_sequences"].float(), m)
        if entropy is not None:
            out["entropy"] = _masked_mean(entropy.detach(), m)
    return out


def _sampling_alias(who, sampling_logprobs, rollout_logprobs):
    """sampling_logprobs, or rollout_logprobs (its older name); not both."""
    if rollout_logprobs is None:
        return sampling_logprobs
    if sampling_logprobs is not None:
        raise TypeError(f"{who}: give sampling_logprobs or rollout_logprobs (its older name), not both")
    return rollout_logprobs


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, config: GRPOLossConfig | str | None = None, *,
              sampling_logprobs: torch.Tensor | None = None, importance_sampling_ratio: torch.Tensor | None = None,
              entropy: torch.Tensor | None = None, num_items: float | torch.Tensor | None = None,
              rollout_logprobs: torch.Tensor | None = None, **options):
    """The GRPO-family loss (formulas: GRPOLossConfig) and its metrics.

    logprobs, old_logprobs, ref_logprobs, sampling_logprobs, entropy, mask: [B, T]; advantages: [B] (per
    sequence) or [B, T] (per token). mask selects the completion tokens (bool, or nonzero = kept); what
    the other inputs hold at masked positions is never read into the loss. old_logprobs None: one
    optimisation step per batch (logprobs.detach()); ref_logprobs may be None when beta == 0;
    sampling_logprobs (older name: rollout_logprobs): the sampling engine's log-probs, for the vLLM
    importance correction and the off-policy mask, or give the ratio itself as importance_sampling_ratio
    ([B, T] or [B, 1], e.g. from vllm_importance_sampling_ratio); entropy: per-token entropies (metrics,
    top_entropy_quantile, entropy_coef: differentiable for the entropy bonus). num_items: the divisor of
    dapo / cispo / vespo (default: the batch's tokens, summed over ranks and divided by the world size
    when torch.distributed is initialised, so that DDP's gradient average is the gradient of the whole
    batch's loss: a collective, as is top_entropy_quantile's quantile, so every rank makes the same
    calls; a given num_items makes none).

    config: a GRPOLossConfig, "default", "trl" (TRL 1.16's defaults) or None (default); keyword options
    override its fields (also the older names clip_low, clip_high, importance_cap).
    Returns (loss, metrics): metrics are detached scalars: kl, clip_fraction (low, high), ratio,
    policy_loss (before the entropy bonus), entropy when given, and per option cispo_clip_fraction,
    vespo_phi, importance_sampling_ratio, entropy_mask_fraction, off_policy_kept_fraction.
    """
    cfg = _config(config, options, "grpo_loss")
    sampling_logprobs = _sampling_alias("grpo_loss", sampling_logprobs, rollout_logprobs)
    terms = _loss_terms(logprobs, old_logprobs, ref_logprobs, advantages, mask, cfg,
                        sampling_logprobs=sampling_logprobs, importance_sampling_ratio=importance_sampling_ratio,
                        entropy=entropy, num_items=num_items)
    return terms["loss"], _metrics(terms, cfg, entropy)


# --------------------------------------------------------------------------------------------
# From hidden states: the lm_head, the log-probs and the loss in one pass
# --------------------------------------------------------------------------------------------


def _sequence_coupled(cfg: GRPOLossConfig) -> bool:
    """Whether a token's gradient depends on the other tokens' log-probs of its sequence (beyond the
    mask): sequence-level importance weights, VESPO's sequence weight, the off-policy mask."""
    return (cfg.importance_sampling_level == "sequence" or cfg.loss_type == "vespo"
            or cfg.off_policy_mask_threshold is not None)


def _plan_chunks(counts: list[int], target: int, whole_sequences: bool):
    """Chunks of the kept rows (numbered in [B, T] row-major order) as (first row, end row, first
    sequence, end sequence): `target` rows each, or whole sequences adding up to at least `target`."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    total, out, r0 = starts[-1], [], 0
    while r0 < total:
        s0 = bisect.bisect_right(starts, r0) - 1  # the sequence holding row r0
        if whole_sequences:
            s1 = bisect.bisect_left(starts, r0 + target, lo=s0 + 1)
            s1 = min(s1, len(counts))
            while counts[s1 - 1] == 0:  # no trailing sequences without kept rows
                s1 -= 1
            r1 = starts[s1]
        else:
            r1 = min(total, r0 + target)
            s1 = bisect.bisect_right(starts, r1 - 1)  # one past the sequence holding row r1 - 1
        out.append((r0, r1, s0, s1))
        r0 = r1
    return out


class _OnePass(torch.autograd.Function):
    """The loss as one autograd node whose gradients are computed in its forward pass, chunk by chunk,
    while each chunk's logits exist: its backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        loss, grads = run(ctx.needs_input_grad[:3])
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("grpo_loss_from_hidden: backward through the fused loss a second time; its gradients "
                               "are computed once, during the forward pass (call it again for another backward)")
        unit = grad.device.type == "cpu" and float(grad) == 1.0  # no pass over [V, H] for loss.backward()
        return tuple(None if g is None else (g if unit else g.mul_(grad.to(g.dtype))) for g in grads) + (None,)


def _one_pass(hidden, weight, bias, ids, m, cfg, chunks, temperature, loss_args, num_items, who):
    """The fused loss: for each chunk of kept rows, logits (one GEMM), log-probs and entropies, the
    chunk's share of the loss and its gradient with respect to the log-probs (small [rows, T]
    tensors), the logits' gradient, then grad_hidden and grad_weight (two GEMMs); the logits of one
    chunk at a time. Returns (loss, metrics, log-probs, entropies) with the loss carrying the gradient."""
    b, t, h = hidden.shape
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lp_all = torch.zeros(b, t, dtype=out_dtype, device=hidden.device)
    ent_all = torch.zeros_like(lp_all)
    rows_flat = m.reshape(-1).nonzero()[:, 0]  # kept positions, row-major
    # The CPU kernel (the reference) can work in the logits' own buffer: one [C, V] buffer per chunk
    in_place = hidden.dtype in (torch.float32, torch.float64) and (not chunks or all(
        backend.select(op, hidden.device) == "reference" for op in ("token_logprobs", "token_logprobs_backward")))
    totals = (b, m.sum())
    side = {}

    def part(x, s0, s1):  # one chunk's sequences of a per-sequence or per-token input
        return None if x is None or x.dim() == 0 else x[s0:s1]

    def run(needs):
        need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
        train = grad_enabled and (need_h or need_w or need_b)
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32),
                                device=weight.device) if need_b else None
        for r0, r1, s0, s1 in chunks:
            pos = rows_flat[r0:r1]
            bi, ti = pos // t, pos % t
            x = hidden[bi, ti]  # [C, H], the chunk's kept rows only
            logits = torch.nn.functional.linear(x, weight, bias)
            if in_place:  # one [C, V] buffer: the logits, shifted, then their gradient
                lp, ent, lse, log_s = reference.token_logprobs_inplace(logits, ids[bi, ti], temperature, -100)
            else:
                lp, ent, lse = call("token_logprobs", logits, ids[bi, ti], temperature, -100)
            lp_all[bi, ti], ent_all[bi, ti] = lp, ent
            if not train:
                continue
            local = (bi - s0, ti)
            with torch.enable_grad():
                # the chunk's sequences, with the chunk's log-probs in place (for a token-local loss, what the
                # other positions hold does not reach these positions' gradient)
                lpv = torch.zeros(s1 - s0, t, dtype=out_dtype, device=hidden.device).index_put(local, lp)
                lpv.requires_grad_()
                entv = torch.zeros_like(lpv).index_put(local, ent).requires_grad_(cfg.entropy_coef != 0.0)
                args = {k: part(v, s0, s1) for k, v in loss_args.items()}
                terms = _loss_terms(lpv, args.pop("old"), args.pop("ref"), args.pop("adv"), m[s0:s1], cfg,
                                    entropy=entv, num_items=num_items, who=who, totals=totals, **args)
                wrt = [lpv, entv] if entv.requires_grad else [lpv]
                grads = torch.autograd.grad(terms["loss"], wrt, allow_unused=True)
            g_lp = grads[0][local] if grads[0] is not None else torch.zeros_like(lp)
            g_ent = grads[1][local] if len(grads) > 1 and grads[1] is not None else torch.zeros_like(ent)
            if in_place:
                g = reference.token_logprobs_backward_inplace(g_lp, g_ent, logits, log_s, ids[bi, ti], ent,
                                                              temperature, -100)
            else:
                g = call("token_logprobs_backward", g_lp, g_ent, logits, ids[bi, ti], lse, ent, temperature, -100)
            del logits  # only the logits' gradient from here on
            if need_h:
                grad_hidden[bi, ti] = torch.mm(g, weight)
            if need_w:
                grad_weight.addmm_(g.t(), x)
            if need_b:
                grad_bias += g.sum(0, dtype=grad_bias.dtype)
            del g
        with torch.no_grad():  # the loss and metrics of the whole batch, from its log-probs
            args = dict(loss_args)
            terms = _loss_terms(lp_all, args.pop("old"), args.pop("ref"), args.pop("adv"), m, cfg,
                                entropy=ent_all, num_items=num_items, who=who, **args)
        side["terms"] = terms
        grads = (grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(weight.dtype))
        return terms["loss"].detach(), grads if train else None

    grad_enabled = torch.is_grad_enabled()  # the forward pass below runs without it
    loss = _OnePass.apply(hidden, weight, bias, run)
    return loss, side["terms"], lp_all, ent_all


# On a GPU a chunk of the one pass may hold this many bytes of logits (in their dtype): each chunk also
# costs ~150 small launches for its share of the loss and its gradient (~0.3 ms of host time on the
# CPU), which chunks of linear_token_logprobs' CPU-sized 128 MiB of float32 would not hide behind their
# GEMMs at small hidden sizes (Qwen2.5-0.5B: 220 rows, ~0.3 ms of GEMMs).
_GPU_ONE_PASS_BYTES = 512 << 20


def _one_pass_rows(n: int, weight: torch.Tensor) -> int:
    rows = _auto_chunk(n, weight.shape[0], weight.dtype)
    if weight.is_cuda:
        rows = max(rows, _GPU_ONE_PASS_BYTES // (weight.element_size() * max(weight.shape[0], 1)))
    return max(1, min(n, rows))


def _hidden_loss_terms(hidden, weight, bias, completion_ids, mask, cfg: GRPOLossConfig, *, temperature: float,
                       chunk_rows: int, old_logprobs, ref_logprobs, advantages, sampling_logprobs=None,
                       importance_sampling_ratio=None, num_items=None, who="grpo_loss_from_hidden"):
    """The loss from hidden states [B, T, H] and the lm_head, in one pass where it can (see
    grpo_loss_from_hidden), else through linear_token_logprobs and _loss_terms. Returns (loss, the
    whole batch's terms as _loss_terms gives them, log-probs and entropies [B, T], detached)."""
    b, t, h = hidden.shape
    if tuple(completion_ids.shape) != (b, t) or tuple(mask.shape) != (b, t):
        raise ValueError(f"{who}: completion_ids and mask must be [B, T] = [{b}, {t}] (hidden's first two dims), "
                         f"got {list(completion_ids.shape)} and {list(mask.shape)}")
    m = _as_bool_mask(mask)
    if completion_ids.dtype == torch.int32:
        completion_ids = completion_ids.long()
    # every check of the two-pass path (dtypes, devices, H, V), on one row per sequence: views, where
    # reshaping a strided hidden ([:, :-1] of a model's output) to [B * T, H] would copy it
    first = min(t, 1)
    _lin_check(hidden.narrow(1, 0, first).flatten(0, 1), weight, bias,
               completion_ids.narrow(1, 0, first).flatten(), temperature)
    counts = m.sum(-1).tolist()
    target = chunk_rows if chunk_rows > 0 else _one_pass_rows(sum(counts), weight)
    coupled = _sequence_coupled(cfg)
    loss_args = dict(sampling_logprobs=sampling_logprobs, importance_sampling_ratio=importance_sampling_ratio)
    if cfg.top_entropy_quantile < 1.0 or (coupled and max(counts, default=0) > 4 * target):
        ids = torch.where(m, completion_ids, -100)  # padding gets no logits work and no gradient
        lp, ent = linear_token_logprobs(hidden.reshape(b * t, h), weight, ids.reshape(-1), bias=bias,
                                        temperature=temperature, return_entropy=True, chunk_rows=chunk_rows)
        lp, ent = lp.view(b, t), ent.view(b, t)
        if cfg.entropy_coef == 0.0:
            ent = ent.detach()  # no entropy term in the backward pass
        terms = _loss_terms(lp, old_logprobs, ref_logprobs, advantages, m, cfg, entropy=ent, num_items=num_items,
                            who=who, **loss_args)
        return terms["loss"], terms, lp.detach(), ent.detach()

    lp0 = hidden.new_zeros((b, t), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    # every check of _loss_terms, once, on the whole batch (the chunks' calls repeat them on parts)
    _check_inputs(who, lp0, old_logprobs, ref_logprobs, advantages, m, sampling_logprobs, importance_sampling_ratio,
                  lp0, cfg)
    if num_items is None and cfg.loss_type in GLOBALLY_NORMALISED:
        num_items = _global_token_normaliser(m)  # once: a collective under torch.distributed
    loss_args.update(old=old_logprobs, ref=ref_logprobs, adv=advantages)
    chunks = _plan_chunks(counts, max(1, target), coupled)
    return _one_pass(hidden, weight, bias, completion_ids, m, cfg, chunks, float(temperature), loss_args, num_items,
                     who)


def grpo_loss_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, completion_ids: torch.Tensor,
                          old_logprobs, ref_logprobs, advantages, mask, config: GRPOLossConfig | str | None = None, *,
                          temperature: float = 1.0, lm_head_bias: torch.Tensor | None = None, chunk_rows: int = 0,
                          sampling_logprobs=None, importance_sampling_ratio=None, num_items=None,
                          rollout_logprobs=None, **options):
    """grpo_loss with the policy's log-probs (and entropies) computed from hidden states [B, T, H] and
    the lm_head weight [V, H] (and bias [V]): the step never holds [B, T, V] logits.
    hidden[:, t] must be the state that predicts completion_ids[:, t] ([B, T] int64); masked positions
    get no logits work and no gradient.

    One pass: chunk by chunk of the kept rows, the logits are made (one GEMM), reduced to log-probs
    and entropies, and differentiated at once: the chunk's share of the loss gives the log-probs'
    gradient, the logits' gradient follows in one pass over them, then grad_hidden and grad_weight
    (two GEMMs, only those needed: a frozen lm_head costs none for its weight). The backward pass
    only scales these gradients, and runs once. Chunks hold `chunk_rows` rows (0: as
    linear_token_logprobs chooses, and on a GPU up to 512 MiB of logits, so that each chunk's small
    loss work hides behind its GEMMs); a loss whose token gradients depend on their sequence's other
    log-probs (importance_sampling_level "sequence", vespo, off_policy_mask_threshold) takes whole
    sequences per chunk. top_entropy_quantile needs every entropy first, and a sequence longer than
    four chunks of a sequence-coupled loss would make too large a chunk: both go through
    linear_token_logprobs and grpo_loss instead (the logits computed again in the backward pass).
    Other keywords as grpo_loss. Returns (loss, metrics, logprobs [B, T] float32, 0 where masked; no
    gradient: the loss carries it)."""
    who = "grpo_loss_from_hidden"
    if hidden.dim() != 3:
        raise ValueError(f"{who}: hidden must be [B, T, H], got shape {list(hidden.shape)}")
    b, t, h = hidden.shape
    if tuple(completion_ids.shape) != (b, t):
        raise ValueError(f"{who}: completion_ids must be [B, T] = [{b}, {t}] (hidden's first two dims), "
                         f"got {list(completion_ids.shape)}")
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"{who}: mask must be [B, T] = [{b}, {t}] (hidden's first two dims), got {list(mask.shape)}")
    cfg = _config(config, options, who)
    sampling_logprobs = _sampling_alias(who, sampling_logprobs, rollout_logprobs)
    loss, terms, lp, ent = _hidden_loss_terms(
        hidden, lm_head_weight, lm_head_bias, completion_ids, mask, cfg, temperature=temperature,
        chunk_rows=chunk_rows, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
        sampling_logprobs=sampling_logprobs, importance_sampling_ratio=importance_sampling_ratio,
        num_items=num_items, who=who)
    return loss, _metrics(terms, cfg, ent), lp
