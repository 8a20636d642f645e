"""quickllm_kernels.integrations.trl: a TRL GRPOTrainer patched to compute its log-probs and loss with
quickllm_kernels gives TRL's own losses, gradients and metrics, for every loss type and option, on a
tiny Qwen2 (random weights, saved to a temporary directory) with a character tokenizer built here;
float32 throughout. Skipped without trl.

Tolerance: the loss within 1e-5 relative, each parameter's gradient within 1e-5 of that gradient's
largest entry (both sides sum the same float32 products in different orders: TRL scores the whole
vocabulary in one tile, linear_token_logprobs in row chunks)."""
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import quickllm_kernels.grpo as qgrpo  # noqa: E402
import quickllm_kernels.integrations.trl as qtrl  # noqa: E402
from quickllm_kernels.grpo import LOSS_TYPES, GRPOLossConfig, vllm_importance_sampling_ratio  # noqa: E402

REL = 1e-5
CHARS = "0123456789+=abcdefghijklmnopqrstuvwxyz "


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # a larger lm_head: peaked distributions, ratios that leave the clip range
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _reward(completions, **kw):
    return [len(c) / 8 + c.count("1") + 0.5 * c.count("+") for c in completions]


def _trainer(model_dir, tmp_path, peft_config=None, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
              report_to="none", per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
              max_steps=2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    kw.update(overrides)
    ds = Dataset.from_dict({"prompt": ["1+2=", "3+44=", "5+6=", "7+1=", "12+9=", "8+8="]})
    return GRPOTrainer(model=model_dir, reward_funcs=_reward, args=GRPOConfig(**kw), train_dataset=ds,
                       processing_class=_tokenizer(), peft_config=peft_config)


def _inputs(trainer, seed, *, per_token_adv=False):
    """One batch as _generate_and_score_completions leaves it, with old / reference / sampling log-probs
    near the policy's own, so that ratios land inside and outside the clip range."""
    g = torch.Generator().manual_seed(seed)
    tok = trainer.processing_class
    prompts = tok(["1+2=", "33+4=", "5+6=", "7+71="], padding=True, return_tensors="pt")
    b, c = 4, 6
    completion_ids = torch.randint(3, len(tok), (b, c), generator=g)
    lengths = torch.tensor([6, 3, 5, 1])
    completion_mask = (torch.arange(c)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    ids = torch.cat([prompts["input_ids"], completion_ids], 1)
    am = torch.cat([prompts["attention_mask"], completion_mask], 1)
    with torch.no_grad():
        own, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, am, c)

    def near(x, scale):
        return torch.where(completion_mask.bool(), x + scale * torch.randn(x.shape, generator=g), 0.0)

    old = near(own, 0.25)
    sampling = near(old, 0.2)
    inputs = {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.randn((b, c) if per_token_adv else (b,), generator=g),
              "num_items_in_batch": completion_mask.sum() * 3,  # a generation batch of three such
              "old_per_token_logps": old, "ref_per_token_logps": near(own, 0.3),
              "sampling_per_token_logps": sampling}
    return inputs


def _configure(trainer, loss_type, opts):
    """Set the options where TRL's loss reads them (the trainer's copies and its args)."""
    t, a = trainer, trainer.args
    t.loss_type = loss_type
    t.beta = opts.get("beta", 0.04)
    a.use_bias_correction_kl = opts.get("use_bias_correction_kl", True)
    t.epsilon_low = 0.2
    t.epsilon_high = opts.get("epsilon_high", 5.0 if loss_type == "cispo" else 0.28)
    a.delta = opts.get("delta")
    t.importance_sampling_level = opts.get("importance_sampling_level", "token")
    t.top_entropy_quantile = opts.get("top_entropy_quantile", 1.0)
    t.off_policy_mask_threshold = opts.get("off_policy_mask_threshold")
    t.use_vllm = opts.get("use_vllm", False)
    t.vllm_importance_sampling_mode = opts.get("vllm_importance_sampling_mode", "sequence_mask")
    t.vllm_importance_sampling_clip_min = 0.5
    t.vllm_importance_sampling_clip_max = 2.0
    t.entropy_coef = opts.get("entropy_coef", 0.0)
    t.use_adaptive_entropy = opts.get("use_adaptive_entropy", False)
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t._last_world_entropy = opts.get("last_world_entropy", float("inf"))
    t._entropy_window_stats = None
    a.entropy_target = 10.0
    t.current_gradient_accumulation_steps = 2
    a.steps_per_generation = 3
    t.max_completion_length = 6


def _step(trainer, inputs):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, trainer.entropy_coef


def _assert_same(got, want):
    (loss, grads, metrics, coef), (loss0, grads0, metrics0, coef0) = got, want
    assert abs(float(loss) - float(loss0)) <= REL * abs(float(loss0)), (float(loss), float(loss0))
    assert grads.keys() == grads0.keys() and len(grads0) > 10
    for name, g0 in grads0.items():
        err = (grads[name] - g0).abs().max()
        assert err <= REL * g0.abs().max(), (name, float(err), float(g0.abs().max()))
    assert metrics.keys() == metrics0.keys()
    for k, v0 in metrics0.items():
        if v0 != v0:  # NaN
            assert metrics[k] != metrics[k], k
        else:
            assert abs(metrics[k] - v0) <= REL * abs(v0) + 1e-7, (k, metrics[k], v0)
    assert coef == coef0


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    return _trainer(model_dir, tmp_path_factory.mktemp("run"))


@pytest.fixture
def fused_only(monkeypatch):
    """While set: TRL's own chunked log-prob head raises, and the fused calls are counted: ("logprobs", rows)
    for linear_token_logprobs (the old and reference log-probs, and the loss where it cannot take one
    pass), ("one pass", kept rows) for the one-pass loss."""
    calls = []

    def counted(module, name, kind, rows):
        real = getattr(module, name)

        def wrapper(*a, **k):
            calls.append((kind, rows(a)))
            return real(*a, **k)
        monkeypatch.setattr(module, name, wrapper)

    def refuse(*a, **k):
        raise AssertionError("TRL's chunked log-prob head ran under the patch")

    def arm():
        counted(qtrl, "linear_token_logprobs", "logprobs", lambda a: a[0].shape[0])
        counted(qgrpo, "linear_token_logprobs", "logprobs", lambda a: int((a[2] != -100).sum()))
        counted(qgrpo, "_one_pass", "one pass", lambda a: int(a[4].sum()))
        monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", refuse)
        return calls

    return arm


OPTIONS = {
    "plain": {},
    "no_kl": dict(beta=0.0),
    "kl_uncorrected": dict(use_bias_correction_kl=False),
    "sequence_level": dict(importance_sampling_level="sequence"),
    "delta": dict(delta=1.2),
    "off_policy_mask": dict(off_policy_mask_threshold=0.01),
    "top_entropy": dict(top_entropy_quantile=0.4),
    "entropy_bonus": dict(entropy_coef=0.05),
    "adaptive_entropy": dict(entropy_coef=0.05, use_adaptive_entropy=True, last_world_entropy=0.0),
    "vllm_sequence_mask": dict(use_vllm=True, vllm_importance_sampling_mode="sequence_mask"),
    "vllm_token_truncate": dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate"),
    "vllm_token_mask": dict(use_vllm=True, vllm_importance_sampling_mode="token_mask"),
    "per_token_advantages": dict(per_token_adv=True),
}


# Every loss type once (its reduction and normaliser), every option with a locally and a globally
# normalised loss type (where the option is read and passed); test_grpo_trl_loss.py runs the full grid
# of loss types x options against TRL's loss on given log-probs.
CASES = [(lt, "plain") for lt in LOSS_TYPES] + [(lt, opt) for opt in OPTIONS if opt != "plain"
                                                for lt in ("grpo", "dapo")]
CASES += [("cispo", "vllm_token_mask"), ("sapo", "entropy_bonus"), ("luspo", "sequence_level"),
          ("vespo", "vllm_token_truncate"), ("vespo", "off_policy_mask"), ("bnpo", "top_entropy"),
          ("dr_grpo", "delta")]


@pytest.mark.parametrize("loss_type,option", CASES)
def test_patched_loss_matches_trl(trainer, fused_only, loss_type, option):
    opts = OPTIONS[option]
    _configure(trainer, loss_type, opts)
    seed = 100 * LOSS_TYPES.index(loss_type) + list(OPTIONS).index(option)
    inputs = _inputs(trainer, seed=seed, per_token_adv=opts.get("per_token_adv", False))
    if trainer.use_vllm:
        inputs["importance_sampling_ratio"] = vllm_importance_sampling_ratio(
            inputs["old_per_token_logps"], inputs["sampling_per_token_logps"], inputs["completion_mask"],
            mode=trainer.vllm_importance_sampling_mode, clip_min=0.5, clip_max=2.0)
    coef = trainer.entropy_coef
    want = _step(trainer, inputs)
    trainer.entropy_coef, trainer._entropy_window_stats = coef, None  # the adaptive controller, as before
    calls = fused_only()
    with qtrl.patch_trainer(trainer):
        got = _step(trainer, inputs)
    # one fused call, over the completion tokens only: in one pass, except where the loss needs every
    # entropy first (top_entropy_quantile)
    kind = "logprobs" if opts.get("top_entropy_quantile", 1.0) < 1.0 else "one pass"
    assert calls == [(kind, int(inputs["completion_mask"].sum()))]
    _assert_same(got, want)
    assert float(want[0]) != 0.0


def test_unpatch_restores_the_trainer(trainer):
    _configure(trainer, "dapo", {})
    inputs = _inputs(trainer, seed=1)
    forward = trainer.model.__dict__.get("forward")
    before = _step(trainer, inputs)
    patch = qtrl.patch_trainer(trainer)
    assert trainer.model.forward is not forward and "_compute_loss" in trainer.__dict__
    with pytest.raises(RuntimeError, match="already patched"):
        qtrl.patch_trainer(trainer)
    patch.unpatch()
    assert trainer.model.__dict__.get("forward") is forward  # TRL's own fused head again
    assert "_compute_loss" not in trainer.__dict__ and "_get_per_token_logps_and_entropies" not in trainer.__dict__
    after = _step(trainer, inputs)
    assert torch.equal(before[0], after[0]) and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    qtrl.unpatch_trainer(trainer)  # a no-op now


def test_training_steps_match_trl(model_dir, tmp_path, fused_only):
    """trainer.train(): generation, old log-probs (two iterations per generation), the reference model's
    log-probs and the updates, patched and not, from the same weights and seed."""
    common = dict(max_steps=3, num_iterations=2, beta=0.04, optim="sgd", learning_rate=0.05, loss_type="dapo",
                  epsilon_high=0.28)
    plain = _trainer(model_dir, tmp_path / "a", **common)
    plain.train()
    patched = _trainer(model_dir, tmp_path / "b", **common)
    calls = fused_only()
    qtrl.patch_trainer(patched)
    patched.train()
    # two generations (old and reference log-probs each), three loss steps in one pass each
    assert [kind for kind, _ in calls].count("logprobs") == 2 * 2 and [kind for kind, _ in calls].count("one pass") == 3
    logs = [h for h in plain.state.log_history if "loss" in h]
    logs_p = [h for h in patched.state.log_history if "loss" in h]
    assert len(logs) == len(logs_p) == 3
    for h0, h1 in zip(logs, logs_p):
        for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm"):
            assert abs(h1[key] - h0[key]) <= REL * abs(h0[key]) + 1e-7, (key, h1[key], h0[key])
    assert any(h["kl"] > 0 for h in logs)
    for (name, p0), p1 in zip(plain.model.named_parameters(), patched.model.parameters()):
        assert (p1 - p0).abs().max() <= REL * p0.abs().max(), name


def _trl_defaults(**changes):
    """GRPOConfig's field defaults (without building one: that resets accelerate's shared state)."""
    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(GRPOConfig) if f.init}
    return SimpleNamespace(**{**fields, **changes})


