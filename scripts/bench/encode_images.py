"""Image embedding benchmark: images/s of `clipmoe.encode_image(paths, model)` against plain decoding (the loop
open_clip's README shows: open each image, apply the preprocessing, stack a batch, `encode_image`), same model,
same JPEG files, same process.

    python scripts/bench/encode_images.py [--images 256] [--archs clipmoe-micro ViT-B-32] [--device cpu]

The JPEGs (500x375, textured) are written once under --root. clipmoe-micro (16 px input) shows the decoding
alone; ViT-B-32 on a CPU is bound by the model, on a GPU by the decoding.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clipmoe


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"{i:05d}.jpg"
        if not path.is_file():
            pixels = (rng.random((375, 500, 3)) * 255).astype("uint8")
            pixels[:, :250] //= 4
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def _plain(model, preprocess, paths: list[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
        out.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    return torch.cat(out)


def _best(fn, reps: int, device) -> tuple[torch.Tensor, float]:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--archs", nargs="+", default=["clipmoe-micro", "ViT-B-32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--root", default="/tmp/clipmoe_bench_encode")
    args = p.parse_args()
    device = torch.device(args.device)
    paths = _images(Path(args.root), args.images)
    print(f"# {date.today()} {platform.node()} {device} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"cpus {os.cpu_count()}; {len(paths)} JPEGs 500x375, batch {args.batch_size}")
    print(f"{'arch':<16} {'plain img/s':>12} {'clipmoe img/s':>14} {'speed-up':>9} {'max diff':>9}")
    for arch in args.archs:
        torch.manual_seed(0)
        model = clipmoe.create_model(arch).to(device).eval()
        _, preprocess = clipmoe.create_transforms(model.config)
        with torch.inference_mode():
            clipmoe.encode_image(paths[:4], model)  # warm-up
            ref, t_plain = _best(lambda: _plain(model, preprocess, paths, args.batch_size, device), args.reps, device)
            ours, t_ours = _best(lambda: clipmoe.encode_image(paths, model, batch_size=args.batch_size),
                                 args.reps, device)
        n = len(paths)
        print(f"{arch:<16} {n / t_plain:12.1f} {n / t_ours:14.1f} {t_plain / t_ours:8.2f}x "
              f"{(ref - ours).abs().max().item():9.1e}")


if __name__ == "__main__":
    main()
