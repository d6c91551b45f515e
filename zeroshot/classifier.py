"""Zero-shot classifiers from class names and prompt templates (Radford et al. 2021): per class, the
mean of the L2-normalised template embeddings, renormalised."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]


def fill(template: Template, classname: str) -> str:
    """A prompt from a template: a callable, or a string with `{c}` (CLIP_benchmark) or `{}`."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                     classnames: Sequence[str], templates: Union[Sequence[Template], dict[str, Sequence[str]]],
                     batch_size: int = 1024, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Returns class weights (D, C) for `logits = image_features @ weights`.

    Args:
        encode_text: tokens (B, L) -> features (B, D); normalised or not.
        tokenizer: list of str -> tokens (B, L).
        classnames: the C class names.
        templates: templates shared by all classes, or a dict class name -> its own prompts (CuPL).
        batch_size: prompts per encode call, across classes.
    """
    if isinstance(templates, dict):
        prompts = [list(templates[c]) for c in classnames]
    else:
        prompts = [[fill(t, c) for t in templates] for c in classnames]
    flat = [p for ps in prompts for p in ps]
    if not flat:
        raise ValueError("no prompts: give at least one class name and one template")
    chunks = []
    for i in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[i:i + batch_size])
        chunks.append(F.normalize(encode_text(tokens.to(device) if device else tokens).float(), dim=-1))
    emb = torch.cat(chunks)
    weights, start = [], 0
    for ps in prompts:
        weights.append(F.normalize(emb[start:start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    return torch.stack(weights, dim=1)
