"""Validation on held-out image-text shards (open_clip's `--val-data`): the loss training minimises, and
image<->text retrieval recall@k among all the held-out pairs."""
from __future__ import annotations

from typing import Optional, Union

import torch
from tqdm.auto import tqdm

import loaders
import zeroshot

from .encode import ModelRef, resolve_model
from .errors import ClipmoeError
from .factory import create_transforms, get_tokenizer
from .loss import batch_loss


@torch.no_grad()
def validate(model: ModelRef, urls: Union[str, list], *, batch_size: int = 256, loss_kind: str = "softmax",
             precision: str = "fp32", num_workers: int = 0, max_samples: Optional[int] = None,
             caption_key: Union[str, list] = "txt", progress: bool = False) -> dict:
    """Metrics of `model` (in eval mode, on its device; or a `clipmoe.save` file or training checkpoint, loaded on
    the CPU) on the held-out shards `urls`.

    Returns `loss` (each batch's loss, as training computes it on one rank, averaged over samples: batches of
    `batch_size`, since the contrastive loss depends on how many negatives a batch holds), recall@1/5/10 both
    ways over all the pairs read (`image_retrieval_recall@k`: captions whose image ranks in the top k;
    `text_retrieval_recall@k`: images whose caption does), `num_samples` and `skipped` (the loader's counts of
    samples it could not read). `max_samples` stops after that many (whole batches). `caption_key`: as the loader's
    (a key.json field, or several drawn from per sample).
    """
    if loss_kind not in ("softmax", "sigmoid"):
        raise ClipmoeError(f"loss_kind must be 'softmax' or 'sigmoid', not {loss_kind!r}")
    model = resolve_model(model)
    if loss_kind == "sigmoid" and model.logit_bias is None:
        raise ClipmoeError("the sigmoid loss needs a model with a logit bias, and this one has none: validate it "
                           "with the softmax loss")
    device = next(model.parameters()).device
    _, transform = create_transforms(model.config)
    # a reader per shard at most: epoch mode refuses workers that would have no shard
    workers = min(num_workers, len(loaders.expand_shards(urls)))
    loader = loaders.image_text_loader(urls, batch_size=batch_size, transform=transform,
                                       tokenize=get_tokenizer(model), num_workers=workers, shuffle=False,
                                       drop_last=False, caption_key=caption_key)
    was_training = model.training  # after the loader, whose errors (missing shards) leave the model as it was
    model.eval()
    images, texts, loss_sum, n = [], [], 0.0, 0
    bar = tqdm(desc="validation", unit="img", disable=not progress)
    try:
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(batch["image"].to(device), batch["text"].to(device))
            image, text = out.image_features.float(), out.text_features.float()
            bias = None if out.logit_bias is None else out.logit_bias.float()
            loss_sum += batch_loss(image, text, out.logit_scale.float(), bias, loss_kind).item() * len(image)
            n += len(image)
            images.append(image.cpu())
            texts.append(text.cpu())
            bar.update(len(image))
            if max_samples is not None and n >= max_samples:
                break
    finally:
        bar.close()
        model.train(was_training)
    if not n:
        raise loaders.DataError(f"validation: no readable samples in {urls!r} ({loader.stats()['skipped']})")
    metrics = {"loss": loss_sum / n, **zeroshot.retrieval_metrics(torch.cat(images), torch.cat(texts), range(n))}
    return {**metrics, "num_samples": n, "skipped": dict(loader.stats()["skipped"])}
