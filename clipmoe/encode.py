"""Embeddings for applications: `encode_text(texts, model=...)` and `encode_image(images, model=...)`.

L2-normalised float32 rows, one per input, in input order, computed in batches. A model given by path
is loaded once and cached (keyed by path, modification time and device).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Generator, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import resume
from .architectures import canonical_name, list_architectures
from .checkpoint import load, not_a_model_file
from .device import check_model_device, resolve_device
from .errors import ClipmoeError, first_line
from .factory import create_transforms, get_tokenizer
from .model import CLIP

ModelRef = Union[str, Path, CLIP]


@lru_cache(maxsize=4)
def _cached_model(path: str, mtime_ns: int, device: str) -> CLIP:
    if Path(path).name == "state.pt":  # a training checkpoint's
        return resume.load_model(path).to(device)
    return load(path, device=device)


def resolve_model(model: ModelRef, device: Optional[Union[str, torch.device]] = None) -> CLIP:
    """A CLIP model from a model or a `clipmoe.save` path (cached, loaded on `device`, default cpu). A given
    model is not moved: a `device` naming another place is an error."""
    if isinstance(model, CLIP):
        check_model_device(model, device)
        return model
    if not isinstance(model, (str, os.PathLike)):  # e.g. encode_text's arguments swapped: not pathlib's TypeError
        raise ClipmoeError(f"model: a CLIP model or a model file's path, not a {type(model).__name__}")
    path = Path(model).expanduser()
    dev = str(resolve_device(device)) if device is not None else "cpu"
    if (path / "state.pt").is_file():  # a training checkpoint's folder: its model, as of that step
        path = path / "state.pt"
    if path.is_dir():
        raise not_a_model_file(path)
    if not path.is_file():
        # a name, not weights: a model of random weights helps nobody here
        if canonical_name(str(model)) in list_architectures():
            raise ClipmoeError(f"{model} is an architecture, not a model file: clipmoe.create_model({str(model)!r}, "
                               f"pretrained=TAG_OR_FILE) gives one with weights (CLI: --model {model} --pretrained "
                               f"TAG_OR_FILE; clipmoe.list_pretrained() lists the tags)")
        raise ClipmoeError(f"model not found: {path}")
    return _cached_model(str(path.resolve()), path.stat().st_mtime_ns, dev)


def _device_of(model: CLIP) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_text(texts: Union[str, Sequence[str]], model: ModelRef, batch_size: int = 256,
                device: Optional[Union[str, torch.device]] = None, progress: bool = False) -> torch.Tensor:
    """Text embeddings (N, D), L2-normalised float32 on the CPU; `texts` taken literally. `progress`: a
    progress bar over the texts."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ClipmoeError(f"encode_text takes strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    clip = resolve_model(model, device)
    tokenizer = get_tokenizer(clip)
    batches = (tokenizer(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size))
    return _encode(batches, len(texts), clip, clip.encode_text, progress, "text")


@torch.no_grad()
def encode_image(images: Union[Iterable, torch.Tensor], model: ModelRef, batch_size: int = 64,
                 device: Optional[Union[str, torch.device]] = None, progress: bool = False) -> torch.Tensor:
    """Image embeddings (N, D), L2-normalised float32 on the CPU.

    `images`: PIL images, file paths, preprocessed (3, H, W) tensors, or one (N, 3, H, W) tensor; a single
    image, path or (3, H, W) tensor gives one row. `progress`: a progress bar over the images.
    """
    clip = resolve_model(model, device)
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise ClipmoeError(f"encode_image takes a (3, H, W) or (N, 3, H, W) tensor, "
                           f"not one of shape {tuple(images.shape)}")
    if not isinstance(images, Iterable):
        raise ClipmoeError(f"encode_image takes PIL images, paths or tensors, not {type(images).__name__}")
    items = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    _, eval_tf = create_transforms(clip.config)
    size = clip.config.vision.image_size
    for i, x in enumerate(items):
        if isinstance(x, torch.Tensor) and tuple(x.shape) != (3, size, size):
            raise ClipmoeError(f"image tensor {i} has shape {tuple(x.shape)}; the model takes preprocessed "
                               f"(3, {size}, {size}) tensors (clipmoe.create_transforms), or give PIL images or paths")

    def prepare(x) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else eval_tf(_open(x))

    return _encode(_prepared(items, batch_size, prepare), len(items), clip, clip.encode_image, progress, "img")


def _prepared(items: list, batch_size: int, prepare, threads: int = min(8, os.cpu_count() or 1)):
    """Batches of `prepare(item)`, made by `threads` threads one batch ahead of the model: PIL decodes and resizes
    without the GIL, and on a GPU one thread's decoding takes far longer than the forward."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if all(isinstance(x, torch.Tensor) for x in items):  # nothing to decode
        yield from (torch.stack(chunk) for chunk in chunks)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        ahead = [pool.submit(prepare, x) for x in chunks[0]] if chunks else []
        for i in range(len(chunks)):
            current = ahead
            ahead = [pool.submit(prepare, x) for x in chunks[i + 1]] if i + 1 < len(chunks) else []
            yield torch.stack([f.result() for f in current])  # an item's error is raised here, in order
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _open(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, Path)):
        try:
            with Image.open(item) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            why = first_line(e, limit=300)
            raise ClipmoeError(f"cannot read image {item}: {why}") from None
    raise ClipmoeError(f"encode_image takes PIL images, paths or tensors, not {type(item).__name__}")


def _encode(batches: Generator[torch.Tensor, None, None], total: int, clip: CLIP, encode, progress: bool,
            unit: str) -> torch.Tensor:
    was_training = clip.training
    clip.eval()  # eval capacity and no dropout, whatever the caller's mode
    device = _device_of(clip)
    out, bar = [], None
    try:
        for batch in batches:
            features = encode(batch.to(device))
            out.append(F.normalize(features.float(), dim=-1).cpu())
            # made after the first batch: an input that fails at once is one error line, not a bar and an error
            if bar is None:
                bar = tqdm(total=total, desc="encode", unit=unit, disable=not progress)
            bar.update(len(out[-1]))
    finally:
        batches.close()  # an image batch's threads stop at once, also when the model fails
        clip.train(was_training)
        if bar is not None:
            bar.close()
    if not out:
        return torch.zeros(0, clip.config.embed_dim)
    return torch.cat(out)
