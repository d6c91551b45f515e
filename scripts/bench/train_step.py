"""Training-step benchmark on a GPU: one bf16 step (forward, loss, backward, AdamW) of an MoE CLIP with its
MoE layers eager vs with the image tower's MoE layers replayed as CUDA graphs (`train.cuda_graphs`), same
process, same weights, same batch, the two interleaved step by step.

    python scripts/bench/train_step.py [--arch clipmoe-tiny] [--batch 128] [--steps 30] [--experts 4 --top-k 2]

Prints the median step time of each and their ratio. The model is the quickstart's unless told otherwise
(MoE layers in every 2nd block of both towers; the text tower's stay eager: token masks change their shapes).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from datetime import date

import torch

import clipmoe
from clipmoe import cuda_graphs
from clipmoe.config import LossConfig, OptimConfig
from clipmoe.loss import total_loss
from clipmoe.train import build_optimizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="clipmoe-tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test the script: nothing is captured there")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    moe = {"num_experts": args.experts, "top_k": args.top_k, "every": 2, "capacity_factor": args.capacity_factor}
    model = clipmoe.create_model(args.arch, vision={"moe": moe}, text={"moe": moe}).to(device).train()
    size = model.config.vision.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    captions = [f"a photo of {i % 7} red squares on a blue background" for i in range(args.batch)]
    tokens = clipmoe.get_tokenizer(model)(captions).to(device)
    models = {"eager": model, "graphed": copy.deepcopy(model)}
    layers = cuda_graphs.capture_model(models["graphed"], images, tokens, autocast_dtype=torch.bfloat16)
    steps, times = {}, {name: [] for name in models}
    for name, m in models.items():
        opt, _ = build_optimizer(m, OptimConfig(), args.steps)

        def step(m=m, opt=opt, cache=name == "eager"):
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache):
                out = m(images, tokens)
            loss = total_loss(out, LossConfig())["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.steps + 3):  # 3 warm-up steps each
        for name, step in steps.items():
            sync()
            t = time.perf_counter()
            step()
            sync()
            if i >= 3:
                times[name].append(time.perf_counter() - t)
    eager, graphed = (statistics.median(times[n]) * 1e3 for n in ("eager", "graphed"))
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"# {date.today()} {platform.node()} {where} torch {torch.__version__}")
    print(f"# {args.arch}, batch {args.batch}, {args.experts} experts top-{args.top_k} cf {args.capacity_factor} "
          f"every 2nd block of both towers; graphed layers: {', '.join(f'{m.tower}.{m.block}' for m in layers)}")
    print(f"train step ms: eager {eager:.2f}  graphed {graphed:.2f}  eager/graphed {eager / graphed:.2f}")


if __name__ == "__main__":
    main()
