"""Gradient accumulation for a contrastive loss (open_clip's `--accum-freq`; GradCache, Gao et al. 2021): one
step's gradient over n micro-batches equals that of one batch of their total size, with the activations of one
micro-batch in memory.

Summing per-micro-batch losses would not do it: each micro-batch would only see its own negatives. Instead every
micro-batch is first embedded without gradients; then each is embedded again with gradients, and the loss over
all n micro-batches' features (the others' from the first pass, constants) is backpropagated. The contrastive
loss's gradient reaches each micro-batch's features once, so the n backward passes sum to the whole batch's
gradient. Terms that are not functions of all features (the logit scale's own gradient, the MoE layers'
auxiliary losses) are counted 1/n per pass. Each micro-batch's second pass draws the random numbers of its first
(router jitter), so that the features it recomputes are the ones the others were scored against.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from .loss import total_loss
from .model import CLIPOutput


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _counted_once_in(x, n: int):
    """`x` with the gradient it receives divided by n: the value of a term seen in all n passes, counted once."""
    return None if x is None else x.detach() + (x - x.detach()) / n


def accumulated_backward(forward: Callable[[int], CLIPOutput], n: int, loss_cfg, backward: Callable,
                         no_sync: Callable[[], ContextManager], device: torch.device
                         ) -> tuple[dict[str, torch.Tensor], list[CLIPOutput]]:
    """Backpropagates the loss of n micro-batches as one batch: `forward(j)` runs the model on micro-batch j (it is
    called twice for each), `backward(loss)` backpropagates one part, `no_sync()` holds back DDP's gradient
    all-reduce (all passes but the last). Returns the loss terms as training logs them (the contrastive loss of the
    whole batch; the auxiliary terms averaged over the micro-batches) and the outputs of the passes with gradients
    (their MoE reports)."""
    states, cached = [], []
    with torch.no_grad():
        for j in range(n):
            states.append(_rng_state(device))
            out = forward(j)
            cached.append((out.image_features, out.text_features))
    after = _rng_state(device)
    outputs, aux_sums, contrastive = [], {}, None
    for j in range(n):
        _set_rng_state(states[j], device)
        with no_sync() if j < n - 1 else contextlib.nullcontext():
            out = forward(j)
            images, texts = [c[0] for c in cached], [c[1] for c in cached]
            images[j], texts[j] = out.image_features, out.text_features
            whole = CLIPOutput(torch.cat(images), torch.cat(texts), _counted_once_in(out.logit_scale, n),
                               aux=out.aux, logit_bias=_counted_once_in(out.logit_bias, n))
            terms = total_loss(whole, loss_cfg)
            contrastive = terms.pop("contrastive")
            aux = terms.pop("loss") - contrastive  # the weighted sum of this micro-batch's auxiliary terms
            backward(contrastive + aux / n)
        outputs.append(out)
        for name, value in {"aux": aux, **terms}.items():
            aux_sums[name] = aux_sums.get(name, 0) + value.detach() / n
    _set_rng_state(after, device)
    aux = aux_sums.pop("aux")
    return {"contrastive": contrastive.detach(), **aux_sums, "loss": contrastive.detach() + aux}, outputs
