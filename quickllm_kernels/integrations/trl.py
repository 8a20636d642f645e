"""TRL's GRPOTrainer with its loss computed by quickllm_kernels.

    from quickllm_kernels.integrations.trl import patch_trainer
    trainer = GRPOTrainer(model=..., args=GRPOConfig(...), ...)
    patch = patch_trainer(trainer)      # this trainer only; patch.unpatch() (or `with patch_trainer(t):`) undoes it
    trainer.train()

After patching, every log-prob the trainer computes comes from the backbone's last hidden states
through the lm_head in row chunks of the completion tokens only (no [B, T, V] logits): the old and
reference log-probs at generation time through `linear_token_logprobs`, and the loss in one pass
(grpo_loss_from_hidden's: each chunk's logits made once, its gradients computed while they exist, no
second lm_head pass in the backward; top_entropy_quantile, which needs every entropy first, takes
linear_token_logprobs and the loss after it). The loss is `quickllm_kernels.grpo`'s, with the options
read from the trainer exactly where TRL reads them (loss_type, beta, epsilon / epsilon_high, delta,
importance_sampling_level, temperature, use_bias_correction_kl, top_entropy_quantile,
off_policy_mask_threshold, the vLLM importance-sampling ratio, sapo / vespo parameters, the entropy
bonus and its adaptive controller, gradient accumulation and the dapo / cispo / vespo normaliser). The metrics TRL logs are logged under the same names.

Nothing global changes: the trainer gets two instance attributes and its policy and reference models
an instance `forward` that adds one keyword (`quickllm_labels`) and otherwise calls the forward they
had; `unpatch()` removes them. A configuration this path cannot reproduce (MoE router auxiliary loss,
logit soft-capping, multimodal inputs, FSDP, DeepSpeed ZeRO-3, a TRL other than 1.16.x) raises an
error instead of training differently.
"""
from __future__ import annotations

import contextlib
import types

import torch

from ..grpo import CLIPPED, GLOBALLY_NORMALISED, GRPOLossConfig, _hidden_loss_terms
from ..logprobs import linear_token_logprobs

__all__ = ["patch_trainer", "unpatch_trainer", "loss_config_from_trl", "TRLPatch", "TESTED_TRL"]

TESTED_TRL = "1.16"
_ATTR = "_quickllm_patch"
# GRPOTrainer._get_per_token_logps_and_entropies' multimodal keywords; any of them set means inputs
# this path does not feed to the model.
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "mm_token_type_ids", "image_position_ids")


def loss_config_from_trl(source) -> GRPOLossConfig:
    """The GRPOLossConfig of a GRPOTrainer (its live attributes, as its loss reads them) or of a
    GRPOConfig. With a GRPOConfig the vLLM importance correction is on only with use_vllm, as in TRL."""
    args = getattr(source, "args", source)
    trainer = source if args is not source else None

    def live(attr, from_args):  # the trainer's copy of an option where it keeps one (its loss reads that)
        return getattr(trainer, attr) if trainer is not None and hasattr(trainer, attr) else from_args

    epsilon = live("epsilon_low", args.epsilon)
    epsilon_high = live("epsilon_high", args.epsilon if args.epsilon_high is None else args.epsilon_high)
    use_vllm = live("use_vllm", args.use_vllm)
    correction = live("vllm_importance_sampling_correction", args.vllm_importance_sampling_correction)
    return GRPOLossConfig(
        loss_type=live("loss_type", args.loss_type), beta=live("beta", args.beta), epsilon=epsilon,
        epsilon_high=epsilon_high, delta=args.delta,
        importance_sampling_level=live("importance_sampling_level", args.importance_sampling_level),
        use_bias_correction_kl=args.use_bias_correction_kl,
        max_completion_length=live("max_completion_length", args.max_completion_length),
        top_entropy_quantile=live("top_entropy_quantile", args.top_entropy_quantile),
        off_policy_mask_threshold=live("off_policy_mask_threshold", args.off_policy_mask_threshold),
        entropy_coef=live("entropy_coef", args.entropy_coef),
        vllm_importance_sampling_correction=bool(use_vllm and correction),
        vllm_importance_sampling_mode=live("vllm_importance_sampling_mode", args.vllm_importance_sampling_mode),
        vllm_importance_sampling_clip_min=live("vllm_importance_sampling_clip_min",
                                              args.vllm_importance_sampling_clip_min),
        vllm_importance_sampling_clip_max=live("vllm_importance_sampling_clip_max",
                                              args.vllm_importance_sampling_clip_max),
        sapo_temperature_neg=args.sapo_temperature_neg, sapo_temperature_pos=args.sapo_temperature_pos,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg)


