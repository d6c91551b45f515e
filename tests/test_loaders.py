"""The WebDataset loader on shards written by webdataset's own TarWriter, bad samples planted."""
import functools
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

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
        bomb = io.BytesIO()
        Image.new("1", (10_000, 9_000)).save(bomb, format="PNG")  # 90 M pixels, a few kB on disk
        w.write({"__key__": "bomb", "png": bomb.getvalue(), "txt": "x"})
    return path, good


def test_bad_samples_skipped_and_counted(dirty_shard):
    path, good = dirty_shard
    loader = loaders.image_text_loader(path, batch_size=4, transform=_tf,
                                       tokenize=clipmoe.get_tokenizer("clipmoe-micro"))
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(good)
    stats = loader.stats()
    assert stats["samples"] == len(good)
    assert stats["skipped"] == {"corrupt_image": 2, "missing_caption": 1, "empty_caption": 1,
                                "bad_caption_encoding": 1, "missing_image": 1, "huge_caption": 1,
                                "decompression_bomb": 1}


def test_duplicate_keys_counted(tmp_path):
    import tarfile

    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", _jpeg()), ("a.txt", b"one"), ("a.txt", b"again"), ("b.jpg", _jpeg()),
                           ("b.txt", b"two")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = loaders.image_text_loader(str(path), batch_size=4, transform=_tf, tokenize=list)
    keys = [k for b in loader for k in b["key"]]
    assert "b" in keys and loader.stats()["skipped"].get("duplicate_key") == 1


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
    loader = loaders.image_text_loader(str(path), batch_size=4, transform=_tf,
                                       tokenize=lambda t: torch.zeros(len(t), 2))
    n = sum(len(b["key"]) for b in loader)
    assert 0 < n < 20
    assert loader.stats()["skipped"].get("truncated_shard", 0) == 1


def test_missing_shard_counted_by_its_own_reason(tmp_path):
    good = tmp_path / "good.tar"
    with wds.TarWriter(str(good)) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "jpg": _jpeg(), "txt": "c"})
    urls = [str(good), str(tmp_path / "typo.tar")]
    with pytest.warns(UserWarning, match="typo.tar': none of its 1 shards exists"):
        loader = loaders.image_text_loader(urls, batch_size=5, transform=_tf,
                                           tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False)
    assert sum(len(b["key"]) for b in loader) == 5
    assert loader.stats()["skipped"] == {"missing_shard": 1}
    with pytest.warns(UserWarning, match="typo.tar"):
        strict = loaders.image_text_loader(urls, batch_size=5, transform=_tf,
                                           tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False, strict=True)
    with pytest.raises(loaders.DataError, match="missing_shard: .*typo.tar"):
        list(strict)
    # a shard its manifest lists, missing: missing only, not also short of its count
    loaders.write_shards(({"key": f"k{i}", "image": Image.new("RGB", (8, 8)), "caption": "c"} for i in range(6)),
                         tmp_path / "set", samples_per_shard=3)
    (tmp_path / "set" / "00001.tar").unlink()
    loader = loaders.image_text_loader(f"{tmp_path}/set/{{00000..00001}}.tar", batch_size=1, transform=_tf,
                                       tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False)
    assert sum(len(b["key"]) for b in loader) == 3 and loader.stats()["skipped"] == {"missing_shard": 1}
    # resampled, each draw of it is a read of its own, and counts
    loader = loaders.image_text_loader(f"{tmp_path}/set/{{00000..00001}}.tar", batch_size=3, transform=_tf,
                                       tokenize=lambda t: torch.zeros(len(t), 2), resampled=True,
                                       samples_per_epoch=30, seed=0)
    assert sum(len(b["key"]) for b in loader) == 30 and loader.stats()["skipped"]["missing_shard"] > 1


