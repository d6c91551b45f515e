"""The training image transform on a fast path: open_clip's RandomResizedCrop (scale 0.9-1, ratio 3/4-4/3,
bicubic, antialiased) as a crop view plus torch's uint8 antialiased bicubic resize (within one grey level
of PIL's, about twice as fast on one thread), and a uint8 output that the trainer normalises on its
device. The per-sample work in the workers is then decode + one resize."""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
             rng=random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (same distribution, same fallback), drawn from `rng`
    (a `random.Random`, or the `random` module itself)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


class TrainTransform:
    """PIL image -> (3, size, size) tensor: a random resized crop (bicubic, antialiased like PIL's resize).

    `normalize=False` (the fast path) returns uint8; `normalize_batch` turns a batch of those into what
    open_clip's Normalize gives, on any device. `normalize=True` returns the normalised float tensor here.
    Draws come from the `rng` of the call (the loader passes one per sample, seeded by its position in the
    data, so that a resumed run crops as the first run did), else this transform's own (`seed`), else
    Python's `random` (seeded per worker by the DataLoader).
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD, normalize: bool = False,
                 seed: Optional[int] = None):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.mean, self.std, self.normalize = tuple(mean), tuple(std), normalize
        self.rng = random.Random(seed) if seed is not None else None  # None: the random module (per-worker seeded)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        left, top, right, bottom = crop_box(img.width, img.height, self.scale, self.ratio, rng or self.rng or random)
        hwc = torch.from_numpy(np.array(img))[top:bottom, left:right]
        x = F.interpolate(hwc.permute(2, 0, 1).unsqueeze(0), size=(self.size, self.size), mode="bicubic",
                          antialias=True, align_corners=False)[0]
        return normalize_batch(x, self.mean, self.std) if self.normalize else x

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"normalize={self.normalize})")


def normalize_batch(x: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN,
                    std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 (x / 255 - mean) / std; float input passes through."""
    if x.dtype != torch.uint8:
        return x
    shape = (3, 1, 1)
    scale = torch.tensor([1 / (255 * s) for s in std], device=x.device).view(shape)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=x.device).view(shape)
    return x.float().mul_(scale).add_(shift)
