"""Moving tokens into expert order and back for token-choice routing, as gathers in both directions.

Assignment a = k * N + n is token n's k-th choice. The kept assignments sit in slots grouped by expert;
each expert's group may be padded to a multiple of `align` slots (see Experts.align: on CPU this keeps
the set of matmul shapes small, so oneDNN compiles each shape once instead of on nearly every step).
`Slots` holds the maps: token_P[p] (the token in slot p; padding reads token 0) and slot_NK[n, k] (the
slot of assignment (n, k), -1 when capacity dropped it).

Dispatch gathers rows by token_P, and its backward gathers each token's K slot gradients by slot_NK;
combine gathers each token's K expert outputs by slot_NK, weighted by their gates, and its backward
gathers by token_P (on CPU weighted in the same pass, the gates' gradients as row dot products that read
their rows where they lie: `gathered_dots`). Autograd's default for the same maths (index_select /
index_add_) zero-fills an (N, D) buffer and scatter-adds into it in both passes; here every pass is one
read of its rows. Padding slots get zero output gradient, so they add nothing to any parameter's gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .experts import expert_of_rows
from .first_order import first_order


@dataclass
class Slots:
    token_P: torch.Tensor  # (P,) token in each slot; 0 in padding slots
    slot_NK: torch.Tensor  # (N, K) slot of each assignment, -1 if dropped
    token_S: torch.Tensor  # (S,) token of each kept assignment, in slot order
    choice_S: torch.Tensor  # (S,) its choice index k
    real_S: Optional[torch.Tensor]  # (S,) its slot; None when there is no padding (slot = s)
    counts_E: torch.Tensor  # (E,) slots per expert, padding included
    dropless: bool  # no assignment was dropped

    @staticmethod
    def arrange(order_S: torch.Tensor, kept_E: torch.Tensor, num_tokens: int, top_k: int, align: int = 1) -> "Slots":
        """Slots for the kept assignments `order_S` (ids a = k * N + n, grouped by expert, `kept_E` each)."""
        N, S, dev = num_tokens, order_S.numel(), order_S.device
        token_S, choice_S = order_S % N, order_S // N
        real_S, token_P, counts_E = None, token_S, kept_E
        if align > 1:
            counts_E = (kept_E + align - 1) // align * align
            shift_E = (counts_E.cumsum(0) - counts_E) - (kept_E.cumsum(0) - kept_E)
            expert_S = expert_of_rows(kept_E, S)
            real_S = torch.arange(S, device=dev) + shift_E[expert_S]
            token_P = torch.zeros(int(counts_E.sum()), dtype=torch.long, device=dev)
            token_P[real_S] = token_S
        slot_A = torch.full((N * top_k,), -1, dtype=torch.long, device=dev)
        slot_A[order_S] = torch.arange(S, device=dev) if real_S is None else real_S
        return Slots(token_P, slot_A.view(top_k, N).t(), token_S, choice_S, real_S, counts_E, S == N * top_k)

    def per_slot(self, w_NK: torch.Tensor) -> torch.Tensor:
        """(P,) w of the assignment in each slot; 0 in padding slots."""
        w_S = w_NK[self.token_S, self.choice_S]
        if self.real_S is None:
            return w_S
        return w_S.new_zeros(self.token_P.shape).index_copy_(0, self.real_S, w_S)


def gather_sum(src_PD: torch.Tensor, slots: Slots, weight_NK: Optional[torch.Tensor],
               fused: Optional[bool] = None) -> torch.Tensor:
    """out[n] = sum_k weight[n, k] * src[slot[n, k]], over the assignments that were kept. `fused`: one
    `F.embedding_bag` pass or a gather per choice; None: fused on CPU wherever that is faster (see below)."""
    slot_NK = slots.slot_NK
    N, K = slot_NK.shape
    if src_PD.shape[0] == 0:
        return src_PD.new_zeros(N, src_PD.shape[1])
    if not slots.dropless:  # a dropped assignment reads slot 0 with weight 0
        kept_NK = slot_NK >= 0
        weight_NK = kept_NK.to(src_PD.dtype) if weight_NK is None else weight_NK * kept_NK
        slot_NK = slot_NK.clamp(min=0)
    if fused is None:
        fused = src_PD.device.type == "cpu" and (K > 1 or weight_NK is not None)
    if fused:
        # one pass, summed in fp32 (bf16 too), where the loop below makes 3K - 1 passes over (N, D) in src's dtype:
        # bf16, 4,096 x 512, 2 threads: 0.43 against ~1.4 ms at K = 2, 0.29 against 0.5 at K = 1 (a plain gather
        # stays index_select, 0.21 against 0.27). Not on GPUs, where it is not measured.
        return F.embedding_bag(slot_NK, src_PD, mode="sum", per_sample_weights=weight_NK)
    out_ND = None
    for k in range(K):
        rows_ND = src_PD.index_select(0, slot_NK[:, k])
        if weight_NK is not None:
            rows_ND.mul_(weight_NK[:, k].unsqueeze(1))
        out_ND = rows_ND if out_ND is None else out_ND.add_(rows_ND)
    return out_ND


# torch's kernel for the gradient of embedding_bag's per-sample weights: out[i] = grad[bag[i]] . weight[indices[i]]
_EMBEDDING_BAG_DOTS = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)


def gathered_dots(g_ND: torch.Tensor, h_PD: torch.Tensor, slot_NK: torch.Tensor) -> torch.Tensor:
    """(N, K): g[n] . h[slot[n, k]], 0 where slot is -1 (dropped), in one pass that reads each row where it lies,
    summed in fp32 for bf16 (torch's kernel for embedding_bag's per-sample-weight gradient; the product and row
    sums it replaces wrote an (S, D) temporary and rounded each product to bf16)."""
    N, K = slot_NK.shape
    rows = torch.arange(N, device=slot_NK.device)
    bag_A = rows.repeat_interleave(K) if K > 1 else rows
    dots_A = _EMBEDDING_BAG_DOTS(g_ND, h_PD, slot_NK.reshape(-1), rows * K, bag_A, 0, -1)  # mode 0: sum
    return dots_A.view(N, K)


class GradSink:
    """Dispatch's gradient of x, handed to the router's backward, which adds its own into it in place: autograd
    would sum the two in a third (N, D) pass. The router arms the sink by setting `after` to its output; Dispatch
    takes that as an input, so autograd runs Dispatch's backward first (a node runs once every user of its
    outputs has). Unarmed, Dispatch returns its gradient as usual."""

    def __init__(self):
        self.after: Optional[torch.Tensor] = None
        self.grad: Optional[torch.Tensor] = None

    def take(self) -> Optional[torch.Tensor]:
        grad, self.grad = self.grad, None
        return grad


class Dispatch(torch.autograd.Function):
    """x_PD = x_ND[token_P]. With an armed `sink` (its `after` given), x's gradient goes to the sink."""

    @staticmethod
    def forward(ctx, x_ND, slots: Slots, sink: Optional[GradSink] = None, after: Optional[torch.Tensor] = None):
        ctx.slots, ctx.sink = slots, sink if after is not None else None
        return x_ND.index_select(0, slots.token_P)

    @staticmethod
    @first_order
    def backward(ctx, g_PD):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g_ND = gather_sum(g_PD.contiguous(), ctx.slots, None)
        if ctx.sink is None:
            return g_ND, None, None, None
        ctx.sink.grad = g_ND
        return None, None, None, None


