"""Evaluating an encoder pair on a benchmark: zero-shot classification (top-1/top-5/mean per-class
recall, or mAP for multi-label sets) and image-text retrieval (recall@k both ways)."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from loaders import leave_signals_to_the_parent, started

from .classifier import build_classifier
from .datasets import EvalDataset, Unreadable, collate
from .metrics import classification_metrics, multilabel_metrics, retrieval_metrics


def _loader(ds: EvalDataset, batch_size: int, num_workers: int) -> DataLoader:
    # in order, nothing dropped; a WebDataset export is split by shard across workers, which leave the job's
    # signals to the process that evaluates (during training: it stops and writes a checkpoint)
    return DataLoader(ds.data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      shuffle=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=leave_signals_to_the_parent)


def _bar(enabled: bool, desc: str, total: Optional[int]):
    """A bar counted in images (a loader yields batches; `total` is the dataset's size, None if unknown)."""
    from tqdm.auto import tqdm
    return tqdm(desc=desc, unit="img", total=total, disable=not enabled)


@torch.no_grad()
def evaluate(ds: EvalDataset, encode_image: Callable[[torch.Tensor], torch.Tensor],
             encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, *, batch_size: int = 64,
             num_workers: int = 0, device: Union[str, torch.device, None] = None,
             cache_dir=None, model_key: Optional[str] = None, progress: bool = True) -> dict:
    """Metrics of one benchmark. Returns a dict with `dataset`, `task`, `metrics`, `num_samples`,
    `num_unreadable` (images that could not be read: left out, with their captions, and named in a warning;
    `unreadable` lists the first of them) and, for classification, `num_classes` and the `templates` used."""
    loader = _loader(ds, batch_size, num_workers)
    to = (lambda x: x.to(device, non_blocking=True)) if device is not None else (lambda x: x)
    result = {"dataset": ds.name, "task": ds.task, "source": ds.source}
    unreadable: list[Unreadable] = []
    if ds.task == "retrieval":
        image_feats, text_feats, text_to_image = [], [], []
        seen = 0
        with _bar(progress, ds.name, ds.size) as bar:
            for images, captions in _readable(loader, bar, unreadable):
                image_feats.append(F.normalize(encode_image(to(images)).float(), dim=-1).cpu())
                flat = [c for caps in captions for c in caps]
                text_to_image += [seen + i for i, caps in enumerate(captions) for _ in caps]
                text_feats.append(F.normalize(encode_text(to(tokenizer(flat))).float(), dim=-1).cpu())
                seen += len(images)
                bar.update(len(images))
        _check_samples(ds, seen, unreadable, result)
        result["metrics"] = retrieval_metrics(torch.cat(image_feats), torch.cat(text_feats), text_to_image)
        result["num_samples"], result["num_texts"] = seen, len(text_to_image)
        return result

    weights = build_classifier(encode_text, tokenizer, ds.classnames, ds.templates, device=device,
                               cache_dir=cache_dir, model_key=model_key, progress=progress)
    w = to(weights)
    logits, targets = [], []
    with _bar(progress, ds.name, ds.size) as bar:
        for images, target in _readable(loader, bar, unreadable):
            _check_labels(ds, target)
            feats = F.normalize(encode_image(to(images)).float(), dim=-1)
            logits.append((100.0 * feats @ w).cpu())
            targets.append(target)
            bar.update(len(images))
    _check_samples(ds, sum(len(t) for t in targets), unreadable, result)
    logits_t, targets_t = torch.cat(logits), torch.cat(targets)
    if ds.task == "multilabel":
        result["metrics"] = multilabel_metrics(logits_t, targets_t)
    else:
        result["metrics"] = classification_metrics(logits_t, targets_t.long())
    result["num_samples"], result["num_classes"] = len(logits_t), len(ds.classnames)
    result["templates"] = ds.templates if isinstance(ds.templates, list) else "per-class prompts"
    return result


def _check_labels(ds: EvalDataset, target: torch.Tensor) -> None:
    """Labels that index no class name (a class names file of another label order, a shorter list): one error
    at the batch that shows it, not an IndexError in the metrics after the whole set."""
    n = len(ds.classnames)
    if ds.task == "multilabel":
        if target.shape[-1] != n:
            raise ValueError(f"{ds.name}: {target.shape[-1]} labels per image for {n} class names ({ds.source})")
        return
    outside = target[(target < 0) | (target >= n)]
    if len(outside):
        raise ValueError(f"{ds.name}: label {int(outside[0])} for {n} class names ({ds.source}): the class names "
                         "do not match the labels")


def _readable(loader: DataLoader, bar, unreadable: list[Unreadable]):
    """The loader's (images, targets) batches; its unreadable images go to `unreadable`, and on the bar."""
    for images, targets, broken in started(loader):
        unreadable += broken
        bar.update(len(broken))
        if images is not None:  # None: every image of the batch was unreadable
            yield images, targets


def _check_samples(ds: EvalDataset, seen: int, unreadable: list[Unreadable], result: dict) -> None:
    """Records the unreadable images in `result` and warns of them; no readable image at all is an error."""
    first = f"{unreadable[0].where}: {unreadable[0].why}" if unreadable else ""
    if not seen:
        raise ValueError(f"{ds.name}: no readable images ({len(unreadable)} unreadable, e.g. {first})" if unreadable
                         else f"{ds.name}: no samples")
    result["num_unreadable"] = len(unreadable)
    if unreadable:
        result["unreadable"] = [f"{u.where}: {u.why}" for u in unreadable[:20]]
        warnings.warn(f"{ds.name}: left out {len(unreadable)} unreadable image(s) of {seen + len(unreadable)} "
                      f"(e.g. {first}); the metrics are over the other {seen}", stacklevel=3)
