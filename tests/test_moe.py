"""The MoE layer against a slow, obvious reference loop, and its auxiliary terms against formulas."""
import copy
import dataclasses
import math
import random
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipmoe.experts as experts_module
from clipmoe.config import MoEConfig
from clipmoe.errors import ConfigError
from clipmoe.model import Mlp
from clipmoe.moe import MoE, capacity


def reference_moe(layer: MoE, x_ND: torch.Tensor, cap="layer", raw_gates=False):
    """Token-by-token top-k routing with capacity (`cap`: None is dropless; by default the layer's rule),
    assignments taken choice-major, in token order. `raw_gates`: the top-k probabilities as they are (an
    expert-choice layer evaluated with token choice)."""
    cfg = layer.cfg
    E, K = cfg.num_experts, cfg.top_k
    logits = x_ND.float() @ layer.router.weight.float().t()
    probs = logits.softmax(-1)
    gates, experts = probs.topk(K, dim=-1)
    if K > 1 and not raw_gates:
        gates = gates / gates.sum(-1, keepdim=True)
    elif K == 1 and not raw_gates and cfg.k1_gate == "straight_through":
        gates = gates - gates.detach() + 1
    cap = layer.capacity(x_ND.shape[0]) if cap == "layer" else cap
    used = [0] * E
    rows = [torch.zeros(x_ND.shape[1]) for _ in range(x_ND.shape[0])]
    dropped = 0
    ex = layer.experts
    tokens = list(range(x_ND.shape[0]))
    if cfg.batch_priority:  # most confident first (top-1 probability), ties in token order
        tokens.sort(key=lambda n: -probs[n].max().item())
    for k in range(K):
        for n in tokens:
            e = int(experts[n, k])
            if cap is not None and used[e] >= cap:
                dropped += 1
                continue
            used[e] += 1
            h = F.linear(ex.act(F.linear(x_ND[n], ex.w1[e].t(), ex.b1[e])), ex.w2[e], ex.b2[e])
            rows[n] = rows[n] + gates[n, k] * h
    return torch.stack(rows), dropped


def reference_expert_choice(layer: MoE, x_ND: torch.Tensor, cap: Optional[int] = None):
    """Each expert takes its top-C tokens by router probability (`cap`; by default the layer's rule); outputs
    weighted by that probability."""
    probs = (x_ND.float() @ layer.router.weight.float().t()).softmax(-1)
    cap = layer.capacity(x_ND.shape[0]) if cap is None else cap
    ex = layer.experts
    rows = [torch.zeros(x_ND.shape[1]) for _ in range(x_ND.shape[0])]
    for e in range(layer.cfg.num_experts):
        for n in probs[:, e].topk(cap).indices.tolist():
            h = F.linear(ex.act(F.linear(x_ND[n], ex.w1[e].t(), ex.b1[e])), ex.w2[e], ex.b2[e])
            rows[n] = rows[n] + probs[n, e] * h
    return torch.stack(rows), cap


def make_layer(E=4, K=2, cf=None, k1_gate="multiply", D=8, F=16, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, top_k=K, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=1,
                    k1_gate=k1_gate, **kw)
    layer = MoE(D, F, cfg, nn.GELU)
    nn.init.normal_(layer.router.weight, std=1.0)  # confident, unbalanced routing
    nn.init.normal_(layer.experts.b1, std=0.1)
    nn.init.normal_(layer.experts.b2, std=0.1)
    return layer


def _grads(layer, x, out):
    torch.manual_seed(1)
    w = torch.randn(out.shape).to(out)  # drawn on the CPU: the same weights for a layer on any device
    params = [x, layer.router.weight, layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2]
    return torch.autograd.grad((out * w).sum(), params)


