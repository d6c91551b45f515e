"""Zero-shot classification and retrieval. A leaf package: it takes encode functions and a tokenizer
and never imports clipmoe."""
from .classifier import build_classifier, fill, fingerprint
from .datasets import DatasetNotFound, EvalDataset, open_dataset
from .evaluate import evaluate
from .metadata import (
                       UnknownDataset,
                       canonical_name,
                       classnames,
                       list_datasets,
                       read_classnames,
                       read_templates,
                       templates,
)
from .metrics import (
                       average_precision,
                       classification_metrics,
                       mean_per_class_recall,
                       multilabel_metrics,
                       retrieval_metrics,
                       topk_accuracy,
)

__all__ = ["DatasetNotFound", "EvalDataset", "UnknownDataset", "average_precision", "build_classifier",
           "canonical_name", "classification_metrics", "classnames", "evaluate", "fill", "fingerprint",
           "list_datasets", "mean_per_class_recall", "multilabel_metrics", "open_dataset", "read_classnames",
           "read_templates", "retrieval_metrics", "templates", "topk_accuracy"]
