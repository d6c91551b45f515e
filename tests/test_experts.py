"""The experts' hand-written forward/backward against autograd through a plain per-expert loop."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipmoe.experts import Experts
from clipmoe.model import QuickGELU


def loop(ex: Experts, x_SD, counts_E):
    """Autograd through F.linear, one expert at a time: the obvious implementation."""
    outs = [ex.act(F.linear(x_cD, ex.w1[e], ex.b1[e])) @ ex.w2[e] + ex.b2[e]
            for e, x_cD in enumerate(x_SD.split(counts_E.tolist()))]
    return torch.cat(outs)


def make(act_layer, dtype=torch.float64, E=4, D=6, F_=10):
    torch.manual_seed(0)
    ex = Experts(E, D, F_, act_layer).to(dtype)
    for p in ex.parameters():
        nn.init.normal_(p, std=0.5)
    return ex


ACTS = [nn.GELU, lambda: nn.GELU(approximate="tanh"), QuickGELU, nn.SiLU]


@pytest.mark.parametrize("act_layer", ACTS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [0, 0, 0, 0]])
def test_matches_autograd_loop(act_layer, counts):
    ex = make(act_layer)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 6, dtype=torch.float64, requires_grad=True)
    y = ex(x, counts_E)
    y_ref = loop(ex, x, counts_E)
    torch.testing.assert_close(y, y_ref)
    w = torch.randn_like(y)
    inputs = [x, *ex.parameters()]
    grads = torch.autograd.grad((y * w).sum(), inputs, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), inputs, allow_unused=True, materialize_grads=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)  # experts without tokens get zeros, not garbage


def test_gradcheck():
    ex = make(nn.GELU)
    counts_E = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(ex.parameters())

    def f(x, w1, b1, w2, b2):
        from clipmoe.experts import _ExpertMLP

        return _ExpertMLP.apply(x, counts_E.tolist(), ex.act, w1, b1, w2, b2)

    assert torch.autograd.gradcheck(f, (x, *params))


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