def test_failing_pipe_shard_counted_once_and_named_in_strict_mode(tmp_path):
    """A `pipe:` (or http, through curl) shard whose command fails: webdataset raises its exit status on reading
    and again on closing; the shard counts once and the others still load."""
    good = tmp_path / "good.tar"
    with wds.TarWriter(str(good)) as w:
        for i in range(40):
            w.write({"__key__": f"k{i}", "jpg": _jpeg(size=(64, 64)), "txt": "c"})
    half = good.stat().st_size // 2
    failing = ["pipe:exit 3", f"pipe:head -c {half} {good}; exit 1"]  # nothing; half a shard, then a failure
    # how far into the cut shard the reader gets, and what it meets first (the cut tar, the command's status; at a
    # member's read or the archive's), depends on the pipe's timing: in about one run of eight it met the failure at
    # two levels, and counted it twice. Counted once, it is a read_error or a truncated_shard.
    for _ in range(20):
        loader = loaders.image_text_loader([str(good), *failing], batch_size=5, transform=_tf,
                                           tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False)
        n = sum(len(b["key"]) for b in loader)
        skipped = loader.stats()["skipped"]  # (the sample cut in half, if any: missing_caption)
        assert 40 < n < 80 and skipped["read_error"] + skipped.get("truncated_shard", 0) == 2, skipped
    strict = loaders.image_text_loader(failing[0], batch_size=5, transform=_tf,
                                       tokenize=lambda t: torch.zeros(len(t), 2), strict=True)
    with pytest.raises(loaders.DataError, match=r"^read_error: pipe:exit 3: its command exited with status 3$"):
        list(strict)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_covers_every_sample_once_across_ranks_and_workers(tiny_shards, workers, shuffle):
    seen = []
    for rank in range(2):
        loader = loaders.image_text_loader(tiny_shards["train"], batch_size=10, transform=_tf,
                                           tokenize=lambda t: torch.zeros(len(t), 2), num_workers=workers,
                                           rank=rank, world_size=2, seed=3, shuffle=shuffle)
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


def test_restart_goes_on_with_a_fresh_epoch_and_counts_on(tiny_shards):
    """What a resume does where the saved position cannot carry over: the next pass is the given epoch from its
    start, as a new loader reads it, and the counts go on from the saved ones."""
    def make(workers, epoch=0):
        return loaders.image_text_loader(tiny_shards["train"], batch_size=10, transform=_tf,
                                         tokenize=lambda t: torch.zeros(len(t), 2), num_workers=workers,
                                         seed=5, epoch=epoch, shuffle_buffer=50)

    first = make(0)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    del it
    other = make(2)
    assert other.layout_changes(state) == ["num_workers 0 -> 2"] and make(0).layout_changes(state) == []
    other.restart(state["epoch"] + 1, {"samples": 30, "skipped": {"corrupt_image": 2}})
    assert [b["key"] for b in other] == [b["key"] for b in make(2, epoch=1)]
    assert other.epoch == 1 and other.stats() == {"samples": 30 + 256, "skipped": {"corrupt_image": 2}}


def _write(path, n, start=0, caption=lambda i: f"caption {i}", **extra):
    with wds.TarWriter(str(path)) as w:
        for i in range(start, start + n):
            w.write({"__key__": f"k{i:05d}", "jpg": _jpeg(), "txt": caption(i), "json": {"alt": f"alt {i}"}, **extra})


def test_weighted_sources_in_resampled_mode(tmp_path):
    _write(tmp_path / "a.tar", 20, 0)
    _write(tmp_path / "b.tar", 20, 100)
    (tmp_path / "list.txt").write_text(f"# shards of b\n{tmp_path}/b.tar\n")
    loader = loaders.image_text_loader(f"{tmp_path}/a.tar:0.8,@{tmp_path}/list.txt:0.2", batch_size=20,
                                       transform=_tf, tokenize=lambda t: torch.zeros(len(t), 2), resampled=True,
                                       samples_per_epoch=2000, shuffle=False)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 2000
    share_a = sum(int(k[1:]) < 100 for k in keys) / len(keys)
    assert 0.7 < share_a < 0.9
    assert loaders.expand_shards(f"{tmp_path}/a.tar,@{tmp_path}/list.txt") == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    # in epoch mode (every shard once) the weights would mean nothing: an error, as open_clip's, not ignored
    with pytest.raises(loaders.DataError, match=r"^source weights \(e.g. 0.8 for .*a.tar...\) apply when shards are "
                                                r"drawn with replacement: set resampled=True"):
        loaders.image_text_loader(f"{tmp_path}/a.tar:0.8,@{tmp_path}/list.txt:0.2", batch_size=20, transform=_tf,
                                  tokenize=lambda t: torch.zeros(len(t), 2))


