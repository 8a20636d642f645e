"""moe_route: parity with transformers' routers (Mixtral, Qwen3-MoE, DeepSeek-V3) on every backend,
the kernels against the reference on odd shapes, strided and low-precision logits, ties, NaN rows and
empty batches; gradients of the weights; bad input; opcheck and torch.compile."""
import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, gen

import quickllm_kernels as qk
from quickllm_kernels.moe import reference as ref

BACKENDS = ["reference"] + KERNEL_BACKENDS


def _sets(w, ids):
    """(ids, weights) of each token sorted by id: the routing as a set per token."""
    order = ids.long().argsort(-1)
    return ids.long().gather(-1, order), w.float().gather(-1, order)


def _assert_same_routing(w, ids, want_w, want_ids, rtol=1e-6):
    got_i, got_w = _sets(w, ids)
    want_i, want_w = _sets(want_w, want_ids)
    assert torch.equal(got_i.cpu(), want_i.cpu())
    torch.testing.assert_close(got_w.cpu(), want_w.cpu(), rtol=rtol, atol=1e-7)


def _hidden(t, h, seed=0):
    return torch.randn(t, h, generator=gen(seed))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_matches_transformers_mixtral_router(backend_name):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = MixtralTopKRouter(MixtralConfig(hidden_size=48, num_local_experts=8, num_experts_per_tok=2))
    torch.nn.init.normal_(router.weight, generator=gen(1))
    logits, want_w, want_ids = router(_hidden(37, 48))
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(logits.detach().to(DEVICE), 2)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (37, 2)
    _assert_same_routing(w, ids, want_w.detach(), want_ids)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("norm", [True, False])
def test_matches_transformers_qwen3_moe_router(backend_name, norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=60, num_experts_per_tok=6, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, generator=gen(2))
    logits, want_w, want_ids = router(_hidden(29, 32, seed=3))
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(logits.detach().to(DEVICE), 6, renormalize=norm)
    _assert_same_routing(w, ids, want_w.detach(), want_ids)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n_group,topk_group", [(8, 4), (1, 1)])
def test_matches_transformers_deepseek_v3_router(backend_name, n_group, topk_group):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=8, n_group=n_group,
                           topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, generator=gen(4))
    router.e_score_correction_bias.copy_(0.1 * torch.randn(64, generator=gen(5)))
    logits, want_w, want_ids = router(_hidden(41, 32, seed=6))
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(logits.detach().to(DEVICE), 8, scoring="sigmoid",
                              correction_bias=router.e_score_correction_bias.to(DEVICE),
                              n_group=n_group if n_group > 1 else None, topk_group=topk_group if n_group > 1 else None,
                              routed_scaling_factor=2.5)
    _assert_same_routing(w, ids, want_w.detach(), want_ids)


