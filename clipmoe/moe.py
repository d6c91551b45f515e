"""Sparse Mixture-of-Experts MLP: fp32 router; token-choice top-k routing with capacity (position order or
Batch Prioritized Routing) or dropless; expert-choice routing; the expert computation; and the raw
auxiliary terms (Switch load balance, ST-MoE router z-loss, LIMoE's local and marginal entropies).

This is the only module that knows about experts. Papers: Switch Transformer (Fedus et al. 2021),
GShard (Lepikhin et al. 2020), V-MoE (Riquelme et al. 2021), Expert Choice (Zhou et al. 2022),
ST-MoE (Zoph et al. 2022), LIMoE (Mustafa et al. 2022), Sparse Upcycling (Komatsuzaki et al. 2022).

Shape legend: N routed tokens, D width, F expert hidden width, E experts, K top-k, A = N*K assignments,
S assignments kept after capacity (S <= A).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig, from_dict
from .dispatch import Combine, Dispatch, GradSink, Slots
from .experts import Experts
from .first_order import first_order


def _no_autocast(term):
    """Computes an aux term in fp32 wherever it is first read: under autocast a dot product would run in bf16."""
    @functools.wraps(term)
    def wrapper(self):
        with torch.autocast(self._probs.device.type, enabled=False):
            return term(self)
    return wrapper


_TERMS = ("balance_loss", "z_loss", "entropy", "marginal_entropy")


class MoEAux:
    """What one MoE layer reports about its last forward. The loss terms are raw (no coefficients) and are
    computed from the fp32 router logits on first use, so a forward whose terms nobody reads (inference, a
    LIMoE term with coefficient 0) launches none of their kernels.

    tokens_per_expert: (E,) assignments routed to each expert before capacity, detached.
    top1: (N,) each routed token's most probable expert, detached (routing analysis).
    dropped_fraction: scalar; token choice: assignments dropped; expert choice: tokens no expert took.
    assignments: (token_M, expert_M), the M (routed token, expert) pairs the experts computed (after capacity;
        expert choice: each expert's picks), on first use; None where unknown (a CUDA graph's call).
    probs: (N, E) the router's probabilities for the routed tokens (fp32), detached; None where unknown (a CUDA
        graph's call).
    balance_loss: E * sum_i f_i * P_i (Switch; f from the top-1 choices); 1 when balanced.
    z_loss: mean(logsumexp(logits)^2) (ST-MoE).
    entropy: LIMoE's local term, the mean over tokens of H(p(.|x)) in nats.
    marginal_entropy: H(mean over tokens of p(.|x)); LIMoE's global term is -this.
    routing: "topk" or "expert_choice", the routing of this call. Expert choice is balanced by construction
        (Zhou et al. 2022): its balance_loss is reported but not trained on (loss.total_loss).
    """

    def __init__(self, tower: str, block: int, tokens_per_expert: torch.Tensor, top1: torch.Tensor,
                 dropped_fraction: torch.Tensor, logits: Optional[torch.Tensor] = None,
                 probs: Optional[torch.Tensor] = None, top1_counts: Optional[torch.Tensor] = None,
                 assign: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None, routing: str = "topk",
                 **terms):
        self.tower, self.block, self.routing = tower, block, routing
        self.tokens_per_expert, self.top1, self.dropped_fraction = tokens_per_expert, top1, dropped_fraction
        self._logits, self._probs = logits, probs
        self._top1_counts = top1_counts  # the top-1 choices' counts where the layer has them; else from top1
        self._assign = assign  # computes `assignments` from the routing's index tensors (no autograd graph)
        self.__dict__.update(terms)  # terms computed elsewhere (a CUDA graph's outputs) take the properties' place

    def detach(self) -> "MoEAux":
        """The same report holding no autograd graph (a layer keeps this of its last call: `moe_report(model)`)."""
        terms = {k: v.detach() for k, v in self.__dict__.items() if k in _TERMS and torch.is_tensor(v)}
        logits, probs = (None if t is None else t.detach() for t in (self._logits, self._probs))
        return MoEAux(self.tower, self.block, self.tokens_per_expert, self.top1, self.dropped_fraction.detach(),
                      logits, probs, self._top1_counts, self._assign, self.routing, **terms)

    def __repr__(self):
        return f"MoEAux(tower={self.tower!r}, block={self.block}, tokens_per_expert={self.tokens_per_expert.tolist()})"

    @property
    def probs(self) -> Optional[torch.Tensor]:
        return None if self._probs is None else self._probs.detach()

    @functools.cached_property
    def assignments(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return None if self._assign is None else self._assign()

    @functools.cached_property
    def _mean_p(self) -> torch.Tensor:
        return self._probs.mean(0)

    @functools.cached_property
    def _lse(self) -> torch.Tensor:
        return torch.logsumexp(self._logits, dim=-1)

    @functools.cached_property
    @_no_autocast
    def balance_loss(self) -> torch.Tensor:
        N, E = self._probs.shape
        counts_E = _counts(self.top1, E) if self._top1_counts is None else self._top1_counts
        return (E / N) * (counts_E.to(self._probs.dtype) @ self._mean_p)

    @functools.cached_property
    @_no_autocast
    def z_loss(self) -> torch.Tensor:
        return (self._lse @ self._lse) / self._lse.numel()

    @functools.cached_property
    @_no_autocast
    def entropy(self) -> torch.Tensor:
        # H = lse - sum_e p_e * logits_e, since log p = logits - lse and p sums to 1
        return (self._lse.sum() - (self._probs * self._logits).sum()) / self._lse.numel()

    @functools.cached_property
    @_no_autocast
    def marginal_entropy(self) -> torch.Tensor:
        m = self._mean_p  # clamped log: an expert no token may pick (p = 0) gets a finite gradient
        return -(m @ m.clamp_min(1e-20).log())


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: Optional[float], minimum: int) -> Optional[int]:
    """C = ceil(k * T / E * factor), at least `minimum`; None (dropless) when factor is None or infinite."""
    if factor is None or math.isinf(factor):
        return None
    return max(minimum, math.ceil(top_k * num_tokens / num_experts * factor))


class MoE(nn.Module):
    """A drop-in replacement for a block's MLP: `forward(x, token_mask) -> (y, MoEAux)`, x of shape (..., dim).
    On its own: `MoE(512, 2048, MoEConfig(num_experts=8, top_k=1))`, or a dict of MoEConfig's fields as in a YAML
    `moe:` section (default: MoEConfig()). The placement fields do not apply to one layer (of `per_block`, the entry
    of `block`, if any, does), and the auxiliary terms of `aux` are raw: weight them into the loss yourself.

    Tokens where `token_mask` is False (text padding) are not routed, take no capacity, are not counted
    in the statistics and get y = 0 (the residual carries them). A token dropped by capacity also gets
    zero from the assignment that was dropped.
    """

    def __init__(self, dim: int, hidden: int, cfg: Optional[MoEConfig | Mapping] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, tower: str = "", block: int = -1,
                 shared: Optional[nn.Module] = None):
        super().__init__()
        if cfg is None or isinstance(cfg, Mapping):  # a dict as a YAML `moe:` section: validated as one
            cfg = from_dict(MoEConfig, dict(cfg or {}), "moe")
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a clipmoe.MoEConfig or a dict of its fields, not {type(cfg).__name__}")
        self.cfg = cfg = cfg.for_block(block)  # its `per_block` entry for this block, if any
        self.tower, self.block = tower, block
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = Experts(cfg.num_experts, dim, hidden, act_layer)
        if shared is None and cfg.shared_expert:  # an always-on dense MLP beside the experts; `shared` overrides it
            from .model import Mlp  # here: model builds its MLPs from this module

            shared = Mlp(dim, hidden, act_layer)
        self.shared = shared
        self.last_aux: Optional[MoEAux] = None  # the report of the last call, detached (moe_report(model))

    @property
    def routing(self) -> str:
        """The routing of the next call: the config's, or token choice for an expert-choice layer in eval mode
        with `eval_router: topk` (whose outputs then do not depend on the rest of the batch)."""
        if self.cfg.router == "expert_choice" and not self.training and self.cfg.eval_router == "topk":
            return "topk"
        return self.cfg.router

    def capacity(self, num_tokens: int) -> Optional[int]:
        cfg = self.cfg
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        if self.routing == "expert_choice":  # C = N * c / E
            if factor is None and not self.training:  # evaluation keeps training's C unless given its own
                factor = cfg.capacity_factor
            if factor is None or math.isinf(factor):  # dropless: only C = N guarantees every token an expert
                return num_tokens
            return min(num_tokens, max(cfg.min_capacity, math.ceil(num_tokens * factor / cfg.num_experts)))
        return capacity(num_tokens, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)

    def route(self, x_ND: torch.Tensor, sink: Optional[GradSink] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (N, E) and probabilities (N, E) in fp32 (fp64 for fp64 inputs or weights), under any
        autocast. On CPU both are views of (E, N) tensors: torch's CPU softmax over a last dimension of E = 8 is
        slow (4,096 tokens: 0.26 ms, against 0.03 over the first dimension of the (E, N) layout; its backward,
        max and logsumexp gain too). `sink`: armed (see dispatch.GradSink) where the router's backward adds its
        input gradient into Dispatch's."""
        w_ED = self.router.weight
        dt = torch.promote_types(torch.promote_types(x_ND.dtype, w_ED.dtype), torch.float32)
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            jitter = self.training and self.cfg.jitter > 0
            if x_ND.device.type == "cpu" and x_ND.dtype in _RouterLogits.DTYPES and not jitter \
                    and dt == torch.float32:
                logits_EN = _RouterLogits.apply(x_ND, w_ED, sink)
                if sink is not None:
                    sink.after = logits_EN
                return logits_EN.t(), logits_EN.softmax(dim=0).t()
            x_ND = x_ND.to(dt)
            if jitter:
                x_ND = x_ND * torch.empty_like(x_ND).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
            logits_NE = F.linear(x_ND, w_ED.to(dt))
        return logits_NE, logits_NE.softmax(dim=-1)

    def top_k(self, probs_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates (N, K) and experts (N, K) of token-choice routing. A tie goes to the lower expert index at k = 1 (as
        argmax; topk breaks ties as its kernel happens to: a zero router sent every token to expert 6 of 8 on CPU)."""
        if self.cfg.top_k == 1:  # max: also 6x faster than topk(1) on CPU at E = 8 (0.04 against 0.21 ms, 4,096 tokens)
            gates_NK, experts_NK = probs_NE.max(dim=-1, keepdim=True)
        else:
            gates_NK, experts_NK = probs_NE.topk(self.cfg.top_k, dim=-1)
        if self.cfg.router == "expert_choice":  # eval_router topk: the raw probabilities, as expert choice weighs
            return gates_NK, experts_NK
        if self.cfg.top_k > 1:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)
        elif self.cfg.k1_gate == "straight_through":
            gates_NK = gates_NK - gates_NK.detach() + 1.0  # value 1, gradient of the gate
        return gates_NK, experts_NK

    def dispatch_order(self, experts_NK: torch.Tensor, cap: Optional[int], priority_N: Optional[torch.Tensor] = None,
                       tail: bool = False):
        """Which assignments run, sorted by expert: returns (order, kept_counts_E, counts_E).

        Assignment a = k * N + n is token n's k-th choice. Slots are taken choice-major (all first
        choices before any second choice, GShard/Switch), within a choice in token order, or with
        `priority_N` (Batch Prioritized Routing) in decreasing priority. `order` lists the kept
        assignments; with `tail`, all assignments, the dropped ones after the kept ones (a shape that does
        not depend on the routing: nothing is read back to the host).
        """
        N, K = experts_NK.shape
        E, A = self.cfg.num_experts, N * K
        expert_A = experts_NK.t().reshape(-1)
        counts_E = _counts(expert_A, E)
        if priority_N is None:  # by expert, then by assignment id (choice-major, token order)
            sorted_A, order_A = torch.sort(expert_A, stable=True)
        else:  # by expert, then by slot priority
            rank_N = torch.empty_like(priority_N, dtype=torch.long)
            rank_N[torch.argsort(priority_N, descending=True, stable=True)] = torch.arange(N, device=rank_N.device)
            slot_A = (torch.arange(K, device=rank_N.device).unsqueeze(1) * N + rank_N).reshape(-1)
            order_A = torch.argsort(expert_A * A + slot_A)
            sorted_A = None
        if cap is None:
            return order_A, counts_E, counts_E
        sorted_A = expert_A[order_A] if sorted_A is None else sorted_A
        starts_E = counts_E.cumsum(0) - counts_E
        kept_A = torch.arange(A, device=order_A.device) - starts_E[sorted_A] < cap  # rank within its expert
        if tail:  # a stable partition: kept ones first, still grouped by expert
            return order_A[torch.argsort((~kept_A).to(torch.uint8), stable=True)], counts_E.clamp(max=cap), counts_E
        return order_A[kept_A], counts_E.clamp(max=cap), counts_E

    def _token_choice(self, x_ND: torch.Tensor, probs_NE: torch.Tensor, cap: Optional[int],
                      sink: Optional[GradSink] = None):
        N, A = probs_NE.shape[0], probs_NE.shape[0] * self.cfg.top_k
        gates_NK, experts_NK = self.top_k(probs_NE)
        priority_N = probs_NE.max(dim=-1).values.detach() if self.cfg.batch_priority else None
        tail = cap is not None and self.experts.static_layout(x_ND, cap, A)
        order_S, kept_E, counts_E = self.dispatch_order(experts_NK, cap, priority_N, tail)
        align = 1 if tail else self.experts.align(x_ND)  # padding slots are for the CPU's per-expert products
        slots = Slots.arrange(order_S, kept_E, N, self.cfg.top_k, align)
        # dispatch -> experts -> combine; under expert parallelism the experts' call is where the all-to-alls run
        x_PD = Dispatch.apply(x_ND, slots, sink, None if sink is None else sink.after)
        if sink is not None:  # the router's output, held no longer: its autograd node holds the sink
            sink.after = None
        h_PD = self.experts(x_PD, slots.counts_E, tail=tail, capacity=cap if tail else None)
        y_ND = Combine.apply(h_PD, gates_NK, slots)
        # dropped: computed on the device when only the device knows how many were kept
        dropped = 1.0 - kept_E.sum() / max(1, A) if tail else 1.0 - order_S.numel() / max(1, A)
        slot_NK, experts_NK = slots.slot_NK, experts_NK.detach()

        def assign():  # kept: a slot; on the sync-free path the dropped ones sit after all kept slots
            token_M, choice_M = (slot_NK < kept_E.sum() if tail else slot_NK >= 0).nonzero(as_tuple=True)
            return token_M, experts_NK[token_M, choice_M]

        return y_ND, counts_E, experts_NK[:, 0], dropped, assign

    def _expert_choice(self, x_ND: torch.Tensor, probs_NE: torch.Tensor, cap: int):
        N, E = probs_NE.shape
        gates_EC, token_EC = probs_NE.t().topk(cap, dim=1)  # each expert's most confident tokens
        counts_E = torch.full((E,), cap, dtype=torch.long, device=probs_NE.device)
        # index_fill_, not `served[idx] = True`: that copies the True from the host (not allowed in a CUDA graph)
        served = torch.zeros(N, dtype=torch.bool, device=probs_NE.device).index_fill_(0, token_EC.reshape(-1), True)
        dropped = 1.0 - served.float().mean() if N else 0.0  # tokens no expert took (no host sync)
        pad = self._slot_padding(x_ND, cap)  # padding slots read token 0 with gate 0: nothing, forward or back
        if pad:
            gates_EC, token_EC = F.pad(gates_EC, (0, pad)), F.pad(token_EC, (0, pad))
        token_P, gate_P = token_EC.reshape(-1), gates_EC.reshape(-1)
        # a token may be taken by any number of experts, so combine scatter-adds
        h_PD = self.experts(x_ND.index_select(0, token_P), counts_E + pad, capacity=cap + pad)
        h_PD = h_PD * gate_P.unsqueeze(1).to(h_PD.dtype)
        y_ND = torch.zeros_like(x_ND, dtype=h_PD.dtype).index_add_(0, token_P, h_PD)
        picks_EC = token_EC[:, :cap].detach()

        def assign():
            return picks_EC.reshape(-1), torch.arange(E, device=picks_EC.device).repeat_interleave(cap)

        return y_ND, counts_E, probs_NE.argmax(-1), dropped, assign

    def _slot_padding(self, x: torch.Tensor, cap: int) -> int:
        """Expert choice: the slots added to each expert's `cap` to reach the experts' alignment."""
        return -cap % self.experts.align(x)

    def sync_free(self, x: torch.Tensor) -> bool:
        """Whether a call on x without a token mask reads nothing back to the host (what a CUDA graph needs)."""
        N = x.reshape(-1, x.shape[-1]).shape[0]
        cap = self.capacity(N)
        if self.routing == "expert_choice":
            pad = self._slot_padding(x, cap)
            return self.experts.sync_free(x, cap + pad, self.cfg.num_experts * (cap + pad))
        return self.experts.sync_free(x, cap, N * self.cfg.top_k)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        graph = self.__dict__.get("_cuda_graph")  # see cuda_graphs.capture
        if graph is not None and graph.accepts(self, x, token_mask):
            y, aux = graph(x)
        else:
            y, aux = self.eager_forward(x, token_mask)
        self.last_aux = aux.detach()
        return y, aux

    def eager_forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        keep_N = None
        if token_mask is not None:
            keep_N = token_mask.reshape(-1).nonzero().squeeze(1)
            x_ND = x_ND.index_select(0, keep_N)
        N = x_ND.shape[0]

        if self.routing == "expert_choice":
            logits_NE, probs_NE = self.route(x_ND)
            y_ND, counts_E, top1_N, dropped, assign = self._expert_choice(x_ND, probs_NE, self.capacity(N))
        else:
            sink = GradSink()
            logits_NE, probs_NE = self.route(x_ND, sink)
            y_ND, counts_E, top1_N, dropped, assign = self._token_choice(x_ND, probs_NE, self.capacity(N), sink)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)[0].to(y_ND.dtype)

        if keep_N is not None:
            y = torch.zeros(shape[:-1].numel(), shape[-1], dtype=y_ND.dtype, device=x.device)
            y = y.index_copy(0, keep_N, y_ND)
        else:
            y = y_ND
        return y.reshape(shape).to(x.dtype), self._aux(logits_NE, probs_NE, top1_N, counts_E, dropped, assign)

    def _aux(self, logits_NE, probs_NE, top1_N, counts_E, dropped: float | torch.Tensor, assign=None) -> MoEAux:
        # with top-1 token choice the routed counts are the first choices' counts: no second count
        top1_E = counts_E if self.routing == "topk" and self.cfg.top_k == 1 else None
        if probs_NE.shape[0] == 0:  # nothing routed: every term 0 (still in the graph), nothing dropped
            zero = probs_NE.sum()
            return MoEAux(self.tower, self.block, counts_E.detach(), top1_N.detach(), zero.detach(), assign=assign,
                          routing=self.routing, balance_loss=zero, z_loss=zero, entropy=zero, marginal_entropy=zero)
        if not torch.is_tensor(dropped):  # new_full: no host-to-device copy, which would wait for the GPU
            dropped = probs_NE.new_full((), dropped)
        return MoEAux(self.tower, self.block, counts_E.detach(), top1_N.detach(), dropped, logits_NE, probs_NE,
                      top1_E, assign, self.routing)


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) occurrences of 0..n-1 in `ids`. Not torch.bincount: on CUDA that reads max(ids) back to the host,
    and every such read makes the CPU wait for the GPU instead of queueing the next kernels."""
    ids = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


