"""GPU paths (run by scripts/bench/gpu_check.sh on a GPU machine; skipped on CPU-only machines)."""
import copy
import math

import pytest
import torch
from test_moe import _grads, make_layer, reference_expert_choice, reference_moe
from torch import nn

import clipmoe
from clipmoe.config import MoEConfig
from clipmoe.errors import ClipmoeError
from clipmoe.moe import MoE
from clipmoe.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("cf", [None, 1.0])
def test_grouped_mm_bf16_matches_cpu_fp32(cf):
    torch.manual_seed(0)
    layer = MoE(64, 128, MoEConfig(num_experts=8, top_k=2, capacity_factor=cf), nn.GELU).train()
    x = torch.randn(512, 64).bfloat16().float()  # the GPU layer's input, so that both route the same numbers
    y_ref, aux_ref = layer(x)
    gpu = MoE(64, 128, layer.cfg, nn.GELU).cuda().train()
    gpu.load_state_dict(layer.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = gpu(x.cuda().bfloat16())
    assert aux.tokens_per_expert.cpu().tolist() == aux_ref.tokens_per_expert.tolist()
    torch.testing.assert_close(y.float().cpu(), y_ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_upcycled_model_equals_dense_on_gpu():
    dense = clipmoe.create_model("clipmoe-tiny").cuda()
    up = clipmoe.upcycle(dense, num_experts=4, top_k=2, every=1).eval()
    assert all(p.is_cuda for p in up.parameters())  # upcycled where its source lives
    images = torch.randn(4, 3, 64, 64, device="cuda")
    tokens = clipmoe.get_tokenizer(dense)(["a red square", "two circles", "x", ""]).cuda()
    with torch.no_grad():
        assert (dense.encode_image(images) - up.encode_image(images)).abs().max() < 1e-4
        assert (dense.encode_text(tokens) - up.encode_text(tokens)).abs().max() < 1e-4


@pytest.fixture
def no_tf32():
    # fp32 matmuls on the GPU must be fp32, not TF32, for the 1e-5 comparisons
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _gpu_copy(layer):
    return copy.deepcopy(layer).cuda()


def _gpu_matches_reference(layer, x, y_ref):
    """A GPU copy of `layer` on x: output and every gradient within 1e-5 of the CPU reference's; its aux."""
    gpu = _gpu_copy(layer)
    xg = x.detach().cuda().requires_grad_()
    y, aux = gpu(xg)
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(_grads(gpu, xg, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(g.cpu(), g_ref, atol=1e-5, rtol=1e-5)
    return aux


@pytest.mark.parametrize("K,cf,batch_priority", [(1, None, False), (2, None, False), (2, 0.5, False),
                                                 (2, 0.5, True), (1, 1.25, False), (3, 1.0, False)])
def test_fp32_cuda_layer_matches_reference_loop(no_tf32, K, cf, batch_priority):
    layer = make_layer(E=4, K=K, cf=cf, batch_priority=batch_priority).train()
    x = torch.randn(37, 8, requires_grad=True)
    y_ref, dropped = reference_moe(layer, x)
    assert _gpu_copy(layer).sync_free(x.cuda()) == (cf is not None)  # capacity: static padding, no host sync
    aux = _gpu_matches_reference(layer, x, y_ref)
    assert round(aux.dropped_fraction.item() * 37 * K) == dropped


def test_fp32_cuda_expert_choice_matches_reference(no_tf32):
    layer = make_layer(E=4, cf=1.0, router="expert_choice").train()
    x = torch.randn(30, 8, requires_grad=True)
    y_ref, cap = reference_expert_choice(layer, x)
    aux = _gpu_matches_reference(layer, x, y_ref)
    assert aux.tokens_per_expert.tolist() == [cap] * 4


def _rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("router,K,cf", [("topk", 1, None), ("topk", 2, 1.0), ("expert_choice", 1, 2.0)])
def test_grouped_mm_bf16_gradients_match_fp32(router, K, cf):
    """The grouped_mm path's output and every gradient (router included) against the fp32 CPU layer, with
    one expert that gets no tokens at all (an empty group)."""
    layer = make_layer(E=4, K=K, cf=cf, D=64, F=128, router=router).train()
    with torch.no_grad():
        layer.router.weight[3, 0] = -100.0  # with x[:, 0] = 1: expert 3 is last for every token
    x = torch.randn(256, 64)
    x[:, 0] = 1.0
    y_ref, aux_ref = layer(x.requires_grad_())
    g_ref = _grads(layer, x, y_ref)
    gpu = _gpu_copy(layer)
    xg = x.detach().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = gpu(xg)
    assert aux.tokens_per_expert.tolist() == aux_ref.tokens_per_expert.tolist()
    if router == "topk":
        assert aux.tokens_per_expert[3] == 0
    assert _rel_err(y, y_ref) < 2e-2
    for g, r in zip(_grads(gpu, xg, y), g_ref):
        assert torch.isfinite(g).all() and _rel_err(g, r) < 3e-2


def test_bf16_training_on_cuda(tiny_shards, tmp_path):
    """A short bf16 run of an MoE CLIP on the GPU: losses finite, router fp32, and the saved model loads on
    a machine without a GPU."""
    from test_train import _cfg

    result = train(_cfg(tiny_shards, tmp_path, steps=20, precision="bf16", device="cuda"), progress=False)
    assert next(result.model.parameters()).is_cuda
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["z"]) for r in result.history)
    for m in result.model.modules():
        if isinstance(m, MoE):
            assert m.router.weight.dtype == torch.float32
    back = clipmoe.load(result.files["model"])
    assert next(back.parameters()).device.type == "cpu"
    tokens = clipmoe.get_tokenizer(back)(["a red square"])
    with torch.no_grad():
        torch.testing.assert_close(back.encode_text(tokens), result.model.eval().encode_text(tokens.cuda()).cpu(),
                                   atol=1e-4, rtol=1e-4)


def test_quickstart_evaluation_and_routing_analysis_with_a_gpu_model(tiny_shards, tmp_path):
    """The functions that read shards on the CPU move each batch to the model's device."""
    from clipmoe.analysis import analyze_routing
    from clipmoe.quickstart import evaluate_attributes

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=3, every=1, noise_std=0.1)
    cpu = evaluate_attributes(copy.deepcopy(model), tiny_shards["eval"])
    gpu = evaluate_attributes(model.cuda(), tiny_shards["eval"])
    for attr, r in cpu.items():
        assert abs(gpu[attr]["top1"] - r["top1"]) <= 2 / r["num_samples"], attr
    report = analyze_routing(model, tiny_shards["eval"], tmp_path, num_batches=1, batch_size=16)
    assert set(report) == {"image.0", "image.1", "text.0", "text.1"}
    assert (tmp_path / "routing.png").is_file()


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [16, 0, 0, 1]])  # padded products / one product per expert
def test_fp32_cuda_experts_match_cpu(no_tf32, counts):
    from clipmoe.experts import Experts, _padding_pays

    assert _padding_pays(counts) == (counts[0] != 16)
    torch.manual_seed(0)
    ex = Experts(4, 16, 32, nn.GELU)
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    y_ref = ex(x, counts_E)
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), [x, *ex.parameters()])
    gpu = copy.deepcopy(ex).cuda()
    xg = x.detach().cuda().requires_grad_()
    y = gpu(xg, counts_E.cuda())
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(torch.autograd.grad((y * w.cuda()).sum(), [xg, *gpu.parameters()]), g_ref):
        torch.testing.assert_close(g.cpu(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("router,K,cf", [("topk", 1, 1.0), ("topk", 2, None), ("topk", 2, 0.5),
                                         ("expert_choice", 1, 2.0)])
def test_cuda_graph_replays_equal_eager(router, K, cf, dtype):
    """A captured layer's replays give the eager layer's outputs, aux terms and gradients, for fresh inputs
    and after optimizer steps (parameters updated in place); dropped assignments included. fp32: grouped_mm
    is bf16 only, so capacity mode and expert choice run padded to their static capacity; dropless cannot
    be captured."""
    from clipmoe import cuda_graphs

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=K, capacity_factor=cf, eval_capacity_factor=cf, router=router)
    eager = MoE(64, 256, cfg, nn.GELU).cuda().to(dtype).train()
    nn.init.normal_(eager.router.weight, std=0.3)  # uneven routing: capacity drops assignments
    graphed = copy.deepcopy(eager)
    xs = [torch.randn(512, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(4)]
    if dtype == torch.float32 and cf is None:
        with pytest.raises(ValueError, match="sync-free"):
            cuda_graphs.capture(graphed, torch.randn_like(xs[0]).requires_grad_())
        return
    cuda_graphs.capture(graphed, torch.randn_like(xs[0]).requires_grad_())
    optims = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, graphed)]
    w = torch.randn(512, 64, device="cuda")
    for x in xs:
        runs = []
        for layer, opt in zip((eager, graphed), optims):
            opt.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = layer(x)
            ((y.float() * w).sum() + aux.balance_loss + aux.z_loss).backward()
            terms = [aux.balance_loss, aux.z_loss, aux.entropy, aux.dropped_fraction]
            runs.append(([y, x.grad, *(p.grad for p in layer.parameters())], [t.item() for t in terms],
                         aux.tokens_per_expert.tolist()))
            opt.step()
        (t_e, a_e, c_e), (t_g, a_g, c_g) = runs
        assert c_g == c_e
        assert a_g == pytest.approx(a_e, rel=1e-3, abs=1e-6)
        if cf is not None and router == "topk" and cf < 1:
            assert a_e[3] > 0  # assignments were dropped
        for g, e in zip(t_g, t_e):
            assert torch.isfinite(g).all() and _rel_err(g, e) < 1e-2


