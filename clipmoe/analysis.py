"""Routing analysis: which experts take which caption words and image patches, per MoE layer."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import loaders

from .encode import ModelRef, resolve_model
from .errors import ClipmoeError, make_folder
from .factory import MEAN, STD, create_transforms, get_tokenizer
from .moe import MoE
from .plots import plot_routing


@torch.no_grad()
def analyze_routing(model: ModelRef, urls, out_dir: str | Path, num_batches: int = 4, batch_size: int = 64,
                    top_words: int = 10, min_count: int = 3, top_patches: int = 8, caption_key="txt",
                    progress: bool = False) -> dict:
    """Routes `num_batches` batches of shards through `model` (or a `clipmoe.save` file or training checkpoint,
    loaded on the CPU) and writes `routing.json` and `routing.png`.

    What an expert "takes" is what it computed: every kept choice of top-k routing (with k = 2 a token counts
    for both its experts; dropped choices for none), and each expert's picks in expert choice.

    Returns per MoE layer ("image.3", "text.1", ...): `load` (each expert's fraction of the layer's computed
    (token, expert) pairs), and for text layers `top_words` per expert: [word, count, share] for the words of
    which it takes the largest share of occurrences (words seen at least `min_count` times; by raw count alone
    every expert's list would start with "a" and "the"; with k = 2 the shares of a word sum to 2 over the
    experts; whole words: the BPE pieces "cy" and "an" of "cyan" count for "cyan", so counts are of tokens),
    or for image layers `patch_map` per expert (fraction of its tokens at each grid position, CLS first) and
    `top_patches` per expert: [sample key, patch index (row-major, CLS not counted), router probability] of the
    `top_patches` image patches it computed with the highest probability for it (shown as pixels in the PNG).
    Samples or shards the loader skipped (corrupt, missing) are counted and named in a warning. `caption_key`: as
    the loader's (a key.json field). `progress`: a progress bar over the batches.
    """
    for name, value, least in (("num_batches", num_batches, 1), ("batch_size", batch_size, 1),
                               ("top_words", top_words, 0), ("top_patches", top_patches, 0)):
        if value < least:
            raise ClipmoeError(f"{name} must be >= {least}, got {value}")
    model = resolve_model(model)
    if not any(isinstance(m, MoE) for m in model.modules()):
        raise ClipmoeError("the model has no MoE layers: there is no routing to analyse (upcycle it first)")
    _, eval_tf = create_transforms(model.config)
    tokenizer = get_tokenizer(model)
    loader = loaders.image_text_loader(urls, batch_size=batch_size, transform=eval_tf, tokenize=tokenizer,
                                       shuffle=False, caption_key=caption_key)
    out_dir = make_folder(out_dir, "out_dir")  # after the loader, which names missing shards: no empty folder then
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    patch_size = model.config.vision.patch_size
    grid_tokens = (model.config.vision.image_size // patch_size) ** 2 + 1
    words: dict[str, list[Counter]] = {}  # per layer: per expert, the words of the tokens it computed
    seen: dict[str, Counter] = {}  # per layer: the words of its routed tokens (a word's pieces count each)
    patches: dict[str, torch.Tensor] = {}
    best: dict[str, list[list[tuple]]] = {}  # per image layer: per expert, (probability, key, patch index, pixels)
    loads: dict[str, torch.Tensor] = {}
    bar = None  # made at the first batch: data that yields none is one error line, not a bar and an error
    try:
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            if bar is None:
                bar = tqdm(total=num_batches, desc="routing", unit="batch", disable=not progress)
            bar.update()
            tokens = batch["text"]
            out = model(batch["image"].to(device), tokens.to(device))
            L = int(tokens.argmax(-1).max()) + 1
            routed = torch.arange(L) <= tokens.argmax(-1, keepdim=True)  # up to the end token: the text tower's order
            routed_words = [w for row, keep in zip(tokens[:, :L].tolist(), routed.tolist())
                            for w, k in zip(tokenizer.words(row), keep) if k]
            for a in out.aux:
                name = f"{a.tower}.{a.block}"
                E = a.tokens_per_expert.numel()
                # what each expert computed: every kept choice of top-k, each expert's picks in expert choice (a
                # CUDA graph's call reports no assignments: its tokens' first choices stand in)
                pairs = a.assignments or (torch.arange(a.top1.numel(), device=a.top1.device), a.top1)
                token_M, expert_M = (t.cpu() for t in pairs)
                loads[name] = loads.get(name, 0) + torch.bincount(expert_M, minlength=E).float()
                if a.tower == "text":
                    counters = words.setdefault(name, [Counter() for _ in range(E)])
                    for t, e in zip(token_M.tolist(), expert_M.tolist()):
                        counters[e][routed_words[t]] += 1
                    seen.setdefault(name, Counter()).update(routed_words)
                else:
                    pos = token_M % grid_tokens
                    hist = torch.zeros(E, grid_tokens).index_put_((expert_M, pos), torch.ones(pos.numel()),
                                                                  accumulate=True)
                    patches[name] = patches.get(name, 0) + hist
                    if a.probs is not None and top_patches > 0:
                        _keep_best(best.setdefault(name, [[] for _ in range(E)]), a.probs.cpu()[token_M, expert_M],
                                   token_M, expert_M, batch, grid_tokens, patch_size, top_patches)
    finally:  # a bar ended by an error still ends its line
        if bar is not None:
            bar.close()
        model.train(was_training)  # a model in training goes on training as it was
    stats = loader.stats()
    if not loads:
        raise ClipmoeError(f"no samples could be read from {urls!r} (skipped: {stats['skipped'] or 'none'})")
    if stats["skipped"]:  # the report covers what was read; say what was not
        warnings.warn(f"analyze_routing could not read all of {urls!r}: skipped {stats['skipped']}; the report "
                      "covers the rest", stacklevel=2)
    report = {}
    for name, load in sorted(loads.items()):
        entry = {"load": (load / load.sum()).tolist()}
        if name in words:
            entry["top_words"] = _top_words(words[name], top_words, min_count, seen[name])
        if name in patches:
            hist = patches[name]
            entry["patch_map"] = (hist / hist.sum(1, keepdim=True).clamp_min(1)).tolist()
        if name in best:
            entry["top_patches"] = [[[key, pos, round(p, 6)] for p, key, pos, _ in top] for top in best[name]]
        report[name] = entry
    (out_dir / "routing.json").write_text(json.dumps(report, indent=1))
    pixels = {name: [[px for *_, px in top] for top in experts] for name, experts in best.items()}
    plot_routing(report, out_dir / "routing.png", grid=int((grid_tokens - 1) ** 0.5), patches=pixels)
    return report


def _keep_best(best: list[list[tuple]], prob_M: torch.Tensor, token_M: torch.Tensor, expert_M: torch.Tensor,
               batch: dict, grid_tokens: int, patch_size: int, k: int) -> None:
    """Merges this batch's image patches into each expert's k most probable ones (the CLS token is no patch)."""
    patch_M = token_M % grid_tokens - 1
    for e, top in enumerate(best):
        m = ((expert_M == e) & (patch_M >= 0)).nonzero().squeeze(1)
        if not m.numel():
            continue
        probs, idx = prob_M[m].topk(min(k, m.numel()))
        for p, j in zip(probs.tolist(), m[idx].tolist()):
            image, patch = int(token_M[j]) // grid_tokens, int(patch_M[j])
            top.append((p, batch["key"][image], patch, _patch_pixels(batch["image"][image], patch, patch_size)))
        top.sort(key=lambda t: -t[0])
        del top[k:]


def _patch_pixels(image_CHW: torch.Tensor, index: int, patch_size: int):
    """(P, P, 3) uint8 pixels of patch `index` (row-major) of a normalised image."""
    grid = image_CHW.shape[-1] // patch_size
    r, c = divmod(index, grid)
    crop = image_CHW[:, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size].float()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (MEAN, STD))
    return (crop * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _top_words(counters: list[Counter], k: int, min_count: int, seen: Optional[Counter] = None) -> list[list]:
    """Per expert, [word, count, share] for the k words of which it took the largest share of the `seen`
    occurrences (default: the counters' sum, as with top-1 routing; ties: more occurrences first), among words
    seen at least `min_count` times (fewer where no word is). Punctuation (",", ".") and special tokens (None)
    are not words and are left out."""
    total = sum(counters, Counter()) if seen is None else seen
    total = Counter({w: n for w, n in total.items() if w and any(ch.isalnum() for ch in w)})
    floor = min(min_count, max(total.values(), default=0))
    out = []
    for c in counters:
        ranked = sorted(((c[w] / n, c[w], w) for w, n in total.items() if n >= floor and c[w]), reverse=True)
        out.append([[w, count, round(share, 4)] for share, count, w in ranked[:k]])
    return out
