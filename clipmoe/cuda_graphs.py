"""CUDA graphs for an MoE layer: its forward and its backward each replayed as one graph.

Why: at CLIP-tower sizes one MoE layer's GPU work is well under a millisecond, and launching its 120-170
kernels one at a time costs the host several (H200, 4,096 tokens, bf16: 3.6-5.3 ms per forward + backward
for 0.5-1.9 ms of GPU time). A replayed graph launches them all at once.

A graph needs fixed shapes and no host syncs (`MoE.sync_free`): with bf16 compute, the grouped_mm path, for
token choice (dropless or with capacity, whose dropped assignments then keep rows after the expert groups)
and expert choice; in other dtypes, capacity mode and expert choice, whose experts then run padded to the
static capacity; on inputs of one shape, without a token mask. Built on
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
        if not layer.sync_free(sample):
            raise ValueError("CUDA graphs need a sync-free layer: bf16 compute on a GPU with grouped_mm (compute "
                             "capability 8.0+, or 9.0+ on torch without F.grouped_mm), or a capacity factor (or "
                             f"expert choice) in other dtypes; got {sample.dtype} input, autocast "
                             f"{torch.is_autocast_enabled('cuda')}, capacity factor {layer.cfg.capacity_factor}")
        self.shape, self.dtype, self.requires_grad = sample.shape, sample.dtype, sample.requires_grad
        self.training = layer.training
        self.autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        self._params = [p.data_ptr() for p in layer.parameters()]
        self.tower, self.block, self.routing = layer.tower, layer.block, layer.routing  # fixed by the mode
        self.replays = 0
        self._graphed = torch.cuda.make_graphed_callables(_Flat(layer).train(layer.training), (sample,),
                                                          num_warmup_iters=warmup)

    def accepts(self, layer: MoE, x: torch.Tensor, token_mask: Optional[torch.Tensor]) -> bool:
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        if not (token_mask is None and x.shape == self.shape and x.dtype == self.dtype and x.is_cuda
                and x.requires_grad == self.requires_grad and layer.training == self.training
                and autocast == self.autocast):
            return False
        if [p.data_ptr() for p in layer.parameters()] != self._params:  # the graphs would read the old ones
            raise RuntimeError(f"MoE layer {layer.tower}.{layer.block}: its parameters were replaced after CUDA graph "
                               "capture (model.to(), .half(), ...); capture after moving the model, or "
                               "cuda_graphs.release(layer) and capture again")
        return True

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        self.replays += 1
        y, balance, z, entropy, marginal, counts, top1, dropped = self._graphed(x)
        return y, MoEAux(self.tower, self.block, counts, top1, dropped, routing=self.routing, balance_loss=balance,
                         z_loss=z, entropy=entropy, marginal_entropy=marginal)


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


def capture_model(model: nn.Module, *inputs, autocast_dtype: Optional[torch.dtype] = None,
                  warmup: int = 3) -> list[MoE]:
    """Captures every MoE layer that a forward of `model` on `inputs` calls without a token mask on the sync-free
    path (the image tower's: in bf16 all of them, in fp32 those with a capacity factor or expert choice), for the
    shapes of that call; the other layers stay eager. Call it in
    train mode on a batch of the training shape, before wrapping the model in DDP. With `autocast_dtype`, the
    forward and the captures run under CUDA autocast to that dtype, without its cache (which graphs cannot
    use): train under `torch.autocast("cuda", dtype, cache_enabled=False)` too. Returns the captured layers."""
    calls: dict[MoE, tuple] = {}

    def record(layer, args):
        x, mask = args[0], (args[1] if len(args) > 1 else None)
        if mask is None and layer not in calls and x.is_cuda and layer.sync_free(x):
            calls[layer] = (x.shape, x.dtype, x.requires_grad, x.device)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, MoE)]
    autocast = torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                              cache_enabled=False)
    try:
        with autocast:
            model(*inputs)  # only to see each layer's input
    finally:
        for h in handles:
            h.remove()
    with autocast:
        for layer, (shape, dtype, requires_grad, device) in calls.items():
            capture(layer, torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad), warmup)
    return list(calls)