CASES = [  # (T, E, k, scoring, bias, n_group, topk_group, renormalize, scale)
    (13, 8, 2, "softmax", False, None, None, True, 1.0),
    (5, 7, 7, "softmax", False, None, None, False, 1.0),       # k = E, E not a power of two
    (19, 256, 8, "sigmoid", True, 8, 4, True, 2.5),            # DeepSeek-V3
    (11, 96, 5, "sigmoid", True, 12, 3, False, 1.0),           # groups of 8, not a power of two in number
    (3, 33, 4, "softmax", True, 3, 2, True, 0.5),              # groups of 11, softmax with a bias
    (6, 100, 1, "sigmoid", False, None, None, True, 1.0),
    (2, 1000, 32, "softmax", False, None, None, True, 1.0),    # the kernels' limits
]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-g{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_reference(backend_name, case, dtype, nan_empty):
    t, e, k, scoring, with_bias, n_group, topk_group, renorm, scale = case
    full = (2 * torch.randn(t, e + 3, generator=gen(e))).to(DEVICE, dtype)
    logits = full[:, 1:e + 1]  # a strided view
    bias = (0.05 * torch.randn(e, generator=gen(e + 1))).to(DEVICE) if with_bias else None
    kw = dict(scoring=scoring, correction_bias=bias, n_group=n_group, topk_group=topk_group, renormalize=renorm,
              routed_scaling_factor=scale)
    want_w, want_ids = ref.moe_route(logits, bias, k, scoring == "sigmoid", renorm, n_group or 0, topk_group or 0,
                                     scale)
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(logits, k, **kw)
    assert qk.last_backends()["moe_route"] == backend_name
    assert torch.equal(ids, want_ids)  # same order too: highest choice first
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_ties_go_to_the_lower_expert_and_nan_rows_stay_in_range(backend_name):
    logits = torch.zeros(3, 16, device=DEVICE)
    logits[1, 5] = float("nan")  # one NaN: never chosen over a number
    logits[2] = float("nan")     # a row of NaNs: valid, distinct ids and NaN weights
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(logits, 4, scoring="sigmoid")
    assert ids[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w[0], torch.full((4,), 0.25, device=DEVICE))
    assert 5 not in ids[1].tolist()
    assert len(set(ids[2].tolist())) == 4 and all(0 <= i < 16 for i in ids[2].tolist())
    assert torch.isnan(w[2]).all()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ties_between_groups_go_to_the_lower_group(backend_name):
    """A zero-initialised router: every score ties, so the lower groups and the lower experts win, on
    every backend alike."""
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(torch.zeros(2, 32, device=DEVICE), 4, scoring="sigmoid", n_group=8, topk_group=2)
    assert ids.tolist() == [[0, 1, 2, 3]] * 2
    torch.testing.assert_close(w, torch.full((2, 4), 0.25, device=DEVICE))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("e", [1, 32, 64, 1024])
def test_expert_counts_at_the_edges(backend_name, e):
    logits = torch.randn(3, e, generator=gen(e)).to(DEVICE, torch.float16)
    bias = torch.zeros(3, e, device=DEVICE)[0:1, 0] if e == 1 else None  # a size-1 bias with stride e
    want_w, want_ids = ref.moe_route(logits, bias, min(e, 2), False, True, 0, 0, 1.0)
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(logits, min(e, 2), correction_bias=bias)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_batch(backend_name):
    with qk.use_backend(backend_name):
        w, ids = qk.moe_route(torch.randn(0, 8, device=DEVICE), 2)
    assert w.shape == ids.shape == (0, 2)


@pytest.mark.parametrize("scoring,renorm", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                            ("sigmoid", False)])
def test_weights_gradcheck(scoring, renorm):
    logits = torch.randn(5, 12, dtype=torch.float64, generator=gen(7)).requires_grad_()
    bias = 0.1 * torch.randn(12, dtype=torch.float64, generator=gen(8))
    fn = lambda z: qk.moe_route(z, 3, scoring=scoring, renormalize=renorm, correction_bias=bias,  # noqa: E731
                                n_group=4, topk_group=2, routed_scaling_factor=1.5)[0]
    with qk.use_backend("reference"):  # the weights are float32 whatever the logits: a float32-sized eps
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_router_gradients_match_transformers(backend_name):
    """The router trains: d(loss)/d(router_logits) through our weights equals transformers' autograd
    through its Mixtral and DeepSeek-V3 routers (the same loss on the same (id, weight) pairs)."""
    from transformers import DeepseekV3Config, MixtralConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    mixtral = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2))
    deepseek = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=16, n_routed_experts=32, num_experts_per_tok=4,
                                                     n_group=4, topk_group=2, routed_scaling_factor=2.5))
    for router, seed in ((mixtral, 20), (deepseek, 21)):
        torch.nn.init.normal_(router.weight, generator=gen(seed))
    with torch.no_grad():
        deepseek.e_score_correction_bias.copy_(0.1 * torch.randn(32, generator=gen(22)))
    cases = ((mixtral, dict(top_k=2)),
             (deepseek, dict(top_k=4, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                             correction_bias=deepseek.e_score_correction_bias.to(DEVICE))))
    for router, kw in cases:
        logits, w_hf, ids_hf = router(_hidden(7, 16, seed=23))  # logits: inside transformers' graph
        g = torch.randn(7, router.num_experts, generator=gen(24))  # a loss weight per (token, expert)
        (want,) = torch.autograd.grad((w_hf * g.gather(1, ids_hf)).sum(), logits)
        z = logits.detach().to(DEVICE).requires_grad_()
        with qk.use_backend(backend_name):
            w, ids = qk.moe_route(z, **kw)
        (w * g.to(DEVICE).gather(1, ids.long())).sum().backward()
        torch.testing.assert_close(z.grad.cpu(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_kernel_gradients_match_reference(backend_name):
    logits = torch.randn(9, 40, generator=gen(9)).to(DEVICE)
    g = torch.randn(9, 4, generator=gen(10)).to(DEVICE)
    grads = {}
    for name in ("reference", backend_name):
        z = logits.clone().requires_grad_()
        with qk.use_backend(name):
            w, _ = qk.moe_route(z, 4, scoring="sigmoid", routed_scaling_factor=2.0)
        (w * g).sum().backward()
        grads[name] = z.grad
    torch.testing.assert_close(grads[backend_name], grads["reference"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=9), r"top_k must lie in \[1, 8\]"),
    (dict(top_k=0), "top_k"),
    (dict(n_group=3, topk_group=1), "divisible by n_group"),
    (dict(n_group=4, topk_group=5), "topk_group must lie"),
    (dict(n_group=4, topk_group=1, top_k=3), "more than the experts of topk_group"),
    (dict(n_group=4), "go together"),
    (dict(scoring="relu"), "scoring"),
    (dict(correction_bias=torch.zeros(7)), r"correction_bias must be \[8\]"),
])
def test_bad_input_names_the_argument(kwargs, match):
    kw = dict(top_k=2)
    kw.update(kwargs)
    if "correction_bias" in kw:
        kw["correction_bias"] = kw["correction_bias"].to(DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        qk.moe_route(torch.randn(4, 8, device=DEVICE), kw.pop("top_k"), **kw)
    with pytest.raises(ValueError, match="router_logits must be"):
        qk.moe_route(torch.randn(2, 4, 8, device=DEVICE), 2)
    with pytest.raises(TypeError, match="router_logits must be float"):
        qk.moe_route(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), 2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck(backend_name):
    logits = torch.randn(6, 32, generator=gen(11)).to(DEVICE)
    bias = torch.randn(32, generator=gen(12)).to(DEVICE)
    with qk.use_backend(backend_name):
        torch.library.opcheck(torch.ops.quickllm.moe_route.default, (logits, bias, 4, True, True, 4, 2, 2.5))
        torch.library.opcheck(torch.ops.quickllm.moe_route.default, (logits, None, 3, False, False, 0, 0, 1.0))


def test_compiles_without_graph_breaks():
    logits = torch.randn(6, 32, generator=gen(13)).to(DEVICE)
    f = torch.compile(lambda z: qk.moe_route(z, 4, scoring="sigmoid", n_group=4, topk_group=2), fullgraph=True)
    w, ids = f(logits)
    want_w, want_ids = qk.moe_route(logits, 4, scoring="sigmoid", n_group=4, topk_group=2)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w)
