"""Writing WebDataset tar shards in img2dataset's layout (`key.jpg` + `key.txt` + `key.json`, with
`NNNNN_stats.json` beside each tar) plus a `manifest.json` of per-shard sample counts and checksums."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import webdataset as wds
from PIL import Image

from .tarend import TarEnd

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


# ---------------------------------------------------------------------------------------------------
# `clipmoe shards`: folders or caption tables -> shards (several processes); checking a shard set

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def records_from_folder(folder: str | Path) -> list[tuple[str, str]]:
    """(image path, caption) for each image with a same-named .txt caption beside it."""
    folder = Path(folder)
    out, uncaptioned = [], []
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        cap = img.with_suffix(".txt")
        if cap.is_file():
            out.append((str(img), cap.read_text(encoding="utf-8", errors="replace").strip()))
        else:
            uncaptioned.append(img)
    if uncaptioned:
        warnings.warn(f"{len(uncaptioned)} images in {folder} have no same-named .txt caption and are left out "
                      f"(e.g. {uncaptioned[0]})", stacklevel=2)
    return out


# column names tables commonly give their images and captions (img2dataset: url / caption; LAION: URL / TEXT)
_IMAGE_COLS = ("url", "image", "image_path", "imagepath", "filepath", "file", "path", "filename", "img")
_CAPTION_COLS = ("caption", "text", "title", "alt", "description", "txt")
_URL_SCHEMES = ("http://", "https://", "s3://", "gs://")


def records_from_table(table: str | Path, image_col: str = "image",
                       caption_col: str = "caption") -> list[tuple[str, str]]:
    """(image path, caption) rows of a .csv, .tsv, .jsonl or .parquet table; relative paths are taken
    relative to the table's folder."""
    import csv

    table = Path(table)
    if table.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading .parquet needs pyarrow (pip install pyarrow)") from None
        rows = pq.read_table(table, columns=[image_col, caption_col]).to_pylist()
    elif table.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{table}, line {n}: not JSON ({e.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"{table}, line {n}: expected a JSON object with {image_col!r} and "
                                     f"{caption_col!r}")
    elif table.suffix in (".csv", ".tsv"):
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if table.suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{table}: expected a .csv, .tsv, .jsonl or .parquet table")
    for col, what, common in ((image_col, "image", _IMAGE_COLS), (caption_col, "caption", _CAPTION_COLS)):
        if rows and col not in rows[0]:
            near = [c for c in rows[0] if str(c).lower() in common]
            guess = f"; give the {what} column, e.g. {near[0]!r}, as {what}_col / --{what}-col" if near else ""
            raise ValueError(f"{table}: no column {col!r} (columns: {', '.join(map(str, rows[0]))}{guess})")
    # a row without an image or a caption (an empty cell; null in JSON or parquet, which str() would turn into the
    # caption "None") is left out, with a warning
    out, incomplete = [], []
    for n, r in enumerate(rows, 1):
        image, caption = r.get(image_col), r.get(caption_col)
        caption = "" if caption is None else str(caption).strip()
        if image is None or not str(image).strip() or not caption:
            incomplete.append(n)
        else:
            out.append((str(table.parent / str(image).strip()), caption))
    urls = [n for n, r in enumerate(rows, 1) if str(r.get(image_col) or "").strip().lower().startswith(_URL_SCHEMES)]
    if urls:  # downloading (retries, rate limits, resizing, counts per shard) is img2dataset's job
        raise ValueError(
            f"{table}: {len(urls)} of {len(rows)} rows give the image as a URL (e.g. data row {urls[0]}: "
            f"{str(rows[urls[0] - 1][image_col]).strip()[:80]}); this packs local files: download them with "
            f"img2dataset (--input_format {table.suffix[1:]} --url_col {image_col} --caption_col {caption_col} "
            f"--output_format webdataset), whose output is shards in this layout")
    if incomplete:
        warnings.warn(f"{len(incomplete)} rows of {table} have no image or no caption and are left out (e.g. data "
                      f"row {incomplete[0]})", stacklevel=2)
    return out


def _write_one(job) -> tuple[dict, int, str | None]:
    """One shard: its manifest entry, how many of its images could not be read, and "path: reason" of the
    first."""
    index, records, out, resize = job
    name = f"{index:05d}.tar"
    written, failed, first = 0, 0, None
    with wds.TarWriter(str(Path(out) / name)) as sink:
        for i, (path, caption) in enumerate(records):
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    if resize and max(img.size) > resize:
                        img.thumbnail((resize, resize), Image.BICUBIC)
                    data = encode_image(img)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                failed, first = failed + 1, first or f"{path}: {e}"
                continue
            key = f"{index:05d}{i:05d}"
            sink.write({"__key__": key, "jpg": data, "txt": caption,
                        "json": {"key": key, "status": "success", "caption": caption, "source": path}})
            written += 1
    stats = {"count": len(records), "successes": written, "failed_to_download": failed}
    (Path(out) / f"{index:05d}_stats.json").write_text(json.dumps(stats))
    return {"name": name, "count": written, "sha256": _sha256(Path(out) / name)}, failed, first


def write_shards_from_records(records: list[tuple[str, str]], out_dir: str | Path, *, samples_per_shard: int = 1000,
                              resize: int | None = None, processes: int = 1, progress: bool = True) -> dict:
    """Image files + captions -> shards in the img2dataset layout, one shard per job across processes. Images that
    cannot be read are left out, counted in each shard's NNNNN_stats.json (as img2dataset counts failed
    downloads) and in one warning."""
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, records[s:s + samples_per_shard], str(out), resize)
            for i, s in enumerate(range(0, len(records), samples_per_shard))]
    bar = tqdm(total=len(jobs), desc="shards", disable=not progress)
    shards, failed, first = [], 0, None
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(get_context("spawn").Pool(processes)).imap if processes > 1 else map
        for rec, bad, example in run(_write_one, jobs):
            shards.append(rec)
            failed, first = failed + bad, first or example
            bar.update(1)
    bar.close()
    if failed:
        warnings.warn(f"{failed} of {len(records)} images could not be read and are left out (e.g. {first})",
                      stacklevel=2)
    manifest = {"num_samples": sum(s["count"] for s in shards), "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def check_shards(out_dir: str | Path) -> list[dict]:
    """One row per shard: `name`, `expected`, `found` samples, `checksum` ok (None: not recorded), `status`.

    The shards are those of the folder's manifest.json (`clipmoe shards`: counts and checksums); without one,
    img2dataset's (each NNNNN.tar with its NNNNN_stats.json: counts only), and .tar files without stats
    (found counted, nothing expected)."""
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        expected = [(s["name"], s["count"], s["sha256"]) for s in json.loads(manifest_path.read_text())["shards"]]
    else:
        expected = _img2dataset_shards(out)
    rows = []
    for name, count, sha256 in expected:
        path = out / name
        row = {"name": name, "expected": count, "found": 0, "checksum": None}
        if not path.is_file():
            rows.append({**row, "status": "missing"})
            continue
        if sha256 is not None:
            row["checksum"] = _sha256(path) == sha256
        try:
            names, problem = _member_names(path)
            row["found"] = len({m.split(".", 1)[0] for m in names})
            status = ("checksum mismatch" if row["checksum"] is False else
                      "truncated" if problem else
                      "count mismatch" if count is not None and row["found"] != count else "ok")
        except Exception as e:  # tarfile raises several types for a damaged archive
            status = f"unreadable ({type(e).__name__})"
        rows.append({**row, "status": status})
    return rows


def _img2dataset_shards(out: Path) -> list[tuple[str, Optional[int], None]]:
    """(name, expected count, no checksum) of an img2dataset output folder, from its NNNNN_stats.json files."""
    if not out.is_dir():
        raise ValueError(f"{out}: not a folder")
    shards: dict[str, Optional[int]] = {p.name: None for p in out.glob("*.tar")}
    for stats in out.glob("*_stats.json"):
        try:
            count = int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{stats}: not img2dataset stats ({type(e).__name__}: {e})") from None
        shards[stats.name[: -len("_stats.json")] + ".tar"] = count
    if not shards:
        raise ValueError(f"{out}: no {MANIFEST} (written by `clipmoe shards`), no img2dataset *_stats.json and "
                         "no .tar shards")
    return [(name, shards[name], None) for name in sorted(shards)]


def _member_names(path: Path) -> tuple[list[str], Optional[str]]:
    """The sample members' names, and what is wrong with the archive's end (None: nothing), which tarfile reads
    as a clean end of a shard that was cut short (without a manifest's count, nothing else shows it)."""
    import tarfile

    with open(path, "rb") as f:
        stream = TarEnd(f)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            names = [m.name for m in tar if m.isfile() and not m.name.endswith(".json")]
        return names, stream.problem()
