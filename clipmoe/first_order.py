"""`first_order`: the backward decorator of the MoE layer's custom autograd functions."""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def first_order(backward):
    """torch's `once_differentiable`, plus an error under create_graph=True (double backward).

    once_differentiable makes the backward's outputs constants when its incoming gradient is one (as a loss's
    is), although they depend on the saved inputs; so `torch.autograd.grad(..., create_graph=True)` through
    the layer would silently drop every second-order term through them (measured: wrong input gradients and
    no expert weight gradient from a gradient penalty). These functions have no double backward: say so."""
    wrapped = once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
            raise RuntimeError("clipmoe's MoE layer has first-order gradients only: double backward "
                               "(create_graph=True, gradient penalties, Hessian products) is not supported")
        return wrapped(ctx, *grads)

    return checked
