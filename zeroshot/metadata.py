"""Class names and prompt templates of the standard zero-shot benchmarks, and the files users add.

The shipped data (`zeroshot/data/`) are the names and templates CLIP_benchmark evaluates with, so numbers
are comparable with published CLIP/OpenCLIP/DataComp tables; see `data/README.md` for where each comes
from. Templates use `{c}` for the class name, as CLIP_benchmark's files do.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Union

# Benchmarks we can open but whose class names come from the local copy (their published lists are in
# the dataset files, e.g. CLIP_benchmark's WebDataset export or ObjectNet's mappings/ folder).
NAMES_FROM_DATA = ("objectnet", "wilds/iwildcam", "dollar_street", "geode")
RETRIEVAL = ("flickr30k", "flickr8k", "mscoco_captions")

# Other spellings people use (DataComp task names, CLIP_benchmark prefixes) -> our key.
_ALIASES = {"imagenet": "imagenet1k", "imagenet-1k": "imagenet1k", "vtab/caltech101": "caltech101_vtab",
            "imagenet-sketch": "imagenet_sketch", "imagenet-v2": "imagenetv2", "flowers102": "flowers",
            "oxford_pets": "pets", "stanford_cars": "cars", "kitti": "kitti_closest_vehicle_distance",
            "clevr_count": "clevr_count_all", "fmow": "wilds/fmow", "camelyon17": "wilds/camelyon17",
            "iwildcam": "wilds/iwildcam", "mscoco": "mscoco_captions", "coco": "mscoco_captions",
            "hatefulmemes": "hateful_memes", "hateful-memes": "hateful_memes", "ucf-101": "ucf101"}


class UnknownDataset(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@lru_cache(maxsize=None)
def _load(name: str) -> dict:
    return json.loads(resources.files("zeroshot").joinpath("data", name).read_text(encoding="utf-8"))


def canonical_name(name: str) -> str:
    """Our key for a dataset name: CLIP_benchmark's `wds/`, `vtab/` and `tfds/` prefixes and a few common
    aliases are accepted (`wds/vtab/cifar10` -> `cifar10`, `wds/wilds/fmow` -> `wilds/fmow`)."""
    key = name.strip().lower().replace("wds_", "wds/")
    if key.startswith("wds/"):
        key = key[4:].replace("wilds-", "wilds/").replace("vtab-", "vtab/")
    if key in _ALIASES:
        return _ALIASES[key]
    if key.startswith(("vtab/", "tfds/")):
        key = key.split("/", 1)[1]
    return _ALIASES.get(key, key)


def list_datasets(task: str | None = None) -> list[str]:
    """Every benchmark name we know: `task="classification"` (shipped metadata or names from the data),
    `"retrieval"`, or both (None)."""
    classification = sorted(set(_load("classnames.json")) | set(NAMES_FROM_DATA))
    if task == "classification":
        return classification
    return list(RETRIEVAL) if task == "retrieval" else classification + list(RETRIEVAL)


def classnames(name: str) -> list[str]:
    """The class names of a benchmark, in label order."""
    key = canonical_name(name)
    table = _load("classnames.json")
    if key in table:
        return list(table[key])
    if key in NAMES_FROM_DATA:
        raise UnknownDataset(f"{name}: its class names come with the dataset files (classnames.txt of the "
                             "CLIP_benchmark WebDataset export); open it with zeroshot.open_dataset")
    raise UnknownDataset(f"unknown dataset {name!r}; known: {', '.join(list_datasets('classification'))}")


def templates(name: str) -> list[str]:
    """The prompt templates of a benchmark (`{c}` marks the class name); like CLIP_benchmark, datasets
    without their own use ImageNet's 80 OpenAI templates."""
    key = canonical_name(name)
    table = _load("templates.json")
    if key in table:
        return list(table[key])
    if key in NAMES_FROM_DATA:
        return list(table["imagenet1k"])
    raise UnknownDataset(f"unknown dataset {name!r}; known: {', '.join(list_datasets('classification'))}")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in label order (the sorted folder names of the train/val tree)."""
    return resources.files("timm").joinpath("data", "_info", "imagenet_synsets.txt").read_text().split()


def read_classnames(path: Union[str, Path], keep_blank: bool = False) -> list[str]:
    """Class names from a file: one per line (`classnames.txt`) or a JSON list. Blank lines are ignored
    unless `keep_blank` (CLIP_benchmark's exports keep them: CLEVR's distance classes include "")."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{path}: expected a JSON list of class names")
        return names
    names = [line.strip() for line in text.splitlines() if keep_blank or line.strip()]
    if not any(names):
        raise ValueError(f"{path}: no class names")
    return names


def read_templates(path: Union[str, Path]) -> Union[list[str], dict[str, list[str]]]:
    """Templates from a file: one per line (`{c}` or `{}` marks the class), a JSON list, or a JSON dict
    class name -> its own prompts (CuPL-style per-class prompt lists)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        value = json.loads(text)
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return _checked_templates(path, value)
        if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
            return {str(k): [str(p) for p in v] for k, v in value.items()}
        raise ValueError(f"{path}: expected a JSON list of templates or a dict class -> prompts")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no templates")
    return _checked_templates(path, lines)


def _checked_templates(path: Path, templates: list[str]) -> list[str]:
    """Each template must take the class name at `{c}` or `{}` (and have no other `{...}` field, which would
    fail at the first class, or mislead quietly)."""
    for t in templates:
        if "{c}" in t:
            continue
        try:
            filled = t.format("\0")
        except (IndexError, KeyError, ValueError):
            filled = None
        if filled is None or "\0" not in filled:
            raise ValueError(f"{path}: template {t!r} has no {{c}} (or {{}}) where the class name goes")
    return templates
