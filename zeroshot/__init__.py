"""Zero-shot classification and retrieval. A leaf package: it takes encode functions and a tokenizer
and never imports clipmoe."""
from .classifier import build_classifier, fill
from .metrics import classification_metrics, mean_per_class_recall, topk_accuracy

__all__ = ["build_classifier", "classification_metrics", "fill", "mean_per_class_recall", "topk_accuracy"]