def test_loss_config_from_trl():
    args = _trl_defaults()
    cfg = qtrl.loss_config_from_trl(args)
    # TRL's defaults are the trl preset; without vLLM no importance correction applies
    want = GRPOLossConfig.trl_defaults(max_completion_length=args.max_completion_length, epsilon_high=0.2,
                                       vllm_importance_sampling_correction=False)
    assert cfg == want
    cfg = qtrl.loss_config_from_trl(_trl_defaults(use_vllm=True))
    assert cfg.vllm_importance_sampling_correction and cfg.vllm_importance_sampling_mode == "sequence_mask"
    assert cfg.vllm_importance_sampling_clip_max == 3.0
    args = _trl_defaults(loss_type="cispo", epsilon_high=4.0, importance_sampling_level="sequence", beta=0.1)
    cfg = qtrl.loss_config_from_trl(args)
    assert (cfg.loss_type, cfg.epsilon_high_value, cfg.importance_sampling_level, cfg.beta) == ("cispo", 4.0,
                                                                                               "sequence", 0.1)


def test_refusals(trainer, monkeypatch):
    with pytest.raises(TypeError, match="must be a trl.GRPOTrainer"):
        qtrl.patch_trainer(object())
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match="tested with trl 1.16.x, found 1.17.0"):
        qtrl.patch_trainer(trainer)
    qtrl.patch_trainer(trainer, check_version=False).unpatch()
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "aux_loss_enabled", True)
    with pytest.raises(ValueError, match="router auxiliary loss"):
        qtrl.patch_trainer(trainer)
    monkeypatch.undo()
    cfg = copy.copy(trainer.model.config)
    cfg.final_logit_softcapping = 30.0
    monkeypatch.setattr(trainer.model, "config", cfg)
    with pytest.raises(ValueError, match="soft-capping"):
        qtrl.patch_trainer(trainer)
    monkeypatch.undo()
    _configure(trainer, "dapo", {})
    inputs = _inputs(trainer, seed=2)
    inputs["pixel_values"] = torch.zeros(1, 3, 4, 4)
    with qtrl.patch_trainer(trainer), pytest.raises(ValueError, match=r"multimodal inputs \(pixel_values\)"):
        trainer.compute_loss(trainer.model, inputs)
    assert "_compute_loss" not in trainer.__dict__


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


