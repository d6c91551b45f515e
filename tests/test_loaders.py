"""The WebDataset loader on shards written by webdataset's own TarWriter, bad samples planted."""
import io
import json
import threading

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import clipmoe
import loaders


def _jpeg(colour=(200, 10, 10), size=(20, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _tf(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


@pytest.fixture
def dirty_shard(tmp_path):
    path = str(tmp_path / "dirty.tar")
    good = []
    with wds.TarWriter(path) as w:
        for i in range(6):
            w.write({"__key__": f"good{i}", "jpg": _jpeg(), "txt": f"caption {i}", "json": {"i": i}})
            good.append(f"good{i}")
        w.write({"__key__": "corrupt", "jpg": _jpeg()[:40], "txt": "x"})
        w.write({"__key__": "html", "jpg": b"<html><body>404</body></html>", "txt": "x"})
        w.write({"__key__": "nocap", "jpg": _jpeg()})
        w.write({"__key__": "emptycap", "jpg": _jpeg(), "txt": "   "})
        w.write({"__key__": "badutf8", "jpg": _jpeg(), "txt": b"\xff\xfe\xfa"})
        w.write({"__key__": "noimage", "txt": "only text"})
        w.write({"__key__": "huge", "jpg": _jpeg(), "txt": "a" * 20_000})
        w.write({"__key__": "pickled", "jpg": _jpeg(), "txt": "fine", "pyd": b"cos\nsystem\n(S'touch /tmp/pwned'\ntR."})
        good.append("pickled")
    return path, good


def test_bad_samples_skipped_and_counted(dirty_shard):
    path, good = dirty_shard
    loader = loaders.image_text_loader(path, batch_size=4, transform=_tf, tokenize=clipmoe.get_tokenizer("clipmoe-micro"))
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(good)
    stats = loader.stats()
    assert stats["samples"] == len(good)
    assert stats["skipped"] == {"corrupt_image": 2, "missing_caption": 1, "empty_caption": 1,
                                "bad_caption_encoding": 1, "missing_image": 1, "huge_caption": 1}


def test_strict_mode_names_shard_and_key(dirty_shard):
    path, _ = dirty_shard
    loader = loaders.image_text_loader(path, batch_size=4, transform=_tf, tokenize=lambda t: torch.zeros(len(t), 4),
                                       strict=True, shuffle=False)
    with pytest.raises(loaders.DataError, match="corrupt_image in .*dirty.tar key corrupt"):
        list(loader)


def test_truncated_shard_counted(tmp_path):
    path = tmp_path / "t.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(20):
            w.write({"__key__": f"k{i}", "jpg": _jpeg(size=(64, 64)), "txt": "c"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    loader = loaders.image_text_loader(str(path), batch_size=4, transform=_tf, tokenize=lambda t: torch.zeros(len(t), 2))
    n = sum(len(b["key"]) for b in loader)
    assert 0 < n < 20
    assert loader.stats()["skipped"].get("truncated_shard", 0) == 1


def test_epoch_covers_every_sample_once_across_ranks_and_workers(tiny_shards):
    seen = []
    for rank in range(2):
        loader = loaders.image_text_loader(tiny_shards["train"], batch_size=10, transform=_tf,
                                           tokenize=lambda t: torch.zeros(len(t), 2), num_workers=2,
                                           rank=rank, world_size=2, seed=3)
        seen += [k for b in loader for k in b["key"]]
    assert len(seen) == 256 and len(set(seen)) == 256


def test_too_few_shards_is_an_error_not_a_hang(tiny_shards):
    result = {}

    def build():
        try:
            loaders.image_text_loader(tiny_shards["train"], batch_size=4, transform=_tf, tokenize=len,
                                      num_workers=4, world_size=2)
        except loaders.DataError as e:
            result["error"] = str(e)

    t = threading.Thread(target=build, daemon=True)
    t.start()
    t.join(timeout=30)
    assert "4 shards cannot feed 2 ranks x 4 workers = 8 readers" in result["error"]


def test_shard_writer_manifest(tiny_shards):
    manifest = json.loads((tiny_shards["root"] / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 256 and [s["count"] for s in manifest["shards"]] == [64] * 4
    stats = json.loads((tiny_shards["root"] / "train" / "00000_stats.json").read_text())
    assert stats["successes"] == 64


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
def test_mid_epoch_resume_gives_the_same_following_batches(tiny_shards, workers, shuffle):
    def make():
        return loaders.image_text_loader(tiny_shards["train"], batch_size=10, transform=_tf,
                                         tokenize=lambda t: torch.zeros(len(t), 2), num_workers=workers,
                                         rank=1, world_size=2, seed=5, shuffle=shuffle, epoch=3, shuffle_buffer=50)

    full = [b["key"] for b in make()]
    first = make()
    it = iter(first)
    head = [next(it)["key"] for _ in range(5)]
    state = first.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b["key"] for b in resumed]
    assert head + tail == full
    assert resumed.stats()["samples"] == sum(len(k) for k in full) == 128


def test_resume_refuses_a_changed_layout(tiny_shards):
    def make(workers):
        return loaders.image_text_loader(tiny_shards["train"], batch_size=10, transform=_tf, tokenize=len,
                                         num_workers=workers)

    state = make(0).state_dict()
    with pytest.raises(loaders.DataError, match="num_workers 0 -> 2"):
        make(2).load_state_dict(state)