def test_cuda_graph_falls_back_to_eager_and_refuses_what_cannot_be_captured():
    from clipmoe import cuda_graphs

    torch.manual_seed(0)
    layer = MoE(64, 128, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0), nn.GELU).cuda().bfloat16()
    ref = copy.deepcopy(layer)
    cuda_graphs.capture(layer.train(), torch.randn(256, 64, device="cuda", dtype=torch.bfloat16))
    other = torch.randn(100, 64, device="cuda", dtype=torch.bfloat16)  # another shape: eager
    torch.testing.assert_close(layer(other)[0], ref.train()(other)[0])
    mask = torch.rand(256, device="cuda") > 0.5  # a token mask: eager
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x, mask)[0], ref(x, mask)[0])
    torch.testing.assert_close(layer.eval()(x)[0], ref.eval()(x)[0])  # the other mode: eager
    replaced = cuda_graphs.capture(copy.deepcopy(ref).train(), torch.randn_like(x))
    replaced.half().bfloat16()  # new parameter tensors: the graphs would read the old ones
    with pytest.raises(RuntimeError, match="replaced after CUDA graph capture"):
        replaced(x)
    cuda_graphs.release(layer)
    assert "_cuda_graph" not in layer.__dict__
    with pytest.raises(ValueError, match="sync-free"):  # fp32: no grouped_mm, the counts are read on the host
        cuda_graphs.capture(layer.float(), torch.randn(256, 64, device="cuda"))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_with_cuda_graphs(tiny_shards, tmp_path, precision):
    """train.cuda_graphs: the image tower's MoE layers run as CUDA graphs at every step (the text tower's,
    with token masks, eagerly), and the run follows the eager one: same first losses, losses finite. In fp32
    the image layers (capacity factor 1.25) run their experts padded to the static capacity."""
    from test_train import _cfg

    runs = [train(_cfg(tiny_shards, tmp_path / str(g), steps=12, precision=precision, device="cuda", cuda_graphs=g),
                  progress=False) for g in (False, True)]
    eager, graphed = (r.history for r in runs)
    assert runs[1].cuda_graphs == {"image.0": 12, "image.1": 12} and runs[0].cuda_graphs == {}
    assert all(math.isfinite(r["loss"]) for r in graphed)
    assert graphed[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-2)
    assert graphed[-1]["loss"] == pytest.approx(eager[-1]["loss"], rel=0.1)
    assert "_cuda_graph" not in runs[1].model.image.blocks[0].mlp.__dict__  # released at the end


