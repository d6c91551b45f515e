"""Expert parallelism (GShard): the ranks of an expert-parallel group of size G each hold E / G of every MoE
layer's experts; routing stays local, and the rows routed to another rank's experts travel there and back by
all-to-all, between the layer's dispatch and combine (`ParallelExperts` takes `Experts`' place).

Groups as DeepSpeed lays them out: the expert-parallel groups are consecutive ranks ([0, G), [G, 2G), ...), and
the ranks holding the same experts (one per expert-parallel group, W / G of them) form an expert-data-parallel
group. Gradients: the rest of the model is averaged over all W ranks by DDP; an expert's weights get, from the
all-to-all's backward, the gradient of every token its expert-parallel group routed to it, which is summed
over its expert-data-parallel group and divided by W (`reduce_expert_grads`), so every parameter gets the
gradient of the mean of the ranks' losses, as without expert parallelism.

Checkpoints hold the full model (`full_state_dict`, `full_optimizer_state`): they load into a model without
expert parallelism, or with another group size.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from .errors import ClipmoeError
from .experts import Experts
from .first_order import first_order
from .moe import MoE


@dataclass(frozen=True)
class Groups:
    ep: dist.ProcessGroup  # this rank's expert-parallel group: the experts are split across it
    ep_rank: int
    ep_size: int
    edp: Optional[dist.ProcessGroup]  # the ranks holding this rank's experts; None when there is one (G = W)
    world: int


def new_groups(ep_size: int) -> Groups:
    """This rank's groups for expert-parallel size `ep_size` (a divisor of the world size). Every rank must
    call this (each group is created by all ranks, in the same order). The expert-parallel group is a group of
    its own even when it spans the world, so that its all-to-alls never interleave with DDP's all-reduces."""
    if not dist.is_initialized():
        raise ClipmoeError(f"expert parallelism (size {ep_size}) needs a process group: launch with torchrun "
                           f"--nproc-per-node {ep_size} (or more, a multiple)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ClipmoeError(f"expert_parallel_size {ep_size} must divide the number of processes ({world})")
    ep = edp = None
    for start in range(0, world, ep_size):
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep = g
    if world > ep_size:
        for first in range(ep_size):
            g = dist.new_group(list(range(first, world, ep_size)))
            if rank % ep_size == first:
                edp = g
    return Groups(ep, rank % ep_size, ep_size, edp, world)


class _AllToAll(torch.autograd.Function):
    """Rows of x, `send[g]` of them to rank g of `group`, in rank order; returns the `recv[g]` rows from each
    rank g, in rank order. The backward sends the gradients back the same way. (torch's differentiable
    `torch.distributed.nn.functional.all_to_all_single` is deprecated, its successor private.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group):
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    @first_order
    def backward(ctx, g):
        return _AllToAll.apply(g, ctx.send, ctx.recv, ctx.group), None, None, None


def _source_to_expert_order(recv_GL: torch.Tensor, total: int) -> torch.Tensor:
    """Received rows come grouped by source rank, then by local expert (`recv_GL[g, l]` rows each); the experts
    want them grouped by local expert, then by source. Returns the row order that does that."""
    counts = recv_GL.reshape(-1)
    start_GL = (counts.cumsum(0) - counts).view_as(recv_GL)  # where each (source, expert) block starts
    counts_LG = recv_GL.t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(counts_LG.numel(), device=counts.device), counts_LG, output_size=total)
    within = torch.arange(total, device=counts.device) - (counts_LG.cumsum(0) - counts_LG)[block]
    return start_GL.t().reshape(-1)[block] + within


class ParallelExperts(Experts):
    """This rank's share of an MoE layer's experts (experts `first` .. `first + E / G - 1`), run on the rows
    that every rank of the expert-parallel group routed to them: `forward` takes and returns rows for all E
    experts, as `Experts.forward` does."""

    def __init__(self, experts: Experts, groups: Groups):
        E = experts.w1.shape[0]
        if E % groups.ep_size:
            raise ClipmoeError(f"{E} experts cannot be split evenly over expert_parallel_size {groups.ep_size}")
        local = E // groups.ep_size
        super().__init__(local, experts.dim, experts.hidden, lambda: experts.act, experts.lanes)
        self.groups, self.num_experts, self.first = groups, E, groups.ep_rank * local
        with torch.no_grad():
            for name in ("w1", "b1", "w2", "b2"):
                mine = getattr(experts, name)[self.first:self.first + local]
                setattr(self, name, nn.Parameter(mine.clone(), requires_grad=getattr(experts, name).requires_grad))

    def sync_free(self, x, capacity=None, rows=None) -> bool:
        return False  # the all-to-all's splits are read on the host

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor, tail: bool = False,
                capacity: Optional[int] = None) -> torch.Tensor:
        if tail:
            raise ValueError("expert parallelism reads the group sizes on the host (no rows after the groups)")
        G, group = self.groups.ep_size, self.groups.ep
        x_SD = x_SD.to(self.compute_dtype(x_SD))  # bf16 under autocast: half the bytes to send
        send_GL = counts_E.view(G, -1)  # rows for each rank's local experts
        recv_GL = torch.empty_like(send_GL)
        dist.all_to_all_single(recv_GL, send_GL.contiguous(), group=group)
        send, recv = send_GL.sum(1).tolist(), recv_GL.sum(1).tolist()
        x_RD = _AllToAll.apply(x_SD, recv, send, group)
        order = _source_to_expert_order(recv_GL, sum(recv))
        h_RD = super().forward(x_RD.index_select(0, order), recv_GL.sum(0))
        back = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        return _AllToAll.apply(h_RD.index_select(0, back), send, recv, group)

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.w1.shape[0] - 1} of {self.num_experts}"


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    return (m for m in model.modules() if isinstance(m, MoE))


def shard_experts(model: nn.Module, groups: Groups) -> nn.Module:
    """Keeps, in every MoE layer of `model` (in place), this rank's share of the experts. The full experts must be
    the same on every rank (the same checkpoint, or broadcast from rank 0: see `broadcast_model`)."""
    layers = list(moe_layers(model))
    if not layers:
        raise ClipmoeError("expert parallelism: the model has no MoE layer")
    for layer in layers:
        if isinstance(layer.experts, ParallelExperts):
            raise ClipmoeError("expert parallelism: the model's experts are already sharded")
        if layer.cfg.num_experts % groups.ep_size:
            raise ClipmoeError(f"{layer.tower} block {layer.block}: {layer.cfg.num_experts} experts cannot be split "
                               f"evenly over expert_parallel_size {groups.ep_size}")
    for layer in layers:
        layer.experts = ParallelExperts(layer.experts, groups)
    return model


def broadcast_model(model: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `model` set to rank `src`'s (all ranks call this)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src)


def _sharded(model: nn.Module) -> dict[str, ParallelExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ParallelExperts)}


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds only this rank's share of some experts."""
    return bool(_sharded(model))


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The names of the parameters held by one rank's share of the experts (DDP must leave them alone)."""
    return [f"{name}.{p}" for name, m in _sharded(model).items() for p, _ in m.named_parameters(recurse=False)]


def _gather_rows(t: torch.Tensor, groups: Groups) -> torch.Tensor:
    """The group's shards of a tensor split along dim 0, concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(groups.ep_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=groups.ep)
    return torch.cat(parts)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every expert tensor whole (E experts), as without expert parallelism. Every
    rank of the expert-parallel group calls this (the shards are gathered)."""
    state = model.state_dict()
    for name, m in _sharded(model).items():
        for p, t in m.named_parameters(recurse=False):
            state[f"{name}.{p}"] = _gather_rows(t, m.groups)
    return state


def gathered(model: nn.Module) -> nn.Module:
    """A copy of `model` with all experts on this rank (no expert parallelism), e.g. to evaluate or save it; the
    model itself when it has no sharded experts. Every rank calls this."""
    sharded = _sharded(model)
    if not sharded:
        return model
    state = full_state_dict(model)
    # deepcopy puts whole experts where the shards were (the memo answers for them)
    memo = {id(m): Experts(m.num_experts, m.dim, m.hidden, lambda m=m: m.act, m.lanes).to(m.w1)
            for m in sharded.values()}
    out = copy.deepcopy(model, memo)
    out.load_state_dict(state)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in out.named_parameters():  # frozen experts stay frozen
        p.requires_grad_(trainable[name])
    return out


def _expert_params(model: nn.Module) -> list[tuple[ParallelExperts, nn.Parameter]]:
    return [(m, p) for m in _sharded(model).values() for p in m.parameters(recurse=False)]


def reduce_expert_grads(model: nn.Module) -> None:
    """After the backward: each expert's gradient summed over the ranks holding it and divided by the world size
    (what DDP's mean over ranks gives the other parameters). An expert no rank routed a token to gets a zero
    gradient, so that every rank takes the same optimizer step."""
    for m, p in _expert_params(model):
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if m.groups.edp is not None:
            dist.all_reduce(p.grad, group=m.groups.edp)
        p.grad.div_(m.groups.world)


def expert_grad_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm of all experts' gradients, the shards on the other ranks of the expert-parallel group included
    (after `reduce_expert_grads`; every rank of the group calls this)."""
    experts = _expert_params(model)
    grads = [p.grad for _, p in experts if p.grad is not None]
    sq = get_total_norm(grads).to(experts[0][1].device).square()
    dist.all_reduce(sq, group=experts[0][0].groups.ep)  # the other shards' share
    return sq.sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole model's gradients, the experts on the other ranks of the
    expert-parallel group included (after `reduce_expert_grads`). Returns the total norm."""
    ids = {id(p) for _, p in _expert_params(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    experts = expert_grad_norm(model)
    rest = get_total_norm([p.grad for p in params if id(p) not in ids]).to(experts.device)
    total = (experts.square() + rest.square()).sqrt()
    clip_grads_with_norm_(params, max_norm, total)
    return total


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of this rank's share of the experts."""
    return [p for _, p in _expert_params(model)]


def _optimizer_params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict:
    """`opt.state_dict()` with the experts' state tensors whole (every rank of the group calls this)."""
    state = opt.state_dict()
    owner = {id(p): m for m, p in _expert_params(model)}
    for i, p in enumerate(_optimizer_params(opt)):
        m = owner.get(id(p))
        if m is not None and i in state["state"]:
            state["state"][i] = {k: _gather_rows(v, m.groups) if torch.is_tensor(v) and v.shape == p.shape else v
                                 for k, v in state["state"][i].items()}
    return state


def shard_optimizer_state(state: dict, opt: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A full optimizer state (`full_optimizer_state`, or one saved without expert parallelism) cut to this rank's
    experts, for `opt.load_state_dict`."""
    owner = {id(p): m for m, p in _expert_params(model)}
    out = {**state, "state": dict(state["state"])}
    for i, p in enumerate(_optimizer_params(opt)):
        m = owner.get(id(p))
        if m is not None and i in out["state"]:
            rows = slice(m.first, m.first + p.shape[0])
            out["state"][i] = {k: v[rows] if torch.is_tensor(v) and v.shape[1:] == p.shape[1:] and v.ndim == p.ndim
                               and v.shape[0] == m.num_experts else v for k, v in out["state"][i].items()}
    return out
