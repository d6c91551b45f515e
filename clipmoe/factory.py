"""`create_model` and friends: architectures by name, weights from files or open_clip tags,
open_clip's preprocessing and tokenizer."""
from __future__ import annotations

import os
import socket
import urllib.parse
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from open_clip.transform import image_transform

from .architectures import canonical_name, get_model_config, list_architectures
from .checkpoint import (
    is_clipmoe_file,
    load,
    load_weights,
    not_a_model_file,
    open_clip_weights_error,
    read_checkpoint,
    read_config,
)
from .config import ModelConfig, ModelSection, UpcycleConfig, deep_merge, from_dict, to_dict
from .errors import ClipmoeError, first_line
from .model import CLIP
from .tokenizer import Tokenizer
from .upcycle import is_dense_state_dict, load_upcycled

# open_clip's CLIP models all normalise with OpenAI's statistics.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def create_model(spec: Union[str, ModelConfig, ModelSection], pretrained: Optional[str] = None, **overrides) -> CLIP:
    """Builds a CLIP model.

    Args:
        spec: an architecture name (`clipmoe.list_architectures()`), a ModelConfig, a run config's `model`
            section (its weights and overrides apply, under those given here), or the path of a file
            written by `clipmoe.save` (open_clip weights there: an error naming the call to make).
        pretrained: an open_clip / OpenAI checkpoint file (.safetensors, .bin, .pt, .pth) or one of
            open_clip's pretrained tags for this architecture (fetched by open_clip's loader). A dense
            checkpoint for a config with MoE layers is upcycled into them (`upcycle.load_upcycled`; a
            ModelSection's `upcycle` settings apply).
        **overrides: nested ModelConfig fields, e.g. `vision={"moe": {"num_experts": 8}}`, `quick_gelu=True`.
    Returns:
        the model in eval mode, on the CPU.
    """
    upcycling = UpcycleConfig()
    if isinstance(spec, ModelSection):
        pretrained, upcycling = pretrained or spec.pretrained, spec.upcycle
        overrides = deep_merge(spec.overrides, overrides)
        spec = spec.arch
    elif not isinstance(spec, (str, Path, ModelConfig)):
        raise ClipmoeError(f"create_model takes an architecture name, a ModelConfig, a run config's model section "
                           f"or a saved model's path, not {type(spec).__name__}")
    if isinstance(spec, (str, Path)) and Path(spec).is_file() and is_clipmoe_file(spec):
        model = load(spec)
        if overrides or pretrained:
            raise ClipmoeError("overrides and pretrained= do not apply to a saved clipmoe model")
        return model
    if isinstance(spec, ModelConfig):
        cfg = from_dict(ModelConfig, deep_merge(to_dict(spec), overrides), "model") if overrides else spec
    else:
        spec = canonical_name(str(spec))
        if spec not in list_architectures():
            _not_an_architecture(Path(spec))
        cfg = get_model_config(spec, overrides or None)
    model = CLIP(cfg)
    upcycled = False
    if pretrained:
        path = _resolve_pretrained(cfg.name, pretrained)
        state = read_checkpoint(path)
        upcycled = bool(cfg.vision.moe or cfg.text.moe) and is_dense_state_dict(state)
        try:
            if upcycled:  # sparse upcycling
                load_upcycled(model, state, str(path), upcycling.noise_std, upcycling.reinit_fraction, upcycling.seed)
            else:
                load_weights(model, state, str(path))
        except ClipmoeError as e:
            if not is_clipmoe_file(path):
                raise
            raise ClipmoeError(f"{e}; {path} is a clipmoe model, which carries its architecture: to start from it "
                               f"as saved, give it in the architecture's place (model.arch, "
                               f"clipmoe.create_model(path))") from None
    if not upcycled and (upcycling.noise_std or upcycling.reinit_fraction):
        warnings.warn("model.upcycle settings have no effect: they apply when a dense `pretrained` checkpoint "
                      "fills MoE layers", stacklevel=2)
    return model.eval()


