"""The quickstart: make procedural image-caption shards, pretrain a small MoE CLIP on them on the CPU,
and zero-shot-classify a held-out split by object colour and by background colour with prompt
ensembles built from the class names."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import loaders
import zeroshot
from loaders import synthetic

from .config import RunConfig, apply_overrides, from_dict
from .errors import make_folder
from .factory import create_transforms, get_tokenizer
from .model import CLIP
from .train import train

# The embedded default; configs/quickstart.yaml holds the same run (a test keeps them equal).
QUICKSTART = {
    "model": {
        "arch": "clipmoe-tiny",
        "overrides": {
            "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 2, "expert_mlp_ratio": 2.0}},
            "text": {"moe": {"num_experts": 4, "top_k": 2, "every": 2, "expert_mlp_ratio": 2.0}},
        },
    },
    "data": {"train": "quickstart_out/shards/train/{00000..00007}.tar", "eval": "quickstart_out/shards/eval/00000.tar",
             "batch_size": 128},
    "loss": {"balance_coef": 0.01, "z_coef": 0.001},
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 50},
    "train": {"steps": 600, "log_every": 10, "out_dir": "quickstart_out/run", "seed": 0},
    "eval": {"every": 200},  # the held-out pairs (data.eval) at steps 200, 400 and 600
}
TRAIN_SAMPLES, EVAL_SAMPLES, SHARDS = 24_000, 1_000, 8



def _prompts(attr: str, classname: str) -> list[str]:
    """A prompt ensemble for one class: phrases naming it, alone and beside each shape (averaging over
    those marginalises the shape out, as CLIP's templates do for context)."""
    if attr == "colour":
        return ([f"something {classname}", f"{classname} shapes", f"an image showing {classname} objects"]
                + [f"a {classname} {shape}" for shape in synthetic.SHAPES])
    a = synthetic.article(classname)
    return ([f"on {a} {classname} background", f"something against {a} {classname} backdrop",
             f"the background is {classname}"]
            + [f"a {shape} on {a} {classname} background" for shape in synthetic.SHAPES])


# Attributes of the held-out scenes that the quickstart classifies zero-shot, with their class names.
EVAL_ATTRIBUTES = {"colour": list(synthetic.COLOURS), "background": list(synthetic.BACKGROUNDS)}


def make_data(out_dir: str | Path, seed: int = 0, train_samples: int = TRAIN_SAMPLES, eval_samples: int = EVAL_SAMPLES,
              shards: int = SHARDS, progress: bool = True) -> tuple[str, str]:
    """Writes train and eval shards (img2dataset layout); returns their brace patterns."""
    out_dir = Path(out_dir)
    per_shard = -(-train_samples // shards)
    train_iter = tqdm(synthetic.scenes(train_samples, seed, "train"), total=train_samples, desc="shards",
                      disable=not progress)
    loaders.write_shards(train_iter, out_dir / "train", samples_per_shard=per_shard)
    loaders.write_shards(synthetic.scenes(eval_samples, seed, "eval"), out_dir / "eval", samples_per_shard=eval_samples)
    return loaders.shard_urls(out_dir / "train"), loaders.shard_urls(out_dir / "eval")


@torch.no_grad()
def evaluate_attributes(model: CLIP, eval_urls: str, batch_size: int = 250) -> dict:
    """Zero-shot top-1 per attribute on the eval shards, with the chance level 1 / classes."""
    model.eval()
    _, eval_tf = create_transforms(model.config)
    tokenizer = get_tokenizer(model)
    loader = loaders.image_text_loader(eval_urls, batch_size=batch_size, transform=eval_tf, tokenize=tokenizer,
                                       shuffle=False, with_meta=True)
    device = next(model.parameters()).device
    features, metas = [], []
    for batch in loader:
        features.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        metas.extend(batch["meta"])
    image_features = torch.cat(features)
    results = {}
    for attr, classnames in EVAL_ATTRIBUTES.items():
        prompts = {c: _prompts(attr, c) for c in classnames}
        weights = zeroshot.build_classifier(model.encode_text, tokenizer, classnames, prompts, device=device)
        labels = torch.tensor([classnames.index(m[attr]) for m in metas])
        metrics = zeroshot.classification_metrics(image_features @ weights, labels)
        results[attr] = {"top1": metrics["top1"], "chance": 1 / len(classnames),
                         "mean_per_class_recall": metrics["mean_per_class_recall"], "num_classes": len(classnames),
                         "num_samples": len(labels)}
    return results


def quickstart_config(out_dir: str | Path = "quickstart_out", overrides: list[str] = ()) -> RunConfig:
    out = Path(out_dir)
    data = json.loads(json.dumps(QUICKSTART))  # a deep copy
    data["data"]["train"] = f"{out}/shards/train/{{00000..{SHARDS - 1:05d}}}.tar"
    data["data"]["eval"] = f"{out}/shards/eval/00000.tar"
    data["train"]["out_dir"] = str(out / "run")
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))


def quickstart(out_dir: str | Path = "quickstart_out", overrides: list[str] = (), seed: int = 0,
               progress: bool = True) -> dict:
    """Runs the whole quickstart; returns (and writes to OUT/results.json) the zero-shot results."""
    start = time.time()
    out = make_folder(out_dir, "out")
    cfg = quickstart_config(out, overrides)
    _, eval_urls = make_data(out / "shards", seed=seed, progress=progress)
    run = Path(cfg.train.out_dir)
    if run == out / "run" and cfg.train.resume is None and run.is_dir():  # a rerun of the demo replaces its run
        print(f"quickstart: replacing the previous run in {run}")
        shutil.rmtree(run)
    result = train(cfg, progress=progress)
    results = evaluate_attributes(result.model, eval_urls)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = {
        "results": results, "seconds": round(time.time() - start, 1), "data": result.data_stats,
        "validation": result.validation[-1] if result.validation else None,
        "files": {k: str(v) for k, v in result.files.items()} | {"results": str(out / "results.json")},
    }
    return summary


def format_table(results: dict) -> str:
    lines = [f"{'attribute':<10} {'classes':>7} {'top-1':>7} {'chance':>7} {'x chance':>8}"]
    for attr, r in results.items():
        lines.append(f"{attr:<10} {r['num_classes']:>7} {r['top1']:>7.1%} {r['chance']:>7.1%} "
                     f"{r['top1'] / r['chance']:>8.1f}")
    return "\n".join(lines)
