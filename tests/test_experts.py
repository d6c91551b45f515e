"""The experts' hand-written forward/backward against autograd through a plain per-expert loop."""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipmoe.experts import Experts
from clipmoe.model import QuickGELU


def loop(ex: Experts, x_SD, counts_E):
    """Autograd through F.linear, one expert at a time: the obvious implementation."""
    outs = [F.linear(ex.act(F.linear(x_cD, ex.w1[e].t(), ex.b1[e])), ex.w2[e], ex.b2[e])
            for e, x_cD in enumerate(x_SD.split(counts_E.tolist()))]
    return torch.cat(outs)


def assert_equals_loop(ex: Experts, x_SD, counts_E, y_SD):
    """y and the gradients of x and every parameter equal the per-expert loop's."""
    y_ref = loop(ex, x_SD, counts_E)
    torch.testing.assert_close(y_SD, y_ref)
    w = torch.randn_like(y_SD)
    inputs = [x_SD, *ex.parameters()]
    grads = torch.autograd.grad((y_SD * w).sum(), inputs, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), inputs, allow_unused=True, materialize_grads=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)  # experts without tokens get zeros, not garbage


def make(act_layer, dtype=torch.float64, E=4, D=6, F_=10):
    torch.manual_seed(0)
    ex = Experts(E, D, F_, act_layer).to(dtype)
    for p in ex.parameters():
        nn.init.normal_(p, std=0.5)
    return ex


ACTS = [nn.GELU, lambda: nn.GELU(approximate="tanh"), QuickGELU, nn.SiLU]


@pytest.mark.parametrize("act_layer", ACTS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [0, 0, 0, 0]])
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_matches_autograd_loop(act_layer, counts, lanes):
    ex = make(act_layer)
    ex.lanes = lanes
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 6, dtype=torch.float64, requires_grad=True)
    assert_equals_loop(ex, x, counts_E, ex(x, counts_E))


@pytest.mark.parametrize("lanes", [1, 2])
def test_gradcheck(lanes):
    ex = make(nn.GELU)
    counts_E = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(ex.parameters())

    def f(x, w1, b1, w2, b2):
        from clipmoe.experts import _ExpertMLP

        return _ExpertMLP.apply(x, counts_E.tolist(), ex.act, lanes, w1, b1, w2, b2)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_matches_float64_loop(lanes, autocast):
    """The bf16 path (oneDNN's kernels; the weight gradients' small operands transposed explicitly) against the
    float64 loop on the same weights: outputs and every gradient within bf16's rounding, for bf16 weights and for
    fp32 weights cast by autocast (whose gradients come back fp32)."""
    ex = make(nn.GELU, dtype=torch.float32 if autocast else torch.bfloat16, E=3, D=32, F_=64)
    ex.lanes = lanes
    ex64 = copy.deepcopy(ex).double()
    counts_E = torch.tensor([64, 0, 96])
    x = torch.randn(160, 32, dtype=torch.bfloat16, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ex(x, counts_E)
    y_ref = loop(ex64, x64, counts_E)
    w = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * w).sum().backward()
    (y_ref * w).sum().backward()
    pairs = [(y, y_ref), (x.grad, x64.grad)] + [(p.grad, q.grad) for p, q in zip(ex.parameters(), ex64.parameters())]
    for got, want in pairs:
        error = (got.double() - want).norm() / want.norm()
        assert error <= 1e-2, (got.shape, error)  # ~0.3% here
    assert all(p.grad.dtype == p.dtype and p.grad.is_contiguous() for p in ex.parameters())
    assert not ex.b1.grad[1].any() and not ex.w1.grad[1].any()  # the expert without tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lanes_give_the_same_results(dtype):
    """Experts run two (or three) at a time on CPU, each lane on its share of the threads, each writing only its
    own rows and gradient slices. Two and three lanes (one thread each on 2 cores) give the same bits; one
    lane on all threads may round differently (MKL's fp32 products depend on the thread count: seen on an
    AMD EPYC), so it is compared within rounding."""
    ex = make(nn.GELU, dtype=dtype, E=5, D=32, F_=64)
    counts_E = torch.tensor([40, 7, 0, 33, 64])
    x = torch.randn(int(counts_E.sum()), 32, dtype=dtype, requires_grad=True)
    results = []
    for lanes in (1, 2, 3):
        ex.lanes = lanes
        ex.zero_grad(set_to_none=True)
        x.grad = None
        y = ex(x, counts_E)
        y.float().square().sum().backward()
        results.append([y.detach(), x.grad, *(p.grad for p in ex.parameters())])
    for a, b, c in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # outputs up to ~20: summation-order rounding
        if torch.get_num_threads() <= 3:  # then both run one thread per lane
            assert torch.equal(b, c)


