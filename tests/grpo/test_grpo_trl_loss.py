"""grpo_loss against TRL's own GRPOTrainer._compute_loss (trl 1.16), run on a light stand-in trainer that
hands it the same per-token log-probs and entropies: every loss type and option, loss, gradients and
metrics. Skipped without trl."""
import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402

from quickllm_kernels.grpo import (LOSS_TYPES, GRPOLossConfig, _nanstd, grpo_loss,  # noqa: E402
                                   vllm_importance_sampling_ratio)

# float64 inputs: both sides then agree to rounding (~1e-15); the bound leaves room for a different
# order of the same float64 operations only.
TOL = dict(rtol=1e-10, atol=1e-12)


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


class _StandIn:
    """What GRPOTrainer._compute_loss reads of its trainer, with TRL's own methods."""
    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(self, cfg: GRPOLossConfig, logps, entropies, use_vllm, ga=1, spg=1):
        self.args = SimpleNamespace(
            delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl,
            sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
            vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
            vespo_lambda_neg=cfg.vespo_lambda_neg, entropy_target=0.2, steps_per_generation=spg)
        self.loss_type, self.beta = cfg.loss_type, cfg.beta
        self.epsilon_low, self.epsilon_high = cfg.epsilon, cfg.epsilon_high_value
        self.importance_sampling_level = cfg.importance_sampling_level
        self.top_entropy_quantile = cfg.top_entropy_quantile
        self.off_policy_mask_threshold = cfg.off_policy_mask_threshold
        self.max_completion_length = cfg.max_completion_length
        self.use_vllm, self.vllm_importance_sampling_correction = use_vllm, True
        self.entropy_coef, self.use_adaptive_entropy = cfg.entropy_coef, False
        self._entropy_bonus_enabled = cfg.entropy_coef != 0.0
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = ga
        self.accelerator = _Accelerator()
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._out = (logps, entropies)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._out[0], self._out[1], None


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _batch(b=6, t=9, seed=0, per_token_adv=False):
    g = _g(seed)
    dt = torch.float64
    lp = -torch.rand(b, t, generator=g, dtype=dt) * 3
    old = lp + 0.3 * torch.randn(b, t, generator=g, dtype=dt)  # ratios inside and outside the clip range
    ref = lp + 0.2 * torch.randn(b, t, generator=g, dtype=dt)
    sampling = old + 0.15 * torch.randn(b, t, generator=g, dtype=dt)
    ent = torch.rand(b, t, generator=g, dtype=dt) * 4
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=g, dtype=dt)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    # TRL's tensors hold 0 at padding (its log-prob head writes 0 there): give both sides the same
    lp, old, ref, sampling, ent = (torch.where(mask.bool(), x, 0.0) for x in (lp, old, ref, sampling, ent))
    return dict(lp=lp, old=old, ref=ref, sampling=sampling, ent=ent, adv=adv, mask=mask)


def _run_trl(cfg, d, *, old=True, vllm=False, is_ratio=None, num_items=None, ga=1, spg=1):
    lp = d["lp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()
    stand_in = _StandIn(cfg, lp, ent, use_vllm=vllm, ga=ga, spg=spg)
    b, t = lp.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": d["mask"],
              "advantages": d["adv"],
              "num_items_in_batch": d["mask"].sum() if num_items is None else torch.as_tensor(num_items)}
    if old:
        inputs["old_per_token_logps"] = d["old"]
    if cfg.beta:
        inputs["ref_per_token_logps"] = d["ref"]
    if vllm:
        inputs["importance_sampling_ratio"] = is_ratio
        inputs["sampling_per_token_logps"] = d["sampling"]
    loss = stand_in._compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), lp.grad, ent.grad, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


