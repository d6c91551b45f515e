"""Training losses: the CLIP contrastive loss (InfoNCE both ways) or SigLIP's sigmoid loss, gathered across
ranks with gradients, plus the MoE auxiliary terms weighted by the loss config (Switch balance, ST-MoE z-loss,
LIMoE's per-tower local and global entropy)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .config import LossConfig
from .errors import ClipmoeError
from .model import CLIPOutput
from .moe import MoEAux

SIGMOID_NEEDS_BIAS = ("loss.kind sigmoid needs a model with a logit bias, and this one (a saved model, or one given) "
                      "has none: build it with init_logit_bias=-10.0 (SigLIP's start; model.overrides in a run "
                      "config), or train it with the softmax loss")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """All ranks' rows of x, concatenated in rank order; each rank's gradient is the sum over ranks of the
    gradients of its rows. (torch.distributed.nn's all_gather does this, but it is deprecated, warns at every
    call, under torchrun at every step, and its successor is private.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        if dist.get_backend() == dist.Backend.NCCL:
            mine = g.new_empty((ctx.rows, *g.shape[1:]))
            # torch 2.14 deprecates reduce_scatter_tensor for reduce_scatter_single, which older torch lacks
            reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            reduce_scatter(mine, g.contiguous())
            return mine
        total = g.clone(memory_format=torch.contiguous_format)  # gloo has no reduce-scatter
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' features, concatenated in rank order. With grad, gradients flow to every rank."""
    rank, world = _world()
    if world == 1:
        return features
    if with_grad:
        return _AllGather.apply(features)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach())
    parts[rank] = features  # keep the local gradient path
    return torch.cat(parts, dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              local_loss: bool = True, gather_with_grad: bool = True) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the global batch.

    With `local_loss`, each rank scores its own rows against all columns (memory B_local x B_global);
    with `gather_with_grad` too, the rank-mean loss and DDP-averaged gradients equal the full batch's.
    """
    rank, world = _world()
    if world == 1:
        return batch_loss(image_features, text_features, logit_scale)
    scale = logit_scale.clamp(max=100.0)
    all_image = gather_features(image_features, gather_with_grad)
    all_text = gather_features(text_features, gather_with_grad)
    B = image_features.shape[0]
    if local_loss:
        logits_i = scale * image_features @ all_text.t()
        logits_t = scale * text_features @ all_image.t()
        labels = torch.arange(B, device=logits_i.device) + rank * B
    else:
        logits_i = scale * all_image @ all_text.t()
        logits_t = logits_i.t()
        labels = torch.arange(logits_i.shape[0], device=logits_i.device)
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


class _Exchange(torch.autograd.Function):
    """Rank r receives rank (r + h)'s tensor for each distance h in `distances` (and sends its own to rank r - h),
    point to point, all at once; the gradients travel back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, distances: tuple[int, ...]):
        ctx.distances = distances
        return _p2p([x] * len(distances), distances)

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros_like(g) if g is None else g for g in grads]
        return sum(_p2p(grads, tuple(-h for h in ctx.distances))), None


