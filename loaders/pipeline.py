"""Image-text batches from WebDataset tar shards (img2dataset layout), for any rank and worker count.

Shards are split by (rank, worker) after a seeded shuffle; samples pass a seeded shuffle buffer. Only
the image and caption members are read (`.pyd`/`.pth`/`.pkl` members are never touched, so nothing is
unpickled). Bad samples are skipped and counted by reason, or raise in strict mode.
This package is a leaf: it takes `transform` and `tokenize` callables and never imports clipmoe.
"""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
import warnings
from collections import Counter, deque
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image
from webdataset import tariterators

from .sources import Source, SpecError, expected_count, parse_sources
from .tarend import TarEnd
from .transforms import TrainTransform
from .workers import leave_signals_to_the_parent, started

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MEMBERS = set(IMAGE_EXTS) | {"txt", "json"}
_PIPE_EXIT = re.compile(r": exit (-?\d+) \(read\)")
MAX_CAPTION_CHARS = 10_000


def _wanted(name: str) -> bool:  # the tar members read; others (e.g. .pyd, which webdataset would unpickle) are not
    return name.rsplit(".", 1)[-1].lower() in _MEMBERS


class DataError(Exception):
    """A bad sample or shard in strict mode, or a loader set-up that cannot work. One-line message."""


def _describe(exn: Exception, url: str) -> str:
    """One line for a shard's read error. webdataset appends the stream and the url to an exception's args (its
    str is then a tuple) and " @ <stream>" to the first; its Pipe says ((args,), {kwargs}): exit N (read)."""
    status = _PIPE_EXIT.search(str(exn))
    if status:
        return f"{url}: its command exited with status {status.group(1)}"
    if isinstance(exn, OSError) and exn.strerror:  # "[Errno 2] No such file or directory: '...'"
        return str(exn).splitlines()[0][:300]
    first = str(exn.args[0]) if exn.args else type(exn).__name__
    return f"{url}: {first.split(' @ <', 1)[0].splitlines()[0][:300]}"


def _one_line_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """A worker's DataError as its own one line: torch re-raises a worker's exception with the worker's whole
    traceback as its message ("Caught DataError in DataLoader worker process 1. Original Traceback ...")."""
    try:
        yield from batches
    except DataError as e:
        text = str(e).strip()
        if not text.startswith("Caught DataError"):
            raise
        raise DataError(text.rsplit("DataError: ", 1)[-1]) from None


def expand_shards(urls) -> list[str]:
    """Every shard URL of a spec (see loaders.sources), all sources together."""
    return [u for src in parse_sources(urls) for u in src.shards]


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def decode_caption(sample: dict, caption_key: str) -> str:
    raw = sample.get("txt")
    if caption_key != "txt":  # a field of key.json
        if "json" not in sample:
            raise _Skip("missing_caption")
        try:
            raw = json.loads(sample["json"]).get(caption_key)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise _Skip("bad_json") from None
        if isinstance(raw, list):
            raw = raw[0] if raw else None
    if raw is None:
        raise _Skip("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("bad_caption_encoding") from None
    text = str(raw).strip()
    if not text:
        raise _Skip("empty_caption")
    if len(text) > MAX_CAPTION_CHARS:
        raise _Skip("huge_caption")
    return text


def decode_meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"])
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError):
        raise _Skip("bad_json") from None
    if not isinstance(meta, dict):
        raise _Skip("bad_json")
    return meta