def _run_ours(cfg, d, *, old=True, vllm=False, num_items=None):
    lp = d["lp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()
    loss, metrics = grpo_loss(lp, d["old"] if old else None, d["ref"] if cfg.beta else None, d["adv"], d["mask"], cfg,
                              sampling_logprobs=d["sampling"] if vllm else None, entropy=ent, num_items=num_items)
    loss.backward()
    return loss.detach(), lp.grad, ent.grad, metrics


def _compare(cfg, d, **kw):
    vllm = kw.get("vllm", False)
    is_ratio = None
    if vllm:
        is_ratio = vllm_importance_sampling_ratio(
            d["old"], d["sampling"], d["mask"], mode=cfg.vllm_importance_sampling_mode,
            clip_min=cfg.vllm_importance_sampling_clip_min, clip_max=cfg.vllm_importance_sampling_clip_max)
    want, want_glp, want_gent, trl_metrics = _run_trl(cfg, d, is_ratio=is_ratio, **kw)
    got, got_glp, got_gent, metrics = _run_ours(cfg, d, **kw)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_glp, want_glp, **TOL)
    if cfg.entropy_coef:
        torch.testing.assert_close(got_gent, want_gent, **TOL)
    else:
        assert got_gent is None and want_gent is None
    assert got != 0 and got_glp.abs().sum() > 1e-3  # not a vacuous 0 == 0
    if cfg.beta:
        torch.testing.assert_close(float(metrics["kl"]), trl_metrics["kl"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(float(metrics["entropy"]), trl_metrics["entropy"], rtol=1e-6, atol=1e-7)
    if cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        for ours, theirs in (("clip_fraction", "region_mean"), ("clip_fraction_low", "low_mean"),
                             ("clip_fraction_high", "high_mean")):
            torch.testing.assert_close(float(metrics[ours]), trl_metrics[f"clip_ratio/{theirs}"])
    if cfg.loss_type == "cispo":
        torch.testing.assert_close(float(metrics["cispo_clip_fraction"]), trl_metrics["cispo_clip_ratio"])
    if cfg.loss_type == "vespo":
        torch.testing.assert_close(float(metrics["vespo_phi"]), trl_metrics["vespo/phi_seq_mean"], rtol=1e-6, atol=1e-9)


def _cfg(loss_type, **kw):
    return GRPOLossConfig(loss_type=loss_type, max_completion_length=12, **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,bias_correction", [(0.0, False), (0.04, False), (0.04, True)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_each_loss_type_matches_trl(loss_type, beta, bias_correction, level):
    if loss_type == "vespo" and level == "sequence":
        level = "token"  # vespo makes its own sequence weight
    cfg = _cfg(loss_type, beta=beta, use_bias_correction_kl=bias_correction, importance_sampling_level=level,
               epsilon_high=0.28 if loss_type != "cispo" else 1.3)
    _compare(cfg, _batch(seed=1))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_matches_trl(loss_type):
    """No old log-probs (one step per generation): the ratio is exactly 1 in value, not in gradient."""
    _compare(_cfg(loss_type, beta=0.04, use_bias_correction_kl=True), _batch(seed=2), old=False)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vllm_importance_sampling_matches_trl(loss_type, mode):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL rejects vespo with sequence-level vLLM ratios (so does GRPOLossConfig)")
    cfg = _cfg(loss_type, beta=0.04, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.9,
               vllm_importance_sampling_clip_max=1.1)
    _compare(cfg, _batch(seed=3), vllm=True)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("option", ["delta", "off_policy", "off_policy_vllm", "top_entropy", "entropy_coef",
                                    "per_token_adv", "all"])
def test_options_match_trl(loss_type, option):
    kw, run, d = {}, {}, _batch(seed=4, per_token_adv=option in ("per_token_adv", "all"))
    if option in ("delta", "all"):
        kw["delta"] = 1.15
    if option in ("off_policy", "off_policy_vllm", "all"):
        kw["off_policy_mask_threshold"] = 0.02
    if option in ("top_entropy", "all"):
        kw["top_entropy_quantile"] = 0.3
    if option in ("entropy_coef", "all"):
        kw["entropy_coef"] = 0.05
    if option in ("off_policy_vllm", "all"):
        run["vllm"] = True
    _compare(_cfg(loss_type, beta=0.04, use_bias_correction_kl=True, **kw), d, **run)


def test_trl_defaults_match_trl_with_accumulation():
    """TRL's defaults, its dapo normaliser over a generation batch split into accumulation steps."""
    cfg = GRPOLossConfig.trl_defaults(max_completion_length=12)
    d = _batch(seed=5)
    total = 3 * int(d["mask"].sum())  # the generation batch: three such batches
    want, want_g, _, _ = _run_trl(cfg, d, num_items=total, ga=2, spg=3)
    got, got_g, _, _ = _run_ours(cfg, d, num_items=total * 2 / 3)  # num_items / processes * GA / steps_per_gen
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_g, want_g, **TOL)


def test_nanstd_matches_trl():
    x = torch.randn(5, 4, generator=_g(6), dtype=torch.float64)
    x[0, 1] = x[2, :3] = x[3] = float("nan")
    for dim in (None, 0, 1):
        torch.testing.assert_close(_nanstd(x, dim), trl_nanstd(x, dim), equal_nan=True)
    torch.testing.assert_close(_nanstd(x, 1, keepdim=True), trl_nanstd(x, 1, keepdim=True), equal_nan=True)


def test_grid_is_not_trivially_equal():
    """The stand-in really runs TRL's code: another loss type gives another loss."""
    d = _batch(seed=7)
    n = int(d["mask"].sum()) + 5  # dapo's divisor: a generation batch larger than this batch (else dapo == bnpo)
    losses = {lt: _run_trl(_cfg(lt, beta=0.04), d, num_items=n)[0] for lt in LOSS_TYPES}
    for a, b in itertools.combinations(LOSS_TYPES, 2):
        assert not torch.allclose(losses[a], losses[b]), (a, b)
