"""Activation checkpointing (`CLIP.set_grad_checkpointing`): what autograd keeps for the backward and the time of
a forward + backward, with and without, on an upcycled MoE CLIP (same process, the two interleaved).

    python scripts/bench/grad_checkpointing.py [--arch ViT-B-32] [--batch 32] [--reps 4] [--device cpu]

"Saved" counts every tensor autograd saves during one forward (weights saved by reference included), through
`torch.autograd.graph.saved_tensors_hooks`.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date

import torch

import clipmoe


def saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    model = clipmoe.upcycle(clipmoe.create_model(args.arch), num_experts=8, top_k=2, every=2,
                            capacity_factor=1.25).train().to(args.device)
    size = model.config.vision.image_size
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    tokens = clipmoe.get_tokenizer(model)(["a photo of a dog playing in the park with a ball"] * args.batch)
    tokens = tokens.to(args.device)

    def step():
        out = model(images, tokens)
        (out.image_features @ out.text_features.t()).sum().backward()
        model.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__}"
          f" threads {torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}"
          f" GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '')}")
    print(f"# {args.arch} upcycled: 8 experts, top-2, every 2nd block, capacity 1.25; batch {args.batch}")
    saved, times = {}, {False: [], True: []}
    for flag in (False, True):
        model.set_grad_checkpointing(flag)
        saved[flag] = saved_bytes(lambda: model(images, tokens)) / 2 ** 20
    for _ in range(args.reps):
        for flag in (False, True):
            model.set_grad_checkpointing(flag)
            t = time.perf_counter()
            step()
            times[flag].append(time.perf_counter() - t)
    med = {flag: statistics.median(ts[1:] if len(ts) > 1 else ts) for flag, ts in times.items()}
    for flag, name in ((False, "plain"), (True, "checkpointed")):
        print(f"{name:<13} saved {saved[flag]:9.1f} MiB   forward+backward {med[flag]:7.3f} s"
              f"   ({med[flag] / med[False]:.2f}x)")


if __name__ == "__main__":
    main()