def test_fp32_training_with_cuda_graphs_refuses_dropless_layers(tiny_shards, tmp_path):
    from test_train import _cfg

    cfg = _cfg(tiny_shards, tmp_path, steps=2, device="cuda", cuda_graphs=True)
    cfg.model.overrides["vision"]["moe"]["capacity_factor"] = None  # fp32 dropless: counts read on the host
    with pytest.raises(ClipmoeError, match="no MoE layer to capture.*dropless"):
        train(cfg, progress=False)


def test_deepspeed_zero2_training_on_one_gpu(tiny_shards, tmp_path):
    """`train.deepspeed` on the GPU, launched as torchrun would (LOCAL_RANK 0, so the process takes cuda:0): ZeRO 2
    over a one-rank NCCL group, bf16 autocast, the same run as without DeepSpeed up to float reassociation."""
    pytest.importorskip("deepspeed")
    from test_distributed import baseline_config, run_training, variant

    cfg = variant(baseline_config(tiny_shards, tmp_path), tmp_path / "plain", device="cuda", precision="bf16")
    plain = run_training(cfg, tmp_path / "plain_ranks", world=1)
    z2 = run_training(variant(cfg, tmp_path / "z2", deepspeed={"zero_optimization": {"stage": 2}}),
                      tmp_path / "z2_ranks", world=1)
    assert z2[0]["losses"] == pytest.approx(plain[0]["losses"], rel=2e-2)
    assert all(math.isfinite(x) for x in z2[0]["losses"])


def test_accumulation_on_cuda(no_tf32):
    """Gradient accumulation on the GPU, where router jitter and patch dropout draw from the device's generator,
    which each micro-batch's second pass must replay: as one batch (test_accumulation.check_accumulation)."""
    from test_accumulation import LOSS, _inputs, _model, check_accumulation

    from clipmoe.config import LossConfig

    model = _model().cuda()
    inputs = [(images.cuda(), tokens.cuda()) for images, tokens in _inputs(model, 3, 4)]
    check_accumulation(model, inputs, LossConfig(**LOSS), torch.device("cuda"))