def test_a_folder_or_a_glob_pattern_names_its_shards_in_order(tmp_path):
    """img2dataset's output folder, or `/data/*.tar` (which webdataset would take literally), as its sorted .tar
    files; a folder without shards is one error."""
    (tmp_path / "out").mkdir()
    for name in ("00001.tar", "00000.tar", "00002.tar"):
        _write(tmp_path / "out" / name, 2)
    (tmp_path / "out" / "00000_stats.json").write_text("{}")
    shards = [f"{tmp_path}/out/0000{i}.tar" for i in range(3)]
    for spec in (f"{tmp_path}/out", f"{tmp_path}/out/", f"{tmp_path}/out/*.tar", f"{tmp_path}/out/0000?.tar"):
        assert loaders.expand_shards(spec) == shards, spec
    assert loaders.expand_shards(f"{tmp_path}/out:0.5,{tmp_path}/out/00000.tar") == shards + shards[:1]
    loader = loaders.image_text_loader(f"{tmp_path}/out", batch_size=2, transform=_tf, tokenize=len, shuffle=False)
    assert sum(len(b["key"]) for b in loader) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(loaders.DataError, match=r"empty is a folder without \.tar shards"):
        loaders.image_text_loader(str(tmp_path / "empty"), batch_size=2, transform=_tf, tokenize=len)
    with pytest.raises(loaders.DataError, match=r"none of the shards of '.*/out/\*\.tgz' exists"):
        loaders.image_text_loader(f"{tmp_path}/out/*.tgz", batch_size=2, transform=_tf, tokenize=len)


def test_a_source_of_missing_shards_warns_and_a_broken_pattern_is_one_error(tmp_path):
    """A source none of whose shards exists (a typo in a mixture's path) is said when the loader is made, not
    only counted as missing_shard draw after draw; a pattern braceexpand cannot read is a DataError."""
    import warnings

    _write(tmp_path / "a.tar", 20, 0)
    make = functools.partial(loaders.image_text_loader, batch_size=20, transform=_tf, tokenize=len, resampled=True,
                             samples_per_epoch=20)
    with pytest.warns(UserWarning, match=r"source '.*/nowhere/\{0\.\.3\}\.tar': none of its 4 shards exists"):
        make(f"{tmp_path}/a.tar:0.8,{tmp_path}/nowhere/{{0..3}}.tar:0.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one shard there is enough (the others are counted as they are met)
        make(f"{tmp_path}/{{a,b}}.tar,http://example.invalid/{{0..3}}.tar")
    with pytest.raises(loaders.DataError, match=r"^shard pattern '.*\{0\.\.3\.tar': Unbalanced braces"):
        make(f"{tmp_path}/{{0..3.tar")
    with pytest.raises(loaders.DataError, match=r"^none of the shards of '.*/nowhere/\{0\.\.3\}\.tar' exists"):
        make(f"{tmp_path}/nowhere/{{0..3}}.tar")  # nothing to read at all: an error, not a warning


def test_shard_shorter_than_its_manifest_is_truncated(tmp_path):
    _write(tmp_path / "00000.tar", 10)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 12}))  # promises 12
    loader = loaders.image_text_loader(str(tmp_path / "00000.tar"), batch_size=4, transform=_tf,
                                       tokenize=lambda t: torch.zeros(len(t), 2))
    assert sum(len(b["key"]) for b in loader) == 10
    assert loader.stats()["skipped"] == {"truncated_shard": 1}


def _member_offsets(path):
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data + m.size) for m in tar.getmembers()]  # (header start, data end)


@pytest.mark.parametrize("damage", ["cut_on_header", "cut_in_header", "damaged_header"])
def test_shard_that_tarfile_ends_quietly_is_truncated(tmp_path, damage):
    """tarfile takes a stream cut at or inside a header, or a garbled header, as the end of the archive: without a
    manifest, only the missing end-of-archive blocks (or the data after the stop) show the loss."""
    path = tmp_path / "t.tar"
    _write(path, 10)
    data = path.read_bytes()
    header = _member_offsets(path)[12][0]  # sample 4's first member: samples 0-3 are whole before it
    data = {"cut_on_header": data[:header], "cut_in_header": data[:header + 300],
            "damaged_header": data[:header] + b"\xff" * 512 + data[header + 512:]}[damage]
    path.write_bytes(data)
    make = functools.partial(loaders.image_text_loader, str(path), batch_size=4, transform=_tf,
                             tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False)
    loader = make()
    assert sum(len(b["key"]) for b in loader) == 4
    assert loader.stats()["skipped"] == {"truncated_shard": 1}
    why = ("the tar reader stopped at a damaged header; data after byte" if damage == "damaged_header" else
           f"ends at byte {len(data)} without the tar end-of-archive blocks \\(cut short\\)$")
    with pytest.raises(loaders.DataError, match=f"^truncated_shard: {path}: {why}"):
        list(make(strict=True))


