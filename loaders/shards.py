"""Writing WebDataset tar shards in img2dataset's layout (`key.jpg` + `key.txt` + `key.json`, with
`NNNNN_stats.json` beside each tar) plus a `manifest.json` of per-shard sample counts and checksums."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from PIL import Image

MANIFEST = "manifest.json"


def encode_image(image: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=fmt.upper())
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _chunks(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(samples: Iterable[dict], out_dir: str | Path, *, samples_per_shard: int = 1000,
                 image_format: str = "jpg") -> dict:
    """Writes samples to `out_dir/00000.tar, 00001.tar, ...` and returns the manifest it wrote.

    Each sample is a dict with `key` (str), `image` (PIL image or encoded bytes), `caption` (str) and
    optionally `meta` (dict, stored as key.json beside img2dataset's own fields).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, chunk in enumerate(_chunks(samples, samples_per_shard)):
        name = f"{index:05d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for s in chunk:
                image = s["image"] if isinstance(s["image"], bytes) else encode_image(s["image"], image_format)
                meta = {"key": s["key"], "status": "success", "caption": s["caption"], **s.get("meta", {})}
                sink.write({"__key__": s["key"], image_format: image, "txt": s["caption"], "json": meta})
        stats = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0}
        (out / f"{index:05d}_stats.json").write_text(json.dumps(stats))
        shards.append({"name": name, "count": len(chunk), "sha256": _sha256(out / name)})
    manifest = {"num_samples": sum(s["count"] for s in shards), "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def shard_urls(out_dir: str | Path) -> str:
    """A brace pattern for the shards of a directory written by `write_shards`."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    n = len(manifest["shards"])
    base = str(Path(out_dir))
    return f"{base}/00000.tar" if n == 1 else f"{base}/{{00000..{n - 1:05d}}}.tar"
