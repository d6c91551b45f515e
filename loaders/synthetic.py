"""Procedural image-caption data for the quickstart and tests: scenes of 1-3 coloured shapes in one
region of a coloured, cluttered background, captioned in varied sentences that mention some of their
attributes (colour, shape, count, position, background).

Deterministic given the seed: sample i of split s depends only on (seed, s, i).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 190), "orange": (250, 140, 20), "cyan": (40, 210, 220), "pink": (250, 130, 190),
}
BACKGROUNDS = {
    "white": (232, 232, 228), "black": (28, 28, 30), "grey": (128, 128, 128), "brown": (120, 78, 40),
    "navy": (22, 32, 92), "olive": (104, 112, 42),
}
SHAPES = ["circle", "square", "triangle", "cross", "star", "ring", "diamond", "bar"]
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
COUNTS = [1, 2, 3]
ATTRIBUTES = {"colour": list(COLOURS), "shape": SHAPES, "count": [str(c) for c in COUNTS],
              "position": list(POSITIONS), "background": list(BACKGROUNDS)}

_NUMBER = {1: ["one", "a single", "1"], 2: ["two", "a pair of", "2"], 3: ["three", "3"]}
_WHERE = {
    "left": ["on the left", "at the left side", "in the left half"],
    "right": ["on the right", "at the right side", "in the right half"],
    "top": ["at the top", "near the top edge", "in the upper half"],
    "bottom": ["at the bottom", "near the bottom edge", "in the lower half"],
}
_PLURAL = {"cross": "crosses"}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    position: str
    background: str

    def attributes(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "count": str(self.count), "position": self.position,
                "background": self.background}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else _PLURAL.get(shape, shape + "s")


def _polygon(cx, cy, r, n, rot=0.0, inner=None):
    pts = []
    for i in range(n * (2 if inner else 1)):
        a = rot + math.pi * 2 * i / (n * (2 if inner else 1))
        rr = inner if inner and i % 2 else r
        pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
    return pts


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 2.5)))
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r * 1.15, 5, inner=r * 0.48), fill=fill)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r * 1.15, 4), fill=fill)
    elif shape == "bar":
        d.rectangle([cx - r * 1.1, cy - r * 0.4, cx + r * 1.1, cy + r * 0.4], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    bg = [min(255, max(0, c + rng.randint(-14, 14))) for c in BACKGROUNDS[scene.background]]
    img = Image.new("RGB", (size, size), tuple(bg))
    d = ImageDraw.Draw(img)
    for _ in range(6):  # faint clutter so the background is not a constant
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        shift = rng.randint(-22, 22)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=tuple(min(255, max(0, c + shift)) for c in bg))
    px, py = POSITIONS[scene.position]
    r = size * (0.13 if scene.count > 1 else 0.18) * rng.uniform(0.85, 1.15)
    # Objects sit side by side along the region's long axis (vertical for left/right).
    vertical = scene.position in ("left", "right")
    step = 2.2 * r
    offsets = [(i - (scene.count - 1) / 2) * step for i in range(scene.count)]
    base = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    for off in offsets:
        jx, jy = rng.uniform(-2, 2), rng.uniform(-2, 2)
        cx = px * size + (0 if vertical else off) + jx
        cy = py * size + (off if vertical else 0) + jy
        _draw_shape(d, scene.shape, cx, cy, r, base)
    return img.filter(ImageFilter.GaussianBlur(0.4))


def caption(scene: Scene, rng: random.Random) -> str:
    """One of many sentence forms, mentioning at least two of the scene's attributes."""
    n = scene.count
    num = rng.choice(_NUMBER[n])
    shape = plural(scene.shape, n)
    where = rng.choice(_WHERE[scene.position])
    colour = scene.colour
    # Most captions name all four attributes (in varied words and orders), so in-batch negatives
    # differ in any of them; the rest name a subset, as real alt-text does.
    full = [
        f"{num} {colour} {shape} {where}",
        f"a picture of {num} {shape}, coloured {colour}, {where}.",
        f"{where}, {'there is' if n == 1 else 'there are'} {num} {colour} {shape}.",
        f"{num} {shape} {where}. {'it is' if n == 1 else 'they are'} {colour}.",
        f"an image showing {num} {colour} {shape} {where}",
        f"{colour} {plural(scene.shape)}: {n} of them, {where}",
        f"{where} you can see {num} {shape} in {colour}",
    ]
    partial = [
        f"a {colour} {scene.shape}" if n == 1 else f"some {colour} {shape}",
        f"{colour} {shape}",
        f"a drawing of a {scene.shape}" if n == 1 else f"a drawing of {num} {shape}",
        f"{num} {shape}, {where}",
        f"something {colour} {where}",
    ]
    forms = full if rng.random() < 0.7 else partial
    text = rng.choice(forms)
    if rng.random() < 0.7:
        bg, text = scene.background, text.rstrip(".")
        a = article(bg)
        text = rng.choice([f"{text}, on {a} {bg} background", f"on {a} {bg} background: {text}",
                           f"{text} against {a} {bg} backdrop", f"{text}; the background is {bg}"])
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def scenes(num: int, seed: int, split: str = "train", image_size: int = 64) -> Iterator[dict]:
    """`num` samples as dicts (`key`, `image`, `caption`, `meta` with the attributes)."""
    for i in range(num):
        rng = random.Random(f"{seed}/{split}/{i}")
        scene = Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(COUNTS), rng.choice(list(POSITIONS)),
                      rng.choice(list(BACKGROUNDS)))
        yield {
            "key": f"{split}{i:07d}",
            "image": render(scene, rng, image_size),
            "caption": caption(scene, rng),
            "meta": scene.attributes(),
        }