def test_whole_shards_of_other_writers_are_not_truncated(tmp_path):
    import gzip
    import subprocess
    import tarfile

    _write(tmp_path / "a.tar", 6)
    _write(tmp_path / "empty.tar", 0)  # img2dataset writes shards without successes
    (tmp_path / "src").mkdir()
    with tarfile.open(tmp_path / "a.tar") as tar:
        tar.extractall(tmp_path / "src", filter="data")
    names = sorted(p.name for p in (tmp_path / "src").iterdir())
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu.tar"), "-C", str(tmp_path / "src"), *names], check=True)
    with tarfile.open(tmp_path / "ustar.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            tar.add(tmp_path / "src" / name, arcname=name)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    for name, n in (("a.tar", 6), ("empty.tar", 0), ("gnu.tar", 6), ("ustar.tar", 6), ("a.tar.gz", 6)):
        loader = loaders.image_text_loader(str(tmp_path / name), batch_size=4, transform=_tf, strict=True,
                                           tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False)
        assert sum(len(b["key"]) for b in loader) == n, name
        assert loader.stats()["skipped"] == {}, name


@pytest.mark.parametrize("codec", ["gzip", "bz2", "lzma"])
def test_cut_compressed_shard_is_counted_wherever_the_cut_falls(tmp_path, codec):
    """tarfile's own decompression stops quietly where a compressed file does, so a cut that fell between members
    read as a clean end (about one cut in 20 of a gzip shard). Every cut, at 40 places through the file, is
    counted once as truncated_shard, and in strict mode is one line; a whole shard, one followed by zero padding
    and one of two concatenated members count nothing."""
    import importlib

    compress = importlib.import_module(codec).compress
    _write(tmp_path / "a.tar", 10)
    tar = (tmp_path / "a.tar").read_bytes()
    packed = compress(tar)

    def read(data, strict=False):
        path = tmp_path / "x.tar.gz"
        path.write_bytes(data)
        loader = loaders.image_text_loader(str(path), batch_size=4, transform=_tf, strict=strict,
                                           tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False)
        return sum(len(b["key"]) for b in loader), loader.stats()["skipped"]

    for cut in range(1, len(packed), -(-len(packed) // 40)):
        n, skipped = read(packed[:cut])
        assert skipped.pop("truncated_shard", 0) == 1, (cut, n)
        assert set(skipped) <= {"missing_caption", "missing_image"}, (cut, skipped)  # the cut sample's other half
    half = len(tar) // 2 // 512 * 512
    for whole in (packed, packed + bytes(1000), compress(tar[:half]) + compress(tar[half:])):
        assert read(whole) == (10, {})
    with pytest.raises(loaders.DataError) as err:
        read(packed[: len(packed) // 2], strict=True)
    # the error went through webdataset's handler twice (a member's read, then the archive's): said once, without
    # the stream and url webdataset appends. What it says depends on where the cut falls: "unexpected end of data",
    # "truncated header", "the compressed stream ends before its end marker", ...
    message = str(err.value)
    assert message.startswith(f"truncated_shard: {tmp_path / 'x.tar.gz'}: ") and "\n" not in message, message
    assert message.count("truncated_shard") == 1 and "@ <" not in message and "BufferedReader" not in message, message


def test_circuit_breaker_names_the_worst_shard(tmp_path):
    _write(tmp_path / "good.tar", 300)
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        for i in range(300):
            w.write({"__key__": f"b{i}", "jpg": b"<html>oops</html>" if i % 4 == 0 else _jpeg(), "txt": "x"})
    loader = loaders.image_text_loader(f"{tmp_path}/good.tar,{tmp_path}/bad.tar", batch_size=50, transform=_tf,
                                       tokenize=lambda t: torch.zeros(len(t), 2), shuffle=False, skip_window=400)
    with pytest.raises(loaders.DataError, match=r"max_skip_rate 5%.*worst shards: .*bad.tar"):
        list(loader)


def test_caption_from_json_field_or_random_choice(tmp_path):
    _write(tmp_path / "s.tar", 40)
    seen = []
    loader = loaders.image_text_loader(str(tmp_path / "s.tar"), batch_size=40, transform=_tf, tokenize=list,
                                       caption_key=["txt", "alt"], shuffle=False)
    for b in loader:
        seen += b["text"]
    assert {t.split()[0] for t in seen} == {"caption", "alt"}
    only_json = loaders.image_text_loader(str(tmp_path / "s.tar"), batch_size=40, transform=_tf, tokenize=list,
                                          caption_key="alt", shuffle=False)
    assert next(iter(only_json))["text"][:2] == ["alt 0", "alt 1"]


def test_draft_decoding_keeps_the_image_content():
    big = io.BytesIO()
    Image.new("RGB", (512, 384), (10, 200, 30)).save(big, format="JPEG")
    img = loaders.pipeline.decode_image({"jpg": big.getvalue()}, draft_size=64)
    assert min(img.size) >= 64 and img.size[0] < 512
    assert abs(img.getpixel((5, 5))[1] - 200) < 8


def test_caption_table_rows_without_image_or_caption_are_left_out_and_bad_json_names_its_line(tmp_path):
    from loaders.shards import records_from_table

    (tmp_path / "t.jsonl").write_text('{"image": "a.jpg", "caption": " a cat "}\n\n'
                                      '{"image": "b.jpg", "caption": null}\n'
                                      '{"image": null, "caption": "x"}\n{"image": "c.jpg", "caption": 7}\n')
    with pytest.warns(UserWarning, match=r"2 rows of .*t.jsonl have no image or no caption .*data row 2\)"):
        rows = records_from_table(tmp_path / "t.jsonl")
    assert rows == [(str(tmp_path / "a.jpg"), "a cat"), (str(tmp_path / "c.jpg"), "7")]  # never the caption "None"
    (tmp_path / "t.csv").write_text('image,caption\na.jpg,"with, a comma"\nb.jpg,\n')
    with pytest.warns(UserWarning, match="1 rows"):
        assert records_from_table(tmp_path / "t.csv") == [(str(tmp_path / "a.jpg"), "with, a comma")]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", caption}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not JSON"):
        records_from_table(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('["a.jpg", "x"]\n')
    with pytest.raises(ValueError, match=r"list.jsonl, line 1: expected a JSON object"):
        records_from_table(tmp_path / "list.jsonl")


def test_caption_table_columns_by_name_and_urls_are_for_img2dataset(tmp_path):
    from loaders.shards import records_from_table

    (tmp_path / "t.tsv").write_text("filepath\ttitle\na.jpg\ta cat\n")  # open_clip's CsvDataset columns
    with pytest.raises(ValueError, match=r"t.tsv: no column 'image' \(columns: filepath, title; give the image "
                                         r"column, e.g. 'filepath', as image_col / --image-col\)"):
        records_from_table(tmp_path / "t.tsv")
    with pytest.raises(ValueError, match=r"no column 'caption' \(columns: filepath, title; .* e.g. 'title'"):
        records_from_table(tmp_path / "t.tsv", image_col="filepath")
    assert records_from_table(tmp_path / "t.tsv", "filepath", "title") == [(str(tmp_path / "a.jpg"), "a cat")]
    # img2dataset's input (url, caption): a clear pointer to it, not one unreadable "image" per row
    (tmp_path / "u.csv").write_text("url,caption\na.jpg,local\nhttps://example.com/b.jpg,remote\n")
    with pytest.raises(ValueError, match=r"u.csv: 1 of 2 rows give the image as a URL \(e.g. data row 2: "
                                         r"https://example.com/b.jpg\); .* img2dataset \(--input_format csv "
                                         r"--url_col url --caption_col caption --output_format webdataset\)"):
        records_from_table(tmp_path / "u.csv", image_col="url")


class _Pids(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield torch.tensor(os.getpid())


def _blocked_signals(pid: int) -> int:
    """The signal mask of a process's main thread (/proc's SigBlk: bit n-1 for signal n)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("SigBlk:")[1].split()[0], 16)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="Linux's sigwaitinfo (macOS spawns its workers)")
def test_loader_workers_leave_the_jobs_signals_to_the_training_process():
    """SIGTERM and SIGINT to a whole job (SLURM, torchrun, Ctrl-C) reach the loader's workers too: they keep working
    (the training process stops on its own and ends them), and end quietly only when their parent ends them
    (the loader's terminate of a worker that did not end in time). Blocked from birth: no moment in which the
    signal kills the worker or raises in torch's worker loop (where it once left the loader's lock held and the
    training process waiting on it forever)."""
    import subprocess

    it = loaders.started(torch.utils.data.DataLoader(_Pids(), batch_size=None, num_workers=1,
                                                     worker_init_fn=loaders.leave_signals_to_the_parent))
    try:
        term_int = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGINT}  # put back here
        pid = int(next(it))
        assert _blocked_signals(pid) & term_int == term_int
        for name in ("TERM", "INT", "TERM"):  # from another process, as the job's signal comes
            subprocess.run(["kill", f"-{name}", str(pid)], check=True)
        time.sleep(0.3)
        assert [int(next(it)) for _ in range(3)] == [pid] * 3 and it._workers[0].is_alive()
        os.kill(pid, signal.SIGTERM)  # from its parent
        it._workers[0].join(10)
        assert it._workers[0].exitcode == 0
    finally:
        it._shutdown_workers()