def test_lanes_leave_the_thread_count_as_it_was():
    ex = make(nn.GELU, dtype=torch.float32)
    ex.lanes = 2
    counts_E = torch.tensor([5, 3, 0, 4])
    x = torch.randn(12, 6, requires_grad=True)
    before = torch.get_num_threads()
    ex(x, counts_E).sum().backward()
    assert torch.get_num_threads() == before
    ex.act = None  # fails inside the lanes
    with pytest.raises(TypeError):
        ex(x, counts_E)
    assert torch.get_num_threads() == before


def test_lanes_under_inference_mode_and_errors_reach_the_caller():
    ex = make(nn.GELU, dtype=torch.float32)
    ex.lanes = 2
    counts_E = torch.tensor([5, 3, 0, 4])
    x = torch.randn(12, 6)
    with torch.inference_mode():
        y = ex(x, counts_E)
    torch.testing.assert_close(y, loop(ex, x, counts_E).detach())

    class FailsOnFour(nn.Module):  # fails for the expert with 4 tokens, on whichever lane takes it
        def forward(self, h):
            if h.shape[0] == 4:  # (tokens, hidden)
                raise RuntimeError("boom in a lane")
            return torch.relu(h)

    ex.act = FailsOnFour()
    with pytest.raises(RuntimeError, match="boom in a lane"):
        ex(x, counts_E)


def test_lanes_run_every_expert_with_tokens_once_largest_first():
    from clipmoe.experts import _largest_first, _run_lanes

    assert _largest_first([5, 3, 0, 4]) == [0, 3, 1]
    assert _largest_first([0, 0]) == []
    splits = [100, 90, 0, 70, 60, 50, 40, 30, 1]
    for lanes in (1, 2, 3):
        ran, lock = [], threading.Lock()

        def run(e):
            with lock:
                ran.append((e, threading.get_ident()))

        _run_lanes(run, splits, lanes)
        assert sorted(e for e, _ in ran) == [e for e, n in enumerate(splits) if n]
        if lanes == 1:  # no helper thread: in order, on the caller's thread
            assert ran == [(e, threading.get_ident()) for e in _largest_first(splits)]


def test_executor_is_remade_in_a_forked_child(monkeypatch):
    import clipmoe.experts as experts

    pool = experts._executor()
    assert experts._executor() is pool
    monkeypatch.setattr(experts.os, "getpid", lambda: -1)  # as in a child made by fork
    assert experts._executor() is not pool


def test_frozen_weights_and_frozen_input():
    ex = make(nn.GELU)
    counts_E = torch.tensor([3, 1, 0, 2])
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    ex.requires_grad_(False)
    (gx,) = torch.autograd.grad(ex(x, counts_E).sum(), x)
    (gx_ref,) = torch.autograd.grad(loop(ex, x, counts_E).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    ex.requires_grad_(True)
    x = x.detach()
    ex(x, counts_E).sum().backward()
    assert all(p.grad is not None for p in ex.parameters())


def test_autocast_bf16_runs_in_bf16_and_returns_fp32_grads():
    ex = make(nn.GELU, dtype=torch.float32)
    counts_E = torch.tensor([5, 3, 0, 4])
    x = torch.randn(12, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, counts_E)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ex.w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = loop(ex, x, counts_E)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [4, 4, 4, 4], [0, 0, 0, 0]])
def test_grouped_mm_path_matches_loop(emulated_grouped_mm, counts):
    """The CUDA bf16 path's logic (offsets, per-row biases, their one-hot gradient) run on the CPU in fp64,
    with grouped_mm emulated: outputs and every gradient equal the per-expert loop's."""
    ex = make(nn.GELU)
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    y = ex(x, counts_E)
    # the grouped path ran, except with no tokens
    assert emulated_grouped_mm == ([torch.float64] if sum(counts) else [])
    assert_equals_loop(ex, x, counts_E, y)


