"""Classification metrics as CLIP_benchmark computes them: top-k accuracy and mean per-class recall."""
from __future__ import annotations

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
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
    }
