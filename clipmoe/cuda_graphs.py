"""CUDA graphs for an MoE layer: its forward and its backward each replayed as one graph.

Why: at CLIP-tower sizes one MoE layer's GPU work is well under a millisecond, and launching its 120-170
kernels one at a time costs the host several (H200, 4,096 tokens, bf16: 3.6-5.3 ms per forward + backward
for 0.5-1.9 ms of GPU time). A replayed graph launches them all at once.

A graph needs fixed shapes and no host syncs, which is what the grouped_mm path gives (CUDA, bf16 compute:
`Experts.sync_free`): token choice (dropless or with capacity, whose dropped assignments then keep rows
after the expert groups) or expert choice, on inputs of one shape, without a token mask. Built on
`torch.cuda.make_graphed_callables`, so its rules hold: the outputs live in the graph's own memory and the
next call of the same layer overwrites them (use y and the aux terms, backward included, before calling the
layer again); parameters are updated in place (any torch optimizer does); under autocast, capture and call
with `cache_enabled=False`.

    layer = clipmoe.cuda_graphs.capture(layer, sample_x)   # layer(x) now replays for x shaped like sample_x
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .moe import MoE, MoEAux


class _Flat(nn.Module):
    """The layer's eager forward with tensors only out, as make_graphed_callables needs."""

    def __init__(self, layer: MoE):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y, a = self.layer.eager_forward(x)
        return (y, a.balance_loss, a.z_loss, a.entropy, a.marginal_entropy, a.tokens_per_expert, a.top1,
                a.dropped_fraction)


class GraphedMoE:
    """The captured graphs of one layer, for inputs shaped like the sample, in the mode it was captured in."""

    def __init__(self, layer: MoE, sample: torch.Tensor, warmup: int = 3):
        if not sample.is_cuda:
            raise ValueError(f"CUDA graphs need a CUDA input; got one on {sample.device}")
        if not layer.experts.sync_free(sample):
            raise ValueError("CUDA graphs need the sync-free grouped_mm path: bf16 compute on a GPU with grouped_mm "
                             f"(compute capability 8.0+, or 9.0+ on torch without F.grouped_mm); got {sample.dtype} "
                             f"input, autocast {torch.is_autocast_enabled('cuda')}")
        self.shape, self.dtype, self.requires_grad = sample.shape, sample.dtype, sample.requires_grad
        self.training = layer.training
        self.autocast = torch.is_autocast_enabled("cuda")
        self.tower, self.block = layer.tower, layer.block
        self._graphed = torch.cuda.make_graphed_callables(_Flat(layer).train(layer.training), (sample,),
                                                          num_warmup_iters=warmup)

    def accepts(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], training: bool) -> bool:
        return (token_mask is None and x.shape == self.shape and x.dtype == self.dtype and x.is_cuda
                and x.requires_grad == self.requires_grad and training == self.training
                and torch.is_autocast_enabled("cuda") == self.autocast)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        y, balance, z, entropy, marginal, counts, top1, dropped = self._graphed(x)
        return y, MoEAux(self.tower, self.block, balance, z, entropy, marginal, counts, top1, dropped)


def capture(layer: MoE, sample: torch.Tensor, warmup: int = 3) -> MoE:
    """Captures the layer's forward and backward for inputs shaped like `sample` (same dtype, same
    requires_grad, the layer's current train/eval mode) and returns the layer: from now on its calls with
    such inputs replay the graphs; any other call (another shape, a token mask, the other mode) runs eagerly.
    `release(layer)` drops the graphs."""
    graph = GraphedMoE(layer, sample, warmup)
    layer.__dict__["_cuda_graph"] = graph  # not a submodule: state_dict and parameters stay the layer's own
    return layer


def release(layer: MoE) -> MoE:
    layer.__dict__.pop("_cuda_graph", None)
    return layer