def decode_image(sample: dict, draft_size: Optional[int] = None) -> Image.Image:
    """RGB image of a sample. With `draft_size`, a JPEG at least twice that size is decoded at a
    reduced scale (PIL's draft), which the transform's resize makes invisible and much cheaper."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise _Skip("missing_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(sample[ext]))
            if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Skip("decompression_bomb") from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise _Skip("corrupt_image") from None


class _CircuitBreaker:
    """Aborts when more than `max_rate` of the last `window` samples were skipped: a broken source
    should stop a run loudly, not quietly train on what is left of it."""

    def __init__(self, max_rate: float, window: int):
        self.max_rate, self.window = max_rate, window
        self.recent: deque = deque()
        self.bad = 0  # skipped samples in `recent`, kept as a running count (this runs per sample)

    def record(self, url: str, skipped: bool) -> None:
        self.recent.append((url, skipped))
        self.bad += skipped
        if len(self.recent) > self.window:
            self.bad -= self.recent.popleft()[1]
        if len(self.recent) >= min(self.window, 200):
            bad = self.bad
            if bad > self.max_rate * len(self.recent):
                worst = Counter(u for u, s in self.recent if s).most_common(3)
                raise DataError(
                    f"{bad} of the last {len(self.recent)} samples were bad ({bad / len(self.recent):.0%} > "
                    f"max_skip_rate {self.max_rate:.0%}); worst shards: "
                    + ", ".join(f"{u} ({n})" for u, n in worst))


class _Stream(torch.utils.data.IterableDataset):
    """Yields batches for one (rank, worker); each batch carries this worker's running counts."""

    def __init__(self, loader: "ImageTextLoader", resume: dict):
        self.loader, self.resume = loader, resume

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.loader._worker_batches(worker, workers, self.resume.get(worker))


def check_sources(urls, *, resampled: bool = False, samples_per_epoch: Optional[int] = None, world_size: int = 1,
                  num_workers: int = 0) -> list[Source]:
    """The sources of a shard spec, checked for a loader of these settings (before any model is built for it);
    a DataError says what does not fit."""
    try:
        sources = parse_sources(urls)
    except SpecError as e:
        raise DataError(str(e)) from None
    shards = sum(len(src.shards) for src in sources)
    slots = world_size * max(1, num_workers)
    if not resampled and shards < slots:
        raise DataError(
            f"{shards} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers "
            f"= {slots} readers in epoch mode: use at least {slots} shards, fewer workers, or resampled=True")
    if resampled and not samples_per_epoch:
        raise DataError("resampled=True needs samples_per_epoch (the size of one 'epoch')")
    weighted = [src for src in sources if src.weight != 1.0]
    if weighted and not resampled:  # as open_clip refuses upsampling factors without --dataset-resampled
        raise DataError(f"source weights (e.g. {weighted[0].weight:g} for {weighted[0].shards[0]}...) apply "
                        f"when shards are drawn with replacement: set resampled=True (data.resampled: true, "
                        f"with data.samples_per_epoch); epoch mode reads every shard once")
    return sources


