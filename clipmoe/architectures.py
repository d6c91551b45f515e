"""Architectures by name: open_clip's ViT model configs, translated, plus small ones of our own."""
from __future__ import annotations

import copy
import difflib
import math
from functools import lru_cache
from typing import Optional

import open_clip

from . import adapter
from .config import ModelConfig, deep_merge, from_dict, to_dict
from .errors import ConfigError

# Small architectures for tests and the quickstart (open_clip's JSON layout, so one translator).
_OWN = {
    "clipmoe-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
    "clipmoe-micro": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}

# open_clip config keys we translate; any other key with a non-default value means an architecture
# our towers do not implement (ResNet, timm or HF towers, attention pooling, SigLIP...).
_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "ls_init_value",
                "patch_dropout"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}
_HARMLESS = {"output_tokens": False, "proj_bias": False, "pool_type": None}


_LS_INIT = 1e-5  # the initial layer-scale gain given to weights of no known architecture (open_clip's default)


def canonical_name(name: str) -> str:
    """OpenAI's names ('ViT-B/32') as open_clip's ('ViT-B-32'), as open_clip's create_model takes them."""
    if "/" in name and not name.startswith("hf-hub:") and _open_clip_cfg(name) is None:
        dashed = name.replace("/", "-")
        if _open_clip_cfg(dashed) is not None:
            return dashed
    return name


def _unknown(name: str) -> ConfigError:
    if name.startswith("hf-hub:"):
        return ConfigError(f"{name}: models on the Hugging Face Hub are not fetched; give the architecture named in "
                           f"its open_clip_config.json and its downloaded weights: create_model(ARCH, pretrained=FILE)")
    names = list_architectures()
    near = [n for n in names if n.lower() == name.lower()] or difflib.get_close_matches(name, names, 2, 0.6)
    guess = f" ({' or '.join(near)}?)" if near else ""
    return ConfigError(f"unknown architecture {name!r}{guess}; see clipmoe.list_architectures()")


def _open_clip_cfg(name: str) -> dict | None:
    if name in _OWN:
        return copy.deepcopy(_OWN[name])
    if name.startswith("hf-hub:"):  # open_clip would download its config (retrying for half a minute offline)
        return None
    return open_clip.get_model_config(name)


def _unsupported(section: str, cfg: dict, known: set) -> list[str]:
    bad = []
    for k, v in cfg.items():
        if k in known or (k in _HARMLESS and v in (_HARMLESS[k], None)):
            continue
        if k == "pool_type" and v in ("tok", "argmax"):
            continue
        bad.append(f"{section}{k}={v!r}")
    return bad


def _translate(name: str, oc: dict) -> dict:
    vis, txt = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
    bad = (_unsupported("", {k: v for k, v in oc.items() if k not in ("vision_cfg", "text_cfg")}, _TOP_KEYS)
           + _unsupported("vision_cfg.", vis, _VISION_KEYS) + _unsupported("text_cfg.", txt, _TEXT_KEYS))
    if isinstance(vis.get("layers"), (list, tuple)):
        bad.append("vision_cfg.layers (ResNet)")
    if bad:
        raise ConfigError(f"architecture {name!r} is not a plain ViT CLIP; unsupported: {', '.join(bad)}")
    v_width = vis.get("width", 768)
    return {
        "name": name,
        "embed_dim": oc["embed_dim"],
        "quick_gelu": bool(oc.get("quick_gelu", False)),
        "vision": {
            "width": v_width,
            "depth": vis.get("layers", 12),
            "num_heads": v_width // vis.get("head_width", 64),
            "mlp_ratio": float(vis.get("mlp_ratio", 4.0)),
            "ls_init_value": vis.get("ls_init_value"),
            "image_size": vis.get("image_size", 224),
            "patch_size": vis.get("patch_size", 16),
            "patch_dropout": float(vis.get("patch_dropout") or 0.0),
        },
        "text": {
            "width": txt.get("width", 512),
            "depth": txt.get("layers", 12),
            "num_heads": txt.get("heads", 8),
            "mlp_ratio": float(txt.get("mlp_ratio", 4.0)),
            "ls_init_value": txt.get("ls_init_value"),
            "context_length": txt.get("context_length", 77),
            "vocab_size": txt.get("vocab_size", 49408),
        },
    }


@lru_cache(maxsize=None)
def _is_supported(name: str) -> bool:
    try:
        _translate(name, _open_clip_cfg(name))
        return True
    except ConfigError:
        return False


def list_architectures() -> list[str]:
    """Names `create_model` accepts: our small ones and every plain-ViT open_clip config."""
    return list(_OWN) + [n for n in open_clip.list_models() if _is_supported(n)]


def list_pretrained() -> list[tuple[str, str]]:
    """(architecture, tag) of open_clip's pretrained weights that `create_model(arch, pretrained=tag)` loads
    (fetched by open_clip's loader; without a network, only those already in the local cache)."""
    supported = set(list_architectures())
    return [(arch, tag) for arch, tag in open_clip.list_pretrained() if arch in supported]


