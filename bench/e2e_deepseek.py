"""End-to-end greedy decode throughput: quickllm_models' DeepSeek-V3 against transformers'
DeepseekV3ForCausalLM, the same random weights in the same memory (the reference model's parameters
are transformers' tensors, assigned, not copied).

    python bench/e2e_deepseek.py --json bench/results/e2e-deepseek.json            # GPU: V2-Lite shapes
    python bench/e2e_deepseek.py --layers 4 --batch 1 --batch 32 --new 32          # fewer layers
    python bench/e2e_deepseek.py --preset tiny --device cpu --dtype float32        # checks the script

The model is DeepSeek-V2-Lite's shapes on the V3 architecture (the preset `deepseek-v2-lite-shaped`:
hidden 2048, 16 heads, kv_lora_rank 512, 64 routed experts of which 6 per token, 2 shared, first layer
dense, vocab 102400), randomly initialised by transformers (no download). For each batch size: a
prompt of --prompt random tokens, then greedy generation of 1 and of --new tokens by each model's own
`generate` (transformers: its default cache and kernels; quickllm: the paged latent cache, absorbed
MLA decode through mla_decode, moe_experts). decode tokens/s = batch * (new - 1) / (t(new) - t(1)):
the prefill cancels out. Each time is the median of --reps runs after a warm-up, wall clock with the
device synchronised (host overhead included: that is what a decode loop pays). Also recorded: the
prefill logits' relative error between the two models and how many greedy tokens agree before the
first difference (bf16 rounding differs between the two, so long continuations may part).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def hf_config(cfg, transformers):
    """transformers.DeepseekV3Config with the shapes of a quickllm DeepseekV3Config."""
    skip = {"rope_theta", "rope_scaling", "quantization_config"}
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
    rope = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return transformers.DeepseekV3Config(**kw, num_key_value_heads=cfg.num_attention_heads, rope_parameters=rope,
                                         pad_token_id=0, eos_token_id=None, bos_token_id=None)


def build(preset: str, layers: int | None, dtype, device, seed: int = 0):
    """(transformers model, quickllm model sharing its tensors, quickllm config)."""
    import transformers

    from quickllm_models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, prepare_state
    from quickllm_models.qwen2 import load_checkpoint_state

    cfg = DeepseekV3Config.preset(preset)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.DeepseekV3ForCausalLM._from_config(hf_config(cfg, transformers), dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):
        ours = DeepseekV3ForCausalLM(cfg)
    state = prepare_state(dict(hf.state_dict()), cfg)
    ours = load_checkpoint_state(ours, state, "transformers model", device=device).eval()
    return hf, ours, cfg


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up (kernel builds, autotuning, allocator)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def run(a) -> dict:
    from common import environment, write_json

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    hf, ours, cfg = build(a.preset, a.layers, dtype, device)
    record = {"command": " ".join(sys.argv), "environment": environment(device),
              "model": dict(preset=a.preset, layers=cfg.num_hidden_layers, dtype=a.dtype,
                            parameters=sum(p.numel() for p in hf.parameters()),
                            hf_attn_implementation=getattr(hf.config, "_attn_implementation", None),
                            hf_experts_implementation=getattr(hf.config, "_experts_implementation", None)),
              "settings": dict(prompt=a.prompt, new=a.new, reps=a.reps), "rows": []}
    print(f"DeepSeek-V3 ({a.preset}, {cfg.num_hidden_layers} layers, {record['model']['parameters'] / 1e9:.2f} B "
          f"parameters, {a.dtype}) on {record['environment']['device']}", flush=True)
    g = torch.Generator().manual_seed(1)
    for b in a.batch:
        ids = torch.randint(1, cfg.vocab_size, (b, a.prompt), generator=g).to(device)
        mask = torch.ones_like(ids)
        row = dict(batch=b)
        with torch.no_grad():
            want = hf(ids, attention_mask=mask).logits.float()
            got = ours(ids, attention_mask=mask).logits.float()
            row["prefill_logits_rel_err"] = float((got - want).norm() / want.norm())
            del want, got
            gen = {
                "transformers": lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                      do_sample=False),
                "quickllm": lambda n: ours.generate(ids, mask, max_new_tokens=n),
            }
            tokens = {}
            for name, fn in gen.items():
                t1, _, _ = timed(lambda: fn(1), device, a.reps)
                tn, times, out = timed(lambda: fn(a.new), device, a.reps)
                tokens[name] = out[:, a.prompt:]
                row[name] = dict(prefill_plus_one_s=t1, generate_s=tn, generate_runs_s=times,
                                 decode_tokens_per_s=b * (a.new - 1) / (tn - t1) if tn > t1 else None)
        same = (tokens["quickllm"] == tokens["transformers"]).long()
        row["greedy_tokens_agree_before_first_difference"] = int(same.cumprod(1).sum(1).min())
        tq, th = row["quickllm"]["decode_tokens_per_s"], row["transformers"]["decode_tokens_per_s"]
        row["speedup"] = tq / th if tq and th else None
        record["rows"].append(row)
        print(f"batch {b:4d}: quickllm {tq or float('nan'):10.1f} tok/s, transformers {th or float('nan'):10.1f} "
              f"tok/s, x{row['speedup'] or float('nan'):.2f}; prefill logits rel err "
              f"{row['prefill_logits_rel_err']:.1e}, greedy tokens agree for "
              f"{row['greedy_tokens_agree_before_first_difference']} of {a.new}", flush=True)
        if a.json:
            write_json(a.json, record)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deepseek-v2-lite-shaped", help="a DeepseekV3Config preset")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1 and 32)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=64, help="tokens generated per row")
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--json", default=None, help="where to write the results (rewritten after each batch size)")
    a = p.parse_args(argv)
    a.batch = a.batch or [1, 32]
    if a.new < 2:
        p.error("--new: at least 2 tokens (decode time is t(new) - t(1))")
    return run(a)


if __name__ == "__main__":
    main()