class ImageTextLoader:
    """Iterable of batches: dicts with `image` (B, 3, H, W), `text` (B, L) and `key` (list of str).

    `urls`: see loaders.sources (weights apply to resampled mode; epoch mode reads every shard once).
    `caption_key`: "txt", a field of key.json, or a list of them to choose from at random per sample.
    `max_skip_rate` / `skip_window`: the circuit breaker. `draft_size`: the fast JPEG path's target.
    """

    def __init__(self, urls, *, batch_size: int, transform: Callable, tokenize: Callable,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, resampled: bool = False,
                 seed: int = 0, shuffle: bool = True, strict: bool = False,
                 caption_key: Union[str, Sequence[str]] = "txt",
                 shuffle_buffer: int = 1000, samples_per_epoch: Optional[int] = None, epoch: int = 0,
                 drop_last: bool = False, pin_memory: bool = False, with_meta: bool = False,
                 max_skip_rate: float = 0.05, skip_window: int = 1000, draft_size: Optional[int] = None):
        self.sources = check_sources(urls, resampled=resampled, samples_per_epoch=samples_per_epoch,
                                     world_size=world_size, num_workers=num_workers)
        self.shards = [u for src in self.sources for u in src.shards]
        self.batch_size, self.transform, self.tokenize = batch_size, transform, tokenize
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.resampled, self.seed, self.shuffle, self.strict = resampled, seed, shuffle, strict
        self.caption_key, self.shuffle_buffer = caption_key, shuffle_buffer
        self.samples_per_epoch, self.epoch, self.drop_last = samples_per_epoch, epoch, drop_last
        self.pin_memory, self.with_meta = pin_memory, with_meta
        self.max_skip_rate, self.skip_window, self.draft_size = max_skip_rate, skip_window, draft_size
        self._counts: dict[tuple[int, int], Counter] = {}  # (pass over the data, worker) -> counts
        self._passes = 0
        # Per worker of the current pass: items delivered, raw samples they consumed, their counts.
        self._progress: dict[int, dict] = {}
        self._resume: dict[int, dict] = {}

    # -- public -------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stats(self) -> dict:
        """`samples` delivered and `skipped` counts by reason, over this rank's workers and all passes."""
        total = Counter()
        for c in self._counts.values():
            total.update(c)
        samples = total.pop("samples", 0)
        return {"samples": samples, "skipped": {k: v for k, v in total.items() if v}}

    def state_dict(self) -> dict:
        """Where this rank is in the data: resuming from it continues with the next unseen batch."""
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "resampled": self.resampled, "shards": len(self.shards),
                "workers": {w: dict(p) for w, p in self._progress.items()}, "stats": self.stats()}

    def layout_changes(self, state: dict) -> list[str]:
        """What differs between the layout `state` was saved under and this loader's ("num_workers 0 -> 2"): an
        exact resume needs the same shards, seed, ranks and workers."""
        mine = self.state_dict()
        return [f"{k} {state.get(k)!r} -> {mine[k]!r}" for k in
                ("seed", "rank", "world_size", "num_workers", "resampled", "shards") if state.get(k) != mine[k]]

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the next pass starts with the first batch not yet delivered.

        The same exactly-once guarantee needs the same layout (`layout_changes`); a change is refused with an
        error naming it (`restart` continues without the guarantee).
        """
        changed = self.layout_changes(state)
        if changed:
            raise DataError(f"cannot resume this data position: {', '.join(changed)} changed since it was saved")
        self.epoch = state["epoch"]
        self._resume = {int(w): dict(p) for w, p in state["workers"].items()}
        skipped = state["stats"]["skipped"]
        self._counts = {(0, -1): Counter({"samples": state["stats"]["samples"], **skipped})}
        for w, p in self._resume.items():  # counted again by the workers as they resume
            self._counts[0, -1].subtract(p["counts"])

    def restart(self, epoch: int, stats: Optional[dict] = None) -> None:
        """Continue with a fresh pass of `epoch`, counting on from `stats` (a `stats()`): where a saved position
        cannot carry over to this layout, a resume goes on with an epoch no reader had begun."""
        self.epoch, self._resume = epoch, {}
        stats = stats or {"samples": 0, "skipped": {}}
        self._counts = {(0, -1): Counter({"samples": stats["samples"], **stats["skipped"]})}

    def __iter__(self) -> Iterator[dict]:
        self._passes += 1
        resume, self._resume = self._resume, {}
        self._progress = {w: dict(p) for w, p in resume.items()}
        if self.num_workers == 0:
            source = self._worker_batches(0, 1, resume.get(0))
        else:
            # the workers' base seed from a generator of our own: drawing it from torch's global RNG would shift
            # the training process's random stream (router jitter) by one draw per pass
            seeds = torch.Generator().manual_seed(self._rng(-1, "workers").getrandbits(63))
            source = _one_line_errors(started(torch.utils.data.DataLoader(
                _Stream(self, resume), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                generator=seeds, worker_init_fn=leave_signals_to_the_parent)))
        for batch in source:
            worker, counts, position = batch.pop("__stats__")
            if batch.pop("__replayed__", False):
                continue  # a batch delivered before the resume, replayed without decoding
            self._counts[self._passes, worker] = Counter(counts)
            progress = self._progress.setdefault(worker, {"items": 0, "position": 0, "counts": {}})
            progress.update(items=progress["items"] + 1, position=position, counts=dict(counts))
            if batch["key"]:
                yield batch

    # -- per worker ---------------------------------------------------------------------------------

    def _rng(self, worker: int, what: str) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{what}")

    def _my_shards(self, worker: int, workers: int) -> Iterator[str]:
        if self.resampled:  # a source by weight, then one of its shards
            rng = self._rng(worker, "resample")
            weights = [src.weight for src in self.sources]
            while True:
                yield rng.choice(rng.choices(self.sources, weights)[0].shards)
        shards = list(self.shards)
        if self.shuffle:  # same order on every rank and worker, then split
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(shards)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        yield from shards[slot::slots]

    def _raw_samples(self, worker: int, workers: int, counts: Counter) -> Iterator[dict]:
        """Undecoded samples shard after shard; a shard that breaks off, ends without the tar end-of-archive
        blocks or at a damaged header (tarfile takes both as a clean end), or yields fewer samples than its
        manifest promises, counts once as truncated_shard; one that does not exist as missing_shard."""
        failed = False  # the shard being read was counted for an error (each read of a shard counts once)

        def handler(exn: Exception) -> bool:
            nonlocal failed
            if isinstance(exn, DataError):  # raised below in strict mode; webdataset's outer level passes it back
                raise DataError(exn.args[0]) from exn.__cause__  # without the stream and url it appended
            if isinstance(exn, FileNotFoundError):  # a typo in a path: say so, not "read_error"
                reason = "missing_shard"
            elif "duplicate file name" in str(exn):
                reason = "duplicate_key"
            else:
                reason = "truncated_shard" if isinstance(exn, (tarfile.TarError, EOFError)) else "read_error"
            if reason != "duplicate_key" and failed:  # one failure seen at two levels (a member's read,
                return True  # then the archive's; or a pipe's exit status on reading and on closing): once
            if self.strict:
                raise DataError(f"{reason}: {_describe(exn, url)}") from exn
            if reason != "duplicate_key":  # a sample's fault: the shard reads on, and may fail besides
                failed = True
            counts[reason] += 1
            return True

        def kept(url: str, opened: list):  # webdataset leaves a shard's file open when its reader stops mid-shard
            for source in tariterators.url_opener([{"url": url}], handler=handler):
                source["stream"] = TarEnd(source["stream"])
                opened.append(source["stream"])
                yield source

        for url in self._my_shards(worker, workers):
            failed = False  # resampled mode may draw a shard again: each read counts its own failure
            opened = []
            members = tariterators.tar_file_expander(kept(url, opened), handler=handler, select_files=_wanted)
            n, last = 0, None
            try:
                # each sample goes out once the next has begun: the last one, which a cut leaves without some of
                # its members, only after the end is checked, so that strict mode names the cut, not the sample
                for sample in tariterators.group_by_keys(members, handler=handler):
                    n += 1
                    if last is not None:
                        yield last
                    last = sample
                problem = None if failed else next(filter(None, (stream.problem() for stream in opened)), None)
                if problem:  # tarfile ended quietly on a cut or a damaged header
                    if self.strict:
                        raise DataError(f"truncated_shard: {url}: {problem}")
                    failed = True
                    counts["truncated_shard"] += 1
                if last is not None:
                    yield last
            finally:  # also when training ends mid-shard (this generator is closed)
                for stream in opened:
                    try:
                        stream.close()
                    except OSError as exn:  # a `pipe:` or http(s) shard whose command failed: webdataset's Pipe
                        handler(exn)  # raises its exit status when reading and again when closing
            expected = expected_count(url)
            if expected is not None and n < expected and not failed:  # a clean end, short of its count
                if self.strict:
                    raise DataError(f"truncated_shard: {url} yielded {n} samples, its manifest says {expected}")
                counts["truncated_shard"] += 1

    def _decode(self, sample: dict, counts: Counter, rng: random.Random) -> Optional[dict]:
        try:
            key = rng.choice(self.caption_key) if isinstance(self.caption_key, (list, tuple)) else self.caption_key
            text = decode_caption(sample, key)
            image = decode_image(sample, self.draft_size)
            meta = decode_meta(sample) if self.with_meta else None
        except _Skip as skip:
            if self.strict:
                raise DataError(f"{skip.reason} in {sample.get('__url__')} key {sample.get('__key__')}") from None
            counts[skip.reason] += 1
            return None
        # our train transform takes this sample's rng; any other transform draws as it does
        image = self.transform(image, rng=rng) if isinstance(self.transform, TrainTransform) else self.transform(image)
        return {"key": sample["__key__"], "image": image, "text": text, "meta": meta}

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _worker_batches(self, worker: int, workers: int, resume: Optional[dict] = None) -> Iterator[dict]:
        """This worker's batches. Raw samples are shuffled before decoding, so a resume can skip the
        samples already consumed without decoding them; each delivered batch is replayed as an empty
        item, so that the DataLoader's round-robin over workers is the same as in the first run."""
        counts: Counter = Counter()
        raw = self._shuffled(self._raw_samples(worker, workers, counts), self._rng(worker, "samples"))
        position, delivered = 0, 0
        if resume:
            for _ in range(resume["items"]):
                yield {"key": [], "__replayed__": True, "__stats__": (worker, {}, 0)}
            for _ in zip(range(resume["position"]), raw):
                pass
            position = resume["position"]
            counts.clear()  # the handler in _raw_samples holds this very Counter
            counts.update(resume["counts"])
            delivered = counts["samples"]
        limit = self.samples_per_epoch // (self.world_size * workers) if self.resampled else None
        breaker = _CircuitBreaker(self.max_skip_rate, self.skip_window)
        batch: list[dict] = []
        for sample in raw:
            if limit is not None and delivered + len(batch) >= limit:
                break
            position += 1
            # each sample's draws (caption choice, crop) from its own position: a resume skips samples
            # without decoding them and still draws what the first run drew
            decoded = self._decode(sample, counts, self._rng(worker, f"sample/{position}"))
            breaker.record(sample.get("__url__", "?"), decoded is None)
            if decoded is None:
                continue
            batch.append(decoded)
            if len(batch) == self.batch_size:
                counts["samples"] += len(batch)
                delivered += len(batch)
                yield self._collate(batch, worker, counts, position)
                batch = []
        if batch and not self.drop_last:
            counts["samples"] += len(batch)
            yield self._collate(batch, worker, counts, position)
        else:
            yield {"key": [], "__stats__": (worker, dict(counts), position)}  # final counts, no samples

    def _collate(self, batch: list[dict], worker: int, counts: Counter, position: int) -> dict[str, Any]:
        out = {
            "image": torch.stack([s["image"] for s in batch]),
            "text": self.tokenize([s["text"] for s in batch]),
            "key": [s["key"] for s in batch],
            "__stats__": (worker, dict(counts), position),
        }
        if self.with_meta:
            out["meta"] = [s["meta"] for s in batch]
        return out


def image_text_loader(urls, *, batch_size: int, transform: Callable, tokenize: Callable, num_workers: int = 0,
                      rank: int = 0, world_size: int = 1, resampled: bool = False, seed: int = 0,
                      shuffle: bool = True, strict: bool = False, **kwargs) -> ImageTextLoader:
    """Batches of (image, tokenized caption, key) from WebDataset shards; see ImageTextLoader."""
    return ImageTextLoader(urls, batch_size=batch_size, transform=transform, tokenize=tokenize,
                           num_workers=num_workers, rank=rank, world_size=world_size, resampled=resampled,
                           seed=seed, shuffle=shuffle, strict=strict, **kwargs)