@pytest.mark.parametrize("counts,tail", [([3, 0, 5, 2], 4), ([0, 0, 0, 0], 3), ([4, 4, 4, 4], 0)])
def test_grouped_mm_rows_after_the_groups(emulated_grouped_mm, counts, tail):
    """With `tail`, rows after the groups (where grouped_mm leaves output and input gradient undefined: NaN in
    the emulation) give zero output and zero gradient, and the rest equals the loop on the grouped rows."""
    ex = make(nn.GELU)
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts) + tail, 6, dtype=torch.float64, requires_grad=True)
    y = ex(x, counts_E, tail=True)
    assert emulated_grouped_mm == [torch.float64]
    assert torch.equal(y[sum(counts):], torch.zeros(tail, 6, dtype=torch.float64))
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *ex.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][sum(counts):], torch.zeros(tail, 6, dtype=torch.float64))
    x_in = x[:sum(counts)].detach().requires_grad_()
    y_ref = loop(ex, x_in, counts_E)
    torch.testing.assert_close(y[:sum(counts)], y_ref)
    grads_ref = torch.autograd.grad((y_ref * w[:sum(counts)]).sum(), [x_in, *ex.parameters()], materialize_grads=True)
    torch.testing.assert_close(grads[0][:sum(counts)], grads_ref[0])
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g, g_ref)


def test_rows_after_the_groups_need_the_grouped_path():
    with pytest.raises(ValueError, match="sync-free path"):
        make(nn.GELU)(torch.randn(5, 6, dtype=torch.float64), torch.tensor([1, 1, 1, 1]), tail=True)


def test_grouped_bias_gradient_is_per_expert_sum():
    from clipmoe.experts import _GroupedBias

    expert_S = torch.tensor([0, 0, 2, 2, 2, 3])
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(_GroupedBias.apply, (x, b, expert_S))
    valid_S = torch.tensor([True, True, True, True, False, False])
    torch.autograd.gradcheck(_GroupedBias.apply, (x, b, expert_S, valid_S))
    gx, gb = torch.autograd.grad(_GroupedBias.apply(x, b, expert_S).sum(), [x, b])
    assert torch.equal(gb, torch.tensor([2.0, 0.0, 3.0, 1.0], dtype=torch.float64)[:, None].expand(4, 5))
    assert torch.equal(gx, torch.ones_like(x))


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [4, 4, 4, 4], [0, 1, 0, 0]])
def test_padded_path_matches_loop(counts):
    """The padded batched products (the GPU path for dtypes without grouped_mm) equal the per-expert loop,
    outputs and every gradient, with empty groups."""
    from clipmoe.experts import _padded_experts

    ex = make(nn.GELU)
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    assert_equals_loop(ex, x, counts_E, _padded_experts(x, counts_E, max(counts), ex.act, ex.w1, ex.b1, ex.w2, ex.b2))


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [5, 5, 5, 5], [0, 0, 0, 0]])
def test_static_capacity_padding_with_rows_after_the_groups(counts):
    """Padded to a static C = 5 with 4 rows after the groups (dropped assignments, fp32 capacity mode on a GPU):
    the groups equal the loop; the rows after them get output 0 and input gradient 0."""
    from clipmoe.experts import _padded_experts

    ex = make(nn.GELU)
    counts_E, S = torch.tensor(counts), sum(counts) + 4
    x = torch.randn(S, 6, dtype=torch.float64, requires_grad=True)
    y = _padded_experts(x, counts_E, 5, ex.act, ex.w1, ex.b1, ex.w2, ex.b2, tail=True)
    n = sum(counts)
    x_ref = x[:n].detach().requires_grad_()
    y_ref = loop(ex, x_ref, counts_E)
    torch.testing.assert_close(y[:n], y_ref)
    assert y[n:].abs().max() == 0
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *ex.parameters()])
    grads_ref = torch.autograd.grad((y_ref * w[:n]).sum(), [x_ref, *ex.parameters()], allow_unused=True,
                                    materialize_grads=True)
    torch.testing.assert_close(grads[0][:n], grads_ref[0])
    assert grads[0][n:].abs().max() == 0
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g, g_ref)


def test_padding_pays_only_when_groups_are_even_enough():
    from clipmoe.experts import _padding_pays

    assert _padding_pays([4, 4, 4, 4]) and _padding_pays([6, 2, 4, 4])  # 4 x 6 = 24 <= 2 x 16
    assert not _padding_pays([16, 0, 0, 0]) and not _padding_pays([0, 0, 0, 0])
