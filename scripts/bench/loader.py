"""Loader benchmark: samples/s of one worker (decode + augment + tokenise) for clipmoe's loader and for
open_clip_train's WebDataset pipeline, same shards, same run.

open_clip_train 3.3's own `get_wds_dataset` breaks on webdataset 1.0 (its `group_by_keys_nothrow` reads the
end-of-shard marker `{}` and raises KeyError 'fname'), so the reference is its pipeline rebuilt stage by
stage from webdataset with the tar reader it names in a comment (`wds.tarfile_to_samples`): select,
decode("pilrgb"), rename, map_dict(preprocess, tokenizer), to_tuple, batched; shuffles as in training.

    python scripts/bench/loader.py [--sizes 256 512] [--samples 2000] [--image-size 224]

Shards are written once under --root with JPEGs of each source size (textured scenes). Columns: open_clip's
pipeline; clipmoe's loader with open_clip's transform ("same tf"); with the fast transform returning
normalised float32 ("fast f32"); and returning uint8 for the trainer to normalise on its device ("fast u8").
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

import loaders
from loaders import synthetic
from loaders.transforms import TrainTransform


def make_shards(root: Path, size: int, samples: int) -> str:
    out = root / f"jpeg{size}"
    if not (out / "manifest.json").is_file():
        rng = np.random.default_rng(size)

        def photos():
            for s in synthetic.scenes(samples, size, image_size=size):
                noise = rng.integers(-18, 18, (size, size, 3))  # photo-like texture, not flat colour
                arr = np.clip(np.asarray(s["image"], dtype=np.int16) + noise, 0, 255).astype(np.uint8)
                yield {**s, "image": Image.fromarray(arr)}

        loaders.write_shards(photos(), out, samples_per_shard=500)
    return loaders.shard_urls(out)


def open_clip_pipeline(urls: str, preprocess, tokenizer, batch_size: int = 64):
    import webdataset as wds
    from open_clip_train.data import (
        _SAMPLE_SHUFFLE_INITIAL,
        _SAMPLE_SHUFFLE_SIZE,
        _SHARD_SHUFFLE_INITIAL,
        _SHARD_SHUFFLE_SIZE,
        detshuffle2,
        filter_no_caption_or_no_image,
        log_and_continue,
    )

    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=0, epoch=0),
        wds.split_by_node, wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        wds.shuffle(bufsize=_SAMPLE_SHUFFLE_SIZE, initial=_SAMPLE_SHUFFLE_INITIAL),
        wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )


def rate(batches, limit: int) -> float:
    it = iter(batches)
    next(it)  # start-up (shuffle buffer, first decode) is not the steady rate
    n, t = 0, time.perf_counter()
    for batch in it:
        n += len(batch["key"]) if isinstance(batch, dict) else len(batch[0])
        if n >= limit:
            break
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--root", default="/tmp/clipmoe-bench-shards")
    args = p.parse_args()
    preprocess = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    torch.set_num_threads(1)  # a loader worker's setting (the DataLoader sets it in every worker)
    print(f"# {date.today()} {platform.node()} 1 worker (in process, 1 thread), {args.image_size} px, batch 64")
    print(f"{'source px':>9} | {'open_clip /s':>12} {'same tf /s':>10} {'fast f32 /s':>11} {'fast u8 /s':>10} | "
          f"{'same':>5} {'f32':>5} {'u8':>5}")
    for size in args.sizes:
        urls = make_shards(Path(args.root), size, args.samples + 1000)
        r_oc = rate(({"key": b[0]} for b in open_clip_pipeline(urls, preprocess, tokenizer)), args.samples)
        rates = []
        for tf in (preprocess, TrainTransform(args.image_size, normalize=True), TrainTransform(args.image_size)):
            ours = loaders.image_text_loader(urls, batch_size=64, transform=tf, tokenize=tokenizer,
                                             draft_size=args.image_size)
            rates.append(rate(ours, args.samples))
        print(f"{size:>9} | {r_oc:>12.0f} {rates[0]:>10.0f} {rates[1]:>11.0f} {rates[2]:>10.0f} | "
              + " ".join(f"{r / r_oc:>5.2f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
