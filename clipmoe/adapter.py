"""State-dict adapter between open_clip / OpenAI CLIP checkpoints and clipmoe's CLIP.

A pure function each way (no second model class to match checkpoint keys); tested both ways.
open_clip's ViT blocks hold `nn.MultiheadAttention`, whose packed `in_proj_weight` (3D, D) is exactly
our `qkv` Linear, so the mapping is a renaming.
"""
from __future__ import annotations

import re

import torch

from .errors import ClipmoeError

# (open_clip pattern, clipmoe pattern); `{i}` stands for a block index.
_RULES = [
    ("visual.class_embedding", "image.cls_token"),
    ("visual.positional_embedding", "image.pos_embed"),
    ("visual.conv1.weight", "image.patch_embed.weight"),
    ("visual.ln_pre.", "image.norm_pre."),
    ("visual.ln_post.", "image.norm."),
    ("visual.proj", "image.proj"),
    ("visual.transformer.resblocks.{i}.", "image.blocks.{i}."),
    ("token_embedding.weight", "text.token_embed.weight"),
    ("positional_embedding", "text.pos_embed"),
    ("ln_final.", "text.norm."),
    ("text_projection", "text.proj"),
    ("transformer.resblocks.{i}.", "text.blocks.{i}."),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
]
_BLOCK_RULES = [
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("ls_1.", "ls1."),
    ("ls_2.", "ls2."),
]
# Keys that carry no weights: OpenAI's JIT metadata and open_clip's non-persistent buffers.
_IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask"}


def _compile(rules, src: int):
    """Regexes for one direction. A pattern ending in '.' is a prefix, any other a whole key."""
    out = []
    for pair in rules:
        pat = re.escape(pair[src]).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile("^" + pat + ("" if pat.endswith(".") else "$")),
                    pair[1 - src].replace("{i}", r"\1"), "{i}" in pair[src]))
    return out


_TO_OURS, _TO_OPEN_CLIP = _compile(_RULES, 0), _compile(_RULES, 1)
_BLOCK_TO_OURS, _BLOCK_TO_OPEN_CLIP = _compile(_BLOCK_RULES, 0), _compile(_BLOCK_RULES, 1)


def _rename(key: str, rules, block_rules) -> str | None:
    for pat, repl, per_block in rules:
        m = pat.match(key)
        if m is None:
            continue
        head, rest = m.expand(repl), key[m.end():]
        if not per_block:
            return head + rest
        for bpat, brepl, _ in block_rules:
            bm = bpat.match(rest)
            if bm is not None:
                return head + bm.expand(brepl) + rest[bm.end():]
        return None
    return None


def normalize_open_clip_keys(state_dict: dict) -> dict:
    """Strips DDP's `module.` prefix and maps CustomTextCLIP's `text.` layout to the plain CLIP one."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("text.") and not k.startswith("text.transformer.embeddings"):
            k = k[len("text."):]
        out[k] = v
    return out


def is_open_clip_state_dict(state_dict: dict) -> bool:
    keys = normalize_open_clip_keys(dict.fromkeys(state_dict))
    return "visual.conv1.weight" in keys and "token_embedding.weight" in keys


def _convert(state_dict: dict, rules, block_rules) -> tuple[dict, list[str]]:
    """(renamed state dict, keys no rule places)."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        new = _rename(k, rules, block_rules)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    return out, unknown


def from_open_clip(state_dict: dict) -> dict:
    """open_clip / OpenAI CLIP (ViT) state dict -> clipmoe state dict. Raises on keys it cannot place."""
    state_dict = {k: v for k, v in normalize_open_clip_keys(state_dict).items() if k not in _IGNORED}
    out, unknown = _convert(state_dict, _TO_OURS, _BLOCK_TO_OURS)
    if unknown:
        raise ClipmoeError(f"checkpoint has {len(unknown)} keys a plain ViT CLIP does not have "
                           f"(e.g. {', '.join(unknown[:3])}): not a supported open_clip architecture")
    return out


def to_open_clip(state_dict: dict) -> dict:
    """clipmoe state dict of a dense model -> open_clip's CLIP state dict (loads into open_clip.CLIP)."""
    out, unknown = _convert(state_dict, _TO_OPEN_CLIP, _BLOCK_TO_OPEN_CLIP)
    if unknown:
        moe = any(".mlp.experts." in k or ".mlp.router." in k for k in unknown)
        why = "it has MoE layers, which open_clip's format cannot hold" if moe else f"unknown keys {unknown[:3]}"
        raise ClipmoeError(f"cannot write an open_clip checkpoint: {why}")
    return out


def check_compatible(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """One-line error when `state_dict` does not fit `model` (missing, unexpected, shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
    if problems:
        raise ClipmoeError(f"{source} does not match {model.config.name or 'the model'}: {'; '.join(problems)}")
