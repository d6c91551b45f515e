"""Opening benchmarks from local copies: torchvision's datasets, ImageFolder trees (the ImageNet family,
ObjectNet, any class-per-folder tree) and CLIP_benchmark's WebDataset export. Nothing is downloaded.

An image that cannot be read comes out as an `Unreadable` in its tensor's place: evaluation leaves it out and
counts it, so that one broken file does not cost the rest of a benchmark."""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from loaders.tarend import file_end_problem

from .metadata import (
    RETRIEVAL,
    canonical_name,
    classnames,
    imagenet_wnids,
    list_datasets,
    read_classnames,
    read_templates,
    templates,
)

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


class DatasetNotFound(FileNotFoundError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be read or decoded, in place of its tensor."""
    where: str  # a file path, or a shard and sample key
    why: str


# what PIL and the loaders raise for a broken, truncated or oversized image file
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _read_image(path: str):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except _IMAGE_ERRORS as e:
        return Unreadable(path, _why(e))


def _transformed(transform: Optional[Callable]) -> Callable:
    """`transform` for images; an Unreadable passes through."""
    return lambda x: x if isinstance(x, Unreadable) or transform is None else transform(x)


@dataclass
class EvalDataset:
    """A benchmark ready to evaluate: `data` yields (image tensor, target) where target is a class index
    (classification), a 0/1 vector (multilabel) or a list of captions (retrieval)."""
    name: str
    task: str  # "classification" | "multilabel" | "retrieval"
    data: Union[Dataset, IterableDataset]
    classnames: Optional[list[str]] = None
    templates: Any = None
    source: str = ""
    size: Optional[int] = None


# torchvision constructors: (root, transform, split) -> dataset. Each takes download=False.
def _tv(name: str) -> Optional[Callable]:
    import torchvision.datasets as tvd
    table = {
        "cifar10": lambda r, t, s: tvd.CIFAR10(r, train=s == "train", transform=t),
        "cifar100": lambda r, t, s: tvd.CIFAR100(r, train=s == "train", transform=t),
        "mnist": lambda r, t, s: tvd.MNIST(r, train=s == "train", transform=t),
        "food101": lambda r, t, s: tvd.Food101(r, split=s, transform=t),
        "sun397": lambda r, t, s: tvd.SUN397(r, transform=t),
        "cars": lambda r, t, s: tvd.StanfordCars(r, split=s, transform=t),
        "fgvc_aircraft": lambda r, t, s: tvd.FGVCAircraft(r, split=s, annotation_level="variant", transform=t),
        "dtd": lambda r, t, s: tvd.DTD(r, split=s, transform=t),
        "pets": lambda r, t, s: tvd.OxfordIIITPet(r, split=s, target_types="category", transform=t),
        "flowers": lambda r, t, s: tvd.Flowers102(r, split=s, transform=t),
        "stl10": lambda r, t, s: tvd.STL10(r, split=s, transform=t),
        "eurosat": lambda r, t, s: tvd.EuroSAT(r, transform=t),
        "gtsrb": lambda r, t, s: tvd.GTSRB(r, split=s, transform=t),
        "country211": lambda r, t, s: tvd.Country211(r, split=s, transform=t),
        "pcam": lambda r, t, s: tvd.PCAM(r, split=s, transform=t),
        "renderedsst2": lambda r, t, s: tvd.RenderedSST2(r, split=s, transform=t),
        "svhn": lambda r, t, s: tvd.SVHN(r, split=s, transform=t),
    }
    return table.get(name)


# Benchmarks CLIP_benchmark reads as class folders sorted by name: where they lie under root/<name>.
_CLASS_FOLDERS = {"caltech101": "101_ObjectCategories", "fer2013": "{split}"}


class _LabelledFolder(Dataset):
    """Images in class folders, each folder mapped to a label by `label_of(folder_name)` (None = skip)."""

    def __init__(self, root: Path, label_of: Callable[[str], Optional[int]], transform: Optional[Callable]):
        from torchvision.datasets.folder import IMG_EXTENSIONS
        self.transform = _transformed(transform)
        self.samples: list[tuple[str, int]] = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            label = label_of(folder.name)
            if label is None:
                continue
            for dirpath, _, files in sorted(os.walk(folder)):
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                                 if f.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            raise DatasetNotFound(f"{root}: no images in class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(_read_image(path)), label


def _wnid_labels(names: list[str], wnids_in_order: list[str]) -> Callable[[str], Optional[int]]:
    index = {w: i for i, w in enumerate(wnids_in_order)}

    def label_of(folder: str) -> Optional[int]:
        if folder.isdigit():  # ImageNet-V2 names its folders by label
            return int(folder) if int(folder) < len(names) else None
        if folder not in index:
            raise DatasetNotFound(f"folder {folder!r} is neither a WordNet id of this dataset nor a label")
        return index[folder]
    return label_of


def _imagenet_subset_wnids(name: str) -> list[str]:
    """The WordNet ids of an ImageNet subset in its label order (the classes of ImageNet-A/R/O)."""
    all_names, wnids = classnames("imagenet1k"), imagenet_wnids()
    keep, out, j = classnames(name), [], 0
    for cname, w in zip(all_names, wnids):  # subsets keep ImageNet's order, so one pass matches them
        if j < len(keep) and cname == keep[j]:
            out.append(w)
            j += 1
    return out


def _sorted_folders(path: Path) -> dict[str, int]:
    """Class folder name -> label, in sorted order (ImageFolder's and CLIP_benchmark's convention)."""
    return {f: i for i, f in enumerate(sorted(p.name for p in path.iterdir() if p.is_dir()))}


def _first_dir(*candidates: Path) -> Optional[Path]:
    return next((c for c in candidates if c.is_dir()), None)


def _is_wds(path: Path, split: str) -> bool:
    d = path / split
    return d.is_dir() and ((d / "nshards.txt").is_file() or any(d.glob("*.tar")))


def _image_or_unreadable(decode: Callable) -> Callable:
    """webdataset's image decoder, returning an Unreadable for a broken image instead of ending the pipeline."""
    def decoder(field: str, data: bytes):
        try:
            return decode(field, data)
        except _IMAGE_ERRORS as e:
            return Unreadable(field, _why(e))
    return decoder


def _name_unreadable(sample: dict) -> dict:
    for field, value in sample.items():
        if isinstance(value, Unreadable):  # the decoder sees the field only: name the shard and key
            sample[field] = Unreadable(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}.{field}", value.why)
    return sample


def _shard_failed(exn: Exception):
    """webdataset's handler for a shard it cannot open or read to the end: an error naming the shard. Not skipped:
    metrics over part of a benchmark would not compare with published ones, and its lost samples are uncounted."""
    url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "a shard"  # webdataset appends the url
    why = str(exn.args[0]) if exn.args else type(exn).__name__
    raise _cannot_read(url, f"{type(exn).__name__}: {why[:200]}") from None


def _cannot_read(url, why: str) -> ValueError:
    return ValueError(f"cannot read shard {url} to the end ({why}); if it is cut short or corrupt, fetch it again")


def _wds_dir(root: Path, key: str, split: str) -> Optional[Path]:
    """Where CLIP_benchmark's export of `key` lies: root/<key>, or root/wds_<key> as its Hugging Face
    repositories are named (wds_vtab-cifar10, wds_wilds-fmow, ...)."""
    flat = key.replace("/", "-")
    cands = [root / flat, root / f"wds_{flat}", root / f"wds_vtab-{flat}", root / f"wds_wilds-{flat}"]
    return next((c for c in cands if _is_wds(c, split)), None)


def _open_wds(path: Path, key: str, transform, split: str) -> EvalDataset:
    import webdataset as wds
    split_dir = path / split
    tars = sorted(split_dir.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    nshards_file = split_dir / "nshards.txt"
    if nshards_file.is_file():
        n = int(nshards_file.read_text().strip())
        tars = [split_dir / f"{i}.tar" for i in range(n)]
        missing = [t.name for t in tars if not t.is_file()]
        if missing:
            raise DatasetNotFound(f"{split_dir}: nshards.txt says {n} shards; missing {', '.join(missing[:3])}")
    if not tars:
        raise DatasetNotFound(f"{split_dir}: no .tar shards")
    for tar in tars:  # a tar cut on a block boundary reads as a clean end: the metrics would cover part of the set
        problem = file_end_problem(tar)
        if problem:
            raise _cannot_read(tar, problem)
    kind_file = path / "dataset_type.txt"
    task = kind_file.read_text().strip().lower() if kind_file.is_file() else (
        "retrieval" if key in RETRIEVAL else "classification")
    pipe = wds.WebDataset([str(t) for t in tars], shardshuffle=False, nodesplitter=None, empty_check=False,
                          handler=_shard_failed)
    pipe = pipe.decode(_image_or_unreadable(wds.autodecode.ImageHandler("pil", extensions=list(IMAGE_EXTS))))
    pipe = pipe.map(_name_unreadable)
    tf = _transformed(transform)
    names = tmpl = None
    if task == "retrieval":
        pipe = pipe.to_tuple(";".join(IMAGE_EXTS), "txt").map_tuple(tf, str.splitlines)
    else:
        label = "npy" if task == "multilabel" else "cls"
        pipe = pipe.to_tuple(";".join(IMAGE_EXTS), label).map_tuple(tf, None)
        cfile = path / "classnames.txt"
        names = read_classnames(cfile, keep_blank=True) if cfile.is_file() else classnames(key)
        tfile = path / "zeroshot_classification_templates.txt"
        tmpl = read_templates(tfile) if tfile.is_file() else templates(key)
    return EvalDataset(key, task, pipe, names, tmpl, source=f"webdataset {path}")


def _folder_root(base: Path) -> Path:
    return _first_dir(base / "val", base / "test", base / "images") or base


def _not_found(name: str, root: Path, extra: str = "") -> DatasetNotFound:
    key = canonical_name(name)
    flat = key.replace("/", "-")
    known = list_datasets()
    unknown = ""
    if key not in known:  # a misspelt benchmark, most likely; an export of any other name still opens
        near = difflib.get_close_matches(key, known, 2, 0.6)
        unknown = (f" {name!r} is no benchmark we know{' (' + ' or '.join(near) + '?)' if near else ''}: see "
                   f"`clipmoe zeroshot --list`.")
    return DatasetNotFound(
        f"{name}: no local copy under {root}.{unknown} Put it at {root / flat} ({extra or 'torchvision layout'}), or "
        f"CLIP_benchmark's WebDataset export at {root / ('wds_' + flat)} (test/0.tar.., classnames.txt, "
        "zeroshot_classification_templates.txt). Nothing is downloaded.")


def open_dataset(name: str, root: Union[str, Path], transform: Optional[Callable] = None, split: str = "test",
                 classnames_file: Union[str, Path, None] = None,
                 templates_file: Union[str, Path, None] = None) -> EvalDataset:
    """A benchmark from its local copy under `root` (the `--data-root`).

    `name` is any name `list_datasets()` gives (CLIP_benchmark's spellings with `wds/`/`vtab/` prefixes
    work too), or "folder": `root` is then a class-per-folder tree (`root/<class>/*.jpg`, or the same
    under root/test or root/val) whose folder names are the class names unless a classnames file says
    otherwise. User files (`classnames_file`, `templates_file`) override the shipped metadata.
    """
    root = Path(root).expanduser()
    key = "folder" if name == "folder" else canonical_name(name)
    if not root.is_dir():
        raise DatasetNotFound(f"data root {root} does not exist")
    ds = _open(key, root, transform, split)
    if classnames_file:
        names = read_classnames(classnames_file)
        if ds.classnames and len(names) != len(ds.classnames):  # labels index the names: a short list fails late
            shown = ", ".join(ds.classnames[:3]) + (", ..." if len(ds.classnames) > 3 else "")
            raise ValueError(f"{classnames_file}: {len(names)} class names for {len(ds.classnames)} classes of "
                             f"{name} ({shown}); give one name per class, in its label order")
        ds.classnames = names
    if templates_file:
        ds.templates = read_templates(templates_file)
    if ds.task != "retrieval":
        if ds.templates is None:
            ds.templates = templates("imagenet1k")
        if not ds.classnames:
            raise DatasetNotFound(f"{name}: no class names (give a classnames file)")
    if ds.size is None and hasattr(ds.data, "__len__"):
        ds.size = len(ds.data)
    return ds


def _open(key: str, root: Path, transform, split: str) -> EvalDataset:
    if key == "folder":
        if _is_wds(root, split):
            return _open_wds(root, "folder", transform, split)
        base = _folder_root(root)
        index = _sorted_folders(base)
        folders = list(index)
        if not folders:
            raise DatasetNotFound(f"{base}: expected one folder per class")
        names_file = root / "classnames.txt"
        names = read_classnames(names_file) if names_file.is_file() else [f.replace("_", " ") for f in folders]
        if len(names) != len(folders):
            raise DatasetNotFound(f"{names_file}: {len(names)} names for {len(folders)} class folders")
        tfile = root / "zeroshot_classification_templates.txt"
        data = _LabelledFolder(base, index.get, transform)
        return EvalDataset("folder", "classification", data, names, read_templates(tfile) if tfile.is_file() else None,
                           source=f"folder {base}")
    wds_root = _wds_dir(root, key, split)
    if wds_root is not None:
        return _open_wds(wds_root, key, transform, split)
    flat = key.replace("/", "-")
    base = root / flat
    if key in ("imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o"):
        if not base.is_dir():
            raise _not_found(key, root, "class folders named by WordNet id, e.g. val/n01440764/*.JPEG")
        full = key in ("imagenet1k", "imagenetv2", "imagenet_sketch")
        wnids = imagenet_wnids() if full else _imagenet_subset_wnids(key)
        names = classnames(key)
        data = _LabelledFolder(_folder_root(base), _wnid_labels(names, wnids), transform)
        return EvalDataset(key, "classification", data, names, templates(key), source=f"folder {base}")
    if key == "objectnet":
        return _open_objectnet(base, root, transform)
    if key in _CLASS_FOLDERS:  # CLIP_benchmark reads these as sorted class folders
        sub = base / _CLASS_FOLDERS[key].format(split=split)
        if not sub.is_dir():
            raise _not_found(key, root, f"class folders under {sub.relative_to(root)}")
        index, names = _sorted_folders(sub), classnames(key)
        if len(index) != len(names):
            raise DatasetNotFound(f"{sub}: {len(index)} class folders, {key} has {len(names)} classes")
        return EvalDataset(key, "classification", _LabelledFolder(sub, index.get, transform), names, templates(key),
                           source=f"folder {sub}")
    if key in ("mscoco_captions",):
        return _open_coco(key, base, root, transform, split)
    if key in ("flickr30k", "flickr8k"):
        return _open_flickr(key, base, root, transform, split)
    build = _tv(key)
    if build is None:
        raise _not_found(key, root, "no torchvision loader exists for it: use the WebDataset export")
    try:
        data = _SkipUnreadable(build(str(base), transform, split))
    except (RuntimeError, FileNotFoundError) as e:  # without torchvision's advice to pass download=True
        why = ". ".join(part for part in str(e).splitlines()[0].split(". ") if "download=True" not in part)
        raise _not_found(key, root, f"torchvision's layout: {why.rstrip('.')}") from None
    return EvalDataset(key, "classification", data, classnames(key), templates(key), source=f"torchvision {base}")


class _SkipUnreadable(Dataset):
    """A torchvision dataset whose broken image files come out as Unreadable items."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        try:
            return self.data[i]
        except _IMAGE_ERRORS as e:
            return Unreadable(self._where(i), _why(e)), None

    def _where(self, i: int) -> str:
        for name in ("samples", "_samples", "_image_files"):  # ImageFolder's, and the others' file lists
            files = getattr(self.data, name, None)
            if isinstance(files, list) and i < len(files):
                item = files[i]
                return str(item[0] if isinstance(item, tuple) else item)
        return f"{type(self.data).__name__} item {i}"


def _open_objectnet(base: Path, root: Path, transform) -> EvalDataset:
    """ObjectNet as CLIP_benchmark evaluates it: the 113 classes that overlap ImageNet-1k (per the release's
    objectnet_to_imagenet_1k.json), labelled in sorted folder order, named by their lower-cased labels."""
    release = _first_dir(base / "objectnet-1.0", base) or base
    maps = next((d for d in (release / "mappings", base / "mappings", base)
                 if (d / "folder_to_objectnet_label.json").is_file()), None)
    if maps is None or not (maps / "objectnet_to_imagenet_1k.json").is_file():
        raise _not_found("objectnet", root, "the ObjectNet release: objectnet-1.0/images and mappings/")
    label_of_folder = json.loads((maps / "folder_to_objectnet_label.json").read_text())
    folder_of_label = {label: folder for folder, label in label_of_folder.items()}
    overlap = json.loads((maps / "objectnet_to_imagenet_1k.json").read_text())
    folders = sorted(folder_of_label[label] for label in overlap)
    index = {f: i for i, f in enumerate(folders)}
    data = _LabelledFolder(release / "images", index.get, transform)  # folders outside the overlap: skipped
    return EvalDataset("objectnet", "classification", data, [label_of_folder[f].lower() for f in folders],
                       templates("objectnet"), source=f"folder {release}")


class _Captions(Dataset):
    def __init__(self, items: list[tuple[str, list[str]]], transform):
        self.items, self.transform = items, _transformed(transform)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, caps = self.items[i]
        return self.transform(_read_image(path)), list(caps)


def _open_coco(key: str, base: Path, root: Path, transform, split: str) -> EvalDataset:
    """MSCOCO Karpathy split as CLIP_benchmark reads it: `coco_{split}_karpathy.json` (COCO format)."""
    ann = base / f"coco_{split}_karpathy.json"
    images = _first_dir(base / "val2014", base / "images", base)
    if not ann.is_file():
        raise _not_found(key, root, f"val2014/ and {ann.name}")
    coco = json.loads(ann.read_text())
    caps: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    items = [(str(images / im["file_name"]), caps.get(im["id"], [])) for im in coco["images"]]
    return EvalDataset(key, "retrieval", _Captions([it for it in items if it[1]], transform), source=f"coco {base}")


def _open_flickr(key: str, base: Path, root: Path, transform, split: str) -> EvalDataset:
    """Flickr Karpathy split as CLIP_benchmark reads it: `{key}_{split}_karpathy.txt`, a header line then
    `image.jpg,caption` lines."""
    ann = base / f"{key}_{split}_karpathy.txt"
    if not ann.is_file():
        raise _not_found(key, root, f"the images and {ann.name}")
    caps: dict[str, list[str]] = {}
    for line in ann.read_text(encoding="utf-8").splitlines()[1:]:
        if ".jpg," in line:
            img, cap = line.strip().split(".jpg,", 1)
            caps.setdefault(img + ".jpg", []).append(cap)
    images = _first_dir(base / "Images", base / "images", base / "flickr30k-images", base)
    return EvalDataset(key, "retrieval", _Captions([(str(images / k), v) for k, v in caps.items()], transform),
                       source=f"flickr {base}")


def collate(batch: list) -> tuple[Optional[torch.Tensor], Any, list[Unreadable]]:
    """(images, targets, unreadable): images stacked; class targets a tensor, multilabel vectors a stacked
    tensor, captions a list; the batch's Unreadable items left out of both (None, None if all are)."""
    unreadable = [x for x, _ in batch if isinstance(x, Unreadable)]
    batch = [item for item in batch if not isinstance(item[0], Unreadable)]
    if not batch:
        return None, None, unreadable
    images, targets = zip(*batch)
    first = targets[0]
    if isinstance(first, list):
        return torch.stack(images), list(targets), unreadable
    if hasattr(first, "shape"):
        return torch.stack(images), torch.as_tensor(np.stack(targets)), unreadable
    return torch.stack(images), torch.as_tensor(list(targets)), unreadable