def get_model_config(name: str, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig of architecture `name`, with `overrides` (nested dict) merged in and validated."""
    name = canonical_name(name)
    oc = _open_clip_cfg(name)
    if oc is None:
        raise _unknown(name)
    data = _translate(name, oc)
    if overrides:
        data = deep_merge(data, overrides)
    return from_dict(ModelConfig, data, "model" if not overrides else "model.overrides")


def _shapes(data: dict) -> tuple:
    """What a translated architecture fixes in its weights' shapes (not its heads or activation); layer scale
    by its presence (its initial value is not in trained weights)."""
    v, t = data["vision"], data["text"]
    return (data["embed_dim"], v["width"], v["depth"], _hidden(v), v["image_size"], v["patch_size"],
            v["ls_init_value"] is not None, t["width"], t["depth"], _hidden(t), t["context_length"],
            t["vocab_size"], t["ls_init_value"] is not None)


def _hidden(tower: dict) -> int:
    return int(tower["width"] * tower["mlp_ratio"])  # as model.make_mlp sizes the MLP


@lru_cache(maxsize=None)
def _by_shapes() -> dict[tuple, list[dict]]:
    table: dict[tuple, list[dict]] = {}
    for name in list_architectures():
        data = _translate(name, _open_clip_cfg(name))
        table.setdefault(_shapes(data), []).append(data)
    return table


def config_from_weights(state_dict: dict, quick_gelu: bool = False,
                        num_heads: Optional[tuple[int, int]] = None) -> ModelConfig:
    """The architecture of a dense state dict (open_clip's or clipmoe's keys), from its shapes. Heads and
    activation leave no trace in the weights: heads are `num_heads` (image, text), else those of the open_clip
    architecture of these shapes, else width / 64 (as open_clip reads OpenAI's archives); the activation is
    `quick_gelu`'s. Layer scale is read from its gains' presence."""
    if adapter.is_open_clip_state_dict(state_dict):
        state_dict = adapter.from_open_clip(state_dict)

    def shape(key: str) -> tuple:
        if key not in state_dict:
            raise ConfigError(f"cannot tell the architecture: the weights have no {key!r} (not a ViT CLIP)")
        return tuple(state_dict[key].shape)

    def depth(tower: str) -> int:
        return len({k.split(".")[2] for k in state_dict if k.startswith(f"{tower}.blocks.")})

    def mlp_ratio(tower: str, width: int) -> float:
        hidden = shape(f"{tower}.blocks.0.mlp.fc1.weight")[0]
        ratio = hidden / width  # int(width * ratio) can fall one short: int(11 * (60 / 11)) == 59
        return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width

    def ls_init_value(tower: str) -> Optional[float]:  # present or not; open_clip's value for a known arch
        return _LS_INIT if f"{tower}.blocks.0.ls1.gamma" in state_dict else None

    v_width, _, patch, _ = shape("image.patch_embed.weight")
    grid = math.isqrt(shape("image.pos_embed")[0] - 1)
    vocab, t_width = shape("text.token_embed.weight")
    data = {
        "embed_dim": shape("image.proj")[1],
        "vision": {"width": v_width, "depth": depth("image"), "mlp_ratio": mlp_ratio("image", v_width),
                   "ls_init_value": ls_init_value("image"), "image_size": grid * patch, "patch_size": patch},
        "text": {"width": t_width, "depth": depth("text"), "mlp_ratio": mlp_ratio("text", t_width),
                 "ls_init_value": ls_init_value("text"), "context_length": shape("text.pos_embed")[0],
                 "vocab_size": vocab},
    }
    if "logit_bias" in state_dict:  # a SigLIP-style bias; its value comes with the weights
        data["init_logit_bias"] = -10.0
    known = _by_shapes().get(_shapes(data), [])
    same = [d for d in known if d["quick_gelu"] == quick_gelu] or known
    if num_heads is None:
        num_heads = ((same[0]["vision"]["num_heads"], same[0]["text"]["num_heads"]) if same
                     else tuple(w // 64 if w % 64 == 0 else 1 for w in (v_width, t_width)))
    data["vision"]["num_heads"], data["text"]["num_heads"] = num_heads
    if same:  # open_clip's own ratios (4.9231 for ViT-bigG-14), which give the same hidden widths
        for tower in ("vision", "text"):
            data[tower]["mlp_ratio"] = same[0][tower]["mlp_ratio"]
            data[tower]["ls_init_value"] = same[0][tower]["ls_init_value"]
    data.update(name=same[0]["name"] if same and same[0]["quick_gelu"] == quick_gelu else "", quick_gelu=quick_gelu)
    return from_dict(ModelConfig, data, "the weights' architecture")


def model_config_from_dict(data: dict) -> ModelConfig:
    """Rebuilds a ModelConfig saved with `to_dict` (checkpoints store it as JSON)."""
    return from_dict(ModelConfig, data, "model")


__all__ = ["config_from_weights", "get_model_config", "list_architectures", "list_pretrained", "model_config_from_dict",
           "to_dict"]