class Combine(torch.autograd.Function):
    """y_ND[n] = sum_k gate_NK[n, k] * h_PD[slot_NK[n, k]] over kept assignments; gates cast to h's dtype."""

    @staticmethod
    def forward(ctx, h_PD, gate_NK, slots: Slots):
        w_NK = gate_NK.to(h_PD.dtype)
        ctx.save_for_backward(h_PD, w_NK)
        ctx.slots, ctx.gate_dtype = slots, gate_NK.dtype
        return gather_sum(h_PD, slots, w_NK)

    @staticmethod
    @first_order
    def backward(ctx, g_ND):
        h_PD, w_NK = ctx.saved_tensors
        slots = ctx.slots
        if g_ND.device.type == "cpu" and _EMBEDDING_BAG_DOTS is not None and g_ND.shape[0] and h_PD.shape[0]:
            g_ND = g_ND.to(h_PD.dtype).contiguous()  # the kernels' operands share a dtype
            # two fused passes where the loop below makes four: the gates' gradients as row dot products that read
            # the rows where they lie, and the experts' as one weighted gather (bf16, 4,096 x 512 at k = 1: 0.32 + 0.20
            # ms against 0.55 + 0.44; at 16,384 tokens 1.4 + 1.3 against 3.1 + 2.1). Not on GPUs, where unmeasured.
            g_gate_NK = gathered_dots(g_ND, h_PD, slots.slot_NK).to(ctx.gate_dtype)  # dropped: 0
            w_P = slots.per_slot(w_NK).unsqueeze(1)  # padding slots: weight 0, so gradient 0
            g_PD = F.embedding_bag(slots.token_P.unsqueeze(1), g_ND, mode="sum", per_sample_weights=w_P)
            return g_PD, g_gate_NK, None
        g_PD = g_ND.index_select(0, slots.token_P)
        dot_P = (g_PD * h_PD).sum(1)
        g_gate_NK = torch.zeros(w_NK.shape, dtype=ctx.gate_dtype, device=w_NK.device)  # dropped: 0
        kept_P = dot_P if slots.real_S is None else dot_P[slots.real_S]
        g_gate_NK[slots.token_S, slots.choice_S] = kept_P.to(ctx.gate_dtype)
        g_PD.mul_(slots.per_slot(w_NK).unsqueeze(1))  # padding slots: weight 0, so gradient 0
        return g_PD, g_gate_NK, None
