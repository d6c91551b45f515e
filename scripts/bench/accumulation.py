"""Gradient accumulation (`train.accum_freq`, `clipmoe.accumulation`): the time and the activation memory of one
training step's gradient over a batch of B pairs, as one batch and as N accumulated batches of B / N, on an
upcycled MoE CLIP (same process, same weights and data, the two interleaved).

    python scripts/bench/accumulation.py [--arch ViT-B-32] [--batch 64] [--accum 2 4] [--reps 3] [--device cpu]

"Saved" is the most that autograd holds for one backward: every tensor saved during one forward with gradients
(weights saved by reference included), through `torch.autograd.graph.saved_tensors_hooks`; accumulated, the
largest of the N passes. Both compute the same gradient (tests/test_accumulation.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from datetime import date

import torch

import clipmoe
from clipmoe.accumulation import accumulated_backward
from clipmoe.config import LossConfig
from clipmoe.loss import total_loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--accum", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = clipmoe.upcycle(clipmoe.create_model(args.arch), num_experts=8, top_k=2, every=2,
                            capacity_factor=None).train().to(device)
    size = model.config.vision.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    captions = [f"a photo of {i} dogs playing in the park with a ball" for i in range(args.batch)]
    tokens = clipmoe.get_tokenizer(model)(captions).to(device)
    cfg = LossConfig()
    peak = [0]

    def counted(fn):
        """`fn()`, the bytes autograd saved in it added to the running pass's count (kept if the largest)."""
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        peak[0] = max(peak[0], total[0])
        return out

    def whole():
        terms = total_loss(counted(lambda: model(images, tokens)), cfg)
        terms["loss"].backward()

    def accumulated(n):
        chunks = list(zip(images.chunk(n), tokens.chunk(n)))
        accumulated_backward(lambda j: counted(lambda: model(*chunks[j])), n, cfg, torch.Tensor.backward,
                             contextlib.nullcontext, device)

    variants = {"one batch": whole, **{f"{n} x {args.batch // n}": (lambda n=n: accumulated(n)) for n in args.accum}}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, saved = {name: [] for name in variants}, {}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, fn in variants.items():
            peak[0] = 0
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if rep:
                times[name].append(time.perf_counter() - t)
            saved[name] = peak[0] / 2 ** 20
            model.zero_grad(set_to_none=True)

    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__}"
          f" threads {torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}"
          f" GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '')}")
    print(f"# {args.arch} upcycled: 8 experts, top-2, every 2nd block, dropless; batch {args.batch}; "
          f"median of {args.reps} steps (forward, loss, backward)")
    base = statistics.median(times["one batch"])
    for name in variants:
        t = statistics.median(times[name])
        print(f"{name:<10} saved {saved[name]:9.1f} MiB ({saved[name] / saved['one batch']:.2f}x)   "
              f"step {t:7.3f} s ({t / base:.2f}x)")


if __name__ == "__main__":
    main()
