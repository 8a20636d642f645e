"""The GRPO trainer: rewards, a short run on the built-in task whose reward must rise (and must not
with the loss sign flipped), resume from a checkpoint, and a run on a tiny Hugging Face model
directory and JSONL dataset written here."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from quickllm_models import grpo_trainer as grpo  # noqa: E402
from quickllm_models.grpo_trainer import GRPOConfig, answer_reward, builtin_trainer, format_reward  # noqa: E402


def test_rewards():
    comps = ["<answer>12</answer>", "<answer>112</answer>", "12", "<answer>7</answer> extra", "<answer> 12 </answer>"]
    assert answer_reward(comps, ["12"] * 5) == [1.0, 0.5, 0.01, 0.01, 1.0]
    assert format_reward(comps, ["12"] * 5) == [0.1, 0.1, 0.0, 0.0, 0.1]


def test_char_tokenizer_round_trip():
    tok = grpo.CharTokenizer()
    ids = tok.encode("3+4=<answer>7</answer>")
    assert tok.decode(ids + [tok.eos_id, 5]) == "3+4=<answer>7</answer>"
    assert ids.count(tok.index["<answer>"]) == 1


# Short but real: warm-up, then GRPO. The threshold is far above where the warmed-up model starts,
# so a run that does not learn (wrong loss sign, zeroed advantages) cannot pass it.
SHORT = dict(steps=120)  # the defaults otherwise (tiny Qwen2, a + b with a, b <= 5, 40 warm-up steps)


def _short_run(tmp_path, name):
    cfg = GRPOConfig(out=str(tmp_path / name), **SHORT)
    tr = builtin_trainer(cfg)
    tr.warmup(cfg.warmup_steps)
    hist = tr.train(progress=False)
    first = sum(r["reward"] for r in hist[:10]) / 10
    last = sum(r["reward"] for r in hist[-10:]) / 10
    return first, last, tr


def test_reward_rises(tmp_path):
    first, last, tr = _short_run(tmp_path, "ok")
    assert first < 0.35, first
    assert last > 0.6 and last > first + 0.25, (first, last)
    lines = (tr.out / "log.jsonl").read_text().splitlines()
    assert len(lines) == SHORT["steps"] and {"reward", "kl", "loss", "clip_fraction"} <= set(json.loads(lines[0]))
    assert (tr.out / "curves.png").stat().st_size > 1000
    assert (tr.out / "checkpoint.pt").exists()


def test_flipped_loss_sign_does_not_learn(tmp_path, monkeypatch):
    """The control that shows test_reward_rises can fail: ascending the loss instead of descending."""
    real = grpo.qk.grpo_loss_from_hidden

    def flipped(*a, **k):
        loss, metrics, lp = real(*a, **k)
        return -loss, metrics, lp

    monkeypatch.setattr(grpo.qk, "grpo_loss_from_hidden", flipped)
    first, last, _ = _short_run(tmp_path, "flipped")
    assert last < 0.6 or last < first + 0.25, (first, last)


def test_resume_continues_the_same_run(tmp_path):
    small = dict(steps=6, warmup_steps=5, prompts_per_step=4, group_size=4, checkpoint_every=3)
    straight = builtin_trainer(GRPOConfig(out=str(tmp_path / "a"), **small))
    straight.warmup(5)
    want = straight.train(progress=False)

    first = builtin_trainer(GRPOConfig(out=str(tmp_path / "b"), **{**small, "steps": 3}))
    first.warmup(5)
    first.train(progress=False)
    again = builtin_trainer(GRPOConfig(out=str(tmp_path / "b"), **small))
    again.load_checkpoint()
    assert again.step == 3
    got = again.train(progress=False)
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(got) == drop(want)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 6


def test_cli_on_a_hugging_face_model_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = list("0123456789+-=?<>/abcdefghijklmnopqrstuvwxyz .\n")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    model_dir = tmp_path / "model"
    hf_tok.save_pretrained(model_dir)
    cfg = transformers.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                   tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {a}+{a}?", "answer": f"step.\n#### {2 * a}"}) + "\n"
                            for a in range(5)))
    out = tmp_path / "run"
    rc = grpo.main(["--model", str(model_dir), "--dataset", str(data), "--steps", "2", "--prompts-per-step", "2",
                    "--group-size", "2", "--max-new-tokens", "4", "--out", str(out), "--quiet"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["completion_len"] > 0 for r in log)
    assert (out / "checkpoint.pt").exists()


def test_smoothed_curve():
    assert grpo.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    s = grpo.smoothed([0.0] * 5 + [1.0] * 5)
    assert s[4] == 0.0 and 0.0 < s[5] < s[9] < 1.0


def test_progress_in_a_log_file_is_one_line_per_refresh(tmp_path, capsys):
    tr = builtin_trainer(GRPOConfig(out=str(tmp_path / "p"), steps=2, prompts_per_step=2, group_size=2))
    tr.train(progress=True)  # stderr is not a terminal under pytest: plain lines
    err = capsys.readouterr().err
    assert "\r" not in err and "GRPO" in err and "2/2" in err


def test_gsm_symbolic_task_rewards_with_its_scorer():
    pytest.importorskip("reasoning_gym")
    problems, reward = grpo.reasoning_gym_task("gsm_symbolic", 4, seed=3)
    again, _ = grpo.reasoning_gym_task("gsm_symbolic", 4, seed=3)
    assert problems == again and len(problems) == 4 and all(p["answer"].lstrip("-").isdigit() for p in problems)
    a = problems[0]["answer"]
    assert reward([f"so <answer>{a}</answer>", "<answer>-1</answer>", a], [a, a, a]) == [1.0, 0.01, 0.0]  # its scale


@pytest.mark.slow
def test_gsm_symbolic_on_smollm2(smollm2_dir, tmp_path):
    """A few GRPO steps of the real SmolLM2-135M-Instruct on generated GSM-style problems, on the CPU."""
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "run"
    rc = grpo.main(["--model", str(smollm2_dir), "--task", "gsm_symbolic", "--steps", "2", "--prompts-per-step", "1",
                    "--group-size", "2", "--max-new-tokens", "8", "--inner-epochs", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kl"], r["grad_norm"]])).all() for r in log)
    assert (out / "curves.png").stat().st_size > 1000


def test_cli_refuses_task_without_model_and_both_sources(tmp_path):
    with pytest.raises(SystemExit):
        grpo.main(["--task", "gsm_symbolic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        grpo.main(["--model", str(tmp_path), "--task", "gsm_symbolic", "--dataset", "x.jsonl", "--out", str(tmp_path)])
