"""PNG plots of a run: loss curves, each MoE layer's expert load, routing maps, zero-shot results."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# what a reader needs to read a raw term's scale (the terms are summed over the MoE layers, unweighted)
_TERM_TITLES = {"balance": "balance (sum over layers; 1 each if uniform)", "z": "router z-loss (sum over layers)",
                "loss": "loss (total, weighted)"}


def plot_losses(history: list[dict], path: str | Path, validation: Sequence[dict] = ()) -> Path:
    """One panel per loss term over training steps; the held-out loss (`validation` runs) beside the
    contrastive one."""
    terms = [k for k, v in history[0].items() if k not in ("step", "lr") and isinstance(v, (int, float))] \
        if history else []
    fig, axes = plt.subplots(1, max(1, len(terms)), figsize=(4 * max(1, len(terms)), 3.2), squeeze=False)
    steps = [r["step"] for r in history]
    held_out = [v for v in validation if "loss" in v]  # not the runs that failed
    for ax, term in zip(axes[0], terms):
        ax.plot(steps, [r[term] for r in history], label="train")
        if term == "contrastive" and held_out:
            ax.plot([v["step"] for v in held_out], [v["loss"] for v in held_out], "o-", label="held out")
            ax.legend()
        ax.set_title(_TERM_TITLES.get(term, term), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_expert_load(load: dict[str, list[float]], path: str | Path) -> Path:
    """Bar chart per MoE layer of the fraction of routed assignments each expert took."""
    names = sorted(load, key=lambda k: (k.split(".")[0], int(k.split(".")[1])))
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        fractions = load[name]
        ax.bar(range(len(fractions)), fractions, color="tab:blue" if name.startswith("image") else "tab:orange")
        ax.axhline(1 / len(fractions), color="k", lw=0.8, ls="--")
        ax.set_title(f"{name.replace('.', ' block ')}")
        ax.set_xlabel("expert")
        ax.set_ylim(0, max(max(fractions) * 1.15, 2 / len(fractions)))
    fig.suptitle("expert load (fraction of routed tokens; dashed: uniform)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_moe_history(history: list[dict], path: str | Path) -> Path:
    """Per MoE layer over training steps (the log rows' `moe` reports): fraction of assignments dropped, router
    entropy (dotted: log E, a uniform router) and load imbalance (the busiest expert's tokens over the mean;
    1 is balanced, E is every token on one expert). Collapse shows as entropy falling and imbalance rising."""
    rows = [r for r in history if r.get("moe")]
    names = [f"{m['tower']}.{m['block']}" for m in rows[0]["moe"]] if rows else []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), squeeze=False)
    def imbalance(m):
        counts = m["tokens_per_expert"]
        return max(counts) * len(counts) / max(1, sum(counts))

    panels = [("dropped fraction", lambda m: m["dropped_fraction"]), ("router entropy (nats)", lambda m: m["entropy"]),
              ("load imbalance (max / mean)", imbalance)]
    for ax, (title, value) in zip(axes[0], panels):
        for i, name in enumerate(names):
            ax.plot([r["step"] for r in rows], [value(r["moe"][i]) for r in rows], label=name,
                    ls="-" if name.startswith("image") else "--")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for E in sorted({len(m["tokens_per_expert"]) for m in rows[0]["moe"]} if rows else []):
        axes[0][1].axhline(math.log(E), color="k", lw=0.8, ls=":")
    if names:
        axes[0][2].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_routing(report: dict, path: str | Path, grid: int, words_shown: int = 6,
                 patches: Optional[dict] = None) -> Path:
    """Heat map of expert load per layer and tower; then, per image layer, where in the image each expert's
    tokens sit (and, given `patches`: per layer, per expert, a list of (P, P, 3) uint8 arrays, the pixels of
    its most probable patches), and per text layer, the words each expert takes the largest share of."""
    import numpy as np

    patches = patches or {}

    towers = [t for t in ("image", "text") if any(k.startswith(t) for k in report)]
    image_layers = [k for k in report if "patch_map" in report[k]]
    text_layers = [k for k in report if report[k].get("top_words")]
    num_experts = max(len(v["load"]) for v in report.values())
    image_rows = []  # each layer's map, then its patches
    for name in image_layers:
        image_rows += [(name, "map")] + ([(name, "pixels")] if any(patches.get(name, [])) else [])
    cols, rows = max(len(towers), num_experts), 1 + len(image_rows) + len(text_layers)
    # rows as tall as their content: square maps, patch mosaics half as tall as wide, a few lines of words
    heights = [2.4] + [2.4 if kind == "map" else 1.4 for _, kind in image_rows] + [0.25 + 0.17 * words_shown] * len(
        text_layers)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax in axes.flat:
        ax.axis("off")
    for ax, tower in zip(axes[0], towers):
        names = sorted((k for k in report if k.startswith(tower)), key=lambda k: int(k.split(".")[1]))
        width = max(len(report[k]["load"]) for k in names)  # layers may have different numbers of experts
        load = np.full((len(names), width), np.nan)  # past a layer's experts: NaN, drawn blank
        for i, k in enumerate(names):
            load[i, :len(report[k]["load"])] = report[k]["load"]
        ax.axis("on")
        im = ax.imshow(np.ma.masked_invalid(load), cmap="viridis", vmin=0, aspect="auto")
        ax.set_yticks(range(len(names)), [f"block {k.split('.')[1]}" for k in names])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole numbers
        ax.set_xlabel("expert")
        ax.set_title(f"{tower} tower load")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for r, (name, kind) in enumerate(image_rows, start=1):
        if kind == "map":
            for e, pmap in enumerate(report[name]["patch_map"]):
                ax = axes[r][e]
                ax.imshow(np.array(pmap[1:]).reshape(grid, grid), cmap="magma", vmin=0)
                ax.set_title(f"{name} expert {e}: where", fontsize=8)
            continue
        for e, pixels in enumerate(patches[name]):
            if pixels:
                axes[r][e].imshow(_mosaic(pixels))
                axes[r][e].set_title(f"{name} expert {e}: top patches", fontsize=8)
    for r, name in enumerate(text_layers, start=1 + len(image_rows)):
        for e, top in enumerate(report[name]["top_words"]):
            ax = axes[r][e]
            ax.set_title(f"{name} expert {e}: words", fontsize=8)
            lines = [f"{w[:14]:<14} {share:4.0%}" for w, _, share in top[:words_shown]] or ["(none)"]
            ax.text(0.05, 0.95, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
                    transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the last column's titles reach past the figure
    plt.close(fig)
    return Path(path)


def _mosaic(pixels: list, cols: int = 4):
    """Patches (P, P, 3) in rows of `cols`, most probable first, with 1-pixel white gaps."""
    import numpy as np

    P = pixels[0].shape[0]
    rows = -(-len(pixels) // cols)
    out = np.full((rows * (P + 1) - 1, min(cols, len(pixels)) * (P + 1) - 1, 3), 255, dtype=np.uint8)
    for i, px in enumerate(pixels):
        r, c = divmod(i, cols)
        out[r * (P + 1):r * (P + 1) + P, c * (P + 1):c * (P + 1) + P] = px
    return out


def plot_zeroshot(results: list[dict], path: str | Path) -> Path:
    """Horizontal bars of each dataset's main metric (top-1, mAP or image->text recall@1), in percent."""
    rows = []
    for r in results:
        m = r.get("metrics") or {}
        key = next((k for k in ("top1", "mean_average_precision", "text_retrieval_recall@1") if k in m), None)
        if key is not None and m[key] is not None:
            rows.append((f"{r['dataset']} ({key})", 100 * m[key]))
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(3, len(rows)) + 0.8))
    ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color="tab:green")
    for i, (_, v) in enumerate(rows[::-1]):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_xlabel("%")
    ax.set_title("zero-shot")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