class _RouterLogits(torch.autograd.Function):
    """The CPU router's fp32 logits W x^T as an (E, N) tensor, for x in fp32, bf16 or fp16. Low-precision x is
    multiplied by blocks of rows: the same numbers as F.linear(x.float(), W.float()), without an (N, D) fp32
    copy of x. With E = 8 the product is a few MFLOPs and such copies were all of its cost (4,096 tokens: router
    forward + backward 7.5 -> 5.6 ms; 16,384: 37 -> 21 ms, on 2 cores).

    The backward gives a bf16 x its gradient as autocast's backward of a bf16 linear computes it (bf16 operands,
    fp32 sums, rounded once) and, with an armed `sink`, adds it into Dispatch's in place: one bf16 addmm, 0.27 ms
    at 4,096 x 512, against 0.80 for an fp32 product, its rounding to bf16 and autograd's sum of the two
    gradients. fp16 x keeps fp32 maths (a small logit gradient could underflow in fp16 operands). The weight's
    gradient is fp32 maths."""

    BLOCK = 512  # rows: a 512 x 512 fp32 block (1 MiB) stays in cache
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)

    @staticmethod
    def forward(ctx, x_ND, w_ED, sink: Optional[GradSink] = None):
        w_ED32 = w_ED.float()
        if x_ND.dtype == torch.float32:  # (N, E) then transposed: 0.29 + 0.02 ms against 0.44 for W x^T directly
            logits_EN = torch.mm(x_ND, w_ED32.t()).t().contiguous()
        else:  # here the (E, b) products by block are faster: 0.46 ms against 0.65 for (b, E) ones
            logits_EN = x_ND.new_empty(w_ED.shape[0], x_ND.shape[0], dtype=torch.float32)
            for l_Eb, x_bD in zip(logits_EN.split(_RouterLogits.BLOCK, dim=1), x_ND.split(_RouterLogits.BLOCK)):
                l_Eb.copy_(torch.mm(w_ED32, x_bD.float().t()))
        ctx.save_for_backward(x_ND, w_ED)
        ctx.sink = sink
        return logits_EN

    @staticmethod
    @first_order
    def backward(ctx, g_EN):
        x_ND, w_ED = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        into_ND = ctx.sink.take() if ctx.sink is not None else None  # Dispatch's gradient of x, if any
        g_EN, w_ED32 = g_EN.contiguous(), w_ED.float()
        gx_ND = gw_ED = None
        B = _RouterLogits.BLOCK
        if need_x and x_ND.dtype == torch.float16:
            gx_ND = torch.empty_like(x_ND)
            for g_Eb, gx_bD in zip(g_EN.split(B, dim=1), gx_ND.split(B)):
                gx_bD.copy_(torch.mm(g_Eb.t(), w_ED32))
            gx_ND = gx_ND if into_ND is None else into_ND.add_(gx_ND)
        elif need_x:
            g_NE, w = g_EN.t().to(x_ND.dtype), w_ED.to(x_ND.dtype)
            gx_ND = torch.mm(g_NE, w) if into_ND is None else into_ND.addmm_(g_NE, w)
        if need_w and x_ND.dtype == torch.float32:
            gw_ED = torch.mm(g_EN, x_ND)
        elif need_w:
            gw_ED = torch.zeros_like(w_ED32)
            for g_Eb, x_bD in zip(g_EN.split(B, dim=1), x_ND.split(B)):
                gw_ED.addmm_(g_Eb, x_bD.float())
        return gx_ND, None if gw_ED is None else gw_ED.to(w_ED.dtype), None


def moe_report(output) -> list[dict]:
    """Per MoE layer of a forward (a CLIPOutput or a list of MoEAux): tower, block, tokens per expert,
    fraction dropped, router entropy, balance and z loss, as plain Python numbers.

    Given a model instead, each of its MoE layers' last call, which also covers `encode_image` /
    `encode_text` (after `encode_text` alone, the image layers' entries are of their own last call)."""
    if isinstance(output, nn.Module):
        aux = [m.last_aux for m in output.modules() if isinstance(m, MoE) and m.last_aux is not None]
    else:
        aux = getattr(output, "aux", output)
    return [{
        "tower": a.tower,
        "block": a.block,
        "tokens_per_expert": a.tokens_per_expert.tolist(),
        "dropped_fraction": a.dropped_fraction.item(),
        "entropy": a.entropy.detach().item(),
        "balance_loss": a.balance_loss.detach().item(),
        "z_loss": a.z_loss.detach().item(),
    } for a in aux]
