"""Metrics as CLIP_benchmark computes them: top-k accuracy, mean per-class recall, mean average
precision (multi-label VOC) and retrieval recall@k."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return hits.float().mean().item()


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean over the classes present in `labels` of the fraction of their samples predicted right."""
    num_classes = num_classes or logits.shape[1]
    pred = logits.argmax(dim=1)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).float()
    support = torch.bincount(labels, minlength=num_classes).float()
    present = support > 0
    return (correct[present] / support[present]).mean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """top1, top5 (None below 5 classes, where CLIP_benchmark reports NaN) and mean per-class recall."""
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5) if logits.shape[1] >= 5 else None,
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
    }


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per column (class): the mean, over the positives (target 1), of the precision at their rank when
    rows are sorted by score. Targets other than 1 (VOC's 0 'difficult' and -1) count as negatives, as in
    CLIP_benchmark. Columns without positives give NaN."""
    order = scores.argsort(dim=0, descending=True, stable=True)
    pos = (targets.gather(0, order) == 1).float()
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float32).unsqueeze(1)
    precision = pos.cumsum(0) / ranks
    n_pos = pos.sum(0)
    return (precision * pos).sum(0) / n_pos.where(n_pos > 0, torch.tensor(float("nan")))


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    ap = average_precision(scores, targets)
    valid = ap[~ap.isnan()]
    return {"mean_average_precision": valid.mean().item() if len(valid) else math.nan}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict:
    """Recall@k both ways, as CLIP_benchmark defines them.

    `text_to_image[j]` is the image of caption j (images may have several captions).
    `image_retrieval_recall@k`: fraction of captions whose image is among the k images closest to them.
    `text_retrieval_recall@k`: fraction of images with at least one of their captions among the k closest
    captions. Scored `chunk` rows at a time: memory chunk x max(T, I), not T x I."""
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    images, texts = image_features.float(), text_features.float()
    top = max(ks)
    top_images = torch.cat([(texts[i:i + chunk] @ images.T).topk(min(top, len(images)), dim=1).indices
                            for i in range(0, len(texts), chunk)])  # (T, top), nearest first
    top_texts = torch.cat([(images[i:i + chunk] @ texts.T).topk(min(top, len(texts)), dim=1).indices
                           for i in range(0, len(images), chunk)])  # (I, top)
    own = torch.arange(len(images)).unsqueeze(1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (top_images[:, :k] == t2i.unsqueeze(1)).any(1).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (t2i[top_texts[:, :k]] == own).any(1).float().mean().item()
    return out
