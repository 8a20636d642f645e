"""GRPO trainer, readable end to end, in the order a step runs:

  1. rollout     G sampled completions per prompt (temperature, KV cache)
  2. reward      pluggable reward functions: the answer in <answer>...</answer> (1.0 exact, 0.5
                 contained, 0.01 otherwise) plus a format reward
  3. advantages  group-relative: (r - mean of the prompt's group) / (std + eps)
  4. replay      a few inner epochs over the batch against the old log-probs, with a frozen
                 reference model's KL, through the fused hidden-state loss (no [B, T, V] logits)
  5. update      gradient clipping, optimiser step

    python -m quickllm_models.grpo_trainer                      # built-in task: tiny LM, character-level arithmetic
    python -m quickllm_models.grpo_trainer --model DIR --task gsm_symbolic      # a local HF model, generated problems
    python -m quickllm_models.grpo_trainer --model DIR --dataset train.jsonl    # ... or a JSONL of question/answer

--model: a Hugging Face directory (config.json, safetensors, tokenizer) of a Qwen2, Llama or Mixtral
model (e.g. SmolLM2-135M-Instruct converted from GGUF by `python -m quickllm_models.llama from-gguf`).
--task gsm_symbolic: GSM8K-style problems with varied numbers, generated offline by the reasoning-gym
package, and scored by its own scorer (1.0 for the right number in <answer>...</answer>).

Writes <out>/log.jsonl (one line per step), <out>/curves.png (reward, loss, KL per step) and
<out>/checkpoint.pt (resume with --resume).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `models` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quickllm_kernels as qk  # noqa: E402
from quickllm_models.qwen2 import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The built-in task: a character tokenizer and small arithmetic problems
# ------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Characters plus a few special tokens; <answer> and </answer> are single tokens."""

    specials = ["<pad>", "<eos>", "<answer>", "</answer>"]

    def __init__(self, chars: str = "0123456789+-=? "):
        self.vocab = self.specials + list(chars)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.eos_id = 0, 1
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    def encode(self, text: str) -> list[int]:
        out = []
        for part in self._split.split(text):
            if part in self.index and part in self.specials:
                out.append(self.index[part])
            else:
                out.extend(self.index[c] for c in part)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.vocab[i])
        return "".join(out)


def arithmetic_problems(n: int, seed: int, max_operand: int = 9) -> list[dict]:
    """{"question": "a+b=", "answer": str(a + b)} with a, b in 0..max_operand."""
    rng = random.Random(seed)
    probs = []
    for _ in range(n):
        a, b = rng.randrange(max_operand + 1), rng.randrange(max_operand + 1)
        probs.append({"question": f"{a}+{b}=", "answer": str(a + b)})
    return probs


# ------------------------------------------------------------------------------------------------
# Rewards: each maps (completions, answers) to one float per completion
# ------------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(text: str) -> str | None:
    m = _ANSWER.search(text)
    return m.group(1).strip() if m else None


def answer_reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the extracted answer equals the reference, 0.5 when it contains it, else 0.01."""
    out = []
    for c, a in zip(completions, answers):
        got = extract_answer(c)
        out.append(1.0 if got == a else 0.5 if got is not None and a in got else 0.01)
    return out


def format_reward(completions: list[str], answers: list[str]) -> list[float]:
    """0.1 when the completion is exactly one <answer>...</answer> block (whitespace around allowed)."""
    return [0.1 if re.fullmatch(r"\s*<answer>[^<]*</answer>\s*", c) else 0.0 for c in completions]


DEFAULT_REWARDS: tuple[Callable, ...] = (answer_reward, format_reward)


def reasoning_gym_task(name: str, n: int, seed: int) -> tuple[list[dict], Callable]:
    """n problems of a reasoning-gym task (generated offline, deterministic in seed) and a reward that
    scores the answer extracted from <answer>...</answer> with the task's own scorer."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(f"--task {name}: needs the reasoning-gym package (pip install reasoning-gym)") from e
    data = reasoning_gym.create_dataset(name, size=n, seed=seed)
    problems = [{"question": x["question"], "answer": str(x["answer"])} for x in data]

    def task_reward(completions: list[str], answers: list[str]) -> list[float]:
        return [float(data.score_answer(extract_answer(c), {"answer": a})) for c, a in zip(completions, answers)]
    task_reward.__name__ = f"{name}_reward"
    return problems, task_reward


TASKS = ("gsm_symbolic",)

# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPOConfig:
    steps: int = 300
    prompts_per_step: int = 16
    group_size: int = 16               # G completions per prompt
    max_new_tokens: int = 8
    temperature: float = 1.0
    inner_epochs: int = 2              # replays of each batch against its old log-probs
    lr: float = 2e-3
    clip_low: float = 0.2
    clip_high: float = 0.28            # DAPO's asymmetric clip
    beta: float = 0.04                 # weight of the k3 KL to the reference model
    loss_type: str = "grpo"
    grad_clip: float = 1.0
    warmup_steps: int = 40             # supervised steps on the built-in task before GRPO
    max_operand: int = 5               # built-in task: a + b with a, b in 0..max_operand
    seed: int = 0
    out: str = "runs/grpo"
    checkpoint_every: int = 10
    backend: str | None = None         # quickllm backend for the whole run (None: auto)


# ------------------------------------------------------------------------------------------------
# Rollout
# ------------------------------------------------------------------------------------------------


def left_pad(seqs: list[list[int]], pad_id: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def rollout(policy, prompt_ids: list[list[int]], cfg: GRPOConfig, eos_id: int, pad_id: int, gen: torch.Generator):
    """Sample cfg.group_size completions of each prompt. Returns prompt ids/mask [B, P] (left padded),
    completion ids [B, C] and completion mask [B, C] (1 up to and including the first eos)."""
    dev = policy.lm_head.weight.device
    seqs = [p for p in prompt_ids for _ in range(cfg.group_size)]  # G consecutive copies per prompt
    ids, mask = left_pad(seqs, pad_id, dev)
    b, p = ids.shape
    cache = policy.new_cache(b, p + cfg.max_new_tokens)
    logits = policy(ids, attention_mask=mask, cache=cache).logits[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    out, out_mask = [], []
    for _ in range(cfg.max_new_tokens):
        probs = torch.softmax(logits.float() / cfg.temperature, -1)
        tok = torch.multinomial(probs.cpu(), 1, generator=gen).to(dev)[:, 0]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        out_mask.append(~done)
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        logits = policy(tok[:, None], attention_mask=(~done | (tok == eos_id))[:, None].long(), cache=cache).logits[:, -1]
    return ids, mask, torch.stack(out, 1), torch.stack(out_mask, 1).long()


def completion_hidden(model, prompt_ids, prompt_mask, comp_ids, comp_mask):
    """Hidden states that predict each completion token: [B, C, H] (position P - 1 + t predicts token t)."""
    ids = torch.cat((prompt_ids, comp_ids), 1)
    mask = torch.cat((prompt_mask, comp_mask), 1)
    h = model(ids, attention_mask=mask, return_hidden=True).hidden_states
    p = prompt_ids.shape[1]
    return h[:, p - 1 : -1]


def completion_logprobs(model, prompt_ids, prompt_mask, comp_ids, comp_mask, temperature):
    h = completion_hidden(model, prompt_ids, prompt_mask, comp_ids, comp_mask)
    ids = torch.where(comp_mask.bool(), comp_ids, -100)
    b, c, d = h.shape
    lp = qk.linear_token_logprobs(h.reshape(b * c, d), model.lm_head.weight, ids.reshape(-1), temperature=temperature)
    return lp.view(b, c)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


class GRPOTrainer:
    def __init__(self, policy, tokenizer, problems: list[dict], cfg: GRPOConfig,
                 reward_fns: Sequence[Callable] = DEFAULT_REWARDS, format_prompt: Callable[[str], str] = lambda q: q,
                 eos_id: int | None = None, pad_id: int | None = None):
        self.policy, self.tok, self.problems, self.cfg = policy, tokenizer, problems, cfg
        self.reward_fns, self.format_prompt = list(reward_fns), format_prompt
        self.eos_id = tokenizer.eos_id if eos_id is None else eos_id
        self.pad_id = tokenizer.pad_id if pad_id is None else pad_id
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.ref = None  # frozen copy of the policy, taken when GRPO starts
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []

    # -- 0. optional supervised warm-up, so that early rewards are not all zero ---------------------
    def warmup(self, steps: int, batch: int = 32):
        rng = random.Random(self.cfg.seed + 1)
        for _ in range(steps):
            items = rng.sample(self.problems, min(batch, len(self.problems)))
            seqs = [self.tok.encode(self.format_prompt(it["question"])) +
                    self.tok.encode(f"<answer>{it['answer']}</answer>") + [self.eos_id] for it in items]
            ids, mask = left_pad(seqs, self.pad_id, self.policy.lm_head.weight.device)
            h = self.policy(ids[:, :-1], attention_mask=mask[:, :-1], return_hidden=True).hidden_states
            real = (mask[:, 1:] * mask[:, :-1]).bool()  # predict real tokens from real tokens
            target = torch.where(real, ids[:, 1:], -100)
            lp = qk.linear_token_logprobs(h.reshape(-1, h.shape[-1]), self.policy.lm_head.weight, target.reshape(-1))
            loss = -lp.sum() / real.sum()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()

    # -- one GRPO step ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        if self.ref is None:
            self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        rng = random.Random(cfg.seed * 100003 + self.step)
        items = [self.problems[rng.randrange(len(self.problems))] for _ in range(cfg.prompts_per_step)]
        prompts = [self.tok.encode(self.format_prompt(it["question"])) for it in items]

        # 1. rollout
        self.policy.eval()
        p_ids, p_mask, c_ids, c_mask = rollout(self.policy, prompts, cfg, self.eos_id, self.pad_id, self.gen)
        texts = [self.tok.decode(row.tolist()) for row in c_ids]
        answers = [it["answer"] for it in items for _ in range(cfg.group_size)]

        # 2. reward
        per_fn = torch.tensor([fn(texts, answers) for fn in self.reward_fns], dtype=torch.float32)  # [F, B]
        rewards = per_fn.sum(0)

        # 3. advantages
        adv = qk.group_advantages(rewards, cfg.group_size).to(c_ids.device)

        # old and reference log-probs, fixed for the inner epochs
        with torch.no_grad():
            old = completion_logprobs(self.policy, p_ids, p_mask, c_ids, c_mask, cfg.temperature)
            ref = (completion_logprobs(self.ref, p_ids, p_mask, c_ids, c_mask, cfg.temperature)
                   if cfg.beta else None)

        # 4. replay + 5. update
        self.policy.train()
        for _ in range(cfg.inner_epochs):
            h = completion_hidden(self.policy, p_ids, p_mask, c_ids, c_mask)
            loss, metrics, _ = qk.grpo_loss_from_hidden(
                h, self.policy.lm_head.weight, c_ids, old, ref, adv, c_mask.float(), temperature=cfg.temperature,
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, beta=cfg.beta, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_new_tokens)
            self.opt.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            self.opt.step()

        self.step += 1
        rec = {"step": self.step, "reward": float(rewards.mean()), "answer_reward": float(per_fn[0].mean()),
               "accuracy": float((per_fn[0] == 1.0).float().mean()), "loss": float(loss.detach()),
               "kl": float(metrics["kl"]), "clip_fraction": float(metrics["clip_fraction"]),
               "entropy": float(metrics["entropy"]), "grad_norm": float(grad_norm),
               "completion_len": float(c_mask.sum(1).float().mean()), "seconds": time.perf_counter() - t0,
               "sample": texts[0]}
        self.history.append(rec)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def train(self, progress: bool = True):
        cfg = self.cfg
        ctx = qk.use_backend(cfg.backend) if cfg.backend else _nullctx()
        bar = _progress(cfg.steps, self.step) if progress else None
        with ctx:
            while self.step < cfg.steps:
                rec = self.train_step()
                if bar is not None:
                    bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}", kl=f"{rec['kl']:.4f}",
                                    loss=f"{rec['loss']:+.4f}", refresh=False)
                    bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.plot()
        return self.history

    # -- checkpoints and plots ------------------------------------------------------------------------
    def save_checkpoint(self):
        state = {"step": self.step, "policy": self.policy.state_dict(), "opt": self.opt.state_dict(),
                 "ref": self.ref.state_dict() if self.ref is not None else None, "gen": self.gen.get_state(),
                 "history": self.history, "config": dataclasses.asdict(self.cfg)}
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / "checkpoint.pt")  # never a half-written checkpoint

    def load_checkpoint(self, path=None):
        state = torch.load(path or self.out / "checkpoint.pt", map_location="cpu", weights_only=False)
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
        if state["ref"] is not None:
            self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self.ref.load_state_dict(state["ref"])
        self.gen.set_state(state["gen"])
        self.step, self.history = state["step"], state["history"]
        # the log keeps exactly the steps the checkpoint knows
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def plot(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no curves.png (log.jsonl has every number)", file=sys.stderr)
            return None
        steps = [r["step"] for r in self.history]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, title in zip(axes, ("reward", "loss", "kl"), ("mean reward", "loss", "KL to reference")):
            raw = [r[key] for r in self.history]
            ax.plot(steps, raw, marker=".", alpha=0.3, color="C0", label="per step")
            ax.plot(steps, smoothed(raw), color="C0", label="smoothed (EMA 0.9)")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        acc = [r["accuracy"] for r in self.history]
        axes[0].plot(steps, acc, marker=".", alpha=0.3, color="C1")
        axes[0].plot(steps, smoothed(acc), color="C1", label="exact answers (smoothed)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = self.out / "curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


class _Lines:
    """A stream for tqdm that ends every refresh with a newline instead of a carriage return, so a
    log file gets one readable line per refresh."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def _progress(total: int, done: int):
    """A tqdm bar on stderr: redrawn in place on a terminal; in a log file a line every 10 s."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=done, desc="GRPO", unit="step", file=sys.stderr if tty else _Lines(sys.stderr),
                mininterval=0.1 if tty else 10.0, dynamic_ncols=tty, ascii=not tty)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def smoothed(values: Sequence[float], decay: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled toward 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay ** (i + 1)))
    return out


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def builtin_trainer(cfg: GRPOConfig) -> GRPOTrainer:
    """The embedded default: a tiny Qwen2 over a character vocabulary, small additions."""
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    mcfg = dataclasses.replace(Qwen2Config.preset("tiny"), vocab_size=len(tok.vocab), tie_word_embeddings=True)
    policy = Qwen2ForCausalLM(mcfg, backend=cfg.backend)
    return GRPOTrainer(policy, tok, arithmetic_problems(2000, cfg.seed, cfg.max_operand), cfg)