def _logit_scale(text_config) -> float:
    """The factor TRL's fused head multiplies the logits by before the temperature (the model
    families that scale their logits), 1.0 for the others."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _unsupported(trainer) -> list[str]:
    reasons = []
    if getattr(trainer, "aux_loss_enabled", False):
        reasons.append("a Mixture-of-Experts router auxiliary loss (router_aux_loss_coef != 0)")
    if getattr(trainer, "is_fsdp_enabled", False):
        reasons.append("FSDP (the lm_head weight is sharded)")
    plugin = getattr(trainer.args, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3:
        reasons.append("DeepSpeed ZeRO-3 (the lm_head weight is partitioned)")
    for model in _models(trainer):
        cfg = model.config.get_text_config()
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            reasons.append(f"logit soft-capping (final_logit_softcapping of {type(model).__name__})")
        if not _logit_scale(cfg) > 0:
            reasons.append(f"a logit scale <= 0 ({type(model).__name__})")
    return reasons


def _models(trainer):
    """The models whose forward the patch wraps: the policy (its base model under PEFT) and the
    reference model, unwrapped from DDP and the like."""
    unwrap = trainer.accelerator.unwrap_model
    policy = unwrap(trainer.model)
    if hasattr(policy, "get_base_model") and hasattr(policy, "peft_config"):
        policy = policy.get_base_model()
    out = [policy]
    if getattr(trainer, "ref_model", None) is not None:
        ref = unwrap(trainer.ref_model)
        if ref is not policy:
            out.append(ref)
    return out


class TRLPatch:
    """The patch of one GRPOTrainer: `unpatch()` restores it (also on leaving a `with` block)."""

    def __init__(self, trainer, chunk_rows: int):
        self.trainer = trainer
        self.chunk_rows = int(chunk_rows)
        self._forwards = []  # (model, the instance forward it had or None, the one patched in)
        self.active = False

    def _apply(self):
        t = self.trainer
        for model in _models(t):
            previous = model.__dict__.get("forward")
            ours = types.MethodType(_make_forward(previous or type(model).forward.__get__(model), self), model)
            model.forward = ours
            self._forwards.append((model, previous, ours))
        t._get_per_token_logps_and_entropies = types.MethodType(_per_token_logps_and_entropies, t)
        t._compute_loss = types.MethodType(_compute_loss, t)
        setattr(t, _ATTR, self)
        self.active = True

    def unpatch(self):
        if not self.active:
            return
        t = self.trainer
        for name in ("_get_per_token_logps_and_entropies", "_compute_loss", _ATTR):
            t.__dict__.pop(name, None)
        for model, previous, ours in reversed(self._forwards):
            if model.__dict__.get("forward") is not ours:
                # wrapped again since (e.g. by accelerate's mixed precision): left in place; ours only acts
                # on calls with quickllm_labels, which nothing makes once the trainer is restored
                continue
            if previous is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = previous
        self._forwards.clear()
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False


def patch_trainer(trainer, *, chunk_rows: int = 0, check_version: bool = True) -> TRLPatch:
    """Make this GRPOTrainer compute its log-probs and loss with quickllm_kernels (module docstring).
    chunk_rows: rows per lm_head chunk (0: linear_token_logprobs' choice). check_version: refuse a TRL
    other than the tested 1.16.x, whose trainer internals may differ. Returns the TRLPatch."""
    import trl
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch_trainer: trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, _ATTR, None) is not None:
        raise RuntimeError("patch_trainer: this trainer is already patched (unpatch_trainer(trainer) first)")
    if check_version and not (trl.__version__ == TESTED_TRL or trl.__version__.startswith(TESTED_TRL + ".")):
        raise RuntimeError(f"patch_trainer: tested with trl {TESTED_TRL}.x, found {trl.__version__}; its "
                           "GRPOTrainer internals may differ (check_version=False to patch anyway)")
    reasons = _unsupported(trainer)
    if reasons:
        raise ValueError("patch_trainer: this trainer's setup is not supported by the fused path: "
                         + "; ".join(reasons))
    loss_config_from_trl(trainer)  # the trainer's options, validated now rather than at the first step
    patch = TRLPatch(trainer, chunk_rows)
    patch._apply()
    return patch


def unpatch_trainer(trainer) -> None:
    """Undo patch_trainer (nothing if the trainer is not patched)."""
    patch = getattr(trainer, _ATTR, None)
    if patch is not None:
        patch.unpatch()


# --------------------------------------------------------------------------------------------
# The model side: hidden states -> log-probs and entropies of the labelled tokens
# --------------------------------------------------------------------------------------------


def _make_forward(previous, patch: TRLPatch):
    def forward(self, *args, quickllm_labels=None, quickllm_loss=None, **kwargs):
        if quickllm_labels is None and quickllm_loss is None:
            return previous(*args, **kwargs)
        trainer = patch.trainer
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # [B, S - 1, H]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.device)
        if quickllm_loss is not None:  # the loss in one pass from the hidden states (no log-probs tensor first)
            rows = hidden
        else:
            labels = quickllm_labels[:, 1:].to(weight.device)
            keep = labels != -100
            rows = hidden[keep]  # only the scored positions reach the lm_head
        ctx = contextlib.nullcontext()
        if trainer.args.cast_lm_head_to_fp32:
            rows, ctx = rows.float(), torch.autocast(rows.device.type, enabled=False)
        elif torch.is_autocast_enabled(rows.device.type):
            dtype = torch.get_autocast_dtype(rows.device.type)
            rows, weight = rows.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if rows.dtype != weight.dtype:
            rows = rows.to(weight.dtype)
        # logits * scale / T: the scale of the families that scale their logits folds into the temperature
        temperature = trainer.temperature / _logit_scale(self.config.get_text_config())
        if quickllm_loss is not None:
            with ctx:
                return quickllm_loss(rows, weight.to(rows.dtype), None if bias is None else bias.to(rows.dtype),
                                     temperature)
        with ctx:
            lp, ent = linear_token_logprobs(rows, weight.to(rows.dtype), labels[keep], temperature=temperature,
                                            bias=None if bias is None else bias.to(rows.dtype),
                                            return_entropy=True, chunk_rows=patch.chunk_rows)
        # scattered back into [B, S - 1]; masked_scatter keeps an all-padding batch connected to the graph
        return {"log_probs": lp.new_zeros(keep.shape).masked_scatter(keep, lp),
                "entropy": ent.new_zeros(keep.shape).masked_scatter(keep, ent)}
    return forward


def _per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                   compute_entropy=False, compute_aux_loss=False, token_type_ids=None, **multimodal):
    """GRPOTrainer._get_per_token_logps_and_entropies through the patched forward."""
    given = sorted(k for k, v in multimodal.items() if v is not None)
    if given:
        raise ValueError(f"quickllm_kernels.integrations.trl: multimodal inputs ({', '.join(given)}) are not "
                         "supported by the fused path; unpatch_trainer(trainer) to train this model")
    if compute_aux_loss:
        raise ValueError("quickllm_kernels.integrations.trl: the MoE router auxiliary loss is not supported")
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start:start + batch_size]
        am = attention_mask[start:start + batch_size]
        labels = ids.masked_fill(am == 0, -100)
        labels[:, :-logits_to_keep] = -100  # the completion tokens only
        inputs = {"input_ids": ids, "attention_mask": am}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids[start:start + batch_size]
        with self.accelerator.autocast():
            out = model(**inputs, quickllm_labels=labels)
        logps.append(out["log_probs"][:, -logits_to_keep:])
        entropies.append(out["entropy"][:, -logits_to_keep:])
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


# --------------------------------------------------------------------------------------------
# The loss, with TRL's accumulation scaling, entropy bonus and metrics
# --------------------------------------------------------------------------------------------


def _compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss on quickllm_kernels.grpo: the backbone's hidden states, then the lm_head,
    the log-probs and the loss in one pass (grpo_loss_from_hidden's), TRL's scaling and metrics."""
    present = sorted(k for k in _MULTIMODAL + ("token_type_ids",) if inputs.get(k) is not None)
    if any(k != "token_type_ids" for k in present):
        raise ValueError(f"quickllm_kernels.integrations.trl: multimodal inputs ({', '.join(present)}) are not "
                         "supported by the fused path; unpatch_trainer(trainer) to train this model")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

    cfg = loss_config_from_trl(self).replace(entropy_coef=0.0, vllm_importance_sampling_correction=False)
    training = self.model.training
    mode = "train" if training else "eval"
    accumulation = self.current_gradient_accumulation_steps if training else 1.0
    num_items = None
    if cfg.loss_type in GLOBALLY_NORMALISED:
        # num_items_in_batch counts the tokens of the whole generation batch on all processes
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if training:
            num_items = num_items * accumulation / self.args.steps_per_generation
    is_ratio = None
    if self.use_vllm and self.vllm_importance_sampling_correction:
        is_ratio = inputs["importance_sampling_ratio"]
    # TRL's entropy bonus, coef * mean entropy / accumulation, as the loss's own entropy term: the
    # dapo-like losses are not divided by the accumulation (their num_items is), the others are
    bonus_on = self._entropy_bonus_enabled
    coef = _entropy_coefficient(self) if bonus_on else 0.0
    if cfg.loss_type in GLOBALLY_NORMALISED:
        coef = coef / accumulation
    cfg_loss = cfg.replace(entropy_coef=coef)
    patch = getattr(self, _ATTR)
    c = completion_ids.size(1)

    def loss_fn(hidden, weight, bias, temperature):
        return _hidden_loss_terms(
            hidden[:, -c:], weight, bias, completion_ids.to(weight.device), mask.to(weight.device), cfg_loss,
            temperature=temperature, chunk_rows=patch.chunk_rows, old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps") if cfg.beta != 0.0 else None,
            advantages=inputs["advantages"], sampling_logprobs=inputs.get("sampling_per_token_logps"),
            importance_sampling_ratio=is_ratio, num_items=num_items, who="quickllm_kernels.integrations.trl")

    extra = {} if inputs.get("token_type_ids") is None else {"token_type_ids": inputs["token_type_ids"]}
    with self.accelerator.autocast():
        loss, terms, _, entropies = model(input_ids=input_ids, attention_mask=attention_mask, quickllm_loss=loss_fn,
                                          **extra)
    if cfg.loss_type not in GLOBALLY_NORMALISED:
        loss = loss / accumulation

    metrics = self._metrics[mode]
    if bonus_on:
        on = terms["mask"] if terms["entropy_mask"] is None else terms["entropy_mask"]
        _update_entropy_controller(self, entropies, on, mode)
        metrics["policy_loss"].append(self.accelerator.gather(terms["policy_loss"].detach()).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    _log_metrics(self, metrics, terms, entropies, cfg)
    return loss


def _entropy_coefficient(self):
    """The entropy bonus's coefficient for this step (adaptive: Skywork-OR1's controller, fixed for the
    whole accumulation window: 0 while the last window's entropy was above the target)."""
    if self.use_adaptive_entropy:
        return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
    return self.entropy_coef


def _update_entropy_controller(self, entropies, on, mode):
    """The adaptive controller's window statistics, and its step at the end of a window."""
    if not (self.use_adaptive_entropy and mode == "train"):
        return
    stats = torch.stack([torch.where(on, entropies.detach(), 0.0).sum(), on.sum().to(entropies.dtype)])
    self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
    if self.accelerator.sync_gradients:
        total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
        step = self.args.entropy_coef_delta
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None


def _log_metrics(self, metrics, terms, entropies, cfg):
    acc = self.accelerator
    m = terms["mask"]

    def world_mean(x):  # over all processes' kept tokens; [B, 1] values: over their sequences
        if x.shape[1] == 1 and m.shape[1] != 1:
            total, count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device, dtype=x.dtype)
        else:
            total, count = torch.where(m, x, 0.0).sum(), m.sum().to(x.dtype)
        totals = acc.reduce(torch.stack([total, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def per_sequence(x):  # NaN for a sequence without tokens, as TRL's 0 / 0
        if x.shape[1] == 1 and m.shape[1] != 1:
            return x.squeeze(1)
        return torch.where(m, x, 0.0).sum(-1) / m.sum(-1)

    with torch.no_grad():
        if cfg.beta != 0.0:
            metrics["kl"].append(world_mean(terms["kl"]))
        metrics["entropy"].append(world_mean(entropies))
        adv, ratio = terms["adv"], terms["capped"]
        if cfg.loss_type in CLIPPED:
            low = ((ratio < 1 - cfg.epsilon_low) & (adv < 0)).float()
            high = ((ratio > 1 + cfg.epsilon_high_value) & (adv > 0)).float()
            metrics["clip_ratio/low_mean"].append(world_mean(low))
            metrics["clip_ratio/high_mean"].append(world_mean(high))
            metrics["clip_ratio/region_mean"].append(world_mean(torch.maximum(low, high)))
            low_seq, high_seq = acc.gather(per_sequence(low)), acc.gather(per_sequence(high))
            metrics["clip_ratio/low_min"].append(_nan_extreme(low_seq, torch.min))
            metrics["clip_ratio/high_max"].append(_nan_extreme(high_seq, torch.max))
        elif cfg.loss_type == "cispo":
            clipped = ((terms["ratio"] > cfg.epsilon_high_value) & (adv > 0)).float()
            metrics["cispo_clip_ratio"].append(world_mean(clipped))
        elif cfg.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(world_mean(terms["phi"]))


def _nan_extreme(x, reduce):
    kept = x[~torch.isnan(x)]
    return float("nan") if kept.numel() == 0 else reduce(kept).item()
