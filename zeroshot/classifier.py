"""Zero-shot classifiers from class names and prompt templates (Radford et al. 2021): per class, the
mean of the L2-normalised template embeddings, renormalised."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]
Templates = Union[Sequence[Template], dict[str, Sequence[str]]]


def fill(template: Template, classname: str) -> str:
    """A prompt from a template: a callable, or a string with `{c}` (CLIP_benchmark) or `{}`."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


def prompts_for(classnames: Sequence[str], templates: Templates) -> list[list[str]]:
    """Per class, its prompts: every template filled with the name, or the class's own list (CuPL)."""
    if isinstance(templates, dict):
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise ValueError(f"per-class prompts missing for {len(missing)} classes, e.g. {missing[0]!r}")
        prompts = [list(templates[c]) for c in classnames]
    else:
        prompts = [[fill(t, c) for t in templates] for c in classnames]
    empty = [c for c, ps in zip(classnames, prompts) if not ps]
    if empty and len(empty) < len(prompts):
        raise ValueError(f"class {empty[0]!r} has no prompts")
    return prompts


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes, dtypes, values): the cache key of its classifiers."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_path(cache_dir: Union[str, Path], model_key: str, classnames: Sequence[str], templates: Templates) -> Path:
    spec = {"model": model_key, "classnames": list(classnames),
            "templates": templates if isinstance(templates, dict) else [t if isinstance(t, str) else
                                                                        t("{c}") for t in templates]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"classifier-{digest}.pt"


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                     classnames: Sequence[str], templates: Templates, batch_size: int = 1024,
                     device: Union[str, torch.device, None] = None, cache_dir: Union[str, Path, None] = None,
                     model_key: Optional[str] = None, progress: bool = False) -> torch.Tensor:
    """Returns class weights (D, C), float32, for `logits = image_features @ weights`.

    Args:
        encode_text: tokens (B, L) -> features (B, D); normalised or not.
        tokenizer: list of str -> tokens (B, L), padded with 0.
        classnames: the C class names.
        templates: templates shared by all classes, or a dict class name -> its own prompts (CuPL).
        batch_size: prompts per encode call. Prompts of all classes are pooled, de-duplicated and sorted
            by token length, so an encoder that trims padding (clipmoe's does) runs each batch at the
            length of its longest prompt instead of the full context.
        cache_dir, model_key: with both, the classifier is stored under a key made of the model key
            (e.g. `fingerprint(model)`), the names and the templates, and read back next time.
    """
    if cache_dir is not None and not model_key:
        raise ValueError("a classifier cache needs model_key, e.g. zeroshot.fingerprint(model)")
    path = _cache_path(cache_dir, model_key, classnames, templates) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: rebuild and overwrite it
            pass
    prompts = prompts_for(classnames, templates)
    unique = list(dict.fromkeys(p for ps in prompts for p in ps))
    if not unique:
        raise ValueError("no prompts: give at least one class name and one template")
    tokens = tokenizer(unique)
    order = torch.argsort((tokens != 0).sum(dim=1), descending=True, stable=True)
    emb: Optional[torch.Tensor] = None
    batches = range(0, len(unique), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"classifier ({len(unique)} prompts)", unit="batch")
    for i in batches:
        idx = order[i:i + batch_size]
        out = F.normalize(encode_text(tokens[idx].to(device) if device else tokens[idx]).float(), dim=-1).cpu()
        if emb is None:
            emb = torch.empty(len(unique), out.shape[1])
        emb[idx] = out
    row = {p: i for i, p in enumerate(unique)}
    weights = torch.stack([F.normalize(emb[[row[p] for p in ps]].mean(0), dim=-1) for ps in prompts], dim=1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing a cache never clash
        torch.save(weights, tmp)
        tmp.replace(path)
    return weights