@pytest.mark.parametrize("setup", ["gradient_checkpointing", "bf16", "peft"])
def test_patched_training_setups(model_dir, tmp_path, fused_only, setup):
    """The patched loss under gradient checkpointing (the backbone recomputed in the backward pass), bf16
    autocast (the lm_head and the loss on bf16 logits, TRL's too) and a PEFT LoRA policy (the wrapped
    base model's forward is the one patched; only the adapters train): the loss and every trained
    parameter's gradient as TRL's (float32: within 1e-5; bf16: as close as two bf16 computations get)."""
    overrides = {"gradient_checkpointing": dict(gradient_checkpointing=True), "bf16": dict(bf16=True)}.get(setup, {})
    if setup == "peft":
        peft = pytest.importorskip("peft")
        overrides = dict(peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                     task_type="CAUSAL_LM"))
    trainer = _trainer(model_dir, tmp_path, **overrides)
    _configure(trainer, "dapo", dict(entropy_coef=0.05))
    inputs = _inputs(trainer, seed=7)
    want = _step(trainer, inputs)
    calls = fused_only()
    with qtrl.patch_trainer(trainer):
        got = _step(trainer, inputs)
    assert [kind for kind, _ in calls] == ["one pass"]
    if setup != "bf16":
        _assert_same(got, want)
        assert setup != "peft" or all("lora" in name for name in got[1])
        return
    (loss, grads, _, _), (loss0, grads0, _, _) = got, want
    assert abs(float(loss) - float(loss0)) <= 2e-2 * abs(float(loss0))
    assert grads.keys() == grads0.keys()
    for name, g0 in grads0.items():
        assert _rel(grads[name], g0) <= 5e-2, (name, _rel(grads[name], g0))
