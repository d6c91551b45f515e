"""Shard specs: brace patterns, lists, `@file` lists, local paths, folders and glob patterns, `pipe:` commands and
http(s) URLs, several sources mixed by weight (`/a/{000..099}.tar:0.7,/b/{000..009}.tar:0.3`), and the per-shard
sample counts that manifests (ours, or img2dataset's `NNNNN_stats.json`) promise."""
from __future__ import annotations

import glob
import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from webdataset.shardlists import expand_urls

_WEIGHT = re.compile(r"^(?P<spec>.+):(?P<weight>\d+(\.\d*)?|\.\d+)$")


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    shards: tuple[str, ...]
    weight: float = 1.0


def _split_top_level(spec: str) -> list[str]:
    """Splits on commas outside braces, so `{a,b}` brace lists survive."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_one(spec: str) -> list[str]:
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise SpecError(f"shard list file not found: {path}")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [u for ln in lines if ln and not ln.startswith("#") for u in _expand(ln)]
    return _expand(spec)


def _expand(spec: str) -> list[str]:
    try:
        urls = list(expand_urls(spec))
    except Exception as e:  # braceexpand's UnbalancedBracesError, and whatever else a malformed pattern raises
        raise SpecError(f"shard pattern {spec!r}: {e}") from None
    # a pattern's expansion is taken as it is: no file-system call per shard (tens of thousands on a network FS)
    return _local_files(urls[0]) if len(urls) == 1 else urls


def _local_files(url: str) -> list[str]:
    """A local folder as its .tar shards (img2dataset's output folder), a glob pattern (`/data/*.tar`, which
    webdataset takes literally) as its matches, in sorted order; anything else as it is."""
    if not _is_local(url) or Path(url).is_file():
        return [url]
    if Path(url).is_dir():
        shards = sorted(str(p) for p in Path(url).glob("*.tar"))
        if not shards:
            raise SpecError(f"{url} is a folder without .tar shards")
        return shards
    if any(c in url for c in "*?["):
        return sorted(glob.glob(url)) or [url]  # no match: the missing-shard messages name the pattern
    return [url]


def parse_sources(urls: Union[str, list, tuple]) -> list[Source]:
    """Sources with their weights; a source without `:weight` weighs 1."""
    specs = _split_top_level(urls) if isinstance(urls, str) else [str(u) for u in urls]
    sources, absent = [], []  # absent: the specs of local sources none of whose shards exists
    for spec in specs:
        m = _WEIGHT.match(spec)
        weight = 1.0
        if m and not m.group("spec").endswith(("http", "https", "pipe")):
            spec, weight = m.group("spec"), float(m.group("weight"))
        if weight <= 0:
            raise SpecError(f"source {spec!r}: weight must be > 0")
        shards = _expand_one(spec)
        if not shards:
            raise SpecError(f"source {spec!r} names no shards")
        if all(_is_local(u) for u in shards) and not any(Path(u).exists() for u in shards):  # stops at the first
            absent.append((spec, len(shards)))
        sources.append(Source(tuple(shards), weight))
    if not sources:
        raise SpecError(f"no shards in {urls!r}")
    if len(absent) == len(sources):
        raise SpecError(f"none of the shards of {urls!r} exists (e.g. {sources[0].shards[0]})")
    for spec, n in absent:  # a typo in one source of a mixture: said now, not only counted draw after draw
        warnings.warn(f"source {spec!r}: none of its {n} shards exists; reading it will only count them as "
                      "missing_shard", stacklevel=4)
    return sources


def _is_local(url: str) -> bool:  # a file path, not a URL or a `pipe:` command
    return "://" not in url and not url.startswith("pipe:")


@lru_cache(maxsize=256)
def _manifest_counts(directory: str) -> dict:
    path = Path(directory) / "manifest.json"
    try:
        return {s["name"]: int(s["count"]) for s in json.loads(path.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def expected_count(url: str) -> Optional[int]:
    """Samples a local shard should hold by its manifest or img2dataset stats; None when unknown."""
    if not _is_local(url):
        return None
    path = Path(url)
    counts = _manifest_counts(str(path.parent))
    if path.name in counts:
        return counts[path.name]
    stats = path.with_name(path.name[: -len(".tar")] + "_stats.json") if path.name.endswith(".tar") else None
    if stats is not None and stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None
