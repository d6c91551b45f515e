"""Zero-shot classifier benchmark: time to build the ImageNet-1k classifier (its class names x OpenAI's 80
templates) with ViT-B-32, clipmoe/zeroshot vs open_clip's `build_zero_shot_classifier`, same weights, same
process, and the cosine between the two classifiers.

    python scripts/bench/zeroshot.py [--classes 1000] [--templates 80] [--device cpu] [--reps 1]

`--classes N` takes N ImageNet classes spread evenly over the list (the full 1000 x 80 = 80,000 prompts
takes open_clip about 40 minutes on a 2-core CPU; the per-prompt rates do not depend on N).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date

# this file is named zeroshot.py: keep its folder off the path so `import zeroshot` finds the package
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

import clipmoe
import zeroshot
from clipmoe.checkpoint import load_weights


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--templates", type=int, default=80)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024, help="clipmoe prompts per batch")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).to(device).eval()
    ours = clipmoe.create_model("ViT-B-32")
    load_weights(ours, ref.state_dict(), "open_clip ViT-B-32")
    ours = ours.to(device).eval()
    step = max(1, len(IMAGENET_CLASSNAMES) // args.classes)  # spread over the list: names vary in length
    names = list(IMAGENET_CLASSNAMES[::step][:args.classes])
    templates = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES[:args.templates]]
    callables = list(OPENAI_IMAGENET_TEMPLATES[:args.templates])
    oc_tok, our_tok = open_clip.get_tokenizer("ViT-B-32"), clipmoe.get_tokenizer(ours)
    n = len(names) * len(templates)
    print(f"# {date.today()} {platform.node()} {device} torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"# ViT-B-32 (random weights, identical in both), {len(names)} classes x {len(templates)} templates "
          f"= {n} prompts")
    t_oc, t_ours = [], []
    with torch.inference_mode():
        for _ in range(args.reps):
            theirs, dt = _timed(lambda: open_clip.build_zero_shot_classifier(
                ref, oc_tok, names, callables, num_classes_per_batch=10, device=device, use_tqdm=False), device)
            t_oc.append(dt)
            mine, dt = _timed(lambda: zeroshot.build_classifier(ours.encode_text, our_tok, names, templates,
                                                                 batch_size=args.batch_size, device=device), device)
            t_ours.append(dt)
    cos = torch.nn.functional.cosine_similarity(mine.cpu(), theirs.float().cpu(), dim=0)
    a, b = min(t_oc), min(t_ours)
    print(f"{'implementation':<34} {'seconds':>9} {'prompts/s':>10}")
    print(f"{'open_clip build_zero_shot_classifier':<34} {a:9.2f} {n / a:10.0f}")
    print(f"{'clipmoe zeroshot.build_classifier':<34} {b:9.2f} {n / b:10.0f}")
    print(f"speed-up {a / b:.2f}x; per-class cosine min {cos.min().item():.7f}")


if __name__ == "__main__":
    main()