SYSTEM_PROMPT = ("Solve the problem. Reason briefly, then give the final answer as "
                 "<answer>NUMBER</answer>.\n")


def load_policy(model_dir: str, backend: str | None = None):
    """The reference model for a Hugging Face directory, by its config's model_type (float32)."""
    from quickllm_models.llama import LlamaForCausalLM
    from quickllm_models.mixtral import MixtralForCausalLM

    classes = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM}
    kind = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if kind not in classes:
        raise ValueError(f"--model {model_dir}: model_type {kind!r} is not supported here; supported: "
                         f"{', '.join(classes)}")
    return classes[kind].from_pretrained(model_dir, backend=backend, dtype=torch.float32)


def hf_trainer(cfg: GRPOConfig, model_dir: str, dataset: str | None = None, task: str | None = None,
               num_problems: int = 2000) -> GRPOTrainer:
    """A local Hugging Face causal LM (config.json + safetensors + tokenizer files) trained on a JSONL
    dataset of {"question": ..., "answer": ...} lines (gsm8k style: '#### 42' answers are cut), or on
    a reasoning-gym task (TASKS) scored by the task's own scorer."""
    from transformers import AutoTokenizer

    if (dataset is None) == (task is None):
        raise ValueError("hf_trainer: give exactly one of dataset and task")
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    policy = load_policy(model_dir, cfg.backend)
    rewards = DEFAULT_REWARDS
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"--task {task!r}: unknown; tasks: {', '.join(TASKS)}")
        problems, task_reward = reasoning_gym_task(task, num_problems, cfg.seed)
        rewards = (task_reward, format_reward)
    else:
        problems = []
        for line in Path(dataset).read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                problems.append({"question": d["question"], "answer": str(d["answer"]).split("####")[-1].strip()})
        if not problems:
            raise ValueError(f"{dataset}: no problems")

    class Tok:  # the small interface the trainer needs
        eos_id = hf_tok.eos_token_id
        pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id

        def encode(self, text):
            return hf_tok.encode(text, add_special_tokens=False)

        def decode(self, ids):
            ids = list(ids)
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id)]
            return hf_tok.decode(ids, skip_special_tokens=True)

    def fmt(q):
        if getattr(hf_tok, "chat_template", None):
            return hf_tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                               {"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True)
        return SYSTEM_PROMPT + q + "\n"

    return GRPOTrainer(policy, Tok(), problems, cfg, reward_fns=rewards, format_prompt=fmt)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quickllm_models.grpo_trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(GRPOConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--model", help="local Hugging Face model directory (default: the built-in tiny task)")
    p.add_argument("--dataset", help="JSONL with question/answer lines (with --model)")
    p.add_argument("--task", choices=TASKS, help="problems generated by reasoning-gym, scored by it (with --model)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cfg = GRPOConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(GRPOConfig)
                        if getattr(a, f.name) is not None})
    if a.model:
        if (a.dataset is None) == (a.task is None):
            p.error("--model needs one of --dataset and --task")
        trainer = hf_trainer(cfg, a.model, a.dataset, a.task)
    elif a.dataset or a.task:
        p.error("--dataset and --task need --model")
    else:
        trainer = builtin_trainer(cfg)
    if a.resume and (trainer.out / "checkpoint.pt").exists():
        trainer.load_checkpoint()
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    else:
        (trainer.out / "log.jsonl").write_text("")
        if not a.model and cfg.warmup_steps:
            trainer.warmup(cfg.warmup_steps)
    hist = trainer.train(progress=not a.quiet)
    if hist:
        first = sum(r["reward"] for r in hist[:3]) / len(hist[:3])
        last = sum(r["reward"] for r in hist[-3:]) / len(hist[-3:])
        print(f"mean reward: first steps {first:.3f} -> last steps {last:.3f}; log {trainer.out / 'log.jsonl'}, "
              f"plot {trainer.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