def _cached_hub_file(cfg: dict) -> Optional[str]:
    """The weights of an open_clip Hugging Face entry if they are already in the local hub cache."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    if hub.endswith("/"):  # open_clip's convention: a bare repo id means its default file name
        repo, name = hub.rstrip("/"), "open_clip_pytorch_model.bin"
    else:
        repo, name = os.path.split(hub)
    for candidate in (name.replace(".bin", ".safetensors").replace("pytorch_model", "model"),
                      name.replace(".bin", ".safetensors"), name):
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _unreachable_host(cfg: dict, timeout: float = 5.0) -> Optional[str]:
    """The download host when a TCP connection to it fails within `timeout` seconds, else None."""
    url = (os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else cfg.get("url", ""))
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname
    if not host:
        return None
    try:
        socket.create_connection((host, parsed.port or (80 if parsed.scheme == "http" else 443)),
                                 timeout=timeout).close()
        return None
    except OSError:
        return host


def _not_an_architecture(path: Path) -> None:
    """Says what to call for a checkpoint file given where an architecture name belongs."""
    if path.is_file():  # open_clip weights: name the architecture of their shapes
        raise open_clip_weights_error(path)
    if path.is_dir():
        raise not_a_model_file(path)
    if (path.suffix or len(path.parts) > 1) and not str(path).startswith("hf-hub:"):  # the latter: said by the config
        raise ClipmoeError(f"checkpoint not found: {path}")


def _resolve_pretrained(arch: str, pretrained: str) -> Path:
    """A local file as is; anything else is an open_clip tag, handed to open_clip's downloader."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(arch, pretrained)
    if not cfg:
        if path.is_dir():
            raise ClipmoeError(f"pretrained {pretrained!r} is a folder; give the checkpoint file in it")
        if path.suffix or "/" in pretrained:
            raise ClipmoeError(f"pretrained checkpoint not found: {pretrained}")
        tags = list_pretrained_tags_by_model(arch)
        raise ClipmoeError(f"unknown pretrained tag {pretrained!r} for {arch} "
                           f"(open_clip knows: {', '.join(tags) if tags else 'none'})")
    cached = _cached_hub_file(cfg)
    if cached:
        return Path(cached)
    host = _unreachable_host(cfg)
    if host:  # fail at once: huggingface_hub would retry every candidate file for most of a minute
        raise ClipmoeError(f"could not fetch open_clip pretrained weights {arch}/{pretrained!r}: {host} is "
                           "unreachable and the weights are not in the local cache; download them where "
                           "there is a network, or pass the checkpoint file as pretrained=PATH")
    try:
        file = download_pretrained(cfg)
    except Exception as e:  # offline: huggingface_hub / urllib raise many types
        reason = first_line(e)
        raise ClipmoeError(f"could not fetch open_clip pretrained weights {arch}/{pretrained!r}: "
                           f"{type(e).__name__}: {reason}") from None
    if not file:
        raise ClipmoeError(f"could not fetch open_clip pretrained weights {arch}/{pretrained!r}")
    return Path(file)


def create_transforms(cfg: ModelConfig):
    """(train_transform, eval_transform): open_clip's preprocessing for this image size."""
    size = cfg.vision.image_size
    return (image_transform(size, is_train=True, mean=MEAN, std=STD),
            image_transform(size, is_train=False, mean=MEAN, std=STD))


def create_model_and_transforms(spec: Union[str, ModelConfig], pretrained: Optional[str] = None, **overrides):
    """`(model, train_transform, eval_transform)`, as open_clip's function of the same name."""
    model = create_model(spec, pretrained=pretrained, **overrides)
    return (model, *create_transforms(model.config))


def get_tokenizer(spec: Union[str, ModelConfig, CLIP] = "ViT-B-32") -> Tokenizer:
    """open_clip's CLIP tokenizer for an architecture (its context length), text taken literally."""
    if isinstance(spec, CLIP):
        spec = spec.config
    if isinstance(spec, ModelConfig):
        return _tokenizer(spec.text.context_length)
    if Path(str(spec)).suffix == ".safetensors" and Path(str(spec)).is_file():
        return _tokenizer(read_config(spec).text.context_length)
    return _tokenizer(get_model_config(str(spec)).text.context_length)


@lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)

