"""quickllm_kernels.integrations.hf on tiny transformers models of every supported family (random
weights, float32, CPU): logits and greedy generation (the KV cache path) equal the unpatched model's,
gradients of every parameter too; the quickllm ops ran (last_backends); the change is per instance,
idempotent and reversible; unsupported models are refused by name."""
import pytest
import torch

import quickllm_kernels as qk
from quickllm_kernels import backend
from quickllm_kernels.integrations import hf as qk_hf

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
V = 96
COMMON = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                                       "factor": 4.0, "low_freq_factor": 1.0,
                                                                       "high_freq_factor": 4.0,
                                                                       "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                               moe_intermediate_size=32, norm_topk_prob=True)),
    "qwen3_moe_unnormalised": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                               dict(num_experts=4, num_experts_per_tok=2, head_dim=16, moe_intermediate_size=32,
                                    norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1)),
}
# what each family routes: (RMSNorm modules, attentions with RoPE, routers, experts modules)
EXPECTED = {"llama": (5, 2, 0, 0), "mistral": (5, 2, 0, 0), "qwen2": (5, 2, 0, 0), "qwen3": (9, 2, 0, 0),
            "mixtral": (5, 2, 2, 2), "qwen3_moe": (9, 2, 2, 2), "qwen3_moe_unnormalised": (9, 2, 2, 2), "deepseek_v3": (9, 2, 1, 1)}


def _model(family, seed=0):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg_cls = getattr(transformers, cfg_name)
    kw = dict(COMMON, **extra)
    if family == "deepseek_v3":
        kw.pop("num_local_experts", None)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg_cls(**kw)).eval()
    with torch.no_grad():  # spread the router scores and norms away from their flat init
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
            elif "gate.weight" in n or "experts" in n:
                p.normal_(0, 0.2)
    return model


def _ids(seed=1, b=2, t=7):
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_generation_and_gradients_match(family):
    ref, ours = _model(family), _model(family)
    report = qk_hf.apply(ours)
    assert (report.rms_norm, report.rope, report.router, report.experts) == EXPECTED[family]
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        backend._last.clear()  # only this call's ops below
        got = ours(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    ran = qk.last_backends()
    assert "rms_norm" in ran
    if EXPECTED[family][1]:
        assert "apply_rope" in ran
    if EXPECTED[family][3]:
        assert "grouped_mm" in ran and "moe_combine" in ran
    if EXPECTED[family][2]:
        assert "moe_route" in ran
    # the cache path: greedy tokens
    torch.testing.assert_close(ours.generate(ids, max_new_tokens=5, do_sample=False),
                               ref.generate(ids, max_new_tokens=5, do_sample=False), rtol=0, atol=0)
    # training: every parameter's gradient
    for m in (ref, ours):
        m.train()
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_per_instance_idempotent_and_reversible():
    a, b = _model("mixtral"), _model("mixtral")
    before = a.config._experts_implementation
    r1 = qk_hf.apply(a)
    assert qk_hf.apply(a) is r1 and qk_hf.applied(a) is r1  # idempotent
    norm_a, norm_b = a.model.norm, b.model.norm
    assert "forward" in norm_a.__dict__ and "forward" not in norm_b.__dict__  # b untouched
    assert a.config._experts_implementation == "quickllm" and b.config._experts_implementation == before
    ids = _ids()
    with torch.no_grad():
        patched = a(ids).logits
    qk_hf.revert(a)
    assert qk_hf.applied(a) is None and "forward" not in norm_a.__dict__
    assert a.config._experts_implementation == before
    assert not any("forward" in m.__dict__ for m in a.modules())
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(patched, b(ids).logits, **TOL)
    r2 = qk_hf.apply(a, moe=False)  # other options: applied afresh
    assert r2.experts == 0 and r2.router == 0 and r2.rms_norm == 5
    assert a.config._experts_implementation == before
    assert qk_hf.apply(a) is not r2 and qk_hf.applied(a).experts == 2


def test_options_switch_parts_off():
    m = _model("qwen2")
    r = qk_hf.apply(m, rms_norm=False)
    assert r.rms_norm == 0 and r.rope == 2
    assert not any("forward" in x.__dict__ for x in m.modules() if type(x).__name__.endswith("RMSNorm"))


def test_bf16_model_runs_and_stays_close():
    ref, ours = _model("qwen3").bfloat16(), _model("qwen3").bfloat16()
    qk_hf.apply(ours)
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits.float(), ours(ids).logits.float()
    assert (got - want).norm() / want.norm() < 2e-2


def test_unsupported_architecture_is_refused_by_name():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V)
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama"):
        qk_hf.apply(transformers.GPT2LMHeadModel(cfg))
    with pytest.raises(TypeError, match="model must be"):
        qk_hf.apply("not a model")


def test_experts_it_does_not_cover_keep_the_models_implementation():
    ref, ours = _model("mixtral"), _model("mixtral")
    for m in (ref, ours):
        m.config.hidden_act = "gelu"  # read by the experts check; moe_experts runs SiLU only
    report = qk_hf.apply(ours)
    assert report.experts == 0 and report.left == {"MixtralExperts (activation 'gelu')": 2}
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "deepseek_v3"])
def test_compiles_fullgraph_with_the_ops_in_the_graph(family):
    """torch.compile(fullgraph=True) of a routed model: one graph, holding the quickllm ops (custom ops
    with fake kernels, not traced through), and the same logits as the routed model run eagerly."""
    model = _model(family)
    qk_hf.apply(model)
    ids = _ids()
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "quickllm" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ops = {t.split("quickllm.")[1].split(".")[0] for t in seen}
    assert {"rms_norm", "apply_rope"} <= ops, seen
    if family in ("mixtral", "deepseek_v3"):
        assert "moe_route" in ops, seen