def assert_matches_reference(layer: MoE, cf):
    """Outputs, dropped fraction and every gradient (router included) equal the reference loop's."""
    K = layer.cfg.top_k
    x = torch.randn(37, 8, requires_grad=True)
    y, aux = layer(x)
    y_ref, dropped = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert math.isclose(aux.dropped_fraction.item(), dropped / (37 * K), abs_tol=1e-6)
    if cf is None:
        assert dropped == 0 and aux.dropped_fraction.item() == 0
    elif cf < 1:
        assert dropped > 0  # total capacity E*C is below the K*N assignments
    for g, g_ref in zip(_grads(layer, x, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


ROUTINGS = pytest.mark.parametrize("K,k1_gate", [(1, "multiply"), (1, "straight_through"), (2, "multiply"),
                                                 (3, "multiply")])


@ROUTINGS
@pytest.mark.parametrize("cf", [None, 0.3, 0.5, 1.0, 1.25])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("align", [1, 8])
def test_matches_reference_loop(K, cf, k1_gate, batch_priority, align):
    layer = make_layer(E=4, K=K, cf=cf, k1_gate=k1_gate, batch_priority=batch_priority).train()
    layer.experts.align = lambda x: align  # padded expert groups, as on CPU in bf16
    assert_matches_reference(layer, cf)


@pytest.mark.parametrize("seed", range(32))
def test_random_option_combinations_match_the_reference_loops(seed):
    """Options drawn together (router, k, train and eval capacity factors, minimum capacity, batch priority, train
    or eval mode, a token mask, expert choice evaluated with token choice): outputs, every gradient, counts and the
    dropped fraction equal the loops', with the capacity computed here from the issue's rules, not by the layer."""
    rng = random.Random(seed)
    # the modes in turn (token choice twice, expert choice, expert choice evaluated with token choice; train, eval),
    # the rest drawn
    router, eval_router = [("topk", None), ("topk", None), ("expert_choice", None), ("expert_choice", "topk")][seed % 4]
    training = seed // 4 % 2 == 0
    E = rng.choice([2, 4, 8])
    K = rng.randint(1, min(3, E))
    cf, ecf = rng.choice([None, 0.5, 1.0, 1.25, 2.0]), rng.choice([None, 0.75, 1.5])
    kw = dict(router=router, eval_router=eval_router, batch_priority=router == "topk" and rng.random() < 0.5)
    layer = make_layer(E=E, K=K, cf=cf, k1_gate=rng.choice(["multiply", "straight_through"]), seed=seed, **kw)
    layer.cfg = dataclasses.replace(layer.cfg, eval_capacity_factor=ecf, min_capacity=rng.choice([0, 1, 4]))
    layer.train(training)
    masked = rng.random() < 0.5
    mask = torch.rand(3, 13, generator=torch.Generator().manual_seed(seed)) < 0.8
    x = torch.randn(3, 13, 8, requires_grad=True)
    y, aux = layer(x, mask if masked else None)
    x_ND = x[mask] if masked else x.reshape(-1, 8)
    N, factor, minimum = x_ND.shape[0], cf if training else ecf, layer.cfg.min_capacity
    probs = (x_ND @ layer.router.weight.t()).softmax(-1)
    if router == "expert_choice" and (training or eval_router is None):
        factor = cf if factor is None else factor  # eval keeps training's C unless given its own
        cap = N if factor is None else min(N, max(minimum, math.ceil(N * factor / E)))
        y_ref, _ = reference_expert_choice(layer, x_ND, cap)
        counts = [cap] * E
        dropped = 1 - len(set(probs.t().topk(cap, dim=1).indices.flatten().tolist())) / N  # tokens no expert took
    else:
        cap = None if factor is None else max(minimum, math.ceil(K * N / E * factor))
        y_ref, dropped = reference_moe(layer, x_ND, cap, raw_gates=router == "expert_choice")
        counts = torch.bincount(probs.topk(K, dim=-1).indices.reshape(-1), minlength=E).tolist()
        dropped /= N * K
    y_ND = y[mask] if masked else y.reshape(-1, 8)
    torch.testing.assert_close(y_ND, y_ref, atol=1e-5, rtol=1e-5)
    if masked:
        assert torch.all(y[~mask] == 0)
    assert aux.tokens_per_expert.tolist() == counts
    assert math.isclose(aux.dropped_fraction.item(), dropped, abs_tol=1e-6)
    out = torch.zeros(3, 13, 8).index_put((mask,), y_ref) if masked else y_ref.reshape(3, 13, 8)
    for g, g_ref in zip(_grads(layer, x, y), _grads(layer, x, out)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@ROUTINGS
@pytest.mark.parametrize("cf", [None, 0.3, 1.25])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_sync_free_layout_matches_reference_loop(emulated_grouped_mm, K, cf, k1_gate, batch_priority):
    """The layout of the grouped_mm path (GPUs): every assignment keeps a row, the dropped ones after the
    groups, where grouped_mm's output and input gradient are undefined (NaN in the emulation)."""
    layer = make_layer(E=4, K=K, cf=cf, k1_gate=k1_gate, batch_priority=batch_priority).train()
    tails, real = [], layer.experts.forward
    layer.experts.forward = lambda x_SD, counts_E, tail=False, capacity=None: (
        tails.append(tail) or real(x_SD, counts_E, tail, capacity))
    assert_matches_reference(layer, cf)
    assert emulated_grouped_mm  # the grouped path ran
    assert tails == [cf is not None]  # with capacity, in the layout with rows after the groups


@ROUTINGS
@pytest.mark.parametrize("cf", [0.3, 0.5, 1.0, 1.25])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_static_capacity_layout_matches_reference_loop(static_padding, K, cf, k1_gate, batch_priority):
    """The GPU's layout without grouped_mm (fp32): capacity mode pads every expert to C rows, the dropped
    assignments after the groups, so that no count is read back to the host."""
    layer = make_layer(E=4, K=K, cf=cf, k1_gate=k1_gate, batch_priority=batch_priority).train()
    calls, real = [], layer.experts.forward
    layer.experts.forward = lambda x_SD, counts_E, tail=False, capacity=None: (
        calls.append((tail, capacity)) or real(x_SD, counts_E, tail, capacity))
    assert_matches_reference(layer, cf)
    assert calls == [(True, layer.capacity(37))] and static_padding
    x = torch.randn(37, 8)
    assert layer.sync_free(x)
    assert not make_layer(E=4, K=K, cf=None).sync_free(x)  # dropless: the counts decide the shapes
    assert not make_layer(E=4, K=K, cf=4.0).sync_free(x)  # padding to C would more than double the rows


@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_expert_choice_static_capacity_matches_reference(static_padding, cf):
    layer = make_layer(E=4, cf=cf, router="expert_choice").train()
    x = torch.randn(30, 8, requires_grad=True)
    y, aux = layer(x)
    y_ref, cap = reference_expert_choice(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert static_padding == [(4 * cap, 4 * cap)] and layer.sync_free(x)
    for g, g_ref in zip(_grads(layer, x, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_batch_priority_keeps_confident_tokens():
    layer = make_layer(E=2, K=1, cf=0.25, batch_priority=True).train()
    x = torch.randn(64, 8)
    y, _ = layer(x)
    probs = layer.router(x).softmax(-1)
    conf, expert = probs.max(-1)
    for e in range(2):
        mine = (expert == e).nonzero().squeeze(1)
        kept = mine[y[mine].abs().sum(-1) > 0]
        lost = mine[y[mine].abs().sum(-1) == 0]
        if len(kept) and len(lost):
            assert conf[kept].min() >= conf[lost].max()


@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("align", [1, 8])
def test_expert_choice_matches_reference(cf, align):
    layer = make_layer(E=4, cf=cf, router="expert_choice").train()
    layer.experts.align = lambda x: align
    x = torch.randn(30, 8, requires_grad=True)
    y, aux = layer(x)
    y_ref, cap = reference_expert_choice(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert aux.tokens_per_expert.tolist() == [cap] * 4  # every expert exactly its capacity
    assert cap == max(1, math.ceil(30 * cf / 4))
    for g, g_ref in zip(_grads(layer, x, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_jitter_only_in_training_and_shared_expert_always_on():
    layer = make_layer(E=4, K=2, cf=None, jitter=0.5)
    x = torch.randn(20, 8)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    layer.train()
    l1, _ = layer.route(x)
    l2, _ = layer.route(x)
    assert not torch.equal(l1, l2)

    shared = Mlp(8, 16, nn.GELU)
    with_shared = MoE(8, 16, MoEConfig(num_experts=4, top_k=2, capacity_factor=None), nn.GELU, shared=shared)
    shared_sd = {"shared." + k: v for k, v in shared.state_dict().items()}
    with_shared.load_state_dict({**make_layer(E=4, K=2).state_dict(), **shared_sd})
    plain = make_layer(E=4, K=2)
    torch.testing.assert_close(with_shared(x)[0], plain(x)[0] + shared(x)[0])


def test_layer_on_its_own_from_the_package():
    """`clipmoe.MoE(dim, hidden, cfg)` with a dict config as YAML's `moe:` (checked as one) or MoEConfig()'s defaults;
    `shared_expert` builds the always-on MLP as a model's block does, and it adds to the routed output."""
    import clipmoe

    layer = clipmoe.MoE(8, 16)
    assert layer.cfg == MoEConfig() and isinstance(layer.experts.act, nn.GELU)
    y, aux = layer(torch.randn(3, 5, 8))
    assert y.shape == (3, 5, 8) and sum(aux.tokens_per_expert.tolist()) == 15 * MoEConfig().top_k

    torch.manual_seed(0)
    shared = clipmoe.MoE(8, 16, {"num_experts": 4, "top_k": 2, "capacity_factor": None, "shared_expert": True})
    assert isinstance(shared.shared, Mlp) and shared.shared.fc1.weight.shape == (16, 8)
    plain = MoE(8, 16, dataclasses.replace(shared.cfg, shared_expert=False))
    plain.load_state_dict({k: v for k, v in shared.state_dict().items() if not k.startswith("shared.")})
    x = torch.randn(10, 8)
    torch.testing.assert_close(shared(x)[0], plain(x)[0] + shared.shared(x)[0])

    with pytest.raises(ConfigError, match=r"moe\.top_k: 5 must be in 1\.\.num_experts \(4\)"):
        clipmoe.MoE(8, 16, {"num_experts": 4, "top_k": 5})
    with pytest.raises(ConfigError, match=r"moe\.topk: unknown key"):
        clipmoe.MoE(8, 16, {"topk": 1})
    with pytest.raises(TypeError, match="MoEConfig or a dict"):
        clipmoe.MoE(8, 16, 4)


def test_moe_report_keys():
    from clipmoe import moe_report

    layer = make_layer(E=4, K=2, cf=1.0).train()
    _, aux = layer(torch.randn(16, 8))
    (row,) = moe_report([aux])
    assert set(row) == {"tower", "block", "tokens_per_expert", "dropped_fraction", "entropy", "balance_loss", "z_loss"}
    assert sum(row["tokens_per_expert"]) == 32 and isinstance(row["entropy"], float)


def test_moe_report_of_a_model_is_each_layers_last_call():
    import clipmoe

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, top_k=2, every=1).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    tokenize = clipmoe.get_tokenizer(model)
    assert clipmoe.moe_report(model) == []  # no call yet
    out = model(torch.randn(2, 3, 16, 16), tokenize(["a red square", "b"]))
    assert clipmoe.moe_report(model) == clipmoe.moe_report(out)
    kept = [m.last_aux for m in model.modules() if isinstance(m, MoE)]
    assert not any(t.requires_grad for a in kept for t in (a._logits, a._probs, a.dropped_fraction))  # no graph held
    out.image_features.sum().backward()  # reading the kept reports did not touch the training graph
    model.encode_text(tokenize(["one two three four five six"]))
    text_rows = [r for r in clipmoe.moe_report(model) if r["tower"] == "text"]
    assert [sum(r["tokens_per_expert"]) for r in text_rows] == [2 * 8, 2 * 8]  # sot + 6 words + eot, k = 2


def test_capacity_rule():
    assert capacity(100, 8, 2, 1.25, 4) == math.ceil(2 * 100 / 8 * 1.25)
    assert capacity(4, 8, 1, 1.0, 4) == 4
    assert capacity(100, 8, 2, None, 4) is None
    assert capacity(100, 8, 2, math.inf, 4) is None  # capacity = infinity is dropless too (YAML: .inf)


def test_infinite_capacity_factor_is_dropless():
    import yaml

    from clipmoe.config import from_dict

    cfg = from_dict(MoEConfig, yaml.safe_load("{num_experts: 4, top_k: 2, capacity_factor: .inf}"))
    assert math.isinf(cfg.capacity_factor)
    x = torch.randn(30, 8)
    inf_layer, dropless = make_layer(E=4, K=2, cf=math.inf).train(), make_layer(E=4, K=2, cf=None).train()
    (y_inf, aux), (y_none, _) = inf_layer(x), dropless(x)
    assert aux.dropped_fraction.item() == 0
    torch.testing.assert_close(y_inf, y_none, rtol=0, atol=0)
    for cf in (math.inf, None):  # dropless expert choice: every expert takes every token
        ec = make_layer(E=4, K=1, cf=cf, router="expert_choice")
        assert ec.train().capacity(30) == 30 and ec.eval().capacity(30) == 30
        y, aux = ec.train()(x)
        assert aux.dropped_fraction.item() == 0 and aux.tokens_per_expert.tolist() == [30] * 4
        torch.testing.assert_close(y, reference_expert_choice(ec, x)[0], rtol=1e-5, atol=1e-5)
    ec.cfg = dataclasses.replace(ec.cfg, capacity_factor=2.0, eval_capacity_factor=None)
    assert ec.train().capacity(30) == ec.eval().capacity(30) == 15  # a null eval factor keeps training's


def test_dropped_tokens_get_zero_and_counts_follow_capacity():
    layer = make_layer(E=2, K=1, cf=0.5).train()
    x = torch.randn(40, 8)
    y, aux = layer(x)
    cap = layer.capacity(40)
    _, experts = layer.router(x).softmax(-1).topk(1)
    kept = torch.zeros(40, dtype=torch.bool)
    for e in range(2):
        idx = (experts[:, 0] == e).nonzero().squeeze(1)
        kept[idx[:cap]] = True
    assert torch.all(y[~kept] == 0)
    assert torch.all(y[kept].abs().sum(-1) > 0)
    assert aux.tokens_per_expert.tolist() == torch.bincount(experts[:, 0], minlength=2).tolist()


def test_token_mask_rows_not_routed():
    layer = make_layer(E=4, K=2, cf=1.0).train()
    x = torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = mask[1, :7] = True
    y, aux = layer(x, mask)
    assert torch.all(y[~mask] == 0)
    assert aux.tokens_per_expert.sum().item() == 10 * 2  # 10 routed tokens, 2 choices each
    y_ref, _ = reference_moe(layer, x[mask])
    torch.testing.assert_close(y[mask], y_ref, atol=1e-5, rtol=1e-5)


def test_one_expert_equals_dense_mlp():

    torch.manual_seed(0)
    mlp = Mlp(8, 16, nn.GELU)
    layer = MoE(8, 16, MoEConfig(num_experts=1, top_k=1, capacity_factor=None), nn.GELU)
    with torch.no_grad():
        layer.experts.w1[0] = mlp.fc1.weight.t()
        layer.experts.b1[0] = mlp.fc1.bias
        layer.experts.w2[0] = mlp.fc2.weight
        layer.experts.b2[0] = mlp.fc2.bias
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x)[0], mlp(x)[0], atol=1e-6, rtol=1e-6)


def test_aux_terms_against_formulas():
    E = 4
    layer = MoE(8, 16, MoEConfig(num_experts=E, top_k=2, capacity_factor=None), nn.GELU)
    nn.init.zeros_(layer.router.weight)  # uniform router
    _, aux = layer(torch.randn(16, 8))
    assert aux.balance_loss.item() == pytest.approx(1.0)
    assert aux.z_loss.item() == pytest.approx(math.log(E) ** 2)
    assert aux.entropy.item() == pytest.approx(math.log(E))
    assert aux.marginal_entropy.item() == pytest.approx(math.log(E))
    # Hand-computed case: all tokens prefer expert 0 with probability p.
    nn.init.zeros_(layer.router.weight)
    with torch.no_grad():
        layer.router.weight[0, 0] = 1.0
    x = torch.zeros(10, 8)
    x[:, 0] = 2.0
    _, aux = layer(x)
    p0 = math.exp(2) / (math.exp(2) + 3)
    assert aux.balance_loss.item() == pytest.approx(E * 1.0 * p0, rel=1e-5)
    assert aux.z_loss.item() == pytest.approx(math.log(math.exp(2) + 3) ** 2, rel=1e-5)


def test_router_is_fp32_under_bf16_autocast():
    layer = make_layer(E=4, K=2, cf=1.25).train()
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs = layer.route(x)
        gates, _ = layer.top_k(probs)
        y, aux = layer(x)
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32
    assert aux.z_loss.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("amx, align", [(True, 32), (False, 8)])
def test_bf16_layer_pads_groups_and_matches_fp32(monkeypatch, amx, align):
    """In bf16 on CPU every expert's group is padded to a multiple of 32 with AMX, of 8 without; padding changes
    nothing."""
    monkeypatch.setattr(experts_module, "_amx", lambda: amx)
    layer = make_layer(E=4, K=2, cf=None, D=16, F=32)
    x = torch.randn(50, 16)
    assert layer.experts.align(x.bfloat16()) == align and layer.experts.align(x) == 1
    counts = []
    real = layer.experts.forward
    layer.experts.forward = lambda x_SD, counts_E, tail=False, capacity=None: (
        counts.append(counts_E.tolist()) or real(x_SD, counts_E, tail, capacity))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = layer(x)
    assert all(c % align == 0 for c in counts[0]) and sum(counts[0]) > 100
    y32, _ = layer(x)
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_router_is_fp32_maths_on_its_inputs(dtype):
    """A bf16/fp16 layer's router (blocked, no fp32 copy of x) gives the logits and weight gradient of the fp32
    router applied to the same low-precision numbers, across several row blocks and a ragged last one; x's
    gradient is autocast's bf16 product for bf16 (bf16 operands, fp32 sums) and fp32 maths rounded once for fp16."""
    layer = make_layer(E=4, K=2, cf=None, D=16, F=32).to(dtype)
    x = torch.randn(2 * 512 + 37, 16, dtype=dtype, requires_grad=True)
    logits, probs = layer.route(x)
    assert logits.dtype == probs.dtype == torch.float32
    w = layer.router.weight.detach().float().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    ref = F.linear(x32, w)
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad((probs * g).sum(), [x, layer.router.weight])
    ref.retain_grad()
    (ref.softmax(-1) * g).sum().backward()
    rx, rw, g_logits = x32.grad, w.grad, ref.grad
    assert gx.dtype == gw.dtype == dtype
    if dtype == torch.float16:  # within one fp16 ulp: a tie may round either way after other fp32 summation orders
        torch.testing.assert_close(gx, rx.to(dtype), rtol=2 ** -10, atol=1e-6)
    else:  # the logit gradients may differ in the last bits of fp32 (softmax over the other dimension)
        torch.testing.assert_close(gx, g_logits.to(dtype) @ w.detach().to(dtype), rtol=0, atol=1e-6)
        torch.testing.assert_close(gx.float(), rx, rtol=2e-2, atol=2e-2 * rx.abs().max().item())
    torch.testing.assert_close(gw.float(), rw.to(dtype).float(), rtol=1e-2, atol=1e-3)  # summation order


def test_low_precision_router_with_frozen_input_or_weight():
    layer = make_layer(E=4, K=2, cf=None, D=16, F=32).bfloat16()
    x = torch.randn(600, 16, dtype=torch.bfloat16)
    logits, _ = layer.route(x)  # x needs no gradient: only the weight's
    (gw,) = torch.autograd.grad(logits.sum(), [layer.router.weight])
    ref = (torch.ones(600, 4).t() @ x.float()).bfloat16()
    torch.testing.assert_close(gw, ref, rtol=1e-2, atol=1e-2)
    layer.router.weight.requires_grad_(False)
    x.requires_grad_(True)
    logits, _ = layer.route(x)
    (gx,) = torch.autograd.grad(logits.sum(), [x])
    assert torch.equal(gx, torch.ones(600, 4, dtype=torch.bfloat16) @ layer.router.weight)  # autocast's bf16 maths


@pytest.mark.parametrize("loss", ["output", "aux", "both"])
@pytest.mark.parametrize("frozen_router", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_router_and_dispatch_input_gradients_add_up(monkeypatch, loss, frozen_router, dtype):
    """On CPU the router's backward adds its gradient of x into Dispatch's (dispatch.GradSink). Whichever of the
    two a loss reaches (the output reaches both, the aux terms only the router's), x's gradient equals the
    float64 layer's, whose router is plain autograd; a second backward through the retained graph gives it
    again (the sink is filled and emptied each time)."""
    from clipmoe.dispatch import GradSink

    handed = []
    take = GradSink.take
    monkeypatch.setattr(GradSink, "take", lambda self: handed.append(self.grad is not None) or take(self))
    layer = make_layer(E=4, K=2, cf=1.0).train()
    nn.init.normal_(layer.router.weight, std=0.1)  # not confident: gates and aux terms have real gradients
    layer.router.weight.requires_grad_(not frozen_router)
    ref = copy.deepcopy(layer).double()
    layer = layer.to(dtype)
    x = torch.randn(64, 8, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    g = torch.randn(64, 8)

    def total(layer, x):
        y, aux = layer(x)
        out = (y * g.to(y)).sum()
        terms = 10 * (aux.balance_loss + aux.z_loss - aux.entropy)
        return {"output": out, "aux": terms, "both": out + terms}[loss]

    t = total(layer, x)
    gx = torch.autograd.grad(t, x, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(t, x)[0], gx)
    assert handed == [loss != "aux"] * 2  # the sink held Dispatch's gradient exactly when the output was reached
    (gx64,) = torch.autograd.grad(total(ref, x64), x64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(gx.double(), gx64, rtol=tol, atol=tol * gx64.abs().max().item())


def test_router_output_is_freed_without_the_garbage_collector(monkeypatch):
    """The sink links the router's and Dispatch's autograd nodes; it must not keep the router's output (whose node
    holds the sink) alive in a reference cycle, which only the garbage collector would free."""
    import gc
    import weakref

    from clipmoe import moe

    outputs, apply = [], moe._RouterLogits.apply

    def watched(*args):
        logits = apply(*args)
        outputs.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(moe._RouterLogits, "apply", watched)
    layer = make_layer(E=4, K=1, cf=1.0).train()
    gc.disable()
    try:
        for backward in (False, True):
            x = torch.randn(16, 8, requires_grad=True)
            y, aux = layer(x)
            if backward:
                (y.sum() + aux.z_loss).backward()
            del x, y, aux
        layer.last_aux = None
        assert len(outputs) == 2 and all(r() is None for r in outputs)
    finally:
        gc.enable()


def test_counts_equal_bincount():
    from clipmoe.moe import _counts

    ids = torch.tensor([[3, 0], [3, 5], [0, 3]])
    assert _counts(ids, 7).tolist() == torch.bincount(ids.reshape(-1), minlength=7).tolist() == [2, 0, 0, 3, 0, 1, 0]
    assert _counts(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_cuda_graph_capture_needs_a_cuda_input():
    from clipmoe import cuda_graphs

    with pytest.raises(ValueError, match="CUDA input"):
        cuda_graphs.capture(make_layer(), torch.randn(4, 8))


def test_aux_terms_are_fp32_wherever_they_are_first_read():
    """The terms are computed on first use; read inside a bf16 autocast region they are still fp32 maths."""
    layer = make_layer(E=4, K=2, cf=None).train()
    x = torch.randn(64, 8)
    _, ref = layer(x)
    _, aux = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = [aux.balance_loss, aux.z_loss, aux.entropy, aux.marginal_entropy]
    for t, r in zip(terms, [ref.balance_loss, ref.z_loss, ref.entropy, ref.marginal_entropy]):
        assert t.dtype == torch.float32 and t.item() == pytest.approx(r.item(), rel=1e-6)


_GRADCHECK_MODES = [
    {"K": 2},  # dropless
    {"K": 1, "cf": 0.5},  # capacity drops; the gate scales the output
    {"K": 2, "cf": 0.6, "batch_priority": True},
    {"router": "expert_choice", "K": 1, "cf": 1.0},
]  # not k1_gate straight_through: its gradient is by design not the derivative of its value


@pytest.mark.parametrize("path,kw", [("default", kw) for kw in _GRADCHECK_MODES + [{"K": 2, "shared_expert": True}]]
                         + [("grouped_mm", kw) for kw in _GRADCHECK_MODES]
                         + [("static_padding", kw) for kw in _GRADCHECK_MODES if "cf" in kw], ids=str)
def test_float64_gradcheck(request, path, kw):
    """torch.autograd.gradcheck in float64: the layer's output and aux losses against finite differences, for
    the input, the router and every expert parameter, on each execution path. A float64 layer routes in
    float64 (with fp32 logits the finite differences would be noise)."""
    if path != "default":
        request.getfixturevalue("static_padding" if path == "static_padding" else "emulated_grouped_mm")
    layer = make_layer(E=4, **kw)
    if kw.get("shared_expert"):
        layer.shared = Mlp(8, 16, nn.GELU)
    layer = layer.double().train()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    params = [layer.router.weight, *layer.experts.parameters()]

    def fn(x, *ps):
        y, aux = layer(x)
        assert y.dtype == aux.z_loss.dtype == torch.float64
        return y, aux.balance_loss, aux.z_loss, aux.entropy, aux.marginal_entropy

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("kw", [{"K": 2}, {"K": 1, "cf": 0.5}, {"router": "expert_choice", "K": 1, "cf": 1.0}], ids=str)
def test_double_backward_is_an_error_not_a_wrong_gradient(kw):
    """create_graph=True through the layer (a gradient penalty) raises: once_differentiable alone would treat the
    backward's outputs as constants and silently drop the second-order terms. First order is unaffected."""
    layer = make_layer(E=4, **kw).train()
    x = torch.randn(12, 8, requires_grad=True)
    y, aux = layer(x)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        gx, = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
        gx.square().sum().backward()
    y, aux = layer(x)
    (y.sum() + aux.z_loss).backward()
    assert x.grad is not None and layer.experts.w1.grad is not None


def _pairs(aux):
    token_M, expert_M = aux.assignments
    return sorted(zip(token_M.tolist(), expert_M.tolist()))


@pytest.mark.parametrize("path", ["default", "bf16_padded_groups", "static_padding", "grouped_mm"])
@pytest.mark.parametrize("kw", [{"K": 2}, {"K": 1, "cf": 0.5}, {"K": 2, "cf": 0.6, "batch_priority": True},
                                {"K": 3, "cf": 0.4}], ids=str)
def test_assignments_are_the_kept_choices(request, path, kw):
    """aux.assignments: the (token, expert) pairs the experts computed, the reference loop's kept choices."""
    if path in ("static_padding", "grouped_mm"):
        request.getfixturevalue("static_padding" if path == "static_padding" else "emulated_grouped_mm")
    layer = make_layer(E=4, **kw).train()
    x = torch.randn(24, 8)
    # bf16 on CPU pads each expert's group to 8 or 32 slots: padding slots are no assignment
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "bf16_padded_groups"):
        _, aux = layer(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    experts = probs.topk(layer.cfg.top_k, dim=-1).indices
    cap, used, kept = layer.capacity(24), [0] * 4, []
    tokens = sorted(range(24), key=lambda n: -probs[n].max().item()) if layer.cfg.batch_priority else range(24)
    for k in range(layer.cfg.top_k):  # choice-major, as the reference loop
        for n in tokens:
            e = int(experts[n, k])
            if cap is None or used[e] < cap:
                used[e] += 1
                kept.append((n, e))
    assert _pairs(aux) == sorted(kept)
    assert len(kept) == round((1 - aux.dropped_fraction.item()) * 24 * layer.cfg.top_k)
    assert _pairs(aux.detach()) == sorted(kept)


def test_assignments_of_expert_choice_are_each_experts_picks():
    layer = make_layer(E=4, K=1, cf=1.0, router="expert_choice").train()
    x = torch.randn(20, 8)
    _, aux = layer(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    cap = layer.capacity(20)
    assert _pairs(aux) == sorted((n, e) for e in range(4) for n in probs[:, e].topk(cap).indices.tolist())


def test_expert_choice_eval_router_topk_is_batch_independent():
    """eval_router topk: in eval mode an expert-choice layer routes each token to its top_k experts, weighted by
    their raw probabilities (expert choice's weights), dropless: a token's output is the same in any batch.
    Training still routes by expert choice; plain expert choice at eval depends on the batch."""
    layer = make_layer(E=4, K=2, cf=1.0, router="expert_choice", eval_router="topk").eval()
    layer.cfg = dataclasses.replace(layer.cfg, eval_capacity_factor=None)  # dropless at eval
    x = torch.randn(40, 8)
    y, aux = layer(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    gates, experts = probs.topk(2, dim=-1)
    ex = layer.experts
    def expert(e, x_D):
        return F.linear(ex.act(F.linear(x_D, ex.w1[e].t(), ex.b1[e])), ex.w2[e], ex.b2[e])
    expected = torch.stack([sum(gates[n, k] * expert(e, x[n]) for k, e in enumerate(experts[n].tolist()))
                            for n in range(40)])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[:7])[0], y[:7], atol=1e-6, rtol=1e-6)  # another batch, same rows
    assert aux.tokens_per_expert.sum().item() == 80 and aux.dropped_fraction.item() == 0
    y_train, _ = layer.train()(x)  # training: expert choice
    torch.testing.assert_close(y_train, reference_expert_choice(layer, x)[0], atol=1e-5, rtol=1e-5)
    plain = make_layer(E=4, K=2, cf=1.0, router="expert_choice").eval()
    assert not torch.allclose(plain(x[:7])[0], plain(x)[0][:7], atol=1e-4)  # why the option exists


def test_eval_router_config_errors():
    with pytest.raises(ConfigError, match="eval_router"):
        MoEConfig(router="topk", eval_router="topk")
    with pytest.raises(ConfigError, match="eval_router"):
        MoEConfig(router="expert_choice", eval_router="expert_choice")


def test_static_capacity_layout_only_while_a_graph_is_captured(monkeypatch):
    """fp32 on a GPU: a capacity-mode layer can be captured (sync_free), but eagerly it reads the counts (one
    sync, fewer kernels, padding to the largest group); the static layout is what a capture records."""
    import clipmoe.experts as experts

    monkeypatch.setattr(experts, "_static_padding", lambda x, padded, rows: padded <= 2 * rows)  # as on a GPU
    layer = make_layer(E=4, K=2, cf=1.0).train()
    calls, real = [], layer.experts.forward
    layer.experts.forward = lambda x_SD, counts_E, tail=False, capacity=None: (
        calls.append(tail) or real(x_SD, counts_E, tail, capacity))
    x = torch.randn(37, 8)
    assert layer.sync_free(x)
    for capturing in (False, True):
        monkeypatch.setattr(experts, "_capturing", lambda x: capturing)
        layer(x)
    assert calls == [False, True]


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("kw", [{"K": 1, "cf": None}, {"K": 1, "cf": 1.0}, {"K": 2, "cf": None},
                                {"K": 1, "cf": 1.0, "router": "expert_choice"}])
def test_idle_experts_still_get_a_gradient(kw, lanes):
    """Two tokens among eight experts leave most of them idle; each expert's weights still get a (zero)
    gradient, so that DDP needs no find_unused_parameters (and its extra walk of the graph every step)."""
    layer = make_layer(E=8, **kw)
    layer.experts.lanes = lanes
    x = torch.randn(1, 2, 8, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux.balance_loss + aux.z_loss).backward()
    idle = layer.last_aux.tokens_per_expert.eq(0)
    assert idle.sum() >= 8 - 2 * kw["K"] or kw.get("router") == "expert_choice"  # there, every expert is busy
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
    if idle.any():
        assert layer.experts.w1.grad[idle].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_sum_fused_and_per_choice_match_a_loop(dtype, K, dropped, weighted):
    """combine's gather (and dispatch's backward): one embedding_bag pass (CPU default) and a gather per choice
    (GPU default) against a plain loop, padding slots and dropped assignments included."""
    from clipmoe.dispatch import Slots, gather_sum

    torch.manual_seed(K)
    N, E = 24, 4
    experts_NK = torch.stack([torch.randperm(E)[:K] for _ in range(N)])  # distinct choices per token
    expert_A = experts_NK.t().reshape(-1)
    order = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=E)
    if dropped:  # keep at most 4 per expert, in slot order
        rank = torch.arange(order.numel()) - (counts.cumsum(0) - counts)[expert_A[order]]
        order, counts = order[rank < 4], counts.clamp(max=4)
    slots = Slots.arrange(order, counts, N, K, align=8)  # padding slots between the groups
    src = torch.randn(int(slots.counts_E.sum()), 16).to(dtype)
    w = torch.rand(N, K).to(dtype) if weighted else None
    want = torch.zeros(N, 16)
    for n in range(N):
        for k in range(K):
            s = int(slots.slot_NK[n, k])
            if s >= 0:
                want[n] += (1.0 if w is None else float(w[n, k])) * src[s].float()
    assert slots.dropless != dropped
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the per-choice path rounds after every product and sum
    for fused in (None, True, False):
        got = gather_sum(src, slots, w, fused=fused)
        assert got.dtype == dtype and got.shape == (N, 16)
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol), fused


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_gathered_dots_against_a_loop(dtype, K):
    """combine's backward on CPU: g[n] . h[slot[n, k]] by torch's fused kernel, 0 for dropped assignments (slot -1),
    against a loop in float64; bf16 within its rounding of the result (the sums are fp32)."""
    from clipmoe.dispatch import gathered_dots

    torch.manual_seed(K)
    N, P = 30, 30 * K + 10
    g, h = torch.randn(N, 40, dtype=dtype), torch.randn(P, 40, dtype=dtype)
    slot = torch.randperm(P)[:N * K].view(K, N).t()  # as Slots lays them out: (N, K) view of a (K, N) tensor
    slot[torch.rand(N, K) < 0.3] = -1
    want = torch.zeros(N, K, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            if slot[n, k] >= 0:
                want[n, k] = g[n].double() @ h[slot[n, k]].double()
    got = gathered_dots(g, h, slot)
    assert got.dtype == dtype and got.shape == (N, K)
    assert (got[slot < 0] == 0).all()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -8}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_k1_ties_go_to_the_first_expert():
    """A zero router (a fresh upcycle) ties every token; at k = 1 the tie goes to expert 0, as argmax, so capacity
    keeps exactly the first C tokens there and drops the rest."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=1, capacity_factor=1.25, min_capacity=0)
    moe = MoE(16, 32, cfg, nn.GELU).train()
    nn.init.zeros_(moe.router.weight)
    x = torch.randn(64, 16)
    y, aux = moe(x)
    C = capacity(64, 8, 1, 1.25, 0)
    assert aux.tokens_per_expert.tolist() == [64] + [0] * 7
    assert aux.dropped_fraction.item() == pytest.approx(1 - C / 64)
    assert (y[C:] == 0).all() and (y[:C] != 0).any(dim=1).all()  # position order: the first C tokens kept