def _p2p(tensors: list[torch.Tensor], distances: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """tensors[i] sent to rank - distances[i]; what rank + distances[i] sent, received."""
    rank, world = _world()
    received = tuple(torch.empty_like(t) for t in tensors)
    ops = []
    for t, out, h in zip(tensors, received, distances):
        tag = h % world  # with 2 ranks the left and the right neighbour are the same rank
        ops += [dist.P2POp(dist.isend, t.contiguous(), (rank - h) % world, tag=tag),
                dist.P2POp(dist.irecv, out, (rank + h) % world, tag=tag)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def batch_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
               logit_bias: Optional[torch.Tensor] = None, kind: str = "softmax") -> torch.Tensor:
    """The loss of this batch alone, whatever the process group (validation on one rank): the contrastive loss
    (InfoNCE both ways) or, for `kind` "sigmoid", SigLIP's."""
    if kind == "sigmoid":
        return _pair_terms(image_features, text_features, logit_scale, logit_bias, 0) / image_features.shape[0]
    logits = logit_scale.clamp(max=100.0) * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _pair_terms(image_features: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, first_match: Optional[int]) -> torch.Tensor:
    """-sum log sigmoid(z (t x.y + b)) over the pairs of these images and texts: image i matches text
    first_match + i (none matches when None)."""
    logits = logit_scale * image_features @ texts.t() + logit_bias
    labels = -torch.ones_like(logits)
    if first_match is not None:
        labels.diagonal(first_match).fill_(1)
    return -F.logsigmoid(labels * logits).sum()


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, gather_with_grad: bool = True, dist_impl: str = "gather") -> torch.Tensor:
    """SigLIP's loss (Zhai et al. 2023): every image-text pair of the global batch is a binary problem,
    -sum_j log sigmoid(z_ij (t x_i.y_j + b)) with z = 1 for the matching pair and -1 otherwise, summed over
    the texts and averaged over the images. Each rank scores its own images against all ranks' texts, so the
    rank-mean loss and DDP-averaged gradients equal the full batch's.

    The other ranks' texts arrive by all-gather (`dist_impl` "gather", with gradients unless `gather_with_grad`
    is false) or, as with open_clip's default "bidir", point to point from the neighbours on both sides at
    once, nearest first, scored one B x B block at a time (always with gradients). Both give the same loss."""
    if dist_impl not in ("gather", "bidir"):
        raise ValueError(f"dist_impl {dist_impl!r}: expected 'gather' or 'bidir'")
    rank, world = _world()
    B = image_features.shape[0]
    if world == 1 or dist_impl == "gather":
        texts = gather_features(text_features, gather_with_grad) if world > 1 else text_features
        return _pair_terms(image_features, texts, logit_scale, logit_bias, first_match=rank * B) / B
    total = _pair_terms(image_features, text_features, logit_scale, logit_bias, first_match=0)
    # the W - 1 other ranks' texts, the nearest first, both directions at once: from the ranks at +-1, +-2, ...,
    # and for an even W the one opposite
    for h in range(1, world // 2 + 1):
        for texts in _Exchange.apply(text_features, (h,) if 2 * h == world else (h, -h)):
            total = total + _pair_terms(image_features, texts, logit_scale, logit_bias, first_match=None)
    return total / B


def entropy_terms(aux: list[MoEAux], tower: str, threshold: Optional[float] = None) -> dict[str, torch.Tensor]:
    """LIMoE's terms for one tower, summed over its MoE layers: local = mean_i H(p(.|x_i)) and global =
    max(0, threshold - H(mean_i p(.|x_i))), the threshold being log(num_experts) when None."""
    layers = [a for a in aux if a.tower == tower]
    if not layers:
        return {}
    local = torch.stack([a.entropy for a in layers]).sum()
    glob = torch.stack([
        F.relu((threshold if threshold is not None else math.log(a.tokens_per_expert.numel())) - a.marginal_entropy)
        for a in layers]).sum()
    return {f"{tower}_local_entropy": local, f"{tower}_global_entropy": glob}


def total_loss(output: CLIPOutput, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Named loss terms and their weighted sum under "loss". MoE terms are summed over layers."""
    if output.image_features is None or output.text_features is None:
        raise ClipmoeError("the contrastive loss needs both towers' features: call the model with images and tokens")
    image, text, scale = output.image_features.float(), output.text_features.float(), output.logit_scale.float()
    if cfg.kind == "sigmoid":
        if output.logit_bias is None:
            raise ClipmoeError(SIGMOID_NEEDS_BIAS)
        terms = {"contrastive": sigmoid_loss(image, text, scale, output.logit_bias.float(), cfg.gather_with_grad,
                                             cfg.dist_impl)}
    else:
        terms = {"contrastive": clip_loss(image, text, scale, cfg.local_loss, cfg.gather_with_grad)}
    loss = terms["contrastive"]
    if output.aux:
        # expert choice is balanced by construction (Zhou et al. 2022: no auxiliary loss); its layers' balance
        # terms stay in moe_report, out of the loss
        token_choice = [a.balance_loss for a in output.aux if a.routing == "topk"]
        if token_choice:
            terms["balance"] = torch.stack(token_choice).sum()
            loss = loss + cfg.balance_coef * terms["balance"]
        terms["z"] = torch.stack([a.z_loss for a in output.aux]).sum()
        loss = loss + cfg.z_coef * terms["z"]
        for tower, ecfg in (("image", cfg.image_entropy), ("text", cfg.text_entropy)):
            if ecfg.local_coef or ecfg.global_coef:
                e = entropy_terms(output.aux, tower, ecfg.global_threshold)
                if e:
                    terms.update(e)
                    loss = loss + ecfg.local_coef * e[f"{tower}_local_entropy"] \
                        + ecfg.global_coef * e[f"{tower}_global_entropy"]
    terms["loss"] = loss
    return terms
