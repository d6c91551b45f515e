"""Architectures by name: open_clip's ViT model configs, translated, plus small ones of our own."""
from __future__ import annotations

import copy
from functools import lru_cache

import open_clip

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
# our towers do not implement (ResNet, timm or HF towers, layer scale, attention pooling, SigLIP...).
_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}
_HARMLESS = {"output_tokens": False, "patch_dropout": 0.0, "proj_bias": False, "pool_type": None}


def _open_clip_cfg(name: str) -> dict | None:
    if name in _OWN:
        return copy.deepcopy(_OWN[name])
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
            "image_size": vis.get("image_size", 224),
            "patch_size": vis.get("patch_size", 16),
        },
        "text": {
            "width": txt.get("width", 512),
            "depth": txt.get("layers", 12),
            "num_heads": txt.get("heads", 8),
            "mlp_ratio": float(txt.get("mlp_ratio", 4.0)),
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


def get_model_config(name: str, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig of architecture `name`, with `overrides` (nested dict) merged in and validated."""
    oc = _open_clip_cfg(name)
    if oc is None:
        raise ConfigError(f"unknown architecture {name!r}; see clipmoe.list_architectures()")
    data = _translate(name, oc)
    if overrides:
        data = deep_merge(data, overrides)
    return from_dict(ModelConfig, data, "model" if not overrides else "model.overrides")


def model_config_from_dict(data: dict) -> ModelConfig:
    """Rebuilds a ModelConfig saved with `to_dict` (checkpoints store it as JSON)."""
    return from_dict(ModelConfig, data, "model")


__all__ = ["get_model_config", "list_architectures", "model_config_from_dict", "to_dict"]
